"""The mechanism tools of docs/findings.md on known cases: `amorlip bench amortizer` (Stage I alone on frozen
features) and `amorlip eval --gradient-fidelity` (minibatch gradients against the exact full-data gradient)."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from amorlip.bench.amortizer import Setting, stage1_curve, steps_to
from amorlip.config import default_config
from amorlip.evaluate.features import FrozenFeatures, exact_log_z, r2_score
from amorlip.evaluate.log_normalizers import mean_log_partition
from amorlip.evaluate.gradients import (TrainedState, build_objective, exact_gradients, fidelity, gradient_fidelity,
                                       minibatch_gradients)
from amorlip.objectives.clip import ClipObjective
from amorlip.objectives.base import ObjectiveContext


def _features(n, d, seed=0, dtype=torch.float64, clusters=4):
    """Unit features with some structure (cluster centres + noise), texts close to their images."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g, dtype=dtype), dim=1)
    which = torch.randint(0, clusters, (n,), generator=g)
    x = F.normalize(centres[which] + 0.6 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    y = F.normalize(x + 0.4 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return x, y


def _frozen(n=256, d=8, n_held=64, scale=8.0):
    x, y = _features(n + n_held, d, dtype=torch.float32)
    return FrozenFeatures(x[:n], y[:n], torch.arange(n), x[n:], y[n:], scale, n, default_config(), 0)


def test_r2_score_on_known_estimates():
    truth = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert r2_score(truth + 5.0, truth) == pytest.approx((1.0, 5.0))  # an offset is removed
    assert r2_score(torch.full((4,), 1.5), truth)[0] == pytest.approx(0.0)  # a constant follows nothing
    assert r2_score(-truth, truth)[0] == pytest.approx(-3.0)  # mirrored: worse than a constant


def test_mean_log_partition_is_the_dense_mean_over_the_other_set():
    x, y = _features(50, 6)
    want = torch.logsumexp(3.0 * x @ y.T, dim=1) - torch.log(torch.tensor(50.0, dtype=torch.float64))
    assert torch.allclose(mean_log_partition(x, y, 3.0), want)


@pytest.mark.parametrize("positive", [True, False])
def test_exact_gradients_equal_autograd_of_the_dense_full_data_loss(positive):
    n, s = 700, 7.5  # more rows than one strip of exact_gradients
    x, y = _features(n, 12)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    logits = s * xr @ yr.T
    pos = logits.diagonal()
    if not positive:  # SogCLR's GCL: log mean over the negatives of exp(logit - positive logit)
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    loss = 0.5 * ((torch.logsumexp(logits, 1) - pos).mean() + (torch.logsumexp(logits, 0) - pos).mean())
    gx, gy = torch.autograd.grad(loss, [xr, yr])
    ex, ey = exact_gradients(x, y, s, positive)
    assert torch.allclose(ex, n * gx, atol=1e-10) and torch.allclose(ey, n * gy, atol=1e-10)


def _clip(n, batch):
    ctx = ObjectiveContext(dataset_size=n, steps_per_epoch=n // batch, total_steps=10, total_epochs=2,
                           embed_dim=8, local_batch_size=batch)
    return ClipObjective(None, ctx)


def test_clip_minibatch_gradient_at_batch_n_is_the_exact_one():
    n, s = 96, 6.0
    x, y = _features(n, 8)
    total, sq, visits = minibatch_gradients(_clip(n, n), x, y, s, n, warmup=0, epochs=2)
    exact = torch.cat(exact_gradients(x, y, s), dim=1)
    assert torch.equal(visits, torch.full((n,), 2))
    assert torch.allclose(total / 2, exact, atol=1e-10)
    got = fidelity(total, sq, visits, exact)
    assert got["cosine"] == pytest.approx(1.0, abs=1e-12) and got["rel_error"] < 1e-10
    assert got["rel_variance"] == pytest.approx(0.0, abs=1e-12)  # the same batch every epoch: no noise


def test_clip_small_batch_gradient_is_biased_and_noisy_against_the_exact_one():
    n, s = 256, 10.0
    x, y = _features(n, 8)
    exact = torch.cat(exact_gradients(x, y, s), dim=1)
    small = fidelity(*minibatch_gradients(_clip(n, 8), x, y, s, 8, warmup=0, epochs=6), exact)
    large = fidelity(*minibatch_gradients(_clip(n, 128), x, y, s, 128, warmup=0, epochs=6), exact)
    assert small["rel_error"] > 2 * large["rel_error"] > 0  # the in-batch softmax's bias shrinks with B
    assert small["rel_variance"] > large["rel_variance"] > 0


def test_gradient_fidelity_runs_every_objective_and_sogclr_is_exact_at_batch_n():
    feats = _frozen(n=64)
    records = gradient_fidelity(feats, ["clip", "sogclr", "fastclip", "amorlip", "neuclip"], [16, 64],
                                warmup=1, epochs=2, log=lambda *a, **k: None)
    assert [(r["objective"], r["batch_size"]) for r in records] == [
        (o, b) for o in ("clip", "sogclr", "fastclip", "amorlip", "neuclip") for b in (16, 64)]
    for r in records:
        assert r["pairs"] == 64 and r["visits"] == 2.0 and -1.0 <= r["cosine"] <= 1.0 + 1e-9
    by = {(r["objective"], r["batch_size"]): r for r in records}
    assert by[("clip", 64)]["rel_error"] < 1e-6
    # SogCLR at B = N: u holds the exact full-data g after its first visit (gamma 1), so its gradient is the
    # exact gradient of its own loss (GCL); against InfoNCE it differs by the positive's place in the partition
    assert by[("sogclr", 64)]["own_loss"] == "gcl" and by[("sogclr", 64)]["rel_error"] < 1e-5
    assert by[("sogclr", 64)]["infonce_rel_error"] > 1e-3


def test_bias_removes_the_noise_the_mean_of_few_visits_keeps():
    """Visits g = (1 + c) exact + independent noise: `bias` estimates c whatever the noise and the visits, while
    the raw error of the mean grows with the noise / visits; the noise-free cosine is 1, the norm ratio 1 + c."""
    g = torch.Generator().manual_seed(3)
    n, d, c = 4000, 8, 0.25
    exact = torch.randn(n, d, generator=g, dtype=torch.float64)
    for visits, noise_sd in ((2, 1.0), (8, 0.5)):
        draws = (1 + c) * exact[None] + noise_sd * torch.randn(visits, n, d, generator=g, dtype=torch.float64)
        got = fidelity(draws.sum(0), (draws ** 2).sum((0, 2)), torch.full((n,), visits), exact)
        noise_share = noise_sd ** 2 / visits  # per coordinate, against exact's unit variance
        assert got["bias"] == pytest.approx(c, abs=0.01)
        assert got["rel_error"] == pytest.approx(math.sqrt(c ** 2 + noise_share), abs=0.01)
        assert got["rel_error"] > c + 0.05
        assert got["bias_cosine"] == pytest.approx(1.0, abs=0.01)
        assert got["cosine"] == pytest.approx((1 + c) / math.sqrt((1 + c) ** 2 + noise_share), abs=0.002)
        assert got["bias_norm_ratio"] == pytest.approx(1 + c, abs=0.01)
        assert got["rel_variance"] == pytest.approx(noise_sd ** 2, rel=0.05)
    # uneven visits (a dropped last batch): pairs seen once carry no variance and are left out of the bias
    visits = torch.where(torch.arange(n) % 10 == 0, 1, 3)
    draws = (1 + c) * exact[None] + torch.randn(3, n, d, generator=g, dtype=torch.float64)
    draws = draws * (torch.arange(3)[:, None] < visits[None, :])[..., None]  # the visits that happened
    got = fidelity(draws.sum(0), (draws ** 2).sum((0, 2)), visits, exact)
    assert got["bias"] == pytest.approx(c, abs=0.015) and got["bias_norm_ratio"] == pytest.approx(1 + c, abs=0.015)
    once = fidelity(draws[:1].sum(0), (draws[:1] ** 2).sum((0, 2)), torch.ones(n, dtype=torch.long), exact)
    assert math.isnan(once["bias"]) and math.isnan(once["rel_variance"]) and once["rel_error"] > c
    # unbiased visits with the noise of each visit given exactly (draws exact +- e): nothing is left once it is
    # removed, which is said as NaN (not as a bias of 0 and a cosine of 1)
    e = 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    pm = torch.stack([exact + e, exact - e])
    lost = fidelity(pm.sum(0), (pm ** 2).sum((0, 2)), torch.full((n,), 2), exact)
    assert math.isnan(lost["bias"]) and lost["rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert lost["bias_norm_ratio"] == pytest.approx(math.sqrt(1 - float((e * e).sum() / (exact * exact).sum())))


def test_a_trained_state_is_measured_as_saved_and_a_fresh_one_is_not():
    """SogCLR with a slow u (gamma 0.01): a state whose u holds the exact full-data partitions (one pass at B = N,
    where a first visit sets u to them) gives a nearly exact gradient at B = 8 from its first visit, while a fresh
    state (u set from the first biased batches) stays biased; the trained run keeps its epoch (no new one)."""
    feats = _frozen(n=64)
    feats.config.sections["sogclr"].gamma = 0.01
    x, y = feats.image.double(), feats.text.double()
    exact_pass = build_objective(feats.config, "sogclr", 64, 64, 1, 8)
    minibatch_gradients(exact_pass, x, y, feats.scale, 64, warmup=0, epochs=1)
    trained = TrainedState("sogclr", exact_pass.state_dict(), step=7, epoch=3, steps_per_epoch=8, total_steps=80)
    quiet = {"warmup": 0, "epochs": 4, "log": lambda *a, **k: None}
    warm, = gradient_fidelity(feats, ["sogclr"], [8], trained=trained, **quiet)
    fresh, = gradient_fidelity(feats, ["sogclr"], [8], **quiet)
    assert warm["state"] == "trained (step 7)" and fresh["state"] == "warm-up 0 epochs"
    assert fresh["rel_error"] > 10 * warm["rel_error"] and fresh["bias"] > 5  # a fresh u stays biased
    assert math.isnan(warm["bias"])  # the exact u: once the visits' noise is removed, no bias is left
    seen = []
    obj = build_objective(feats.config, "sogclr", 64, 8, 2, 8, trained)

    def spy(*args, step, epoch):
        seen.append((step, epoch))
        return type(obj).forward(obj, *args, step=step, epoch=epoch)
    obj.forward = spy
    minibatch_gradients(obj, x, y, feats.scale, 8, 0, 2, indices=feats.indices, start_step=7, fixed_epoch=3)
    assert seen == [(7 + k, 3) for k in range(16)]  # steps continue from the checkpoint's, every pass is epoch 3
    assert not torch.equal(obj.log_u_img, exact_pass.log_u_img)  # ... and the state keeps moving as in training


@pytest.mark.slow
def test_a_net_that_can_fit_log_z_reaches_r2_near_one():
    feats = _frozen(n=256, d=8)
    truth = exact_log_z(feats)
    exact = stage1_curve(Setting("mlp", 4.0, 1e-2, 64, 0, "exact"), feats, truth, [50, 2000])
    assert exact[0]["target/train/image_r2"] < exact[-1]["target/train/image_r2"]
    for mod in ("image", "text"):
        assert exact[-1][f"online/train/{mod}_r2"] > 0.95
        assert exact[-1][f"online/heldout/{mod}_r2"] > 0.8
    # at B = N the batch's own log partitions are the exact ones: AmorLIP's Stage I learns them too
    full = stage1_curve(Setting("mlp", 4.0, 1e-2, 256, 0, "batch"), feats, truth, [2000])
    assert full[-1]["online/train/image_r2"] > 0.95
    assert steps_to(exact, "online/train/image_r2", 0.9) == 2000


@pytest.mark.slow
def test_reinitialisation_resets_the_nets():
    feats = _frozen(n=256, d=8)
    truth = exact_log_z(feats)
    recs = stage1_curve(Setting("mlp", 4.0, 1e-2, 64, 500, "exact"), feats, truth, [499, 501])
    assert [r["since_reinit"] for r in recs] == [499, 1]
    assert recs[0]["online/train/image_r2"] > 0.5 > recs[1]["online/train/image_r2"]


@pytest.mark.parametrize("words, message", [
    (["bench", "amortizer", "--run", "nowhere", "--arch", "cnn"], "--arch 'cnn' is not one of: mlp, residual"),
    (["bench", "amortizer", "--run", "nowhere", "--steps", "0"], "--steps needs positive counts"),
    (["eval", "nowhere", "--gradient-fidelity", "--gf-objectives", "clip,nope"], "--gf-objectives: unknown"),
])
@pytest.mark.slow
def test_mechanism_tools_refuse_bad_input_in_one_line(words, message):
    done = subprocess.run([sys.executable, "-m", "amorlip.cli", *words], capture_output=True, text=True, timeout=110)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"amorlip {words[0]}: error:"), lines
