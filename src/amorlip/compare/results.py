"""The results of a comparison: the final metrics of runs finished earlier (what a rerun skips), a run's record in
results.json, the metrics its tables show, and the finished runs grouped by entry and sweep point or read back
with their histories (`amorlip.history.read_history`, the one tolerant reader of metrics.jsonl)."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterable

from amorlip.compare.plan import PlannedRun, point_label
from amorlip.history import read_history
from amorlip.resume import config_hash, flatten

# Settings that do not change the weights but do change the metrics a run reports: a finished run made with
# other values is evaluated again (resumed from its final checkpoint) instead of being skipped.
EVAL_KEYS = ("data.val_size", "data.eval_size", "data.val_path", "train.eval_every")


def finished_metrics(run: PlannedRun) -> dict[str, float] | None:
    """The final metrics of `run` when its folder holds a finished run (summary.json) made with the same settings
    (config.yaml: the same result-changing settings, evaluated the same way); else None."""
    import yaml

    summary_path, config_path = run.run_dir / "summary.json", run.run_dir / "config.yaml"
    if not (summary_path.is_file() and config_path.is_file()):
        return None
    try:
        stored = yaml.safe_load(config_path.read_text())
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(stored, dict) or not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        return None
    requested = run.cfg.to_dict()
    if config_hash(stored) != config_hash(requested):
        return None
    old, new = flatten(stored), flatten(requested)
    if any(k in old and old[k] != new[k] for k in new if k in EVAL_KEYS or k.startswith("eval.")):
        return None
    return summary["metrics"]


def run_record(run: PlannedRun, metrics: dict[str, float] | None, status: str, error: str = "") -> dict[str, Any]:
    """A run's entry in results.json: where it stands (trained | skipped | failed, and why) and its final metrics."""
    cfg = run.cfg
    return {"entry": run.entry, "sweep": run.point, "seed": run.seed, "label": run.label, "status": status,
            "error": error or None, "name": run.name, "run_dir": str(run.run_dir),
            "config_hash": config_hash(cfg.to_dict()), "batch_size": cfg.train.batch_size, "steps": cfg.train.steps,
            "epochs": cfg.train.epochs, "metrics": metrics}


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean zero-shot top-1, each task's top-1, and mean retrieval R@1 (both directions)."""
    out = {k: v for k, v in metrics.items() if (k.endswith("/top1") or k == "zeroshot/mean_top1")
           and not k.startswith("normalizer/") and is_number(v)}
    r1 = [v for k, v in metrics.items() if k.startswith("retrieval/") and k.endswith("R@1") and is_number(v)]
    if r1:
        out["retrieval/mean_R@1"] = sum(r1) / len(r1)
    return out


def normalizer_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The normaliser diagnostics among a run's final metrics (keys `normalizer/...`)."""
    return {k: v for k, v in metrics.items() if k.startswith("normalizer/") and is_number(v)}


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_order(columns: Iterable[str]) -> list[str]:
    """Mean zero-shot top-1 first, then mean retrieval R@1, then the others by name."""
    return sorted(columns, key=lambda k: (k != "zeroshot/mean_top1", k != "retrieval/mean_R@1", k))


def run_groups(record: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(entry, sweep point, its runs with metrics), in entry and sweep order; points without runs left out."""
    sweep = record.get("sweep") or {}
    points = [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
    runs = [r for r in record["runs"] if isinstance(r.get("metrics"), dict)]
    out = []
    for entry in record["entries"]:
        for point in points:
            mine = [r for r in runs if r["entry"] == entry and (r.get("sweep") or {}) == point]
            if mine:
                out.append((entry, point, mine))
    return out


def finished_runs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each run with metrics as the plots and amorlip.crossing take it: its `entry`, sweep `point` label, `seed`,
    `batch_size` and `history` (its metrics rows, each run's log read once)."""
    return [{"entry": r["entry"], "point": point_label(r.get("sweep") or {}), "seed": r["seed"],
             "batch_size": float(r.get("batch_size") or 1), "history": read_history(Path(r["run_dir"]))}
            for r in record["runs"] if isinstance(r.get("metrics"), dict)]
