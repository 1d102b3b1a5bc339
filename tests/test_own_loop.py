"""examples/own_loop.py (a plain PyTorch + open_clip loop with amorlip.make_loss) gives the weights `amorlip
train` gives with the same settings and seed."""
import importlib.util
from pathlib import Path

import pytest
import torch

from amorlip import checkpoint as ckpt
from amorlip.config import build_config
from amorlip.train import train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"
STEPS, BATCH, SIZE, WARMUP = 6, 32, 128, 2  # 4 steps an epoch: the run crosses an epoch boundary


def load_example():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("objective", ["clip", "amorlip", "fastclip"])
def test_own_loop_equals_amorlip_train(objective, tmp_path):
    cfg = build_config("tiny-clip", [
        ("objective", objective), ("train.steps", STEPS), ("train.batch_size", BATCH),
        ("data.synthetic_size", SIZE), ("data.workers", 0), ("optim.warmup_steps", WARMUP),
        ("eval.zeroshot", False), ("eval.retrieval", False), ("train.checkpoint_every", 0),
        ("train.output_dir", str(tmp_path)), ("train.progress", False)])
    result = train(cfg)
    theirs = ckpt.load_checkpoint(ckpt.latest_checkpoint(result.run_dir))["model"]

    model = load_example().main(["--objective", objective, "--steps", str(STEPS), "--batch-size", str(BATCH),
                                 "--dataset-size", str(SIZE), "--warmup", str(WARMUP)])
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    moved = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"{objective}: largest difference {moved:.1e}")
