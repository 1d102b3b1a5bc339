"""Tiled exact losses (objectives/tiled.py): loss, metrics and gradients (features, scale, bias) of the tiled
CLIP, SigLIP, AmorLIP, SogCLR, FastCLIP and NeuCLIP paths equal the dense ones in fp64, for batches the tile does not divide; the
tile_size key (auto, 0, >= B, bad values); 2 gloo processes; no B x B tensor in the autograd graph."""

import pytest
import torch
import torch.nn.functional as F

from amorlip.config import ConfigError, build_config
from amorlip.objectives import get, tiled
from amorlip.objectives.amorlip import AmorConfig
from amorlip.objectives.base import ObjectiveContext
from amorlip.objectives.clip import ClipConfig
from amorlip.objectives.neuclip import NeuCLIPConfig
from amorlip.objectives.siglip import SigLipConfig
from amorlip.objectives.sogclr import FastCLIPConfig, SogCLRConfig
from dist_utils import run_distributed

TOL = dict(rtol=1e-10, atol=1e-12)



def ctx(b, d=8):
    return ObjectiveContext(dataset_size=20 * b, steps_per_epoch=10, total_steps=30, total_epochs=3, embed_dim=d,
                            local_batch_size=b)


def make(name, tile_size, b, d=8, **kw):
    cfgs = {"clip": ClipConfig, "siglip": SigLipConfig, "amorlip": AmorConfig, "sogclr": SogCLRConfig,
            "fastclip": FastCLIPConfig, "neuclip": NeuCLIPConfig}
    torch.manual_seed(0)  # AmorLIP draws its nets' seed from torch's RNG: the same nets for both variants
    return get(name)(cfgs[name](tile_size=tile_size, **kw), ctx(b, d))


def features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def run(obj, x, y, s, bias, steps=1):
    """Loss, metrics and gradients over `steps` steps (AmorLIP: Stage I at step 0, then Stage II only)."""
    leaves = [t.clone().requires_grad_() for t in (x, y, s)] + ([bias.clone().requires_grad_()] if bias is not None else [])
    outs = []
    for step in range(steps):
        out = obj(leaves[0], leaves[1], leaves[2], leaves[3] if bias is not None else None, torch.arange(x.shape[0]),
                  step=step, epoch=0)
        total = out.loss if out.extra_loss is None else out.loss + out.extra_loss
        grads = torch.autograd.grad(total, leaves)
        outs.append((out.loss.detach(), {k: v for k, v in out.metrics.items()}, grads))
    return outs


FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def assert_same(a, b, fp32_from=None):
    """Equal losses, metrics and gradients per step. From step `fp32_from` on (AmorLIP: its nets are trained in
    fp32 by Stage I at step 0 from targets whose rounding differs in the last bits between the two runs; the
    online divisor reads them at once, the others from the next step), at fp32's tolerance."""
    for i, ((la, ma, ga), (lb, mb, gb)) in enumerate(zip(a, b)):
        step_tol = FP32_TOL if fp32_from is not None and i >= fp32_from else TOL
        torch.testing.assert_close(la, lb, **step_tol)
        assert ma.keys() == mb.keys()
        for k in ma:  # Stage I runs in fp32 by design (its targets' rounding differs in the last bits)
            fp32 = torch.as_tensor(ma[k]).dtype != torch.float64 or k.startswith("amor_loss")
            tol = FP32_TOL if fp32 else step_tol
            torch.testing.assert_close(torch.as_tensor(ma[k], dtype=torch.float64),
                                       torch.as_tensor(mb[k], dtype=torch.float64), **tol, msg=k)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, **step_tol)


CASES = [
    ("clip", {}, False),
    ("clip", {}, True),
    ("siglip", {}, True),
    ("siglip", {}, False),
    ("amorlip", {}, False),
    ("amorlip", {"pos_coef": 1e-3}, True),
    ("amorlip", {"pos_coef": 0.0}, False),
    ("amorlip", {"divide_by": "target"}, True),
    ("amorlip", {"divide_by": "online", "loss": "f-div"}, False),
    ("sogclr", {"temperature": None}, False),
    ("sogclr", {"eps": 1e-3}, False),
    ("fastclip", {}, False),
    ("fastclip", {"temperature_grad": "exact", "version": 0}, False),
    ("neuclip", {}, False),
]


@pytest.mark.parametrize("b,tile", [(37, 8), (23, 5), (9, 1)])
@pytest.mark.parametrize("name,kw,with_bias", CASES)
def test_tiled_equals_dense(name, kw, with_bias, b, tile):
    x, y = features(b, seed=b)
    s = torch.tensor(9.0 if name != "siglip" else 10.0, dtype=torch.float64)
    bias = torch.tensor([-3.0], dtype=torch.float64) if with_bias else None
    steps = 1 if name in ("clip", "siglip") else 2  # the others' state (u, nets, prototypes) moves after step 0
    dense = run(make(name, 0, b, **kw), x, y, s, bias, steps)
    tiled_ = run(make(name, tile, b, **kw), x, y, s, bias, steps)
    fp32_from = None if name != "amorlip" else 0 if kw.get("divide_by") == "online" else 1
    assert_same(tiled_, dense, fp32_from)


@pytest.mark.parametrize("name", ["clip", "siglip", "amorlip", "sogclr", "fastclip", "neuclip"])
def test_tile_at_least_batch_is_dense_and_auto_small_is_dense(name):
    b = 37
    assert tiled.resolve_tile(b, b, b) == 0 and tiled.resolve_tile(64, b, b) == 0 and tiled.resolve_tile(0, b, b) == 0
    assert tiled.resolve_tile(None, b, b) == 0  # auto: dense for small batches
    x, y = features(b)
    s = torch.tensor(8.0, dtype=torch.float64)
    assert_same(run(make(name, 64, b), x, y, s, None), run(make(name, 0, b), x, y, s, None))


def test_auto_tiles_large_batches():
    assert tiled.resolve_tile(None, 2048, 2048) == 0
    assert tiled.resolve_tile(None, 4096, 4096) == 512
    assert tiled.resolve_tile(None, 8192, 8192) == 256
    assert tiled.resolve_tile(None, 1024, 2**20) == tiled.AUTO_MIN_ROWS
    assert tiled.resolve_tile(100, 8192, 8192) == 100


@pytest.mark.parametrize("section,key", [("clip", "clip.tile_size"), ("siglip", "siglip.tile_size"),
                                         ("amorlip", "amor.tile_size"), ("sogclr", "sogclr.tile_size"),
                                         ("fastclip", "fastclip.tile_size"), ("neuclip", "neuclip.tile_size")])
def test_bad_tile_size_is_a_config_error_naming_the_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(None, [("objective", section), (key, "-1")])
    cfg = build_config(None, [("objective", section), (key, "16")])
    assert cfg.section(key.split(".")[0]).tile_size == 16


def test_no_batch_by_batch_tensor_in_the_graph():
    """The autograd graph of the tiled loss saves only O(B d + B) tensors (the recompute-in-backward design)."""
    b, d, tile = 64, 8, 8
    x, y = features(b, d)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for name in ("clip", "siglip", "amorlip", "sogclr", "fastclip"):
        saved.clear()
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = make(name, tile, b, d)(xs, ys, s, None, torch.arange(b), step=1, epoch=0).loss
        assert saved and max(saved) <= b * d, (name, max(saved))
        loss.backward()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            make(name, 0, b, d)(xs, ys, s, None, torch.arange(b), step=1, epoch=0)
        assert max(saved) >= b * b  # the dense path does hold one (the check above means something)


def test_fp32_and_autocast_close_to_dense():
    b = 37
    x, y = (t.float() for t in features(b))
    s = torch.tensor(14.0)
    for name in ("clip", "siglip", "amorlip"):
        dense = run(make(name, 0, b), x, y, s, None)[0]
        tl = run(make(name, 8, b), x, y, s, None)[0]
        torch.testing.assert_close(tl[0], dense[0], rtol=1e-5, atol=1e-5)
        for u, v in zip(tl[2], dense[2]):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make("clip", 8, b)(x.bfloat16(), y.bfloat16(), s, None, torch.arange(b), step=0, epoch=0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def _two_process(rank, world, x, y, s, bias, name, kw, tile):
    b = x.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    out = {}
    for key, t in (("dense", 0), ("tiled", tile)):
        obj = make(name, t, b, **kw)
        leaves = [x[sl].clone().requires_grad_(), y[sl].clone().requires_grad_(), s.clone().requires_grad_(),
                  bias.clone().requires_grad_()]
        res = obj(*leaves, torch.arange(b) + rank * b, step=0, epoch=0)
        loss = res.loss if res.extra_loss is None else res.loss + res.extra_loss
        out[key] = [loss.detach(), *torch.autograd.grad(loss, leaves, allow_unused=True)]
    return out


@pytest.mark.parametrize("name,kw", [("clip", {}), ("siglip", {}), ("amorlip", {"stage2_negatives": "global"}),
                                     ("sogclr", {"temperature": None}), ("fastclip", {"temperature_grad": "release"}),
                                     ("neuclip", {})])
@pytest.mark.slow
def test_two_processes_tiled_equals_dense(name, kw):
    x, y = features(2 * 13, seed=5)
    out = run_distributed(_two_process, 2, x, y, torch.tensor(6.0, dtype=torch.float64),
                          torch.tensor([-1.0], dtype=torch.float64), name, kw, 4)
    for r in out:
        for a, b in zip(r["tiled"], r["dense"]):
            if a is None or b is None:  # a bias the objective does not use
                assert a is None and b is None
                continue
            torch.testing.assert_close(a, b, **TOL)


def test_neuclip_prototype_term_tiled_equals_dense():
    from amorlip.objectives.neuclip import prototype_log_normalizer

    x, y = features(37, seed=2)
    w = torch.randn(53, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.tensor(12.0, dtype=torch.float64)
    outs = []
    for tile_size in (0, 8):
        leaves = [t.clone().requires_grad_() for t in (x, y, w, s)]
        pos = (leaves[0] * leaves[1]).sum(1)
        a = prototype_log_normalizer(leaves[0], leaves[2], pos, leaves[3], 1e-14, tile_size)
        outs.append((a.detach(), torch.autograd.grad((a * torch.linspace(-1, 2, 37, dtype=torch.float64)).sum(), leaves)))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    for u, v in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(u, v, **TOL)
