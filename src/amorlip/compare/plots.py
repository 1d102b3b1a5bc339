"""The plots of a comparison (matplotlib, imported only when drawing): the curves over training of the objective
loss, every top-1 and R@1 (a line per entry and sweep point, mean and 95% interval over seeds), the normaliser
diagnostics, and each headline metric against the swept values."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from amorlip.compare.entries import safe_name
from amorlip.compare.plan import format_value, point_label
from amorlip.compare.results import headline_metrics, is_number, run_groups
from amorlip.stats import mean_interval


def _band(values: list[float]) -> tuple[float, float, float]:
    """mean, and the 95% interval's ends (the mean itself for one value)."""
    iv = mean_interval(values)
    return iv.mean, (iv.low if iv.half is not None else iv.mean), (iv.high if iv.half is not None else iv.mean)


def _series(runs: list[list[dict[str, Any]]], key: str, x_scale: float = 1.0,
            y_scale: float = 1.0) -> list[tuple[float, float, float, float]]:
    """(x, mean, low, high) per logged step of `key` over the seeds' histories `runs`: x = step * x_scale, the
    values times y_scale, low/high the 95% t interval's ends (the mean itself where one seed logged the step)."""
    by_step: dict[int, list[float]] = {}
    for h in runs:
        for row in h:
            if key in row and is_number(row[key]):
                by_step.setdefault(row["step"], []).append(row[key])
    return [(s * x_scale, *_band([y_scale * v for v in by_step[s]])) for s in sorted(by_step)]


def _draw(ax: Any, series: list[tuple[float, float, float, float]], alpha_band: float = 0.15, **style: Any) -> None:
    """A mean line, with the interval as a band where any point has one."""
    xs = [p[0] for p in series]
    line, = ax.plot(xs, [p[1] for p in series], **style)
    if any(p[2] != p[3] for p in series):
        ax.fill_between(xs, [p[2] for p in series], [p[3] for p in series], alpha=alpha_band, color=line.get_color())


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(histories: dict[str, list[list[dict[str, Any]]]], out: Path,
                x_scale: dict[str, float] | None = None, xlabel: str = "step") -> list[Path]:
    """One PNG per curve metric (the objective loss, every top-1 and R@1): value vs step per label (mean over
    seeds; band = the 95% t interval when two or more seeds logged the step). `x_scale[label]` multiplies the
    steps (the batch size, for an x axis of samples seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from amorlip.report import is_curve_metric

    metrics = sorted({k for runs in histories.values() for h in runs for row in h for k in row
                      if k.startswith("eval/") and is_curve_metric(k)})
    paths = []
    for metric in ["loss"] + metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        key = "objective_loss" if metric == "loss" else metric
        for label, runs in histories.items():
            series = _series(runs, key, (x_scale or {}).get(label, 1.0), 1.0 if metric == "loss" else 100.0)
            if series:
                _draw(ax, series, label=label, marker=None if metric == "loss" else "o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("objective loss" if metric == "loss" else f"{metric[5:]} (%)")
        ax.set_title(metric + " (mean, 95% interval over seeds)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / f"{safe_name(metric)}.png"))
    return paths


NORMALIZER_PANELS = tuple((split, modality) for split in ("train", "heldout") for modality in ("image", "text"))
NORMALIZER_ESTIMATES = ("objective", "inbatch")


def normalizer_curves(histories: dict[str, list[list[dict[str, Any]]]], x_scale: dict[str, float] | None = None
                      ) -> dict[tuple[str, str, str, str], list[tuple[float, float, float, float]]]:
    """The normaliser diagnostics over training: (label, split, modality, estimate) -> (x, mean, low, high) of
    the MSE of the log partition estimate, for the splits train | heldout, the modalities image | text and the
    estimates objective (the method's own) | inbatch (the batch's, at the run's batch size). Labels whose runs
    logged none are left out, and so is the objective estimate of a method that has none (CLIP, SigLIP)."""
    curves = {}
    for label, runs in histories.items():
        for split, modality in NORMALIZER_PANELS:
            for estimate in NORMALIZER_ESTIMATES:
                series = _series(runs, f"eval/normalizer/{split}/{estimate}/{modality}_mse",
                                 (x_scale or {}).get(label, 1.0))
                if series:
                    curves[(label, split, modality, estimate)] = series
    return curves


def plot_normalizer_curves(histories: dict[str, list[list[dict[str, Any]]]], out: Path,
                           x_scale: dict[str, float] | None = None, xlabel: str = "step",
                           name: str = "normalizer_mse", title: str = "") -> list[Path]:
    """NAME.png: the curves of `normalizer_curves`, a panel per split and modality, a colour per label, solid for
    the method's own estimate and dashed for the in-batch one; nothing when no run logged them."""
    curves = normalizer_curves(histories, x_scale)
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(k[0] for k in curves))
    legend: dict[str, Any] = {}
    for ax, (split, modality) in zip(axes.flat, NORMALIZER_PANELS):
        for i, label in enumerate(labels):
            for estimate, dashes in zip(NORMALIZER_ESTIMATES, ("-", "--")):
                series = curves.get((label, split, modality, estimate))
                if series:
                    _draw(ax, series, color=colours[i % len(colours)], linestyle=dashes, marker="o", ms=3,
                          label=f"{label} ({'own' if estimate == 'objective' else 'in-batch'})", alpha_band=0.07)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MSE of log Z estimate")
        ax.set_title(f"{split} pairs, {modality}", fontsize=10)
        handles, names = ax.get_legend_handles_labels()
        legend.update(zip(names, handles))
        if not handles:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    order = [f"{label} ({kind})" for label in labels for kind in ("own", "in-batch")]
    names = [n for n in order if n in legend]
    fig.legend([legend[n] for n in names], names, loc="outside lower center", ncols=3, fontsize=7)
    fig.suptitle(f"normaliser diagnostics over training{', ' + title if title else ''} (solid: the method's own "
                 "estimate, dashed: the in-batch one; mean, 95% interval over seeds)", fontsize=10)
    return [_save(fig, out / f"{name}.png")]


def _axis(key: str, values: list[Any]) -> str:
    """How to draw swept values: log2 (batch sizes, powers of two), log (positive, a decade or more apart),
    linear (other numbers) or category (anything else)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "category"
    if all(v > 0 for v in values):
        if key.endswith("batch_size") or all(float(v).is_integer() and int(v) & (int(v) - 1) == 0 for v in values) \
                and len(values) > 2:
            return "log2"
        if max(values) / min(values) >= 10:
            return "log"
    return "linear"


def _sweep_series(groups: list[tuple[str, dict[str, Any], list[dict[str, Any]]]], entry: str, metric: str,
                  panel: dict[str, Any], x_key: str, x_values: list[Any], category: bool
                  ) -> list[tuple[float, float, float, float]]:
    """(x, mean, low, high) of `metric` in % over the seeds of `entry` at each value of `x_key` (the others swept
    keys as in `panel`), from `results.run_groups`; x is the value, or its place when `category`."""
    series = []
    for i, xv in enumerate(x_values):
        point = {x_key: xv, **panel}
        runs = next((r for e, p, r in groups if e == entry and p == point), [])
        vals = [headline_metrics(r["metrics"])[metric] for r in runs if metric in headline_metrics(r["metrics"])]
        if vals:
            series.append((i if category else xv, *_band([100 * v for v in vals])))
    return series


def plot_sweeps(record: dict[str, Any], out: Path, columns: list[str]) -> list[Path]:
    """One PNG per headline metric against the first swept key: a line per entry (mean over seeds, band = 95%
    interval); with more swept keys, a panel per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = record.get("sweep") or {}
    if not sweep:
        return []
    keys = list(sweep)
    x_key, x_values = keys[0], sweep[keys[0]]
    axis = _axis(x_key, x_values)
    panels = [dict(zip(keys[1:], combo)) for combo in itertools.product(*(sweep[k] for k in keys[1:]))]
    groups = run_groups(record)
    paths = []
    for metric in columns:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for entry in record["entries"]:
                series = _sweep_series(groups, entry, metric, panel, x_key, x_values, axis == "category")
                if series:
                    _draw(ax, series, marker="o", ms=4, label=entry)
            if axis == "category":
                ax.set_xticks(range(len(x_values)), [format_value(v) for v in x_values])
            elif axis in ("log2", "log"):
                ax.set_xscale("log", base=2 if axis == "log2" else 10)
                ax.set_xticks(x_values, [format_value(v) for v in x_values])
                ax.minorticks_off()
            ax.set_xlabel(x_key)
            ax.set_ylabel(f"{metric} (%)")
            ax.set_title(f"{metric}, {point_label(panel)}" if panel else metric, fontsize=10)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        budget = record.get("budget", "samples") + (f", {record['base_length']}" if record.get("base_length") else "")
        fig.suptitle(f"mean and 95% interval over seeds; budget {budget}", fontsize=9)
        paths.append(_save(fig, out / f"sweep_{safe_name(metric)}.png"))
    return paths


def plot_histories(finished: list[dict[str, Any]], out: Path, swept: bool) -> list[Path]:
    """The curves of the finished runs (`results.finished_runs`): `plot_curves` with a line per entry and sweep
    point, and a normaliser plot per sweep point with a line per entry; against samples seen when `swept`, else
    the step. Nothing when no run logged a row."""
    by_point: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}  # sweep point -> entry -> histories
    batch: dict[str, dict[str, float]] = {}  # sweep point -> entry -> batch size (x scale: samples seen)
    for r in finished:
        by_point.setdefault(r["point"], {}).setdefault(r["entry"], []).append(r["history"])
        batch.setdefault(r["point"], {})[r["entry"]] = r["batch_size"]
    if not any(any(h) for entries in by_point.values() for hs in entries.values() for h in hs):
        return []
    xlabel = "samples seen" if swept else "step"

    def label(entry: str, point: str) -> str:
        return " ".join(filter(None, (entry, point)))

    histories = {label(e, p): hs for p, entries in by_point.items() for e, hs in entries.items()}
    x_scale = {label(e, p): b for p, entries in batch.items() for e, b in entries.items()}
    written = plot_curves(histories, out, x_scale if swept else None, xlabel)
    for point, entries in by_point.items():
        written += plot_normalizer_curves(entries, out, batch[point] if swept else None, xlabel,
                                          "normalizer_mse" + (f"_{safe_name(point)}" if point else ""), point)
    return written
