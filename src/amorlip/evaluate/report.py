"""Reporting helpers: JSON-safe conversion, atomic JSON files and markdown-ish tables."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def to_jsonable(obj: Any) -> Any:
    """`obj` with tensors, numpy values, paths and dataclasses turned into plain JSON values.

    Non-finite floats (NaN, +-inf) become None: strict JSON has no NaN, and a missing metric
    (e.g. clip_benchmark's acc5 on a task with fewer than 5 classes) should read as "none".
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.ndim else obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: convert it to a number, string, list or dict first")


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically: a temporary file in the same folder, fsync, then os.replace.

    A reader never sees a half-written file, and a crash leaves the previous version intact.
    Parent folders are created. Returns the path written.
    """
    from amorlip.files import atomic_write_text

    path = Path(path)
    atomic_write_text(json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n", path)
    return path


def _cell(value: Any, precision: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.{precision}f}" if math.isfinite(value) else "-"
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return _cell(value.item(), precision)
    return str(value)


def format_table(
    metrics: Mapping[str, Any] | Sequence[Sequence[Any]],
    headers: Sequence[str] | None = None,
    precision: int = 4,
) -> str:
    """A markdown table.

    `metrics` is either a flat mapping `name -> value` (two columns, headers `metric | value`) or a
    sequence of rows (give `headers`). Floats are printed with `precision` decimals; None/NaN as "-".
    """
    if isinstance(metrics, Mapping):
        rows = [[k, v] for k, v in metrics.items()]
        headers = list(headers) if headers is not None else ["metric", "value"]
    else:
        rows = [list(r) for r in metrics]
        if headers is None:
            raise ValueError("format_table: pass `headers` when giving rows instead of a mapping")
        headers = list(headers)
    cells = [[_cell(v, precision) for v in r] for r in rows]
    for r in cells:
        if len(r) != len(headers):
            raise ValueError(f"format_table: row {r} has {len(r)} cells but there are {len(headers)} headers")
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)
