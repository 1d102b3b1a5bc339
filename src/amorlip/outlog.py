"""`RUN/out.log`: everything `amorlip train` prints, kept in the run folder, as open_clip keeps its `out.log`.

`OutLog` (a context manager around the command) copies what is written to stdout and stderr into memory until
the run folder exists; the trainer's main rank then calls `attach(RUN / "out.log")`, which writes what was held
and, from then on, every line as it is printed: the progress lines, notes, skip lines, a stop signal's line and
the final `amorlip train: error: ...` line alike. A command that fails before its run folder exists (bad input)
writes nothing. Progress-bar frames (carriage returns, on a terminal) are left out of the file. A resumed run
appends to the file.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, TextIO

_active: "OutLog | None" = None


class _Tee:
    """A text stream that writes to `stream` and to the OutLog; everything else (isatty, fileno, encoding) is the
    stream's own."""

    def __init__(self, stream: TextIO, log: "OutLog") -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._log.record(text)
        return n

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class OutLog:
    """While inside: stdout and stderr are copied to memory, then to the file given to `attach`."""

    def __init__(self) -> None:
        self._held = io.StringIO()
        self._file: TextIO | None = None
        self._saved: tuple[TextIO, TextIO] | None = None

    def __enter__(self) -> "OutLog":
        global _active
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        _active = self
        return self

    def record(self, text: str) -> None:
        if "\r" in text:  # a progress bar's frame
            return
        (self._file or self._held).write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def attach(self, path: Path) -> None:
        if self._file is None:
            self._file = open(path, "a", encoding="utf-8")
            self._file.write(self._held.getvalue())
            self._file.flush()
            self._held = io.StringIO()

    def __exit__(self, *exc: Any) -> None:
        global _active
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
        _active = None
        if self._file is not None:
            self._file.close()
            self._file = None


def attach(path: Path) -> None:
    """Main rank, once the run folder exists: keep the command's output in `path` (nothing when no OutLog is
    active, e.g. a training called from Python or by compare in its own process)."""
    if _active is not None:
        _active.attach(path)
