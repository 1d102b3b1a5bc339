"""The errors a user's input can cause, in the lowest room of the package (every other module may import it).

The command line prints each as one line `amorlip <cmd>: error: <message>` and exits 2.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the problem and the fix."""
