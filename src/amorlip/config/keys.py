"""The config's dotted keys (`train.batch_size`) and their types, read from the sections' type hints: a type's
choices and name as messages show them, how a value is spelt for the parser, and the error for a value the
parser refuses."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from amorlip.config.checks import flag_of, nearest_choice
from amorlip.config.sections import all_section_types
from amorlip.errors import ConfigError


def key_types() -> dict[str, Any]:
    """Every dotted key's type (`objective` included), for the sections registered now."""
    return _cached_key_types(tuple(all_section_types().items()))


@functools.lru_cache(maxsize=4)
def _cached_key_types(sections: tuple[tuple[str, type], ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"objective": str}
    for section, typ in sections:
        hints = get_type_hints(typ)
        for f in fields(typ):
            out[f"{section}.{f.name}"] = hints[f.name]
    return out


def type_name(typ: Any) -> str:
    """A type as messages spell it: `int | none`, `plain | rescaled`."""
    if typ is type(None):
        return "none"
    if get_origin(typ) is Literal:
        return " | ".join(str(a) for a in get_args(typ))
    if get_origin(typ) in (Union, UnionType):
        return " | ".join(type_name(a) for a in get_args(typ))
    return getattr(typ, "__name__", str(typ)) if get_origin(typ) is None else str(typ).replace("typing.", "")


def choices_of(typ: Any) -> tuple[Any, ...]:
    """The `Literal` choices of a type (of each member of a union), or ()."""
    if get_origin(typ) is Literal:
        return get_args(typ)
    if get_origin(typ) in (Union, UnionType):
        return tuple(c for a in get_args(typ) for c in choices_of(a))
    return ()


def is_optional(typ: Any) -> bool:
    """Whether the type allows None (the key may be unset with `none` / `null`)."""
    return get_origin(typ) in (Union, UnionType) and type(None) in get_args(typ)


def value_error(key: str, value: Any, typ: Any) -> ConfigError:
    """The one-line error for a value of `key` that cannot be read as its type."""
    choices = choices_of(typ)
    if choices:
        return ConfigError(
            f"{key}={value!r} is not one of: {', '.join(map(str, choices))} "
            f"(pass {flag_of(key)} {nearest_choice(value, choices)}, or another of them)"
        )
    if isinstance(value, str):  # show what was typed as YAML reads it: `16`, not `'16'`
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    return ConfigError(f"{key}: cannot read {value!r} as {type_name(typ)} (see `amorlip train --help`)")


def as_text(value: Any, typ: Any) -> str:
    """A value as the command line would spell it (YAML values arrive typed; the parser reads text)."""
    if isinstance(value, str):
        if is_optional(typ) and value.strip().lower() in ("none", "null", "~"):
            return "null"
        if value.strip().lower() in ("inf", "+inf", "-inf", "nan") and float in (typ, *get_args(typ)):
            return value.strip().lower().replace("inf", ".inf").replace("nan", ".nan").lstrip("+")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return json.dumps(value)
