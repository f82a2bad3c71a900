#!/usr/bin/env python3
"""epic serve over a worker job (issue 11) on the trained model, CPU ranks under mpirun, from clients' side:
- `--workers 2`: concurrent mixed requests (greedy and sampled, whole and streamed) give `epic run`'s text;
  the sequences are spread over both ranks (/metrics per rank);
- kill -9 of a worker rank mid-stream: the coordinator restarts the job and resumes every in-flight request;
  each client sees one continuous stream equal to `epic run`'s (no lost or repeated token), greedy and
  sampled, and /metrics counts the restart and the resumed sequences;
- kill -9 of a rank while idle: /health says not ready, then ready again (heartbeat), and requests go on;
- a client leaving mid-stream: its sequence is cancelled on the worker (its KV freed: /metrics);
- `--max-worker-restarts 0`: a dead job ends the server with a clear message and every running request is
  told (an error, not a hang);
- `--attach`: a worker job started apart with mpirun connects; SIGTERM stops it (its ranks exit 0);
- bad flags and a worker job that cannot start: clear errors, no hang;
- SIGTERM: exit 0 and no worker process left behind.

  python3 tests/serve/serve_workers_check.py EPIC_BINARY REPO_ROOT
"""
import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_harness import (NAME, Server, check, report, prompt_ids_file, run_texts, trained_model)  # noqa: E402

epic, repo = sys.argv[1], sys.argv[2]
if shutil.which("mpirun") is None:
    print("SKIPPED: no mpirun (run launch/setup_debian.sh)")
    sys.exit(77)
os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # two ranks on a small CI machine
if os.geteuid() == 0:
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")

work, model = trained_model(repo)
common = ["--model", model, "--allow-missing-experts", "--backend", "cpu"]
serve_flags = [*common, "--served-model-name", NAME, "--port", "0", "--max-context", "256",
               "--max-active-sequences", "4", "--heartbeat", "0.5", "--worker-step-timeout", "60",
               "--prefill-chunk", "3", "--kv-cache-tokens", "512"]

prompts = ["def main():", "import os\n", "class Node:"]
ids_file, ids = prompt_ids_file(epic, model, work, prompts)
LONG = 64
greedy = run_texts(epic, common, ids_file, LONG, ["--temperature", "0"])
# The server mixes every request's seed with id 0: prompt 0's stream in `epic run`.
sampled = run_texts(epic, common, ids_file, LONG, ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"])[0]


def worker_pids(server):
    """The pids of the current worker job's ranks, by rank, from the coordinator's last 'worker job ready'."""
    for line in reversed(server.lines):
        if "worker job ready:" in line:
            return [int(pid) for pid in re.findall(r"pid (\d+)", line)]
    return []


def alive(pid):
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_gone(pids, seconds=10):
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


server = Server(epic, [*serve_flags, "--workers", "2"])
check(server.wait_health(200, 180), "--workers 2: /health is 200 once the worker job is up")
check(server.metric("epic_workers_ready") == 1.0, "/metrics: epic_workers_ready 1")
first_pids = worker_pids(server)
check(len(first_pids) == 2 and all(alive(p) for p in first_pids), f"two worker ranks running ({first_pids})")


def complete(prompt, **settings):
    import json
    status, _, body = server.request("POST", "/v1/completions",
                                     {"model": NAME, "prompt": prompt, "max_tokens": LONG, **settings})
    return json.loads(body)["choices"][0]["text"] if status == 200 else f"status {status}: {body}"


# Concurrent mixed requests: each gets epic run's text whatever else shares the batch and the rank.
seen_on_both = [False]


def watch_ranks():
    for _ in range(200):
        a = server.metric('epic_worker_sequences{rank="0"}') or 0
        b = server.metric('epic_worker_sequences{rank="1"}') or 0
        if a > 0 and b > 0:
            seen_on_both[0] = True
            return
        time.sleep(0.02)


watcher = threading.Thread(target=watch_ranks)
watcher.start()
with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    jobs = []
    for p, expected in zip(prompts, greedy):
        jobs.append((pool.submit(complete, p, temperature=0), expected, f"greedy {p!r}"))
        jobs.append((pool.submit(lambda p=p: server.stream("/v1/completions", {
            "model": NAME, "prompt": p, "max_tokens": LONG, "temperature": 0, "stream": True})[0]),
            expected, f"streamed greedy {p!r}"))
    jobs.append((pool.submit(complete, prompts[0], temperature=0.8, top_p=0.9, seed=7), sampled, "sampled seed 7"))
    for future, expected, what in jobs:
        text = future.result()
        check(text == expected, f"{what} over 2 worker ranks, among concurrent requests: epic run's text")
watcher.join()
check(seen_on_both[0], "the sequences were spread over both ranks (epic_worker_sequences per rank)")

# kill -9 of a rank mid-stream: two streams (greedy, sampled) go on after the restart as if nothing happened.
results = {}
killed = threading.Event()


def kill_rank_after(n, rank):
    def on_chunk(count):
        if count == n and not killed.is_set():
            killed.set()
            os.kill(worker_pids(server)[rank], signal.SIGKILL)
    return on_chunk


def streamed(key, payload, on_chunk=None):
    results[key] = server.stream("/v1/completions", {"model": NAME, "max_tokens": LONG, "stream": True, **payload},
                                 on_chunk)


threads = [threading.Thread(target=streamed, args=("greedy", {"prompt": prompts[1], "temperature": 0},
                                                   kill_rank_after(12, 1))),
           threading.Thread(target=streamed, args=("sampled", {"prompt": prompts[0], "temperature": 0.8, "top_p": 0.9,
                                                               "seed": 7}))]
for t in threads:
    t.start()
for t in threads:
    t.join(300)
check(killed.is_set(), "a worker rank was killed (SIGKILL) mid-stream")
for key, expected in (("greedy", greedy[1]), ("sampled", sampled)):
    text, reason, _, done = results.get(key, ("", None, [], False))
    check(done and text == expected, f"{key} stream across the restart: one continuous stream, epic run's text "
                                     f"({'same' if text == expected else repr(text) + ' vs ' + repr(expected)})")
check(server.metric("epic_worker_restarts_total") == 1.0, "/metrics: epic_worker_restarts_total 1")
check((server.metric("epic_sequences_resumed_total") or 0) >= 1, "/metrics: the in-flight sequences resumed")
check(all_gone(first_pids), "the failed job's ranks are gone")

# kill -9 while idle: the heartbeat notices, /health goes 503, then 200 again with a new job.
pids = worker_pids(server)
os.kill(pids[0], signal.SIGKILL)
check(server.wait_health(503, 30), "a rank killed while idle: /health says not ready within the heartbeat")
check(server.wait_health(200, 180), "... and ready again once the job is restarted")
check(server.metric("epic_worker_restarts_total") == 2.0, "/metrics: epic_worker_restarts_total 2")
check(complete(prompts[2], temperature=0) == greedy[2], "a request after the restart: epic run's text")

# A client that leaves mid-stream: its sequence is cancelled on the worker and its KV freed.
import socket  # noqa: E402
import json  # noqa: E402
sock = socket.create_connection(("127.0.0.1", server.port))
payload = json.dumps({"model": NAME, "prompt": prompts[0], "max_tokens": 200, "stream": True}).encode()
sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
             str(len(payload)).encode() + b"\r\n\r\n" + payload)
sock.recv(200)
sock.close()
freed = False
for _ in range(100):
    kv = [server.metric(f'epic_kv_cache_tokens{{rank="{r}"}}') for r in (0, 1)]
    if server.metric('epic_requests_total{status="cancelled"}') == 1.0 and kv == [0.0, 0.0]:
        freed = True
        break
    time.sleep(0.1)
check(freed, "a client leaving mid-stream: cancelled, and no KV positions held on either rank")

# /metrics of the worker job: restarts, KV use and capacity per rank, and (the host exchange counts rows) the
# per-expert and per-worker load of the last window; promtool accepts the whole page where installed.
_, _, metrics = server.request("GET", "/metrics")
for family in ("epic_worker_restarts_total", "epic_kv_cache_capacity_tokens", "epic_generation_tokens_per_second",
               "epic_expert_rows_window", "epic_worker_expert_rows_window", "epic_output_seconds_total"):
    check(f"# TYPE {family} " in metrics, f"/metrics has {family}")
check((server.metric('epic_kv_cache_capacity_tokens{rank="1"}') or 0) >= 512, "KV capacity per rank as configured")
expert_rows = sum(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("epic_expert_rows_window{"))
check(expert_rows > 0, f"per-expert rows of the last window add up to a load ({expert_rows:.0f} rows)")
if shutil.which("promtool"):
    out = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    check(out.returncode == 0, "promtool check metrics (worker job): " + (out.stdout + out.stderr).strip())

last_pids = worker_pids(server)
code = server.stop()
check(code == 0, f"SIGTERM: exit 0 (got {code})")
check(all_gone(last_pids), "SIGTERM: the worker job's ranks exited")

# --max-worker-restarts 0: a dead job ends the server, and the running request is told.
server = Server(epic, [*serve_flags, "--workers", "1", "--max-worker-restarts", "0"], name="serve-0")
check(server.wait_health(200, 180), "--workers 1 --max-worker-restarts 0: ready")
killed.clear()
text, reason, _, done = server.stream("/v1/completions", {"model": NAME, "prompt": prompts[0], "max_tokens": 200,
                                                          "stream": True}, kill_rank_after(5, 0))
check(reason is not None and reason.startswith("error:") and "giving up" in reason,
      f"the running request gets an error naming the cause ({reason})")
try:
    code = server.process.wait(timeout=60)
except subprocess.TimeoutExpired:
    code = None
check(code == 1 and any("--max-worker-restarts" in line for line in server.lines),
      f"the server exits 1 with a message (got {code})")

# --attach: the worker job is started apart and connects; SIGTERM stops it too.
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
worker_port = probe.getsockname()[1]
probe.close()
server = Server(epic, [*serve_flags, "--attach", "--worker-port", str(worker_port)], name="serve-attach")
time.sleep(1)
check(server.health() == 503, "--attach: /health is 503 until a worker job connects")
mpirun = ["mpirun", "-np", "2", "--bind-to", "none"]
job = subprocess.Popen([*mpirun, epic, "worker", "--coordinator", f"127.0.0.1:{worker_port}", *common,
                        "--max-context", "256", "--max-active-sequences", "4"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
check(server.wait_health(200, 180), "--attach: ready once the job started apart connected")
check(complete(prompts[1], temperature=0) == greedy[1], "--attach: epic run's text")
code = server.stop()
try:
    job_code = job.wait(timeout=30)
except subprocess.TimeoutExpired:
    job.kill()
    job_code = None
check(code == 0 and job_code == 0, f"--attach: SIGTERM stops the server (exit {code}) and the job (exit {job_code})")

# Bad flags and a job that cannot start: clear errors, never a hang.
def refused(args, expect_code, expect_text, what):
    out = subprocess.run([epic, "serve", *common, "--port", "0", *args], capture_output=True, text=True, timeout=120)
    check(out.returncode == expect_code and expect_text in out.stderr,
          f"{what}: exit {expect_code} naming the problem (got {out.returncode}: {out.stderr.strip()[-300:]!r})")


refused(["--attach"], 2, "--worker-port", "--attach without --worker-port")
refused(["--", "--slots", "4"], 2, "--workers", "worker flags without --workers")
refused(["--workers", "2", "--worker-start-timeout", "60", "--", "--no-such-flag"], 1,
        "the worker job ended before all its ranks connected", "a worker job that cannot start")
refused(["--workers", "-1"], 2, "--workers", "--workers -1")

shutil.rmtree(work, ignore_errors=True)
report("serve workers check")
