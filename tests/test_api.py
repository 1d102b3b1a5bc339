"""The public loss API (amorlip.make_loss / ContrastiveLoss): open_clip's loss equivalence, the trainer's math,
exact resume from state_dict, cached-feature accumulation on its own, two processes, and clear errors."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

import amorlip
from amorlip.objectives import get
from amorlip.objectives.base import ObjectiveContext
from amorlip.objectives.options import AmorConfig
from amorlip.step import objective_loss
from dist_utils import run_distributed

RUN = dict(dataset_size=48, steps_per_epoch=4, total_steps=8, embed_dim=8, local_batch_size=12)


def features(n=12, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return x, y


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_import_stays_light():
    code = "import sys, amorlip; amorlip.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert set(amorlip.__all__) >= {"make_loss", "ContrastiveLoss", "ConfigError"}


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_equals_open_clip_loss_and_gradients(name):
    x, y = features()
    s, b = torch.tensor(math.exp(2.3), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ours_in, ref_in = leaves(x, y, s, b), leaves(x, y, s, b)
    loss_fn = amorlip.make_loss(name, **RUN)
    if name == "clip":
        ours = loss_fn(*ours_in[:3])
        ref = ClipLoss()(*ref_in[:3])
    else:
        ours = loss_fn(*ours_in)
        ref = SigLipLoss()(*ref_in)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref.backward()
    for a, r in zip(ours_in, ref_in):
        if r.grad is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_equals_the_trainers_loss_with_the_rescaled_scheme():
    """amorlip with `temperature='rescaled'` = the trainer's objective_loss (objective, L / sg(s) + rho / s)."""
    options = AmorConfig(t_online=1, alpha=0.9)
    ctx = ObjectiveContext(**RUN, total_epochs=2)
    torch.manual_seed(0)
    reference = get("amorlip")(options, ctx)
    torch.manual_seed(0)
    loss_fn = amorlip.make_loss("amorlip", **RUN, options=options, temperature="rescaled", rho=2.0)
    reference.on_epoch_start(0)
    for step in range(3):
        x, y = features(seed=step)
        s = torch.tensor(20.0, dtype=torch.float64)
        ref, _ = objective_loss(reference, {"image_features": x, "text_features": y, "logit_scale": s},
                                torch.arange(12), step=step, epoch=0, scheme="rescaled", rho=2.0)
        ours, metrics = loss_fn(x, y, s, return_metrics=True)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        assert metrics, "the objective's metrics come back on request"
    assert loss_fn.step == 3


def _run(loss_fn, steps, start=0):
    """`steps` calls (an optimizer step each) on fixed features; the losses."""
    out = []
    for step in range(start, start + steps):
        x, y = features(seed=step)
        idx = torch.randperm(48, generator=torch.Generator().manual_seed(step))[:12]
        s = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(x.requires_grad_(), y.requires_grad_(), s, indices=idx)
        loss.backward()
        out.append(loss.detach())
    return out


@pytest.mark.parametrize("name", ["amorlip", "fastclip", "sogclr", "neuclip"])
def test_state_dict_resumes_exactly(name, tmp_path):
    """3 + save + load into a fresh loss + 3 steps (crossing an epoch) equals 6 steps uninterrupted."""
    options = {"t_online": 1} if name == "amorlip" else None
    torch.manual_seed(0)
    whole = _run(amorlip.make_loss(name, **RUN, options=options), 6)
    torch.manual_seed(0)
    first = amorlip.make_loss(name, **RUN, options=options)
    part = _run(first, 3)
    torch.save(first.state_dict(), tmp_path / "loss.pt")
    torch.manual_seed(1)  # a different RNG: the state must carry everything
    second = amorlip.make_loss(name, **RUN, options=options)
    second.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=False))
    assert second.step == 3
    part += _run(second, 3, start=3)
    torch.testing.assert_close(torch.stack(part), torch.stack(whole), rtol=0, atol=0)


def test_forward_backward_accumulated_equals_plain():
    """forward_backward(accum_steps=2) on an open_clip model gives the plain step's gradients."""
    amorlip.register_tiny_configs()
    import open_clip

    grads = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = open_clip.create_model("micro-vit", output_dict=True).double()
        d = open_clip.get_model_config("micro-vit")["embed_dim"]
        loss_fn = amorlip.make_loss("amorlip", **{**RUN, "embed_dim": d, "local_batch_size": 8},
                                    options={"t_online": 1})
        images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        texts = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(2))
        loss, metrics = loss_fn.forward_backward(model, images, texts, accum_steps=accum)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert torch.isfinite(loss) and loss_fn.step == 1
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


def _two_process_loss(rank, world, x, y, s):
    b = x.shape[0] // world
    loss_fn = amorlip.make_loss("clip", **{**RUN, "local_batch_size": b})
    xl, yl, sl = leaves(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], s)
    loss = loss_fn(xl, yl, sl)
    rx, ry, rs = leaves(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], s)
    ref = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(rx, ry, rs)
    loss.backward()
    ref.backward()
    return {"ctx": (loss_fn.objective.ctx.rank, loss_fn.objective.ctx.world_size), "loss": loss.detach(),
            "ref": ref.detach(), "gx": xl.grad, "ref_gx": rx.grad}


def test_two_processes_as_open_clip_and_the_trainer():
    x, y = features(n=12)
    out = run_distributed(_two_process_loss, 2, x, y, torch.tensor(7.0, dtype=torch.float64))
    for rank, r in enumerate(out):
        assert r["ctx"] == (rank, 2)
        torch.testing.assert_close(r["loss"], r["ref"])
        torch.testing.assert_close(r["gx"], r["ref_gx"])


def test_output_dict_and_eval_mode():
    x, y = features()
    loss_fn = amorlip.make_loss("clip", **RUN)
    out = loss_fn(x, y, torch.tensor(10.0, dtype=torch.float64), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    loss_fn.eval()
    loss_fn(x, y, torch.tensor(10.0, dtype=torch.float64))
    assert loss_fn.step == 1, "calls in eval mode are not steps"


# ----------------------------------------------------------------------------------------------------
# bad input: one exception (ConfigError, a ValueError) whose message names the fix


@pytest.mark.parametrize("name", ["sogclr", "fastclip"])
def test_index_based_objectives_need_indices(name):
    x, y = features()
    with pytest.raises(amorlip.ConfigError, match="indices="):
        amorlip.make_loss(name, **RUN)(x, y, torch.tensor(10.0))


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "infonce"}, "unknown objective 'infonce'; choose one of: clip"),
    ({"dataset_size": None}, "needs dataset_size=<positive int>"),
    ({"steps_per_epoch": 0}, "needs steps_per_epoch="),
    ({"objective": "amorlip", "options": {"dim": 2}}, "no option dim; its options: arch"),
    ({"objective": "amorlip", "options": {"alpha": 2.0}}, r"\[amor\] amor.alpha"),
    ({"objective": "amorlip", "options": 3}, "must be a AmorConfig or a dict"),
    ({"temperature": "cold"}, "temperature='cold' is not one of"),
    ({"objective": "fastclip", "temperature": "plain"}, "temperature='rescaled'"),
])
def test_bad_construction_names_the_fix(kwargs, match):
    args = {"objective": "clip", **RUN, **kwargs}
    with pytest.raises(amorlip.ConfigError, match=match):
        amorlip.make_loss(args.pop("objective"), **args)


def test_bad_shapes_name_the_fix():
    loss_fn = amorlip.make_loss("clip", **RUN)
    x, y = features()
    s = torch.tensor(10.0)
    with pytest.raises(amorlip.ConfigError, match=r"\(batch, 8\) tensor"):
        loss_fn(x[:, :4], y[:, :4], s)
    with pytest.raises(amorlip.ConfigError, match="same pairs"):
        loss_fn(x, y[:5], s)
    with pytest.raises(amorlip.ConfigError, match="scalar scale"):
        loss_fn(x, y, torch.ones(3))
    with pytest.raises(amorlip.ConfigError, match=r"shape \(12,\)"):
        loss_fn(x, y, s, indices=torch.arange(5))
