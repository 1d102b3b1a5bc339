"""Our objectives as a drop-in loss for any training loop (docs/api.md).

    loss_fn = amorlip.make_loss("amorlip", dataset_size=N, steps_per_epoch=N // B, total_steps=T,
                                embed_dim=d, local_batch_size=B)
    loss = loss_fn(image_features, text_features, logit_scale, logit_bias, indices=idx)

`make_loss` builds any registered objective (`amorlip.objectives.REGISTRY`) with its options dataclass and what it
must know about the run (an `ObjectiveContext`); `ContrastiveLoss` calls it with open_clip's loss signature
(`logit_scale` is the model's output, the scale s = exp(logit_scale parameter)), applies the shared temperature
scheme (`schedules.apply_temperature_scheme`) and adds the objective's extra loss, exactly as `amorlip train`
does (`step.objective_loss`). Each call in training mode is one optimizer step of the objective: its state
(u buffers, amortization nets, prototypes) updates, and `state_dict()` holds it for an exact resume.
Under torch.distributed every rank calls it with its own batch (a collective, as in the trainer).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import fields, is_dataclass
from typing import Any, Callable, get_args

import torch
from torch import nn

from amorlip import distributed, objectives
from amorlip.config.schema import Scheme
from amorlip.errors import ConfigError, one_of
from amorlip.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from amorlip.schedules import rho_at
from amorlip.step import forward_backward as _step_forward_backward
from amorlip.step import objective_loss

TEMPERATURE_SCHEMES = get_args(Scheme)

_CONTEXT_HELP = {
    "dataset_size": "the number of training samples (indices lie in [0, dataset_size))",
    "steps_per_epoch": "optimizer steps in one epoch (dataset_size // global batch with drop_last)",
    "total_steps": "optimizer steps of the whole run (schedules such as AmorLIP's beta and FastCLIP's gamma)",
    "embed_dim": "the model's feature dimension (open_clip.get_model_config(name)['embed_dim'])",
    "local_batch_size": "samples per step on this process (the global batch / the number of processes)",
}


class ContrastiveLoss(nn.Module):
    """One of our objectives as an open_clip-style loss; build it with `make_loss`.

    `forward(image_features, text_features, logit_scale, logit_bias=None, *, indices=None, step=None, epoch=None,
    output_dict=False, return_metrics=False)` returns the loss the trainer back-propagates (objective, temperature
    scheme, extra loss). `step`/`epoch` default to the loss's own counter (`self.step`, advanced by every call in
    training mode) and `step // steps_per_epoch`; the objective's epoch hook runs on the first call of each epoch
    (or call `on_epoch_start(epoch)` yourself before the epoch's first batch, as the trainer does).
    """

    def __init__(self, objective: Objective, scheme: str, rho: float, rho_final: float | None = None,
                 rho_final_fraction: float = 0.25) -> None:
        super().__init__()
        self.objective = objective
        self.scheme = scheme
        self.rho, self.rho_final, self.rho_final_fraction = rho, rho_final, rho_final_fraction
        self.step = 0
        """Optimizer steps taken so far (the next call's default `step`); saved by `state_dict`."""
        self._epoch_started = -1  # the last epoch whose on_epoch_start hook ran

    @property
    def name(self) -> str:
        """The objective's registry name (`clip`, `amorlip`, ...)."""
        return self.objective.name

    @property
    def needs_indices(self) -> bool:
        """Whether every call needs the samples' dataset indices (sogclr, fastclip: per-sample u buffers)."""
        return self.objective.needs_indices

    @property
    def model_overrides(self) -> dict[str, Any]:
        """Keyword arguments for open_clip's model constructor this objective expects (SigLIP: its initial
        logit scale and bias), e.g. `open_clip.create_model_and_transforms(name, **loss.model_overrides)`."""
        return dict(self.objective.model_overrides)

    def rho_at(self, step: int) -> float:
        """rho of the rescaled scheme at `step` (switched to rho_final for the last rho_final_fraction)."""
        return rho_at(step, self.objective.ctx.total_steps, self.rho, self.rho_final, self.rho_final_fraction)

    def on_epoch_start(self, epoch: int) -> None:
        """The objective's epoch hook (AmorLIP re-initialises its amortization nets); runs once per epoch."""
        if epoch != self._epoch_started:
            self.objective.on_epoch_start(epoch)
            self._epoch_started = epoch

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, *, indices: torch.Tensor | None = None,
                step: int | None = None, epoch: int | None = None, output_dict: bool = False,
                return_metrics: bool = False) -> Any:
        """Collective: every rank calls this together (the objective's collectives). The loss of one batch (this
        process's share). `output_dict`: `{"contrastive_loss": loss}` (open_clip's
        trainer sums the dict's values); `return_metrics`: also the objective's metrics, `(loss, metrics)`."""
        self._check_features(image_features, text_features, logit_scale)
        indices = self._indices(indices, image_features)
        step, epoch = self._begin(step, epoch)
        outputs = {"image_features": image_features, "text_features": text_features,
                   "logit_scale": logit_scale.reshape(()), "logit_bias": logit_bias}
        loss, result = objective_loss(self.objective, outputs, indices, step=step, epoch=epoch, scheme=self.scheme,
                                      rho=self.rho_at(step))  # the trainer's own function
        self._end(step)
        out: Any = {"contrastive_loss": loss} if output_dict else loss
        return (out, _metrics(result)) if return_metrics else out

    def forward_backward(self, model: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                         indices: torch.Tensor | None = None, *, accum_steps: int = 1, step: int | None = None,
                         epoch: int | None = None, autocast: Callable[[], Any] | None = None,
                         backward: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Collective: every rank calls this together, with the same `accum_steps`. One step's forward and backward
        through `model` (an open_clip model built with `output_dict=True`, or
        its DDP wrapper), plain or with cached-feature accumulation over `accum_steps` micro-batches (GradCache,
        `amorlip.step`): the objective runs once on the whole batch, so the gradients equal one big batch's.
        Leaves the gradients in the parameters (zero them before, step the optimizer after); returns
        `(loss, metrics)`. `autocast()` gives a fresh autocast context; `backward(loss)` back-propagates
        (e.g. `lambda l: scaler.scale(l).backward()`)."""
        from amorlip.models import unwrap  # open_clip, which the caller's model already loaded

        if getattr(unwrap(model), "output_dict", True) is False:
            raise ConfigError("forward_backward needs the model's outputs as a dict: build it with "
                              "open_clip.create_model_and_transforms(..., output_dict=True) or set model.output_dict = True")
        if accum_steps < 1 or images.shape[0] % accum_steps:
            raise ConfigError(f"accum_steps={accum_steps} must be a positive divisor of the batch of {images.shape[0]}")
        indices = self._indices(indices, images)
        step, epoch = self._begin(step, epoch)
        loss, result = _step_forward_backward(
            model, self.objective, images, texts, indices, step=step, epoch=epoch, scheme=self.scheme,
            rho=self.rho_at(step), autocast=autocast or _no_autocast, backward=backward or _plain_backward,
            accum_steps=accum_steps)
        self._end(step)
        return loss, _metrics(result)

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self.step, "epoch_started": self._epoch_started}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self._epoch_started = int(state["epoch_started"])

    # ------------------------------------------------------------------------------------------------

    def _begin(self, step: int | None, epoch: int | None) -> tuple[int, int]:
        step = self.step if step is None else int(step)
        epoch = step // self.objective.ctx.steps_per_epoch if epoch is None else int(epoch)
        if self.training:
            self.on_epoch_start(epoch)
        return step, epoch

    def _end(self, step: int) -> None:
        if self.training:
            self.step = step + 1

    def _indices(self, indices: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        b = features.shape[0]
        if indices is None:
            if self.needs_indices:
                raise ConfigError(
                    f"objective {self.name!r} keeps per-sample estimates and needs each sample's dataset index: "
                    f"call it with indices=<int64 tensor of shape ({b},), values in [0, "
                    f"{self.objective.ctx.dataset_size})> (your data must yield them), or pick {_index_free()}")
            return torch.arange(b, device=features.device)
        if not isinstance(indices, torch.Tensor) or indices.shape != (b,) or indices.is_floating_point():
            raise ConfigError(f"indices must be an integer tensor of shape ({b},), one dataset index per sample "
                              f"(got {_describe(indices)})")
        return indices.to(device=features.device, dtype=torch.long)

    def _check_features(self, x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor) -> None:
        d = self.objective.ctx.embed_dim
        for what, t in (("image_features", x), ("text_features", y)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != d:
                raise ConfigError(f"{what} must be a (batch, {d}) tensor of L2-normalised features (embed_dim={d} "
                                  f"given to make_loss); got {_describe(t)}")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"image_features and text_features must hold the same pairs (got {x.shape[0]} and "
                              f"{y.shape[0]} rows)")
        if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
            raise ConfigError("logit_scale must be the model's scalar scale s = exp(logit_scale), as open_clip's "
                              f"model returns it (got {_describe(logit_scale)})")


def make_loss(objective: str, *, dataset_size: int | None = None, steps_per_epoch: int | None = None,
              total_steps: int | None = None, embed_dim: int | None = None, local_batch_size: int | None = None,
              options: Any = None, temperature: str = "auto", rho: float = 6.5, rho_final: float | None = None,
              rho_final_fraction: float = 0.25, device: torch.device | str = "cpu") -> ContrastiveLoss:
    """Collective: every rank calls this together (AmorLIP broadcasts its nets' seed). Build objective `objective`
    (a name in `amorlip.objectives.REGISTRY`) as a `ContrastiveLoss`.

    The run's facts (`dataset_size`, `steps_per_epoch`, `total_steps`, `embed_dim`, `local_batch_size`) are all
    required. `options`: the objective's options dataclass (e.g. `AmorConfig(t_online=1)`, see
    `amorlip.objectives.options`) or a dict of its fields; None = the defaults (as `amorlip train`).
    `temperature`: the shared scheme, `plain` (L), `rescaled` (L / sg(s) + rho / s, with `rho`, switched to
    `rho_final` for the last `rho_final_fraction` of the steps) or `auto` (what the objective needs: rescaled for
    FastCLIP-v3, plain otherwise). The world size and rank come from torch.distributed when it is initialised.
    Raises `ConfigError` (a ValueError) naming the fix for an unknown objective, bad options or missing facts.
    """
    if objective not in objectives.REGISTRY:
        raise ConfigError(f"unknown objective {objective!r}; choose one of: {', '.join(objectives.REGISTRY)}")
    cls = objectives.get(objective)
    cfg = _options(cls, options)
    facts = {"dataset_size": dataset_size, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
             "embed_dim": embed_dim, "local_batch_size": local_batch_size}
    for key, value in facts.items():
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"make_loss({objective!r}) needs {key}=<positive int>, {_CONTEXT_HELP[key]} "
                              f"(got {value!r})")
    scheme = _scheme(cls, cfg, temperature)
    device = torch.device(device)
    ctx = ObjectiveContext(**facts, total_epochs=math.ceil(total_steps / steps_per_epoch),
                           world_size=distributed.world_size(), rank=distributed.rank(), device=device)
    return ContrastiveLoss(cls(cfg, ctx).to(device), scheme, rho, rho_final, rho_final_fraction)


def _options(cls: type[Objective], options: Any) -> Any:
    """The objective's options dataclass from None, an instance or a dict, validated."""
    config_cls = cls.Config
    if config_cls is None:
        if options:
            raise ConfigError(f"objective {cls.name!r} takes no options (got {options!r})")
        return None
    if options is None:
        cfg = config_cls()
    elif isinstance(options, dict):
        known = [f.name for f in fields(config_cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"{cls.name} has no option {', '.join(unknown)}; its options: {', '.join(known)}")
        cfg = config_cls(**options)
    elif is_dataclass(options) and isinstance(options, config_cls):
        cfg = options
    else:
        raise ConfigError(f"options of {cls.name!r} must be a {config_cls.__name__} or a dict of its fields "
                          f"(got {type(options).__name__})")
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"[{cls.section}] {e}") from None
    return cfg


def _scheme(cls: type[Objective], cfg: Any, temperature: str) -> str:
    if temperature not in TEMPERATURE_SCHEMES:
        raise ConfigError(f"temperature={temperature!r} is not one of: {', '.join(TEMPERATURE_SCHEMES)}")
    own = objectives.REGISTRY[cls.name].auto_temperature(cfg)
    if temperature == "auto":
        return own
    if own == "rescaled" and temperature != "rescaled":
        raise ConfigError(f"{cls.name} with these options learns its temperature through the rescaled scheme; "
                          "pass temperature='rescaled' (or 'auto'), or options that optimise the plain loss")
    return temperature


def _index_free() -> str:
    """The registered objectives that need no sample indices, as a message lists them."""
    return one_of([name for name in objectives.REGISTRY if not objectives.get(name).needs_indices])


def _metrics(result: ObjectiveOutput) -> dict[str, Any]:
    """The objective's metrics, floats or detached 0-d tensors (reading a tensor waits for the GPU: do it when
    you log)."""
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in result.metrics.items()}


def _describe(t: Any) -> str:
    return f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _no_autocast() -> Any:
    return contextlib.nullcontext()


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()
