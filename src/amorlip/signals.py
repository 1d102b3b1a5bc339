"""Stopping a run without losing it: SIGTERM (what SLURM, Kubernetes and torchrun send before killing a job),
SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning) and SIGINT (Ctrl-C) make the trainer finish its step, save a
checkpoint and exit 128 + signal (143, 138, 130).

A second signal stops the process at once (the default action), for a user who does not want to wait for the
checkpoint. Signals that arrive within `SAME_REQUEST_S` of the first count as that one request: a scheduler that
signals the launcher and the workers together (SLURM's `scancel --signal`, `srun` on Ctrl-C), or a launcher that
forwards what the worker also got from the terminal, gives a worker two signals at nearly the same moment.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                 getattr(signal, "SIGINT", None)) if s is not None)
SAME_REQUEST_S = 1.0
"""A signal this soon after the first one (seconds) is the same request, not a second one."""


class Stopped(SystemExit):
    """The run stopped on a signal after saving (exit status 128 + `signum`); callers that run several trainings
    (compare) catch it to say how to continue."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class StopRequest:
    """Context manager: while inside, a stop signal is recorded (`.signum`) instead of killing the process."""

    def __init__(self, same_request_s: float = SAME_REQUEST_S) -> None:
        self.signum: int | None = None
        self.same_request_s = same_request_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if now - self._first_at < self.same_request_s:  # the same request, delivered twice
            return
        signal.signal(signum, signal.SIG_DFL)  # asked again: stop now
        os.kill(os.getpid(), signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_in_worker(worker_id: int = 0) -> None:
    """For data-loader workers: leave a stop signal to the main process, which needs its workers until the
    checkpoint is written (a scheduler, or Ctrl-C in a terminal, signals every process of the job). A DataLoader
    `worker_init_fn`."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
