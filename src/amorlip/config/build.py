"""A run config by layers: the defaults, then a preset (YAML, `base:` chains), then the command line; `auto`
values resolved; validated, and checked against the machine."""
from __future__ import annotations

from typing import Any

import yaml

from amorlip.config.parser import AUTO_SOURCE
from amorlip.config.presets import load_yaml
from amorlip.config.sections import Config, default_config
from amorlip.config.validation import check_machine, validate
from amorlip.config.values import apply_pairs, dict_pairs
from amorlip.data.sources import SOURCES, source_for_path
from amorlip.errors import ConfigError
from amorlip.objectives.registry import entry_of


def build_config(preset: str | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults <- preset YAML <- overrides (`(dotted key, value)` pairs), `auto` resolved, then `validate` and
    `check_machine` (ConfigError naming the fix)."""
    pairs = list(overrides or [])
    auto_source = ("data.source", AUTO_SOURCE) in pairs
    pairs = [p for p in pairs if p != ("data.source", AUTO_SOURCE)]
    cfg = default_config()
    if preset:
        apply_pairs(cfg, dict_pairs(load_yaml(preset), preset), preset)
    apply_pairs(cfg, pairs, "the command line")
    given = {key.replace("-", "_") for key, _ in pairs}
    if auto_source or ("data.train_path" in given and "data.source" not in given):
        infer_source(cfg, explicit=auto_source)
    resolve_auto(cfg)
    validate(cfg)
    check_machine(cfg)
    return cfg


def infer_source(cfg: Config, explicit: bool) -> None:
    """open_clip's `--dataset-type auto`: data.source from data.train_path's name (`source_for_path`), when the
    source was asked to be inferred (`explicit`) or a train path was given without one. A name that tells
    nothing keeps a source that reads train paths, and is otherwise an error naming the choices."""
    readers = [name for name, s in SOURCES.items() if s.reads_train_path]
    if not cfg.data.train_path:
        if explicit:
            raise ConfigError(f"data.source={AUTO_SOURCE} infers the source from data.train_path, which is not set "
                              f"(pass --data.train-path FILE, or --data.source {'|'.join(SOURCES)})")
        return
    found = source_for_path(cfg.data.train_path)
    if found is not None:
        cfg.data.source = found
    elif explicit or not SOURCES[cfg.data.source].reads_train_path:
        raise ConfigError(
            f"cannot tell the format of data.train_path={cfg.data.train_path!r} from its name (pass "
            + " or ".join(f"--data.source {name}" for name in readers) + ")")


def resolve_auto(cfg: Config) -> None:
    """Replace `auto` values by what they mean for this configuration (the saved config holds the result):
    `temperature.scheme auto` is what the objective's registry entry says."""
    entry = entry_of(cfg)
    if cfg.temperature.scheme == "auto" and entry is not None:
        cfg.temperature.scheme = entry.auto_temperature(entry.options_of(cfg))


def describe(cfg: Config) -> str:
    """YAML text of the resolved config (written to every run folder)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def derived_steps_note(cfg: Config) -> str | None:
    """A YAML comment saying what train.steps is when train.epochs sets it (the config keeps `steps: null`: the
    number depends on the data): epochs x steps per epoch, counted here when the data's size is known without
    reading it (`DataSource.epoch_size`), else the rule. None when train.steps is set."""
    if cfg.train.steps is not None:
        return None
    size = SOURCES[cfg.data.source].epoch_size(cfg.data)
    batch, epochs = cfg.train.batch_size, cfg.train.epochs
    if size is None:
        return (f"# train.steps: null = derived when the run starts: train.epochs {epochs} x (the dataset's "
                f"samples // train.batch_size {batch})")
    return (f"# train.steps: null = derived when the run starts: train.epochs {epochs} x {size // batch} steps per "
            f"epoch ({size} samples // train.batch_size {batch}) = {epochs * (size // batch)} steps")
