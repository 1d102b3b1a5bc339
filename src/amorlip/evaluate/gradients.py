"""Gradient fidelity: is the small-batch gradient biased, and does each objective remove the bias?

AmorLIP's stated mechanism (the paper's Sec. 3) is that CLIP's in-batch softmax gives a biased estimate of the
gradient of the full-data contrastive loss when the batch is small, and that an estimate of the partition
function (SogCLR / FastCLIP's u, AmorLIP's lambda nets, NeuCLIP's prototypes) removes that bias. This module
measures it on frozen features (`amorlip.evaluate.features`), at the level of the features themselves.

* The exact gradient. Over the N pairs (the dataset), the full-data symmetric InfoNCE
  `L = (1/2N) sum_i [CE(row i) + CE(column i)]` with logits `s x_i . y_j` has
  `N dL/dx_i = (s/2) [ -2 y_i + sum_j (P_ij + Q_ij) y_j ]` and `N dL/dy_j = (s/2) [ -2 x_j + sum_i (P_ij + Q_ij) x_i ]`,
  P the row softmax and Q the column softmax of the N x N logits (`exact_gradients`, computed in row strips: no
  N x N matrix is kept).
* An objective's minibatch gradient. The objective is built as training builds it (dataset size N, steps per
  epoch N / B) and called in training mode on random batches of B pairs (one shuffled pass over the N pairs per
  epoch, the last partial batch dropped), with its state (u, lambda nets, prototypes) updated as in training. For
  a pair i in batch b, `g_b(i) = B dL_b/d(x_i, y_i)` estimates the exact `N dL/d(x_i, y_i)`; at B = N, CLIP's
  is exact. After `warmup` epochs (so that the state has seen every pair), `epochs` more are measured.
* Per objective and B: `cosine` between the mean minibatch gradient (over the visits of each pair, stacked over
  all pairs) and the exact one, `rel_error` = |mean - exact| / |exact|, `norm_ratio` = |mean| / |exact|, and
  `rel_variance` = the mean squared deviation of a single visit from the mean, over |exact|^2 (the noise;
  unbiased over the visits). The mean of k visits keeps var / k of that noise, so `bias`, `bias_cosine` and
  `bias_norm_ratio` are the same with it removed (`fidelity`): the bias proper, whatever the visits. Each
  objective is compared with the exact gradient of its own full-data loss (InfoNCE; for SogCLR / FastCLIP the
  global contrastive loss, whose partitions hold the negatives only) and, as `infonce_*`, with InfoNCE's; both
  at the scale its loss runs at (`reference_scale`: SogCLR's constant temperature, else the model's s).
* The run's own trained state (`TrainedState`, `amorlip eval RUN --gradient-fidelity --gf-trained-state`): the
  run's objective starts from the state its checkpoint saved (AmorLIP's lambda nets and their Adam, SogCLR /
  FastCLIP's u, NeuCLIP's prototypes), at the checkpoint's step, with the run's steps per epoch and length, and is
  measured without warm-up. Every measured pass counts as the checkpoint's epoch, so no epoch boundary
  re-initialises the nets during the measurement; within it the state keeps updating as in training (on frozen
  encoders). Needs every training pair (its indices are the dataset's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

_STRIP = 512


@torch.no_grad()
def exact_gradients(x: torch.Tensor, y: torch.Tensor, scale: float, positive: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N dL/dx, N dL/dy) of the full-data symmetric InfoNCE over the N pairs (x_i, y_i) at scale s (module
    docstring), in the features' dtype, computed in row strips of the N x N logits. `positive=False`: the global
    contrastive loss of SogCLR / FastCLIP instead, whose partition functions hold the negatives only (j != i)."""
    n = x.shape[0]
    s = float(scale)

    def strip(start: int) -> torch.Tensor:
        logits = s * x[start:start + _STRIP] @ y.T
        if not positive:
            rows = torch.arange(logits.shape[0])
            logits[rows, rows + start] = -math.inf
        return logits

    row_lse = torch.cat([torch.logsumexp(strip(i), dim=1) for i in range(0, n, _STRIP)])
    col_lse = torch.full((n,), -math.inf, dtype=x.dtype)
    for start in range(0, n, _STRIP):
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(strip(start), dim=0))
    gx = torch.empty_like(x)
    gy = torch.zeros_like(y)
    for start in range(0, n, _STRIP):
        logits = strip(start)
        w = torch.exp(logits - row_lse[start:start + _STRIP, None]) + torch.exp(logits - col_lse[None, :])
        gx[start:start + _STRIP] = w @ y
        gy += w.T @ x[start:start + _STRIP]
    gx = 0.5 * s * (gx - 2.0 * y)
    gy = 0.5 * s * (gy - 2.0 * x)
    return gx, gy


@dataclass(frozen=True)
class TrainedState:
    """A run's objective state as its checkpoint saved it (`state`, the objective's state_dict), where in training
    it was (`step`, `epoch`), and the run's `steps_per_epoch` and `total_steps`."""

    objective: str
    state: dict
    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int


def build_objective(cfg: Any, name: str, n: int, batch: int, epochs: int, embed_dim: int,
                    trained: TrainedState | None = None):
    """Objective `name` with the run config's section for it (defaults for a section the run did not set); with
    `trained`, built with the run's steps per epoch and length and loaded with its saved state."""
    from amorlip import objectives
    from amorlip.objectives.base import ObjectiveContext

    cls = objectives.get(name)
    steps_per_epoch = max(1, n // batch) if trained is None else trained.steps_per_epoch
    total_steps = steps_per_epoch * epochs if trained is None else trained.total_steps
    ctx = ObjectiveContext(dataset_size=n, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           total_epochs=math.ceil(total_steps / steps_per_epoch), embed_dim=embed_dim,
                           local_batch_size=batch)
    section = cfg.sections.get(cls.section) if (cls.section and cfg is not None) else None
    objective = cls(section, ctx)
    if trained is not None:
        objective.load_state_dict(trained.state)
    return objective


def minibatch_gradients(objective: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float, batch: int,
                        warmup: int, epochs: int, seed: int = 0, indices: torch.Tensor | None = None,
                        start_step: int = 0, fixed_epoch: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of g_b(i), sum of |g_b(i)|^2 per pair, visits per pair) over `epochs` measured epochs after `warmup`
    epochs (module docstring). Sums are (N, 2d) and (N,), float64; every pair is visited once per epoch.
    `indices`: the pairs' dataset indices (default 0..N-1); `start_step` / `fixed_epoch`: the step the objective
    continues from and the epoch every pass counts as (a trained state's; default: steps from 0, passes 0, 1, ...)."""
    n, d = x.shape
    if not 2 <= batch <= n:
        raise ValueError(f"batch {batch} must be in [2, N = {n}]")
    indices = torch.arange(n) if indices is None else indices
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(float(scale), dtype=x.dtype)
    total = torch.zeros(n, 2 * d, dtype=torch.float64)
    sq = torch.zeros(n, dtype=torch.float64)
    visits = torch.zeros(n, dtype=torch.long)
    objective.train()
    step = start_step
    for epoch in range(warmup + epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            b = order[start:start + batch]
            xb, yb = x[b].clone().requires_grad_(True), y[b].clone().requires_grad_(True)
            out = objective(xb, yb, s, None, indices[b], step=step,
                            epoch=epoch if fixed_epoch is None else fixed_epoch)
            gx, gy = torch.autograd.grad(out.loss, [xb, yb])
            step += 1
            if epoch >= warmup:
                g = batch * torch.cat([gx, gy], dim=1).double()
                total[b] += g
                sq[b] += (g * g).sum(dim=1)
                visits[b] += 1
    return total, sq, visits


def fidelity(total: torch.Tensor, sq: torch.Tensor, visits: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Bias and noise of the minibatch gradients against `exact` (N, 2d) over the pairs visited at least once.

    The mean over k visits still carries noise: E|mean_i - exact_i|^2 = |bias_i|^2 + var_i / k_i. So besides the
    raw `rel_error`, `cosine` and `norm_ratio` of the mean, `bias` = sqrt(sum_i (|mean_i - exact_i|^2 -
    s_i^2 / k_i)) / |exact| removes that noise with each pair's unbiased visit variance s_i^2 (k_i >= 2), and
    `bias_cosine` (clamped to [-1, 1]) / `bias_norm_ratio` do the same for |mean|^2 (the noise adds to it, not to
    mean . exact); they tell the bias apart from the noise that few visits leave in the mean. They are computed over
    the pairs visited at least twice. Where nothing of the squared error is left once the noise is removed, the
    visits do not resolve a bias: `bias` and `bias_cosine` are NaN (so is `bias_norm_ratio` where nothing of
    |mean|^2 is left). They take the visits of a pair as draws around one mean: exact for a stateless objective
    (CLIP); for one whose state moves between visits (u, lambda nets, prototypes), that movement counts as noise."""
    seen = visits > 0
    k = visits[seen].double()
    mean = total[seen] / k[:, None]
    ex = exact[seen].double()
    ex_norm2 = float((ex * ex).sum())
    dev = (sq[seen] - k * (mean * mean).sum(dim=1))  # sum over visits of |g - mean|^2, per pair
    multi = k > 1
    var = float((dev[multi] / (k[multi] - 1)).sum()) if bool(multi.any()) else math.nan
    dot, mean2 = float((mean * ex).sum()), float((mean * mean).sum())
    return {"cosine": dot / max(math.sqrt(mean2 * ex_norm2), 1e-300), "rel_error": float((mean - ex).norm()) /
            math.sqrt(ex_norm2), "norm_ratio": math.sqrt(mean2 / ex_norm2),
            "rel_variance": max(0.0, var) / ex_norm2 if bool(multi.any()) else math.nan,
            **_noise_removed(mean[multi], ex[multi], dev[multi] / (k[multi] - 1) / k[multi]),
            "pairs": int(seen.sum()), "visits": float(k.mean())}


def _noise_removed(mean: torch.Tensor, ex: torch.Tensor, noise: torch.Tensor) -> dict[str, float]:
    """`fidelity`'s bias, bias_cosine and bias_norm_ratio over the pairs visited at least twice (`noise`: each
    one's unbiased visit variance over its visits, what the noise adds to |mean_i - exact_i|^2 and |mean_i|^2)."""
    ex_norm2 = float((ex * ex).sum())
    err2 = float(((mean - ex) ** 2).sum()) - float(noise.sum())
    clean2 = float((mean * mean).sum()) - float(noise.sum())
    out = {"bias": math.nan, "bias_cosine": math.nan, "bias_norm_ratio": math.nan}
    if mean.shape[0] == 0:
        return out
    if clean2 > 0.0:
        out["bias_norm_ratio"] = math.sqrt(clean2 / ex_norm2)
    if err2 > 0.0 and clean2 > 0.0:  # else the visits do not resolve how the mean differs from the exact gradient
        out["bias"] = math.sqrt(err2 / ex_norm2)
        out["bias_cosine"] = max(-1.0, min(1.0, float((mean * ex).sum()) / math.sqrt(clean2 * ex_norm2)))
    return out


def gradient_fidelity(feats: Any, objective_names: Sequence[str], batch_sizes: Sequence[int], warmup: int = 2,
                      epochs: int = 4, seed: int = 0, log: Any = print, trained: TrainedState | None = None
                      ) -> list[dict[str, Any]]:
    """One record per (objective, B): `fidelity` of its minibatch gradients on the frozen features `feats`. With
    `trained`, that objective starts from the run's saved state (module docstring) and the others as without."""
    from amorlip.evaluate.log_normalizers import reference_scale

    n = feats.image.shape[0]
    dtype = torch.float64 if n <= 16384 else torch.float32
    x, y = feats.image.to(dtype), feats.text.to(dtype)
    exact_cache: dict[tuple[float, bool], torch.Tensor] = {}

    def exact(s_ref: float, positive: bool) -> torch.Tensor:
        if (s_ref, positive) not in exact_cache:
            exact_cache[(s_ref, positive)] = torch.cat(exact_gradients(x, y, s_ref, positive), dim=1)
        return exact_cache[(s_ref, positive)]

    records = []
    for name in objective_names:
        for batch in batch_sizes:
            b = min(int(batch), n)
            torch.manual_seed(seed)
            mine = trained if trained is not None and trained.objective == name else None
            obj = build_objective(feats.config, name, n, b, warmup + epochs, x.shape[1], mine)
            s_ref = float(reference_scale(obj, feats.scale))
            if mine is None:
                total, sq, visits = minibatch_gradients(obj, x, y, feats.scale, b, warmup, epochs, seed)
            else:
                total, sq, visits = minibatch_gradients(obj, x, y, feats.scale, b, 0, epochs, seed, feats.indices,
                                                        mine.step, mine.epoch)
            own = not obj.partition_without_positive
            rec = {"objective": name, "batch_size": b, "scale": s_ref, "own_loss": "infonce" if own else "gcl",
                   "state": f"trained (step {mine.step})" if mine else f"warm-up {warmup} epochs",
                   **fidelity(total, sq, visits, exact(s_ref, own))}
            vs_infonce = rec if own else fidelity(total, sq, visits, exact(s_ref, True))
            rec.update({f"infonce_{key}": vs_infonce[key]
                        for key in ("cosine", "rel_error", "bias", "bias_cosine")})
            records.append(rec)
            log(f"  {name} B={b}: bias {rec['bias']:.4f} (cosine {rec['bias_cosine']:.4f}), rel. variance "
                f"{rec['rel_variance']:.4f}, rel. error of the mean {rec['rel_error']:.4f} (against {rec['own_loss']})")
    return records


def fidelity_table(records: list[dict[str, Any]]) -> str:
    """Markdown-style table of `gradient_fidelity` records, a row per (objective, B)."""
    from amorlip.report import format_table

    def num(value: float, digits: int = 4) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    rows = [[r["objective"], str(r["batch_size"]), r.get("state", "-"), r["own_loss"], num(r["bias_cosine"]),
             num(r["bias"]), num(r["bias_norm_ratio"], 3), f"{r['rel_variance']:.4f}", f"{r['rel_error']:.4f}",
             num(r["infonce_bias"])] for r in records]
    return format_table(["objective", "B", "state", "own loss", "cosine (noise removed)", "bias", "norm ratio",
                         "rel. variance", "rel. error of the mean", "bias vs InfoNCE"], rows)


def plot_fidelity(records: list[dict[str, Any]], path: Any) -> Any:
    """gradient_fidelity.png: relative error (bias) and relative variance against B, a line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["objective"] for r in records):
        rs = sorted((r for r in records if r["objective"] == name), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in rs]
        axes[0].plot(bs, [max(r["bias"], 1e-6) for r in rs], marker="o", label=name)
        axes[1].plot(bs, [r["rel_variance"] for r in rs], marker="o", label=name)
    for ax, title in zip(axes, ("bias: |mean minibatch - exact| / |exact|, visit noise removed",
                                "variance of one batch / |exact|^2")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
