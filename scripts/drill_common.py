"""What the fault drill's cases share (scripts/fault_drill.py): starting `amorlip train` / `amorlip launch` as real
subprocesses with time limits, reading their outcome, comparing two runs' whole state, and the result table."""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from amorlip import checkpoint as ckpt
from amorlip.history import read_history
from amorlip.launch import child_pids
from amorlip.resume import flatten

MICRO = ["--model.name", "micro-vit", "--data.synthetic-size", "256", "--train.batch-size", "16",
         "--optim.warmup-steps", "2", "--train.threads", "1", "--eval.zeroshot", "false", "--eval.retrieval", "false",
         "--train.log-every", "1"]
BASE = ["--train.steps", "24", "--train.checkpoint-every", "3"]
"""The settings of most single-process cases: 24 steps, a checkpoint every 3 (one reference run serves them all)."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LIMIT_S = 900  # per run; generous, a loaded machine is slow
TIMING_FIELDS = frozenset({"samples_per_s"})
"""metrics.jsonl fields that measure wall-clock time: the only ones two equal runs may differ in."""
RUN_IDENTITY = frozenset({"train.output_dir", "train.name", "train.resume", "train.resume_allow_changes"})
"""Config keys naming where a run lives and how it was started: the only config two equal runs may differ in."""


# ----------------------------------------------------------------------------------------------------
# Processes


def cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "amorlip.cli", "train", "--train.output-dir", str(out), *MICRO, *args]


def launch_cmd(out: Path, nproc: int, *args: str) -> list[str]:
    """`amorlip launch` of `nproc` gloo CPU workers (torchrun whose stop signals save)."""
    return [sys.executable, "-m", "amorlip.cli", "launch", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "amorlip.cli", "train", "--train.output-dir", str(out), *MICRO, "--train.device", "cpu", *args]


LOGS: list[Path] = []
"""Where the output of every finished run is kept (the drill sets it to OUT/logs)."""


def run_cmd(argv: list[str], limit_s: float = LIMIT_S, **kw) -> subprocess.CompletedProcess:
    """Run to the end (or the time limit: exit -999, 'HUNG' in stderr); its output kept in LOGS."""
    try:
        r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=limit_s, **kw)
    except subprocess.TimeoutExpired:
        r = subprocess.CompletedProcess(argv, returncode=-999, stdout="", stderr=f"HUNG (> {limit_s:.0f} s)")
    if LOGS:
        LOGS[0].mkdir(parents=True, exist_ok=True)
        log = LOGS[0] / f"{time.monotonic_ns()}.log"
        log.write_text(f"$ {' '.join(argv)}\n# exit {r.returncode}\n{r.stdout}\n# stderr\n{r.stderr}")
    return r


def run(out: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd(cmd(out, *args), **kw)


class Started:
    """A process started in the background, its output (stdout and stderr together) in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(argv, env=ENV, stdout=f, stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, limit_s: float = LIMIT_S) -> int:
        """The exit status; -999 (and the process killed) past `limit_s`."""
        try:
            return self.proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -999

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start(out: Path, *args: str) -> Started:
    return Started(cmd(out, *args), (LOGS[0] if LOGS else out / "logs") / f"{time.monotonic_ns()}.log")


def start_launch(out: Path, nproc: int, *args: str) -> Started:
    return Started(launch_cmd(out, nproc, *args), (LOGS[0] if LOGS else out / "logs") / f"{time.monotonic_ns()}.log")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc."""
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop(0))
        found += children
        todo += children
    return found


def wait_for_step(run_dir: Path, step: int, proc: Started, limit_s: float = LIMIT_S) -> bool:
    """Poll metrics.jsonl until it holds `step` (False when the process ended first or the time ran out)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s and proc.alive():
        if last_logged(run_dir) >= step:  # a line being written is left out
            return True
        time.sleep(0.01)
    return False


# ----------------------------------------------------------------------------------------------------
# Outcomes


def error_lines(text: str, command: str = "train") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"amorlip {command}: error:")]


PROGRESS_LINE = re.compile(r"^step \d+/\d+ ")


def one_error_line(proc: subprocess.CompletedProcess, warnings: int = 0) -> bool:
    """stderr is one line, `amorlip train: error: ...`, after exactly `warnings` lines `amorlip train: warning:
    ...`, besides the progress lines of the steps trained (no traceback, nothing else)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    return (len(lines) == warnings + 1 and lines[-1].startswith("amorlip train: error:")
            and all(line.startswith("amorlip train: warning:") for line in lines[:-1]))


SHORT_NAMES: dict[str, str] = {}
"""Paths shown shorter in the table (the drill's work folder as OUT)."""


def error_line(proc: subprocess.CompletedProcess | str, width: int = 110, around: str | None = None) -> str:
    """The error line's message (or a traceback's last line, or the end of stderr), its paths shortened
    (SHORT_NAMES, a tmpfs as MOUNT), cut to `width` characters (from a little before `around`, if it is there)."""
    text = proc if isinstance(proc, str) else proc.stderr
    for path, short in SHORT_NAMES.items():
        text = text.replace(path, short)
    text = re.sub(r"/tmp/amorlip-tmpfs-\w+", "MOUNT", text)
    if "Traceback" in text:
        return "TRACEBACK: " + text.strip().splitlines()[-1][:width]
    lines = error_lines(text)
    message = lines[0][len("amorlip train: error: "):] if lines else text.strip()[-width:]
    at = message.find(around) if around else -1
    return ("..." + message[max(0, at - 20):][:width]) if at > 20 else message[:width]


def last_logged(run_dir: Path) -> int:
    """The highest step in metrics.jsonl (0 when there is none)."""
    return max((row["step"] for row in read_history(run_dir)), default=0)


def latest_step(run_dir: Path) -> int | None:
    path = ckpt.latest_checkpoint(run_dir)
    return int(ckpt.load_checkpoint(path)["step"]) if path else None


def is_whole(path: Path | None) -> bool:
    """A checkpoint file that is there and whole (every member matches its CRC-32)."""
    try:
        ckpt.verify_checkpoint(path)
        return path is not None
    except Exception:  # noqa: BLE001 - any failure: not whole
        return False


def step_files(run_dir: Path) -> list[Path]:
    return sorted(ckpt.checkpoint_dir(run_dir).glob("step_*.pt"))


def temporaries(run_dir: Path) -> list[Path]:
    folder = ckpt.checkpoint_dir(run_dir)
    return sorted(folder.glob(f".*{ckpt.TMP_SUFFIX}")) if folder.is_dir() else []


# ----------------------------------------------------------------------------------------------------
# Whole-state comparison


def _same_tensor(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point() or a.is_complex():
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))
    return torch.equal(a, b)


def state_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """The places where two nested states differ (tensors bit for bit, with dtype and shape; NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return [] if _same_tensor(a, b) else [where or "<tensor>"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
        return [] if same else [where or "<array>"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where or '<top>'}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        out: list[str] = []
        for k in a:
            out += state_differences(a[k], b[k], f"{where}.{k}" if where else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += state_differences(x, y, f"{where}[{i}]")
        return out
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [where or "<value>"]


def comparable_checkpoint(path: Path, ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A checkpoint without what names the run's place and start (RUN_IDENTITY and `ignore` config keys)."""
    state = ckpt.load_checkpoint(path)
    state["config"] = {k: v for k, v in flatten(state["config"]).items() if k not in RUN_IDENTITY | ignore}
    return state


def comparable_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_history(run_dir)]


def run_differences(a: Path, b: Path, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Where run folder `a` differs from `b`: the latest checkpoint's every entry (model, optimizer moments and step
    counts, scaler, objective state, RNG states, data counters, step, config less RUN_IDENTITY and `ignore`) and
    the metrics.jsonl rows less TIMING_FIELDS. Empty: the runs are the same."""
    pa, pb = ckpt.latest_checkpoint(a), ckpt.latest_checkpoint(b)
    if pa is None or pb is None:
        return [f"no checkpoint in {a if pa is None else b}"]
    diff = state_differences(comparable_checkpoint(pa, ignore), comparable_checkpoint(pb, ignore))
    rows_a, rows_b = comparable_rows(a), comparable_rows(b)
    if len(rows_a) != len(rows_b):
        diff.append(f"metrics: {len(rows_a)} rows vs {len(rows_b)}")
    else:
        diff += [f"metrics row of step {ra.get('step')}" for ra, rb in zip(rows_a, rows_b) if state_differences(ra, rb)]
    return diff


def verdict(diff: list[str]) -> str:
    """'identical (N rows)' or what differs (the first few places)."""
    if not diff:
        return "whole state and rows identical"
    return f"DIFFERENT in {len(diff)} places: {', '.join(diff[:3])}"


class References:
    """Uninterrupted runs, made once per setting and shared by the cases that compare against them."""

    def __init__(self, out: Path) -> None:
        self.out, self.made = out / "references", {}

    def get(self, *args: str) -> Path | None:
        """The run folder of an uninterrupted run with `args` (None when it failed: the case then fails)."""
        key = hashlib.sha1("\0".join(args).encode()).hexdigest()[:10]
        if key not in self.made:
            shutil.rmtree(self.out / key, ignore_errors=True)  # one left by an earlier drill into the same --out
            r = run(self.out, *args, "--train.name", key)
            self.made[key] = self.out / key if r.returncode == 0 else None
        return self.made[key]


# ----------------------------------------------------------------------------------------------------
# File systems


@contextlib.contextmanager
def tmpfs(size: str, read_only: bool = False) -> Iterator[Path | None]:
    """A fresh tmpfs of `size` mounted on a temporary folder (root only); None where it cannot be mounted."""
    mount = Path(tempfile.mkdtemp(prefix="amorlip-tmpfs-"))
    options = f"{'ro,' if read_only else ''}size={size}"
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                                   capture_output=True).returncode == 0
    try:
        yield mount if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Faults: processes and data


def worker_rank(pid: int) -> int | None:
    """The RANK a torchrun worker was started with (None: not a worker, or gone)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def file_size_limit(limit: int):
    """A `preexec_fn`: files over `limit` bytes fail with EFBIG (SIGXFSZ ignored), as a full disk fails with ENOSPC."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def without_captions(shards: list[Path]) -> None:
    """Rewrite webdataset shards without their captions (the .txt members)."""
    for shard in shards:
        with tarfile.open(shard) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if not m.name.endswith(".txt")]
        with tarfile.open(shard, "w") as tf:
            for m, data in members:
                tf.addfile(m, io.BytesIO(data))


def readable_keys(shard: Path) -> dict[str, set[str]]:
    """The samples of a tar (key -> extensions) whose members can be read whole, read with the standard library
    as a stream (as webdataset reads it); reading stops at the first error."""
    found: dict[str, set[str]] = {}
    try:
        with tarfile.open(shard, "r|*") as tf:
            for m in tf:
                tf.extractfile(m).read()
                key, ext = m.name.split(".", 1)
                found.setdefault(key, set()).add(ext)
    except (tarfile.TarError, EOFError, OSError):
        pass
    return found


# ----------------------------------------------------------------------------------------------------
# The table


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool]] = []

    def add(self, case: str, expected: str, got: str, ok: bool) -> None:
        self.rows.append((case, expected, got, ok))
        print(f"[{'ok' if ok else 'FAIL'}] {case}: {got}", flush=True)

    def markdown(self) -> str:
        lines = ["| case | expected | got | ok |", "|---|---|---|---|"]
        lines += [f"| {c} | {e} | {g.replace('|', '/')} | {'yes' if ok else 'NO'} |" for c, e, g, ok in self.rows]
        return "\n".join(lines)
