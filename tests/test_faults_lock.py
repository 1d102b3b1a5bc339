"""One process per folder (amorlip.runlock): a second training into a run folder in use, or a compare whose --out
or run folders are in use, stops with one error line naming the process that holds it (exit 2) before any work;
the first run is untouched; a lock left by a kill -9 is never in the way."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from amorlip import checkpoint as ckpt
from amorlip.runlock import LOCK_NAME, FolderInUse, FolderLock, check_free
from faults_common import ENV, compare_runs, TIMEOUT, history, one_error_line, run, train_cmd, wait_for_step


def test_lock_names_its_holder_and_goes_with_it(tmp_path):
    folder = tmp_path / "new"
    first = FolderLock(folder, "run folder", "pick another").acquire()
    holder = json.loads((folder / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(FolderInUse, match=rf"run folder {folder} is in use by another process \(pid {os.getpid()} "
                                          rf"on {socket.gethostname()} since .*\); pick another"):
        FolderLock(folder, "run folder", "pick another").acquire()
    first.release()
    assert not folder.exists(), "a folder made only for the lock goes with it"
    with FolderLock(folder, "run folder", "x"):
        (folder / "kept").write_text("")
    assert (folder / "kept").exists() and not (folder / LOCK_NAME).exists()
    check_free(folder, "run folder", "x")  # free: nothing raised, nothing left
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_file_without_a_live_holder_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone"}))  # as a kill -9 leaves it
    with FolderLock(tmp_path, "run folder", "x") as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_training_into_a_folder_in_use_is_refused(tmp_path):
    """The second run is refused; the first, stopped later by SIGTERM, has exactly its own lines and checkpoint."""
    common = ["--train.steps", "2000", "--train.log-every", "1", "--train.name", "one"]
    first = subprocess.Popen(train_cmd(tmp_path, *common), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(tmp_path / "one", 2, first)
        second = run(tmp_path, *common)
        assert first.poll() is None, "the first run must still be training for this test to mean anything"
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=TIMEOUT)
    finally:
        first.kill()
    assert second.returncode == 2
    line = one_error_line(second)
    assert f"run folder {tmp_path / 'one'} is in use by another process (pid {first.pid} on " \
           f"{socket.gethostname()}" in line and "--train.name NEW_NAME" in line
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "one"))["step"]
    assert [row["step"] for row in history(tmp_path / "one")] == list(range(1, saved + 1))
    assert not (tmp_path / "one" / LOCK_NAME).exists(), "the lock goes with its holder"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_after_a_kill_9_of_the_holder_a_new_run_resumes(tmp_path):
    common = ["--train.steps", "200", "--train.log-every", "1", "--train.checkpoint-every", "2", "--train.name", "k"]
    proc = subprocess.Popen(train_cmd(tmp_path, *common), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_step(tmp_path / "k", 5, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert json.loads((tmp_path / "k" / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind, not held
    resumed = run(tmp_path, *common, "--train.stop-at", "8", "--train.resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "k"))["step"] == 8


COMPARE = ["--config", "tiny-demo", "--objectives", "clip", "--train.steps", "2"]


def _compare(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "amorlip.cli", "compare", *COMPARE, "--out", str(tmp_path / "cmp"),
           "--train.output-dir", str(tmp_path / "runs"), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compare_into_a_folder_in_use_is_refused(tmp_path):
    with FolderLock(tmp_path / "cmp", "compare folder", "x"):  # another compare writing there
        proc = _compare(tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc, "compare")
    assert f"compare folder {tmp_path / 'cmp'} is in use by another process (pid {os.getpid()}" in line
    assert "pass another --out" in line
    assert not (tmp_path / "runs").exists(), "nothing was trained"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compare_whose_run_is_in_use_is_refused(tmp_path):
    (one,) = compare_runs([*COMPARE, "--out", str(tmp_path / "cmp"), "--train.output-dir", str(tmp_path / "runs")])
    run_dir = one.run_dir
    with FolderLock(run_dir, "run folder", "x"):  # e.g. a training started by hand into that run
        proc = _compare(tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc, "compare")
    assert f"the run folder of {one.label}, {run_dir} is in use by another process (pid {os.getpid()}" in line
    assert not (tmp_path / "cmp" / LOCK_NAME).exists()
