"""Where does an objective overtake the reference? Paired differences along the learning curves (the paper's Fig. 3).

For a comparison with a reference entry (`amorlip compare --reference LABEL`), at every evaluation step that an
entry and the reference both logged, the paired difference of an evaluation metric (same seed = same
initialisation and data order) is taken over the seeds, with its 95% t interval. The crossing point is the first
evaluation from which the entry's mean stays above the reference's at every later evaluation; the measured
crossing is the first from which the interval's low end stays above 0 (None: never). Steps are reported with the
samples seen (step x batch size), the x axis on which runs at different batch sizes compare.

`compare` writes crossing.md (a row per entry and sweep point) and crossing_METRIC.png (a panel per sweep point:
the difference against samples seen, with its band and the zero line) for zero-shot top-1 and retrieval R@1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from amorlip.report import format_table
from amorlip.stats import Interval, paired_difference


def is_crossing_metric(key: str) -> bool:
    """The metrics whose crossing points are reported: zero-shot mean top-1 and each retrieval split's mean R@1."""
    return key == "eval/zeroshot/mean_top1" or (key.startswith("eval/retrieval/") and key.endswith("/mean_R@1"))


def per_step(history: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    """step -> value of `key` in a run's metrics rows (the last value logged at a step)."""
    return {int(row["step"]): float(row[key]) for row in history if key in row and row[key] is not None}


def difference_curve(runs: dict[int, dict[int, float]], reference: dict[int, dict[int, float]]
                     ) -> list[tuple[int, Interval]]:
    """(step, paired difference over the shared seeds) at every step all shared seeds logged in both.
    `runs` / `reference`: seed -> step -> value."""
    seeds = sorted(set(runs) & set(reference))
    if not seeds:
        return []
    steps = set.intersection(*(set(runs[s]) & set(reference[s]) for s in seeds))
    out = []
    for step in sorted(steps):
        diff = paired_difference({s: runs[s][step] for s in seeds}, {s: reference[s][step] for s in seeds})
        if diff is not None:
            out.append((step, diff))
    return out


def crossing(curve: list[tuple[int, Interval]], measured: bool = False) -> int | None:
    """The first step from which the mean difference (measured: its interval's low end) stays above 0."""
    found = None
    for step, diff in reversed(curve):
        low = diff.low if (measured and diff.half is not None) else (None if measured else diff.mean)
        if low is None or low <= 0:
            break
        found = step
    return found


def _histories(runs: list[dict[str, Any]], key: str) -> dict[tuple[str, str], dict[int, Any]]:
    out: dict[tuple[str, str], dict[int, Any]] = {}
    for r in runs:
        values = per_step(r["history"], key)
        if values:
            out.setdefault((r["entry"], r["point"]), {})[int(r["seed"])] = (values, float(r["batch_size"]))
    return out


def crossing_rows(runs: list[dict[str, Any]], reference: str, key: str) -> list[dict[str, Any]]:
    """A row per (entry, sweep point) other than the reference: its difference curve and crossing points.
    `runs`: one dict per finished run with its `entry`, sweep `point` label, `seed`, `batch_size` and `history`
    (its metrics rows)."""
    hist = _histories(runs, key)
    rows = []
    for (entry, point), seeds in hist.items():
        ref = hist.get((reference, point))
        if entry == reference or not ref:
            continue
        batch = next(iter(seeds.values()))[1]
        curve = difference_curve({s: v for s, (v, _) in seeds.items()}, {s: v for s, (v, _) in ref.items()})
        if curve:
            rows.append({"entry": entry, "point": point, "batch_size": batch, "curve": curve,
                         "crossing": crossing(curve), "measured_crossing": crossing(curve, measured=True),
                         "seeds": len(set(seeds) & set(ref))})
    return rows


def crossing_markdown(rows: list[dict[str, Any]], key: str, reference: str) -> str:
    """The crossing.md section of one metric: a row per `crossing_rows` row, its final difference and crossings."""
    def at(step: int | None, batch: float) -> str:
        return "never" if step is None else f"step {step} ({step * batch:,.0f} samples)"

    cells = []
    for r in rows:
        last = r["curve"][-1][1]
        half = f" ± {100 * last.half:.2f}" if last.half is not None else ""
        cells.append([r["entry"], r["point"] or "-", r["seeds"], f"{100 * last.mean:+.2f}{half}",
                      at(r["crossing"], r["batch_size"]), at(r["measured_crossing"], r["batch_size"])])
    headers = ["entry", "sweep point", "seeds", "final difference", "mean above from", "interval above 0 from"]
    return (f"Crossing points of {key} against {reference} (paired over seeds; percentage points):\n\n"
            + format_table(headers, cells, markdown=True) + "\n")


def plot_crossing(rows: list[dict[str, Any]], key: str, reference: str, out: Path, name: str) -> list[Path]:
    """NAME.png: a panel per sweep point, the paired difference to the reference against samples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys(r["point"] for r in rows))
    if not points:
        return []
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4), squeeze=False)
    for ax, point in zip(axes[0], points):
        for r in (r for r in rows if r["point"] == point):
            xs = [s * r["batch_size"] for s, _ in r["curve"]]
            mean = [100 * d.mean for _, d in r["curve"]]
            line, = ax.plot(xs, mean, marker="o", ms=3, label=r["entry"])
            if all(d.half is not None for _, d in r["curve"]):
                ax.fill_between(xs, [100 * d.low for _, d in r["curve"]], [100 * d.high for _, d in r["curve"]],
                                alpha=0.15, color=line.get_color())
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel("samples seen")
        ax.set_ylabel(f"{key[5:]}: entry - {reference} (points)")
        ax.set_title(point or key, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"paired difference to {reference}, mean and 95% interval over seeds", fontsize=10)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def write_crossing(runs: list[dict[str, Any]], reference: str | None, out: Path, file_name: Any) -> list[Path]:
    """crossing.md and one plot per crossing metric (`is_crossing_metric`) that the runs logged; nothing without a
    reference. `runs` as `crossing_rows` takes them; `file_name(text)`: a safe file name (compare's `safe_name`)."""
    from amorlip.files import atomic_write_text

    if not reference:
        return []
    keys = sorted({k for r in runs for row in r["history"] for k in row if is_crossing_metric(k)})
    parts, written = [], []
    for key in keys:
        rows = crossing_rows(runs, reference, key)
        if rows:
            parts.append(crossing_markdown(rows, key, reference))
            written += plot_crossing(rows, key, reference, out, f"crossing_{file_name(key[5:])}")
    if parts:
        atomic_write_text("\n".join(parts), out / "crossing.md")
        written.insert(0, out / "crossing.md")
    return written
