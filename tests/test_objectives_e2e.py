"""Every registered objective trains from the CLI and resumes exactly (model, optimizer and objective state)."""
import pytest
import torch

from amorlip.checkpoint import latest_checkpoint, load_checkpoint
from amorlip.cli import main
from amorlip.objectives import REGISTRY
from state_utils import assert_same_state

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "96", "--train.batch-size", "16",
        "--optim.warmup-steps", "2", "--train.progress", "false", "--train.log-every", "1", "--train.steps", "9",
        "--train.checkpoint-every", "4", "--eval.zeroshot", "false", "--eval.retrieval", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(REGISTRY))
def test_objective_trains_and_resumes_exactly(tmp_path, objective):
    # 96 samples / batch 16 = 6 steps per epoch: the resumed part crosses an epoch boundary
    base = ["train", "--objective", objective, "--train.output-dir", str(tmp_path), *TINY]
    assert main([*base, "--train.name", "straight"]) == 0
    assert main([*base, "--train.name", "split", "--train.stop-at", "4"]) == 0
    assert main([*base, "--train.name", "split", "--train.resume", "latest"]) == 0
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 9
    assert_same_state(a["model"], b["model"], "model")
    assert_same_state(a["objective"], b["objective"], "objective")
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())
