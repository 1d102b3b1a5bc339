"""A run config by layers: the defaults, then a preset (YAML, `base:` chains), then the command line; `auto`
values resolved; validated, and checked against the machine."""
from __future__ import annotations

from typing import Any

import yaml

from amorlip.config.presets import load_yaml
from amorlip.config.sections import Config, default_config
from amorlip.config.validation import check_machine, validate
from amorlip.config.values import apply_pairs, dict_pairs
from amorlip.objectives.registry import entry_of


def build_config(preset: str | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults <- preset YAML <- overrides (`(dotted key, value)` pairs), `auto` resolved, then `validate` and
    `check_machine` (ConfigError naming the fix)."""
    cfg = default_config()
    if preset:
        apply_pairs(cfg, dict_pairs(load_yaml(preset), preset), preset)
    apply_pairs(cfg, list(overrides or []), "the command line")
    resolve_auto(cfg)
    validate(cfg)
    check_machine(cfg)
    return cfg


def resolve_auto(cfg: Config) -> None:
    """Replace `auto` values by what they mean for this configuration (the saved config holds the result):
    `temperature.scheme auto` is what the objective's registry entry says."""
    entry = entry_of(cfg)
    if cfg.temperature.scheme == "auto" and entry is not None:
        cfg.temperature.scheme = entry.auto_temperature(entry.options_of(cfg))


def describe(cfg: Config) -> str:
    """YAML text of the resolved config (written to every run folder)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
