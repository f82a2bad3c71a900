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
import random
import re
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_harness import (NAME, Server, check, report, prompt_ids_file, run_texts, trained_model)  # noqa: E402

epic, repo = sys.argv[1], sys.argv[2]
work, model = trained_model(repo)
common = ["--model", model, "--allow-missing-experts", "--backend", "cpu"]

server = Server(epic, [*common, "--served-model-name", NAME, "--port", "0", "--max-context", "256",
                       "--max-active-sequences", "4", "--max-body-bytes", "4096", "--shutdown-grace", "5",
                       "--default-max-tokens", "8"])
if server.port is None:
    print("FAIL epic serve did not start")
    sys.exit(1)
port, base, request, stream = server.port, server.base, server.request, server.stream
if not server.wait_health(200, 120):
    print("FAIL /health never became ready")
    sys.exit(1)
check(True, "/health is 200 once the model is loaded")

status, _, body = request("GET", "/v1/models")
check(status == 200 and json.loads(body)["data"][0]["id"] == NAME, "/v1/models lists the served model")

# What `epic run` gives for the same prompts: greedy for both, sampled (seed 7) for the first (its seed stream
# is prompt 0's, which is what the server uses for every request).
prompts = ["def main():", "import os\n"]


ids_file, ids = prompt_ids_file(epic, model, work, prompts)
greedy = run_texts(epic, common, ids_file, 24, ["--temperature", "0"])
sampled = run_texts(epic, common, ids_file, 24, ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"])[0]


def complete(prompt, **settings):
    status, _, body = request("POST", "/v1/completions",
                              {"model": NAME, "prompt": prompt, "max_tokens": 24, **settings})
    return status, json.loads(body)


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
    if server.process.poll() is not None:
        crashed += 1
        break
check(crashed == 0 and server.process.poll() is None, "300 fuzzed requests: every answer an HTTP status, the server alive")
status, _, _ = request("GET", "/health")
check(status == 200, "healthy after the fuzz loop")

# A client that leaves mid-stream: its sequence is cancelled.
def cancelled_count():
    _, _, text = request("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith('epic_requests_total{status="cancelled"}'):
            return int(float(line.split()[1]))
    return -1


def leaves_early(stream, seed):
    """Sends a long completion, leaves (after the stream's first bytes, or once it is in the batch), and says
    whether the server counted it cancelled within 10 s."""
    before = cancelled_count()
    sock = socket.create_connection(("127.0.0.1", port))
    body = {"model": NAME, "prompt": prompts[0], "max_tokens": 200, "temperature": 0.9, "seed": seed}
    if stream:
        body["stream"] = True
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                 str(len(payload)).encode() + b"\r\n\r\n" + payload)
    if stream:
        sock.recv(200)  # the stream has begun
    else:
        time.sleep(0.2)  # the request is in the batch
    sock.close()
    for _ in range(100):
        if cancelled_count() > before:
            return True
        time.sleep(0.1)
    return False


check(leaves_early(True, 1), "a client leaving mid-stream is cancelled (counted in /metrics)")
# A client that leaves while its whole (non-streamed) completion is computed: cancelled too.
check(leaves_early(False, 2), "a client leaving before its whole completion is cancelled (counted in /metrics)")
status, body = complete(prompts[1], temperature=0)
check(status == 200 and body["choices"][0]["text"] == greedy[1], "keep-alive requests still answered after that")
_, headers, metrics = request("GET", "/metrics")
check("epic_time_to_first_token_seconds_bucket" in metrics and "epic_generation_tokens_total" in metrics,
      "/metrics has the request, token and latency figures")
# The per-expert load of the last window (the in-process engine tallies its routed rows on the backend): every
# MoE layer saw the same tokens, each routed to num_experts_per_tok experts, and the one worker computed all.
rows_by_layer = {}
for line in metrics.splitlines():
    if line.startswith("epic_expert_rows_window{"):
        layer = re.search(r'layer="(\d+)"', line).group(1)
        rows_by_layer[layer] = rows_by_layer.get(layer, 0.0) + float(line.split()[1])
top_k = json.load(open(os.path.join(model, "config.json")))["num_experts_per_tok"]
layer_totals = set(rows_by_layer.values())
check(len(rows_by_layer) > 0 and len(layer_totals) == 1 and min(layer_totals) > 0 and min(layer_totals) % top_k == 0,
      f"per-expert rows of the last window: every MoE layer the same multiple of top-k {top_k} ({sorted(layer_totals)})")
worker_rows = sum(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("epic_worker_expert_rows_window{"))
check(worker_rows == sum(rows_by_layer.values()), "the worker's rows of the window are all the experts' rows")
promtool = shutil.which("promtool")
if promtool:
    out = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
    check(out.returncode == 0, "promtool check metrics: " + (out.stdout + out.stderr).strip())
else:
    print("note: promtool not installed; the metrics format is checked by the line shapes only")
    check(all(line.startswith("#") or len(line.split(" ")) == 2 for line in metrics.strip().splitlines()),
          "every metrics line is a comment or 'name value'")

code = server.stop()
check(code == 0, f"SIGTERM: exit 0 (got {code})")
shutil.rmtree(work, ignore_errors=True)
report("serve check")
