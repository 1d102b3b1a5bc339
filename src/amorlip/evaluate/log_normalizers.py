"""Normalizer diagnostics from features: how well is each sample's log partition function estimated?

On a set of n pairs, small enough to compute exactly, with features x_i, y_j (L2-normalised) and inverse
temperature s, the reference log partition functions follow the convention of
`Objective.estimate_log_normalizers` (objectives/base.py): the mean over the N pairs of the TRAINING set,
positive included once, no logit bias. The set stands in for the training set's negatives:

    log Z_img[i] = log( (1/N) exp(s x_i.y_i) + (1 - 1/N) * 1/(n-1) sum_{j != i} exp(s x_i.y_j) )

(texts alike, over the images). With `dataset_size` None (or N = n: the set IS the training set) this is
the plain mean over the set, `log (1/n) sum_j exp(s x_i.y_j)`, exact. With n < N it is the mean over the
n-1 other pairs of the set, an unbiased estimate of the training set's mean over the negatives, with the
positive at its training-set weight 1/N; `reference_noise` estimates its own variance (the resolution of the
comparison: an estimator equal to the training-set value would show an mse of about that). It is compared with
  (a) the plain in-batch estimate at the training batch size B: the set is split into random batches of
      B (the last one may be smaller; B is capped at n) and, within batch b, log Zhat_img[i] = log (1/|b|)
      sum_{j in b} exp(s x_i.y_j) (same for texts). This is what CLIP's softmax denominator uses;
  (b) the objective's own estimate, `objective.estimate_log_normalizers(...)`, called batch by batch on
      the same random batches, when it keeps one (SogCLR/FastCLIP's u, AmorLIP's lambda nets, NeuCLIP's
      prototypes). An objective with `effective_scale` (SogCLR / FastCLIP-v1 with a constant temperature)
      tracks its estimate at that scale: the reference and the in-batch estimate use it too.

For each estimate and modality: `mse` = mean_i (log Zhat[i] - log Z[i])^2, `bias` = mean_i
(log Zhat[i] - log Z[i]) (negative: underestimates) and `r2` = 1 - (mse - bias^2) / Var_i(log Z[i]) (the share of
the per-sample spread of log Z the estimate follows once its offset is removed; 0: no better than a constant). An objective may return NaN for a sample it has no
estimate of (SogCLR's u of a sample not visited yet): those samples are left out of its mse and bias, and
`objective/coverage` is the fraction that entered.

`normalizer_diagnostics` computes all this from features; `amorlip.evaluate.normalizers` runs it on the
two splits of a training run.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_CHUNK = 1024


def _scale(scale: Any) -> float:
    s = float(scale.detach().cpu().item() if isinstance(scale, torch.Tensor) else scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive inverse temperature exp(logit_scale), got {s}")
    return s


@torch.no_grad()
def exact_log_normalizers(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: Any, dataset_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (log Z_img, log Z_txt), each (n,), in float64 (computed in chunks of rows).

    `dataset_size` None or n: the plain mean over the set. Otherwise N: the positive at weight 1/N and the
    other n-1 pairs of the set standing in for the training set's negatives (module docstring).
    """
    x = image_features.detach().double().cpu()
    y = text_features.detach().double().cpu()
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"image and text features must both be (N, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    s, n = _scale(scale), x.shape[0]
    if dataset_size is None or int(dataset_size) == n:
        return mean_log_partition(x, y, s), mean_log_partition(y, x, s)
    big_n = int(dataset_size)
    if big_n < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    if n < 2:
        raise ValueError("a reference with dataset_size needs at least 2 samples (the negatives come from the set)")
    pos = s * (x * y).sum(dim=1)
    # log((1/N) e^pos + (1 - 1/N) mean_{j != i} e^logit_ij); log1p(-1/N) = -inf at N = 1 (no negatives)
    w_pos, w_neg = -math.log(big_n), (math.log1p(-1.0 / big_n) if big_n > 1 else -math.inf) - math.log(n - 1)

    def side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, n, _CHUNK):
            logits = s * a[start:start + _CHUNK] @ b.T
            rows = torch.arange(logits.shape[0])
            logits[rows, rows + start] = -math.inf  # the positive is counted apart
            out.append(torch.logsumexp(logits, dim=1))
        return torch.logaddexp(pos + w_pos, torch.cat(out) + w_neg)

    return side(x, y), side(y, x)


@torch.no_grad()
def mean_log_partition(anchors: torch.Tensor, others: torch.Tensor, scale: Any) -> torch.Tensor:
    """`log (1/N) sum_j exp(s a_i . o_j)` for every anchor a_i against all N rows o_j (float64, in row chunks)."""
    a, o, s = anchors.detach().double().cpu(), others.detach().double().cpu(), _scale(scale)
    return torch.cat([torch.logsumexp(s * chunk @ o.T, dim=1) for chunk in a.split(_CHUNK)]) - math.log(o.shape[0])


@torch.no_grad()
def reference_noise(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: Any, dataset_size: int | None = None,
    from_dataset: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample variance of the reference log Z over the draw of the set (image, text), each (n,), float64.

    The reference's negatives are the set's n-1 other pairs: its log Z is itself an estimate, of variance
    (delta method) `(1 - 1/N)^2 fpc var_j(exp(s x_i.y_j)) / ((n-1) Z_i^2)`, with var_j the sample variance over
    j != i and fpc = (N-n)/(N-2) the finite-population correction of a subset of the training set
    (`from_dataset`; 1 for held-out pairs). 0 when the set is the whole training set (`dataset_size` None or n);
    NaN below 3 samples.
    """
    x = image_features.detach().double().cpu()
    y = text_features.detach().double().cpu()
    s, n = _scale(scale), x.shape[0]
    if dataset_size is None or int(dataset_size) == n:
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    if n < 3:
        return torch.full((n,), math.nan, dtype=torch.float64), torch.full((n,), math.nan, dtype=torch.float64)
    big_n = int(dataset_size)
    fpc = (max(0.0, (big_n - n) / (big_n - 2)) if big_n > 2 else 0.0) if from_dataset else 1.0
    c_neg = 1.0 - 1.0 / big_n

    def side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, n, _CHUNK):
            logits = s * a[start:start + _CHUNK] @ b.T
            rows = torch.arange(logits.shape[0])
            diag = rows + start
            pos = logits[rows, diag].clone()
            logits[rows, diag] = -math.inf
            top = torch.maximum(logits.max(dim=1).values, pos)  # a common shift: the ratio var / Z^2 keeps
            w = torch.exp(logits - top[:, None])
            mean = w.sum(dim=1) / (n - 1)
            dev = (w - mean[:, None]) ** 2
            dev[rows, diag] = 0.0
            var = dev.sum(dim=1) / (n - 2)
            z = torch.exp(pos - top) / big_n + c_neg * mean
            out.append(c_neg ** 2 * fpc * var / (n - 1) / z ** 2)
        return torch.cat(out)

    return side(x, y), side(y, x)


def _random_batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    return list(torch.randperm(n, generator=g).split(batch_size))


@torch.no_grad()
def inbatch_log_normalizers(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: Any, batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch estimates (log Zhat_img, log Zhat_txt), each (N,), float64, on random batches of `batch_size`."""
    x = image_features.detach().double().cpu()
    y = text_features.detach().double().cpu()
    s, n = _scale(scale), x.shape[0]
    est_img, est_txt = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for b in _random_batches(n, batch_size, seed):
        logits = s * x[b] @ y[b].T
        log_b = math.log(len(b))
        est_img[b] = torch.logsumexp(logits, dim=1) - log_b
        est_txt[b] = torch.logsumexp(logits, dim=0) - log_b
    return est_img, est_txt


def _module_device(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def error_stats(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """(mse, bias, r2) of an estimate over the samples it has (NaN = none; all NaN gives NaN).

    r2 = 1 - Var(error) / Var(log Z) = 1 - (mse - bias^2) / Var(log Z), over the same samples: the share of the
    per-sample spread of the exact log Z that the estimate follows once its constant offset is removed (1: all of
    it, 0: no better than a constant, below 0: worse than one; NaN when log Z does not vary)."""
    est = estimate.double().cpu().reshape(-1)
    true = truth.double().cpu().reshape(-1)
    has = ~torch.isnan(est)
    err, true = est[has] - true[has], true[has]
    if not err.numel():
        return math.nan, math.nan, math.nan
    spread = float(true.var(unbiased=False)) if true.numel() > 1 else 0.0
    r2 = 1.0 - float(err.var(unbiased=False)) / spread if spread > 0 else math.nan
    return float((err ** 2).mean()), float(err.mean()), r2


def _errors(prefix: str, est_img: torch.Tensor, est_txt: torch.Tensor, true_img: torch.Tensor,
            true_txt: torch.Tensor) -> dict[str, float]:
    """`error_stats` per modality, as `{prefix}/{image,text}_{mse,bias,r2}`."""
    out = {}
    for mod, est, true in (("image", est_img, true_img), ("text", est_txt, true_txt)):
        mse, bias, r2 = error_stats(est, true)
        out[f"{prefix}/{mod}_mse"], out[f"{prefix}/{mod}_bias"], out[f"{prefix}/{mod}_r2"] = mse, bias, r2
    return out


def reference_scale(objective: nn.Module | None, scale: Any) -> float:
    """The s the estimates are compared at: the objective's `effective_scale(s)` when it has one (a constant
    temperature its loss and its estimate use), else the model's s."""
    s = torch.as_tensor(_scale(scale), dtype=torch.float64)
    effective = getattr(objective, "effective_scale", None)
    return _scale(effective(s)) if callable(effective) else float(s)


@torch.no_grad()
def normalizer_diagnostics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: Any,
    indices: torch.Tensor | None,
    batch_size: int,
    objective: nn.Module | None = None,
    seed: int = 0,
    dataset_size: int | None = None,
    from_dataset: bool = True,
) -> dict[str, float]:
    """Error of the in-batch and the objective's log-partition estimates against the reference values.

    Returns a flat dict: `n`, `batch_size` (the in-batch B, capped at n), `scale` (the s compared at: see
    `reference_scale`), `true/{image,text}_{mean,std}` (of the reference log Z), `true/{image,text}_noise` (the
    mean of `reference_noise`: the reference's own variance, 0 when exact), `inbatch/{image,text}_{mse,bias}`,
    and `objective/{image,text}_{mse,bias}` + `objective/coverage` when `objective` is given and its
    `estimate_log_normalizers` returns an estimate (None otherwise: CLIP, SigLIP). The objective receives
    the model's `scale` (it applies its own effective scale). `indices` are the samples' dataset indices
    (int64, (N,)), used by per-sample objectives; None means 0..N-1. `dataset_size`: the training set's
    size N of the convention (None: the set is the whole dataset); `from_dataset`: the set is a subset of the
    training set (False: held-out pairs; only changes `noise`). See the module docstring.
    """
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("normalizer_diagnostics: no samples")
    if indices is None:
        indices = torch.arange(n)
    indices = torch.as_tensor(indices).long().reshape(-1)
    if indices.numel() != n:
        raise ValueError(f"indices has {indices.numel()} entries but there are {n} samples")
    s_ref = reference_scale(objective, scale)
    true_img, true_txt = exact_log_normalizers(image_features, text_features, s_ref, dataset_size)
    est_img, est_txt = inbatch_log_normalizers(image_features, text_features, s_ref, batch_size, seed)
    out: dict[str, float] = {
        "n": float(n),
        "batch_size": float(min(batch_size, n)),
        "scale": s_ref,
        "true/image_mean": float(true_img.mean()),
        "true/image_std": float(true_img.std()) if n > 1 else 0.0,
        "true/text_mean": float(true_txt.mean()),
        "true/text_std": float(true_txt.std()) if n > 1 else 0.0,
    }
    noise_img, noise_txt = reference_noise(image_features, text_features, s_ref, dataset_size, from_dataset)
    out["true/image_noise"], out["true/text_noise"] = float(noise_img.mean()), float(noise_txt.mean())
    out.update(_errors("inbatch", est_img, est_txt, true_img, true_txt))

    if objective is not None:
        got = _objective_estimate(objective, image_features, text_features, scale, indices, batch_size, seed)
        if got is not None:
            obj_img, obj_txt = got
            out.update(_errors("objective", obj_img, obj_txt, true_img, true_txt))
            covered = ~(torch.isnan(obj_img) | torch.isnan(obj_txt))
            out["objective/coverage"] = float(covered.double().mean())
            for variant in getattr(objective, "estimate_variants", ()):  # e.g. AmorLIP's online net
                more = _objective_estimate(objective, image_features, text_features, scale, indices, batch_size,
                                           seed, net=variant)
                if more is not None:
                    out.update(_errors(f"objective_{variant}", *more, true_img, true_txt))
    return out


def _objective_estimate(
    objective: nn.Module, image_features: torch.Tensor, text_features: torch.Tensor, scale: Any,
    indices: torch.Tensor, batch_size: int, seed: int, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The objective's (image, text) log-normaliser estimates of all n samples, called batch by batch on the
    random batches of the in-batch estimate (fp64 on the CPU); None when it keeps no estimate."""
    n = image_features.shape[0]
    device = _module_device(objective) or image_features.device
    s = torch.as_tensor(_scale(scale), dtype=image_features.dtype, device=device)
    obj_img = torch.empty(n, dtype=torch.float64)
    obj_txt = torch.empty(n, dtype=torch.float64)
    for b in _random_batches(n, batch_size, seed):
        est = objective.estimate_log_normalizers(
            image_features[b].to(device), text_features[b].to(device), s, indices[b].to(device), **kwargs
        )
        if est is None:
            return None
        for key, dst in (("image", obj_img), ("text", obj_txt)):
            if key not in est:
                raise ValueError(f"{type(objective).__name__}.estimate_log_normalizers must return "
                                 f"{{'image': (B,), 'text': (B,)}}; got keys {sorted(est)}")
            dst[b] = est[key].detach().double().cpu().reshape(-1)
    return obj_img, obj_txt
