"""Model configs without torch: their names, their open_clip config dicts, and the checks of the tower-locking
options, for the config layer (`--help`, presets, validation) and `amorlip models`.

The configs are open_clip's JSON files (its `model_configs` folder, found without importing open_clip) and
amorlip's tiny ones (`amorlip/model_configs`), read as open_clip reads them: a file is a config when it has
`embed_dim`, `vision_cfg` and `text_cfg`, and a tiny config overrides an open_clip one of the same name. When
open_clip is already imported, its live registry counts too (configs added with `open_clip.add_model_config`).
`amorlip.models` builds the models and re-exports the lock checks.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from amorlip.errors import ConfigError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
"""amorlip's own small configs (tiny-vit, ...); open_clip learns them through
`amorlip.models.register_tiny_configs`."""


def _natural_key(name: str) -> list[Any]:
    """open_clip's order of config names (`ViT-B-16` before `ViT-B-32`)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _config_folders() -> list[Path]:
    """open_clip's model_configs folder(s), then amorlip's (the later folder wins a name, as in open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(f) / "model_configs" for f in (spec.submodule_search_locations or [])] if spec else []
    return [*folders, MODEL_CONFIG_DIR]


@functools.lru_cache(maxsize=1)
def _json_configs() -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for folder in _config_folders():
        for path in sorted(folder.glob("*.json")):
            with open(path) as f:
                cfg = json.load(f)
            if all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
                configs[path.stem] = cfg
    return configs


def _live_open_clip() -> Any:
    """open_clip's module when something has imported it already (never imported here), else None."""
    return sys.modules.get("open_clip")


def model_names() -> list[str]:
    """Every model config name (open_clip's and the tiny ones), in open_clip's order: what
    `open_clip.list_models()` lists once the tiny configs are registered."""
    names = set(_json_configs())
    live = _live_open_clip()
    if live is not None:
        names.update(live.list_models())
    return sorted(names, key=_natural_key)


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of `name` (a copy; ValueError for unknown names), as
    `open_clip.get_model_config` returns it once the tiny configs are registered; an `hf-hub:` name's from the
    local Hugging Face cache (`amorlip.hf_cache`; ConfigError when it is not there)."""
    if name.startswith("hf-hub:"):  # from the local Hugging Face cache only
        from amorlip.hf_cache import hub_config

        return copy.deepcopy(hub_config(name)["model_cfg"])
    live = _live_open_clip()
    cfg = live.get_model_config(name) if live is not None else None
    if cfg is None:
        cfg = copy.deepcopy(_json_configs().get(name))
    if cfg is None:
        raise ValueError(
            f"unknown model {name!r}: use an open_clip config name (e.g. RN50, ViT-B-32) or one of {TINY_MODELS}"
        )
    return cfg


# ----------------------------------------------------------------------------------------------------
# LiT-style locking (model.lock_image / lock_text): what each tower supports


def tower_kinds(name: str) -> tuple[str, str]:
    """(image tower kind, text tower kind) of config `name`: vit | resnet | timm, and transformer | hf."""
    cfg = model_config(name)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        image = "timm"
    elif isinstance(vision.get("layers"), (list, tuple)):
        image = "resnet"
    else:
        image = "vit"
    return image, ("hf" if text.get("hf_model_name") else "transformer")


def lock_groups(name: str) -> tuple[int | None, int | None]:
    """How many groups open_clip's lock_image_tower / lock_text_tower can leave unlocked for config `name` (None:
    decided by the tower itself, timm or Hugging Face). ViT: stem, each block but the last, last block + final
    norm, projection. Text transformer: embeddings, each block but the last, last block + ln_final, projection."""
    cfg = model_config(name)
    image_kind, text_kind = tower_kinds(name)
    image = int(cfg["vision_cfg"].get("layers", 12)) + 2 if image_kind == "vit" else (0 if image_kind == "resnet" else None)
    text = int(cfg["text_cfg"].get("layers", 12)) + 2 if text_kind == "transformer" else None
    return image, text


def check_lock_options(mcfg: Any) -> None:
    """ConfigError for lock options that the model cannot take or that have no effect (called by validate)."""
    options = {
        "lock_image": ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"),
        "lock_text": ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm"),
    }
    defaults = {"lock_image_unlocked_groups": 0, "lock_image_freeze_bn_stats": False, "lock_text_unlocked_layers": 0,
                "lock_text_freeze_layer_norm": True}
    for lock, keys in options.items():
        for key in keys:
            if getattr(mcfg, key) != defaults[key] and not getattr(mcfg, lock):
                raise ConfigError(f"model.{key}={getattr(mcfg, key)} has no effect without model.{lock} (pass "
                                  f"--model.{lock.replace('_', '-')} true, or drop --model.{key.replace('_', '-')})")
    image_kind, text_kind = tower_kinds(mcfg.name)
    image_groups, text_groups = lock_groups(mcfg.name)
    for key in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        if getattr(mcfg, key) < 0:
            raise ConfigError(f"model.{key}={getattr(mcfg, key)} must be at least 0 (pass --model."
                              f"{key.replace('_', '-')} 0 to lock the whole tower)")
    if mcfg.lock_image:
        n = mcfg.lock_image_unlocked_groups
        if image_kind == "resnet" and n:
            raise ConfigError(f"model.lock_image_unlocked_groups={n}: open_clip locks a ResNet image tower "
                              f"({mcfg.name}) only as a whole (pass --model.lock-image-unlocked-groups 0)")
        if image_groups and n >= image_groups:
            raise ConfigError(f"model.lock_image_unlocked_groups={n} would unlock all {image_groups} groups of "
                              f"{mcfg.name}'s image tower (pass at most {image_groups - 1}, or drop "
                              "--model.lock-image)")
        if mcfg.lock_image_freeze_bn_stats and image_kind == "vit":
            raise ConfigError(f"model.lock_image_freeze_bn_stats: {mcfg.name}'s image tower is a ViT, without "
                              "batch norm (drop --model.lock-image-freeze-bn-stats; it is for ResNet and timm towers)")
    if mcfg.lock_text:
        n = mcfg.lock_text_unlocked_layers
        if text_groups and n >= text_groups:
            raise ConfigError(f"model.lock_text_unlocked_layers={n} would unlock all {text_groups} groups of "
                              f"{mcfg.name}'s text tower (pass at most {text_groups - 1}, or drop --model.lock-text)")
        if not mcfg.lock_text_freeze_layer_norm and text_kind != "hf":
            raise ConfigError(f"model.lock_text_freeze_layer_norm=false: open_clip's own text transformer "
                              f"({mcfg.name}) freezes its layer norms with the rest (drop "
                              "--model.lock-text-freeze-layer-norm; unfrozen norms are for Hugging Face text towers)")


# ----------------------------------------------------------------------------------------------------
# A lean start: what open_clip would import without need

OPTIONAL_IMPORTS = ("transformers", "timm")
"""Packages open_clip imports whenever they are installed (open_clip.hf_model, coca_model, timm_model), about a
quarter of its import time, though only Hugging Face text towers and timm image towers use them."""


def unused_imports(name: str) -> list[str]:
    """The packages of OPTIONAL_IMPORTS model `name` does not use: transformers unless its text tower or tokenizer
    is Hugging Face's, timm unless its image tower is timm's. Empty for a model whose config is not known here
    (an `hf-hub:` name keeps them all: its config is read from the cache only later)."""
    if name.startswith("hf-hub:"):
        return []
    try:
        image, text = tower_kinds(name)
        text_cfg = model_config(name).get("text_cfg", {})
    except ValueError:
        return []
    needed = {"timm"} if image == "timm" else set()
    if text == "hf" or text_cfg.get("hf_tokenizer_name"):
        needed.add("transformers")
    return [m for m in OPTIONAL_IMPORTS if m not in needed]


def skip_unused_imports(name: str) -> list[str]:
    """Before open_clip is first imported (the `amorlip train` command): keep it from importing the packages model
    `name` does not use (`unused_imports`; an `import` of them then raises ImportError, which open_clip catches).
    Returns the packages skipped; none once open_clip is loaded."""
    if "open_clip" in sys.modules:
        return []
    skipped = [m for m in unused_imports(name) if m not in sys.modules]
    for module in skipped:
        sys.modules[module] = None  # type: ignore[assignment]
    return skipped
