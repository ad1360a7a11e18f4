"""Split an Nsight Compute source-page export of each kernel into its loops (issue 5).

    ncu -i report.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/ncu_sass_regions.py sass.csv[.gz]

For each kernel in the export: warp-stall samples and warp-level instructions executed before
the first loop, in each loop (a body runs from a backward branch's target to the branch) and
after the last, with the most executed opcodes of each. In the word-plane kernel the loops are
the main K loop and the outlier slots' chunk loop, so the export of a launch with outliers and
one without shows what the outlier gather costs.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
from collections import Counter

from compile_gemv import loop_bounds


def kernels(text: str) -> list[list[list[str]]]:
    """The export's rows, one list per kernel (its header row first)."""
    found: list[list[list[str]]] = []
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == "Kernel Name":
            found.append([])
        elif found and row:
            found[-1].append(row)
    return found


def opcode(source: str) -> str:
    words = source.split()
    word = words[1] if words[0].startswith("@") else words[0]
    return word.split(".")[0]


def region(address: int, bounds: list[tuple[int, int]]) -> str:
    """The loop (first and last address of each) that holds ``address``, or where it lies."""
    for i, (first, last) in enumerate(bounds):
        if first <= address <= last:
            return f"loop {i + 1}"
    if not bounds or address < bounds[0][0]:
        return "before"
    return "after" if address > bounds[-1][1] else "between"


def regions(rows: list[list[str]]) -> list[tuple[str, float, float, Counter]]:
    header, body = rows[0], rows[1:]
    samples = header.index("Warp Stall Sampling (All Samples)")
    executed = header.index("Instructions Executed")
    branches = [(int(row[0], 16), re.search(r"BRA (0x[0-9a-f]+)", row[1])) for row in body]
    bounds = loop_bounds([(a, int(b.group(1), 16) if b else None) for a, b in branches])
    names = ["before", *(f"loop {i + 1}" for i in range(len(bounds))), "between", "after"]
    totals: dict[str, list] = {name: [0.0, 0.0, Counter()] for name in names}
    for row in body:
        total = totals[region(int(row[0], 16), bounds)]
        count = float(row[executed] or 0)
        total[0] += float(row[samples] or 0)
        total[1] += count
        total[2][opcode(row[1])] += count
    return [(name, *totals[name]) for name in names if totals[name][1] or totals[name][0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("export")
    args = parser.parse_args()
    opener = gzip.open if args.export.endswith(".gz") else open
    with opener(args.export, "rt") as f:
        text = f.read()
    for i, rows in enumerate(kernels(text)):
        print(f"kernel {i}:")
        for name, samples, executed, ops in regions(rows):
            top = ", ".join(f"{op} {int(n)}" for op, n in ops.most_common(8))
            print(f"  {name:7s} {int(samples):6d} samples {int(executed):9d} instructions  {top}")


if __name__ == "__main__":
    main()
