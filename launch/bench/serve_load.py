#!/usr/bin/env python3
"""epic serve under load, against epic run on the same prompts, in one run (issue 11's serving benchmark).

Starts `epic serve` on the model, then CLIENTS concurrent streaming clients each send REQUESTS completions
(prompts cut from a text file, greedy, MAX_TOKENS each) back to back. Prints requests/s, generated tokens/s,
p50/p99 time to first token and inter-token latency, errors, the scheduler's own time per engine step (from
/metrics), and then `epic run` over the same prompts with --max-active-sequences CLIENTS: its tokens/s and
the ratio serve / run (the target: >= 0.95).

  python3 launch/bench/serve_load.py --epic build/epic --model DIR --text heldout.txt \
      [--clients 64] [--requests 4] [--max-tokens 64] [--prompt-chars 200] [-- extra epic flags]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

parser = argparse.ArgumentParser()
parser.add_argument("--epic", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--text", required=True)
parser.add_argument("--clients", type=int, default=64)
parser.add_argument("--requests", type=int, default=4, help="per client")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--prompt-chars", type=int, default=200)
parser.add_argument("extra", nargs="*", help="flags for both epic serve and epic run (e.g. --backend cuda)")
args = parser.parse_args()

text = open(args.text, encoding="utf-8", errors="replace").read()
total = args.clients * args.requests
step = max(1, (len(text) - args.prompt_chars) // max(1, total))
prompts = [text[i * step: i * step + args.prompt_chars] for i in range(total)]
prompts = [p if p.strip() else "def main():" for p in prompts]

server = subprocess.Popen([args.epic, "serve", "--model", args.model, "--port", "0", "--served-model-name", "m",
                           "--max-active-sequences", str(args.clients), "--max-queued", str(4 * total),
                           "--allow-missing-experts", *args.extra],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
port = None
for line in server.stderr:
    sys.stderr.write("serve: " + line)
    if "listening on http://" in line:
        port = int(line.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
    if "ready" in line:
        break
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
base = f"http://127.0.0.1:{port}"

results = []  # (ttft, [inter-token gaps], tokens, ok)
lock = threading.Lock()


def client(index):
    for r in range(args.requests):
        prompt = prompts[index * args.requests + r]
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first, last, gaps, tokens, ok = None, None, [], 0, False
        try:
            with urllib.request.urlopen(req, timeout=600) as response:
                for raw in response:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        ok = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0].get("text"):
                        now = time.perf_counter()
                        if first is None:
                            first = now - start
                        else:
                            gaps.append(now - last)
                        last = now
        except Exception as error:  # counted as an error
            print("client error:", error, file=sys.stderr)
        with lock:
            results.append((first, gaps, tokens, ok))


threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
wall_start = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - wall_start
metrics = urllib.request.urlopen(base + "/metrics").read().decode()
server.terminate()
server.wait(timeout=60)


def metric(name):
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def pct(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


errors = sum(1 for r in results if not r[3])
tokens = sum(r[2] for r in results)
ttft = [r[0] for r in results]
itl = [g for r in results for g in r[1]]
steps = metric("epic_engine_steps_total")
sched = metric("epic_scheduling_seconds_total")
serve_tps = tokens / wall
print(f"epic serve: {args.clients} concurrent streaming clients x {args.requests} requests, max_tokens "
      f"{args.max_tokens}, {args.prompt_chars}-char prompts; flags {' '.join(args.extra) or '(none)'}")
print(f"  {len(results)} requests in {wall:.2f} s: {len(results) / wall:.2f} requests/s, {serve_tps:.1f} tokens/s, "
      f"{errors} errors")
print(f"  time to first token p50 {pct(ttft, 0.5) * 1e3:.1f} ms, p99 {pct(ttft, 0.99) * 1e3:.1f} ms; inter-token "
      f"p50 {pct(itl, 0.5) * 1e3:.2f} ms, p99 {pct(itl, 0.99) * 1e3:.2f} ms")
print(f"  engine: {steps:.0f} steps, {metric('epic_engine_step_seconds_total') / max(steps, 1) * 1e3:.3f} ms a step; "
      f"the scheduler's own time {sched / max(steps, 1) * 1e6:.1f} us a step")

# epic run on the same prompts, as many live at once as the server had clients.
with tempfile.TemporaryDirectory() as work:
    ids_file = os.path.join(work, "ids.txt")
    with open(ids_file, "w") as f:
        for p in prompts:
            out = subprocess.run([args.epic, "tokenize", "--model", args.model, "--text", p], capture_output=True,
                                 text=True, check=True)
            f.write(out.stdout.strip() + "\n")
    start = time.perf_counter()
    out = subprocess.run([args.epic, "run", "--model", args.model, "--prompt-ids-file", ids_file, "--max-new-tokens",
                          str(args.max_tokens), "--max-active-sequences", str(args.clients), "--allow-missing-experts",
                          *args.extra], capture_output=True, text=True)
    run_wall = time.perf_counter() - start
    if out.returncode != 0:
        print(out.stderr[-2000:])
        sys.exit(1)
    run_tokens = sum(len(json.loads(line)["ids"]) for line in out.stdout.splitlines())
    # Generation time as epic run reports it (its own clock, loading excluded).
    generated = [l for l in out.stderr.splitlines() if "generated in" in l]
    run_seconds = float(generated[0].split("generated in")[1].split()[0]) if generated else run_wall
run_tps = run_tokens / run_seconds
print(f"epic run, same prompts, --max-active-sequences {args.clients}: {run_tokens} tokens in {run_seconds:.2f} s = "
      f"{run_tps:.1f} tokens/s (wall with loading {run_wall:.2f} s)")
print(f"serve / run tokens/s: {serve_tps / run_tps:.3f} (target >= 0.95)")
sys.exit(1 if errors else 0)
