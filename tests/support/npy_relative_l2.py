#!/usr/bin/env python3
"""Relative L2 distance of two .npy arrays (little-endian f4/f8, C order), stdlib only (CI has no numpy).

Usage: npy_relative_l2.py EXPECTED ACTUAL BOUND [LABEL]
Prints "LABEL: relative L2 X (bound B), max |diff| Y" and exits 0 when X <= BOUND, 1 otherwise (also for
shapes or types that differ, or a file that is not a .npy array).
"""
import ast
import math
import struct
import sys
from array import array


def load(path):
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file")
    major = data[6]
    if major == 1:
        (header_length,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (header_length,), start = struct.unpack("<I", data[8:12]), 12
    header = ast.literal_eval(data[start:start + header_length].decode("latin1"))
    if header.get("fortran_order"):
        raise ValueError(f"{path}: Fortran order is not supported")
    codes = {"<f4": "f", "<f8": "d"}
    if header["descr"] not in codes:
        raise ValueError(f"{path}: dtype {header['descr']} is not supported (want <f4 or <f8)")
    values = array(codes[header["descr"]])
    values.frombytes(data[start + header_length:])
    if sys.byteorder != "little":
        values.byteswap()
    expected_count = math.prod(header["shape"])
    if len(values) != expected_count:
        raise ValueError(f"{path}: {len(values)} values for shape {header['shape']}")
    return tuple(header["shape"]), values


def main(argv):
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    label = argv[4] if len(argv) == 5 else "logits"
    bound = float(argv[3])
    try:
        (shape_a, a), (shape_b, b) = load(argv[1]), load(argv[2])
    except (OSError, ValueError, SyntaxError) as error:
        print(f"{label}: {error}")
        return 1
    if shape_a != shape_b:
        print(f"{label}: shapes differ: {shape_a} vs {shape_b}")
        return 1
    difference = sum((y - x) ** 2 for x, y in zip(a, b))
    norm = sum(x * x for x in a)
    largest = max((abs(y - x) for x, y in zip(a, b)), default=0.0)
    relative = math.sqrt(difference) / max(math.sqrt(norm), 1e-30)
    if math.isnan(relative):
        relative = math.inf
    print(f"{label}: relative L2 {relative:.3e} (bound {bound:g}), max |diff| {largest:.3e}")
    return 0 if relative <= bound else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
