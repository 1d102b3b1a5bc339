"""The objective contract and the math every objective shares.

An objective is an `nn.Module` that turns one batch's normalised features into a loss:

    out = objective(image_features, text_features, scale, bias, indices, step=step, epoch=epoch)

* `image_features`, `text_features`: this rank's L2-normalised features, shape (B_local, d).
* `scale`: the inverse temperature s = exp(logit_scale) (a scalar tensor with grad).
* `bias`: the model's logit bias (SigLIP) or None.
* `indices`: the samples' stable dataset indices, int64 (B_local,), for per-sample methods.
* `step` (global optimizer step, 0-based) and `epoch` (0-based).

It returns an `ObjectiveOutput`: `loss` (the objective L before the shared temperature scheme is
applied by the trainer), named `metrics` (floats or 0-d tensors, logged each step) and an optional
`extra_loss` added after the temperature scheme (FastCLIP's `mean(log u) / (2 s)`).

An objective may own auxiliary nets, buffers and optimizers. Everything it keeps must come back
through `state_dict()` (parameters and buffers as usual; optimizer states and Python-side counters
through `get_extra_state` / `set_extra_state`), so that a checkpoint resumes it exactly.
`on_epoch_start(epoch)` is called by the trainer before the first step of every epoch (also on resume
at an epoch boundary only; a mid-epoch resume restores state instead).

Collectives must go through `amorlip.distributed` helpers (they are counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from amorlip.objectives.registry import entry_for_class


@dataclass
class ObjectiveContext:
    """What an objective may know about the run when it is built."""

    dataset_size: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    embed_dim: int
    local_batch_size: int
    world_size: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    extra_loss: torch.Tensor | None = None


class Objective(nn.Module):
    """Base class. A registered subclass gets `name`, `section` and `Config` from its line in
    `amorlip.objectives.registry` (matched by "module:Class"); an unregistered subclass keeps its parent's."""

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    """Config section holding this objective's options (e.g. `amor` -> `--amor.dim-factor`)."""
    Config: ClassVar[type | None] = None
    """Dataclass of options; an instance is passed to `__init__` as `cfg`."""
    model_overrides: ClassVar[dict[str, Any]] = {}
    """Keyword arguments for open_clip's model constructor (e.g. SigLIP's init_logit_bias)."""
    needs_indices: ClassVar[bool] = False
    partition_without_positive: ClassVar[bool] = False
    """Its own full-data loss sums the partition functions over the negatives only (SogCLR's and FastCLIP's GCL):
    the gradient-fidelity diagnostics compare it with that loss instead of InfoNCE."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        entry = entry_for_class(f"{cls.__module__}:{cls.__qualname__}")
        if entry is not None:
            cls.name, cls.section, cls.Config = entry.name, entry.section, entry.options

    def __init__(self, cfg: Any, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        indices: torch.Tensor,
        *,
        step: int,
        epoch: int,
    ) -> ObjectiveOutput:
        """Collective: every rank calls this together at every step (an objective's collectives go through
        amorlip.distributed). This process's share of the batch's loss, with metrics for the log."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Hook run before the first step of every epoch."""

    @torch.no_grad()
    def estimate_log_normalizers(
        self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The objective's own estimate of each sample's log partition function, if it keeps one.

        Returns {"image": (B,), "text": (B,)} in ONE convention shared by all objectives:
        `log Z_img[i] ~= log( (1/N) sum_j exp(s x_i.y_j) )` over the N samples of the dataset (positive
        j = i included, no logit bias), and symmetrically `log Z_txt[j] ~= log((1/N) sum_i exp(s x_i.y_j))`.
        Objectives that track another quantity (e.g. SogCLR's u over negatives, shifted by the positive)
        convert to this convention here. `indices` are the samples' dataset indices (for per-sample buffers).
        Used by the normalizer diagnostics; None when the objective keeps no estimate (CLIP, SigLIP).
        """
        return None


def similarity_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """s * X @ Y^T (+ b): row i = image i against every text."""
    logits = scale * image_features @ text_features.T
    if bias is not None:
        logits = logits + bias
    return logits
