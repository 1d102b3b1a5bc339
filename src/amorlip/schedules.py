"""Schedules as pure functions of the step or epoch, and the shared temperature scheme."""
from __future__ import annotations

import math
from typing import Any, get_args

import torch

from amorlip.config.schema import LrScheduler, LrTemperatureSchedule
from amorlip.errors import ConfigError


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `base_lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


LR_SCHEDULERS = get_args(LrScheduler)
"""optim.lr_scheduler's choices (open_clip's --lr-scheduler)."""


def _warmup(step: int, base_lr: float, warmup_steps: int) -> float:
    return base_lr * (step + 1) / warmup_steps


def const_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to `base_lr` over `warmup_steps`, then `base_lr` (open_clip's const_lr)."""
    if warmup_steps > 0 and step < warmup_steps:
        return _warmup(step, base_lr, warmup_steps)
    return base_lr


def const_cooldown_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, cooldown_steps: int,
                      power: float = 1.0, end_lr: float = 0.0) -> float:
    """Warm-up, `base_lr`, then over the last `cooldown_steps` a decay to `end_lr` at `total_steps`:
    `end_lr + (base_lr - end_lr) * (1 - e / cooldown_steps) ** power`, e = steps into the cooldown (linear for
    power 1); `end_lr` from `total_steps` on (open_clip's const_lr_cooldown)."""
    if warmup_steps > 0 and step < warmup_steps:
        return _warmup(step, base_lr, warmup_steps)
    start = total_steps - cooldown_steps
    if cooldown_steps <= 0 or step < start:
        return base_lr
    progress = min(1.0, (step - start) / cooldown_steps)
    return end_lr + (base_lr - end_lr) * (1.0 - progress) ** power


def lr_factor(step: int, optim: Any, total_steps: int) -> float:
    """optim.lr_scheduler's learning rate at `step` as a fraction of optim.lr (a pure function of the step).

    The floors (optim.min_lr, optim.lr_cooldown_end) are absolute rates, so they enter as fractions of optim.lr:
    a group with another base rate (the temperature's `same-as-lr`) keeps the same shape, scaled.
    `cosine` with min_lr 0 is exactly `warmup_cosine_lr(step, 1.0, warmup_steps, total_steps)`.
    """
    scheduler = optim.lr_scheduler
    if scheduler == "cosine":
        return warmup_cosine_lr(step, 1.0, optim.warmup_steps, total_steps, optim.min_lr / optim.lr)
    if scheduler == "const":
        return const_lr(step, 1.0, optim.warmup_steps)
    if scheduler == "const-cooldown":
        cooldown = optim.lr_cooldown_steps
        if cooldown is None or not 0 < cooldown <= total_steps - optim.warmup_steps:
            raise ConfigError(
                f"optim.lr_cooldown_steps={cooldown} must be between 1 and the {total_steps} training steps less "
                f"optim.warmup_steps={optim.warmup_steps} (pass e.g. --optim.lr-cooldown-steps "
                f"{max(1, (total_steps - optim.warmup_steps) // 10)})"
            )
        return const_cooldown_lr(step, 1.0, optim.warmup_steps, total_steps, cooldown, optim.lr_cooldown_power,
                                 optim.lr_cooldown_end / optim.lr)
    raise ValueError(f"optim.lr_scheduler={scheduler!r} is not one of: {', '.join(LR_SCHEDULERS)}")


def cosine_ramp(t: float, t_max: float, start: float, end: float) -> float:
    """Cosine interpolation from `start` (t=0) to `end` (t>=t_max); constant after t_max.

    AmorLIP's beta_t = beta_T - 0.5 beta_T (1 + cos(pi t / T)) is `cosine_ramp(t, T, 0, beta_T)`;
    FastCLIP's gamma decay from 1 to gamma_min over E epochs is `cosine_ramp(e, E, 1, gamma_min)`.
    """
    if t_max <= 0 or t >= t_max:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t / t_max))


TEMPERATURE_LR_SCHEDULES = get_args(LrTemperatureSchedule)
STEP_THRESH_TEMPERATURE = 0.03
"""step_thresh: the temperature group's lr is divided by STEP_THRESH_DIVISOR while 1/s <= this (both releases)."""
STEP_THRESH_DIVISOR = 3.0


def temperature_lr_schedule(schedule: str | None, lr_temperature: float | None) -> str:
    """The temperature group's schedule: `schedule` itself, or, when None, `const` if a separate
    `lr_temperature` is given (the AmorLIP and FastCLIP releases) and `same-as-lr` otherwise (open_clip)."""
    if schedule is None:
        return "const" if lr_temperature is not None else "same-as-lr"
    if schedule not in TEMPERATURE_LR_SCHEDULES:
        raise ValueError(
            f"optim.lr_temperature_schedule={schedule!r} is not one of: {', '.join(TEMPERATURE_LR_SCHEDULES)}"
        )
    return schedule


def param_group_lr(group: dict, step: int, optim: Any, total_steps: int, thresh_hit: bool) -> float:
    """The learning rate of one optimizer param group at `step` (a pure function of its arguments).

    Encoder groups: `base_lr` times optim.lr_scheduler's factor (`lr_factor`: warm-up, then cosine to min_lr,
    const, or const with a cooldown). The temperature group (`group == "temperature"`, logit_scale and
    logit_bias): `base_lr` constant (`const`, no warm-up, no decay) or times the same factor (`same-as-lr`), see
    `temperature_lr_schedule`; divided by 3 when `thresh_hit` (step_thresh).
    `optim` is the run's OptimConfig (warmup_steps, lr_scheduler and its keys, lr_temperature,
    lr_temperature_schedule).
    """
    lr = float(group["base_lr"])
    if group.get("group") != "temperature":
        return lr * lr_factor(step, optim, total_steps)
    if temperature_lr_schedule(optim.lr_temperature_schedule, optim.lr_temperature) == "same-as-lr":
        lr *= lr_factor(step, optim, total_steps)
    return lr / STEP_THRESH_DIVISOR if thresh_hit else lr


def watch_temperature(optim: Any, thresh_hit: bool) -> bool:
    """Whether the trainer must read the temperature after this step for step_thresh (a GPU sync): every step
    while step_thresh is on, except once a latching threshold has been reached."""
    return bool(optim.temperature_step_thresh) and not (optim.temperature_step_thresh_latch and thresh_hit)


def step_thresh_hit(optim: Any, temperature: float, thresh_hit: bool) -> bool:
    """step_thresh after a step, from the temperature 1/s it left: on while `temperature <= 0.03`.

    Re-checked every step (the releases: the rate goes back up if the temperature rises again), or, with
    `optim.temperature_step_thresh_latch`, kept on for the rest of the run once reached. Always False when
    `optim.temperature_step_thresh` is off. The re-checked flag is a function of the saved logit_scale, so a
    resume reproduces it; the latched one is history and travels in the checkpoint.
    """
    if not optim.temperature_step_thresh:
        return False
    if optim.temperature_step_thresh_latch and thresh_hit:
        return True
    return temperature <= STEP_THRESH_TEMPERATURE


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
