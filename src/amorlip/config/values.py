"""Setting config keys from text or YAML values: each value is converted (and checked) by the parser for its
key's type, unknown sections and keys are errors that name the valid ones, and a layer of settings (a YAML
file, the command line) that sets one of train.steps / train.epochs unsets the other."""
from __future__ import annotations

import argparse
import difflib
from typing import Any

from amorlip.config.keys import as_text, is_optional, key_types, value_error
from amorlip.config.parser import OPEN_CLIP_FLAGS, open_clip_value, value_parser
from amorlip.config.sections import Config, default_config, section_of, valid_keys
from amorlip.errors import ConfigError
from amorlip.objectives.registry import REGISTRY


def convert(key: str, value: Any) -> Any:
    """`value` (text or a YAML value) converted to the type of the dotted `key` by the parser (ConfigError if not)."""
    types = key_types()
    typ = types[key]
    if value is None and not is_optional(typ):
        raise ConfigError(f"{key} cannot be null (pass a value, see `amorlip train --help`)")
    parser = value_parser(tuple(types))
    try:
        ns = parser.parse_args([f"--{key}={as_text(value, typ)}"], defaults=False)
    except (argparse.ArgumentError, TypeError, ValueError):
        raise value_error(key, value, typ) from None
    return ns[key]



def _set(cfg: Config, dotted: str, value: Any) -> str:
    """Set `section.key` (dashes allowed); returns the canonical dotted key."""
    dotted = dotted.replace("-", "_")
    if dotted == "objective":
        if str(value) not in REGISTRY:
            raise ConfigError(f"unknown objective {value!r}; choose one of: {', '.join(REGISTRY)}")
        cfg.objective = str(value)
        return dotted
    if "." not in dotted:
        target = OPEN_CLIP_FLAGS.get(dotted)
        hint = f"our key is {target}, " if target else ""
        raise ConfigError(f"unknown key {dotted!r}: {hint}keys look like section.key, e.g. train.batch_size")
    section, key = dotted.split(".", 1)
    obj = section_of(cfg, section)
    if key not in valid_keys(obj):
        close = difflib.get_close_matches(key, valid_keys(obj), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown key {section}.{key}{hint}; valid keys in [{section}]: {', '.join(valid_keys(obj))}"
        )
    setattr(obj, key, convert(dotted, open_clip_value(dotted, value)))
    return dotted



def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` (dashes allowed) to `value`, converted to the declared type by the parser."""
    _set(cfg, dotted, value)



def apply_pairs(cfg: Config, pairs: list[tuple[str, Any]], origin: str, derive: bool = True) -> None:
    """Apply one layer of settings (a YAML file, or the command line). With `derive`, a layer that sets one of
    train.steps / train.epochs unsets the other (it is derived from it); setting both is an error."""
    given: dict[str, Any] = {}
    for key, value in pairs:
        canonical = _set(cfg, key, value)
        given[canonical] = getattr(cfg.train, canonical.split(".", 1)[1]) if canonical in (
            "train.steps", "train.epochs") else None
    if not derive:
        return
    steps, epochs = given.get("train.steps"), given.get("train.epochs")
    if steps is not None and epochs is not None:
        raise ConfigError(
            f"{origin}: train.steps={steps} and train.epochs={epochs} are both set, but one is derived from the "
            "other (set only one: --train.steps N, or --train.epochs N)"
        )
    if epochs is not None:
        cfg.train.steps = None
    elif steps is not None:
        cfg.train.epochs = None



def dict_pairs(data: dict[str, Any], origin: str) -> list[tuple[str, Any]]:
    """A nested dict of sections (YAML, `Config.to_dict`) as (dotted key, value) pairs; `base` and `description`
    (preset metadata) are skipped."""
    pairs: list[tuple[str, Any]] = []
    for section, values in data.items():
        if section in ("base", "description"):
            continue
        if section == "objective":
            pairs.append(("objective", values))
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys to values")
        pairs.extend((f"{section}.{key}", value) for key, value in values.items())
    return pairs



def apply_dict(cfg: Config, data: dict[str, Any], origin: str = "config") -> None:
    """Apply a nested dict (as read from YAML, or saved by `Config.to_dict`) onto `cfg`, as it is."""
    apply_pairs(cfg, dict_pairs(data, origin), origin, derive=False)



def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as saved in run folders and checkpoints)."""
    cfg = default_config()
    apply_dict(cfg, data, origin="saved config")
    return cfg



def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Split command-line words into `(key, text)` pairs: `--a.b 1 --c.d=2` -> [("a.b", "1"), ("c.d", "2")].
    The keys and values are checked (and converted) by the parser when they are applied."""
    out: list[tuple[str, str]] = []
    words = iter(args)
    for arg in words:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = next(words, None)
            if value is None:
                raise ConfigError(f"override {arg} has no value (pass {arg} VALUE)")
        out.append((key, value))
    return out



def override_words(pairs: list[tuple[str, Any]]) -> list[str]:
    """(dotted key, value) pairs as command-line words `--key=text`, which `parse_overrides` reads back."""
    types = key_types()
    return [f"--{key}={as_text(value, types.get(key, Any))}" for key, value in pairs]
