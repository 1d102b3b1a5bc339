"""The options of tests/test_model_options.py in training: augmented batches under the per-sample seeding (the
same seed, the same batches; an exact resume), RECLIP with model.force_image_size, an `hf-hub:` model from a
fabricated local Hugging Face cache, and export of a forced-size run."""
from __future__ import annotations

import json

import pytest
import torch

from amorlip import models
from amorlip.checkpoint import latest_checkpoint, load_checkpoint
from amorlip.cli import main
from amorlip.config import build_config
from amorlip.data.loader import build_train_stream
from amorlip.model_options import AugConfig

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "64", "--train.batch-size", "16",
        "--optim.warmup-steps", "2", "--train.progress", "false", "--eval.zeroshot", "false",
        "--eval.retrieval", "false", "--train.checkpoint-every", "100", "--train.keep-checkpoints", "10"]
AUG = ["--aug.scale", "[0.3,1.0]", "--aug.color-jitter", "[0.4,0.4,0.4,0.1]", "--aug.color-jitter-prob", "0.8",
       "--aug.gray-scale-prob", "0.2"]



def train(tmp_path, *args) -> int:
    return main(["train", "--train.output-dir", str(tmp_path), *TINY, *args])


def last_state(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))


def _batches(aug: AugConfig, seed: int, n: int = 2) -> list[torch.Tensor]:
    cfg = build_config("tiny-clip", [("model.name", "micro-vit"), ("data.synthetic_size", 64)])
    _, transform, _, tokenizer = models.build_model(cfg.model, aug=aug)
    stream = build_train_stream(cfg.data, 16, seed)
    out = []
    for batch in stream.iterate(0, 0, transform, tokenizer):
        out.append(batch["image"])
        if len(out) == n:
            return out
    return out


def test_augmented_batches_repeat_with_the_seed():
    aug = AugConfig(scale=[0.3, 1.0], color_jitter=[0.4, 0.4, 0.4, 0.1], color_jitter_prob=0.8, gray_scale_prob=0.2)
    a, b = _batches(aug, seed=3), _batches(aug, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], _batches(aug, seed=4)[0])
    assert not torch.equal(a[0], _batches(AugConfig(), seed=3)[0])  # the augmentation is really applied


@pytest.mark.slow
def test_resume_with_augmentation_is_exact(tmp_path):
    common = ["--train.steps", "6", *AUG]  # 4 steps per epoch: the resume also crosses an epoch
    assert train(tmp_path, *common, "--train.name", "straight") == 0
    assert train(tmp_path, *common, "--train.name", "split", "--train.stop-at", "3") == 0
    assert train(tmp_path, *common, "--train.name", "split", "--train.resume", "latest") == 0
    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_refuses_a_changed_augmentation(tmp_path, capsys):
    assert train(tmp_path, "--train.steps", "2", "--train.name", "r", "--train.stop-at", "1") == 0
    capsys.readouterr()
    assert train(tmp_path, "--train.steps", "2", "--train.name", "r", "--train.resume", "latest",
                 "--aug.gray-scale-prob", "0.5") == 2
    err = capsys.readouterr().err
    assert "aug.gray_scale_prob None -> 0.5" in err and "--train.resume-allow-changes aug.gray_scale_prob" in err


def test_reclip_ends_at_the_forced_image_size_and_exports_it(tmp_path, capsys):
    """micro-vit is 16 px; forced to 24 px, RECLIP trains at 8 px, then at 24 px (the native size now)."""
    common = ["--train.steps", "4", "--model.force-image-size", "24", *AUG]
    assert train(tmp_path, *common, "--resolution.phases", "[[0.5, 8], [0.5, 16]]", "--train.name", "bad") == 2
    err = capsys.readouterr().err
    assert "native 24 px" in err and "--model.force-image-size" in err
    assert train(tmp_path, *common, "--resolution.phases", "[[0.5, 8], [0.5, 24]]", "--train.name", "r") == 0
    state = last_state(tmp_path / "r")
    assert state["model"]["visual.positional_embedding"].shape[0] == 1 + 6 * 6
    capsys.readouterr()
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "exp")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"exported: {tmp_path / 'exp' / 'micro-vit.pt'} ({len(state['model'])} tensors)"
    config = json.loads((tmp_path / "exp" / "micro-vit.json").read_text())
    assert config["vision_cfg"]["image_size"] == 24
    exported = torch.load(tmp_path / "exp" / "micro-vit.pt", weights_only=True)["state_dict"]
    assert torch.equal(exported["visual.positional_embedding"], state["model"]["visual.positional_embedding"])
    assert main(["eval", str(tmp_path / "r"), "--out", str(tmp_path / "eval.json")]) == 0


def _fake_hub(tmp_path, repo: str = "someone/tiny-clip") -> tuple[dict, dict]:
    """A Hugging Face cache holding `repo` as open_clip publishes a model: open_clip_config.json and weights."""
    model, *_ = models.create_model("tiny-vit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    config = {"model_cfg": models.model_config("tiny-vit"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}}
    (snap / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(state, snap / "open_clip_pytorch_model.bin")
    return state, config


def test_hf_hub_model_from_the_local_cache(tmp_path, monkeypatch, capsys):
    state, _ = _fake_hub(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = build_config("tiny-clip", [("model.name", "hf-hub:someone/tiny-clip")])
    model, _, eval_tf, tokenizer = models.build_model(cfg.model)
    for key, value in model.state_dict().items():  # its weights, as open_clip would load them
        assert torch.equal(value, state[key]), key
    assert list(eval_tf.transforms[-1].mean) == [0.5] * 3  # its preprocessing
    assert tokenizer(["a photo"]).shape == (1, 32)
    # a user value wins over the repo's preprocessing
    cfg.model.image_mean = [0.1, 0.2, 0.3]
    assert list(models.build_model(cfg.model)[2].transforms[-1].mean) == [0.1, 0.2, 0.3]
    args = ["--model.name", "hf-hub:someone/tiny-clip", "--data.synthetic-size", "64", "--train.batch-size", "16",
            "--train.steps", "1", "--train.progress", "false", "--eval.zeroshot", "false", "--eval.retrieval", "false"]
    assert main(["train", "--train.output-dir", str(tmp_path / "runs"), *args]) == 0
    assert (tmp_path / "runs" / "clip-hf-hub-someone--tiny-clip-b16-s0" / "summary.json").is_file()
