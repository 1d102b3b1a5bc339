"""Atomic checkpoint writing: a failed write never breaks the latest checkpoint."""
import pytest
import torch

from amorlip import checkpoint as ckpt


def test_save_latest_and_prune(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    files = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).glob("step_*.pt"))
    assert files == ["step_00000002.pt", "step_00000003.pt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003.pt"
    assert ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path))["step"] == 3


def test_failed_write_keeps_previous_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})

    def boom(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(ckpt.CheckpointError, match="free disk space"):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001.pt"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 1
    assert not list(ckpt.checkpoint_dir(tmp_path).glob("*.tmp")), "temporary file left behind"
    assert not (ckpt.checkpoint_dir(tmp_path) / "step_00000002.pt").exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="could not be read"):
        ckpt.load_checkpoint(bad)
    with pytest.raises(ckpt.CheckpointError, match="neither"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint yet"):
        ckpt.resolve_checkpoint(tmp_path)
