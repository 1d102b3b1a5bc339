"""Several child processes at once (`amorlip compare --jobs N`), each with its own log file and one progress line.

Each job is a command line (for compare: `python -m amorlip.cli train --config RUN.yaml`). At most `parallel`
run at once; every line a child prints goes to its log file, and the lines worth seeing (progress, warnings,
errors: `shown_line`) reach the console prefixed by the job, `[job 2/12 clip bs=32 s1] step 100/400 ...`.
On a terminal the running jobs keep one line each, redrawn in place; elsewhere (a log file, a pipe) every
shown line is printed once.

A job that fails does not stop the others; its outcome carries the exit status and the child's last error line.
The children run in their own session, so a Ctrl-C in the terminal reaches only this process, which then asks
each child to save a checkpoint and stop (SIGTERM, as a scheduler would) and waits for them; SIGTERM to this
process does the same; a second signal kills the children at once. `JobsStopped` is raised afterwards.
"""
from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

_SHOWN = re.compile(r"^step \d+/\d+|error|warning|resumed from|received SIG|Traceback", re.IGNORECASE)
_ERROR = re.compile(r"^amorlip \w+: error: |^\w*(Error|Exception|Interrupt)\b|^(RuntimeError|SystemExit)")


def shown_line(line: str) -> bool:
    """Whether a child's line reaches the console: progress lines and anything about errors or warnings."""
    return bool(_SHOWN.search(line))


@dataclass
class Job:
    """One child process: `argv` run with `env` (added to this process's environment), output to `log_path`."""

    label: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobOutcome:
    job: Job
    returncode: int | None  # None: never started (stopped before its turn)
    error_line: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe_exit(self) -> str:
        rc = self.returncode
        if rc is None:
            return "not started"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit {rc}"


class JobsStopped(Exception):
    """The jobs were stopped by a signal to this process (`signum`); `outcomes` says how each ended."""

    def __init__(self, signum: int, outcomes: list[JobOutcome]) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.outcomes = signum, outcomes


def last_error_line(lines: list[str]) -> str:
    """The child's last error line: `amorlip train: error: ...`, else an exception's last line, else its last line."""
    for line in reversed(lines):
        if _ERROR.search(line.strip()):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")


class _Console:
    """Event lines, and one progress line per running job: redrawn in place on a terminal, printed elsewhere."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream, self.tty = stream, tty
        self.lines: dict[str, str] = {}  # job prefix -> its latest shown line (terminal only)
        self.drawn = 0

    def event(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=not self.tty)
        self._draw()

    def progress(self, prefix: str, line: str) -> None:
        if not self.tty:
            print(f"{prefix} {line}", file=self.stream, flush=True)
            return
        self.lines[prefix] = line
        self._clear()
        self._draw()

    def starting(self, prefix: str) -> None:
        """A job's line until it prints its first progress (terminal only)."""
        if self.tty:
            self.lines[prefix] = "starting"
            self._clear()
            self._draw()

    def done(self, prefix: str) -> None:
        self.lines.pop(prefix, None)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the board's first line, clear to the end
        self.drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        width = max(20, shutil.get_terminal_size((120, 20)).columns - 1)
        for prefix, line in self.lines.items():
            self.stream.write(f"{prefix} {line}"[:width] + "\n")  # one screen line each, so the count holds
        self.drawn = len(self.lines)
        self.stream.flush()


@dataclass
class _Running:
    index: int
    job: Job
    proc: subprocess.Popen
    tail: collections.deque
    started: float


def _reader(index: int, proc: subprocess.Popen, log_path: Path, out: queue.Queue) -> None:
    """Copy a child's output to its log file and, line by line, to the main loop; None at the end."""
    with open(log_path, "a", encoding="utf-8") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            out.put((index, line.rstrip("\n")))
    out.put((index, None))


def run_jobs(jobs: list[Job], parallel: int, stream: TextIO | None = None, tty: bool | None = None,
             show: Callable[[str], bool] = shown_line, on_done: Callable[[JobOutcome], None] | None = None,
             stop_timeout: float = 300.0) -> list[JobOutcome]:
    """Run `jobs`, at most `parallel` at once; returns one outcome per job, in order.

    `on_done(outcome)` is called as each job ends (successful or not). Raises `JobsStopped` after a SIGINT or
    SIGTERM to this process, once the children it asked to stop have exited (killed after `stop_timeout` s).
    """
    stream = stream or sys.stdout
    console = _Console(stream, bool(getattr(stream, "isatty", lambda: False)()) if tty is None else tty)
    pool = _Pool(jobs, parallel, console, show, on_done, stop_timeout)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, pool.on_signal)
    try:
        while pool.pending or pool.running:
            pool.start_pending()
            pool.forward_stop()
            pool.take_line()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        pool.kill_all()  # only if this loop itself failed: normally nothing is left running
        for r in pool.running.values():
            r.proc.wait()
    result = [o if o is not None else JobOutcome(jobs[i], None) for i, o in enumerate(pool.outcomes)]
    if pool.signum is not None:
        raise JobsStopped(pool.signum, result)
    return result


class _Pool:
    """One `run_jobs` call's state: the jobs not started, running and done, and the stop a signal asked for."""

    def __init__(self, jobs: list[Job], parallel: int, console: _Console, show: Callable[[str], bool],
                 on_done: Callable[[JobOutcome], None] | None, stop_timeout: float) -> None:
        self.jobs, self.parallel, self.console, self.show, self.on_done = jobs, parallel, console, show, on_done
        self.stop_timeout = stop_timeout
        self.outcomes: list[JobOutcome | None] = [None] * len(jobs)
        self.pending = collections.deque(range(len(jobs)))
        self.running: dict[int, _Running] = {}
        self.lines: queue.Queue = queue.Queue()
        self.signum: int | None = None  # the signal received (the loop forwards it to the children)
        self.forwarded = False
        self.deadline: float | None = None  # after the forwarded signal: when the children are killed

    def prefix(self, i: int) -> str:
        return f"[job {i + 1}/{len(self.jobs)} {self.jobs[i].label}]"

    def kill_all(self) -> None:
        for r in list(self.running.values()):
            if r.proc.poll() is None:
                r.proc.kill()

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum  # the loop forwards it
        else:
            self.kill_all()  # asked twice: do not wait for the checkpoints

    def start_pending(self) -> None:
        """Start jobs in order while fewer than `parallel` run (none after a stop signal)."""
        while self.signum is None and self.pending and len(self.running) < self.parallel:
            i = self.pending.popleft()
            job = self.jobs[i]
            job.log_path.parent.mkdir(parents=True, exist_ok=True)
            job.log_path.write_text("$ " + " ".join(job.argv) + "\n")
            proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", bufsize=1, start_new_session=True,
                                    env={**os.environ, **job.env}, stdin=subprocess.DEVNULL)
            self.running[i] = _Running(i, job, proc, collections.deque(maxlen=60), time.monotonic())
            threading.Thread(target=_reader, args=(i, proc, job.log_path, self.lines), daemon=True).start()
            self.console.event(f"{self.prefix(i)} started (log: {job.log_path})")
            self.console.starting(self.prefix(i))

    def forward_stop(self) -> None:
        """After a stop signal: SIGTERM to every running child (once), nothing more started; past the deadline,
        kill them."""
        if self.signum is not None and not self.forwarded:
            self.forwarded, self.deadline = True, time.monotonic() + self.stop_timeout
            name = signal.Signals(self.signum).name
            self.console.event(f"received {name}: asking {len(self.running)} running job(s) to save a checkpoint "
                               f"and stop ({len(self.pending)} not started; a second signal kills them at once)")
            for r in self.running.values():
                if r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM)
            self.pending.clear()
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.kill_all()

    def take_line(self) -> None:
        """One line from a child (waiting at most 0.2 s): kept for its error line, shown if `show` wants it; the
        end of its output ends the job."""
        try:
            i, line = self.lines.get(timeout=0.2)
        except queue.Empty:
            return
        r = self.running[i]
        if line is not None:
            r.tail.append(line)
            if self.show(line):
                self.console.progress(self.prefix(i), line)
            return
        self._finish(i, r)

    def _finish(self, i: int, r: _Running) -> None:
        """Job `i` closed its output: wait for it, keep its outcome, say how it ended, call `on_done`."""
        rc = r.proc.wait()
        del self.running[i]
        self.console.done(self.prefix(i))
        outcome = JobOutcome(r.job, rc, "" if rc == 0 else last_error_line(list(r.tail)),
                             time.monotonic() - r.started)
        self.outcomes[i] = outcome
        took = _duration(outcome.seconds)
        if outcome.ok:
            self.console.event(f"{self.prefix(i)} finished in {took}")
        elif self.forwarded and rc == 128 + signal.SIGTERM:
            self.console.event(f"{self.prefix(i)} stopped after {took}")
        else:
            self.console.event(f"{self.prefix(i)} failed ({outcome.describe_exit()} after {took}): "
                               f"{outcome.error_line} (full output: {r.job.log_path})")
        if self.on_done is not None:
            self.on_done(outcome)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
