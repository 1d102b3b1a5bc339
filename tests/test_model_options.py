"""open_clip's model-forcing, preprocessing and augmentation options (model.force_*, model.image_*, the aug
section): what they do to the model and the transforms, their checks, and that run hashes stay as they were."""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from PIL import Image

from amorlip import models
from amorlip.config import build_config, preset_names
from amorlip.config.sections import all_section_types
from amorlip.model_options import AugConfig, aug_cfg
from amorlip.resume import LATE_KEYS, config_hash, differences
from test_bad_input import assert_one_line_error, run_main

HASHES_BEFORE = {
    "cc12m-vitb32-amorlip-fdiv": "2cec66e1",
    "cc12m-vitb32-amorlip-l2log": "23578d8c",
    "cc12m-vitb32-amorlip-l2log-rho-release": "ac17cec2",
    "cc12m-vitb32-fastclip": "20c18fab",
    "cc12m-vitb32-reclip-amorlip": "5bc06024",
    "cc3m-rn50-amorlip-fdiv": "82085953",
    "cc3m-rn50-amorlip-l2log": "26a7ed8f",
    "cc3m-rn50-fastclip": "c991a928",
    "cc3m-rn50-reclip-amorlip": "9feebd6d",
    "fmnist60k-amorlip": "069b6dcf",
    "fmnist60k-amorlip-rho": "24de18d6",
    "fmnist60k-clip": "8685b5b9",
    "fmnist60k-fastclip": "867c8294",
    "tiny-amorlip": "300af7ad",
    "tiny-clip": "d9db0092",
    "tiny-demo": "b018b61c",
    "tiny-fastclip": "034cf0a1",
    "tiny-fmnist": "0b9a0434",
    "tiny-neuclip": "e39f870c",
    "tiny-reclip-amorlip": "f69a4f4f",
    "tiny-reclip-clip": "7c94f98f",
    "tiny-siglip": "5887d056",
    "tiny-sogclr": "91b3257a",
}
"""Every preset's run hash before these options existed (scripts/behaviour_snapshot.py on the commit before)."""


def _build(**options):
    cfg = build_config("tiny-clip", {})
    aug = AugConfig(**{k[4:]: v for k, v in options.items() if k.startswith("aug_")})
    for key, value in options.items():
        if not key.startswith("aug_"):
            setattr(cfg.model, key, value)
    cfg.model.validate()
    aug.validate()
    return models.build_model(cfg.model, aug=aug)


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _seeded(transform, image, seed: int = 7) -> torch.Tensor:
    import random

    torch.manual_seed(seed)
    random.seed(seed)
    return transform(image)


# ----------------------------------------------------------------------------------------------------
# Run hashes and resume


@pytest.mark.parametrize("name", preset_names())
def test_preset_run_hashes_are_unchanged(name):
    assert config_hash(build_config(name, {}).to_dict()) == HASHES_BEFORE[name]


def test_late_keys_are_result_keys_with_their_dataclass_defaults():
    defaults = {f"{section}.{f.name}": f.default for section, typ in all_section_types().items() for f in fields(typ)}
    for key, default in LATE_KEYS.items():
        assert key in defaults, key
        assert defaults[key] == default, key
    new = {k for k in defaults if k.startswith("aug.") or k.split(".")[-1].startswith(("force_", "image_"))}
    assert new <= set(LATE_KEYS), new - set(LATE_KEYS)


def test_a_late_key_set_changes_the_hash_and_is_refused_on_resume():
    base = build_config("tiny-clip", {}).to_dict()
    forced = build_config("tiny-clip", [("model.force_image_size", 48)]).to_dict()
    assert config_hash(forced) != config_hash(base)
    old = {s: ({k: v for k, v in vals.items() if f"{s}.{k}" not in LATE_KEYS} if isinstance(vals, dict) else vals)
           for s, vals in base.items() if s != "aug"}  # as an earlier version saved it
    assert config_hash(old) == config_hash(base)
    assert differences(old, base, 1, 1) == {}
    assert differences(old, forced, 1, 1) == {"model.force_image_size": (None, 48)}
    assert differences(forced, base, 1, 1) == {"model.force_image_size": (48, None)}


# ----------------------------------------------------------------------------------------------------
# What the options do


def test_force_image_size_sizes_the_model_and_both_transforms():
    model, train_tf, eval_tf, _ = _build(force_image_size=48)
    assert models.image_size(model) == 48
    assert train_tf(_image()).shape == eval_tf(_image()).shape == (3, 48, 48)
    with torch.no_grad():
        assert model.encode_image(eval_tf(_image())[None]).shape == (1, 64)


def test_patch_dropout_keeps_a_fraction_of_the_tokens_in_training_only():
    model, _, eval_tf, _ = _build(force_patch_dropout=0.5)
    seen = []
    model.visual.patch_dropout.register_forward_hook(lambda m, i, out: seen.append(out.shape[1]))
    x = eval_tf(_image())[None].repeat(2, 1, 1, 1)
    model.train()
    model.encode_image(x)
    model.eval()
    with torch.no_grad():
        model.encode_image(x)
    assert seen == [1 + 32, 1 + 64]  # class token + half of the 8x8 patches, then all of them


def test_force_quick_gelu():
    from open_clip.model import QuickGELU

    plain, _, _, _ = _build()
    quick, _, _, _ = _build(force_quick_gelu=True)
    assert not any(isinstance(m, QuickGELU) for m in plain.modules())
    assert any(isinstance(m, QuickGELU) for m in quick.modules())


def test_preprocessing_options_reach_the_eval_transform():
    _, _, default_tf, _ = _build()
    _, _, eval_tf, _ = _build(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], image_resize_mode="squash",
                              image_interpolation="bilinear")
    norm = eval_tf.transforms[-1]
    assert list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.25] * 3
    assert eval_tf(_image()).shape == (3, 32, 32)
    assert not torch.equal(eval_tf(_image()), default_tf(_image()))


def test_user_preprocessing_wins_over_a_pretrained_tags(monkeypatch, tmp_path):
    tag = {"mean": (0.1, 0.1, 0.1), "std": (0.2, 0.2, 0.2), "quick_gelu": False}
    monkeypatch.setattr(models, "resolve_pretrained", lambda name, value: (tmp_path / "w.pt", tag))
    monkeypatch.setattr(models, "load_pretrained", lambda *a, **k: tmp_path / "w.pt")
    _, _, eval_tf, _ = _build(pretrained="fake-tag")
    assert list(eval_tf.transforms[-1].mean) == [0.1] * 3  # the tag's, when the user gives none
    _, _, eval_tf, _ = _build(pretrained="fake-tag", image_mean=[0.5, 0.4, 0.3])
    assert list(eval_tf.transforms[-1].mean) == [0.5, 0.4, 0.3] and list(eval_tf.transforms[-1].std) == [0.2] * 3


def test_color_jitter_changes_the_train_transform_only():
    _, train0, eval0, _ = _build()
    _, train1, eval1, _ = _build(aug_color_jitter=[0.4, 0.4, 0.4, 0.1], aug_color_jitter_prob=1.0)
    _, train2, eval2, _ = _build(aug_gray_scale_prob=1.0)
    _, train3, eval3, _ = _build(aug_scale=[0.2, 0.3])
    image = _image()
    assert torch.equal(eval0(image), eval1(image)) and torch.equal(eval0(image), eval2(image))
    assert torch.equal(eval0(image), eval3(image))
    for train in (train1, train2, train3):  # the same crop draws first; then jitter / gray / another crop scale
        assert not torch.equal(_seeded(train0, image), _seeded(train, image))
        assert torch.equal(_seeded(train, image), _seeded(train, image))  # seeded: the same pixels again
    norm = train2.transforms[-1]
    gray = _seeded(train2, image) * torch.tensor(norm.std)[:, None, None] + torch.tensor(norm.mean)[:, None, None]
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)
    assert aug_cfg(AugConfig()) is None  # nothing set: open_clip's default train transform, as before


# ----------------------------------------------------------------------------------------------------
# User mistakes: one line, exit 2, before any work


@pytest.mark.parametrize("args, names", [
    (["--model.force-patch-dropout", "1.0"], ["model.force_patch_dropout", "[0, 1)"]),
    (["--force-image-size", "0"], ["model.force_image_size"]),
    (["--image-mean", "[0.5,0.5]"], ["model.image_mean", "3 values"]),
    (["--model.image-std", "[0.5,0,0.5]"], ["model.image_std"]),
    (["--model.image-interpolation", "nearest"], ["model.image_interpolation", "bicubic"]),
    (["--model.name", "tiny-rn", "--model.force-patch-dropout", "0.5"], ["not a ViT"]),
    (["--aug.ratio", "[0.75,1.33]"], ["aug.ratio", "--aug.use-timm"]),
    (["--aug.scale", "[0.9,0.4]"], ["aug.scale"]),
    (["--aug.color-jitter", "[0.4,0.4,0.4,0.1]"], ["aug.color_jitter_prob"]),
    (["--aug.gray-scale-prob", "1.5"], ["aug.gray_scale_prob"]),
    (["--model.name", "hf-hub:nobody/nothing"], ["hf-hub:nobody/nothing", "models--nobody--nothing", "download"]),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, monkeypatch, args, names):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    err = run_main(capsys, ["train", "--train.output-dir", str(tmp_path / "runs"), *args])
    assert_one_line_error(err, "train", *names)
    assert not (tmp_path / "runs").exists()
