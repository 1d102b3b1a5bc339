"""DataComp's numbers: the special metrics of its tasks (pure functions, numpy in / float out) and the benchmark
average over the tasks' main metrics, with the results' loader and table.

Used by `amorlip.evaluate.datacomp` (which evaluates) and on saved results; nothing here runs a model.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from amorlip.evaluate.datacomp_tasks import DATACOMP_TASKS, DataCompTask, get_task, select_tasks
from amorlip.evaluate.report import format_table


def worst_group_accuracy(correct: np.ndarray, groups: np.ndarray) -> float:
    """The lowest mean of `correct` over the groups that have samples (WILDS' `*_wg` with Accuracy)."""
    correct, groups = np.asarray(correct, dtype=np.float64).reshape(-1), np.asarray(groups).reshape(-1)
    if correct.size == 0:
        return float("nan")
    return float(min(correct[groups == g].mean() for g in np.unique(groups)))


def macro_f1_present(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """WILDS' F1(average='macro'): scikit-learn's macro F1 over the labels present in `y_true`."""
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    return float(f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)))


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """|true & pred| / |true | pred| for boolean vectors (scikit-learn's binary jaccard_score; 0 when both empty)."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    union = np.logical_or(t, p).sum()
    return float(np.logical_and(t, p).sum() / union) if union else 0.0


def winogavil_prompt(cue: str) -> str:
    """DataComp's WinoGAViL prompt: 'An <cue>' when the lower-cased cue starts with a vowel, else 'A <cue>'."""
    item = cue.lower()
    return f"An {item}" if item[:1] in ("a", "e", "i", "o", "u") else f"A {item}"


def winogavil_metrics(instances: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """DataComp's WinoGAViL scores from (similarities (n,), is_association bool (n,)) per instance.

    The n_assoc candidates with the highest similarity are predicted (numpy argsort, as DataComp); the
    Jaccard index with the true associations is averaged over all instances and by candidate count.
    """
    scores, groups = [], []
    for sims, y_true in instances:
        sims, y_true = np.asarray(sims, dtype=np.float64).reshape(-1), np.asarray(y_true, dtype=bool).reshape(-1)
        n_assoc = int(y_true.sum())
        chosen = np.argsort(sims)[len(sims) - n_assoc:]
        y_pred = np.isin(np.arange(len(sims)), chosen)
        scores.append(jaccard(y_true, y_pred))
        groups.append(len(sims))
    s, g = np.asarray(scores), np.asarray(groups)

    def mean(mask: np.ndarray) -> float:
        return float(s[mask].mean()) if mask.any() else float("nan")

    return {
        "avg_jaccard_score": mean(np.ones_like(g, dtype=bool)),
        "jaccard_score_5": mean(g == 5),
        "jaccard_score_6": mean(g == 6),
        "jaccard_score_10": mean(g == 10),
        "jaccard_score_12": mean(g == 12),
        "jaccard_score_5-6": mean(g <= 6),
        "jaccard_score_10-12": mean(g >= 10),
    }


def finite_or_none(x: Any) -> float | None:
    """`x` as a float when it is a finite number, else None (a missing or NaN score)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------------
# Aggregating
# ----------------------------------------------------------------------------------------------------
def _scores(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Task key -> main-metric score from our results dict, a bare mapping, or DataComp's loaded jsonl."""
    entries = results.get("tasks", results) if isinstance(results, Mapping) else results
    out: dict[str, float | None] = {}
    for k, v in entries.items():
        try:
            task = get_task(k)
        except KeyError:
            continue  # not a scored DataComp task (e.g. FairFace) or an unrelated entry
        if isinstance(v, Mapping):
            score = v.get("score")
            metrics = v.get("metrics")
            if score is None and isinstance(metrics, Mapping):  # DataComp's record, or ours without a score
                score = metrics.get("main_metric", metrics.get(task.main_metric))
            if score is None and not isinstance(v.get("main_metric"), str):
                score = v.get("main_metric")
        else:
            score = v
        out[task.key] = finite_or_none(score)
    return out


def aggregate(results: Mapping[str, Any], expected: Sequence[str | DataCompTask] | None = None) -> dict[str, Any]:
    """The DataComp average: the unweighted mean of the main metrics of the tasks that have a score.

    `results` is `run_datacomp`'s output (or its "tasks" mapping, or a mapping task -> score; keys may be
    DataComp keys or display names). Returns {"average", "n_tasks", "partial", "missing"}: `missing`
    lists the tasks of `expected` (default: all 38) without a finite score; the average is `partial`
    whenever any is missing, i.e. it is NOT the DataComp average then. `average` is None with no scores.
    """
    expected_tasks = select_tasks(expected)
    scores = _scores(results)
    have = [t for t in expected_tasks if scores.get(t.key) is not None]
    missing = [t.key for t in expected_tasks if scores.get(t.key) is None]
    values = [scores[t.key] for t in have]
    return {
        "average": float(np.mean(values)) if values else None,
        "n_tasks": len(values),
        "partial": bool(missing) or len(expected_tasks) < len(DATACOMP_TASKS),
        "missing": missing,
    }


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load results written by `run_datacomp` (JSON) or DataComp's own `eval_results.jsonl`.

    DataComp's lines ({"key", "dataset", "metrics": {..., "main_metric"}}) become {key: {"score": ...}}.
    """
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    tasks: dict[str, Any] = {}
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is neither our JSON results nor DataComp jsonl: {e}") from None
        tasks[rec.get("key", rec.get("dataset"))] = {"score": rec.get("metrics", {}).get("main_metric")}
    return {"benchmark": "datacomp", "tasks": tasks}


def datacomp_table(results: Mapping[str, Any]) -> str:
    """A markdown table of every task's main metric (missing/failed tasks shown as such) and the average."""
    entries = results.get("tasks", {})
    rows = []
    for key, e in entries.items():
        task = get_task(key)
        status = e.get("status", "ok") if isinstance(e, Mapping) else "ok"
        score = _scores({key: e}).get(task.key)
        rows.append([task.name, task.main_metric, score if status == "ok" else status])
    agg = results.get("aggregate") or aggregate(results)
    label = f"average ({agg['n_tasks']}/{len(DATACOMP_TASKS)} tasks{', PARTIAL' if agg['partial'] else ''})"
    rows.append([label, "mean of main metrics", agg["average"]])
    return format_table(rows, headers=["task", "metric", "score"])
