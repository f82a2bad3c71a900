#!/usr/bin/env python3
"""Predicted against measured for every measurement point of one or more calibration files: a markdown
table (each point's role: curve = the model's input curve passes through it, fit = its total was fitted,
phases = some of its phase times were fitted, held-out = not used), the error summary, and a gnuplot PNG
(predicted vs measured, log-log, with the +-15% band).

    python3 launch/study/validate.py launch/study/calibration/h200.json launch/study/calibration/cpu-this-host.json \
        --markdown launch/study/results/validation.md --png launch/study/results/plots/validation.png
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import calibrate  # noqa: E402
import gnuplot_png  # noqa: E402

BAND = 0.15  # the bar: predictions within +-15% of the measured time per layer


def describe(config):
    c = config
    parts = [f"EP{c['ranks']}"]
    if c.get("ranks_per_node", c["ranks"]) != c["ranks"]:
        parts.append(f"{c['ranks'] // c['ranks_per_node']} {'emulated ' if c.get('one_host') else ''}nodes")
    if "inter_node_link_gbs" in c:
        parts.append(f"link {c['inter_node_link_gbs'] * 8000:.0f} Mbit/s")
    if c["kind"] == "moe_layer":
        parts.append(f"{c['tokens_per_rank']} tok/rank")
        if c.get("mode", "normal") != "normal":
            parts.append(c["mode"])
        if c.get("overlap"):
            parts.append("overlap")
        if c.get("slots"):
            parts.append(f"{c['slots']} slots")
        if c.get("dispatch", "flat") != "flat":
            parts.append(c["dispatch"])
    else:
        parts.append(f"decode batch {c['batch_per_rank']}/rank")
    return ", ".join(parts)


def rows_for(calibration_path):
    device, report = calibrate.load_device(calibration_path)
    rows = []
    for point in report["points"]:
        _, key, predicted = calibrate.predict(point, device, report)
        measured = point["measured"][key]
        rows.append({"device": report["name"], "id": point["id"], "what": describe(point["config"]),
                     "kind": point["config"]["kind"], "measured_ms": measured, "predicted_ms": predicted,
                     "error": predicted / measured - 1, "role": report["roles"][point["id"]],
                     "source": point.get("source", "")})
    return rows


def summary(rows):
    lines = []
    for device in dict.fromkeys(r["device"] for r in rows):
        for role_set, label in ((("held-out",), "held out"), (("phases",), "phases fitted"),
                                (("fit", "curve"), "in sample")):
            chosen = [r for r in rows if r["role"] in role_set and r["device"] == device]
            if not chosen:
                continue
            within = sum(abs(r["error"]) <= BAND for r in chosen)
            worst = max(chosen, key=lambda r: abs(r["error"]))
            mean_abs = sum(abs(r["error"]) for r in chosen) / len(chosen)
            lines.append(f"{device}, {label}: {within} of {len(chosen)} within +-{BAND:.0%}, mean |error| "
                         f"{mean_abs:.1%}, worst {worst['error']:+.1%} ({worst['what']})")
    return lines


def markdown(rows):
    out = ["| device | configuration | measured ms | predicted ms | error | role |", "|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if abs(r["error"]) <= BAND else " **"
        out.append(f"| {r['device']} | {r['what']} | {r['measured_ms']:.4g} | {r['predicted_ms']:.4g} | "
                   f"{flag.strip()}{r['error']:+.1%}{flag.strip()} | {r['role']} |")
    return "\n".join(out)


def plot(rows, png):
    groups = {}
    for r in rows:
        groups.setdefault((r["device"], r["role"]), []).append((r["measured_ms"], r["predicted_ms"]))
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows) / 1.5
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows) * 1.5
    blocks, plots = [], [f"x title 'predicted = measured' lc rgb 'black'",
                         f"{1 + BAND}*x title '+-15%' dt 2 lc rgb 'gray'", f"{1 - BAND}*x notitle dt 2 lc rgb 'gray'"]
    point_types = {"held-out": 7, "phases": 5, "fit": 9, "curve": 13}
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    devices = sorted({d for d, _ in groups})
    for i, ((device, role), pts) in enumerate(sorted(groups.items())):
        name = f"g{i}"
        blocks.append(gnuplot_png.data_block(name, pts))
        color = colors[devices.index(device) % len(colors)]
        plots.append(f"${name} using 1:2 with points pt {point_types.get(role, 1)} ps 1.4 lc rgb '{color}' "
                     f"title {gnuplot_png.quote(device + ': ' + role)}")
    body = "\n".join(blocks + [
        "set logscale xy", f"set xrange [{lo}:{hi}]", f"set yrange [{lo}:{hi}]", "set grid",
        "set key top left", "set xlabel 'measured ms (MoE layer call, or decode step)'",
        "set ylabel 'predicted ms'", "set title 'Simulator: predicted vs measured (every measured configuration)'",
        "plot " + ", \\\n  ".join(plots)])
    gnuplot_png.render(body, png, width=800, height=700)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("calibrations", nargs="+")
    parser.add_argument("--markdown", help="write the table and summary here")
    parser.add_argument("--png", help="write the predicted-vs-measured plot here")
    args = parser.parse_args(argv)
    rows = []
    for path in args.calibrations:
        rows += rows_for(path)
    text = markdown(rows) + "\n\n" + "\n".join(f"- {line}" for line in summary(rows)) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
