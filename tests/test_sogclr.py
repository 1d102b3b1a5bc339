"""SogCLR and FastCLIP: surrogate gradients against dense float64 references, the u update on hand-made
batches, the temperature term, state round trips and presets (1 process; 2 processes in
tests/test_baselines_dist.py)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from amorlip.config import ConfigError, build_config
from amorlip.objectives import get
from amorlip.objectives.base import ObjectiveContext
from amorlip.objectives.sogclr import ExpWeightSum, FastCLIPConfig, SogCLRConfig, log_partition_from_log_g
from amorlip.schedules import apply_temperature_scheme, cosine_ramp


def make(name, n=40, d=8, **options):
    cls = get(name)
    ctx = ObjectiveContext(dataset_size=n, steps_per_epoch=5, total_steps=50, total_epochs=10, embed_dim=d,
                           local_batch_size=8)
    return cls(cls.Config(**options), ctx)


def features(n=8, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def dense_g(x, y, s):
    """g_i (image anchors) and h_j (text anchors), by explicit sums over the negatives."""
    n = x.shape[0]
    sim = x @ y.T
    g = torch.stack([sum(torch.exp(s * (sim[i, j] - sim[i, i])) for j in range(n) if j != i) / (n - 1) for i in range(n)])
    h = torch.stack([sum(torch.exp(s * (sim[i, j] - sim[j, j])) for i in range(n) if i != j) / (n - 1) for j in range(n)])
    return g, h


def stored_u(obj, idx):
    return obj.log_u_img[idx].double().exp(), obj.log_u_txt[idx].double().exp()


def run_step(obj, x, y, s, idx, epoch=0, scheme="plain", rho=6.5):
    xs, ys, ss = leaves(x, y, s)
    out = obj(xs, ys, ss, None, idx, step=0, epoch=epoch)
    total = apply_temperature_scheme(out.loss, ss, scheme, rho)
    if out.extra_loss is not None:
        total = total + out.extra_loss
    total.backward()
    return out, xs.grad, ys.grad, ss.grad


# -- SogCLR -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale_grad", [True, False])
def test_fused_weight_sum_matches_autograd_composition(axis, scale_grad):
    """ExpWeightSum == exp(s (S - p) - d) masked and summed by autograd ops: value and every gradient (float64),
    plus torch's numerical gradcheck."""
    g = torch.Generator().manual_seed(axis + 2 * scale_grad)
    b, n = 5, 9
    sim = torch.randn(b, n, generator=g, dtype=torch.float64, requires_grad=True)
    m = b if axis == 0 else n  # anchors along rows (axis 0) or columns (axis 1)
    pos = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=scale_grad)
    log_den = torch.randn(m, generator=g, dtype=torch.float64)
    own = torch.zeros(b, n, dtype=torch.bool)
    own[torch.arange(b), torch.arange(b) + 3] = True  # local block at offset 3, as on rank 1 of 3 with b = 3

    fused = ExpWeightSum.apply(sim, pos, scale, log_den, own, axis)
    shape = (-1, 1) if axis == 0 else (1, -1)
    logits = (scale * (sim - pos.view(shape))).masked_fill(own, float("-inf"))
    ref = torch.exp(logits - log_den.view(shape)).sum()
    inputs = [sim, pos] + ([scale] if scale_grad else [])
    got, want = torch.autograd.grad(fused, inputs), torch.autograd.grad(ref, inputs)
    assert torch.allclose(fused, ref, rtol=1e-12, atol=0)
    for a, r in zip(got, want):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: ExpWeightSum.apply(*t[:3], log_den, own, axis), (sim, pos, scale))


def test_first_visit_gradient_is_the_true_gcl_gradient():
    """On first visits u = g exactly, so the surrogate's gradient IS the gradient of 1/2 (mean log g + mean log h)."""
    obj = make("sogclr", temperature=None)
    x, y = features()
    s = torch.tensor(6.0, dtype=torch.float64)
    out, gx, gy, gs = run_step(obj, x, y, s, torch.arange(8) * 3)
    xr, yr, sr = leaves(x, y, s)
    g, h = dense_g(xr, yr, sr)
    gcl = 0.5 * (g.log().mean() + h.log().mean())
    torch.testing.assert_close(out.loss.detach(), gcl.detach())  # the reported value is the batch GCL
    gcl.backward()
    for ours, ref in ((gx, xr.grad), (gy, yr.grad), (gs, sr.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)  # u is stored in float32


def test_surrogate_gradient_uses_u_in_place_of_g():
    """Later visits: gradient = 1/2 [mean_i grad g_i / u_i + mean_j grad h_j / v_j] with u, v the stored values."""
    obj = make("sogclr", temperature=None, gamma=0.3)
    x0, y0 = features(seed=1)
    run_step(obj, x0, y0, torch.tensor(4.0, dtype=torch.float64), torch.arange(8))
    x, y = features(seed=2)
    s = torch.tensor(7.0, dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 3, 20, 21, 22, 23])  # half revisited, half new
    _, gx, gy, gs = run_step(obj, x, y, s, idx)
    u, v = stored_u(obj, idx)
    xr, yr, sr = leaves(x, y, s)
    g, h = dense_g(xr, yr, sr)
    assert not torch.allclose(u, g.detach(), rtol=1e-3)  # u really differs from this batch's g
    (0.5 * ((g / u).mean() + (h / v).mean())).backward()
    for ours, ref in ((gx, xr.grad), (gy, yr.grad), (gs, sr.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_u_update_matches_formula_with_first_visits():
    gamma = 0.9
    obj = make("sogclr", temperature=0.1, gamma=gamma)
    s = torch.tensor(10.0, dtype=torch.float64)
    x1, y1 = features(n=4, seed=5)
    idx1 = torch.tensor([0, 1, 2, 3])
    out1, *_ = run_step(obj, x1, y1, torch.tensor(3.0, dtype=torch.float64), idx1)  # s ignored: constant 1/0.1
    g1, h1 = dense_g(x1, y1, s)
    u, v = stored_u(obj, idx1)
    torch.testing.assert_close(u, g1, rtol=1e-6, atol=0)  # first visit: gamma 1
    torch.testing.assert_close(v, h1, rtol=1e-6, atol=0)
    assert float(out1.metrics["first_visits"]) == 1.0

    x2, y2 = features(n=4, seed=6)
    idx2 = torch.tensor([2, 3, 4, 5])
    out2, *_ = run_step(obj, x2, y2, s, idx2)
    g2, h2 = dense_g(x2, y2, s)
    exp_u = torch.stack([(1 - gamma) * g1[2] + gamma * g2[0], (1 - gamma) * g1[3] + gamma * g2[1], g2[2], g2[3]])
    exp_v = torch.stack([(1 - gamma) * h1[2] + gamma * h2[0], (1 - gamma) * h1[3] + gamma * h2[1], h2[2], h2[3]])
    u2, v2 = stored_u(obj, idx2)
    torch.testing.assert_close(u2, exp_u, rtol=1e-6, atol=0)
    torch.testing.assert_close(v2, exp_v, rtol=1e-6, atol=0)
    assert float(out2.metrics["first_visits"]) == 0.5
    # samples 0, 1 keep their first value; never-visited samples stay unvisited
    torch.testing.assert_close(stored_u(obj, torch.tensor([0, 1]))[0], g1[:2], rtol=1e-6, atol=0)
    assert obj.visited.sum() == 6


def test_constant_temperature_ignores_the_models_scale():
    obj = make("sogclr", temperature=0.05)
    x, y = features()
    out, gx, _, gs = run_step(obj, x, y, torch.tensor(3.0, dtype=torch.float64), torch.arange(8))
    g, h = dense_g(x, y, torch.tensor(20.0, dtype=torch.float64))
    torch.testing.assert_close(out.loss.detach(), 0.5 * (g.log().mean() + h.log().mean()))
    assert gs is not None and float(gs) == 0.0  # connected to the graph (DDP), zero gradient
    assert gx.abs().sum() > 0


def test_log_partition_conversion_matches_brute_force():
    x, y = features(n=9, seed=8)
    s = torch.tensor(5.0, dtype=torch.float64)
    g, h = dense_g(x, y, s)
    pos = s * (x * y).sum(1)
    exact_img = torch.logsumexp(s * x @ y.T, dim=1) - math.log(9)
    exact_txt = torch.logsumexp(s * y @ x.T, dim=1) - math.log(9)
    torch.testing.assert_close(log_partition_from_log_g(g.log(), pos, 9), exact_img)
    torch.testing.assert_close(log_partition_from_log_g(h.log(), pos, 9), exact_txt)


def test_estimate_log_normalizers_after_a_full_dataset_batch():
    """One step over the whole dataset with gamma 1: u is the dataset mean, so the estimate is exact."""
    obj = make("sogclr", n=10, temperature=None)
    x, y = features(n=8, seed=9)
    s = torch.tensor(8.0, dtype=torch.float64)
    idx = torch.arange(8)
    run_step(obj, x, y, s, idx)
    # the dataset has 10 samples; 8 and 9 were never visited
    est = obj.estimate_log_normalizers(x, y, s, idx)
    g, h = dense_g(x, y, s)
    pos = s * (x * y).sum(1)
    torch.testing.assert_close(est["image"], log_partition_from_log_g(g.log(), pos, 10), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(est["text"], log_partition_from_log_g(h.log(), pos, 10), rtol=1e-6, atol=1e-6)
    # with n = batch size it is log mean_j exp(s x_i.y_j), positive included
    obj8 = make("sogclr", n=8, temperature=None)
    run_step(obj8, x, y, s, idx)
    est8 = obj8.estimate_log_normalizers(x, y, s, idx)
    torch.testing.assert_close(est8["image"], torch.logsumexp(s * x @ y.T, 1) - math.log(8), rtol=1e-6, atol=1e-6)
    unseen = obj.estimate_log_normalizers(x[:2], y[:2], s, torch.tensor([8, 9]))
    assert torch.isnan(unseen["image"]).all() and torch.isnan(unseen["text"]).all()


def test_u_buffers_kept_on_cpu_stay_there_in_fp32():
    big = make("sogclr", n=1_000_001)
    assert big.u_on_cpu  # auto: more than 1M samples
    small = make("sogclr", n=40, u_on_cpu=True)
    small.double()
    assert small.log_u_img.dtype == torch.float32 and small.visited.dtype == torch.bool
    assert small.log_u_img.device.type == "cpu"
    on_device = make("sogclr", n=40)
    assert not on_device.u_on_cpu


# -- FastCLIP ---------------------------------------------------------------------------------------------


def test_fastclip_gamma_schedule():
    obj = make("fastclip", gamma_min=0.2, gamma_decay_epochs=4)
    assert obj.gamma(0) == 1.0
    assert obj.gamma(4) == pytest.approx(0.2) and obj.gamma(9) == pytest.approx(0.2)
    assert obj.gamma(2) == pytest.approx(0.2 + 0.5 * 0.8 * (1 + math.cos(math.pi / 2)))
    assert obj.gamma(1) == cosine_ramp(1, 4, 1.0, 0.2)
    # the forward uses it
    x, y = features()
    out, *_ = run_step(obj, x, y, torch.tensor(5.0, dtype=torch.float64), torch.arange(8), epoch=2, scheme="rescaled")
    assert out.metrics["gamma"] == pytest.approx(obj.gamma(2))


def dense_release_blocks(x, y, s):
    """The released FastCLIP code's two blocks on one process, by explicit sums (float64):

    block 1: each anchor (with grad, and its own positive) against the candidates, detached;
    block 2: each anchor, detached with its positive, against the candidates, with grad;
    s with grad in both. Returns (g1, h1, g2, h2): image / text anchors' means over the negatives."""
    n = x.shape[0]
    xd, yd = x.detach(), y.detach()

    def means(anchors, cands, pos):
        sim = anchors @ cands.T
        return torch.stack([sum(torch.exp(s * (sim[a, j] - pos[a])) for j in range(n) if j != a) / (n - 1)
                            for a in range(n)])

    pos1, pos2 = (x * y).sum(1), (xd * yd).sum(1)
    return means(x, yd, pos1), means(y, xd, pos1), means(xd, y, pos2), means(yd, x, pos2)


def release_reference(x, y, s, u, v, rho, eps):
    """The released RGCL-g loss: (mean(g1/(u+eps) + h1/(v+eps)) + mean(g2/(u+eps) + h2/(v+eps))) / 2, divided by
    sg(s), + rho / s + mean(log u + log v) / 2 / s (log without eps)."""
    g1, h1, g2, h2 = dense_release_blocks(x, y, s)
    pair = 0.5 * ((g1 / (u + eps) + h1 / (v + eps)).mean() + (g2 / (u + eps) + h2 / (v + eps)).mean())
    return pair / s.detach() + rho / s + 0.5 * (u.log() + v.log()).mean() / s


def exact_reference(x, y, s, u, v, rho, eps):
    """RGCL-g's gradient with g -> u: d/d(theta, s) of tau GCL_eps + rho tau, tau = 1/s, where the 1/(eps + g) of
    d log(eps + g) is 1/(eps + u) and GCL_eps's value in the tau' term is 1/2 mean(log(eps + u) + log(eps + v))."""
    g, h = dense_g(x, y, s)
    surrogate = 0.5 * ((g / (u + eps)).mean() + (h / (v + eps)).mean())
    return surrogate / s.detach() + rho / s + 0.5 * ((u + eps).log() + (v + eps).log()).mean() / s


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_fastclip_v3_exact_first_visit_is_rgcl_g_gradient(eps):
    """exact, u = g on first visits: L / sg(s) + rho / s + extra has the gradient of tau * GCL_eps + rho * tau."""
    obj = make("fastclip", temperature_grad="exact", eps=eps)
    x, y = features(seed=11)
    s = torch.tensor(9.0, dtype=torch.float64)
    out, gx, gy, gs = run_step(obj, x, y, s, torch.arange(8), scheme="rescaled", rho=6.5)
    xr, yr, sr = leaves(x, y, s)
    g, h = dense_g(xr, yr, sr)
    gcl_eps = 0.5 * ((eps + g).log().mean() + (eps + h).log().mean())
    torch.testing.assert_close(out.loss.detach(), gcl_eps.detach(), rtol=1e-6, atol=1e-7)  # value: log(eps + g)
    (gcl_eps / sr + 6.5 / sr).backward()
    for ours, ref in ((gx, xr.grad), (gy, yr.grad), (gs, sr.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)  # u is stored in float32


@pytest.mark.parametrize("mode", ["release", "exact"])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_fastclip_v3_temperature_gradient_equals_its_dense_reference(mode, eps):
    """Later step (u != g, half the anchors revisited): every gradient, logit_scale's included, equals the mode's
    own dense float64 reference; the two modes share the features' gradient and differ in s's."""
    grads = {}
    for m in ("release", "exact"):
        obj = make("fastclip", gamma_min=0.5, gamma_decay_epochs=1, temperature_grad=m, eps=eps)
        x0, y0 = features(seed=12)
        run_step(obj, x0, y0, torch.tensor(5.0, dtype=torch.float64), torch.arange(8), scheme="rescaled")
        x, y = features(seed=13)
        idx = torch.tensor([0, 1, 2, 3, 20, 21, 22, 23])
        s = torch.tensor(12.0, dtype=torch.float64)
        ls = leaves(s.log())[0]  # differentiate w.r.t. logit_scale, as the optimizer does
        xs, ys = leaves(x, y)
        out = obj(xs, ys, ls.exp(), None, idx, step=0, epoch=3)
        (apply_temperature_scheme(out.loss, ls.exp(), "rescaled", -2.0) + out.extra_loss).backward()
        grads[m] = (xs.grad, ys.grad, ls.grad)
        if m == mode:
            u, v = stored_u(obj, idx)
            assert not torch.allclose(u, dense_g(x, y, s)[0], rtol=1e-3)
            xr, yr = leaves(x, y)
            lr_ = leaves(s.log())[0]
            ref_fn = release_reference if m == "release" else exact_reference
            ref_fn(xr, yr, lr_.exp(), u, v, -2.0, eps).backward()
            for ours, ref in zip(grads[m], (xr.grad, yr.grad, lr_.grad)):
                torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads["release"][0], grads["exact"][0], rtol=1e-12, atol=1e-14)
    assert abs(float(grads["release"][2] - grads["exact"][2])) > 1e-3 * abs(float(grads["exact"][2]))


def test_fastclip_release_counts_the_pair_term_twice_in_ds():
    """v0 (plain scheme, no temperature term): release's d/ds is exactly twice exact's; features unchanged."""
    x, y = features(seed=14)
    s = torch.tensor(7.0, dtype=torch.float64)
    _, gx_r, gy_r, gs_r = run_step(make("fastclip", version=0, temperature_grad="release"), x, y, s, torch.arange(8))
    _, gx_e, gy_e, gs_e = run_step(make("fastclip", version=0, temperature_grad="exact"), x, y, s, torch.arange(8))
    torch.testing.assert_close(gs_r, 2 * gs_e, rtol=1e-12, atol=0)
    torch.testing.assert_close(gx_r, gx_e, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy_r, gy_e, rtol=1e-12, atol=1e-14)


def tight_pairs(n=8, d=8, seed=15):
    """Positives at similarity ~0.99: at s = 100 most anchors' g fall far below eps = 1e-14, some stay above."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


@pytest.mark.parametrize("name,options", [("fastclip", {"version": 3, "temperature_grad": "exact"}),
                                          ("sogclr", {"temperature": None})])
def test_eps_weights_are_one_over_u_plus_eps(name, options):
    """Weights exp(s (S - p)) / (u + eps): at s = 100, where g << eps for some anchors, the features' gradient
    follows 1/(u + eps), not 1/u;
    the reported value is 1/2 [mean log(eps + g) + mean log(eps + h)]."""
    x, y = tight_pairs()
    s = torch.tensor(100.0, dtype=torch.float64)
    idx = torch.arange(8)
    results = {}
    for eps in (0.0, 1e-14):
        obj = make(name, eps=eps, **options)
        out, gx, gy, _ = run_step(obj, x, y, s, idx)  # plain scheme: the surrogate's own gradient
        u, v = stored_u(obj, idx)
        xr, yr, sr = leaves(x, y, s)
        g, h = dense_g(xr, yr, sr)
        assert bool((g.detach() < 1e-18).sum() >= 4) and bool((g.detach() > 1e-12).any())  # eps matters for some
        torch.testing.assert_close(out.loss.detach(), 0.5 * ((eps + g).log().mean() + (eps + h).log().mean()).detach(),
                                   rtol=1e-6, atol=0)
        (0.5 * ((g / (u + eps)).mean() + (h / (v + eps)).mean())).backward()
        torch.testing.assert_close(gx, xr.grad, rtol=1e-4, atol=1e-300)  # log u is float32
        torch.testing.assert_close(gy, yr.grad, rtol=1e-4, atol=1e-300)
        results[eps] = gx
    # anchors with g << eps get weights ~g/eps instead of ~1: the features' gradient changes
    assert not torch.allclose(results[1e-14], results[0.0], rtol=0.1, atol=0)


def test_fastclip_versions():
    x, y = features()
    s = torch.tensor(5.0, dtype=torch.float64)
    v0 = make("fastclip", version=0)
    out0, _, _, gs0 = run_step(v0, x, y, s, torch.arange(8))
    assert out0.extra_loss is None and float(gs0) != 0.0  # temperature learnt by the surrogate's gradient
    v1 = make("fastclip", version=1, temperature=0.1)
    out1, _, _, gs1 = run_step(v1, x, y, s, torch.arange(8))
    assert out1.extra_loss is None and float(gs1) == 0.0
    g, h = dense_g(x, y, torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(out1.loss.detach(), 0.5 * (g.log().mean() + h.log().mean()))
    with pytest.raises(ValueError, match="not implemented"):
        FastCLIPConfig(version=2).validate()
    with pytest.raises(ConfigError, match="fastclip.version"):  # the config layer's Literal check names the key
        build_config("tiny-fastclip", [("fastclip.version", "2")])
    with pytest.raises(ValueError, match="gamma"):
        SogCLRConfig(gamma=0.0).validate()
    with pytest.raises(ConfigError, match="temperature_grad"):
        build_config("tiny-fastclip", [("fastclip.temperature_grad", "both")])
    with pytest.raises(ConfigError, match="eps"):
        build_config("tiny-fastclip", [("fastclip.eps", "-1")])
    with pytest.raises(ValueError, match="eps"):
        SogCLRConfig(eps=-1e-3).validate()
    assert FastCLIPConfig().temperature_grad == "release" and FastCLIPConfig().eps == 1e-14
    assert SogCLRConfig().eps == 0.0


# -- state ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sogclr", "fastclip"])
def test_state_dict_round_trip_resumes_exactly(name):
    def step(obj, k):
        x, y = features(seed=100 + k)
        idx = (torch.arange(8) * 7 + 3 * k) % 40
        return run_step(obj, x, y, torch.tensor(6.0, dtype=torch.float64), idx, epoch=k // 2, scheme="rescaled")

    a = make(name)
    for k in range(3):
        step(a, k)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(name)
    b.load_state_dict(torch.load(buf))
    for k in range(3, 6):
        out_a, gxa, _, gsa = step(a, k)
        out_b, gxb, _, gsb = step(b, k)
        assert torch.equal(out_a.loss, out_b.loss) and torch.equal(gxa, gxb) and torch.equal(gsa, gsb)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # a fresh instance that did NOT load the state takes a different step (so the check above can fail)
    c = make(name)
    _, gxc, _, _ = step(c, 5)
    assert not torch.allclose(gxc, gxa)


# -- presets ----------------------------------------------------------------------------------------------


def test_fastclip_presets():
    cc3m = build_config("cc3m-rn50-fastclip")
    assert (cc3m.objective, cc3m.model.name, cc3m.train.batch_size, cc3m.train.epochs) == ("fastclip", "RN50", 1024, 30)
    assert cc3m.optim.lr == 1e-3 and cc3m.optim.lr_temperature == 2e-4 and cc3m.optim.temperature_step_thresh
    assert cc3m.temperature.scheme == "rescaled" and cc3m.temperature.rho == 6.5
    assert cc3m.data.source == "wds" and cc3m.data.dataset_size == 2274566
    assert cc3m.section("fastclip").gamma_decay_epochs == 18 and cc3m.section("fastclip").version == 3
    cc12m = build_config("cc12m-vitb32-fastclip")
    assert (cc12m.model.name, cc12m.train.batch_size, cc12m.train.epochs) == ("ViT-B-32", 2048, 33)
    assert cc12m.optim.lr == 4e-4 and cc12m.temperature.rho == 8.5 and cc12m.data.dataset_size == 8059642
    assert cc12m.section("fastclip").gamma_decay_epochs == 16
    assert cc12m.optim.lr_temperature == 1e-4  # the FastCLIP README's CC12M v3 command
    tiny = build_config("tiny-fastclip")
    assert tiny.objective == "fastclip" and tiny.temperature.scheme == "rescaled"
    for cfg in (cc3m, cc12m, tiny):  # the release's temperature machinery
        fc = cfg.section("fastclip")
        assert (fc.temperature_grad, fc.eps) == ("release", 1e-14)
        assert cfg.optim.lr_temperature_schedule == "const" and not cfg.optim.temperature_step_thresh_latch
    assert build_config("tiny-sogclr").objective == "sogclr"
