#!/usr/bin/env python
"""The normaliser tables of docs/findings.md, from the results.json of an `amorlip compare` with
`--eval.normalizers true`: per entry and batch size, mean ± 95% t interval over seeds of the final evaluation's

  MSE of the log partition estimate against the exact one (in-batch estimate, and the method's own),
  the own estimate's bias (mean error; negative = underestimates), and
  R2 of an estimate = 1 - (MSE - bias^2) / var(log Z): the share of the per-sample spread of the exact
  log Z that the estimate follows once its constant offset is removed (1: all of it; 0: no better than a
  constant; below 0: worse than a constant).

    python scripts/findings_tables.py runs/study-fmnist/ablation/results.json [--modality image|text]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from amorlip.report import format_table
from amorlip.stats import mean_interval


def r2(metrics: dict, split: str, estimate: str, modality: str) -> float | None:
    """The run's logged `normalizer/SPLIT/ESTIMATE/MODALITY_r2` (amorlip.evaluate.normalizers); for runs made
    before it was logged, 1 - (mse - bias^2) / std^2 from their final metrics (None when a value is missing)."""
    p = f"normalizer/{split}"
    if f"{p}/{estimate}/{modality}_r2" in metrics:
        return metrics[f"{p}/{estimate}/{modality}_r2"]
    mse, bias = metrics.get(f"{p}/{estimate}/{modality}_mse"), metrics.get(f"{p}/{estimate}/{modality}_bias")
    std = metrics.get(f"{p}/true/{modality}_std")
    if mse is None or bias is None or not std:
        return None
    return 1.0 - (mse - bias * bias) / (std * std)


def cell(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    iv = mean_interval(values)
    return f"{iv.mean:.{digits}f}" + ("" if iv.half is None else f" ± {iv.half:.{digits}f}")


def table(record: dict, modality: str = "image") -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in record["runs"]:
        if isinstance(run.get("metrics"), dict):
            groups.setdefault((run["entry"], run["batch_size"]), []).append(run["metrics"])
    splits = ("train", "heldout")
    head = ["entry", "batch", "seeds"] + [f"{s}: {c}" for s in splits
                                          for c in ("in-batch MSE", "in-batch R2", "own MSE", "own bias", "own R2")]
    rows = []
    for (entry, batch), runs in groups.items():
        cells = [entry, str(batch), str(len(runs))]
        for s in splits:
            cells += [cell([m.get(f"normalizer/{s}/inbatch/{modality}_mse") for m in runs]),
                      cell([r2(m, s, "inbatch", modality) for m in runs]),
                      cell([m.get(f"normalizer/{s}/objective/{modality}_mse") for m in runs]),
                      cell([m.get(f"normalizer/{s}/objective/{modality}_bias") for m in runs]),
                      cell([r2(m, s, "objective", modality) for m in runs])]
        rows.append(cells)
    return format_table(head, rows, markdown=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="findings_tables.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a compare's results.json")
    parser.add_argument("--modality", choices=("image", "text"), default="image")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"cannot read {args.results}: {e} (pass the results.json of an amorlip compare)")
    sys.stdout.write(table(record, args.modality))
    return 0


if __name__ == "__main__":
    sys.exit(main())
