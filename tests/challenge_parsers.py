"""Parsers that behave like the challenge organisers' own code, to check that our files open in it.

Written from the behaviour described in ../shared/NOTES.md (not copied): the Camelyon16 evaluation's
``readCSVContent`` splits each line at commas and parses the fields as (float, int, int), so a coordinate written as
``1462.925852`` raises ValueError there.
"""

from __future__ import annotations

from pathlib import Path


def read_csv_content(path: str | Path) -> tuple[list[float], list[int], list[int]]:
    """(probabilities, x, y) of a Camelyon16 detection CSV, parsed as the organisers' ``readCSVContent`` does:
    every line ``probability,x,y`` with ``float()`` of the first field and ``int()`` of the others."""
    probs, xs, ys = [], [], []
    with open(path) as f:
        for line in f.readlines():
            fields = line.rstrip().split(",")
            probs.append(float(fields[0]))
            xs.append(int(fields[1]))
            ys.append(int(fields[2]))
    return probs, xs, ys
