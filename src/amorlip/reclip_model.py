"""RECLIP's model side: an open_clip model at another image size or text context, and its cost.

The vision tower's grid positional embedding resized (ViT and ModifiedResNet) with the optimizer's parameter
swapped; model state dicts saved at one image size loaded or exported at another; the text tower taking shorter
token sequences; the forward + backward FLOPs at a given size. What a phase change does, and why, is in the
docstring of `amorlip.reclip`, which drives these per phase (`ResolutionRun`) and re-exports them.
"""
from __future__ import annotations

import copy
import math
from types import MethodType, SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amorlip.errors import ConfigError

VIT_POS_KEY = "visual.positional_embedding"
RESNET_POS_KEY = "visual.attnpool.positional_embedding"
RESNET_STRIDE = 32
"""ModifiedResNet downsamples by 32 (stem 4, layers 2-4 by 2 each); its attention pool has (size/32)^2 + 1 positions."""


# ----------------------------------------------------------------------------------------------------
# The vision tower at another image size
# ----------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    from amorlip.models import unwrap

    return unwrap(model)


def _tower_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    raise ConfigError(
        f"resolution phases support open_clip's VisionTransformer and ModifiedResNet image towers; this model's "
        f"tower is {type(visual).__name__}; remove the resolution.phases setting for it"
    )


def _square(size: Any) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ConfigError(f"resolution phases need a square native image size, the model has {tuple(size)}")
        return int(size[0])
    return int(size)


def image_size_of(model: nn.Module) -> int:
    """The image side length the model's vision tower is set up for now."""
    return _square(_unwrap(model).visual.image_size)


def native_context_length_of(model: nn.Module) -> int:
    """The text tower's full context (length of its positional-embedding table)."""
    m = _unwrap(model)
    pos = getattr(m, "positional_embedding", None)
    if pos is None and hasattr(m, "text"):
        pos = getattr(m.text, "positional_embedding", None)
    if pos is None:
        return int(getattr(m, "context_length", 0) or getattr(getattr(m, "text", None), "context_length", 0))
    return int(pos.shape[0])


def _patch_size(visual: nn.Module) -> int:
    return _square(visual.patch_size)


def grid_for(model: nn.Module, image_size: int) -> int:
    """Side of the token grid at `image_size` (ViT: patches; ResNet: attention-pool positions). Checks divisibility."""
    visual = _unwrap(model).visual
    kind = _tower_kind(visual)
    step = _patch_size(visual) if kind == "vit" else RESNET_STRIDE
    if image_size % step:
        what = f"the ViT patch size {step}" if kind == "vit" else "32 (ResNet's total stride)"
        ok = sorted({max(step, image_size // step * step), (image_size // step + 1) * step})
        raise ConfigError(f"image size {image_size} is not divisible by {what}; use e.g. {' or '.join(map(str, ok))}")
    return image_size // step


def resize_grid_embedding(pos: torch.Tensor, new_grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """(extra + g*g, d) positional embedding -> (extra + new_grid^2, d): extra tokens kept, grid resized.

    open_clip's `resize_pos_embed` does the interpolation (bicubic, align_corners=False, antialiased, which
    low-pass filters when shrinking); it reads the target grid from `model.visual.grid_size`, so it gets a
    stand-in object carrying only that. Same grid -> the input tensor itself, unchanged.
    """
    from open_clip.model import resize_pos_embed

    n = pos.shape[0] - extra_tokens
    old_grid = math.isqrt(n)
    if old_grid * old_grid != n:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not {extra_tokens} + a square grid")
    if old_grid == new_grid:
        return pos
    if extra_tokens != 1:
        raise ValueError("open_clip's resize_pos_embed handles exactly one extra (class) token")
    state = {"visual.positional_embedding": pos.detach()}
    with torch.no_grad():
        resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=(new_grid, new_grid))))
    return state["visual.positional_embedding"].contiguous()


@torch.no_grad()
def set_image_size(model: nn.Module, image_size: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Adapt the vision tower to `image_size` px in place; returns (old, new) for each replaced parameter.

    The grid positional embedding is replaced by a new Parameter holding the interpolated value (pass the
    pairs to `swap_in_optimizer`). Same size: nothing changes, and the list is empty.
    """
    visual = _unwrap(model).visual
    kind = _tower_kind(visual)
    grid = grid_for(model, image_size)
    owner = visual if kind == "vit" else visual.attnpool
    old = owner.positional_embedding
    changed: list[tuple[nn.Parameter, nn.Parameter]] = []
    if math.isqrt(old.shape[0] - 1) != grid:
        new = nn.Parameter(resize_grid_embedding(old.detach(), grid).clone(), requires_grad=old.requires_grad)
        owner.positional_embedding = new
        changed.append((old, new))
    if kind == "vit":
        visual.image_size = (image_size, image_size)
        visual.grid_size = (grid, grid)
    else:
        visual.image_size = image_size
    if isinstance(getattr(visual, "preprocess_cfg", None), dict):
        visual.preprocess_cfg = {**visual.preprocess_cfg, "size": image_size}
    return changed


def swap_in_optimizer(optimizer: torch.optim.Optimizer | None,
                      pairs: Sequence[tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Put each new parameter in its old one's place (same group, same position) and drop the old one's state.

    AdamW then starts the new parameter's state (exp_avg, exp_avg_sq, step) afresh at its next step. Keeping
    the position keeps `optimizer.state_dict()` indices identical across phases, so checkpoints line up.
    """
    if optimizer is None:
        return
    for old, new in pairs:
        found = False
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    found = True
        if not found:
            raise ValueError("the resized parameter is not in the optimizer; build the optimizer from this model")
        optimizer.state.pop(old, None)


# ----------------------------------------------------------------------------------------------------
# State dicts saved at another image size
# ----------------------------------------------------------------------------------------------------


def image_size_in_state(state_dict: dict[str, torch.Tensor], model: nn.Module) -> int:
    """The image size a model state dict was saved at, read from its positional-embedding shape."""
    visual = _unwrap(model).visual
    kind = _tower_kind(visual)
    key = VIT_POS_KEY if kind == "vit" else RESNET_POS_KEY
    pos = state_dict.get(key, state_dict.get(f"module.{key}"))
    if pos is None:
        raise ConfigError(f"the checkpoint has no {key}; it does not hold this model ({type(visual).__name__})")
    grid = math.isqrt(pos.shape[0] - 1)
    return grid * (_patch_size(visual) if kind == "vit" else RESNET_STRIDE)


def _supports_resizing(model: nn.Module) -> bool:
    try:
        _tower_kind(_unwrap(model).visual)
        image_size_of(model)
    except (ConfigError, AttributeError):
        return False
    return True


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    """load_state_dict after adapting the model to the resolution the state was saved at (e.g. mid-RECLIP).

    Pass the optimizer built on `model` so that a replaced positional embedding is swapped in it too
    (then load the optimizer's state dict: its shapes match the checkpoint's phase). Models whose image
    tower RECLIP does not handle (timm, CoCa ...) are loaded as they are.
    """
    if _supports_resizing(model):
        swap_in_optimizer(optimizer, set_image_size(model, image_size_in_state(state_dict, model)))
    _unwrap(model).load_state_dict(state_dict)


def state_dict_at_image_size(state_dict: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                             image_size: int | None = None) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` with its grid positional embedding resized for `image_size` (default: native).

    Works from the open_clip config dict alone (no model built): export and `amorlip eval` use it to turn
    a checkpoint saved in a low-resolution phase into the full-resolution model. Unchanged keys are shared.
    """
    out = dict(state_dict)
    vision = model_cfg.get("vision_cfg", {})
    size = image_size or vision.get("image_size", 224)
    if vision.get("timm_model_name") or (isinstance(size, (tuple, list)) and size[0] != size[1]):
        return out  # towers RECLIP never resizes
    is_resnet = isinstance(vision.get("layers"), (list, tuple))
    key = RESNET_POS_KEY if is_resnet else VIT_POS_KEY
    step = RESNET_STRIDE if is_resnet else _square(vision.get("patch_size", 16))
    if key in out:
        out[key] = resize_grid_embedding(out[key], _square(size) // step)
    return out


# ----------------------------------------------------------------------------------------------------
# Text at a shorter context
# ----------------------------------------------------------------------------------------------------


def _clip_encode_text_any_length(self: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip `CLIP.encode_text` for any length L <= context: positions [:L] and the causal mask's [:L, :L]."""
    from open_clip.transformer import text_global_pool

    length, context = text.shape[-1], self.positional_embedding.shape[0]
    if length > context:
        raise ValueError(f"text of {length} tokens is longer than the model's context of {context}")
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:length].to(cast_dtype)
    mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
    x = self.transformer(x, attn_mask=mask)
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def _text_tower_embeds_any_length(self: nn.Module, text: torch.Tensor):
    """open_clip `TextTransformer._embeds`, with the plain causal mask also cut to the sequence length."""
    from open_clip.transformer import TextTransformer

    x, mask = TextTransformer._embeds(self, text)
    if mask is not None and mask.ndim == 2 and mask.shape[-1] != x.shape[1]:
        mask = mask[: x.shape[1], : x.shape[1]]
    return x, mask


def enable_short_text(model: nn.Module) -> None:
    """Let the text tower take token sequences shorter than its native context (idempotent).

    Installs a length-adaptive `encode_text` on this model instance (open_clip `CLIP`) or `_embeds` on its
    `TextTransformer` (`CustomTextCLIP`). Full-length input gives exactly open_clip's result.
    """
    import open_clip
    from open_clip.transformer import TextTransformer

    m = _unwrap(model)
    if isinstance(m, open_clip.CLIP):
        m.encode_text = MethodType(_clip_encode_text_any_length, m)
    elif isinstance(getattr(m, "text", None), TextTransformer):
        m.text._embeds = MethodType(_text_tower_embeds_any_length, m.text)
    else:
        raise ConfigError(
            f"a shorter text context needs open_clip's own text transformer; {type(m).__name__} has "
            f"{type(getattr(m, 'text', None)).__name__}: drop the third (context_length) value of resolution.phases"
        )


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers live on the meta device (no memory, no compute)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def flops_per_step(model: nn.Module, image_size: int, context_length: int, batch_size: int) -> float:
    """Forward + backward FLOPs of the model for one batch at `image_size` px and `context_length` tokens.

    Counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention: 2 FLOPs per
    multiply-add) on a meta-device copy, so it costs no memory or compute and leaves `model` untouched.
    The loss (a B x B similarity matrix, <1% here), the optimizer update and elementwise ops are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = _meta_copy(_unwrap(model))
    m.train()
    set_image_size(m, image_size)
    if context_length < native_context_length_of(m):
        enable_short_text(m)
    images = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    # argmax pooling must find the end-of-text token: any meta tensor will do (no values are computed)
    texts = torch.zeros(batch_size, context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        image_features = m.encode_image(images)
        text_features = m.encode_text(texts)
        (image_features.sum() + text_features.sum()).backward()
    return float(counter.get_total_flops())
