"""scripts/fault_drill.py: its whole-state comparison tells runs apart by any entry, and its case selection works.

The drill itself runs real trainings (tens of minutes); the end-to-end test here runs one cheap case."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from drill_common import PROGRESS_LINE, state_differences  # noqa: E402


def _state() -> dict:
    random.seed(3)
    return {
        "step": 7,
        "model": {"w": torch.arange(6.0).reshape(2, 3), "nan": torch.tensor([float("nan"), 1.0])},
        "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3)}},
                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "objective": {"u": torch.zeros(4, dtype=torch.float64)},
        "rng": [{"torch": torch.get_rng_state(), "numpy": np.random.RandomState(0).get_state(),
                 "python": random.getstate()}],
        "data_stats": [{"seen": 96, "extra": {}, "bad_ids": {"corrupt": []}}],
        "config": {"optim.lr": 1e-3},
    }


def test_equal_states_have_no_differences_nan_included():
    assert state_differences(_state(), _state()) == []


@pytest.mark.parametrize("change,where", [
    (lambda s: s["optimizer"]["state"][0]["step"].add_(1), "optimizer.state.0.step"),
    (lambda s: s["objective"]["u"].__setitem__(2, 1e-300), "objective.u"),
    (lambda s: s["rng"][0].__setitem__("python", (3, s["rng"][0]["python"][1][:-1] + (1,), None)), "rng[0].python"),
    (lambda s: s["rng"][0]["numpy"][1].__setitem__(5, 1), "rng[0].numpy[1]"),
    (lambda s: s["data_stats"][0].__setitem__("seen", 97), "data_stats[0].seen"),
    (lambda s: s.__setitem__("step", 8), "step"),
    (lambda s: s["model"].__setitem__("w", s["model"]["w"].double()), "model.w"),
    (lambda s: s["config"].__setitem__("optim.lr", 2e-3), "config.optim.lr"),
])
def test_any_changed_entry_is_named(change, where):
    changed = _state()
    change(changed)
    found = state_differences(_state(), changed)
    assert len(found) == 1 and found[0].startswith(where), found


def test_a_missing_entry_is_named():
    changed = _state()
    del changed["objective"]
    assert state_differences(_state(), changed) == ["<top>: keys ['objective']"]


def test_progress_lines_are_told_from_other_lines():
    assert PROGRESS_LINE.match("step 6/6 (100.0%) epoch 0 | loss 2.7920 | lr 1.46e-04")
    assert not PROGRESS_LINE.match("amorlip train: error: could not write")


def _drill(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPTS / "fault_drill.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cases_lists_the_cases_and_refuses_unknown_ones():
    listed = _drill("--cases", "list", timeout=120)
    assert listed.returncode == 0 and "kill9" in listed.stdout and "ddp-world-size" in listed.stdout
    unknown = _drill("--cases", "stale,nope", timeout=120)
    assert unknown.returncode == 2 and "unknown case(s) nope" in unknown.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_cheap_case_runs_end_to_end(tmp_path):
    r = _drill("--quick", "--cases", "stale", "--out", str(tmp_path), timeout=380)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| resume with another lr | exit 2, one line, folder untouched |" in r.stdout
