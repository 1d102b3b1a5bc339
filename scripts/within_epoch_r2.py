#!/usr/bin/env python
"""R2 of AmorLIP's lambda nets against the exact log Z at different places within an epoch (docs/findings.md,
"Mechanism"): the nets are re-initialised at every epoch start, so an evaluation's distance from the last
re-initialisation decides how long the nets have trained. For every evaluation of every run given (its
metrics.jsonl, `--eval.normalizers true`), the fraction of the epoch done at that step, (step mod steps per
epoch) / steps per epoch, is put in one of `--bins` equal bins; per batch size and bin, the mean ± 95% t interval over the
evaluations in it of R2 (mean of image and text) of the online and the EMA target net, on the training and the
held-out pairs, with the count of evaluations.

    python scripts/within_epoch_r2.py runs/study-fmnist/regime/runs/fmnist60k-amorlip*-s*
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from amorlip.history import read_history
from amorlip.report import format_table
from amorlip.stats import mean_interval

NETS = ("objective_online", "objective")
SPLITS = ("train", "heldout")


def steps_per_epoch(config: dict) -> int:
    """Optimizer steps in one epoch of the run (the dataset's pairs over the global batch, dropping the rest)."""
    return max(1, int(config["data"]["dataset_size"]) // int(config["train"]["batch_size"]))


def evaluations(run: Path) -> tuple[int, list[tuple[float, dict[str, float]]]]:
    """The run's batch size and, per evaluation, (fraction of the epoch done, {f'{split}/{net}': R2 mean of image
    and text})."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    spe = steps_per_epoch(config)
    out = []
    for row in read_history(run):  # a last line cut short by a kill is left out
        values = {}
        for split in SPLITS:
            for net in NETS:
                pair = [row.get(f"eval/normalizer/{split}/{net}/{m}_r2") for m in ("image", "text")]
                if None not in pair:
                    values[f"{split}/{net}"] = sum(pair) / 2
        if values:
            out.append(((int(row["step"]) % spe) / spe, values))
    return int(config["train"]["batch_size"]), out


def table(runs: list[Path], bins: int = 4) -> str:
    """The markdown table: one row per batch size and bin of the epoch fraction."""
    grouped: dict[tuple[int, int], list[dict[str, float]]] = {}
    for run in runs:
        batch, evals = evaluations(run)
        for fraction, values in evals:
            grouped.setdefault((batch, min(bins - 1, int(fraction * bins))), []).append(values)
    keys = [f"{split}/{net}" for split in SPLITS for net in NETS]
    table_rows = []
    for (batch, b), rows in sorted(grouped.items()):
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            iv = mean_interval(vals) if vals else None
            cells.append("-" if iv is None else f"{iv.mean:.2f}" if iv.half is None else f"{iv.mean:.2f} ± {iv.half:.2f}")
        table_rows.append([batch, f"{b / bins:.2f}-{(b + 1) / bins:.2f}", len(rows), *cells])
    headers = ["batch", "epoch done since re-init", "evaluations", *(f"R2 {k}" for k in keys)]
    return format_table(headers, table_rows, markdown=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="AmorLIP run folders (config.yaml and metrics.jsonl)")
    p.add_argument("--bins", type=int, default=4, help="equal bins of the epoch fraction (default: 4)")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file() or not (r / "config.yaml").is_file()]
    if missing or args.bins < 1:
        what = f"no config.yaml and metrics.jsonl in {', '.join(missing)}" if missing else "--bins must be >= 1"
        print(f"within_epoch_r2.py: error: {what}", file=sys.stderr)
        return 2
    sys.stdout.write(table(args.runs, args.bins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
