"""Paths no other test reaches, each checked against a fact known independently of the code under test:
resume from a named checkpoint file, a run sized by epochs, gradient clipping's effect on the update,
resume-neutral settings, `pipe:` webdataset shards, SigLIP's initial bias in an export, torch.compile on the
CPU, and the switch to rho_final in a real run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import amorlip.train as train_mod
from amorlip.checkpoint import load_checkpoint
from amorlip.cli import main

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "256", "--train.batch-size", "16",
        "--optim.warmup-steps", "2", "--train.progress", "false", "--train.log-every", "1", "--train.threads", "1",
        "--eval.zeroshot", "false", "--eval.retrieval", "false"]


def run_cli(out: Path, *args: str) -> int:
    return main(["train", "--train.output-dir", str(out), *TINY, *args])


def rows_of(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training rows (those with a loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def final_state(run_dir: Path) -> dict:
    files = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return load_checkpoint(files[-1])


def count_steps(monkeypatch) -> list[int]:
    """Record the step index every optimizer step of the trainer starts from."""
    started: list[int] = []
    real = train_mod._train_step

    def counted(run, batch, epoch):
        started.append(run.step)
        return real(run, batch, epoch)

    monkeypatch.setattr(train_mod, "_train_step", counted)
    return started


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("amorlip train: error:")]


# --- 1: --train.resume PATH (a named checkpoint file, not the newest) ------------------------------------------


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_file(tmp_path, monkeypatch, capsys):
    """A run stopped at step 4 with checkpoints at 2 and 4, resumed from step_2's file by its path: it trains
    exactly the steps 2..5 and ends bit-identical to an uninterrupted 6-step run."""
    common = ["--train.steps", "6", "--data.synthetic-size", "64", "--train.checkpoint-every", "2",
              "--train.keep-checkpoints", "10"]
    assert run_cli(tmp_path, *common, "--train.name", "straight") == 0
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.stop-at", "4") == 0
    ckdir = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    capsys.readouterr()
    started = count_steps(monkeypatch)
    named = ckdir / "step_00000002.pt"
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.resume", str(named)) == 0
    assert started == [2, 3, 4, 5]  # from the named file's step, not the newest checkpoint's (4)
    assert f"resumed from {named} at step 2" in capsys.readouterr().out
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the log holds each step once, and the resumed steps' losses are the uninterrupted run's
    straight, split = rows_of(tmp_path / "straight"), rows_of(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7))
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]


# --- 2: a run sized by --train.epochs alone -----------------------------------------------------------------


def test_epochs_alone_sets_the_number_of_steps(tmp_path):
    """--train.epochs 2 without --train.steps: 50 samples in batches of 16 make 3 whole batches per epoch (the
    last partial batch of 2 is dropped), so 6 steps, epochs 0 and 1, and summary.json says 6."""
    assert run_cli(tmp_path, "--train.epochs", "2", "--data.synthetic-size", "50", "--train.name", "ep") == 0
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    assert summary["steps"] == 2 * (50 // 16) == 6
    rows = rows_of(tmp_path / "ep")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert final_state(tmp_path / "ep")["step"] == 6
