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
    total = len(jobs)
    outcomes: list[JobOutcome | None] = [None] * total
    pending = collections.deque(range(total))
    running: dict[int, _Running] = {}
    lines: queue.Queue = queue.Queue()
    stop: dict[str, Any] = {"signum": None, "forwarded": False, "deadline": None}

    def prefix(i: int) -> str:
        return f"[job {i + 1}/{total} {jobs[i].label}]"

    def kill_all() -> None:
        for r in list(running.values()):
            if r.proc.poll() is None:
                r.proc.kill()

    def on_signal(signum: int, frame: Any) -> None:
        if stop["signum"] is None:
            stop["signum"] = signum  # the loop forwards it
        else:
            kill_all()  # asked twice: do not wait for the checkpoints

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)
    try:
        while pending or running:
            while stop["signum"] is None and pending and len(running) < parallel:
                i = pending.popleft()
                job = jobs[i]
                job.log_path.parent.mkdir(parents=True, exist_ok=True)
                job.log_path.write_text("$ " + " ".join(job.argv) + "\n")
                proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", bufsize=1, start_new_session=True,
                                        env={**os.environ, **job.env}, stdin=subprocess.DEVNULL)
                running[i] = _Running(i, job, proc, collections.deque(maxlen=60), time.monotonic())
                threading.Thread(target=_reader, args=(i, proc, job.log_path, lines), daemon=True).start()
                console.event(f"{prefix(i)} started (log: {job.log_path})")
                console.starting(prefix(i))
            if stop["signum"] is not None and not stop["forwarded"]:
                stop["forwarded"], stop["deadline"] = True, time.monotonic() + stop_timeout
                name = signal.Signals(stop["signum"]).name
                console.event(f"received {name}: asking {len(running)} running job(s) to save a checkpoint and stop "
                              f"({len(pending)} not started; a second signal kills them at once)")
                for r in running.values():
                    if r.proc.poll() is None:
                        r.proc.send_signal(signal.SIGTERM)
                pending.clear()
            if stop["deadline"] is not None and time.monotonic() > stop["deadline"]:
                kill_all()
            try:
                i, line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            r = running[i]
            if line is not None:
                r.tail.append(line)
                if show(line):
                    console.progress(prefix(i), line)
                continue
            rc = r.proc.wait()
            del running[i]
            console.done(prefix(i))
            outcome = JobOutcome(r.job, rc, "" if rc == 0 else last_error_line(list(r.tail)),
                                 time.monotonic() - r.started)
            outcomes[i] = outcome
            took = _duration(outcome.seconds)
            if outcome.ok:
                console.event(f"{prefix(i)} finished in {took}")
            elif stop["forwarded"] and rc == 128 + signal.SIGTERM:
                console.event(f"{prefix(i)} stopped after {took}")
            else:
                console.event(f"{prefix(i)} failed ({outcome.describe_exit()} after {took}): {outcome.error_line} "
                              f"(full output: {r.job.log_path})")
            if on_done is not None:
                on_done(outcome)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        kill_all()  # only if this loop itself failed: normally nothing is left running
        for r in running.values():
            r.proc.wait()
    result = [o if o is not None else JobOutcome(jobs[i], None) for i, o in enumerate(outcomes)]
    if stop["signum"] is not None:
        raise JobsStopped(stop["signum"], result)
    return result


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
