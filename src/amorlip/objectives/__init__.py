"""The objectives: `--objective NAME` picks one from `REGISTRY` (`amorlip.objectives.registry`, torch-free).
Adding an objective = its module (the `Objective` subclass) + one registry line + its options dataclass in
`options.py`. This package imports torch only when an objective class or the base names are asked for."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from amorlip.objectives.registry import REGISTRY

if TYPE_CHECKING:
    from .base import Objective, ObjectiveContext, ObjectiveOutput

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
    return REGISTRY[name].load()


__all__ = ["Objective", "ObjectiveContext", "ObjectiveOutput", "REGISTRY", "available", "get"]
