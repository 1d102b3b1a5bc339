"""Everything a comparison writes in its --out folder, rebuilt from its results.json record alone (and the run
folders' metrics.jsonl for the curves): the tables, results.json, the plots and the crossing points."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from amorlip.compare.entries import safe_name
from amorlip.compare.plots import plot_histories, plot_sweeps
from amorlip.compare.results import finished_runs
from amorlip.compare.tables import table_files
from amorlip.crossing import write_crossing
from amorlip.files import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_outputs(record: dict[str, Any], out: Path) -> tuple[str, list[Path]]:
    """table.md/.csv, differences.csv (with a reference), normalizers.md/.csv (when the runs report normaliser
    diagnostics), results.json and the plots; returns the markdown shown and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    shown, files, columns = table_files(record)
    written = []
    for name, text in files.items():
        atomic_write_text(text, out / name)
        written.append(out / name)
    atomic_write_text(json.dumps(_clean(record), indent=2), out / "results.json")
    written.append(out / "results.json")
    finished = finished_runs(record)
    written += plot_histories(finished, out, swept=bool(record.get("sweep")))
    written += plot_sweeps(record, out, columns)
    written += write_crossing(finished, record.get("reference"), out, safe_name)
    return shown, written


def rebuild_outputs(results_json: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """The tables and plots again, from a results.json alone (and the run folders' metrics.jsonl for curves)."""
    results_json = Path(results_json)
    return write_outputs(json.loads(results_json.read_text()), out or results_json.parent)
