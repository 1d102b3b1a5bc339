"""One process per folder: a training run's folder, or a `compare --out` folder, is locked while it is used.

Two trainings into one run folder would mix their metrics and checkpoints, and one's start-up clean-up of
temporary files could delete the other's checkpoint while it is written. `FolderLock` takes an advisory lock
(`fcntl.flock`, exclusive, non-blocking) on `FOLDER/.lock` for the life of the process that uses the folder,
and writes who holds it (pid, host, start time, command line) into it. A second process is refused with an
error that names the holder. The operating system drops the lock when its holder exits in any way, kill -9
included, so a lock left by a crash is never in the way: the next run takes it over. The holder removes the
file when it lets go; a process that locked a file just removed is told by its inode and tries again.
Torch-free: the command line checks folders before it imports torch.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from amorlip.errors import ConfigError

LOCK_NAME = ".lock"
RUN_IN_USE_FIX = ("wait for it to end, or stop it (kill -TERM PID saves a checkpoint), or train into another "
                  "folder with --train.name NEW_NAME")


class FolderInUse(ConfigError):
    """Another live process holds the folder's lock; the message names it and the fix."""


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder (empty while the holder is still writing it)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict[str, Any]) -> str:
    """`pid 123 on host-a since 2024-05-01 10:00:00: amorlip train ...` (what is known of it)."""
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("started"):
        text += f" since {info['started']}"
    command = str(info.get("command") or "")
    if command:
        text += ": " + (command if len(command) <= 120 else command[:117] + "...")
    return text


class FolderLock:
    """An exclusive lock on `folder` (`acquire` / `release`, or a `with` block).

    `what` names the folder in the error ("run folder"), `fix` says what to do instead."""

    def __init__(self, folder: str | Path, what: str, fix: str) -> None:
        self.folder, self.what, self.fix = Path(folder), what, fix
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise FolderInUse naming the process that holds it. A file system without locks
        (some network mounts) gets a warning, and the run goes on unlocked."""
        # the folders this creates, deepest first (the run folder and any missing parents such as runs/)
        self._made = [f for f in (self.folder, *self.folder.parents) if not f.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = _holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FolderInUse(f"{self.what} {self.folder} is in use by another process "
                                      f"({describe_holder(info)}); {self.fix}") from None
                print(f"warning: could not lock {self.path} ({e}); make sure no other process uses {self.folder}",
                      file=sys.stderr)
                return self
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go: the file goes first (while still locked), then the lock; a folder made only for it goes too."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        for folder in self._made:  # only when empty: a run refused before it wrote anything leaves no folder
            try:
                folder.rmdir()
            except OSError:
                break

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def check_free(folder: str | Path, what: str, fix: str) -> None:
    """Raise FolderInUse when a live process holds `folder`'s lock (nothing is created when it does not)."""
    if (Path(folder) / LOCK_NAME).exists():
        with FolderLock(folder, what, fix):
            pass
