#!/usr/bin/env python3
"""A run with a residency state per prompt against runs with one state for every prompt, prompt by prompt.

Usage: npy_rows_by_state.py MIXED.npy STATES LENGTHS BOUND STATE=RUN.npy... [LABEL]
  STATES: the mixed run's list (e.g. wake,focus,wake); LENGTHS: each prompt's token count (its logits rows,
  in prompt order, e.g. 5,4,7); STATE=RUN.npy: the run where every prompt was in STATE.
For each prompt, its rows of MIXED must be within BOUND (relative L2; 0: bitwise) of its rows in the run of
its own state, and farther than that from every other state's run (so the states really differ there).
Prints one line per prompt; exits 0 when every prompt passes, 1 otherwise. Stdlib only (CI has no numpy).
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from npy_relative_l2 import load  # noqa: E402


def relative_l2(a, b):
    difference = sum((y - x) ** 2 for x, y in zip(a, b))
    norm = sum(x * x for x in a)
    value = math.sqrt(difference) / max(math.sqrt(norm), 1e-30)
    return math.inf if math.isnan(value) else value


def main(argv):
    runs = [arg for arg in argv[5:] if "=" in arg]
    labels = [arg for arg in argv[5:] if "=" not in arg]
    if len(argv) < 6 or not runs or len(labels) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    label = labels[0] if labels else "states"
    states = argv[2].split(",")
    lengths = [int(n) for n in argv[3].split(",")]
    bound = float(argv[4])
    if len(states) != len(lengths):
        print(f"{label}: {len(states)} states for {len(lengths)} prompt lengths")
        return 1
    try:
        shape, mixed = load(argv[1])
        by_state = {}
        for run in runs:
            state, path = run.split("=", 1)
            by_state[state] = load(path)
    except (OSError, ValueError, SyntaxError) as error:
        print(f"{label}: {error}")
        return 1
    vocab = shape[1]
    if shape[0] != sum(lengths):
        print(f"{label}: {shape[0]} logits rows for prompts of {sum(lengths)} tokens")
        return 1
    status = 0
    first = 0
    for p, (state, length) in enumerate(zip(states, lengths)):
        rows = slice(first * vocab, (first + length) * vocab)
        first += length
        if state not in by_state:
            print(f"{label}: prompt {p} is in state {state}, but no run of it was given")
            return 1
        own = relative_l2(by_state[state][1][rows], mixed[rows])
        others = {other: relative_l2(values[rows], mixed[rows]) for other, (_, values) in by_state.items()
                  if other != state}
        ok = (own <= bound if bound > 0 else mixed[rows] == by_state[state][1][rows]) and \
            all(distance > max(bound, 0.0) for distance in others.values())
        status |= 0 if ok else 1
        other_text = ", ".join(f"{other} {distance:.3e}" for other, distance in others.items())
        print(f"{label}: prompt {p} ({state}): against its state {own:.3e} (bound {bound:g}), "
              f"against {other_text} -- {'ok' if ok else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
