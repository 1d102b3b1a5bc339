"""The errors a user's input can cause, in the lowest room of the package (every other module may import it).

The command line prints each as one line `amorlip <cmd>: error: <message>` and exits 2.
"""
from __future__ import annotations

from typing import Sequence


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the problem and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint (or another file of a run) could not be written or read; the message says why and what to do."""


def one_of(names: Sequence[str]) -> str:
    """`a, b or c`: choices as a message lists them."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
