"""Helpers of the fault tests (tests/test_faults_*.py): tiny training runs as real subprocesses, with timeouts."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "256", "--train.batch-size", "16",
        "--optim.warmup-steps", "2", "--train.threads", "1", "--eval.zeroshot", "false", "--eval.retrieval", "false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 240


def train_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "amorlip.cli", "train", "--train.output-dir", str(out), *TINY, *args]


def run(out: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(out, *args), env=ENV, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def one_error_line(proc: subprocess.CompletedProcess, command: str = "train") -> str:
    """The run's single `amorlip <command>: error:` line (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"amorlip {command}: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def limit_file_size(limit: int):
    """A `preexec_fn` for subprocess: files over `limit` bytes fail with EFBIG (ignoring SIGXFSZ), as a full
    disk's ENOSPC would."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def history(run_dir: Path) -> list[dict]:
    from amorlip.history import read_history

    return read_history(run_dir)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, deadline_s: float = TIMEOUT) -> None:
    """Poll metrics.jsonl until it holds `step` (the run is then past its set-up and mid-training)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        steps = [row["step"] for row in history(run_dir)]  # a line being written is left out
        if steps and max(steps) >= step:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {deadline_s} s")


def compare_runs(words: list[str]) -> list:
    """The runs (compare.PlannedRun: label, cfg, run_dir) that `amorlip compare WORDS` would train."""
    import argparse

    from amorlip.cli import _compare_options
    from amorlip.compare import compare_configs
    from amorlip.config import parse_config_args

    own, overrides = parse_config_args(words, "amorlip compare", "", _compare_options)
    budget_given = any(w == "--budget" or w.startswith("--budget=") for w in words)
    return compare_configs(argparse.Namespace(**own, budget_given=budget_given), overrides)
