"""Normalizer diagnostics: how well is each sample's log partition function estimated?

On a held-out set of N pairs, small enough to compute exactly, with features x_i, y_j (L2-normalised)
and inverse temperature s, the true per-sample log partition functions are (objectives/base.py
convention; the expectation of Eq. 2 of the AmorLIP paper estimated on the set, positive included, no
logit bias):

    log Z_img[i] = log (1/N) sum_j exp(s x_i.y_j)        log Z_txt[j] = log (1/N) sum_i exp(s x_i.y_j)

They are compared with
  (a) the plain in-batch estimate at the training batch size B: the set is split into random batches of
      B (the last one may be smaller) and, within batch b, log Zhat_img[i] = log (1/|b|) sum_{j in b}
      exp(s x_i.y_j) (same for texts). This is what CLIP's softmax denominator uses;
  (b) the objective's own estimate, `objective.estimate_log_normalizers(...)`, called batch by batch on
      the same random batches, when it keeps one (SogCLR/FastCLIP's u, AmorLIP's lambda nets, ...).

For each estimate and modality: `mse` = mean_i (log Zhat[i] - log Z[i])^2 and `bias` = mean_i
(log Zhat[i] - log Z[i]) (negative: underestimates). At B >= N the in-batch estimate is exact.
Per-sample objectives (SogCLR u) index their buffers by dataset index, so for them pass features and
`indices` of samples the objective has seen (a subset of the training set); amortised objectives
(AmorLIP) can be diagnosed on genuinely held-out data.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from amorlip.evaluate.retrieval import encode_split

__all__ = ["normalizer_diagnostics", "exact_log_normalizers", "inbatch_log_normalizers", "encode_split"]

_CHUNK = 1024


def _scale(scale: Any) -> float:
    s = float(scale.detach().cpu().item() if isinstance(scale, torch.Tensor) else scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive inverse temperature exp(logit_scale), got {s}")
    return s


@torch.no_grad()
def exact_log_normalizers(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """True (log Z_img, log Z_txt), each (N,), over the whole set, in float64 (computed in chunks)."""
    x = image_features.detach().double().cpu()
    y = text_features.detach().double().cpu()
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"image and text features must both be (N, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    s, n = _scale(scale), x.shape[0]
    log_n = math.log(n)
    log_z_img = torch.cat([torch.logsumexp(s * xc @ y.T, dim=1) for xc in x.split(_CHUNK)]) - log_n
    log_z_txt = torch.cat([torch.logsumexp(s * yc @ x.T, dim=1) for yc in y.split(_CHUNK)]) - log_n
    return log_z_img, log_z_txt


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


def _errors(prefix: str, est_img: torch.Tensor, est_txt: torch.Tensor, true_img: torch.Tensor,
            true_txt: torch.Tensor) -> dict[str, float]:
    out = {}
    for mod, est, true in (("image", est_img, true_img), ("text", est_txt, true_txt)):
        err = est.double().cpu().reshape(-1) - true
        out[f"{prefix}/{mod}_mse"] = float((err ** 2).mean())
        out[f"{prefix}/{mod}_bias"] = float(err.mean())
    return out


@torch.no_grad()
def normalizer_diagnostics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: Any,
    indices: torch.Tensor | None,
    batch_size: int,
    objective: nn.Module | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Error of the in-batch and the objective's log-partition estimates against the exact values.

    Returns a flat dict: `n`, `batch_size`, `scale`, `true/{image,text}_{mean,std}` (of the exact log Z),
    `inbatch/{image,text}_{mse,bias}`, and `objective/{image,text}_{mse,bias}` when `objective` is given
    and its `estimate_log_normalizers` returns an estimate (None otherwise: CLIP, SigLIP).
    `indices` are the samples' dataset indices (int64, (N,)), used by per-sample objectives; None means
    0..N-1. See the module docstring for the definitions.
    """
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("normalizer_diagnostics: no samples")
    if indices is None:
        indices = torch.arange(n)
    indices = torch.as_tensor(indices).long().reshape(-1)
    if indices.numel() != n:
        raise ValueError(f"indices has {indices.numel()} entries but there are {n} samples")
    true_img, true_txt = exact_log_normalizers(image_features, text_features, scale)
    est_img, est_txt = inbatch_log_normalizers(image_features, text_features, scale, batch_size, seed)
    out: dict[str, float] = {
        "n": float(n),
        "batch_size": float(min(batch_size, n)),
        "scale": _scale(scale),
        "true/image_mean": float(true_img.mean()),
        "true/image_std": float(true_img.std()) if n > 1 else 0.0,
        "true/text_mean": float(true_txt.mean()),
        "true/text_std": float(true_txt.std()) if n > 1 else 0.0,
    }
    out.update(_errors("inbatch", est_img, est_txt, true_img, true_txt))

    if objective is not None:
        device = _module_device(objective) or image_features.device
        s = torch.as_tensor(_scale(scale), dtype=image_features.dtype, device=device)
        obj_img = torch.empty(n, dtype=torch.float64)
        obj_txt = torch.empty(n, dtype=torch.float64)
        got = True
        for b in _random_batches(n, batch_size, seed):
            est = objective.estimate_log_normalizers(
                image_features[b].to(device), text_features[b].to(device), s, indices[b].to(device)
            )
            if est is None:
                got = False
                break
            for key, dst in (("image", obj_img), ("text", obj_txt)):
                if key not in est:
                    raise ValueError(f"{type(objective).__name__}.estimate_log_normalizers must return "
                                     f"{{'image': (B,), 'text': (B,)}}; got keys {sorted(est)}")
                dst[b] = est[key].detach().double().cpu().reshape(-1)
        if got:
            out.update(_errors("objective", obj_img, obj_txt, true_img, true_txt))
    return out
