"""`amorlip launch`: torchrun, with every stop signal saving a checkpoint, whichever process receives it.

Use it in place of `torchrun`, with torchrun's own arguments: `amorlip launch --nproc_per_node 8 -m amorlip.cli
train ...`. Plain torchrun dies of SIGUSR1 (its workers train on, unsupervised), and on SIGTERM gives its workers
30 seconds before killing them and then exits 1 with a traceback. Here:

* torchrun runs as a child that ignores SIGTERM, SIGINT and SIGUSR1 (the ignored disposition is inherited across
  exec, and `PET_SIGNALS_TO_HANDLE` keeps torchrun from installing its own handlers for them); the training
  workers install their own handlers (amorlip.signals), so they still act on these signals;
* a stop signal sent to this launcher (Kubernetes signals PID 1, a terminal's Ctrl-C, `kill`) is forwarded once
  to every worker, also to workers started after it arrived; a scheduler that signals every process of the job
  (SLURM) reaches the workers directly too, and they count signals within a second as one;
* the workers save one checkpoint together, then tell this launcher which signal stopped them (local rank 0
  writes it to the file named by `AMORLIP_LAUNCH_STATUS`) and exit 0, so torchrun ends cleanly; the launcher
  then exits 128 + signal (143, 138, 130), as a single `amorlip train` does;
* a second signal, later than a second after the first, is forwarded too: the workers stop at once.

Forwarding finds the workers as torchrun's child processes in /proc (Linux); elsewhere only a signal that reaches
the workers directly (a process group, a scheduler) stops them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from amorlip.signals import SAME_REQUEST_S, STOP_SIGNALS

STATUS_ENV = "AMORLIP_LAUNCH_STATUS"
"""Environment variable naming the file where a worker under `amorlip launch` records the stop signal."""
TORCHRUN_SIGNALS_ENV = "PET_SIGNALS_TO_HANDLE"
"""torchrun's `--signals-to-handle` default (torchrun reads its options' defaults from PET_* variables)."""
TORCHRUN_OWN_SIGNALS = "SIGHUP,SIGQUIT"
"""The signals torchrun still handles itself under the launcher (it forwards them and shuts its workers down)."""

USAGE = """usage: amorlip launch [TORCHRUN OPTIONS] -m amorlip.cli train [--SECTION.KEY VALUE ...]

torchrun, with every stop signal saving a checkpoint: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C), sent to this
launcher, to its workers, or to all of them at once (SLURM), make every worker finish its step and save one
checkpoint together; the launcher then exits 128 + signal (143, 138, 130). A second signal, more than a second
after the first, stops the workers at once. The arguments are torchrun's (`torchrun --help` lists them), e.g.

  amorlip launch --standalone --nproc_per_node 8 -m amorlip.cli train --config cc12m-vitb32-amorlip-l2log

docs/distributed.md has the SLURM and Kubernetes recipes."""


def report_stop(signum: int) -> bool:
    """Worker side: under `amorlip launch`, record the stop signal for the launcher (local rank 0 writes it) and
    return True, and the worker then exits 0 so that torchrun ends without an error; False outside the launcher."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return False
    if os.environ.get("LOCAL_RANK", "0") == "0":
        Path(path).write_text(f"{int(signum)}\n")
    return True


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent`, from /proc (an empty list where /proc is not Linux's)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()  # after "pid (command name)"
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == parent:
            out.append(int(entry.parent.name))
    return out


class Forwarder:
    """Signal handler of the launcher: records stop signals and forwards each to every worker once."""

    def __init__(self, same_request_s: float = SAME_REQUEST_S) -> None:
        self.same_request_s = same_request_s
        self.signum: int | None = None
        self.requests: list[int] = []  # the signals to pass on, in order (a repeat within the second is dropped)
        self._first_at = 0.0
        self._sent: dict[int, int] = {}  # worker pid -> how many of `requests` it was sent

    def handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at < self.same_request_s:
            return
        self.requests.append(signum)

    def forward(self, torchrun_pid: int) -> None:
        """Send every recorded request that a worker has not had yet (workers started late get them too)."""
        if not self.requests:
            return
        for pid in child_pids(torchrun_pid):
            for signum in self.requests[self._sent.get(pid, 0):]:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    break
            self._sent[pid] = len(self.requests)


def _ignore_stop_signals() -> None:
    """In the torchrun child, before exec: the stop signals are ignored (inherited by torchrun)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def exit_status(torchrun_rc: int, saved_signum: int | None, received: int | None) -> int:
    """The launcher's exit status: 128 + the signal that stopped the workers (after they saved, or when the
    launcher itself was signalled), else torchrun's own."""
    signum = saved_signum or received
    return 128 + signum if signum else torchrun_rc


def _read_status(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else None


def run(torchrun_args: list[str], poll_s: float = 0.2) -> int:
    """Run torchrun with `torchrun_args` under the forwarding handlers; returns the exit status."""
    forwarder = Forwarder()
    fd, status_name = tempfile.mkstemp(prefix="amorlip-launch-", suffix=".signal")
    os.close(fd)
    status = Path(status_name)
    env = {**os.environ, STATUS_ENV: str(status)}
    env.setdefault(TORCHRUN_SIGNALS_ENV, TORCHRUN_OWN_SIGNALS)
    previous = {s: signal.signal(s, forwarder.handle) for s in STOP_SIGNALS}
    try:
        child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args], env=env,
                                 preexec_fn=_ignore_stop_signals)
        while True:
            try:
                rc = child.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                forwarder.forward(child.pid)
        saved = _read_status(status)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        status.unlink(missing_ok=True)
    return exit_status(rc, saved, forwarder.signum)


def main(words: list[str]) -> int:
    """`amorlip launch WORDS`: WORDS are torchrun's arguments."""
    if not words or words[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    return run(words)
