#!/usr/bin/env python3
"""PNG plots of one or more run_study.py results files (gnuplot): time per phase against ranks, tokens/s
and scaling efficiency (weak: t(1 rank) / t(N) at the same tokens per rank; strong: t(1) / (N t(N)) at the
same total tokens), load balance (max / mean expert rows over ranks), bytes each rank sends per layer
(each rank's own link). Repeats of a point: the fastest (the run least disturbed by other work).

    python3 launch/study/plot_study.py launch/study/results/cpu-weak/results.json \
        launch/study/results/cpu-strong/results.json --out launch/study/results/plots
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gnuplot_png  # noqa: E402

PHASES = ("route", "dispatch", "expert", "combine")
LAUNCH_KEYS = {"ranks", "nodes", "ranks_per_node", "repeat"}


def load_records(paths):
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != "epic-study-results-v1":
            raise SystemExit(f"plot_study: {path} is not a run_study.py results file (epic-study-results-v1)")
        sweep = data["study"].get("sweep", {})
        series_keys = [k for k in sweep if k not in LAUNCH_KEYS]
        for record in data["records"]:
            record = dict(record)
            record["_series"] = ", ".join(f"{k} {record.get(k)}" for k in series_keys) or data["study"]["name"]
            record["_order"] = tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                                     for v in (record.get(k) for k in series_keys))
            record["_study"] = data["study"]["name"]
            records.append(record)
    return records


def fastest(records):
    """(study, series, ranks) -> the ok record with the least layer time (or step time)."""
    best = {}
    for r in records:
        if r.get("status") != "ok":
            print(f"plot_study: leaving out failed point {r.get('study')} {r.get('point')}: {r.get('error')}",
                  file=sys.stderr)
            continue
        time_ms = r.get("layer_ms", r.get("ms_per_step"))
        if time_ms is None:
            continue
        key = (r["_study"], r["_series"], r["ranks"])
        if key not in best or time_ms < best[key].get("layer_ms", best[key].get("ms_per_step")):
            best[key] = r
    return best


def _series(best):
    """(study, series) -> its records by rank count; a series measured at one rank count has nothing to
    scale and is left out."""
    groups = {}
    for (study, series, ranks), r in sorted(best.items(), key=lambda item: (item[0][0], item[1]["_order"], item[0][2])):
        groups.setdefault((study, series), []).append(r)
    return {key: records for key, records in groups.items() if len({r["ranks"] for r in records}) > 1}


def _x_axis(ranks):
    return ["set logscale x 2", f"set xrange [{min(ranks) / 1.3}:{max(ranks) * 1.3}]",
            "set xtics (" + ", ".join(f"'{r}' {r}" for r in sorted(set(ranks))) + ")", "set xlabel 'ranks'",
            "set grid", "set key below"]


def plot_phases(groups, out_dir):
    panels = list(groups.items())
    if not panels:
        return None
    rows = (len(panels) + 1) // 2
    body = [f"set multiplot layout {rows},{min(2, len(panels))} title 'Time per MoE layer call by phase "
            "(slowest rank of each phase)'"]
    for (study, series), records in panels:
        data = [[r["ranks"]] + [r.get(f"{p}_ms_max") for p in PHASES] + [r.get("layer_ms")] for r in records]
        ranks = [r["ranks"] for r in records]
        body.append(gnuplot_png.data_block("d", data))
        body += _x_axis(ranks) + ["set logscale y", "set ylabel 'ms'", "set key inside top left font ',8'",
                                  f"set title {gnuplot_png.quote(study + ': ' + series)}"]
        lines = [f"$d using 1:{i + 2} with linespoints lw 2 title '{p}'" for i, p in enumerate(PHASES)]
        lines.append("$d using 1:6 with linespoints lw 3 dt 2 lc rgb 'black' title 'layer (slowest rank)'")
        body.append("plot " + ", \\\n  ".join(lines))
        body.append("unset logscale y")
    body.append("unset multiplot")
    path = os.path.join(out_dir, "phases_vs_ranks.png")
    gnuplot_png.render("\n".join(body), path, width=1100, height=420 * rows)
    return path


def plot_lines(groups, out_dir, name, title, ylabel, value, ideal=None, logy=False):
    blocks, lines, ranks = [], [], []
    for i, ((study, series), records) in enumerate(groups.items()):
        points = [(r["ranks"], value(r, records)) for r in records]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        ranks += [x for x, _ in points]
        blocks.append(gnuplot_png.data_block(f"s{i}", points))
        lines.append(f"$s{i} using 1:2 with linespoints lw 2 pt 7 title {gnuplot_png.quote(study + ': ' + series)}")
    if not lines:
        return None
    if ideal:
        lines.append(f"{ideal} with lines dt 2 lc rgb 'gray' title 'ideal'")
    body = blocks + _x_axis(ranks) + [f"set ylabel {gnuplot_png.quote(ylabel)}",
                                      f"set title {gnuplot_png.quote(title)}"]
    if logy:
        body.append("set logscale y")
    else:
        body.append("set yrange [0:*]")
    body.append("plot " + ", \\\n  ".join(lines))
    path = os.path.join(out_dir, name)
    gnuplot_png.render("\n".join(body), path, width=1000, height=520)
    return path


def _time(r):
    return r.get("layer_ms", r.get("ms_per_step"))


def efficiency(r, records):
    """Weak: t(1) / t(N) at the same tokens per rank; strong: t(1) / (N t(N)) at the same total tokens;
    None without a 1-rank point in the series."""
    one = next((x for x in records if x["ranks"] == 1), None)
    if one is None or not _time(r):
        return None
    if r.get("scaling") == "strong":
        return _time(one) / (r["ranks"] * _time(r))
    return _time(one) / _time(r)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of run_study.py")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        gnuplot_png.require_gnuplot()
    except gnuplot_png.GnuplotError as e:
        print(f"plot_study: {e}", file=sys.stderr)
        return 2
    groups = _series(fastest(load_records(args.results)))
    made = [plot_phases(groups, args.out),
            plot_lines(groups, args.out, "tokens_per_s.png", "Tokens per second of the cluster (per MoE layer)",
                       "tokens/s", lambda r, _: r.get("tokens_per_s"), logy=True),
            plot_lines(groups, args.out, "scaling_efficiency.png",
                       "Scaling efficiency: weak t(1)/t(N) at equal tokens per rank; strong t(1)/(N t(N)) at equal "
                       "total tokens", "efficiency", efficiency, ideal="1"),
            plot_lines(groups, args.out, "load_balance.png", "Load balance: expert rows of the busiest rank / mean",
                       "max / mean rows", lambda r, _: r.get("load_balance")),
            plot_lines(groups, args.out, "bytes_per_link.png",
                       "Bytes each rank sends per MoE layer call (its own link; dispatch + combine)",
                       "MB per rank per layer", lambda r, _: (r.get("bytes_sent_per_rank_max") or 0) / 1e6 or None)]
    for path in made:
        if path:
            print(f"plot_study: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
