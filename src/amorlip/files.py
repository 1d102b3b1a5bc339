"""Atomic text files and the write errors they report, torch-free (the command line's planning imports this,
not amorlip.checkpoint): a crash or a full disk leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from amorlip.errors import CheckpointError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give a finished temporary file the mode a plain `open()` would (0666 less the umask; mkstemp makes
    0600, which team-mates on a shared cluster cannot read), then rename it over `path`."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_error(path: Path, e: BaseException) -> CheckpointError:
    """A write failure as one clear message. torch.save reports the OSError of a full disk or an exceeded file
    size limit as a RuntimeError of its zip writer ('unexpected pos ...', 'file write failed')."""
    free = ""
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        pass
    return CheckpointError(
        f"could not write {path}: {e}{free} (free disk space, raise the file size limit, or change --train.output-dir; "
        f"earlier checkpoints are intact)"
    )


def atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = False,
                 is_write_failure: Callable[[BaseException], bool] = lambda e: False) -> None:
    """`write(f)` into a temporary file in the same folder, fsync, the umask's mode (`_publish`), rename over `path`.

    A crash or a full disk leaves either the old file or the new one, never a truncated file; a temporary file
    left by a killed process is removed by `remove_stale_temporaries` when the run starts again. An OSError, or an
    error `is_write_failure` recognises (a writer that wraps the OSError), becomes one CheckpointError that says
    what to do; other errors pass unchanged."""
    path = Path(path)
    try:  # a read-only or missing folder is the same clear error as a full disk
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or is_write_failure(e):
            raise write_error(path, e) from e
        raise


def atomic_write_text(text: str, path: Path) -> None:
    """Write a text file atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a kill interrupted (`.NAME.*.tmp`); returns what was removed.

    Call only where no other process is writing into `folder` (the run's main rank, at start-up)."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
