#!/usr/bin/env python
"""How many seeds a compare's paired differences need for a 95% interval of +-TARGET points: per entry, batch
and metric of its differences.csv, the per-seed standard deviation of the paired difference behind the interval
(half-width x sqrt(n) / t_{0.975, n-1}), the half-width now, and the fewest seeds whose interval would be within
+-TARGET if that spread holds.

    python scripts/seeds_needed.py runs/compare/differences.csv [--target 2] [--metric zeroshot/mean_top1]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from amorlip.report import format_table
from amorlip.stats import sd_of_interval, seeds_for_half_width

POINTS = 100.0  # compare writes accuracies as fractions; the table is in percentage points


def rows(path: Path, target: float, metric: str | None) -> list[list[str]]:
    out = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if metric and r["metric"] != metric:
                continue
            n = int(r["seeds"])
            if n < 2 or not r["ci95_low"]:
                out.append([r["entry"], r.get("train.batch_size", "-"), r["metric"], str(n), "-", "-", "-"])
                continue
            half = POINTS * (float(r["ci95_high"]) - float(r["ci95_low"])) / 2
            sd = sd_of_interval(half, n)
            need = seeds_for_half_width(sd, target)
            out.append([r["entry"], r.get("train.batch_size", "-"), r["metric"], str(n), f"{sd:.2f}",
                        f"±{half:.2f}", "more than 1000" if need is None else str(need)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seeds_needed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("differences", type=Path, help="the differences.csv of an amorlip compare with --reference")
    parser.add_argument("--target", type=float, default=2.0, help="the half-width wanted, in points (default 2)")
    parser.add_argument("--metric", default=None, help="one metric only, e.g. zeroshot/mean_top1")
    args = parser.parse_args(argv)
    if args.target <= 0:
        parser.error(f"--target must be positive, got {args.target}")
    try:
        table = rows(args.differences, args.target, args.metric)
    except (OSError, KeyError, ValueError) as e:
        parser.error(f"cannot read {args.differences}: {e} (pass the differences.csv of an amorlip compare)")
    head = ["entry", "bs", "metric", "seeds", "sd of the paired difference", "half-width now",
            f"seeds for ±{args.target:g}"]
    sys.stdout.write(format_table(head, table, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
