"""metrics.jsonl on a full disk and after a torn write: the trainer stops with one error line (exit 2) and leaves
no torn line; a torn last line (a kill -9 mid-write) is dropped on resume and by every reader (amorlip.history:
the trainer, compare, its curves)."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from amorlip import checkpoint as ckpt
from amorlip.errors import CheckpointError
from amorlip.history import append_row, parse_lines, read_history, truncate_after
from faults_common import ENV, TIMEOUT, TINY, history, one_error_line, run

FULL_AT = 5  # the metrics line that meets the full disk
WRAPPER = f"""
import errno, sys
from amorlip import history
from amorlip.cli import main
calls = []
def full(f, data):
    calls.append(1)
    if len(calls) == {FULL_AT}:  # half the line reaches the file, then the disk is full
        f.write(data[: len(data) // 2]); f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    f.write(data); f.flush()
history._append = full
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_disk_while_logging_is_one_error_line_and_resume_continues(tmp_path):
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(WRAPPER)
    common = ["--train.steps", "8", "--train.log-every", "1", "--train.checkpoint-every", "2", "--train.name", "f"]
    proc = subprocess.run([sys.executable, str(wrapper), "train", "--train.output-dir", str(tmp_path), *TINY, *common],
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert "metrics.jsonl" in line and "No space left on device" in line and "free disk space" in line
    text = (tmp_path / "f" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(x)["step"] for x in text.splitlines()] == list(range(1, FULL_AT))
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "f"))["step"] == 4  # saved before the failure
    resumed = run(tmp_path, *common, "--train.resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [row["step"] for row in history(tmp_path / "f")] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    common = ["--train.steps", "6", "--train.log-every", "1", "--train.name", "t"]
    assert run(tmp_path, *common, "--train.stop-at", "3").returncode == 0
    path = tmp_path / "t" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 3.1, "lr"')  # a kill -9 in the middle of a write
    assert [row["step"] for row in read_history(tmp_path / "t")] == [1, 2, 3]
    proc = run(tmp_path, *common, "--train.resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dropped a torn last line" in proc.stdout
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_readers_leave_out_a_torn_last_line(tmp_path):
    from amorlip.compare.results import read_history as compare_history
    from amorlip.train import read_history as train_history

    path = tmp_path / "metrics.jsonl"
    append_row(path, {"step": 1, "loss": 2.0})
    append_row(path, {"step": 2, "loss": 1.5})
    path.write_text(path.read_text() + '{"step": 3, "lo')
    for reader in (read_history, compare_history, train_history):
        assert reader(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert parse_lines(path)[1] == '{"step": 3, "lo'
    assert truncate_after(tmp_path, 1) == '{"step": 3, "lo'
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_a_bad_line_before_the_end_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match="line 2 is not a metrics row"):
        read_history(tmp_path)


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    from amorlip import history as history_module

    path = tmp_path / "metrics.jsonl"
    append_row(path, {"step": 1})

    def full(f, data):
        f.write(data[:5])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(history_module, "_append", full)
    with pytest.raises(CheckpointError, match="could not write .*metrics.jsonl.*free disk space"):
        append_row(path, {"step": 2})
    assert path.read_text() == '{"step": 1}\n'
