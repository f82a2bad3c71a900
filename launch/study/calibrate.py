#!/usr/bin/env python3
"""Calibration of the simulator: a calibration file (epic-sim-calibration-v1) names a device's measured
rates (each with the line it came from) and the measurement files it is fitted to and validated
against; load_device() fits the free constants from the points the file names and returns the Device
and a report (every fitted value, the points it came from, each point's role: curve / fit / phases /
held-out). Measurement files are epic-sim-measurements-v1 (hand-entered figures with their source
lines) or run_study.py results (epic-study-results-v1): a study run on new hardware (emulated nodes,
shaped links, hierarchical dispatch) is added by listing its results.json under "measurements".

    python3 launch/study/calibrate.py launch/study/calibration/h200.json     # prints the fitted values
"""

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import simulate  # noqa: E402
import traffic  # noqa: E402

CALIBRATION_FORMAT = "epic-sim-calibration-v1"
MEASUREMENTS_FORMAT = "epic-sim-measurements-v1"


class CalibrationError(ValueError):
    pass


def _resolve(base_file, path):
    """A path in a calibration or measurement file: relative to that file's folder, else the checkout."""
    if os.path.isabs(path):
        return path
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base_file)), path))
    return beside if os.path.exists(beside) else os.path.join(simulate.REPO_ROOT, path)


def least_squares(rows, ys):
    """The x minimising |rows x - ys|^2 (normal equations, Gaussian elimination with pivoting)."""
    n = len(rows[0])
    if len(rows) < n:
        raise CalibrationError(f"least squares: {len(rows)} equations for {n} unknowns")
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * y for r, y in zip(rows, ys))]
         for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            raise CalibrationError("least squares: the equations do not determine every unknown")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def two_point_latency(us_by_peers):
    """Latency(base, per_peer) through {peers: us}: exact for two points, least squares for more."""
    items = sorted(us_by_peers.items())
    if len(items) == 1:
        peers, us = items[0]
        return simulate.Latency(base_us=us / 2, per_peer_us=us / 2 / peers)
    base, per_peer = least_squares([[1.0, p] for p, _ in items], [u for _, u in items])
    return simulate.Latency(base_us=base, per_peer_us=per_peer)


# ---------------------------------------------------------------------------------------------------
# Measurements


def _study_points(data, path):
    """moe_layer points from a run_study.py results file (bench-moe records; repeats: the fastest)."""
    study = data.get("study", {}).get("name", os.path.basename(os.path.dirname(path)))
    best = {}
    for record in data.get("records", []):
        if record.get("status") != "ok" or record.get("layer_ms") is None:
            continue
        key = record["point"].split("-rep")[0]
        if key not in best or record["layer_ms"] < best[key]["layer_ms"]:
            best[key] = record
    points = []
    for key, r in best.items():
        mode = r.get("ep_mode") if r.get("ep_mode") not in (None, "none") else "normal"
        config = {"kind": "moe_layer", "ranks": r["ranks"], "ranks_per_node": r.get("ranks_per_node", r["ranks"]),
                  "tokens_per_rank": r["tokens_per_rank"], "mode": mode, "overlap": bool(r.get("ep_overlap")),
                  "slots": int(r["experts_hosted_max"]) if r.get("experts_hosted_max") else None,
                  "threads_per_rank": r.get("threads_per_rank"), "preset": r.get("preset")}
        if r.get("ep_dispatch"):
            config["dispatch"] = r["ep_dispatch"]
        measured = {"layer_ms": r["layer_ms"], "dispatch_ms": r.get("dispatch_ms_max"),
                    "combine_ms": r.get("combine_ms_max"), "expert_ms": r.get("expert_ms_max"),
                    "route_ms": r.get("route_ms_max"), "bytes_sent_per_rank": r.get("bytes_sent_per_rank_max")}
        points.append({"id": f"{study}:{key}", "config": config, "measured": measured,
                       "source": f"{os.path.relpath(path, simulate.REPO_ROOT)} ({r.get('date')}, {r.get('host')}, "
                                 f"load {r.get('load_average_before')})"})
    return points


def read_measurements(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read measurements ({e})") from None
    if data.get("format") == MEASUREMENTS_FORMAT:
        points = data["points"]
    elif data.get("format") == "epic-study-results-v1":
        points = _study_points(data, path)
    else:
        raise CalibrationError(f"{path}: not a measurements file ({MEASUREMENTS_FORMAT}) nor run_study results")
    for point in points:
        config = point.get("config", {})
        if config.get("kind") not in ("moe_layer", "decode_step") or "ranks" not in config:
            raise CalibrationError(f"{path}: point {point.get('id')}: config needs kind moe_layer|decode_step and ranks")
        point["file"] = path
    return points


# ---------------------------------------------------------------------------------------------------
# Devices


def _by_ranks(table, ranks, what):
    """The entry of {ranks: value} for this many ranks: exact, else the largest key below, else the smallest."""
    keys = sorted(int(k) for k in table)
    if not keys:
        raise CalibrationError(f"{what}: empty table")
    below = [k for k in keys if k <= ranks]
    return float(table[str(below[-1] if below else keys[0])])


def _base_device(cal, path, shape):
    curve_spec = cal["layer_curve"]
    device = simulate.Device(
        name=cal["name"], reference_shape=shape,
        layer_curve=simulate.Curve(curve_spec["tokens"], curve_spec["ms"], f"{path}: layer_curve"),
        latency={}, intra_gbs=math.inf)
    if "batched_curve" in cal:
        spec = cal["batched_curve"]
        device.batched_curve = simulate.Curve(spec["tokens"], spec["ms"], f"{path}: batched_curve")
        device.batched_from_rows = spec["from_rows"]
    return device


def _fit_gpu(cal, path, shape, points, report):
    by_id = {p["id"]: p for p in points}

    def get(point_id):
        if point_id not in by_id:
            raise CalibrationError(f"{path}: fit names point '{point_id}', which no measurement file has")
        return by_id[point_id]

    fits = cal["fit"]
    exchange = cal["exchange"]
    device = _base_device(cal, path, shape)
    device.granularity = exchange.get("granularity", "rank")
    device.dispatch_element_bytes = exchange["dispatch_element_bytes"]
    device.combine_element_bytes = exchange["combine_element_bytes"]
    link = exchange["link_gbs"]
    floor = {int(n) - 1: float(us) for n, us in exchange["eager_floor_us"].items()}
    device.latency["normal"] = two_point_latency(floor)
    report["fits"]["latency_normal"] = {"value": vars(device.latency["normal"]),
                                        "how": "through the 8-byte send/recv floor: " + exchange["floor_source"]}
    H, E, k = shape.hidden, shape.experts, shape.top_k

    def off_rank_tokens(point):
        c = point["config"]
        tt = traffic.uniform_traffic(E, k, c["ranks"], c["ranks_per_node"])
        return c["tokens_per_rank"] * (tt.ranks_same_node + tt.ranks_other_nodes)

    # Record overhead (ids, weights) from the bytes each rank moved: bytes / (token copies) - row bytes.
    overheads = []
    for pid in fits["record_overhead"]:
        p = get(pid)
        copies = off_rank_tokens(p)
        overheads.append(p["measured"]["exchange_bytes_off_rank"] / copies -
                         H * (device.dispatch_element_bytes + device.combine_element_bytes))
    device.record_overhead_bytes = sum(overheads) / len(overheads)
    report["fits"]["record_overhead_bytes"] = {"value": device.record_overhead_bytes, "from": fits["record_overhead"],
                                               "how": "bytes off-rank / token copies - 2H - 4H"}
    record_d = H * device.dispatch_element_bytes + device.record_overhead_bytes

    # Link efficiency: the rows all-to-all = one latency + bytes / (efficiency x link).
    efficiencies = []
    for pid in fits["link_efficiency"]:
        p = get(pid)
        n = p["config"]["ranks"]
        seconds = (p["measured"]["rows_all_to_all_ms"] - device.latency["normal"].us(n - 1) * 1e-3) * 1e-3
        efficiencies.append(off_rank_tokens(p) * record_d / seconds / (_by_ranks(link, n, "link_gbs") * 1e9))
    efficiency = sum(efficiencies) / len(efficiencies)
    device.intra_gbs = {int(n): float(g) * efficiency for n, g in link.items()}
    report["fits"]["link_efficiency"] = {"value": efficiency, "from": fits["link_efficiency"],
                                         "how": "rows all-to-all = latency + bytes / (efficiency x link GB/s); "
                                                "link: " + exchange["link_source"]}

    # Packing rate: dispatch - counts - rows all-to-all moves the dispatch bytes once more, locally.
    rates = []
    for pid in fits["pack"]:
        m = get(pid)["measured"]
        residual_s = (m["dispatch_ms"] - m["count_exchange_ms"] - m["rows_all_to_all_ms"]) * 1e-3
        rates.append(off_rank_tokens(get(pid)) * record_d / residual_s / 1e9)
    device.pack_gbs = sum(rates) / len(rates)
    report["fits"]["pack_gbs"] = {"value": device.pack_gbs, "from": fits["pack"],
                                  "how": "dispatch - counts - rows all-to-all = bytes / pack rate"}

    # The count exchange: two exchanges' latency and the host's read of the counts.
    reads = []
    for pid in fits["count_host_read"]:
        p = get(pid)
        n = p["config"]["ranks"]
        reads.append(p["measured"]["count_exchange_ms"] * 1e3 - 2 * device.latency["normal"].us(n - 1))
    device.count_host_read_us = sum(reads) / len(reads)
    report["fits"]["count_host_read_us"] = {"value": device.count_host_read_us, "from": fits["count_host_read"],
                                            "how": "count exchange = 2 latencies + host read"}

    # Expert-parallel compute: layer - modelled exchange - one-device-equivalent compute = rows x overhead.
    rows, ys = [], []
    for pid in fits["ep_compute"]:
        p = get(pid)
        c = p["config"]
        cluster = simulate.Cluster(c["ranks"], c["ranks_per_node"])
        plain = simulate.moe_layer(shape, device, cluster, c["tokens_per_rank"])
        rows.append([plain["busiest_rows"] * 1e-6])
        ys.append(p["measured"]["layer_ms"] - plain["layer_ms"])
    (device.ep_row_overhead_ns,) = least_squares(rows, ys)
    report["fits"]["ep_row_overhead_ns"] = {"value": device.ep_row_overhead_ns, "from": fits["ep_compute"],
                                            "how": "least squares: layer - model without it = received rows x ns"}

    # Two-batch overlap: the timeline of simulate._two_batch_overlap; its one free constant, how much slower a
    # half's expert phase runs beside the other half's NCCL kernels, from one point's measured expert phase
    # with and without overlap, less what the model's half-size expert phases already give.
    on_point = get(fits["overlap"]["with"])
    get(fits["overlap"]["without"])
    on = on_point["measured"]
    c = on_point["config"]
    cluster = simulate.Cluster(c["ranks"], c["ranks_per_node"])
    device.overlap_compute_slowdown = 0.0
    plain = simulate.moe_layer(shape, device, cluster, c["tokens_per_rank"], overlap=True)
    halves_over_whole = 2 * plain["overlap_half_compute_ms"] / plain["compute_ms"]
    device.overlap_compute_slowdown = on["compute_ms"] / on["compute_ms_without_overlap"] / halves_over_whole - 1
    report["fits"]["overlap"] = {"value": {"compute_slowdown": device.overlap_compute_slowdown,
                                           "model_halves_over_whole": halves_over_whole},
                                 "from": [fits["overlap"]["with"], fits["overlap"]["without"]],
                                 "how": "measured expert phase with / without overlap / (model: 2 half-size expert "
                                        "phases / the whole one) - 1"}

    # Decode: the step outside the MoE layers on one device, then the graph exchange's latency.
    decode = cal["decode"]
    batches, dense = [], []
    for pid in fits["decode_dense"]:
        p = get(pid)
        b = p["config"]["batch_per_rank"]
        batches.append(b)
        dense.append(p["measured"]["ms_per_step"] - shape.layers * device.layer_curve(b))
    device.decode_dense_curve = simulate.Curve(batches, dense, f"{path}: decode dense")
    device.decode_context_tokens = decode["context_tokens"]
    device.read_gbs = decode["read_gbs"]
    report["fits"]["decode_dense_ms"] = {"value": dict(zip(batches, dense)), "from": fits["decode_dense"],
                                         "how": "EP1 step - layers x t1(batch)"}
    per_n = {}
    for pid in fits["graph_latency"]:
        p = get(pid)
        c = p["config"]
        b = c["batch_per_rank"]
        cluster = simulate.Cluster(c["ranks"], c["ranks_per_node"])
        device.latency["graph"] = simulate.Latency(0.0, 0.0)
        plain = simulate.moe_layer(shape, device, cluster, b, mode="graph")
        per_layer = (p["measured"]["ms_per_step"] - device.decode_dense_curve(b)) / shape.layers
        exchange_bw_ms = plain["dispatch_ms"] + plain["combine_ms"]  # latency 0: bandwidth terms only
        per_n[c["ranks"] - 1] = (per_layer - plain["compute_ms"] - exchange_bw_ms) / 2 * 1e3
    device.latency["graph"] = two_point_latency(per_n)
    report["fits"]["latency_graph"] = {"value": vars(device.latency["graph"]), "from": fits["graph_latency"],
                                       "how": "(step - dense) / layers - compute - block bytes / link = 2 latencies"}
    # Low-latency mode, eager (bench-moe --ep-mode low-latency without graphs): the same kernels the decode
    # graphs replay (the graph latency) plus the host's launch of each call and its wait (the eager 8-byte
    # send/recv floor, the normal latency). Nothing is fitted to the low-latency points.
    normal, graph = device.latency["normal"], device.latency["graph"]
    device.latency["low-latency"] = simulate.Latency(normal.base_us + graph.base_us,
                                                     normal.per_peer_us + graph.per_peer_us)
    report["fits"]["latency_low_latency"] = {"value": vars(device.latency["low-latency"]),
                                             "from": fits["graph_latency"],
                                             "how": "eager = the 8-byte floor (host launch and wait, latency_normal) "
                                                    "+ the graph-replayed exchange's latency (latency_graph)"}
    device.memory_bytes = cal.get("memory_gib", 0) * 2**30
    return device


def _results_curve(path, what):
    """tokens -> fastest layer_ms over the 1-rank bench-moe records of a run_study results file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    best = {}
    for r in data.get("records", []):
        if r.get("status") == "ok" and r.get("ranks") == 1 and r.get("layer_ms"):
            t = r["tokens_per_rank"]
            best[t] = min(best.get(t, math.inf), r["layer_ms"])
    if len(best) < 2:
        raise CalibrationError(f"{path}: {what} needs 1-rank points at two or more token counts")
    tokens = sorted(best)
    return simulate.Curve(tokens, [best[t] for t in tokens], f"{path}: {what}"), data


def _fit_cpu(cal, cal_path, shape, report):
    curve_path = _resolve(cal_path, cal["layer_curve_results"])
    curve, curve_data = _results_curve(curve_path, "layer curve")
    threads = {r.get("threads_per_rank") for r in curve_data["records"] if r.get("status") == "ok"}
    if len(threads) != 1:
        raise CalibrationError(f"{curve_path}: the curve's points ran with different thread counts {threads}")
    device = simulate.Device(name=cal["name"], reference_shape=shape, layer_curve=curve, latency={},
                             intra_gbs=math.inf, dispatch_element_bytes=4, combine_element_bytes=4,
                             granularity="slot", cores=cal["cores"], threads_per_rank=threads.pop(),
                             hierarchical_pipelined=cal.get("hierarchical_pipelined", True),
                             host_exchange=cal.get("host_exchange", False))
    report["fits"]["layer_curve"] = {"value": dict(zip(curve.xs, curve.ys)),
                                     "from": [os.path.relpath(curve_path, simulate.REPO_ROOT)],
                                     "how": "fastest of the repeats of each 1-rank point"}
    probe_path = _resolve(cal_path, cal["exchange_probe_results"])
    probe_shape = simulate.shape_from_preset(_resolve(cal_path, cal["exchange_probe_shape"]))
    probe_curve, probe_data = _results_curve(probe_path, "exchange probe")
    probe_device = simulate.Device(name="probe", reference_shape=probe_shape, layer_curve=probe_curve, latency={},
                                   intra_gbs=math.inf, dispatch_element_bytes=4, combine_element_bytes=4,
                                   granularity="slot", cores=device.cores, threads_per_rank=device.threads_per_rank,
                                   host_exchange=device.host_exchange)
    # The exchange is linear in (latency, 1 / bandwidth): its design columns are the model's own exchange
    # time with one unit of each (so the fit and the model cannot disagree). One latency for every rank
    # count: with 2 and 4 ranks only, a per-peer term is not determined (the probe's small exchanges take
    # the same time on 1 and 3 peers: on a loaded 2-core host their scale is the OS scheduler's).
    rows, ys, used = [], [], []
    for point in _study_points(probe_data, probe_path):
        c = point["config"]
        if c["ranks"] < 2:
            continue
        cluster = simulate.Cluster(c["ranks"], c["ranks_per_node"])
        columns = []
        for base, inverse_gbs in ((1.0, 0.0), (0.0, 1.0)):
            probe_device.latency = {"normal": simulate.Latency(base * 1e3, 0.0)}  # ms units
            probe_device.intra_gbs = math.inf if inverse_gbs == 0 else 1.0 / inverse_gbs
            result = simulate.moe_layer(probe_shape, probe_device, cluster, c["tokens_per_rank"])
            columns.append(result["dispatch_ms"] + result["combine_ms"])
        rows.append(columns)
        ys.append(point["measured"]["layer_ms"] - result["compute_ms"])
        used.append(point["id"])
    base_ms, inverse = least_squares(rows, ys)
    if base_ms < 0:  # a latency cannot be negative: keep it at zero and fit the bandwidth alone
        base_ms = 0.0
        (inverse,) = least_squares([[r[1]] for r in rows], ys)
    device.latency["normal"] = simulate.Latency(base_ms * 1e3, 0.0)
    device.intra_gbs = {1: 1.0 / inverse if inverse > 0 else math.inf}
    report["fits"]["mpi_exchange"] = {"value": {"latency": vars(device.latency["normal"]),
                                                "gbs": device.intra_gbs[1]},
                                      "from": used,
                                      "how": "least squares over the probe's multi-rank points: layer - modelled "
                                             "compute (the probe's own 1-rank curve) = exchange(latency, bandwidth)"}
    return device


def load_calibration(path):
    try:
        with open(path, encoding="utf-8") as f:
            cal = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the calibration ({e})") from None
    if cal.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"{path}: not a calibration file (format {CALIBRATION_FORMAT})")
    return cal


def load_device(path):
    """(Device, report): the calibration's device with every constant fitted, and what each came from."""
    cal = load_calibration(path)
    shape = simulate.shape_from_preset(_resolve(path, cal["reference_shape"]))
    points = []
    for measurement_file in cal.get("measurements", []):
        points += read_measurements(_resolve(path, measurement_file))
    report = {"name": cal["name"], "kind": cal["kind"], "calibration": path, "fits": {}, "points": points,
              "shape": shape, "cluster_assumptions": cal.get("cluster_assumptions", {})}
    if cal["kind"] == "gpu":
        device = _fit_gpu(cal, path, shape, points, report)
    elif cal["kind"] == "cpu":
        device = _fit_cpu(cal, path, shape, report)
    else:
        raise CalibrationError(f"{path}: kind must be gpu or cpu, got {cal.get('kind')}")
    fitted_totals = set(cal.get("fit", {}).get("ep_compute", [])) | set(cal.get("fit", {}).get("graph_latency", []))
    phase_ids = set()
    for key in ("record_overhead", "link_efficiency", "pack", "count_host_read"):
        phase_ids |= set(cal.get("fit", {}).get(key, []))
    if "overlap" in cal.get("fit", {}):
        phase_ids.add(cal["fit"]["overlap"]["with"])
    curve_ids = set(cal.get("fit", {}).get("decode_dense", []))
    curve_file = os.path.abspath(_resolve(path, cal["layer_curve_results"])) if "layer_curve_results" in cal else None
    roles = {}
    for p in points:
        c = p["config"]
        one_rank = c["kind"] == "moe_layer" and c["ranks"] == 1
        if p["id"] in fitted_totals:
            roles[p["id"]] = "fit"
        elif p["id"] in curve_ids or (one_rank and (cal["kind"] == "gpu" or os.path.abspath(p["file"]) == curve_file)):
            roles[p["id"]] = "curve"
        elif p["id"] in phase_ids:
            roles[p["id"]] = "phases"
        else:
            roles[p["id"]] = "held-out"
    report["roles"] = roles
    return device, report


def cluster_for(report, ranks, ranks_per_node, inter_gbs=None):
    """A Cluster with the calibration's assumed inter-node link (bandwidth x efficiency, extra latency)."""
    a = report.get("cluster_assumptions", {})
    gbs = inter_gbs if inter_gbs is not None else a.get("inter_node_gbs", 0.0)
    return simulate.Cluster(ranks, min(ranks_per_node, ranks), inter_gbs=gbs * a.get("inter_node_efficiency", 1.0),
                            inter_extra_latency_us=a.get("inter_node_extra_latency_us", 0.0))


def predict(point, device, report):
    """The model's figure for a measurement point (same config), with its measured twin's name."""
    c = point["config"]
    shape = report["shape"]
    if c.get("preset"):
        candidate = os.path.join(simulate.REPO_ROOT, "configs", "presets", c["preset"] + ".json")
        if os.path.isfile(candidate):
            shape = simulate.shape_from_preset(candidate)
    if "inter_node_link_gbs" in c:  # a measured (shaped) link: per node (shared by its ranks) or per rank
        ranks_per_node = min(c.get("ranks_per_node", c["ranks"]), c["ranks"])
        per_rank = c["inter_node_link_gbs"] / (ranks_per_node if c.get("inter_node_link_per") == "node" else 1)
        cluster = simulate.Cluster(c["ranks"], ranks_per_node, inter_gbs=per_rank, one_host=c.get("one_host", False))
        if c.get("inter_node_link_tcp_mtu"):  # a tc-shaped TCP link counts frames, headers and ACKs included
            cluster.inter_payload_fraction = simulate.tcp_payload_fraction(c["inter_node_link_tcp_mtu"])
    else:
        cluster = cluster_for(report, c["ranks"], c.get("ranks_per_node", c["ranks"]))
    if c["kind"] == "moe_layer":
        result = simulate.moe_layer(shape, device, cluster, c["tokens_per_rank"], slots=c.get("slots"),
                                    mode=c.get("mode", "normal"), overlap=c.get("overlap", False),
                                    dispatch=c.get("dispatch", "flat"))
        return result, "layer_ms", result["layer_ms"]
    result = simulate.decode_step(shape, device, cluster, c["batch_per_rank"], mode=c.get("mode", "graph"))
    return result, "ms_per_step", result["ms_per_step"]


def main(argv=None):
    if not argv and len(sys.argv) > 1:
        argv = sys.argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for path in argv:
        device, report = load_device(path)
        print(json.dumps({"calibration": path, "fits": report["fits"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
