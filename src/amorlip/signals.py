"""Pre-emption: SIGTERM (what SLURM, Kubernetes and torchrun send before killing a job) and SIGUSR1 (SLURM's
`--signal=USR1@SECONDS` warning) make the trainer finish its step, save a checkpoint and exit 128 + signal.

A second signal of the same kind stops the process at once (the default action), for a user who does not
want to wait for the checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class StopRequest:
    """Context manager: while inside, a stop signal is recorded (`.signum`) instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_in_worker(worker_id: int = 0) -> None:
    """For data-loader workers: leave a stop signal to the main process, which needs its workers until the
    checkpoint is written (a scheduler signals every process of the job). A DataLoader `worker_init_fn`."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
