#!/usr/bin/env python3
"""Per-kernel device times of the last decode step in an Nsight Compute CSV (run_gpu_tests.sh ncu).

ncu --csv writes one row per (kernel launch, metric). The last decode step is the tail of the
launches after the last kernel named like the step's first op; we print the tail's kernels in
launch order with their times, so the whole step reads as a table (short names, us).
"""
import csv
import re
import sys


def short_name(name):
    name = name.replace("(anonymous namespace)::", "").replace("<unnamed>::", "").replace("void ", "")
    name = re.sub(r"\(.*", "", name)  # drop the argument list
    name = re.sub(r"<.*", "", name)  # and template arguments
    for prefix in ("epic::cuda_kernels::", "epic::"):
        name = name.replace(prefix, "")
    return name.strip()[:60]


def read_kernels(path):
    """(short name, us) per kernel launch, in launch order."""
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        scale = {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "nsecond": 1e-3}.get(unit, 1e-3)
        rows.append((short_name(row["Kernel Name"]), value * scale))
    return rows


def main(path):
    rows = read_kernels(path)
    if not rows:
        print("no kernels in", path)
        return 1
    # The decode step ends with the argmax; take the last two steps' worth: from the second-to-last
    # argmax (exclusive) to the last (inclusive).
    ends = [i for i, (name, _) in enumerate(rows) if "argmax" in name.lower()]
    start = ends[-2] + 1 if len(ends) >= 2 else max(0, len(rows) - 80)
    step = rows[start : ends[-1] + 1] if ends else rows[start:]
    total = 0.0
    for name, us in step:
        print(f"{us:9.2f} us  {name}")
        total += us
    print(f"{total:9.2f} us  sum of {len(step)} kernels of the last step (each alone; no launch overlap)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
