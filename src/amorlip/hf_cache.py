"""`model.name hf-hub:ORG/REPO` (open_clip's spelling of a model published on the Hugging Face Hub), read from the
local Hugging Face cache only, never downloaded: torch-free, for validation and `amorlip.model_catalog`.

The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (read when asked, so a changed
environment counts); a repo is there when `models--ORG--REPO/snapshots/REV/open_clip_config.json` is (the revision
`refs/main` names, else the newest). `amorlip.models.create_model` hands open_clip that snapshot folder
(`local-dir:`), with `HF_HUB_OFFLINE=1`, so open_clip reads the config, the preprocessing and the weights from it
as it would from the Hub.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from amorlip.errors import ConfigError

PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"


def is_hf_hub(name: str) -> bool:
    return name.startswith(PREFIX)


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _repo_folder(name: str) -> Path:
    repo = name[len(PREFIX):].strip("/")
    return hub_cache() / ("models--" + repo.replace("/", "--"))


def snapshot(name: str) -> Path | None:
    """The cached snapshot folder of `hf-hub:ORG/REPO` holding open_clip_config.json, or None."""
    folder = _repo_folder(name)
    ref = folder / "refs" / "main"
    if ref.is_file():
        main = folder / "snapshots" / ref.read_text().strip()
        if (main / CONFIG_FILE).is_file():
            return main
    found = sorted((p.parent for p in (folder / "snapshots").glob(f"*/{CONFIG_FILE}")),
                   key=lambda p: (p / CONFIG_FILE).stat().st_mtime)
    return found[-1] if found else None


def check_hf_hub(name: str) -> Path:
    """The snapshot of `name`, or a ConfigError naming where it looked and how to fill the cache."""
    repo = name[len(PREFIX):].strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"model.name={name!r}: an hf-hub name is hf-hub:ORG/REPO (e.g. "
                          "hf-hub:timm/ViT-B-16-SigLIP)")
    found = snapshot(name)
    if found is None:
        raise ConfigError(
            f"model.name={name!r} is not in the local Hugging Face cache (looked for {_repo_folder(name)}/snapshots/"
            f"*/{CONFIG_FILE}; set HF_HUB_CACHE or HF_HOME to another cache); amorlip never downloads models (fetch "
            f"it once where there is network: huggingface-cli download {repo})")
    return found


def hub_config(name: str) -> dict[str, Any]:
    """The cached open_clip_config.json of `name` ({'model_cfg': ..., 'preprocess_cfg': ...})."""
    path = check_hf_hub(name) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name={name!r}: cannot read {path} ({e}; fetch the repo again)") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ConfigError(f"model.name={name!r}: {path} holds no model_cfg (not an open_clip model repo)")
    return cfg


def open_clip_name(name: str) -> str:
    """What open_clip is given for `name`: the cached snapshot as `local-dir:PATH` for an hf-hub name."""
    return f"local-dir:{check_hf_hub(name)}" if is_hf_hub(name) else name


def safe_name(name: str) -> str:
    """`name` as one folder or file name part: `hf-hub:ORG/REPO` -> `hf-hub-ORG--REPO`; others unchanged."""
    return name.replace(":", "-").replace("/", "--")


@contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the call inside (the environment and huggingface_hub's constant, read at import)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        constants = __import__("huggingface_hub.constants", fromlist=["HF_HUB_OFFLINE"])
    except ImportError:
        constants = None
    old_constant = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_constant
