"""SigLIP objective against open_clip's SigLipLoss and a dense loop (loss and gradients), 1 process.

The 2-process checks live in tests/test_baselines_dist.py.
"""
import math

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from amorlip.config import build_config
from amorlip.objectives import get
from amorlip.objectives.base import ObjectiveContext


def make_objective():
    ctx = ObjectiveContext(dataset_size=100, steps_per_epoch=10, total_steps=10, total_epochs=1, embed_dim=8,
                           local_batch_size=6)
    return get("siglip")(None, ctx)


def features(n=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_siglip_equals_open_clip_loss_and_grads():
    x, y = features()
    s, b = torch.tensor(math.exp(2.1), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ours_in, ref_in = leaves(x, y, s, b), leaves(x, y, s, b)
    ours = make_objective()(*ours_in, torch.arange(10), step=0, epoch=0).loss
    ref = SigLipLoss()(*ref_in)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref.backward()
    for a, r in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_siglip_matches_dense_loop():
    x, y = features(n=7, seed=4)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    n = x.shape[0]
    dense = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            dense = dense - math.log(1.0 / (1.0 + math.exp(-z * (float(s) * float(x[i] @ y[j]) + float(b)))))
    ours = make_objective()(x, y, s, b, torch.arange(n), step=0, epoch=0).loss
    torch.testing.assert_close(ours, torch.tensor(dense / n, dtype=torch.float64))


def test_siglip_without_bias_matches_open_clip():
    x, y = features(seed=2)
    s = torch.tensor(5.0, dtype=torch.float64)
    ours = make_objective()(x, y, s, None, torch.arange(10), step=0, epoch=0).loss
    torch.testing.assert_close(ours, SigLipLoss()(x, y, s, None))


def test_siglip_model_overrides_give_siglip_init():
    from amorlip.models import create_model

    cls = get("siglip")
    model = create_model("micro-vit", **cls.model_overrides)[0]
    torch.testing.assert_close(model.logit_scale.exp().detach(), torch.tensor(10.0))
    torch.testing.assert_close(model.logit_bias.detach().reshape(()), torch.tensor(-10.0))


def test_tiny_siglip_preset():
    cfg = build_config("tiny-siglip")
    assert cfg.objective == "siglip"
    assert cfg.temperature.scheme == "plain"
