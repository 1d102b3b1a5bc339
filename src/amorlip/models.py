"""open_clip model construction (any config name, plus tiny CPU configs), initial weights, LiT-style tower locking,
gradient checkpointing, precision, and parameter groups."""
from __future__ import annotations

import contextlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, get_args

import open_clip
import torch
from torch import nn

from amorlip import hf_cache, model_catalog
from amorlip.config.schema import Precision
from amorlip.errors import ConfigError
from amorlip.model_catalog import (MODEL_CONFIG_DIR, TINY_MODELS, check_lock_options,  # noqa: F401 - re-exported
                                   lock_groups, tower_kinds)

"""Registered tiny configs that train quickly on a CPU (micro-vit is for tests)."""

_registered = False


def register_tiny_configs() -> None:
    """Make the tiny configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def model_names() -> list[str]:
    """open_clip's model config names, the tiny ones included (as `amorlip.model_catalog.model_names` lists them
    without importing torch; with open_clip imported, its registry counts too)."""
    register_tiny_configs()
    return model_catalog.model_names()


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of `name` (clear error for unknown names)."""
    register_tiny_configs()
    return model_catalog.model_config(name)


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

    `overrides` go to open_clip's constructor (e.g. init_logit_scale, init_logit_bias, force_image_size, aug_cfg).
    An `hf-hub:ORG/REPO` name is read from the local Hugging Face cache, with its weights (`amorlip.hf_cache`).
    """
    model_config(name)
    from amorlip.model_options import used_aug_items

    with _quiet_random_init(), hf_cache.offline(), used_aug_items():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            hf_cache.open_clip_name(name), pretrained=None, device=device, **overrides
        )
        tokenizer = open_clip.get_tokenizer(hf_cache.open_clip_name(name))
    return model, preprocess_train, preprocess_val, tokenizer


# ----------------------------------------------------------------------------------------------------
# Precision: model.precision -> autocast dtype and weight dtype

PRECISIONS = get_args(Precision)
"""fp32: no autocast. bf16 = amp_bf16 (open_clip's name): fp32 weights, bf16 autocast (CUDA or CPU). fp16: fp32
weights, fp16 autocast with a gradient scaler (CUDA only). pure_bf16: weights, activations and optimizer state all
in bf16, no autocast (open_clip's pure_bf16: half the memory, coarser updates)."""


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "amp_bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def weight_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "pure_bf16" else torch.float32


def autocast(precision: str, device: torch.device):
    """The autocast context of `precision` on `device` (a null context for fp32 and pure_bf16)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("model.precision=fp16 needs a CUDA device (pass --model.precision bf16 for bf16 autocast on "
                          "the CPU, or fp32)")
    return torch.autocast(device.type, dtype=dtype)


def describe_precision(precision: str, device_type: str) -> dict[str, Any]:
    """What `precision` means on `device_type`, as recorded in summary.json and the W&B config."""
    dtype = autocast_dtype(precision)
    return {
        "precision": precision,
        "device": device_type,
        "weights": str(weight_dtype(precision)).removeprefix("torch."),
        "autocast": f"{device_type} {str(dtype).removeprefix('torch.')}" if dtype is not None else None,
        "grad_scaler": precision == "fp16" and device_type == "cuda",
    }


def _cast_inputs_to(dtype: torch.dtype):
    """A forward pre-hook casting floating inputs (the images) to the tower's weight dtype (pure_bf16)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return hook


# ----------------------------------------------------------------------------------------------------
# Initial weights (model.pretrained): a file, an `amorlip export` folder, or a cached open_clip tag

HF_WEIGHTS = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"


def clip_cache_dir() -> Path:
    """Where open_clip keeps weights downloaded from a URL (its download_pretrained_from_url default)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def _cached_tag_file(name: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """The local file of open_clip's pretrained `name`/`tag`, looked up in the Hugging Face and open_clip caches
    only (never downloaded); a ConfigError naming what was looked for when it is not there."""
    looked: list[str] = []
    if tag_cfg.get("file"):
        path = Path(tag_cfg["file"])
        if path.is_file():
            return path
        looked.append(str(path))
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS
        candidates = [HF_SAFE_WEIGHTS] if filename == HF_WEIGHTS else (
            [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
        try:
            from huggingface_hub import try_to_load_from_cache
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:
            try_to_load_from_cache, HF_HUB_CACHE = None, "the Hugging Face cache (huggingface_hub not installed)"
        for candidate in [*candidates, filename]:
            found = try_to_load_from_cache(repo, candidate) if try_to_load_from_cache else None
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        looked.append(f"{repo}/{' or '.join([*candidates, filename])} in {HF_HUB_CACHE}")
    url = tag_cfg.get("url", "")
    if url:
        path = clip_cache_dir() / os.path.basename(url)
        if path.is_file():
            return path
        looked.append(str(path))
    raise ConfigError(
        f"model.pretrained={tag!r}: open_clip's {name} weights {tag!r} are not in the local cache (looked for "
        f"{'; '.join(looked) or 'nothing: the tag names no file'}); amorlip never downloads weights at run time "
        f"(fetch them once where there is network, e.g. python -c \"import open_clip; open_clip.create_model("
        f"'{name}', pretrained='{tag}')\", or pass a checkpoint file to --model.pretrained)"
    )


def resolve_pretrained(name: str, value: str) -> tuple[Path, dict[str, Any] | None]:
    """`model.pretrained` -> (the weights file, open_clip's tag config when `value` is a pretrained tag).

    A file is used as it is; a folder must hold `NAME.pt` (what `amorlip export` writes) or a single .pt file;
    anything else must be an open_clip pretrained tag of `name` whose file is already cached.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        own = path / f"{name}.pt"
        found = [own] if own.is_file() else sorted(path.glob("*.pt"))
        if len(found) == 1:
            return found[0], None
        listed = ", ".join(p.name for p in found[:4]) or "none"
        raise ConfigError(
            f"model.pretrained={value!r} is a folder without {name}.pt (its .pt files: {listed}; pass one of them, "
            "or the folder `amorlip export` wrote for this model)"
        )
    if path.is_file():
        return path, None
    register_tiny_configs()
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = value.lower()
    if tag in tags:
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        return _cached_tag_file(name, tag, tag_cfg), tag_cfg
    known = f"{name}'s pretrained tags: {', '.join(tags)}" if tags else f"open_clip has no pretrained tags for {name}"
    raise ConfigError(
        f"model.pretrained={value!r} is neither a file, nor a folder, nor an open_clip pretrained tag ({known}; "
        "pass a checkpoint file, an `amorlip export` folder, or one of the tags)"
    )


def read_weights(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict in `path`: open_clip's {'state_dict': ...} (what `amorlip export` writes), a bare state
    dict, an amorlip training checkpoint ({'model': ...}; its optimizer state is not used), or .safetensors.
    With `mmap` the tensors are mapped, not read (enough to check keys and shapes)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ck: Any = load_file(str(path), device="cpu")
        else:
            ck = None
            for weights_only, mapped in ((True, mmap), (True, False), (False, False)):
                try:  # (a training checkpoint also holds RNG states; a legacy file cannot be mapped)
                    ck = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mapped)
                    break
                except Exception:  # noqa: BLE001 - the last try reports
                    if not weights_only:
                        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise ConfigError(f"model.pretrained: could not read {path} ({' '.join(str(e).split())[:200]}) "
                          "(pass an open_clip checkpoint, a state dict, or an `amorlip export` .pt)") from None
    if isinstance(ck, torch.jit.ScriptModule):
        ck = ck.state_dict()
    if isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict):
        ck = ck["state_dict"]
    elif isinstance(ck, dict) and isinstance(ck.get("model"), dict) and "optimizer" in ck:
        ck = ck["model"]
    if not isinstance(ck, dict) or not ck or not all(isinstance(v, torch.Tensor) for v in ck.values()):
        raise ConfigError(f"model.pretrained: {path} holds no state dict of tensors (pass an open_clip checkpoint, "
                          "a state dict, or an `amorlip export` .pt)")
    if all(k.startswith("module.") for k in ck):
        ck = {k[len("module."):]: v for k, v in ck.items()}
    return dict(ck)


def _fit_to_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's own adjustments before loading (see open_clip.load_checkpoint): third-party layouts, scalar vs
    1-d logit_scale/bias, positional embeddings at another image size or context length. A SigLIP-style model
    loading weights without logit_bias keeps its own initial bias (the objective's choice)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if isinstance(own, torch.Tensor) and key in state and state[key].ndim != own.ndim:
            state[key] = state[key].reshape(own.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
        state["logit_bias"] = model.logit_bias.detach().clone()
    state.pop("text.transformer.embeddings.position_ids", None)
    for resize in (resize_pos_embed, resize_text_pos_embed):
        try:
            resize(state, model)
        except (AssertionError, RuntimeError, ValueError, KeyError):
            pass  # another width: not a resolution change; the shape check names it
    return state


def _sample(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_pretrained(model: nn.Module, name: str, value: str, check_only: bool = False) -> Path:
    """Load `model.pretrained` (see `resolve_pretrained`) into `model`, strictly; returns the file it read.

    Keys or shapes that do not fit are one ConfigError naming a few of them. `check_only`: check, load nothing.
    """
    path, _ = resolve_pretrained(name, value)
    raw = read_weights(path, mmap=check_only)
    state = _fit_to_model(model, raw)
    own = model.state_dict()
    for key in own:  # batch-norm step counters: absent from frozen (LiT) towers' weights, unused in training
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing ({_sample(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_sample(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({_sample(shapes, 2)})")
        saved_name = _exported_name(path)
        hint = (f"these weights are {saved_name}'s: pass --model.name {saved_name}" if saved_name and saved_name != name
                else "pass the --model.name the weights were trained with")
        raise ConfigError(f"model.pretrained={value!r} ({path}) does not fit model.name={name}: {'; '.join(parts)} "
                          f"({hint})")
    if not check_only:
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
    return path


def check_pretrained(name: str, value: str, **overrides: Any) -> None:
    """ConfigError unless `model.pretrained` resolves to weights that fit `name` (built with `overrides`, e.g. an
    objective's logit_bias): checked on a model without storage (meta device) and mapped weights, so cheaply."""
    with torch.device("meta"):
        model, *_ = create_model(name, device="meta", **overrides)
    load_pretrained(model, name, value, check_only=True)


def _exported_name(path: Path) -> str | None:
    """The model name an `amorlip export` file records (its 'name' key), if any."""
    try:
        ck = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - not an export (or not loadable this way): no name to tell
        return None
    return ck.get("name") if isinstance(ck, dict) and isinstance(ck.get("name"), str) else None


# ----------------------------------------------------------------------------------------------------
# LiT-style locking (model.lock_image / lock_text; what each tower supports: amorlip.model_catalog)


def lock_towers(model: nn.Module, mcfg: Any) -> None:
    """Freeze the towers model.lock_image / lock_text ask for (open_clip's lock_image_tower / lock_text_tower):
    their parameters get requires_grad False, so `param_groups` leaves them out of the optimizer. The temperature
    (logit_scale, logit_bias) is in neither tower and stays trainable."""
    if mcfg.lock_image:
        model.lock_image_tower(unlocked_groups=mcfg.lock_image_unlocked_groups,
                               freeze_bn_stats=mcfg.lock_image_freeze_bn_stats)
    if mcfg.lock_text:
        model.lock_text_tower(unlocked_layers=mcfg.lock_text_unlocked_layers,
                              freeze_layer_norm=mcfg.lock_text_freeze_layer_norm)


# ----------------------------------------------------------------------------------------------------
# The model of a run


def build_model(mcfg: Any, device: torch.device | str = "cpu", load_pretrained_weights: bool = True,
                aug: Any = None, **overrides: Any):
    """The model a run trains, from its ModelConfig (its forcing and preprocessing options, then a pretrained
    tag's, then `overrides`) and `aug` section (the training transform's augmentation): built (create_model),
    initial weights (model.pretrained, unless `load_pretrained_weights` is False: a resumed run takes its weights
    from the checkpoint), towers locked, gradient checkpointing, weight dtype. Returns (model, train_transform,
    eval_transform, tokenizer).
    """
    from amorlip.model_options import aug_cfg, model_kwargs, tag_preprocess

    overrides = {**model_kwargs(mcfg), **overrides}  # the user's options win over the tag's
    if aug_cfg(aug) is not None:
        overrides["aug_cfg"] = aug_cfg(aug)
    tag_cfg = None
    if mcfg.pretrained and load_pretrained_weights:
        _, tag_cfg = resolve_pretrained(mcfg.name, mcfg.pretrained)
    if tag_cfg:  # an open_clip tag: its activation and preprocessing, as open_clip would build it
        for key, value in tag_preprocess(tag_cfg).items():
            overrides.setdefault(key, value)
    model, train_transform, eval_transform, tokenizer = create_model(mcfg.name, device=device, **overrides)
    if mcfg.pretrained and load_pretrained_weights:
        path = load_pretrained(model, mcfg.name, mcfg.pretrained)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
            print(f"pretrained weights: {len(model.state_dict())} tensors loaded from {path}", flush=True)
    lock_towers(model, mcfg)
    if mcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    dtype = weight_dtype(mcfg.precision)
    if dtype != torch.float32:
        model.to(dtype=dtype)
        model.visual.register_forward_pre_hook(_cast_inputs_to(dtype))
    return model, train_transform, eval_transform, tokenizer


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


