"""Flat figures from epic's own output files: bench-moe --json (epic-bench-moe-v1), bench-decode --json
(a list of lines), run --report-out (epic-run-report-v1). One dict per measurement row; times in ms.
A file that is not what its command writes raises ValueError naming the file and what is wrong.
"""

import json

PHASES = ("route", "dispatch", "expert", "combine")


def _max_mean(values):
    values = [float(v) for v in values]
    return max(values), sum(values) / len(values)


def _balance(values):
    """max / mean of per-rank counts (1.0 = perfect balance; 1.0 when all are zero)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def bench_moe_rows(data, source):
    if not isinstance(data, dict) or data.get("format") != "epic-bench-moe-v1":
        raise ValueError(f"{source}: not a bench-moe --json file (format epic-bench-moe-v1)")
    workers = data.get("per_worker")
    if not isinstance(workers, list) or not workers:
        raise ValueError(f"{source}: per_worker is missing or empty")
    row = {"ranks": data["workers"], "tokens_per_rank": data["tokens_per_worker"], "layers": data["layers"],
           "iterations": data["iterations"], "threads_per_rank": data.get("threads_per_rank"),
           "backend": data.get("backend"), "ep_transport": data.get("ep_transport"),
           "ep_mode": data.get("ep_mode"), "ep_overlap": data.get("ep_overlap"), "preset": data.get("preset")}
    for phase in PHASES + ("total",):
        row[f"{phase}_ms_max"], row[f"{phase}_ms_mean"] = _max_mean(w[f"{phase}_ms"] for w in workers)
    row["layer_ms"] = row["total_ms_max"]  # the slowest rank's time per layer call
    row["tokens_per_s"] = data["tokens_per_second"]
    row["load_balance"] = _balance(w["rows_computed"] for w in workers)
    row["bytes_sent_per_rank_max"], row["bytes_sent_per_rank_mean"] = _max_mean(w["bytes_sent"] for w in workers)
    row["bytes_received_per_rank_max"], _ = _max_mean(w["bytes_received"] for w in workers)
    row["rows_computed_max"], row["rows_computed_mean"] = _max_mean(w["rows_computed"] for w in workers)
    row["experts_hosted_max"], _ = _max_mean(w["experts_hosted"] for w in workers)
    exchange_ms = row["dispatch_ms_max"] + row["combine_ms_max"]
    row["exchange_gbps_per_rank"] = (row["bytes_sent_per_rank_max"] / (exchange_ms * 1e-3) / 1e9
                                     if exchange_ms > 0 else None)
    wrong = [w.get("wrong") for w in workers]
    row["wrong"] = None if any(v is None for v in wrong) else int(sum(wrong))
    nccl = data.get("nccl")
    if isinstance(nccl, dict):
        worst = nccl.get("max_over_ranks", {})
        for key in ("count_exchange_ms", "rows_all_to_all_ms", "dispatch_bytes_off_rank", "combine_bytes_off_rank",
                    "dispatch_algbw_gbps", "combine_algbw_gbps", "baseline_dispatch_ms", "baseline_combine_ms",
                    "link_gbps", "link_floor_us"):
            if key in worst:
                row[f"nccl_{key}"] = worst[key]
        if "dispatch_bytes_off_rank" in worst:  # the device figures are the ones that count with NCCL
            row["bytes_sent_per_rank_max"] = worst["dispatch_bytes_off_rank"] + worst.get("combine_bytes_off_rank", 0)
        for key in ("exchange_link_share", "dispatch_over_baseline", "combine_over_baseline"):
            if key in nccl:
                row[f"nccl_{key}"] = nccl[key]
    return [row]


def bench_decode_rows(data, source):
    if not isinstance(data, list) or not all(isinstance(line, dict) and "name" in line for line in data):
        raise ValueError(f"{source}: not a bench-decode --json file (a list of objects with a name)")
    load = next((line for line in data if line["name"] == "load"), {})
    rows = []
    for line in data:
        if line["name"] == "decode":
            rows.append({"kind": "decode", "batch": line["batch"], "ms_per_step": line["ms_per_step"],
                         "tokens_per_s": line["tokens_per_s"], "layers": line.get("layers"),
                         "prompt_tokens": line.get("prompt_tokens"), "new_tokens": line.get("new_tokens"),
                         "graphs": line.get("graphs"), "load_s": load.get("seconds"),
                         "resident_bytes": load.get("resident_bytes")})
        elif line["name"] == "prefill":
            rows.append({"kind": "prefill", "prefill_tokens": line["tokens"], "prefill_ms": line["ms"],
                         "tflops": line.get("tflops"), "layers": line.get("layers")})
    if not rows:
        raise ValueError(f"{source}: no decode or prefill line")
    return rows


def run_report_rows(data, source):
    if not isinstance(data, dict) or data.get("format") != "epic-run-report-v1":
        raise ValueError(f"{source}: not an epic run --report-out file (format epic-run-report-v1)")
    workers = data.get("workers")
    if not isinstance(workers, list) or not workers:
        raise ValueError(f"{source}: workers is missing or empty")
    row = {"ranks": len(workers), "run_s": data.get("run_seconds"), "sequences": data.get("sequences")}
    for phase in PHASES:
        row[f"{phase}_ms_max"], row[f"{phase}_ms_mean"] = _max_mean(w[f"{phase}_seconds"] * 1e3 for w in workers)
    row["tokens_processed"] = sum(w.get("tokens_processed", 0) for w in workers)
    row["tokens_per_s"] = row["tokens_processed"] / data["run_seconds"] if data.get("run_seconds") else None
    row["load_balance"] = _balance(w["rows_computed"] for w in workers)
    row["bytes_sent_per_rank_max"], row["bytes_sent_per_rank_mean"] = _max_mean(w["bytes_sent"] for w in workers)
    row["hosts"] = ",".join(sorted({str(w.get("host")) for w in workers}))
    return [row]


def rows_from_file(command, path):
    """The measurement rows of one point's output file."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    parse = {"bench-moe": bench_moe_rows, "bench-decode": bench_decode_rows, "run": run_report_rows}[command]
    return parse(data, path)


def output_flag(command):
    """The flag that makes the command write its figures to a file."""
    return "--report-out" if command == "run" else "--json"
