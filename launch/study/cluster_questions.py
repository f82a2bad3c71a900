#!/usr/bin/env python3
"""Issue 9's questions, answered with the simulator on an H200 cluster we do not have (8 GPUs a node,
NVLink inside with the measured H200 figures, 400 Gb/s per GPU between nodes): the best EP degree and
replica count for Qwen3-30B-A3B and a Qwen3-235B-A22B-shaped model at 8 to 1024 GPUs, where hierarchical
dispatch starts to win, and the decode tokens/s of a 64-GPU cluster. Writes a markdown report and PNGs.

    python3 launch/study/cluster_questions.py --out launch/study/results
"""

import argparse
import copy
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import calibrate  # noqa: E402
import gnuplot_png  # noqa: E402
import placement_model  # noqa: E402
import simulate  # noqa: E402
import traffic  # noqa: E402

MODELS = {"Qwen3-30B-A3B": os.path.join(simulate.REPO_ROOT, "configs", "presets", "qwen3-30b-a3b.json"),
          "Qwen3-235B-A22B": os.path.join(HERE, "shapes", "qwen3-235b-a22b.json")}
CLUSTER_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)
EP_DEGREES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REPLICA_SLOTS = (0, 1, 2, 4, 8)
SKEW_ZIPF = 0.25  # hottest expert of a layer at ~2.5x the mean load (an assumption: no real Qwen3 profile here)
KV_CONTEXT_FOR_MEMORY = 2048
MEMORY_HEADROOM = 0.9  # of the card for weights + KV (activations, workspace, NCCL buffers take the rest)


class Model:
    def __init__(self, name, path):
        self.name = name
        self.shape = simulate.shape_from_preset(path)


def routing(shape, skewed):
    if not skewed:
        return None
    return placement_model.zipf_profile(shape.experts, SKEW_ZIPF, num_layers=1, seed=1)[0]


_traffic_cache = {}


def token_traffic(shape, ep, load, slots):
    key = (shape.experts, shape.top_k, ep, load is not None, slots)
    if key not in _traffic_cache:
        _traffic_cache[key] = traffic.layer_traffic(shape.experts, shape.top_k, ep, 8, load, slots)
    return _traffic_cache[key]


def fits(model, device, ep, slots, batch):
    memory = simulate.memory_per_rank(model.shape, slots, batch, KV_CONTEXT_FOR_MEMORY)
    return memory["total"] <= MEMORY_HEADROOM * device.memory_bytes, memory


def decode_choice(model, device, report, ep, batch, skewed, mode):
    """Best replica slots for one EP degree: (per-GPU tokens/s, spare slots, result) or None if it cannot fit."""
    load = routing(model.shape, skewed)
    base_slots = math.ceil(model.shape.experts / ep)
    best = None
    for spare in REPLICA_SLOTS:
        slots = min(base_slots + spare, model.shape.experts)
        if spare and slots == base_slots:
            continue
        if ep == 1 and spare:
            continue
        ok, _ = fits(model, device, ep, slots, batch)
        if not ok:
            continue
        cluster = calibrate.cluster_for(report, ep, 8)
        tt = token_traffic(model.shape, ep, load, slots if (load is not None or spare) else None)
        result = simulate.decode_step(model.shape, device, cluster, batch, load, slots, mode=mode, token_traffic=tt)
        per_gpu = batch / (result["ms_per_step"] * 1e-3)
        if best is None or per_gpu > best[0] * 1.005:  # a replica must buy more than 0.5% to be chosen
            best = (per_gpu, spare, result)
    return best


def best_ep_rows(model, device, report, batch, skewed, mode):
    by_ep = {ep: decode_choice(model, device, report, ep, batch, skewed, mode) for ep in EP_DEGREES}
    rows = []
    for gpus in CLUSTER_SIZES:
        candidates = [(ep, c) for ep, c in by_ep.items() if ep <= gpus and gpus % ep == 0 and c]
        if not candidates:
            rows.append({"gpus": gpus, "ep": None})
            continue
        ep, (per_gpu, spare, result) = max(candidates, key=lambda item: item[1][0])
        whole = by_ep.get(gpus)
        rows.append({"gpus": gpus, "ep": ep, "spare": spare, "per_gpu": per_gpu, "cluster": per_gpu * gpus,
                     "ms_per_step": result["ms_per_step"], "imbalance": result["layer"]["imbalance"],
                     "whole_cluster_per_gpu": whole[0] if whole else None})
    return rows, by_ep


def hierarchical_table(model, device, report, ep_list, token_list, mode):
    rows = []
    for ep in ep_list:
        cluster = calibrate.cluster_for(report, ep, 8)
        tt = token_traffic(model.shape, ep, None, None)
        crossover = None
        cells = []
        for tokens in token_list:
            flat = simulate.moe_layer(model.shape, device, cluster, tokens, mode=mode, dispatch="flat", token_traffic=tt)
            hier = simulate.moe_layer(model.shape, device, cluster, tokens, mode=mode, dispatch="hierarchical",
                                      token_traffic=tt)
            cells.append((tokens, flat, hier))
            if crossover is None and hier["layer_ms"] < flat["layer_ms"]:
                crossover = tokens
        rows.append({"ep": ep, "nodes": cluster.nodes, "cells": cells, "crossover": crossover, "tt": tt})
    return rows


def _fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_best(model_rows, batch, skewed, mode):
    label = f"skewed routing (Zipf {SKEW_ZIPF}: hottest expert ~2.5x the mean)" if skewed else "uniform routing"
    out = [f"Decode, batch {batch} per GPU, {label}, exchange `{mode}`:", "",
           "| GPUs | " + " | ".join(f"{m}: best EP, spare slots, tok/s per GPU, cluster tok/s, one EP group over all"
                                    for m in model_rows) + " |",
           "|---|" + "---|" * len(model_rows)]
    for i, gpus in enumerate(CLUSTER_SIZES):
        cells = []
        for name, rows in model_rows.items():
            r = rows[i]
            if r["ep"] is None:
                cells.append("does not fit")
                continue
            cells.append(f"EP{r['ep']}, +{r['spare']}, {_fmt(r['per_gpu'])}, {_fmt(r['cluster'])}, "
                         f"{_fmt(r['whole_cluster_per_gpu'])}")
        out.append(f"| {gpus} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_per_ep(series, png, title):
    blocks, lines = [], []
    for i, (label, points) in enumerate(series.items()):
        points = [(ep, v) for ep, v in points if v]
        if not points:
            continue
        blocks.append(gnuplot_png.data_block(f"s{i}", points))
        lines.append(f"$s{i} using 1:2 with linespoints lw 2 pt 7 title {gnuplot_png.quote(label)}")
    body = blocks + ["set logscale x 2", "set logscale y", "set grid", "set key below",
                     "set xlabel 'EP degree (GPUs in one expert-parallel group; 8 a node)'",
                     "set ylabel 'decode tokens/s per GPU'", f"set title {gnuplot_png.quote(title)}",
                     "set arrow from 8, graph 0 to 8, graph 1 nohead dt 3 lc rgb 'gray'",
                     "plot " + ", \\\n  ".join(lines)]
    gnuplot_png.render("\n".join(body), png, width=1100, height=560)


def plot_hierarchical(tables, png):
    blocks, lines = [], []
    i = 0
    for label, rows in tables.items():
        for row in rows:
            points = [(tokens, flat["layer_ms"] / hier["layer_ms"]) for tokens, flat, hier in row["cells"]]
            blocks.append(gnuplot_png.data_block(f"h{i}", points))
            title = f"{label} EP{row['ep']} ({row['nodes']} nodes)"
            lines.append(f"$h{i} using 1:2 with linespoints lw 2 title {gnuplot_png.quote(title)}")
            i += 1
    body = blocks + ["set logscale x 2", "set grid", "set key below",
                     "set xlabel 'tokens per GPU'", "set ylabel 'flat / hierarchical layer time (> 1: hierarchical wins)'",
                     "set title 'Hierarchical against flat dispatch, one MoE layer (device-issued exchange, rows sent)'",
                     "plot 1 with lines dt 2 lc rgb 'gray' notitle, " + ", \\\n  ".join(lines)]
    gnuplot_png.render("\n".join(body), png, width=1100, height=560)


def plot_link_bytes(model, device, report, png):
    """Bytes per GPU per MoE layer over NVLink and over the inter-node link, flat and hierarchical, at 4096
    tokens per GPU."""
    rows = []
    for ep in (8, 16, 32, 64, 128, 256):
        cluster = calibrate.cluster_for(report, ep, 8)
        tt = token_traffic(model.shape, ep, None, None)
        flat = simulate.moe_layer(model.shape, device, cluster, 4096, mode="device", dispatch="flat", token_traffic=tt)
        hier = simulate.moe_layer(model.shape, device, cluster, 4096, mode="device", dispatch="hierarchical",
                                  token_traffic=tt)
        rows.append((ep, flat["intra_bytes"] / 1e6, flat["inter_bytes"] / 1e6, hier["intra_bytes"] / 1e6,
                     hier["inter_bytes"] / 1e6))
    body = [gnuplot_png.data_block("b", rows), "set logscale x 2", "set grid", "set key top left",
            "set xlabel 'EP degree (8 GPUs a node)'", "set ylabel 'MB per GPU per MoE layer (dispatch + combine)'",
            f"set title {gnuplot_png.quote(model.name + ': bytes per link at 4096 tokens per GPU')}",
            "plot $b using 1:2 with linespoints lw 2 title 'flat: NVLink', "
            "$b using 1:3 with linespoints lw 2 title 'flat: inter-node (400 Gb/s)', "
            "$b using 1:4 with linespoints lw 2 dt 2 title 'hierarchical: NVLink', "
            "$b using 1:5 with linespoints lw 2 dt 2 title 'hierarchical: inter-node'"]
    gnuplot_png.render("\n".join(body), png, width=1000, height=540)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default=os.path.join(HERE, "calibration", "h200.json"))
    parser.add_argument("--out", required=True, help="folder for cluster_answers.md and plots/")
    args = parser.parse_args(argv)
    device, report = calibrate.load_device(args.calibration)
    models = {name: Model(name, path) for name, path in MODELS.items()}
    plots = os.path.join(args.out, "plots")
    os.makedirs(plots, exist_ok=True)
    a = report["cluster_assumptions"]
    md = ["# Cluster answers (generated by launch/study/cluster_questions.py; do not edit by hand)", "",
          f"Calibration: `{os.path.relpath(args.calibration, simulate.REPO_ROOT)}`. Cluster: 8 GPUs a node, NVLink "
          f"inside at the measured H200 figures (x the fitted efficiency), {a['inter_node_gbs']} GB/s per GPU between "
          f"nodes x {a['inter_node_efficiency']} (assumed), +{a['inter_node_extra_latency_us']} us latency for an exchange "
          f"leaving the node (assumed). Memory: weights + KV of the batch at {KV_CONTEXT_FOR_MEMORY} tokens within "
          f"{MEMORY_HEADROOM:.0%} of {device.memory_bytes / 2**30:.1f} GiB. Decode timing at the measured context "
          f"({device.decode_context_tokens:g} tokens) unless said.", ""]

    # 1. Best EP degree and replicas, decode.
    per_ep_series = {}
    for mode in ("graph-rows", "graph"):
        for batch in (256, 64):
            for skewed in (False, True):
                model_rows = {}
                for name, model in models.items():
                    rows, by_ep = best_ep_rows(model, device, report, batch, skewed, mode)
                    model_rows[name] = rows
                    if mode == "graph-rows" and not skewed:
                        per_ep_series[f"{name}, batch {batch}"] = [(ep, c[0] if c else None) for ep, c in by_ep.items()]
                    if mode == "graph-rows" and skewed and batch == 256:
                        per_ep_series[f"{name}, batch {batch}, skewed (best replicas)"] = \
                            [(ep, c[0] if c else None) for ep, c in by_ep.items()]
                md.append(markdown_best(model_rows, batch, skewed, mode))
                md.append("")
    plot_per_ep(per_ep_series, os.path.join(plots, "cluster_decode_per_gpu_vs_ep.png"),
                "Predicted decode tokens/s per GPU against EP degree (H200 nodes of 8, 400 Gb/s between; rows exchange)")

    # 2. Hierarchical against flat dispatch.
    token_list = (1, 4, 16, 32, 64, 128, 256, 1024, 4096, 16384)
    tables = {}
    for name, model in models.items():
        tables[name] = hierarchical_table(model, device, report, (16, 32, 64, 256, 1024), token_list, "device")
    md.append("Hierarchical against flat dispatch (one MoE layer, `device` mode: the normal mode's rows and count "
              "exchange issued from the device; layer ms flat / hierarchical):")
    md.append("")
    md.append("| model | EP (nodes) | " + " | ".join(f"{t} tok" for t in token_list) +
              " | hierarchical wins from | inter-node copies per token: flat (ranks) / hierarchical (nodes) |")
    md.append("|---|---|" + "---|" * len(token_list) + "---|---|")
    for name, rows in tables.items():
        for row in rows:
            cells = " | ".join(f"{f['layer_ms']:.3g} / {h['layer_ms']:.3g}" for _, f, h in row["cells"])
            md.append(f"| {name} | {row['ep']} ({row['nodes']}) | {cells} | "
                      f"{_fmt(row['crossover'])} tokens | {row['tt'].ranks_other_nodes:.2f} / {row['tt'].nodes_other:.2f} |")
    md.append("")
    # Sensitivity: the per-peer latency (fitted on 1 and 3 peers) extrapolated to hundreds of peers decides
    # the small sizes above; without it, only the bytes and the extra stage's base latency remain.
    flat_latency = copy.deepcopy(device)
    flat_latency.latency["graph"] = simulate.Latency(device.latency["graph"].base_us, 0.0)
    md.append("The same with no per-peer latency (each exchange costs its base latency whatever its peer count), "
              "first token count where hierarchical wins:")
    md.append("")
    md.append("| model | " + " | ".join(f"EP{ep}" for ep in (16, 32, 64, 256, 1024)) + " |")
    md.append("|---|" + "---|" * 5)
    for name, model in models.items():
        rows = hierarchical_table(model, flat_latency, report, (16, 32, 64, 256, 1024), token_list, "device")
        md.append(f"| {name} | " + " | ".join(f"{_fmt(r['crossover'])}" for r in rows) + " |")
    md.append("")
    plot_hierarchical(tables, os.path.join(plots, "cluster_hierarchical_vs_flat.png"))
    bytes_rows = plot_link_bytes(models["Qwen3-30B-A3B"], device, report,
                                 os.path.join(plots, "cluster_bytes_per_link.png"))
    md.append("Bytes per GPU per MoE layer at 4096 tokens per GPU, Qwen3-30B-A3B (MB; NVLink / inter-node): " +
              "; ".join(f"EP{ep}: flat {fi:.0f} / {fx:.0f}, hierarchical {hi:.0f} / {hx:.0f}"
                        for ep, fi, fx, hi, hx in bytes_rows))
    md.append("")

    # 2b. Prefill-size layers: tokens/s per GPU of one MoE layer at 4096 tokens per GPU, by EP degree.
    md.append("One MoE layer at 4096 tokens per GPU (prefill sizes; `device` mode, uniform routing): tokens/s per "
              "GPU, flat / hierarchical (memory not checked: one layer):")
    md.append("")
    md.append("| EP | " + " | ".join(models) + " |")
    md.append("|---|" + "---|" * len(models))
    for ep in EP_DEGREES:
        cells = []
        for name, model in models.items():
            cluster = calibrate.cluster_for(report, ep, 8)
            tt = token_traffic(model.shape, ep, None, None)
            results = [simulate.moe_layer(model.shape, device, cluster, 4096, mode="device", dispatch=d,
                                          token_traffic=tt) for d in ("flat", "hierarchical")]
            cells.append(" / ".join(f"{4096 / (r['layer_ms'] * 1e-3):,.0f}" for r in results))
        md.append(f"| {ep} | " + " | ".join(cells) + " |")
    md.append("")

    # 2c. Replicas where one EP group spans many nodes and routing is skewed.
    md.append(f"Replicas under skewed routing (Zipf {SKEW_ZIPF}), decode batch 256 per GPU, `graph-rows`: busiest "
              "rank's rows / mean and tokens/s per GPU, by spare slots per GPU:")
    md.append("")
    md.append("| model | EP | " + " | ".join(f"+{r} slots" for r in REPLICA_SLOTS) + " |")
    md.append("|---|---|" + "---|" * len(REPLICA_SLOTS))
    for name, model in models.items():
        load = routing(model.shape, True)
        for ep in (8, 32, 64, 128, 256):
            cells = []
            for spare in REPLICA_SLOTS:
                slots = min(math.ceil(model.shape.experts / ep) + spare, model.shape.experts)
                cluster = calibrate.cluster_for(report, ep, 8)
                tt = token_traffic(model.shape, ep, load, slots)
                result = simulate.decode_step(model.shape, device, cluster, 256, load, slots, mode="graph-rows",
                                              token_traffic=tt)
                ok, _ = fits(model, device, ep, slots, 256)
                cells.append(f"{result['layer']['imbalance']:.2f}, {256 / (result['ms_per_step'] * 1e-3):,.0f}"
                             + ("" if ok else " (no fit)"))
            md.append(f"| {name} | {ep} | " + " | ".join(cells) + " |")
    md.append("")

    # 3. A 64-GPU cluster's decode tokens/s.
    md.append("A 64-GPU cluster (8 nodes), decode: the best layout (64 / EP groups of EP GPUs, `graph-rows`), then "
              "one EP64 group with the rows exchange, with today's fixed blocks (`graph`), and hierarchical:")
    md.append("")
    md.append("| model | batch / GPU | context | EP layout | exchange | ms / step | tokens/s per GPU | cluster tokens/s |")
    md.append("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        for batch in (64, 256):
            for context in (None, 2048):
                best_ep, best_rate = None, 0.0
                for ep in (1, 2, 4, 8, 16, 32, 64):
                    if not fits(model, device, ep, math.ceil(model.shape.experts / ep), batch)[0]:
                        continue
                    step = simulate.decode_step(model.shape, device, calibrate.cluster_for(report, ep, 8), batch,
                                                mode="graph-rows", context_tokens=context)
                    if batch / step["ms_per_step"] > best_rate:
                        best_ep, best_rate = ep, batch / step["ms_per_step"]
                layouts = [(best_ep, "graph-rows")] if best_ep and best_ep != 64 else []
                for ep, mode in layouts + [(64, "graph-rows"), (64, "graph"), (64, "graph-rows-h")]:
                    base_slots = math.ceil(model.shape.experts / ep)
                    ok, memory = fits(model, device, ep, base_slots, batch)
                    if not ok:
                        md.append(f"| {name} | {batch} | {context or device.decode_context_tokens:g} | EP{ep} | {mode} | "
                                  f"does not fit ({memory['total'] / 2**30:.0f} GiB) | | |")
                        continue
                    cluster = calibrate.cluster_for(report, ep, 8)
                    dispatch = "hierarchical" if mode.endswith("-h") else "flat"
                    result = simulate.decode_step(model.shape, device, cluster, batch, mode=mode.replace("-h", ""),
                                                  dispatch=dispatch, context_tokens=context)
                    per_gpu = batch / (result["ms_per_step"] * 1e-3)
                    layout = f"{64 // ep} x EP{ep}" if ep < 64 else "EP64"
                    md.append(f"| {name} | {batch} | {context or device.decode_context_tokens:g} | {layout} | "
                              f"{mode.replace('-h', '')}{' hierarchical' if dispatch == 'hierarchical' else ''} | "
                              f"{result['ms_per_step']:.2f} | {per_gpu:,.0f} | {per_gpu * 64:,.0f} |")
    md.append("")
    path = os.path.join(args.out, "cluster_answers.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print(f"cluster_questions: wrote {path} and {plots}/cluster_*.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
