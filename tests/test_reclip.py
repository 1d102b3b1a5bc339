"""RECLIP resolution phases: schedule, model adaptation, text at short context, trainer integration, FLOPs."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from amorlip import objectives, reclip
from amorlip.checkpoint import latest_checkpoint, load_checkpoint
from amorlip.cli import main
from amorlip.config import ConfigError, build_config, load_yaml, preset_names
from amorlip.models import create_model, param_groups, register_tiny_configs
from amorlip.reclip import Phase, ResolutionConfig

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "112", "--data.val-size", "64",
        "--data.eval-size", "48", "--train.batch-size", "16", "--optim.warmup-steps", "2",
        "--train.progress", "false", "--train.log-every", "1", "--eval.zeroshot", "false", "--eval.retrieval", "false"]
# micro-vit: 16 px native (patch 4 -> 4x4 grid), 16 text tokens; phase 1 at 8 px (2x2 grid) and 6 tokens
PHASES = "[[0.5, 8, 6], [0.5, 16]]"


register_tiny_configs()


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and far faster when other jobs load the cores
    (two spinning OpenMP threads on a busy 2-core machine made a micro-vit step 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(tmp_path, *args):
    return main(["train", "--train.output-dir", str(tmp_path), *TINY, *args])


def last_state(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))


# ----------------------------------------------------------------------------------------------------
# Config and schedule
# ----------------------------------------------------------------------------------------------------


def test_config_from_cli_and_defaults():
    assert build_config(None).section("resolution").phases == []
    cfg = build_config(None, [("resolution.phases", "[[0.9, 16, 8], [0.1, 32]]")])
    assert cfg.section("resolution").phases == [[0.9, 16, 8], [0.1, 32]]
    assert "resolution" in cfg.to_dict()


@pytest.mark.parametrize("phases, message", [
    ("[[0.5, 16], [0.4, 32]]", "sum to 0.9"),
    ("[[0, 16], [1.0, 32]]", "positive number"),
    ("[[0.5, -16], [0.5, 32]]", "image_size must be positive"),
    ("[[0.5, 16.5], [0.5, 32]]", "whole number"),
    ("[[0.5], [0.5, 32]]", "each phase is"),
    ("[[0.5, 16, 1], [0.5, 32]]", "at least 2"),
])
def test_config_errors_name_the_problem(phases, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_config(None, [("resolution.phases", phases)])
    assert "[resolution]" in str(e.value)
    with pytest.raises(ConfigError, match="cannot read 16"):
        build_config(None, [("resolution.phases", "16")])
    with pytest.raises(ValueError, match="must be a list"):
        reclip.parse_phase_specs({"a": 1})


def test_phases_cover_the_run():
    cfg = ResolutionConfig([[0.9, 16, 8], [0.1, 32]])
    ps = reclip.phases(cfg, 600, native_image_size=32, native_context_length=32)
    assert ps == [Phase(0, 0, 540, 16, 8), Phase(1, 540, 600, 32, 32)]
    assert [p.num_steps for p in ps] == [540, 60]
    assert reclip.phase_at(cfg, 0, 600).index == 0
    assert reclip.phase_at(cfg, 539, 600).index == 0
    assert reclip.phase_at(cfg, 540, 600) == Phase(1, 540, 600, 32, None)  # no native given: None
    assert reclip.phase_at(cfg, 600, 600).index == 1
    three = reclip.phases([[1 / 3, 8], [1 / 3, 12], [1 / 3, 16]], 10)
    assert [(p.start_step, p.end_step) for p in three] == [(0, 3), (3, 7), (7, 10)]
    # no schedule: one phase at the native sizes
    assert reclip.phases(ResolutionConfig(), 7, 32, 16) == [Phase(0, 0, 7, 32, 16)]
    with pytest.raises(ConfigError, match="gets no step"):
        reclip.phases(cfg, 4)
    with pytest.raises(ValueError, match="outside"):
        reclip.phase_at(cfg, 601, 600)


def test_model_dependent_checks():
    model, tr, ev, tok = create_model("micro-vit")
    for phases, message in [([[0.5, 8], [0.5, 12]], "last resolution phase must be at the model's native 16 px"),
                            ([[0.5, 6], [0.5, 16]], "not divisible by the ViT patch size 4; use e.g. 4 or 8"),
                            ([[0.5, 8, 40], [0.5, 16]], "exceeds the model's 16 tokens")]:
        with pytest.raises(ConfigError, match=message):
            reclip.ResolutionRun(ResolutionConfig(phases), model, 10, tr, ev, tok)
    rn = create_model("tiny-rn")[0]
    with pytest.raises(ConfigError, match="32"):
        reclip.grid_for(rn, 48)


@pytest.mark.parametrize("name", ["cc3m-rn50-reclip-amorlip", "cc12m-vitb32-reclip-amorlip",
                                  "tiny-reclip-clip", "tiny-reclip-amorlip"])
def test_presets_are_valid(name):
    assert name in preset_names()
    cfg = build_config(name)
    assert cfg.section("resolution").enabled
    base = build_config(load_yaml(name)["base"])  # the preset it extends: same objective and model
    assert cfg.objective == base.objective and cfg.model.name == base.model.name
    with torch.device("meta"):  # no memory, no init cost: only the shapes matter
        model = open_clip.create_model(cfg.model.name, pretrained=None, device="meta")
    # the schedule fits the model (divisible sizes, native last phase) and every phase gets steps
    total = cfg.train.steps or cfg.train.epochs * 1000
    reclip.ResolutionRun(cfg.section("resolution"), model, total, None, None, None)


# ----------------------------------------------------------------------------------------------------
# Image tower adaptation
# ----------------------------------------------------------------------------------------------------


def _tokens_seen(model) -> list[int]:
    seen: list[int] = []
    model.visual.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen


def test_same_grid_is_an_exact_no_op():
    torch.manual_seed(0)
    for name, size in [("micro-vit", 16), ("tiny-rn", 64)]:
        model = create_model(name)[0].eval()
        before = copy.deepcopy(model.state_dict())
        x = torch.randn(3, 3, size, size)
        ref = model.encode_image(x)
        assert reclip.set_image_size(model, size) == []
        assert torch.equal(model.encode_image(x), ref)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        same = reclip.state_dict_at_image_size(before, open_clip.get_model_config(name))
        assert all(same[k] is before[k] for k in before)


def _poly_grid(centres: torch.Tensor, width: int = 4) -> torch.Tensor:
    """Smooth embedding: columns are polynomials of degree <= 2 in the patch-centre coordinates."""
    u, v = torch.meshgrid(centres.double(), centres.double(), indexing="ij")
    return torch.stack([u, 2 * v - u, u * u - 0.5 * v * v, 0.3 + 0 * u], -1).reshape(-1, width)


@pytest.mark.parametrize("g0, g1", [(4, 8), (8, 16), (6, 12)])
def test_upsampling_reproduces_a_smooth_embedding(g0, g1):
    """Bicubic (Keys, a=-0.5) reproduces polynomials of degree <= 2 wherever its 4 taps lie inside the grid.

    So a positional embedding that is a smooth function of the patch position is carried to the finer
    grid exactly in the interior; only the outer cells (extrapolated by border clamping) deviate.
    """
    centres = lambda g: (torch.arange(g) + 0.5) / g  # noqa: E731 - cell centres, align_corners=False
    cls = torch.full((1, 4), 7.0, dtype=torch.float64)
    up = reclip.resize_grid_embedding(torch.cat([cls, _poly_grid(centres(g0))]), g1)
    assert up.shape == (1 + g1 * g1, 4)
    assert torch.equal(up[0], cls[0])  # the class token's embedding is kept
    err = (up[1:] - _poly_grid(centres(g1))).reshape(g1, g1, 4).abs()
    pos = (torch.arange(g1) + 0.5) * g0 / g1 - 0.5  # where each new centre falls on the old grid
    inside = ((pos.floor() - 1 >= 0) & (pos.floor() + 2 <= g0 - 1)).nonzero().flatten()
    assert len(inside) >= 2
    assert err[inside][:, inside].max() < 1e-6
    assert err.max() > 1e-3  # the border does deviate: the interior check above is not vacuous


def test_downsampling_is_antialiased():
    """Shrinking a grid averages (low-pass): a checkerboard (highest frequency) shrinks towards its mean."""
    g = 8
    checker = ((torch.arange(g)[:, None] + torch.arange(g)[None, :]) % 2).double().reshape(-1, 1) * 2 - 1
    down = reclip.resize_grid_embedding(torch.cat([torch.zeros(1, 1).double(), checker]), 2)[1:]
    assert down.abs().max() < 0.1


def test_low_res_training_then_switch_to_full_resolution():
    """micro-vit trained 2 steps at 8 px (2x2 grid + class token = 5 tokens), then switched to 16 px (17)."""
    torch.manual_seed(0)
    model, tr, ev, tok = create_model("micro-vit")
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, 1e-3, None))
    run = reclip.ResolutionRun(ResolutionConfig([[0.5, 8, 6], [0.5, 16]]), model, 4, tr, ev, tok)
    seen = _tokens_seen(model)
    captions = ["a large red circle in the upper left corner of the image"] * 4
    for step in range(4):
        run.enter(step, model, optimizer)
        size = run.current.image_size
        texts = run.tokenizer(captions)
        assert texts.shape[1] == (6 if step < 2 else 16)
        out = model(torch.randn(4, 3, size, size), texts)
        optimizer.zero_grad()
        (out[0] @ out[1].T).logsumexp(1).mean().backward()
        optimizer.step()
        if step == 1:
            low_res_pos = model.visual.positional_embedding
            assert optimizer.state[low_res_pos]["exp_avg"].shape == (5, 32)
    assert seen == [5, 5, 17, 17]
    pos = model.visual.positional_embedding
    assert pos.shape == (17, 32) and pos is not low_res_pos
    assert model.visual.grid_size == (4, 4) and model.visual.image_size == (16, 16)
    # the new Parameter took the old one's place in the optimizer, with fresh state (2 steps since the switch)
    assert any(p is pos for g in optimizer.param_groups for p in g["params"])
    assert not any(p is low_res_pos for g in optimizer.param_groups for p in g["params"])
    assert low_res_pos not in optimizer.state and int(optimizer.state[pos]["step"]) == 2
    # full-resolution evaluation with the native transform and tokenizer
    model.eval()
    from torchvision.transforms.functional import to_pil_image

    image = ev(to_pil_image(torch.rand(3, 40, 40)))
    assert image.shape == (3, 16, 16)
    assert model.encode_image(image[None]).shape == (1, 32) and seen[-1] == 17


def test_resnet_attention_pool_is_resized():
    torch.manual_seed(0)
    model = create_model("tiny-rn")[0].eval()
    assert model.visual.attnpool.positional_embedding.shape[0] == 2 * 2 + 1
    [(old, new)] = reclip.set_image_size(model, 128)
    assert new.shape[0] == 4 * 4 + 1 and model.visual.image_size == 128
    assert model.encode_image(torch.randn(2, 3, 128, 128)).shape == (2, 64)
    state = model.state_dict()
    assert reclip.image_size_in_state(state, create_model("tiny-rn")[0]) == 128
    fresh = create_model("tiny-rn")[0].eval()
    reclip.load_model_state(fresh, state)
    x = torch.randn(2, 3, 128, 128)
    assert torch.equal(fresh.encode_image(x), model.encode_image(x))


# ----------------------------------------------------------------------------------------------------
# Text at a shorter context
# ----------------------------------------------------------------------------------------------------


def test_short_context_tokenizer_keeps_end_of_text():
    tok = create_model("micro-vit")[3]
    long = "a large red circle in the upper left corner of the image next to a small blue square"
    short = reclip.ContextTokenizer(tok, 8)([long, "a red disc"])
    eot = tok.eot_token_id
    assert short.shape == (2, 8)
    assert short[0, -1] == eot and short.argmax(-1).tolist() == [7, 4]  # argmax pooling finds it
    assert torch.equal(short[0, :7], tok([long])[0, :7])


def test_short_text_encoder_is_exact_for_captions_that_fit():
    """Causal mask: a caption that fits in L tokens gets the same features at length L as at full length."""
    torch.manual_seed(0)
    model, _, _, tok = create_model("tiny-vit")
    model.eval()
    captions = ["a red disc", "a small blue square at the top", "a huge green star"]
    full = tok(captions)
    ref = model.encode_text(full)  # open_clip's own encode_text
    reclip.enable_short_text(model)
    assert torch.equal(model.encode_text(full), ref)  # full length: bit-identical to open_clip
    for length in (9, 12):
        torch.testing.assert_close(model.encode_text(tok(captions, context_length=length)), ref,
                                   rtol=1e-5, atol=1e-5)
    # dense reference for a truncated caption: open_clip on the same tokens padded to the full context
    cut = reclip.ContextTokenizer(tok, 5)(captions)
    padded = torch.zeros_like(full)
    padded[:, :5] = cut
    torch.testing.assert_close(model.encode_text(cut), type(model).encode_text(model, padded),
                               rtol=1e-5, atol=1e-5)


def test_short_text_on_custom_text_tower():
    torch.manual_seed(0)
    cfg = open_clip.get_model_config("micro-vit")
    model = open_clip.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    tok = create_model("micro-vit")[3]
    captions = ["a red disc", "a blue block"]
    ref = model.encode_text(tok(captions))
    reclip.enable_short_text(model)
    torch.testing.assert_close(model.encode_text(tok(captions, context_length=6)), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Trainer integration
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_in_each_phase_and_across_the_switch_is_exact(tmp_path):
    """6 steps straight vs stop at 1 (in phase 1), 3 (at the switch), 4 (in phase 2) and resume each time.

    Phase 1: steps 0-2 at 8 px / 6 tokens; phase 2: steps 3-5 at 16 px / 16 tokens; 4 steps per epoch,
    so the run also crosses an epoch boundary. Weights and AdamW state must be bit-identical.
    """
    common = ["--train.steps", "6", "--data.synthetic-size", "64", "--resolution.phases", PHASES,
              "--train.checkpoint-every", "100", "--train.keep-checkpoints", "10"]
    assert run_cli(tmp_path, *common, "--train.name", "straight") == 0
    for stop in (1, 3, 4):
        resume = ["--train.resume", "latest"] if stop != 1 else []
        assert run_cli(tmp_path, *common, "--train.name", "split", "--train.stop-at", str(stop), *resume) == 0
        state = last_state(tmp_path / "split")
        assert state["step"] == stop
        # a checkpoint holds the model at the resolution it had: 8 px until the switch is made at step 3
        assert state["model"]["visual.positional_embedding"].shape[0] == (5 if stop <= 3 else 17)
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.resume", "latest") == 0
    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    assert a["model"]["visual.positional_embedding"].shape == (17, 32)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, va in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(va[name], b["optimizer"]["state"][key][name]), (key, name)
    # the reset: the positional embedding's AdamW state counts only the 3 steps since the switch
    steps = sorted(int(v["step"]) for v in a["optimizer"]["state"].values())
    assert steps[0] == 3 and steps[-1] == 6


def test_low_res_checkpoint_exports_and_evaluates_at_full_resolution(tmp_path):
    import json

    assert run_cli(tmp_path, "--train.steps", "6", "--resolution.phases", PHASES, "--train.name", "e",
                   "--train.stop-at", "2") == 0
    ck = last_state(tmp_path / "e")
    assert ck["model"]["visual.positional_embedding"].shape == (5, 32)
    assert main(["export", str(tmp_path / "e"), "--out", str(tmp_path / "exp")]) == 0
    open_clip.add_model_config(tmp_path / "exp" / "micro-vit.json")
    model, _, _ = open_clip.create_model_and_transforms("micro-vit", pretrained=str(tmp_path / "exp" / "micro-vit.pt"))
    expected = reclip.resize_grid_embedding(ck["model"]["visual.positional_embedding"], 4)
    assert torch.equal(model.visual.positional_embedding.detach(), expected)
    assert main(["eval", str(tmp_path / "e"), "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]


@pytest.mark.parametrize("objective", objectives.available())
def test_every_objective_trains_through_a_switch(tmp_path, objective):
    extra = ["--train.eval-every", "2", "--eval.zeroshot", "true"] if objective == "clip" else []
    assert run_cli(tmp_path, "--objective", objective, "--train.steps", "4", "--resolution.phases", PHASES,
                   "--data.synthetic-size", "64", "--train.name", objective, *extra) == 0
    from amorlip.train import read_history

    rows = [r for r in read_history(tmp_path / objective) if "loss" in r]
    assert [(r["image_size"], r["context_length"]) for r in rows] == [(8, 6), (8, 6), (16, 16), (16, 16)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if objective == "clip":  # evaluated during phase 1 (at 8 px) and at the end (16 px)
        evals = [r for r in read_history(tmp_path / objective) if any(k.startswith("eval/") for k in r)]
        assert [r["step"] for r in evals] == [2, 4]
    assert last_state(tmp_path / objective)["model"]["visual.positional_embedding"].shape == (17, 32)


def _ddp_train(rank: int, world: int, out_dir: str) -> None:
    from amorlip.train import train

    cfg = build_config(None, [("model.name", "micro-vit"), ("data.synthetic_size", "32"), ("train.batch_size", "16"),
                              ("train.steps", "2"), ("train.output_dir", out_dir), ("train.name", "ddp"),
                              ("train.progress", "false"), ("train.device", "cpu"), ("eval.zeroshot", "false"),
                              ("eval.retrieval", "false"), ("resolution.phases", PHASES), ("optim.warmup_steps", "1")])
    train(cfg)


@pytest.mark.slow
def test_two_processes_rewrap_ddp_at_the_switch(tmp_path):
    """Under DDP the switch re-wraps the model (DDP's buckets know the old shape): 2 gloo processes must
    train the same model as 1 process with the whole batch (CLIP gathers features across processes)."""
    from dist_utils import run_distributed

    run_distributed(_ddp_train, 2, str(tmp_path / "two"))
    _ddp_train(0, 1, str(tmp_path / "one"))
    a, b = last_state(tmp_path / "two" / "ddp"), last_state(tmp_path / "one" / "ddp")
    assert a["model"]["visual.positional_embedding"].shape == (17, 32)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------


def _clip_flops(batch: int, image_size: int, context: int, patch: int = 4, width: int = 32, layers: int = 1,
                embed: int = 32, mlp: int = 4) -> int:
    """Forward + backward FLOPs of micro-vit by hand (2 per multiply-add; backward = 2x forward, except the
    patch convolution, whose input (the image) needs no gradient: weight gradient only, 1x)."""
    def block(n: int) -> int:  # qkv + out projection + MLP, and the two attention matmuls (QK^T, AV)
        return (3 + 1 + 2 * mlp) * n * width * width + 2 * n * n * width

    g = image_size // patch
    image_fwd = 2 * batch * (layers * block(g * g + 1) + width * embed)
    text_fwd = 2 * batch * (layers * block(context) + width * embed)
    conv_fwd = 2 * batch * g * g * 3 * patch * patch * width
    return 3 * (image_fwd + text_fwd) + 2 * conv_fwd


def test_flops_per_step_matches_the_formula():
    torch.manual_seed(0)
    model = create_model("micro-vit")[0]
    before = copy.deepcopy(model.state_dict())
    for size, length, batch in [(8, 6, 4), (16, 16, 4), (16, 16, 8), (8, 16, 2)]:
        assert reclip.flops_per_step(model, size, length, batch) == _clip_flops(batch, size, length)
    assert model.visual.positional_embedding.shape == (17, 32)  # the model itself is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
