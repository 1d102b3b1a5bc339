"""amorlip: resource-efficient CLIP pretraining (AmorLIP and its baselines) on open_clip models.

The public API (docs/api.md), loaded on first use so that `import amorlip` stays light:

* `make_loss(objective, *, dataset_size, steps_per_epoch, total_steps, embed_dim, local_batch_size, ...)`: any of
  our objectives as a drop-in loss with open_clip's call signature (a `ContrastiveLoss`);
* `ContrastiveLoss`: that loss (`forward`, `forward_backward`, `state_dict` / `load_state_dict`);
* `ConfigError`: the one exception bad input raises (a ValueError whose message names the fix);
* `register_tiny_configs()`: make our tiny CPU model configs (`tiny-vit`, ...) known to open_clip.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
# the names' types, for type checkers: __init__.pyi (an import here would make every module that imports from
# `amorlip` a circle through it)

_PUBLIC = {
    "make_loss": "amorlip.loss",
    "ContrastiveLoss": "amorlip.loss",
    "ConfigError": "amorlip.errors",
    "register_tiny_configs": "amorlip.models",
}

__all__ = ["ConfigError", "ContrastiveLoss", "__version__", "make_loss", "register_tiny_configs"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'amorlip' has no attribute {name!r}")
