"""CLIP objective against open_clip's ClipLoss (loss and gradients), 1 and 2 gloo processes."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from amorlip.objectives import get
from amorlip.objectives.base import ObjectiveContext
from dist_utils import run_distributed


def make_objective():
    ctx = ObjectiveContext(dataset_size=100, steps_per_epoch=10, total_steps=10, total_epochs=1, embed_dim=8,
                           local_batch_size=6)
    return get("clip")(None, ctx)


def features(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def test_clip_equals_open_clip_loss_and_grads():
    x, y = features()
    s = torch.tensor(math.exp(2.3), dtype=torch.float64)
    xs = [x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()]
    xr = [x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()]
    ours = make_objective()(xs[0], xs[1], xs[2], None, torch.arange(12), step=0, epoch=0).loss
    ref = ClipLoss()(xr[0], xr[1], xr[2])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref.backward()
    for a, b in zip(xs, xr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_clip_matches_dense_formula():
    x, y = features(seed=3)
    s = torch.tensor(5.0, dtype=torch.float64)
    logits = s * x @ y.T
    n = x.shape[0]
    dense = -0.5 / n * sum(
        logits[i, i] - torch.logsumexp(logits[i], 0) + logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(n)
    )
    ours = make_objective()(x, y, s, None, torch.arange(n), step=0, epoch=0).loss
    torch.testing.assert_close(ours, dense)


def _two_process_grads(rank, world, x, y, s):
    b = x.shape[0] // world
    xl = x[rank * b:(rank + 1) * b].clone().requires_grad_()
    yl = y[rank * b:(rank + 1) * b].clone().requires_grad_()
    sl = s.clone().requires_grad_()
    loss = make_objective()(xl, yl, sl, None, torch.arange(b), step=0, epoch=0).loss
    loss.backward()
    ref_x = x[rank * b:(rank + 1) * b].clone().requires_grad_()
    ref_y = y[rank * b:(rank + 1) * b].clone().requires_grad_()
    ref_s = s.clone().requires_grad_()
    ref = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(ref_x, ref_y, ref_s)
    ref.backward()
    return {"loss": loss.detach(), "gx": xl.grad, "gy": yl.grad, "gs": sl.grad,
            "ref_loss": ref.detach(), "ref_gx": ref_x.grad, "ref_gy": ref_y.grad, "ref_gs": ref_s.grad}


@pytest.mark.slow
def test_clip_two_processes_equal_open_clip_and_concatenated_batch():
    x, y = features(n=12)
    s = torch.tensor(7.0, dtype=torch.float64)
    out = run_distributed(_two_process_grads, 2, x, y, s)
    # equals open_clip's ClipLoss(local_loss, gather_with_grad) on every rank
    for r in out:
        torch.testing.assert_close(r["loss"], r["ref_loss"])
        torch.testing.assert_close(r["gx"], r["ref_gx"])
        torch.testing.assert_close(r["gy"], r["ref_gy"])
        torch.testing.assert_close(r["gs"], r["ref_gs"])
    # DDP averages gradients over ranks: that average equals the 1-process gradient of the concatenated batch
    xf, yf, sf = x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()
    full = make_objective()(xf, yf, sf, None, torch.arange(12), step=0, epoch=0).loss
    full.backward()
    gx = torch.cat([r["gx"] for r in out]) / 2
    gy = torch.cat([r["gy"] for r in out]) / 2
    gs = sum(r["gs"] for r in out) / 2
    torch.testing.assert_close(gx, xf.grad)
    torch.testing.assert_close(gy, yf.grad)
    torch.testing.assert_close(gs, sf.grad)
    torch.testing.assert_close(sum(r["loss"] for r in out) / 2, full.detach())


@pytest.mark.parametrize("scheme", ["plain", "rescaled"])
def test_temperature_scheme_gradients(scheme):
    from amorlip.schedules import apply_temperature_scheme

    x, y = features()
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    xg = x.clone().requires_grad_()
    loss = make_objective()(xg, y, s, None, torch.arange(12), step=0, epoch=0).loss
    total = apply_temperature_scheme(loss, s, scheme, rho=6.5)
    gx, gs = torch.autograd.grad(total, [xg, s])
    xg2 = x.clone().requires_grad_()
    l2 = make_objective()(xg2, y, s, None, torch.arange(12), step=0, epoch=0).loss
    dx, ds = torch.autograd.grad(l2, [xg2, s])
    if scheme == "plain":
        torch.testing.assert_close(gx, dx)
        torch.testing.assert_close(gs, ds)
    else:  # L / sg(s) + rho / s
        torch.testing.assert_close(gx, dx / s.detach())
        torch.testing.assert_close(gs, ds / s.detach() - 6.5 / s.detach() ** 2)
