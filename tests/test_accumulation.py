"""Cached-feature accumulation (train.accum_steps): with K micro-batches every objective computes what it
computes with K = 1 -- the same parameter gradients and the same objective state after several steps (fp64,
tight), on one process and on 2 gloo processes; randomness (dropout) replays in pass 2; resume with K > 1 is
exact mid-epoch, also across a RECLIP phase switch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amorlip import distributed
from amorlip.checkpoint import latest_checkpoint, load_checkpoint
from amorlip.cli import main
from amorlip.objectives import REGISTRY, get
from amorlip.objectives.base import ObjectiveContext
from amorlip.step import forward_backward, objective_loss
from dist_utils import run_distributed

N, DIM, DATASET, STEPS = 16, 8, 40, 3
OPTIONS = {
    "sogclr": dict(temperature=None, gamma=0.5),
    "fastclip": dict(version=3, gamma_min=0.3, gamma_decay_epochs=2),
    "neuclip": dict(num_prototypes=10, inner_steps=2, restart_every=2, lr=1e-2),
}
SCHEME = {"fastclip": "rescaled", "neuclip": "rescaled"}


class ToyCLIP(nn.Module):
    """Two small towers with dropout, open_clip's output dict (features normalised, s = exp(logit_scale))."""

    def __init__(self, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, DIM))
        self.token = nn.Embedding(50, 16)
        self.text = nn.Sequential(nn.Dropout(dropout), nn.Linear(16, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0)) if bias else None

    def forward(self, images, texts):
        out = {"image_features": F.normalize(self.image(images), dim=-1),
               "text_features": F.normalize(self.text(self.token(texts).mean(1)), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def make_objective(name: str, local_batch: int):
    cls = get(name)
    ctx = ObjectiveContext(dataset_size=DATASET, steps_per_epoch=2, total_steps=STEPS, total_epochs=2, embed_dim=DIM,
                           local_batch_size=local_batch, world_size=distributed.world_size(), rank=distributed.rank())
    cfg = cls.Config(**OPTIONS[name]) if name in OPTIONS else (cls.Config() if cls.Config is not None else None)
    return cls(cfg, ctx)


def batches(n: int = N):
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(STEPS):
        images = torch.randn(n, 12, generator=g, dtype=torch.float64)
        texts = torch.randint(0, 50, (n, 5), generator=g)
        out.append((images, texts, (torch.arange(n) * 7 + 3 * k) % DATASET))
    return out


def train_steps(name, model, objective, data, accum, rows=slice(None), train_model=None):
    """A few trainer-like steps (SGD on the model); each step's parameter gradients, and the final states."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step, (images, texts, idx) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        forward_backward(train_model or model, objective, images[rows], texts[rows], idx[rows], step=step, epoch=step // 2,
                         scheme=SCHEME.get(name, "plain"), rho=6.5, autocast=_no_autocast,
                         backward=lambda loss: loss.backward(), accum_steps=accum)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return grads, copy.deepcopy(model.state_dict()), copy.deepcopy(objective.state_dict())


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def assert_close(a, b, path, rtol=1e-9, atol=1e-11):
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=atol), path
    else:
        assert a == b, path


@pytest.mark.parametrize("name", list(REGISTRY))
def test_accumulation_equals_the_full_batch(name):
    torch.manual_seed(0)
    model = ToyCLIP(bias=name == "siglip").double()
    objective = make_objective(name, N)
    ref = train_steps(name, copy.deepcopy(model), copy.deepcopy(objective), batches(), accum=1)
    for k in (2, 4):
        got = train_steps(name, copy.deepcopy(model), copy.deepcopy(objective), batches(), accum=k)
        assert_close(got[0], ref[0], f"{name} K={k} gradients")
        assert_close(got[1], ref[1], f"{name} K={k} model")
        assert_close(got[2], ref[2], f"{name} K={k} objective state")


def test_accumulation_fp32_within_1e5():
    torch.manual_seed(0)
    model = ToyCLIP(bias=False)
    objective = make_objective("amorlip", N).float()
    data = [(i.float(), t, x) for i, t, x in batches()]
    ref = train_steps("amorlip", copy.deepcopy(model), copy.deepcopy(objective), data, accum=1)
    got = train_steps("amorlip", copy.deepcopy(model), copy.deepcopy(objective), data, accum=4)
    assert_close(got[0], ref[0], "fp32 gradients", rtol=1e-5, atol=1e-6)


def test_dropout_replays_in_pass_two():
    """With dropout, K micro-batches draw their masks in turn; pass 2 must redraw exactly those: the reference
    runs the micro-batches one after another WITH autograd from the same RNG state."""
    model = ToyCLIP(bias=False, dropout=0.5).double()
    objective = make_objective("clip", N)
    images, texts, idx = batches()[0]
    torch.manual_seed(123)
    ref_model = copy.deepcopy(model)
    outs = [ref_model(i, t) for i, t in zip(images.chunk(4), texts.chunk(4))]
    out = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    out["logit_scale"] = outs[0]["logit_scale"]
    loss, _ = objective_loss(copy.deepcopy(objective), out, idx, step=0, epoch=0, scheme="plain", rho=6.5)
    loss.backward()
    torch.manual_seed(123)
    forward_backward(model, copy.deepcopy(objective), images, texts, idx, step=0, epoch=0, scheme="plain", rho=6.5,
                     autocast=_no_autocast, backward=lambda total: total.backward(), accum_steps=4)
    rng_after = torch.get_rng_state()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    torch.manual_seed(123)
    for i, t in zip(images.chunk(4), texts.chunk(4)):
        ref_model(i, t)
    assert torch.equal(rng_after, torch.get_rng_state()), "the RNG continues as after one pass"


def test_batch_norm_running_stats_update_once_per_micro_batch():
    bn = nn.BatchNorm1d(12).double()

    class WithBN(ToyCLIP):
        def forward(self, images, texts):
            return super().forward(bn(images), texts)

    model = WithBN(bias=False).double()
    model.bn = bn
    images, texts, idx = batches()[0]
    forward_backward(model, make_objective("clip", N), images, texts, idx, step=0, epoch=0, scheme="plain", rho=6.5,
                     autocast=_no_autocast, backward=lambda total: total.backward(), accum_steps=4)
    assert int(bn.num_batches_tracked) == 4  # pass 2 only: once per micro-batch, not 8 times


def _dist_worker(rank, world, name, accum):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = ToyCLIP(bias=name == "siglip").double()
    objective = make_objective(name, N // world)
    rows = slice(rank * (N // world), (rank + 1) * (N // world))
    ddp = DDP(model)
    return train_steps(name, model, objective, batches(), accum=accum, rows=rows, train_model=ddp)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "amorlip", "fastclip"])
def test_two_processes_accumulation_equals_two_processes_plain(name):
    plain = run_distributed(_dist_worker, 2, name, 1)
    accum = run_distributed(_dist_worker, 2, name, 2)
    for rank in range(2):
        assert_close(accum[rank][0], plain[rank][0], f"rank {rank} gradients")
        assert_close(accum[rank][2], plain[rank][2], f"rank {rank} objective state")


TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "96", "--train.batch-size", "16",
        "--optim.warmup-steps", "2", "--train.progress", "false", "--train.log-every", "1", "--train.steps", "9",
        "--train.checkpoint-every", "4", "--eval.zeroshot", "false", "--eval.retrieval", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clip", "amorlip"])
def test_resume_with_accumulation_is_exact(tmp_path, objective):
    base = ["train", "--objective", objective, "--train.output-dir", str(tmp_path), *TINY, "--train.accum-steps", "4"]
    assert main([*base, "--train.name", "straight"]) == 0
    assert main([*base, "--train.name", "split", "--train.stop-at", "4"]) == 0
    assert main([*base, "--train.name", "split", "--train.resume", "latest"]) == 0
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_reclip_phase_switch_with_accumulation(tmp_path):
    assert main(["train", "--train.output-dir", str(tmp_path), *TINY, "--train.steps", "4", "--train.accum-steps", "2",
                 "--resolution.phases", "[[0.5, 8, 6], [0.5, 16]]", "--train.name", "r"]) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "r"))["step"] == 4


def test_accum_steps_that_do_not_divide_the_batch_are_an_error(tmp_path, capsys):
    assert main(["train", "--train.output-dir", str(tmp_path), *TINY, "--train.accum-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.accum_steps=3" in err[0] and "divide" in err[0]
    assert not any(tmp_path.iterdir())
