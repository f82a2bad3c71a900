#!/usr/bin/env python3
"""epic serve under load, against epic run on the same prompts, in one run (issue 11's serving benchmark).

Starts `epic serve` on the model, then `epic bench-serve` (a C++ load client on one thread, never the
bottleneck): CLIENTS concurrent streaming clients each send REQUESTS completions (prompts cut from a text
file, greedy, MAX_TOKENS each) back to back. Prints requests/s, generated tokens/s, p50/p99 time to first
token and inter-token latency, errors, the scheduler's own time per engine step (from /metrics), and then
`epic run` over the same prompts with --max-active-sequences CLIENTS: its tokens/s and the ratio serve / run
(the target: >= 0.95). With --workers N the server runs the model in a worker job of N ranks, and epic run
runs under mpirun -np N.

With --rounds R the server takes R rounds of the load and epic run runs R times: the ratio is the first (cold)
round's tokens/s against the median run's, the later rounds show the warm server. Also checks /metrics'
per-expert load of the last window (every MoE layer the same multiple of top-k, the workers' rows all of it).

  python3 launch/bench/serve_load.py --epic build/epic --model DIR --text heldout.txt \
      [--clients 64] [--requests 4] [--rounds 1] [--max-tokens 64] [--prompt-chars 200] [--workers N] \
      [-- extra epic flags]
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
parser.add_argument("--workers", type=int, default=0, help="serve over a worker job of N ranks (0: in process)")
parser.add_argument("--rounds", type=int, default=1,
                    help="bench-serve rounds against the same server, then as many epic runs. The ratio is the "
                         "first (cold) round's against the median run (epic run starts cold every time: graph "
                         "captures and first shapes in its clock); the later rounds show the warm server")
parser.add_argument("--json", help="also write every figure here")
parser.add_argument("extra", nargs="*", help="flags for both epic serve and epic run (e.g. --backend cuda)")
args = parser.parse_args()

text = open(args.text, encoding="utf-8", errors="replace").read()
total = args.clients * args.requests
step = max(1, (len(text) - args.prompt_chars) // max(1, total))
prompts = [text[i * step: i * step + args.prompt_chars] for i in range(total)]
prompts = [p if p.strip() else "def main():" for p in prompts]

work = tempfile.mkdtemp(prefix="epic-serve-load-")
# One prompt a line (newlines inside a prompt become spaces): epic run --prompts-file and the server tokenize
# the same text.
prompts = [" ".join(p.split()) or "def main():" for p in prompts]
prompts_file = os.path.join(work, "prompts.txt")
with open(prompts_file, "w") as f:
    f.write("\n".join(prompts) + "\n")

worker_flags = ["--workers", str(args.workers)] if args.workers else []
server = subprocess.Popen([args.epic, "serve", "--model", args.model, "--port", "0", "--served-model-name", "m",
                           "--max-active-sequences", str(args.clients), "--max-queued", str(4 * total),
                           "--allow-missing-experts", *worker_flags, *args.extra],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
port = None
for line in server.stderr:
    sys.stderr.write("serve: " + line)
    if "listening on http://" in line:
        port = int(line.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
    if "epic serve: ready" in line:
        break
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
base = f"http://127.0.0.1:{port}"

load_json = os.path.join(work, "load.json")
serve_rounds = []
for _ in range(max(args.rounds, 1)):
    load = subprocess.run([args.epic, "bench-serve", "--url", base, "--model-name", "m", "--prompts-file",
                           prompts_file, "--clients", str(args.clients), "--requests", str(args.requests),
                           "--max-tokens", str(args.max_tokens), "--json", load_json], capture_output=True, text=True)
    print(load.stdout.rstrip())
    serve_rounds.append(json.load(open(load_json)))
figures = dict(serve_rounds[0])  # the cold round: compared with epic run, which starts cold every time
figures["errors"] = sum(f["errors"] for f in serve_rounds)
metrics = urllib.request.urlopen(base + "/metrics").read().decode()
server.terminate()
server.wait(timeout=60)


def metric(name):
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


errors = figures["errors"]
serve_tps = figures["tokens_per_second"]
steps = metric("epic_engine_steps_total")
sched = metric("epic_scheduling_seconds_total")
print(f"epic serve: {args.clients} concurrent streaming clients x {args.requests} requests, max_tokens "
      f"{args.max_tokens}, {args.prompt_chars}-char prompts; {args.workers or 'no'} worker job ranks; flags "
      f"{' '.join(args.extra) or '(none)'}")
print(f"  engine: {steps:.0f} steps, {metric('epic_engine_step_seconds_total') / max(steps, 1) * 1e3:.3f} ms a step; "
      f"the scheduler's own time {sched / max(steps, 1) * 1e6:.1f} us a step")

# A correctness guard on the figures /metrics gave (not a timing): the per-expert load of the last window. Each
# rank reads all its MoE layers' counts at one step boundary, so every layer's total over the experts is the
# same multiple of num_experts_per_tok, and the workers' rows add up to the experts' rows.
rows_by_layer = {}
for line in metrics.splitlines():
    if line.startswith("epic_expert_rows_window{"):
        layer = line.split('layer="')[1].split('"')[0]
        rows_by_layer[layer] = rows_by_layer.get(layer, 0.0) + float(line.split()[1])
worker_rows = sum(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("epic_worker_expert_rows_window{"))
top_k = json.load(open(os.path.join(args.model, "config.json")))["num_experts_per_tok"]
layer_totals = sorted(set(rows_by_layer.values()))
load_ok = (len(layer_totals) == 1 and layer_totals[0] > 0 and layer_totals[0] % top_k == 0 and
           worker_rows == sum(rows_by_layer.values()))
print(f"  per-expert load of the last window ({metric('epic_load_window_seconds'):.2f} s): {len(rows_by_layer)} MoE "
      f"layers with {layer_totals} rows, workers {worker_rows:.0f} rows: {'ok' if load_ok else 'FAILED'}")

# epic run on the same prompts.
launcher = ["mpirun", "-np", str(args.workers), "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0
                                                                       else []) if args.workers else []
# As many sequences live at once over the job as the server had clients: CLIENTS / N per rank.
run_active = -(-args.clients // max(args.workers, 1))
run_rounds = []
for _ in range(max(args.rounds, 1)):
    start = time.perf_counter()
    out = subprocess.run([*launcher, args.epic, "run", "--model", args.model, "--prompts-file", prompts_file,
                          "--max-new-tokens", str(args.max_tokens), "--max-active-sequences", str(run_active),
                          "--allow-missing-experts", *args.extra], capture_output=True, text=True)
    run_wall = time.perf_counter() - start
    if out.returncode != 0:
        print(out.stderr[-2000:])
        sys.exit(1)
    run_tokens = sum(len(json.loads(line)["ids"]) for line in out.stdout.splitlines())
    # Generation time as epic run reports it (its own clock, loading excluded).
    generated = [l for l in out.stderr.splitlines() if "generated in" in l]
    run_seconds = float(generated[0].split("generated in")[1].split()[0]) if generated else run_wall
    run_rounds.append(run_tokens / run_seconds)
    print(f"epic run, same prompts, --max-active-sequences {run_active} on each of {max(args.workers, 1)} rank(s): "
          f"{run_tokens} tokens in {run_seconds:.2f} s = {run_tokens / run_seconds:.1f} tokens/s (wall with loading "
          f"{run_wall:.2f} s)")
run_tps = statistics.median(run_rounds)
if args.rounds > 1:
    serve_list = ", ".join(f"{f['tokens_per_second']:.0f}" for f in serve_rounds)
    run_list = ", ".join(f"{r:.0f}" for r in run_rounds)
    warm = statistics.median(f["tokens_per_second"] for f in serve_rounds[1:])
    print(f"{args.rounds} rounds: serve tokens/s {serve_list} (the first cold, as every epic run; warm median "
          f"{warm:.1f}), epic run {run_list} (median {run_tps:.1f})")
print(f"serve (cold round) / run (median) tokens/s: {serve_tps / run_tps:.3f} (target >= 0.95)")
if args.json:
    figures.update({"serve_tokens_per_second": serve_tps, "run_tokens_per_second": run_tps,
                    "ratio": serve_tps / run_tps, "scheduler_us_per_step": sched / max(steps, 1) * 1e6,
                    "engine_ms_per_step": metric("epic_engine_step_seconds_total") / max(steps, 1) * 1e3,
                    "workers": args.workers, "clients": args.clients, "rounds": args.rounds,
                    "serve_rounds_tokens_per_second": [f["tokens_per_second"] for f in serve_rounds],
                    "run_rounds_tokens_per_second": run_rounds})
    json.dump(figures, open(args.json, "w"), indent=2)
sys.exit(1 if errors or not load_ok else 0)
