"""Presets: the built-in YAML files (`presets/*.yaml`) and the user's own, with `base:` chains.

A preset YAML mirrors the config sections (`train: {batch_size: 64}`); `base: NAME` (a preset name or a path
relative to the file) names the file it extends. `load_yaml` merges a chain, base first; the values are checked
when `amorlip.config.build` applies them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from amorlip.errors import ConfigError

PRESET_DIR = Path(__file__).parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))

def preset_description(name_or_path: str) -> str:
    """One line about a preset: its `description:` key, or the first sentence of its leading comment."""
    text = resolve_preset_path(name_or_path).read_text()
    comment: list[str] = []
    for line in text.splitlines():
        if line.startswith("description:"):
            return str(yaml.safe_load(line)["description"]).strip()
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    joined = " ".join(comment)
    match = re.search(r"(?<!Sec)(?<!App)(?<!e\.g)(?<!i\.e)[.;]\s+(?=[A-Z(`])", joined)
    first = joined[:match.start()] if match else joined.rstrip(".")
    return first if len(first) <= 120 else first[:117].rsplit(" ", 1)[0] + " ..."

def resolve_preset_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A YAML file: `name_or_path` as a path (relative to `relative_to`, the folder of the file that names it as
    its `base:`, else to the current folder), or a built-in preset name."""
    path = Path(name_or_path).expanduser()
    candidates = [relative_to / path] if relative_to is not None and not path.is_absolute() else [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    candidate = PRESET_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    where = f" (looked in {relative_to})" if relative_to is not None else ""
    raise ConfigError(
        f"config {name_or_path!r} is neither a file{where} nor a built-in preset; presets: {', '.join(preset_names())}"
    )

def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data

def yaml_chain(name_or_path: str) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML files of a preset, base first: `base: other` is a preset name or a path relative to the file."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    path = resolve_preset_path(name_or_path)
    while True:
        if any(path.resolve() == p.resolve() for p, _ in chain):
            loop = " -> ".join(str(p) for p, _ in chain) + f" -> {path}"
            raise ConfigError(f"`base:` loop: {loop} (remove one of these `base:` lines)")
        data = _read_yaml(path)
        chain.append((path, data))
        if "base" not in data:
            break
        path = resolve_preset_path(str(data["base"]), relative_to=path.parent)
    return chain[::-1]

def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Read a preset, following `base:` chains (the base's values are overridden). A file that sets one of
    train.steps / train.epochs unsets the other that a base set."""
    merged: dict[str, Any] = {}
    for _, data in yaml_chain(name_or_path):
        train = data.get("train")
        if isinstance(train, dict) and isinstance(merged.get("train"), dict):
            derived = {k: None for k, other in (("steps", "epochs"), ("epochs", "steps"))
                       if train.get(other) is not None and k not in train}
            merged["train"] = {**merged["train"], **derived}
        for section, values in data.items():  # `base` too: the top file's names the preset it extends
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
    return merged
