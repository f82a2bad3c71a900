#!/usr/bin/env python3
"""Per-kernel device times from an Nsight Compute CSV, summed by short kernel name (run_gpu_tests.sh).

Prints each kernel name with its launch count, total and mean time, largest total first, and the
sum over all kernels: where one call of an op (e.g. a 16384-token MoE layer) spends its time.
"""
import collections
import sys

from ncu_step_table import read_kernels


def main(path):
    rows = read_kernels(path)
    totals = collections.OrderedDict()
    for name, us in rows:
        count, total = totals.get(name, (0, 0.0))
        totals[name] = (count + 1, total + us)
    for name, (count, total) in sorted(totals.items(), key=lambda item: -item[1][1]):
        print(f"{total:10.1f} us  {count:4d} x {total / count:9.1f} us  {name}")
    print(f"{sum(t for _, t in totals.values()):10.1f} us  all {len(rows)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
