"""Checkpoints that are not good: the divergence message names a checkpoint whose next step was finite (resumed
as it is, it trains on); a loaded checkpoint with non-finite values, or one whose bytes changed on disk (CRC-32),
is one error line (exit 2); a truncated or damaged newest checkpoint is passed over, with a line saying so, for
the one before it."""
from __future__ import annotations

import math
import re
import shutil
import zipfile

import pytest
import torch

from amorlip import checkpoint as ckpt
from faults_common import history, one_error_line, run

DIVERGE = ["--train.steps", "40", "--optim.lr", "1e3", "--train.checkpoint-every", "1", "--train.keep-checkpoints",
           "2", "--train.log-every", "1", "--train.name", "nan"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_named_checkpoint_trains_on(tmp_path):
    proc = run(tmp_path, *DIVERGE)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_error_line(proc)
    failed_at = int(re.search(r"loss is nan at step (\d+)", line).group(1))
    named = re.search(r"last good checkpoint: (\S+\.pt)", line).group(1)
    step = ckpt.load_checkpoint(named)["step"]
    assert step < failed_at, "the checkpoint just before the non-finite step is not the one to continue from"
    assert (tmp_path / "nan" / "checkpoints" / f"step_{failed_at:08d}.pt").exists(), "kept: the newest checkpoint"
    # resumed as it is (same settings, the same next step), the named checkpoint's next step is finite
    again = run(tmp_path, *DIVERGE, "--train.resume", named, "--train.stop-at", str(step + 1))
    assert again.returncode == 0, again.stderr[-2000:]
    assert math.isfinite([r for r in history(tmp_path / "nan") if r["step"] == step + 1][0]["loss"])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    proc = run(out, "--train.steps", "4", "--train.checkpoint-every", "2", "--train.name", "b")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "b"


def _copy(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "b")
    return tmp_path / "b", ckpt.checkpoint_dir(tmp_path / "b")


def _flip_a_byte(path):
    """Change one byte inside a tensor's data, as a failing disk or memory does: torch.load alone would not see it."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


RESUME = ["--train.steps", "6", "--train.checkpoint-every", "2", "--train.name", "b",
          "--train.resume-allow-changes", "train.steps"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_checkpoint_with_non_finite_values_is_refused(base_run, tmp_path):
    run_dir, ckdir = _copy(base_run, tmp_path)
    newest = ckdir / "step_00000004.pt"
    state = ckpt.load_checkpoint(newest)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key].view(-1)[0] = float("nan")
    torch.save(state, newest)
    before = newest.read_bytes()
    proc = run(tmp_path, *RESUME, "--train.resume", "latest")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"checkpoint {newest} holds non-finite values (1 tensors, e.g. model.{key})" in line and "--train.resume PATH" in line
    assert newest.read_bytes() == before, "a refused checkpoint is left as it was"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_changed_byte_is_found(base_run, tmp_path):
    run_dir, ckdir = _copy(base_run, tmp_path)
    newest = ckdir / "step_00000004.pt"
    _flip_a_byte(newest)
    proc = run(tmp_path, *RESUME, "--train.resume", str(newest))
    assert proc.returncode == 2
    assert f"checkpoint {newest} is damaged: " in one_error_line(proc) and "CRC-32" in one_error_line(proc)
    proc = run(tmp_path, *RESUME, "--train.resume", "latest")  # latest passes over it to the one before
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is damaged" in proc.stdout and "trying the one before it" in proc.stdout
    assert f"resumed from {ckdir / 'step_00000002.pt'} at step 2" in proc.stdout
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"] == 6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(base_run, tmp_path):
    run_dir, ckdir = _copy(base_run, tmp_path)
    newest = ckdir / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = run(tmp_path, *RESUME, "--train.resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: checkpoint {newest} is truncated or damaged" in proc.stdout
    assert f"resumed from {ckdir / 'step_00000002.pt'} at step 2" in proc.stdout
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"] == 6


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    path = ckpt.latest_checkpoint(tmp_path)
    path.write_bytes(b"PK\x03\x04 cut short")
    seen = []
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        ckpt.latest_whole_checkpoint(tmp_path, seen.append)
    assert len(seen) == 1 and str(path) in seen[0]


def test_pruning_keeps_the_protected_checkpoint(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=1)
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=1, protect=first)
    ckpt.save_checkpoint(tmp_path, 3, {"step": 3}, keep=1, protect=first)
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).glob("step_*.pt")) == \
           ["step_00000001.pt", "step_00000003.pt"]
