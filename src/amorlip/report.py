"""Human-facing output: the project's table formatter, summary tables and plots of a run's history."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence


def format_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], markdown: bool = False) -> str:
    """A table of `headers` over `rows`, each cell written with str(), without a final newline.

    Plain (bench): fixed-width columns two spaces apart, the first left-aligned and the others right-aligned,
    a rule of dashes under the header. Markdown (compare, crossing, the study scripts): `| a | b |` lines under
    a `|---|---|` rule, the cells unpadded."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(cells[0]), *lines[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def summary_table(metrics: dict[str, float], title: str = "") -> str:
    """A two-column text table of final metrics (percentages for accuracies and recalls)."""
    if not metrics:
        return f"{title}\n(no evaluation metrics)" if title else "(no evaluation metrics)"
    width = max(len(k) for k in metrics)
    lines = [title, "-" * (width + 12)] if title else []
    for key in sorted(metrics):
        value = metrics[key]
        shown = f"{100 * value:8.2f} %" if _is_fraction_metric(key) else f"{value:10.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def _is_fraction_metric(key: str) -> bool:
    return any(t in key for t in ("top1", "top5", "recall", "R@", "acc"))


def is_curve_metric(key: str) -> bool:
    """The evaluation metrics drawn over steps: every top-1 and every R@1 (not top-5, R@5, R@10)."""
    return key.endswith(("/top1", "_R@1"))


def plot_history(history: Iterable[dict[str, Any]], path: Path, title: str = "") -> Path:
    """PNG with the training loss (left) and every evaluation metric (right) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_steps, losses = [], []
    evals: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in history:
        if "objective_loss" in row:
            loss_steps.append(row["step"])
            losses.append(row["objective_loss"])
        for k, v in row.items():
            if k.startswith("eval/") and isinstance(v, (int, float)) and is_curve_metric(k):
                evals[k[5:]].append((row["step"], v))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].plot(loss_steps, losses, lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("objective loss")
    axes[0].set_title("training loss")
    for name, points in sorted(evals.items()):
        xs, ys = zip(*points)
        axes[1].plot(xs, [100 * y for y in ys], marker="o", ms=3, label=name)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("%")
    axes[1].set_title("evaluation (top-1 / R@1)")
    if evals:
        axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
