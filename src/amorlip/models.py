"""open_clip model construction (any config name, plus tiny CPU configs) and parameter groups."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
"""Registered tiny configs that train quickly on a CPU (micro-vit is for tests)."""

_registered = False


def register_tiny_configs() -> None:
    """Make the tiny configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def model_names() -> list[str]:
    register_tiny_configs()
    return open_clip.list_models()


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of `name` (clear error for unknown names)."""
    register_tiny_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown model {name!r}: use an open_clip config name (e.g. RN50, ViT-B-32) or one of {TINY_MODELS}"
        )
    return cfg


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for pretrained=None, which is
    what pretraining from scratch always asks for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    notice, root = _DropRandomInitNotice(), logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def create_model(name: str, device: torch.device | str = "cpu", **overrides: Any):
    """Build `name` with random weights (pretrained=None). Returns (model, train_transform, eval_transform, tokenizer).

    `overrides` go to open_clip's constructor (e.g. init_logit_scale, init_logit_bias, force_image_size).
    """
    model_config(name)
    with _quiet_random_init():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, device=device, **overrides
        )
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def is_temperature_param(name: str) -> bool:
    return name.endswith("logit_scale") or name.endswith("logit_bias")


def param_groups(model: nn.Module, weight_decay: float, lr: float, lr_temperature: float | None) -> list[dict]:
    """Three groups: decayed weights; gains/biases/embeddings without decay; temperature (+bias) with own lr.

    Like open_clip, parameters with fewer than 2 dims, and norms, biases and embeddings, get no weight decay.
    """
    decay, no_decay, temp = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_temperature_param(name):
            temp.append(p)
        elif p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "embedding" in name or "positional" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "group": "no_decay"},
    ]
    if temp:
        tlr = lr if lr_temperature is None else lr_temperature
        groups.append({"params": temp, "weight_decay": 0.0, "lr": tlr, "base_lr": tlr, "group": "temperature"})
    return groups


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """Clamp logit_scale to [0, ln 100] after every step (CLIP)."""
    m = model.module if hasattr(model, "module") else model
    if hasattr(m, "logit_scale"):
        m.logit_scale.clamp_(0, float(torch.log(torch.tensor(max_scale))))


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip model under DDP / torch.compile wrappers."""
    m = model
    while True:
        if hasattr(m, "module"):
            m = m.module
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        else:
            return m


