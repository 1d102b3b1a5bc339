"""The errors a user's input can cause, in the lowest room of the package (every other module may import it).

The command line prints each as one line `amorlip <cmd>: error: <message>` and exits 2.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the problem and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint (or another file of a run) could not be written or read; the message says why and what to do."""
