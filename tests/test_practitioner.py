"""What a practitioner fine-tuning open_clip models needs: initial weights (model.pretrained), LiT-style locking,
gradient checkpointing, W&B logging, CPU bf16 / pure bf16 precision, and the final weights / export."""
import json
import sys
from pathlib import Path

import pytest
import torch

from amorlip import objectives
from amorlip.cli import main
from amorlip.config import ConfigError, build_config
from amorlip.models import autocast, build_model, create_model
from amorlip.train import autocast_context
from test_bad_input import TINY, assert_one_line_error, run_main


def train_args(root: Path, name: str, *extra: str, steps: int = 2) -> list[str]:
    return ["train", "--train.output-dir", str(root), "--train.name", name, "--train.steps", str(steps), *TINY, *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck["state_dict"] if "state_dict" in ck else ck["model"]


def last_checkpoint(run: Path) -> dict:
    from amorlip.checkpoint import latest_checkpoint

    return torch.load(latest_checkpoint(run), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished 4-step run that keeps 3 checkpoints, with save_final weights and export_final."""
    root = tmp_path_factory.mktemp("practitioner")
    assert main(train_args(root, "src", "--train.checkpoint-every", "1", "--train.keep-checkpoints", "3",
                           "--train.save-final", "weights", "--train.export-final", "true", steps=4)) == 0
    return root / "src"


# ----------------------------------------------------------------------------------------------------
# save_final / export_final


def test_save_final_weights_and_export(source):
    """weights: final_weights.pt holds the model only; the earlier checkpoints are gone, the final one is whole
    (resumable); export_final wrote an open_clip checkpoint that open_clip itself loads."""
    import open_clip

    final = torch.load(source / "final_weights.pt", map_location="cpu", weights_only=True)
    assert set(final) == {"epoch", "step", "name", "state_dict"} and final["step"] == 4
    ckpts = sorted(p.name for p in (source / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_00000004.pt"]
    full = last_checkpoint(source)
    assert {"optimizer", "objective", "rng"} <= set(full)
    assert all(torch.equal(final["state_dict"][k], v) for k, v in full["model"].items())
    export = source / "export" / "micro-vit.pt"
    assert export.is_file() and (source / "export" / "micro-vit.json").is_file()
    model = open_clip.create_model("micro-vit", pretrained=str(export))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full["model"].items())
    summary = json.loads((source / "summary.json").read_text())
    assert summary["final_weights"].endswith("final_weights.pt") and summary["export"].endswith("micro-vit.pt")


def test_finished_weights_run_stays_resumable(source, tmp_path, capsys):
    """The final full checkpoint of a save_final=weights run extends the run (a copy, so others see it unchanged)."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(source, runs / "src")
    assert main(train_args(runs, "src", "--train.save-final", "weights", "--train.export-final", "true",
                           "--train.resume", "latest", "--train.resume-allow-changes", "train.steps", steps=5)) == 0
    assert last_checkpoint(runs / "src")["step"] == 5
    assert sorted(p.name for p in (runs / "src" / "checkpoints").glob("step_*.pt")) == ["step_00000005.pt"]


# ----------------------------------------------------------------------------------------------------
# model.pretrained


@pytest.mark.parametrize("which", ["export-folder", "export-file", "final-weights", "training-checkpoint"])
def test_pretrained_loads_exactly_those_weights(source, which, capsys):
    path = {"export-folder": source / "export", "export-file": source / "export" / "micro-vit.pt",
            "final-weights": source / "final_weights.pt",
            "training-checkpoint": next((source / "checkpoints").glob("step_*.pt"))}[which]
    cfg = build_config(None, [("model.name", "micro-vit"), ("model.pretrained", str(path))])
    capsys.readouterr()
    model, *_ = build_model(cfg.model)
    expected = last_checkpoint(source)["model"]
    file = path / "micro-vit.pt" if path.is_dir() else path
    assert capsys.readouterr().out == f"pretrained weights: {len(expected)} tensors loaded from {file}\n"
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_training_starts_from_the_pretrained_weights(source, tmp_path):
    """With a vanishing lr, the trained model is the exported one to 1e-8, and far from a random initialisation."""
    runs = tmp_path / "runs"
    assert main(train_args(runs, "ft", "--model.pretrained", str(source / "export"), "--optim.lr", "1e-12",
                           "--optim.lr-temperature", "1e-12", steps=1)) == 0
    trained = last_checkpoint(runs / "ft")["model"]
    exported = weights(source / "export" / "micro-vit.pt")
    torch.manual_seed(0)
    scratch = create_model("micro-vit")[0].state_dict()
    assert all(torch.allclose(trained[k], v, rtol=0, atol=1e-8) for k, v in exported.items())
    assert not torch.allclose(trained["visual.conv1.weight"], scratch["visual.conv1.weight"], atol=1e-3)


def test_resume_takes_the_checkpoint_not_the_pretrained_file(source, tmp_path):
    """A resumed fine-tuning run loads its checkpoint: the pretrained file is not read again (here it is gone)."""
    import shutil

    pre = tmp_path / "pre"
    shutil.copytree(source / "export", pre)
    runs = tmp_path / "runs"
    assert main(train_args(runs, "ft", "--model.pretrained", str(pre), "--train.stop-at", "1", steps=3)) == 0
    at_stop = last_checkpoint(runs / "ft")["model"]
    shutil.rmtree(pre)
    assert main(train_args(runs, "ft", "--model.pretrained", str(pre), "--train.resume", "latest", steps=3)) == 0
    end = last_checkpoint(runs / "ft")
    assert end["step"] == 3
    assert not torch.equal(end["model"]["visual.conv1.weight"], at_stop["visual.conv1.weight"])


# ----------------------------------------------------------------------------------------------------
# LiT-style locking


def _tower(state: dict, tower: str) -> dict:
    text_keys = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")
    if tower == "image":
        return {k: v for k, v in state.items() if k.startswith("visual.")}
    return {k: v for k, v in state.items() if k.startswith(text_keys)}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(objectives.REGISTRY))
def test_locked_image_tower_is_bit_identical_and_has_no_adam_state(source, tmp_path, objective):
    runs = tmp_path / "runs"
    assert main(train_args(runs, "lit", "--objective", objective, "--model.pretrained", str(source / "export"),
                           "--model.lock-image", "true", steps=3)) == 0
    start = weights(source / "export" / "micro-vit.pt")
    ck = last_checkpoint(runs / "lit")
    frozen, trained = _tower(ck["model"], "image"), _tower(ck["model"], "text")
    assert frozen and all(torch.equal(v, start[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, start[k]) for k, v in trained.items())
    # the temperature stays trainable (SogCLR keeps its own fixed one, so its logit_scale gets no gradient)
    assert "temperature" in [g["group"] for g in ck["optimizer"]["param_groups"]]
    if objective == "clip":
        assert not torch.equal(ck["model"]["logit_scale"], start["logit_scale"])
    n_params = sum(len(g["params"]) for g in ck["optimizer"]["param_groups"])
    model, *_ = create_model("micro-vit", **objectives.get(objective).model_overrides)
    n_trainable = sum(1 for n, _ in model.named_parameters() if not n.startswith("visual."))
    assert n_params == n_trainable and len(ck["optimizer"]["state"]) <= n_trainable


def test_locked_text_tower_and_unlocked_groups(source, tmp_path):
    runs = tmp_path / "runs"
    assert main(train_args(runs, "lt", "--model.pretrained", str(source / "export"), "--model.lock-text", "true",
                           "--model.lock-image", "true", "--model.lock-image-unlocked-groups", "1", steps=2)) == 0
    start = weights(source / "export" / "micro-vit.pt")
    ck = last_checkpoint(runs / "lt")["model"]
    assert all(torch.equal(v, start[k]) for k, v in _tower(ck, "text").items())
    changed = {k for k, v in _tower(ck, "image").items() if not torch.equal(v, start[k])}
    assert changed == {"visual.proj"}  # the last group of open_clip's ViT lock is the projection


# ----------------------------------------------------------------------------------------------------
# Gradient checkpointing


def _clip_backward(model, images, texts) -> None:
    out = model(images, texts)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(images.shape[0])
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    loss.backward()


def _grads(model, images, texts) -> dict[str, torch.Tensor]:
    for p in model.parameters():  # allocated up front: the memory peak below is activations and temporaries
        p.grad = torch.zeros_like(p)
    _clip_backward(model, images, texts)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients_with_less_memory():
    from amorlip.bench.common import cpu_tensor_peak

    cfg = build_config(None, [("model.name", "tiny-vit"), ("model.grad_checkpointing", "true")])
    torch.manual_seed(0)
    plain, *_ = create_model("tiny-vit", output_dict=True)
    ckpt, *_ = build_model(cfg.model, output_dict=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.transformer.grad_checkpointing and ckpt.visual.transformer.grad_checkpointing
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(16, 3, 32, 32, generator=g), torch.randint(1, 1000, (16, 32), generator=g)
    a, b = _grads(plain, images, texts), _grads(ckpt, images, texts)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    peak_plain = cpu_tensor_peak(lambda: _clip_backward(plain, images, texts))
    peak_ckpt = cpu_tensor_peak(lambda: _clip_backward(ckpt, images, texts))
    assert peak_ckpt < 0.9 * peak_plain, (peak_ckpt, peak_plain)


def test_bench_grad_checkpointing_row():
    from amorlip.bench.common import Variant
    from amorlip.bench.overhead import grad_checkpointing_variant

    ref = Variant("clip", build_config(None, [("train.name", "clip")]), is_reference=True)
    row = grad_checkpointing_variant(ref)
    assert row.label == "clip +grad-ckpt" and row.cfg.model.grad_checkpointing and not row.is_reference
    assert not ref.cfg.model.grad_checkpointing and row.cfg.train.name != ref.cfg.train.name
    with pytest.raises(ConfigError, match="already"):
        grad_checkpointing_variant(row)


# ----------------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16"])
def test_cpu_bf16_autocast_runs_in_bf16(precision, tmp_path):
    cfg = build_config(None, [("model.name", "micro-vit"), ("model.precision", precision)])
    a = torch.randn(4, 4)
    with autocast_context(cfg, torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16
    model, *_ = build_model(cfg.model, output_dict=True)
    assert model.visual.conv1.weight.dtype == torch.float32
    with autocast_context(cfg, torch.device("cpu")):
        out = model(torch.randn(2, 3, 16, 16), torch.randint(1, 100, (2, 16)))
    assert out["image_features"].dtype == torch.bfloat16
    runs = tmp_path / "runs"
    assert main(train_args(runs, "bf", "--model.precision", precision)) == 0
    recorded = json.loads((runs / "bf" / "summary.json").read_text())["precision"]
    assert recorded == {"precision": precision, "device": "cpu", "weights": "float32", "autocast": "cpu bfloat16",
                        "grad_scaler": False}


def test_pure_bf16_keeps_weights_and_adam_state_in_bf16(tmp_path):
    runs = tmp_path / "runs"
    assert main(train_args(runs, "pure", "--model.precision", "pure_bf16")) == 0
    ck = last_checkpoint(runs / "pure")
    assert all(v.dtype == torch.bfloat16 for v in ck["model"].values() if v.is_floating_point())
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in ck["optimizer"]["state"].values())
    recorded = json.loads((runs / "pure" / "summary.json").read_text())["precision"]
    assert recorded["weights"] == "bfloat16" and recorded["autocast"] is None


def test_fp16_on_the_cpu_is_an_error():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        with autocast("fp16", torch.device("cpu")):
            pass


# ----------------------------------------------------------------------------------------------------
# Weights & Biases


@pytest.mark.slow
def test_wandb_offline_run_and_resume_reuse_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    runs = tmp_path / "runs"
    args = ["--train.wandb", "true", "--train.wandb-project", "amorlip-test", "--train.wandb-tags", "a,b",
            "--train.log-every", "1"]
    assert main(train_args(runs, "wb", *args, "--train.stop-at", "1")) == 0
    run_id = (runs / "wb" / "wandb_id.txt").read_text().strip()
    assert main(train_args(runs, "wb", *args, "--train.resume", "latest")) == 0
    assert (runs / "wb" / "wandb_id.txt").read_text().strip() == run_id
    folders = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2, list((tmp_path / "wb" / "wandb").iterdir())
    # offline, W&B keeps everything in its binary run log: the config, the scalars, and (at the end) the summary
    first, second = [(f / f"run-{run_id}.wandb").read_bytes() for f in folders]
    for log in (first, second):
        assert b"precision_effective" in log and b"micro-vit" in log and b"samples_per_s" in log
    assert b"data_skipped" not in first and b"data_skipped" in second  # stopped at step 1: no summary yet


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written

def _bad_cases(source: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    return [
        (["--model.pretrained", str(source / "missing.pt")], ("model.pretrained", "missing.pt")),
        (["--model.pretrained", str(source / "config.yaml")], ("model.pretrained", "could not read")),
        (["--model.pretrained", str(source / "export"), "--model.name", "tiny-vit"],
         ("model.pretrained", "does not fit", "--model.name micro-vit")),
        (["--model.pretrained", str(source.parent)], ("model.pretrained", "folder without micro-vit.pt")),
        (["--model.lock-images", "true"], ("--model.lock-images", "--model.lock-image")),
        (["--model.lock-image-unlocked-groups", "1"], ("model.lock_image_unlocked_groups", "--model.lock-image true")),
        (["--model.lock-image", "true", "--model.lock-image-unlocked-groups", "3"], ("at most 2",)),
        (["--model.lock-image", "true", "--model.lock-image-freeze-bn-stats", "true"], ("batch norm",)),
        (["--model.name", "tiny-rn", "--model.lock-image", "true", "--model.lock-image-unlocked-groups", "1"],
         ("ResNet",)),
        (["--model.lock-text", "true", "--model.lock-text-freeze-layer-norm", "false"], ("layer norms",)),
        (["--model.lock-text", "true", "--model.lock-text-unlocked-layers", "-1"], ("at least 0",)),
        (["--model.lock-image", "true", "--resolution.phases", "[[0.5, 8], [0.5, 16]]"], ("RECLIP",)),
        (["--model.precision", "fp16"], ("model.precision=fp16", "CUDA")),
        (["--train.save-final", "everything"], ("train.save_final",)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_is_one_line(case, source, tmp_path, capsys):
    if case == 12 and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    args, names = _bad_cases(source)[case]
    runs = tmp_path / "runs"
    err = run_main(capsys, train_args(runs, "bad", *args))
    assert_one_line_error(err, "train", *names)
    assert not runs.exists()


def test_pretrained_tag_not_in_the_cache_names_what_was_looked_for(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    import amorlip.models as models

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(models, "clip_cache_dir", lambda: tmp_path / "clip")
    runs = tmp_path / "runs"
    err = run_main(capsys, train_args(runs, "bad", "--model.name", "RN50", "--model.pretrained", "openai"))
    assert_one_line_error(err, "train", "model.pretrained", "not in the local cache", str(tmp_path / "clip" / "RN50.pt"),
                          "resnet50_clip.openai")
    assert not runs.exists()
    # a cached file is found without any download
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "RN50.pt").write_bytes(b"")
    path, tag_cfg = models.resolve_pretrained("RN50", "openai")
    assert path == tmp_path / "clip" / "RN50.pt" and tag_cfg["quick_gelu"] is True


def test_wandb_not_installed_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec refuses
    runs = tmp_path / "runs"
    err = run_main(capsys, train_args(runs, "wb", "--train.wandb", "true"))
    assert_one_line_error(err, "train", "train.wandb", "pip install 'amorlip[wandb]'")
    assert not runs.exists()


def test_locking_leaves_the_temperature_in_the_optimizer():
    from amorlip.models import param_groups

    cfg = build_config(None, [("model.name", "micro-vit"), ("model.lock_image", "true"), ("model.lock_text", "true")])
    model, *_ = build_model(cfg.model)
    groups = param_groups(model, 0.1, 1e-3, None)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for g in groups for p in g["params"]] == ["logit_scale"]
    optimizer = torch.optim.AdamW(groups)  # empty decay groups are fine
    model.logit_scale.grad = torch.ones_like(model.logit_scale)
    optimizer.step()
    assert len(optimizer.state) == 1
