"""Ctrl-C (SIGINT) saves like SIGTERM: the step finishes, a checkpoint is written, exit 130, and the message's
advice works; a second Ctrl-C stops at once; two signals of one request (within SAME_REQUEST_S) count once;
`compare` stops its run the same way and says how to continue. Real subprocesses and real signals."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from amorlip import checkpoint as ckpt
from faults_common import ENV, TIMEOUT, TINY, compare_runs, run, train_cmd, wait_for_step


def _stop_after(proc: subprocess.Popen, run_dir, step: int, sig: int = signal.SIGINT) -> str:
    try:
        wait_for_step(run_dir, step, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    return err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_saves_and_the_advice_works(tmp_path):
    common = ["--train.steps", "2000", "--train.log-every", "1", "--train.name", "c"]
    proc = subprocess.Popen(train_cmd(tmp_path, *common), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = _stop_after(proc, tmp_path / "c", 3)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "c"))["step"]
    assert 3 <= saved < 2000
    assert f"received SIGINT at step {saved}: checkpoint" in err and "continue with --train.resume latest" in err
    resumed = run(tmp_path, *common, "--train.resume", "latest", "--train.stop-at", str(saved + 2))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "c"))["step"] == saved + 2


def _signals_in_a_child(script: str) -> subprocess.CompletedProcess:
    code = "import os, signal, time\nfrom amorlip.signals import StopRequest\n" + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_stops_at_once():
    proc = _signals_in_a_child("""
        with StopRequest(same_request_s=0.2) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            print("first recorded:", stop.name, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
            print("still alive")
    """)
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert "first recorded: SIGINT" in proc.stdout and "still alive" not in proc.stdout


@pytest.mark.timeout(60)
def test_two_signals_of_one_request_count_once():
    """SIGINT from the terminal and SIGTERM from a launcher, or a scheduler's signal to every process, at once."""
    proc = _signals_in_a_child("""
        with StopRequest(same_request_s=5.0) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("alive, stopping on", stop.name, flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "alive, stopping on SIGTERM" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_in_compare_saves_its_run_and_says_how_to_continue(tmp_path):
    words = ["--objectives", "clip", *TINY, "--train.steps", "2000", "--train.log-every", "1", "--out",
             str(tmp_path / "cmp"), "--train.output-dir", str(tmp_path / "runs")]
    (one,) = compare_runs(words)
    cmd = [sys.executable, "-m", "amorlip.cli", "compare", *words]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _stop_after(proc, one.run_dir, 3)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "received SIGINT" in err and "rerun the same command to continue" in err
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir))["step"]
    assert 3 <= saved < 2000
    again = subprocess.run(cmd + ["--train.stop-at", str(saved + 1)], env=ENV, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert f"resumed from {ckpt.latest_checkpoint(one.run_dir).parent}" in again.stdout, again.stdout[-2000:]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir))["step"] == saved + 1
