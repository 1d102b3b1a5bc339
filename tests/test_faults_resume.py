"""A change accepted on resume takes effect: the lr, weight decay, betas and eps the optimizer uses after the
resume are the new settings (read from metrics.jsonl and the checkpoint's optimizer state), equal to those of an
uninterrupted run with the new values; the same for the AmorLIP nets' own optimizer (amor.lr)."""
from __future__ import annotations

import pytest

from amorlip import checkpoint as ckpt
from faults_common import history, run

CHANGED = ["--optim.lr", "5e-3", "--optim.weight-decay", "0.3", "--optim.beta2", "0.95", "--optim.eps", "1e-7"]
ACCEPT = ["--train.resume-allow-changes", "optim.lr,optim.weight_decay,optim.beta2,optim.eps"]


def _groups(run_dir) -> list[dict]:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["optimizer"]["param_groups"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_accepted_optimizer_changes_are_applied(tmp_path):
    common = ["--train.steps", "6", "--train.log-every", "1"]
    assert run(tmp_path, *common, "--train.name", "r", "--train.stop-at", "3").returncode == 0
    proc = run(tmp_path, *common, *CHANGED, *ACCEPT, "--train.name", "r", "--train.resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "optim.lr 0.001 -> 0.005" in proc.stdout
    proc = run(tmp_path, *common, *CHANGED, "--train.name", "straight")
    assert proc.returncode == 0, proc.stderr[-2000:]

    resumed = {row["step"]: row["lr"] for row in history(tmp_path / "r") if "lr" in row}
    straight = {row["step"]: row["lr"] for row in history(tmp_path / "straight") if "lr" in row}
    assert resumed[4] > 2e-3, "the lr after the resume follows the new optim.lr, not the saved one"
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    for group in _groups(tmp_path / "r"):
        assert group["base_lr"] == 5e-3 and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-7
        assert group["weight_decay"] == (0.3 if group["group"] == "decay" else 0.0)
    assert _groups(tmp_path / "r") == _groups(tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_unchanged_resume_keeps_the_saved_settings(tmp_path):
    """Nothing changed: the optimizer's settings after the resume are those it was saved with."""
    common = ["--train.steps", "4"]
    assert run(tmp_path, *common, "--train.name", "r", "--train.stop-at", "2").returncode == 0
    before = _groups(tmp_path / "r")
    assert run(tmp_path, *common, "--train.name", "r", "--train.resume", "latest").returncode == 0
    after = _groups(tmp_path / "r")
    assert [{k: v for k, v in g.items() if k != "lr"} for g in after] == \
           [{k: v for k, v in g.items() if k != "lr"} for g in before]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_accepted_amor_lr_is_applied(tmp_path):
    common = ["--objective", "amorlip", "--train.steps", "4"]
    assert run(tmp_path, *common, "--train.name", "a", "--train.stop-at", "2").returncode == 0
    proc = run(tmp_path, *common, "--amor.lr", "3e-2", "--train.resume-allow-changes", "amor.lr",
               "--train.name", "a", "--train.resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))
    extra = state["objective"]["_extra_state"]
    assert state["step"] == 4
    assert [g["lr"] for g in extra["optimizer"]["param_groups"]] == [3e-2]


def test_load_optimizer_state_keeps_the_built_settings():
    import torch

    p = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([p], lr=1.0, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-3)
    p.grad = torch.ones(3)
    old.step()
    new = torch.optim.AdamW([p], lr=2.0, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    ckpt.load_optimizer_state(new, old.state_dict())
    group = new.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (2.0, 0.1, (0.9, 0.99), 1e-8)
    assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
