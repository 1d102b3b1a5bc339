"""A run's history, `metrics.jsonl`: one JSON object a line, appended by the trainer, read by every tool.

One writer and one reader, torch-free (compare, report and the plots read it without importing the trainer).
A line is appended in one write; when the write fails (a full disk, a file size limit) the file is cut back to
where it was and the error is one `CheckpointError` that says what to do. A last line cut short anyway (a kill -9
or a power cut in the middle of a write) is dropped by the reader: it is the only line a crash can tear, and the
step it belonged to is logged again when the run resumes from its checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from amorlip.errors import CheckpointError
from amorlip.files import atomic_write_text, write_error

METRICS = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def _append(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append `row` as one line; on a failed write the file is cut back to its previous end and a
    CheckpointError (what happened, what to do) is raised."""
    data = (json.dumps(row) + "\n").encode()
    try:
        with open(path, "ab") as f:
            end = f.tell()
            try:
                _append(f, data)
            except OSError:
                try:
                    f.truncate(end)  # no torn line left behind (truncating frees space: it works on a full disk)
                except OSError:
                    pass
                raise
    except OSError as e:
        raise write_error(Path(path), e) from e


def parse_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """The file's lines with their rows, and the torn last line that was left out (None if there is none).

    A line that does not parse anywhere but last is not a torn write: it is reported (CheckpointError) rather
    than silently dropped."""
    path = Path(path)
    if not path.is_file():
        return [], None
    lines = path.read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[tuple[str, dict[str, Any]]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            out.append((line, row))
        elif i == len(lines) - 1:
            return out, line
        else:
            raise CheckpointError(f"{path} line {i + 1} is not a metrics row ({line[:60]!r}); remove that line")
    return out, None


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's metrics rows, in order; a torn last line is left out."""
    rows, _ = parse_lines(metrics_path(run_dir))
    return [row for _, row in rows]


def truncate_after(run_dir: str | Path, step: int, drop_eval_at_step: bool = False) -> str | None:
    """On resume: keep the rows up to `step` (those after it are logged again); with `drop_eval_at_step` drop the
    evaluation at `step` too (a finished run evaluates again). The file is rewritten atomically, without a torn
    last line; returns that line when there was one."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return None
    rows, torn = parse_lines(path)

    def keep(row: dict[str, Any]) -> bool:
        if row["step"] == step and drop_eval_at_step:
            return not any(k.startswith("eval/") for k in row)
        return row["step"] <= step

    atomic_write_text("".join(line + "\n" for line, row in rows if keep(row)), path)
    return torn
