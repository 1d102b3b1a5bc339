"""Schedules as pure functions of the step or epoch, and the shared temperature scheme."""
from __future__ import annotations

import math

import torch


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `base_lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def cosine_ramp(t: float, t_max: float, start: float, end: float) -> float:
    """Cosine interpolation from `start` (t=0) to `end` (t>=t_max); constant after t_max.

    AmorLIP's beta_t = beta_T - 0.5 beta_T (1 + cos(pi t / T)) is `cosine_ramp(t, T, 0, beta_T)`;
    FastCLIP's gamma decay from 1 to gamma_min over E epochs is `cosine_ramp(e, E, 1, gamma_min)`.
    """
    if t_max <= 0 or t >= t_max:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t / t_max))


def rho_at(step: int, total_steps: int, rho: float, rho_final: float | None, final_fraction: float) -> float:
    """rho, switched to `rho_final` for the last `final_fraction` of training (App. D)."""
    if rho_final is None:
        return rho
    switch = total_steps - int(round(final_fraction * total_steps))
    return rho_final if step >= switch else rho


def apply_temperature_scheme(loss: torch.Tensor, scale: torch.Tensor, scheme: str, rho: float) -> torch.Tensor:
    """The shared temperature machinery every objective goes through.

    * `plain`: the objective's loss as it is.
    * `rescaled`: `L / sg(s) + rho / s` (FastCLIP; AmorLIP App. D), s = exp(logit_scale). The encoders
      see the gradient of L divided by s; the temperature sees d(L)/ds / s - rho / s^2.
    """
    if scheme == "plain":
        return loss
    if scheme == "rescaled":
        return loss / scale.detach() + rho / scale
    raise ValueError(f"unknown temperature scheme {scheme!r} (plain | rescaled)")
