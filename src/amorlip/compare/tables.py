"""The tables of a comparison, from its results.json record: a row per entry and sweep point with the mean and 95% t
interval over seeds of each metric (table.md / .csv, normalizers.md / .csv), and with a reference entry the paired
differences to it with a verdict (differences.csv). Markdown through `report.format_table`, statistics from
amorlip.stats."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable, Iterator

from amorlip.compare.plan import format_value, short_names
from amorlip.compare.results import headline_metrics, metric_order, normalizer_metrics, run_groups
from amorlip.report import format_table
from amorlip.stats import Interval, mean_interval, paired_difference, verdict


def _cell(iv: Interval, percent: bool) -> str:
    if percent:
        return f"{100 * iv.mean:.2f}" + (f" ± {100 * iv.half:.2f}" if iv.half is not None else "")
    return f"{iv.mean:.4g}" + (f" ± {iv.half:.2g}" if iv.half is not None else "")


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def build_table(record: dict[str, Any], metrics_of: Callable[[dict], dict] = headline_metrics,
                percent: bool = True) -> tuple[str, str, list[str]]:
    """Markdown and CSV tables: a row per entry and sweep point, a column per metric: the mean over seeds and
    its 95% t interval (mean ± half-width; in % when `percent`; no interval from one seed). The CSV holds the raw
    values: `METRIC mean`, `METRIC ci95` (the half-width) and `METRIC sd`."""
    groups = run_groups(record)
    columns = metric_order({k for _, _, runs in groups for r in runs for k in metrics_of(r["metrics"])})
    keys = list(record.get("sweep") or {})
    names = short_names(keys)
    md = []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["entry", *keys, "seeds"] + [f"{c} {what}" for c in columns for what in ("mean", "ci95", "sd")])
    for entry, point, runs in groups:
        cells, raw = [], []
        for c in columns:
            vals = [metrics_of(r["metrics"])[c] for r in runs if c in metrics_of(r["metrics"])]
            if not vals:
                cells.append("-")
                raw += ["", "", ""]
                continue
            iv = mean_interval(vals)
            cells.append(_cell(iv, percent))
            raw += [_num(iv.mean), _num(iv.half), _num(iv.sd)]
        shown = [format_value(point[k]) for k in keys]
        md.append([entry, *shown, len(runs), *cells])
        writer.writerow([entry, *shown, len(runs), *raw])
    header = ["entry", *(names[k] for k in keys), "seeds", *columns]
    return format_table(header, md, markdown=True) + "\n", buf.getvalue(), columns


def _differences(runs: list[dict[str, Any]], ref_runs: list[dict[str, Any]],
                 metrics_of: Callable[[dict], dict]) -> Iterator[tuple[str, Interval]]:
    """(metric, paired difference) of `runs` to `ref_runs` for every metric both report, over the shared seeds."""
    mine = {r["seed"]: metrics_of(r["metrics"]) for r in runs}
    theirs = {r["seed"]: metrics_of(r["metrics"]) for r in ref_runs}
    for c in metric_order({k for m in mine.values() for k in m} & {k for m in theirs.values() for k in m}):
        diff = paired_difference({s: m[c] for s, m in mine.items() if c in m},
                                 {s: m[c] for s, m in theirs.items() if c in m})
        if diff is not None:
            yield c, diff


def build_differences(record: dict[str, Any], reference: str, metrics_of: Callable[[dict], dict] = headline_metrics,
                      percent: bool = True) -> tuple[str, str, list[dict[str, Any]]]:
    """Paired differences `entry - reference` per entry, sweep point and metric, over the seeds both ran (same
    seed = same data order and initialisation): mean, 95% t interval and verdict (better / worse when the
    interval excludes 0, else "no difference measured"; higher is better for every headline metric)."""
    groups = run_groups(record)
    keys = list(record.get("sweep") or {})
    names = short_names(keys)
    refs = {json.dumps(point, sort_keys=True): runs for entry, point, runs in groups if entry == reference}
    unit = " (points)" if percent else ""
    md = []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["entry", "reference", *keys, "metric", "seeds", "difference", "ci95_low", "ci95_high", "verdict"])
    rows = []
    scale = 100.0 if percent else 1.0
    for entry, point, runs in groups:
        ref_runs = refs.get(json.dumps(point, sort_keys=True))
        if entry == reference or not ref_runs:
            continue
        for c, diff in _differences(runs, ref_runs, metrics_of):
            word = verdict(diff)
            rows.append({"entry": entry, "sweep": point, "metric": c, "seeds": diff.n, "difference": diff.mean,
                         "ci95_low": diff.low, "ci95_high": diff.high, "verdict": word})
            interval = "-" if diff.half is None else f"[{scale * diff.low:+.2f}, {scale * diff.high:+.2f}]"
            shown = [format_value(point[k]) for k in keys]
            md.append([entry, *shown, c, diff.n, f"{scale * diff.mean:+.2f}", interval, word])
            writer.writerow([entry, reference, *shown, c, diff.n, _num(diff.mean), _num(diff.low), _num(diff.high),
                             word])
    header = ["entry", *(names[k] for k in keys), "metric", "seeds", f"difference{unit}", "95% interval", "verdict"]
    return format_table(header, md, markdown=True) + "\n", buf.getvalue(), rows


def describe_setup(record: dict[str, Any]) -> str:
    """The table's first line: what was held equal."""
    parts = [f"model {record.get('model')}", f"data {record.get('data')}"]
    sweep = record.get("sweep") or {}
    if "train.batch_size" not in sweep:
        parts.append(_per_entry(record["runs"], lambda r: f"batch {r.get('batch_size')}"))
    if sweep:
        parts.append("sweep " + " x ".join(f"{k}={','.join(format_value(v) for v in vs)}" for k, vs in sweep.items()))
        parts.append(f"budget {record.get('budget')}" + (f" ({record['base_length']})" if record.get("base_length")
                                                          else ""))
    else:
        parts.append(_per_entry(record["runs"], lambda r: f"{r.get('steps')} steps" if r.get("steps")
                                else f"{r.get('epochs')} epochs"))
    parts.append(f"seeds {','.join(map(str, record['seeds']))}")
    return ", ".join(parts) + "; mean ± 95% t interval over seeds"


def _per_entry(runs: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> str:
    """`describe(run)` when every entry has the same (e.g. "batch 64"), else the most common one with the others
    named by entry: "batch 32 (clip[train.batch_size=256]: batch 256)"."""
    by_entry: dict[str, str] = {}
    for run in runs:
        by_entry.setdefault(run.get("entry") or run.get("label", ""), describe(run))
    values = list(by_entry.values())
    if not values:
        return describe({})
    common = max(dict.fromkeys(values), key=values.count)
    others = [f"{entry}: {value}" for entry, value in by_entry.items() if value != common]
    return common + (f" ({'; '.join(others)})" if others else "")


def _left_out(record: dict[str, Any]) -> str:
    """The lines naming the runs the table leaves out: failed, and not finished yet (`--tables-only`)."""
    failed = [r for r in record["runs"] if r.get("status") == "failed"]
    waiting = [r for r in failed if r.get("error") == "not finished yet"]
    text = ""
    if len(waiting) < len(failed):
        text += "\nnot in the table (failed): " + ", ".join(r["label"] for r in failed if r not in waiting) + "\n"
    if waiting:
        text += "\nnot in the table (not finished yet): " + ", ".join(r["label"] for r in waiting) + "\n"
    return text


def table_files(record: dict[str, Any]) -> tuple[str, dict[str, str], list[str]]:
    """The markdown shown (= table.md); the table files by name, in the order they are listed: differences.csv
    (with a reference), table.md, table.csv, normalizers.md / .csv (when the runs report normaliser diagnostics);
    and the headline metrics the table shows."""
    header = describe_setup(record) + "\n\n"
    md, csv_text, columns = build_table(record)
    shown = header + (md if run_groups(record) else "(no run finished)\n") + _left_out(record)
    files = {}
    reference = record.get("reference")
    if reference:
        diff_md, diff_csv, _ = build_differences(record, reference)
        shown += (f"\nPaired differences to {reference} (entry - {reference}, same seeds), 95% t interval:\n\n"
                  + diff_md)
        files["differences.csv"] = diff_csv
    files["table.md"], files["table.csv"] = shown, csv_text
    norm_md, norm_csv, norm_columns = build_table(record, normalizer_metrics, percent=False)
    if norm_columns:
        files["normalizers.md"] = header + "Normaliser diagnostics (mean ± 95% t interval over seeds)\n\n" + norm_md
        files["normalizers.csv"] = norm_csv
    return shown, files, columns
