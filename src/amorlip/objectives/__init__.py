"""Objective registry: `--objective NAME` picks one. Adding an objective = one file + one line here, and its
options dataclass with its section in `options.py` (torch-free: the config layer reads it without importing
torch, so this package imports torch only when an objective class or the base names are asked for)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Objective, ObjectiveContext, ObjectiveOutput

# name -> "module:Class" (imported lazily so a broken optional objective never breaks the others)
REGISTRY: dict[str, str] = {
    "clip": "amorlip.objectives.clip:ClipObjective",
    "siglip": "amorlip.objectives.siglip:SigLipObjective",
    "sogclr": "amorlip.objectives.sogclr:SogCLRObjective",
    "fastclip": "amorlip.objectives.sogclr:FastCLIPObjective",
    "amorlip": "amorlip.objectives.amorlip:AmorLIPObjective",
    "neuclip": "amorlip.objectives.neuclip:NeuCLIPObjective",
}

_BASE_NAMES = ("Objective", "ObjectiveContext", "ObjectiveOutput")


def __getattr__(name: str) -> Any:
    """The base names (`from amorlip.objectives import Objective`), imported with torch on first use."""
    if name in _BASE_NAMES:
        return getattr(importlib.import_module("amorlip.objectives.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> list[str]:
    """Names of the objectives whose module is importable."""
    names = []
    for name in REGISTRY:
        try:
            get(name)
        except (ImportError, AttributeError):
            continue
        names.append(name)
    return names


def get(name: str) -> type[Objective]:
    """The objective class registered under `name` (clear error for unknown names)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown objective {name!r}; choose one of: {', '.join(REGISTRY)}")
    module_name, cls_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


__all__ = ["Objective", "ObjectiveContext", "ObjectiveOutput", "REGISTRY", "available", "get"]
