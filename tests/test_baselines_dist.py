"""SigLIP, SogCLR, FastCLIP and NeuCLIP in 2 gloo processes against open_clip and the 1-process run.

Semantics checked (docs/baselines.md derives them): DDP averages parameter gradients over the W ranks, so the
quantity to compare is (each rank's gradient w.r.t. its local features) / W, and the mean over ranks of the
scalar parameters' (s, b) gradients, against the 1-process gradient of the concatenated batch. SigLIP is also
compared rank by rank with open_clip's own distributed SigLipLoss. All four objectives run in ONE spawn.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from amorlip import distributed
from amorlip.objectives import get
from amorlip.objectives.base import ObjectiveContext
from amorlip.schedules import apply_temperature_scheme
from dist_utils import run_distributed

pytestmark = pytest.mark.slow  # every test here starts two processes

WORLD = 2
N = 12  # global batch
DATASET = 30
STEPS = 3

OPTIONS = {
    "sogclr": dict(temperature=None, gamma=0.5),
    "fastclip": dict(version=3, gamma_min=0.3, gamma_decay_epochs=2),
    "neuclip": dict(num_prototypes=10, inner_steps=2, restart_every=2, lr=1e-2),
}
SCHEME = {"sogclr": "plain", "fastclip": "rescaled", "neuclip": "rescaled"}


def make(name):
    cls = get(name)
    ctx = ObjectiveContext(dataset_size=DATASET, steps_per_epoch=2, total_steps=STEPS, total_epochs=2, embed_dim=8,
                           local_batch_size=N // WORLD, world_size=distributed.world_size(), rank=distributed.rank())
    return cls(cls.Config(**OPTIONS[name]) if name in OPTIONS else None, ctx)


def data():
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(STEPS):
        x = F.normalize(torch.randn(N, 8, generator=g, dtype=torch.float64), dim=-1)
        y = F.normalize(x + torch.randn(N, 8, generator=g, dtype=torch.float64), dim=-1)
        idx = (torch.arange(N) * 7 + 5 * k) % DATASET  # revisits samples across steps
        s = torch.tensor(5.0 + k, dtype=torch.float64)
        out.append((x, y, idx, s))
    return out


def run_objective(name, batches, rank, world):
    """Train-loop-like steps on this rank's slices; returns losses, gradients and the final state."""
    obj = make(name)
    b = N // world
    rows = slice(rank * b, (rank + 1) * b)
    steps = []
    distributed.COLLECTIVES.clear()
    for k, (x, y, idx, s) in enumerate(batches):
        xl, yl, sl = x[rows].clone().requires_grad_(), y[rows].clone().requires_grad_(), s.clone().requires_grad_()
        out = obj(xl, yl, sl, None, idx[rows], step=k, epoch=k // 2)
        total = apply_temperature_scheme(out.loss, sl, SCHEME[name], 6.5)
        if out.extra_loss is not None:
            total = total + out.extra_loss
        total.backward()
        steps.append({"loss": out.loss.detach(), "gx": xl.grad, "gy": yl.grad, "gs": sl.grad})
    state = {k: v.clone() for k, v in obj.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"steps": steps, "state": state, "collectives": dict(distributed.COLLECTIVES)}


def siglip_rank(rank, world, x, y, s, bias):
    b = N // world
    rows = slice(rank * b, (rank + 1) * b)
    ours = [x[rows].clone().requires_grad_(), y[rows].clone().requires_grad_(), s.clone().requires_grad_(),
            bias.clone().requires_grad_()]
    ref = [t.clone().detach().requires_grad_() for t in ours]
    loss = make("siglip")(*ours, torch.arange(b), step=0, epoch=0).loss
    loss.backward()
    ref_loss = SigLipLoss(rank=rank, world_size=world)(*ref)
    ref_loss.backward()
    return {"loss": loss.detach(), "grads": [t.grad for t in ours],
            "ref_loss": ref_loss.detach(), "ref_grads": [t.grad for t in ref]}


def _worker(rank, world, batches, siglip_inputs):
    out = {"siglip": siglip_rank(rank, world, *siglip_inputs)}
    for name in ("sogclr", "fastclip", "neuclip"):
        out[name] = run_objective(name, batches, rank, world)
    return out


@pytest.fixture(scope="module")
def results():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(N, 8, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + torch.randn(N, 8, generator=g, dtype=torch.float64), dim=-1)
    siglip_inputs = (x, y, torch.tensor(math.exp(2.0), dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64))
    batches = data()
    return {"ranks": run_distributed(_worker, WORLD, batches, siglip_inputs), "batches": batches,
            "siglip_inputs": siglip_inputs}


@pytest.mark.slow
def test_siglip_two_processes_equal_open_clip_rank_by_rank(results):
    for r in results["ranks"]:
        out = r["siglip"]
        torch.testing.assert_close(out["loss"], out["ref_loss"])
        for ours, ref in zip(out["grads"], out["ref_grads"]):
            torch.testing.assert_close(ours, ref)


def test_siglip_two_processes_average_to_the_concatenated_batch(results):
    """Sum over ranks of open_clip's per-rank losses = W x the 1-process loss (1/N normalisation); DDP divides
    the summed gradients by W, so the averaged gradients are the 1-process gradients of the global batch."""
    x, y, s, b = [t.clone().requires_grad_() for t in results["siglip_inputs"]]
    full = make("siglip")(x, y, s, b, torch.arange(N), step=0, epoch=0).loss
    full.backward()
    ranks = [r["siglip"] for r in results["ranks"]]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, full.detach())
    torch.testing.assert_close(torch.cat([r["grads"][0] for r in ranks]) / WORLD, x.grad)
    torch.testing.assert_close(torch.cat([r["grads"][1] for r in ranks]) / WORLD, y.grad)
    torch.testing.assert_close(sum(r["grads"][2] for r in ranks) / WORLD, s.grad)
    torch.testing.assert_close(sum(r["grads"][3] for r in ranks) / WORLD, b.grad)


@pytest.mark.parametrize("name", ["sogclr", "fastclip", "neuclip"])
def test_per_sample_objectives_match_the_concatenated_batch(results, name):
    with distributed_single():
        ref = run_objective(name, results["batches"], 0, 1)
    ranks = [r[name] for r in results["ranks"]]
    for k in range(STEPS):
        steps = [r["steps"][k] for r in ranks]
        want = ref["steps"][k]
        torch.testing.assert_close(sum(st["loss"] for st in steps) / WORLD, want["loss"], rtol=1e-6, atol=1e-7)
        # DDP-averaged feature gradients = the 1-process gradients of the global batch
        torch.testing.assert_close(torch.cat([st["gx"] for st in steps]) / WORLD, want["gx"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.cat([st["gy"] for st in steps]) / WORLD, want["gy"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sum(st["gs"] for st in steps) / WORLD, want["gs"], rtol=1e-5, atol=1e-7)
    # every rank holds identical state (u buffers, prototypes, banks), equal to the 1-process state
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{name}: {key} differs between ranks"
        torch.testing.assert_close(value, ref["state"][key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_sogclr_communication_per_step(results):
    """Two all_gathers per step (features; indices + new u), none with gradient."""
    for name in ("sogclr", "fastclip"):
        assert results["ranks"][0][name]["collectives"] == {"all_gather": 2 * STEPS}
    # NeuCLIP: features gathered once per step, the prototype gradient all-reduced once per inner step
    assert results["ranks"][0]["neuclip"]["collectives"] == {"all_gather": STEPS, "all_reduce": 2 * STEPS}


class distributed_single:
    """The 1-process reference runs in the test process, where no process group exists."""

    def __enter__(self):
        assert distributed.world_size() == 1

    def __exit__(self, *exc):
        return False
