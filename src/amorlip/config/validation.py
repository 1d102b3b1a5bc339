"""Validation of a run config, before anything is built or written.

`validate` is pure (no torch, no machine state): each section's own rules (its `validate()`), then the rules
across sections (`check_across`). `check_machine` checks what depends on the machine: a CUDA device, the run
folder's place on disk, W&B, the initial weights and the validation data paths; it imports torch only for the
checks that need it. `amorlip.config.build.build_config` runs both. Every message names the key, the rule and,
in parentheses, the fix: the CLI prints it as one line (`amorlip train: error: ...`) and exits 2.
"""
from __future__ import annotations

import os
from pathlib import Path

from amorlip.config.schema import CORE_SECTIONS
from amorlip.config.sections import Config
from amorlip.errors import ConfigError
from amorlip.objectives.registry import REGISTRY


def validate(cfg: Config) -> None:
    """Each section's own rules (objective and feature sections' ValueErrors shown as `[section] message`), then
    the rules across sections."""
    if cfg.objective not in REGISTRY:
        raise ConfigError(f"unknown objective {cfg.objective!r}; choose one of: {', '.join(REGISTRY)}")
    for name in CORE_SECTIONS:
        getattr(cfg, name).validate()
    for name, value in cfg.sections.items():
        try:
            value.validate()
        except ValueError as e:
            raise ConfigError(f"[{name}] {e}") from None
    check_across(cfg)


def check_across(cfg: Config) -> None:
    """Rules that join sections: the objective's own (its registry entry's `check`, e.g. FastCLIP-v3 x the
    temperature scheme), tower locks x a RECLIP schedule, and the learning-rate cooldown x the run's length."""
    entry = REGISTRY[cfg.objective]
    options = entry.options_of(cfg)
    if entry.check is not None and options is not None:
        entry.check(options, cfg)
    resolution = cfg.sections.get("resolution")
    if (cfg.model.lock_image or cfg.model.lock_text) and getattr(resolution, "enabled", False):
        raise ConfigError(
            "model.lock_image / lock_text with a RECLIP resolution schedule: the phases resize the towers' positional "
            "embeddings, frozen ones included (drop --resolution.phases, or the lock)"
        )
    optim, steps = cfg.optim, cfg.train.steps
    if optim.lr_scheduler == "const-cooldown" and steps is not None \
            and optim.lr_cooldown_steps > steps - optim.warmup_steps:
        raise ConfigError(
            f"optim.lr_cooldown_steps={optim.lr_cooldown_steps} is longer than the run after its warm-up "
            f"(train.steps={steps} less optim.warmup_steps={optim.warmup_steps}; pass --optim.lr-cooldown-steps "
            f"{max(1, steps - optim.warmup_steps)} or fewer)"
        )


def check_machine(cfg: Config) -> None:
    """What this machine must offer the run: the device and precision, a writable run folder, W&B when asked,
    the initial weights, and validation data laid out as it should be."""
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device=cuda but no CUDA device is visible (pass --train.device cpu, or --train.device auto "
                "to use a GPU only when there is one)"
            )
    _check_output_dir(Path(cfg.train.output_dir))
    if cfg.model.precision == "fp16":
        import torch

        if cfg.train.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError(
                "model.precision=fp16 needs a CUDA device (fp16 autocast with a gradient scaler) and this run trains "
                "on the CPU (pass --model.precision bf16 for bf16 autocast on the CPU, or fp32)"
            )
    if cfg.model.pretrained and cfg.train.resume in (None, "auto"):  # a resumed run loads the checkpoint instead
        from amorlip import objectives
        from amorlip.model_options import model_kwargs
        from amorlip.models import check_pretrained

        check_pretrained(cfg.model.name, cfg.model.pretrained, **model_kwargs(cfg.model),
                         **objectives.get(cfg.objective).model_overrides)
    if cfg.train.wandb:
        from amorlip.logging_wandb import require_wandb

        require_wandb()
    if cfg.data.val_path or cfg.eval.imagenet_root:
        from amorlip.data.imagefolder import check_paths
        from amorlip.data.types import DataError

        try:
            check_paths(cfg.data.val_path, cfg.eval.imagenet_root, cfg.data.csv_img_key, cfg.data.csv_caption_key,
                        cfg.data.csv_separator)
        except DataError as e:
            raise ConfigError(str(e)) from None


def _check_output_dir(out_dir: Path) -> None:
    """train.output_dir is a folder, or can be made as one where this process may write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir={str(out_dir)!r} is a file, not a folder (pass another --train.output-dir)")
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(
            f"train.output_dir={str(out_dir)!r} lies under {str(existing)!r}, which is a file "
            "(pass another --train.output-dir)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"train.output_dir={str(out_dir)!r}: cannot write in {str(existing)!r} (pass a writable --train.output-dir)"
        )
