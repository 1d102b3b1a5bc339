"""AmorLIP in 2 gloo processes: identical amortizers on every rank, collectives only on amortization
steps, and Stage-II gradients equal to the 1-process references (local and global negatives)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from amorlip import distributed
from amorlip.objectives.amorlip import AmorConfig, AmorLIPObjective
from amorlip.objectives.base import ObjectiveContext
from dist_utils import run_distributed

pytestmark = pytest.mark.slow  # every test here starts two processes

B, D, SPE, TOTAL, WORLD = 6, 8, 12, 20, 2
PROBE = 13  # epoch 1, k = 1: no Stage I, no EMA: the Stage-II gradient given a fixed amortizer
AMOR = 16  # epoch 1, k = 4: Stage I + EMA on the global batch


def make(world: int, b: int, kw: dict) -> AmorLIPObjective:
    ctx = ObjectiveContext(dataset_size=1000, steps_per_epoch=SPE, total_steps=3 * SPE, total_epochs=3,
                           embed_dim=D, local_batch_size=b, world_size=world)
    return AmorLIPObjective(AmorConfig(t_online=4, t_target=2, t_lambda=3, alpha=0.9, lr=1e-2, **kw), ctx)


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=-1)
    return x, y, torch.tensor(5.0 + step, dtype=torch.float64)


def nets(obj: AmorLIPObjective) -> dict:
    return {k: v.clone() for k, v in obj.state_dict().items() if k != "_extra_state"}


def _worker(rank: int, world: int, kws: list) -> list:
    """Every configuration in `kws` in turn (one process spawn for all: spawning dominates the run time)."""
    return [_run(rank, world, kw) for kw in kws]


def _run(rank: int, world: int, kw: dict) -> dict:
    torch.manual_seed(100 + rank)  # ranks' RNGs differ: identical nets must come from the broadcast seed
    obj = make(world, B, kw)
    distributed.COLLECTIVES.clear()
    counts_epoch0, rec = {}, {}
    for step in range(TOTAL):
        x, y, s = global_batch(step)
        xl = x[rank * B:(rank + 1) * B].clone().requires_grad_()
        yl = y[rank * B:(rank + 1) * B].clone().requires_grad_()
        sl = s.clone().requires_grad_()
        if step in (PROBE, AMOR):
            rec[step] = {"state": copy.deepcopy(obj.state_dict())}
        out = obj(xl, yl, sl, None, torch.arange(B), step=step, epoch=step // SPE)
        out.loss.backward()
        if step in rec:
            rec[step].update(gx=xl.grad, gy=yl.grad, gs=sl.grad, loss=out.loss.detach(), after=nets(obj))
        if step == SPE - 1:
            counts_epoch0 = dict(distributed.COLLECTIVES)
    return {"counts": counts_epoch0, "final": nets(obj), "rec": rec}


def one_process(state: dict, x, y, s, step: int, kw: dict):
    """A 1-process objective loaded with `state`, run on (x, y): its gradients and nets after the step."""
    obj = make(1, x.shape[0], kw)
    obj.load_state_dict(state)
    xs, ys, ss = (t.clone().requires_grad_() for t in (x, y, s))
    out = obj(xs, ys, ss, None, torch.arange(x.shape[0]), step=step, epoch=step // SPE)
    out.loss.backward()
    return xs.grad, ys.grad, ss.grad, nets(obj)


def check_common(out: list, kw: dict) -> None:
    # the amortizers (online, target, previous) are identical on both ranks after 20 steps and a re-init
    for k, v in out[0]["final"].items():
        assert torch.equal(v, out[1]["final"][k]), k
    # Stage I on the gathered batch equals a 1-process Stage I on the concatenated batch
    x, y, s = global_batch(AMOR)
    *_, after = one_process(out[0]["rec"][AMOR]["state"], x, y, s, AMOR, kw)
    for k, v in after.items():
        torch.testing.assert_close(out[0]["rec"][AMOR]["after"][k], v, rtol=1e-6, atol=1e-7)


LOCAL = dict(stage2_negatives="local", divide_by="target", sync_grads=True)
GLOBAL = dict(stage2_negatives="global", divide_by="comb", sync_grads=False)


@pytest.fixture(scope="module")
def dist_results():
    per_rank = run_distributed(_worker, WORLD, [LOCAL, GLOBAL])
    return {"local": [r[0] for r in per_rank], "global": [r[1] for r in per_rank]}


@pytest.mark.slow
def test_two_processes_local_stage2(dist_results):
    kw, out = LOCAL, dist_results["local"]
    check_common(out, kw)
    # epoch 0 = 12 steps with T_online = 4: Stage I at k = 0, 4, 8 -> 3 gathers, 3 x T_lambda gradient all-reduces,
    # nothing on the other 9 steps (Stage II is local)
    for r in out:
        assert r["counts"] == {"all_gather": 3, "all_reduce": 9}, r["counts"]
    # each rank's Stage-II gradient = the 1-process gradient of its own pairs given the same amortizer, so the
    # DDP average equals the mean of the per-rank 1-process gradients
    x, y, s = global_batch(PROBE)
    gs_ref = []
    for rank, r in enumerate(out):
        sl = slice(rank * B, (rank + 1) * B)
        gx, gy, gs, _ = one_process(r["rec"][PROBE]["state"], x[sl], y[sl], s, PROBE, kw)
        torch.testing.assert_close(r["rec"][PROBE]["gx"], gx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["rec"][PROBE]["gy"], gy, rtol=1e-10, atol=1e-12)
        gs_ref.append(gs)
    torch.testing.assert_close(sum(r["rec"][PROBE]["gs"] for r in out) / WORLD, sum(gs_ref) / WORLD)


def test_two_processes_global_stage2(dist_results):
    kw, out = GLOBAL, dist_results["global"]
    check_common(out, kw)  # identical without any gradient all-reduce (sync_grads off)
    # Stage I: 3 gathers, no all-reduce; Stage II gathers the features with gradient on every step
    for r in out:
        assert r["counts"] == {"all_gather": 3, "all_gather_grad": SPE}, r["counts"]
    # DDP-averaged gradient = the 1-process gradient of the concatenated batch
    x, y, s = global_batch(PROBE)
    gx, gy, gs, _ = one_process(out[0]["rec"][PROBE]["state"], x, y, s, PROBE, kw)
    for rank, r in enumerate(out):
        sl = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(r["rec"][PROBE]["gx"] / WORLD, gx[sl], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["rec"][PROBE]["gy"] / WORLD, gy[sl], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r["rec"][PROBE]["gs"] for r in out) / WORLD, gs, rtol=1e-10, atol=1e-12)
