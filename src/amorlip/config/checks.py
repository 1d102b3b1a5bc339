"""The config layer's message helpers: a key's command-line spelling, the choice nearest to a typo, and the
range and choice checks. Every error is one line that names the key, the rule and, in parentheses, the fix (the
CLI prints it as `amorlip CMD: error: ...` and exits 2)."""
from __future__ import annotations

import difflib
import math
from typing import Any, Sequence

from amorlip.errors import ConfigError


def flag_of(key: str) -> str:
    """The command-line spelling of a dotted key: `train.batch_size` -> `--train.batch-size`."""
    return "--" + key.replace("_", "-")


def nearest_choice(value: Any, choices: Sequence[Any]) -> Any:
    """The choice closest to what was typed (`tagret` -> `target`), for the error's suggestion; the first
    choice when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return close[0] if close else choices[0]


def check_choice(value: str, choices: Sequence[str], key: str) -> None:
    """`value` must be one of `choices`."""
    if value not in choices:
        raise ConfigError(
            f"{key}={value!r} is not one of: {', '.join(choices)} (pass {flag_of(key)} "
            f"{nearest_choice(value, choices)}, or another of them)"
        )


def at_least(key: str, value: Any, low: float, meaning: str = "") -> None:
    """`value` (None = unset, allowed) must be a finite number >= low; `meaning` explains a special low value."""
    if value is None:
        return
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{key}={value} must be at least {low} (pass {flag_of(key)} {low} or more{meaning})")


def positive(key: str, value: Any, example: str) -> None:
    """`value` (None = unset, allowed) must be a finite number > 0."""
    if value is None:
        return
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}={value} must be a positive, finite number (pass e.g. {flag_of(key)} {example})")
