"""`amorlip launch`: torchrun whose stop signals save, whoever receives them (amorlip.launch).

The end-to-end cases run 2 gloo workers under the launcher and signal them as SLURM does (every process of the
step at once, SIGUSR1) and as Kubernetes does (the launcher alone, SIGTERM): each saves one checkpoint at the step
it reached and exits 128 + signal, with no traceback and no status file left behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from amorlip import launch
from faults_common import ENV, TIMEOUT, TINY, history, wait_for_step


def test_report_stop_is_written_by_local_rank_0_only(tmp_path, monkeypatch):
    status = tmp_path / "status"
    monkeypatch.delenv(launch.STATUS_ENV, raising=False)
    assert launch.report_stop(15) is False  # not under the launcher: the worker exits 128 + signal itself
    monkeypatch.setenv(launch.STATUS_ENV, str(status))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.report_stop(15) is True and not status.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.report_stop(10) is True
    assert launch._read_status(status) == 10


@pytest.mark.parametrize("rc,saved,received,expected", [
    (0, None, None, 0), (1, None, None, 1), (0, 15, 15, 143), (0, 10, None, 138), (1, None, 2, 130), (1, 15, None, 143)])
def test_exit_status(rc, saved, received, expected):
    assert launch.exit_status(rc, saved, received) == expected


def test_forwarder_counts_a_repeat_within_a_second_once_and_reaches_late_workers():
    """Two sleeping children of a parent process stand for torchrun's workers; the first is there when the signal
    comes, the second starts later and still gets it; a repeat within the second is not passed on."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "a = subprocess.Popen(['sleep', '60']); print(a.pid, flush=True)\n"
                               "sys.stdin.readline()\n"
                               "b = subprocess.Popen(['sleep', '60']); print(b.pid, flush=True)\n"
                               "a.wait(); b.wait(); print(a.returncode, b.returncode, flush=True)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first = int(parent.stdout.readline())
        forwarder = launch.Forwarder()
        forwarder.handle(signal.SIGTERM, None)
        forwarder.handle(signal.SIGINT, None)  # within the second: the same request
        assert forwarder.requests == [signal.SIGTERM] and forwarder.signum == signal.SIGTERM
        forwarder.forward(parent.pid)
        parent.stdin.write("\n")
        parent.stdin.flush()
        second = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while second not in launch.child_pids(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        forwarder.forward(parent.pid)
        forwarder.forward(parent.pid)  # already sent: nothing more
        assert parent.stdout.readline().split() == [str(-signal.SIGTERM)] * 2
        assert first != second
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_forwarder_passes_on_a_later_second_signal():
    forwarder = launch.Forwarder(same_request_s=0.0)
    forwarder.handle(signal.SIGINT, None)
    forwarder.handle(signal.SIGINT, None)
    assert forwarder.requests == [signal.SIGINT, signal.SIGINT]  # the workers then stop at once


def test_help_names_torchrun_and_the_exit_statuses(capsys):
    from amorlip.cli import main

    assert main(["launch", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: amorlip launch [TORCHRUN OPTIONS]") and "143, 138, 130" in out


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        children = launch.child_pids(todo.pop())
        out += children
        todo += children
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("target,sig", [("every process", signal.SIGUSR1), ("the launcher", signal.SIGTERM)])
def test_a_stop_signal_under_the_launcher_saves_once_and_exits_128_plus_signal(tmp_path, target, sig):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "amorlip.cli", "launch", "--standalone", "--nproc_per_node", "2", "-m", "amorlip.cli",
           "train", "--train.output-dir", str(tmp_path), *TINY, "--train.steps", "400", "--train.log-every", "1",
           "--train.name", "ddp", "--train.device", "cpu"]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, env={**ENV, "TMPDIR": str(tmp)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(tmp_path / "ddp", 3, proc)
        pids = [proc.pid] + (_descendants(proc.pid) if target == "every process" else [])
        for pid in pids:  # (SLURM signals the launcher, torchrun and the workers at once)
            os.kill(pid, sig)
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 128 + sig, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    from amorlip import checkpoint as ckpt

    ckpts = sorted((tmp_path / "ddp" / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1, ckpts  # one checkpoint, saved together (the signal counted once)
    step = max(row["step"] for row in history(tmp_path / "ddp"))
    assert f"received {signal.Signals(sig).name} at step {step}: checkpoint {ckpts[0]} saved" in text, text[-2000:]
    saved = ckpt.load_checkpoint(ckpts[0])
    assert saved["step"] == step and saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert not list(tmp.glob("amorlip-launch-*"))  # the status file is removed
