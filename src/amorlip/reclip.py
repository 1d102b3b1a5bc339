"""RECLIP: train with small images (and optionally short captions) for most steps, then at full resolution.

RECLIP (Li, Kim, Bhanu, Kuo 2023) pretrains CLIP on small images and finetunes briefly at high resolution;
the vision tower's cost falls with the number of patches (ViT) or pixels (ResNet), so most of training is
several times cheaper. It is independent of the loss: any objective runs with a resolution schedule.
A related recipe, CLIPA, also truncates captions in the cheap phase; `context_length` does that here.

The schedule is the `resolution` config section:

    resolution:
      phases: [[0.9, 64, 16], [0.1, 224]]   # [fraction of steps, image size(, text context length)]

What happens at a phase change (all in `ResolutionRun.enter`, called by the trainer):
* the model's positional embeddings are interpolated to the new grid -- ViT `visual.positional_embedding`
  (class token kept, the patch grid resized bicubic, antialiased when shrinking, with open_clip's
  `resize_pos_embed`) and ModifiedResNet `visual.attnpool.positional_embedding` likewise -- and the
  tower's `image_size` / `grid_size` attributes follow, so `encode_image` takes the new size;
* the resized tensor becomes a NEW `nn.Parameter` that takes the old one's place in the module and in the
  optimizer's param group (`swap_in_optimizer`); the old one's AdamW state (moments and step count) is
  dropped: moments of another grid mean nothing for the new one, so AdamW restarts that one tensor from
  zero moments at its next step. (Assigning `param.data` a new shape instead is unsafe: autograd caches
  the parameter's shape in its gradient accumulator for as long as any earlier graph is alive, e.g. the
  previous step's `loss`, and the next backward then fails with a shape mismatch.)
* the data transforms are rebuilt for the phase's size (open_clip's `image_transform_v2`) and captions are
  tokenized at the phase's context length (open_clip truncation keeps the end-of-text token last);
* the trainer restarts its data iterator at the current step with the new transforms (samples are a
  pure function of seed, epoch and index, so nothing is skipped or repeated), and re-wraps the model in
  DDP / torch.compile, whose buckets and graphs were built for the old shapes.

Text: the text positional embedding is never resized. `enable_short_text` lets the text tower take any
length <= its native context: it adds `positional_embedding[:L]` and uses the causal mask's top-left
L x L block (open_clip's `CLIP.encode_text` adds the full table, so it needs exactly the native length).
With the causal mask this is exact: a caption that fits in L tokens gets the same features at length L as
at the native length (the end-of-text token attends only to the tokens before it).

Checkpoints hold the model at the resolution it had when saved; `image_size_in_state` reads it back from
the positional-embedding shape, so resume, evaluation and export need no extra bookkeeping, and
`state_dict_at_image_size` turns any checkpoint into the native-resolution model (export, `amorlip eval`).

This module holds the schedule (`phases`, `phase_at`) and its driver (`ResolutionRun`); what is done to the model
(positional embeddings, state dicts, short text, FLOPs) is `amorlip.reclip_model`, re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from amorlip.errors import ConfigError
from amorlip.reclip_model import (
    RESNET_POS_KEY,
    RESNET_STRIDE,
    VIT_POS_KEY,
    enable_short_text,
    flops_per_step,
    grid_for,
    image_size_in_state,
    image_size_of,
    load_model_state,
    native_context_length_of,
    resize_grid_embedding,
    set_image_size,
    state_dict_at_image_size,
    swap_in_optimizer,
)
from amorlip.reclip_options import ResolutionConfig, parse_phase_specs

__all__ = [  # the schedule and its driver, the config section (torch-free, amorlip.reclip_options), the model side
    "Phase", "phases", "phase_at", "ResolutionRun", "ContextTokenizer", "phase_transforms",
    "ResolutionConfig", "parse_phase_specs",
    "VIT_POS_KEY", "RESNET_POS_KEY", "RESNET_STRIDE", "enable_short_text", "flops_per_step", "grid_for",
    "image_size_in_state", "image_size_of", "load_model_state", "native_context_length_of", "resize_grid_embedding",
    "set_image_size", "state_dict_at_image_size", "swap_in_optimizer",
]


# ----------------------------------------------------------------------------------------------------
# The schedule (pure functions of the step; its config section: amorlip.reclip_options)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One resolution phase: steps [start_step, end_step) at `image_size` px and `context_length` tokens.

    `image_size` / `context_length` are None where they mean "the model's native value" and the native
    value was not passed to `phases` / `phase_at`.
    """

    index: int
    start_step: int
    end_step: int
    image_size: int | None
    context_length: int | None = None

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


def _specs_of(cfg: ResolutionConfig | Sequence[Any] | None) -> list[tuple[float, int, int | None]]:
    if cfg is None:
        return []
    return parse_phase_specs(cfg.phases if isinstance(cfg, ResolutionConfig) else cfg)


def phases(
    cfg: ResolutionConfig | Sequence[Any] | None,
    total_steps: int,
    native_image_size: int | None = None,
    native_context_length: int | None = None,
) -> list[Phase]:
    """The phases of a run of `total_steps` steps, in order, covering [0, total_steps) without gaps.

    Phase i ends at step round(total_steps * (f_1 + ... + f_i)) (the last at total_steps). No schedule
    (None or empty) gives one phase at the native sizes. A phase left with no step is an error.
    Unset context lengths are `native_context_length` (None if that is not given).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    specs = _specs_of(cfg)
    if not specs:
        return [Phase(0, 0, total_steps, native_image_size, native_context_length)]
    out: list[Phase] = []
    cum, start = 0.0, 0
    for i, (frac, size, ctx) in enumerate(specs):
        cum += frac
        end = total_steps if i == len(specs) - 1 else min(total_steps, round(total_steps * cum))
        if end <= start:
            raise ConfigError(
                f"resolution phase {i + 1} ({frac:g} of {total_steps} steps) gets no step; "
                "train for more steps or give that phase a larger fraction"
            )
        out.append(Phase(i, start, end, size, ctx if ctx is not None else native_context_length))
        start = end
    return out


def phase_at(
    cfg: ResolutionConfig | Sequence[Any] | None,
    step: int,
    total_steps: int,
    native_image_size: int | None = None,
    native_context_length: int | None = None,
) -> Phase:
    """The phase that global step `step` (0-based) trains in; `step == total_steps` gives the last phase."""
    if not 0 <= step <= total_steps:
        raise ValueError(f"step {step} is outside [0, {total_steps}]")
    all_phases = phases(cfg, total_steps, native_image_size, native_context_length)
    for phase in all_phases:
        if phase.start_step <= step < phase.end_step:
            return phase
    return all_phases[-1]


# ----------------------------------------------------------------------------------------------------
# A phase's tokenizer and image transforms
# ----------------------------------------------------------------------------------------------------


class ContextTokenizer:
    """An open_clip tokenizer that pads/truncates to `context_length` tokens.

    open_clip's SimpleTokenizer truncates to the first `context_length - 1` tokens and puts the end-of-text
    token last, so the argmax (= end-of-text) pooling still finds it.
    """

    def __init__(self, tokenizer: Callable, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        return self.tokenizer(texts, context_length=context_length or self.context_length)


def phase_transforms(model: nn.Module, image_size: int, aug_cfg: dict | None = None) -> tuple[Callable, Callable]:
    """(train, eval) image transforms at `image_size`: the model's preprocessing config with another size, and the
    run's augmentation (`aug_cfg`, open_clip's) in the train transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from amorlip.models import unwrap

    base = dict(getattr(unwrap(model).visual, "preprocess_cfg", None) or {})
    base = {k: v for k, v in base.items() if k in PreprocessCfg.__dataclass_fields__}
    cfg = PreprocessCfg(**{**base, "size": image_size})
    from amorlip.model_options import used_aug_items

    with used_aug_items():
        return image_transform_v2(cfg, is_train=True, aug_cfg=aug_cfg), image_transform_v2(cfg, is_train=False)


# ----------------------------------------------------------------------------------------------------
# The run-time side, used by the trainer
# ----------------------------------------------------------------------------------------------------


class ResolutionRun:
    """Keeps the model, optimizer and data transforms in step with the phase of the current step.

    Trainer protocol: after building the model (and loading a checkpoint with `load_model_state`),
    call `enter(step, model, optimizer)` before iterating the data; it returns True when parameter shapes
    changed (re-wrap DDP / compile). Break out of the data iterator when `is_boundary(step)` after a step,
    and call `enter` again. Use `train_transform`, `eval_transform` and `tokenizer` of the current phase.
    """

    def __init__(self, cfg: ResolutionConfig | None, model: nn.Module, total_steps: int,
                 train_transform: Callable, eval_transform: Callable, tokenizer: Callable,
                 aug_cfg: dict | None = None) -> None:
        self.enabled, self.aug_cfg = bool(cfg is not None and cfg.phases), aug_cfg
        self.total_steps = total_steps
        # without a schedule the model is never inspected (any open_clip tower works as before)
        self.native_image_size = image_size_of(model) if self.enabled else None
        self.native_context_length = native_context_length_of(model) if self.enabled else None
        self.phases = phases(cfg, total_steps, self.native_image_size, self.native_context_length)
        self._native = (train_transform, eval_transform, tokenizer)
        self.current: Phase | None = None
        self.train_transform, self.eval_transform, self.tokenizer = self._native
        if self.enabled:
            self._check(model)

    def _check(self, model: nn.Module) -> None:
        for p in self.phases:
            grid_for(model, p.image_size)  # divisibility, with a clear error
            if p.context_length > self.native_context_length:
                raise ConfigError(
                    f"resolution phase {p.index + 1}: context_length {p.context_length} exceeds the model's "
                    f"{self.native_context_length} tokens; use at most {self.native_context_length}"
                )
        last = self.phases[-1]
        if last.image_size != self.native_image_size or last.context_length != self.native_context_length:
            raise ConfigError(
                f"the last resolution phase must be at the model's native {self.native_image_size} px and "
                f"{self.native_context_length} tokens (got {last.image_size} px, {last.context_length} tokens): "
                "the final evaluation, the export and the model config all use the native size; "
                "to finish at another size, use a model config with that image_size or pass --model.force-image-size SIZE"
            )
        if any(p.context_length < self.native_context_length for p in self.phases):
            enable_short_text(model)

    def phase(self, step: int) -> Phase:
        for p in self.phases:
            if p.start_step <= step < p.end_step:
                return p
        return self.phases[-1]

    def is_boundary(self, step: int) -> bool:
        """True when `step` (the next step to run) starts a new phase: the data iterator must restart."""
        return self.enabled and 0 < step < self.total_steps and any(p.start_step == step for p in self.phases)

    def enter(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Set model, optimizer state and data transforms up for the phase of `step`; True if shapes changed."""
        if not self.enabled:
            return False
        phase = self.phase(step)
        if phase == self.current:
            return False
        changed = set_image_size(model, phase.image_size)
        swap_in_optimizer(optimizer, changed)
        self.current = phase
        if phase.image_size == self.native_image_size:
            self.train_transform, self.eval_transform = self._native[:2]
        else:
            self.train_transform, self.eval_transform = phase_transforms(model, phase.image_size, self.aug_cfg)
        native_tok = self._native[2]
        self.tokenizer = (native_tok if phase.context_length == self.native_context_length
                          else ContextTokenizer(native_tok, phase.context_length))
        return bool(changed)

    def describe(self, phase: Phase | None = None) -> str:
        p = phase or self.current
        if p is None:
            return "native resolution"
        return (f"resolution phase {p.index + 1}/{len(self.phases)}: steps {p.start_step}-{p.end_step - 1} at "
                f"{p.image_size} px, {p.context_length} text tokens")

    def log_values(self) -> dict[str, float]:
        if not self.enabled or self.current is None:
            return {}
        return {"image_size": float(self.current.image_size), "context_length": float(self.current.context_length)}
