"""NeuCLIP: the conjugate identity (exact alpha gives InfoNCE's gradient, checked against open_clip's ClipLoss),
the prototype network against a dense loop, the AdaGrad step, restarts, state round trips (1 process; 2
processes in tests/test_baselines_dist.py)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from amorlip.config import build_config
from amorlip.objectives import get
from amorlip.objectives.base import ObjectiveContext
from amorlip.objectives.neuclip import conjugate_value, prototype_log_normalizer
from amorlip.schedules import apply_temperature_scheme


def make(n=64, d=8, **options):
    cls = get("neuclip")
    ctx = ObjectiveContext(dataset_size=n, steps_per_epoch=8, total_steps=80, total_epochs=10, embed_dim=d,
                           local_batch_size=8)
    return cls(cls.Config(**options), ctx)


def features(n=8, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(x + torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return x, y


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def exact_alpha(x, y, s, eps):
    """log(eps + g) over the batch's negatives, image anchors and text anchors."""
    n = x.shape[0]
    sim = (x @ y.T).detach()
    off = ~torch.eye(n, dtype=torch.bool)
    pos = sim.diag()
    g = ((torch.exp(s * (sim - pos[:, None])) * off).sum(1)) / (n - 1)
    h = ((torch.exp(s * (sim.T - pos[:, None])) * off).sum(1)) / (n - 1)
    return torch.log(eps + g), torch.log(eps + h)


@pytest.mark.parametrize("scheme", ["plain", "rescaled"])
def test_exact_alpha_gives_infonce_gradient(scheme):
    """alpha = exact batch log(eps + g) and eps = 1/(N-1): the encoders' (and s's) gradient is CLIP's InfoNCE's.

    InfoNCE_i = log(N-1) + log(1/(N-1) + g_i), so with the rescaled scheme and the temperature term the
    reference is tau * (ClipLoss - log(N-1)) + rho * tau."""
    n = 8
    eps = 1.0 / (n - 1)
    obj = make(eps=eps, inner_steps=0, temperature_term=scheme == "rescaled")
    x, y = features(n=n, seed=3)
    s = torch.tensor(6.5, dtype=torch.float64)
    a_img, a_txt = exact_alpha(x, y, s, eps)
    obj.alphas = lambda ai, at, pos, sc: (a_img, a_txt)  # the network's prediction = the exact batch value
    xs, ys, ss = leaves(x, y, s)
    out = obj(xs, ys, ss, None, torch.arange(n), step=0, epoch=0)
    total = apply_temperature_scheme(out.loss, ss, scheme, 3.0)
    if out.extra_loss is not None:
        total = total + out.extra_loss
    total.backward()
    xr, yr, sr = leaves(x, y, s)
    clip = ClipLoss()(xr, yr, sr)
    ref = clip if scheme == "plain" else (clip - math.log(n - 1)) / sr + 3.0 / sr
    ref.backward()
    # at the optimum alpha the conjugate value equals log(eps + g): the loss is ClipLoss - log(N-1)
    torch.testing.assert_close(out.loss.detach(), clip.detach() - math.log(n - 1))
    for ours, r in ((xs.grad, xr.grad), (ys.grad, yr.grad), (ss.grad, sr.grad)):
        torch.testing.assert_close(ours, r, rtol=1e-10, atol=1e-12)


def test_conjugate_form_minimiser():
    log_t = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64)
    alphas = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    values = conjugate_value(log_t[:, None], alphas[None, :])
    best = alphas[values.argmin(1)]
    torch.testing.assert_close(best, log_t, atol=0.01, rtol=0)
    torch.testing.assert_close(conjugate_value(log_t, log_t), log_t)  # min value = log(eps + g)


def test_prototype_network_matches_dense_loop():
    x, y = features(n=5, seed=4)
    w = torch.randn(7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    s, eps = torch.tensor(4.0, dtype=torch.float64), 1e-3
    pos = (x * y).sum(1)
    ours = prototype_log_normalizer(x, w, pos, s, eps)
    for i in range(5):
        mean = sum(math.exp(float(s) * (float(x[i] @ w[k]) / float(w[k].norm()) - float(pos[i]))) for k in range(7)) / 7
        assert float(ours[i]) == pytest.approx(math.log(eps + mean), rel=1e-12)


def test_prototype_step_decreases_its_objective():
    obj = make(num_prototypes=16, lr=1e-3)
    x, y = features(n=16, seed=5, dtype=torch.float32)
    s = torch.tensor(10.0)
    obj.push_bank(*features(n=16, seed=6, dtype=torch.float32))  # prototypes from another batch
    obj.restart()
    t_img, t_txt = exact_alpha(x, y, s, obj.cfg.eps)

    def objective():
        return float(obj.prototype_objective(x, y, t_img, t_txt, s, obj.text_prototypes, obj.image_prototypes)[0])

    before = objective()
    j, _, _ = obj.prototype_step(x, y, t_img, t_txt, s)
    assert float(j) == pytest.approx(before, rel=1e-6)  # the step reports J before it
    after_one = objective()
    assert after_one < before
    for _ in range(30):
        obj.prototype_step(x, y, t_img, t_txt, s)
    assert objective() < after_one
    assert (obj.text_sq_grad > 0).any()  # AdaGrad accumulates


def test_bank_restart_and_counters():
    obj = make(num_prototypes=12, restart_every=3, inner_steps=1)
    s = torch.tensor(5.0)
    batches = [features(n=8, seed=20 + k, dtype=torch.float32) for k in range(4)]
    for k, (x, y) in enumerate(batches):
        obj(x, y, s, None, torch.arange(8), step=k, epoch=0)
        if k == 0:  # first step: restarted from its own batch (8 < m = 12 prototypes valid)
            assert obj.num_valid == 8
    # step 3 restarted from the bank = the last 12 embeddings before step 3 (batch 2 and half of batch 1),
    # then took one AdaGrad step
    assert obj.num_valid == 12 and obj.bank_filled == 12
    expected = torch.cat([batches[2][1], batches[1][1][4:]])
    bank_rows = set(map(tuple, obj.text_bank.tolist()))
    assert all(tuple(r) in bank_rows for r in batches[3][1][4:].tolist())  # batch 3 pushed after the step
    restarted = obj.text_prototypes
    dist = torch.cdist(F.normalize(restarted, dim=1), F.normalize(expected, dim=1)).min(1).values
    assert dist.max() < 0.05  # one small AdaGrad step away from the bank rows


def test_state_dict_round_trip_resumes_exactly():
    def step(obj, k):
        x, y = features(n=8, seed=200 + k, dtype=torch.float32)
        xs, ys = leaves(x, y)
        s = torch.tensor(7.0, requires_grad=True)
        out = obj(xs, ys, s, None, torch.arange(8), step=k, epoch=0)
        (apply_temperature_scheme(out.loss, s, "rescaled", 6.5) + out.extra_loss).backward()
        return out, xs.grad, s.grad

    a = make(num_prototypes=20, restart_every=4, inner_steps=2)
    for k in range(3):
        step(a, k)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(num_prototypes=20, restart_every=4, inner_steps=2)
    b.load_state_dict(torch.load(buf))
    assert b.get_extra_state() == a.get_extra_state()
    for k in range(3, 7):  # crosses a restart at step 4
        out_a, gxa, gsa = step(a, k)
        out_b, gxb, gsb = step(b, k)
        assert torch.equal(out_a.loss, out_b.loss) and torch.equal(gxa, gxb) and torch.equal(gsa, gsb)
    for key, value in a.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b.state_dict()[key]), key
    c = make(num_prototypes=20, restart_every=4, inner_steps=2)
    _, gxc, _ = step(c, 6)
    assert not torch.allclose(gxc, gxa)


def test_estimate_log_normalizers_convention():
    """base.py's convention, log Z_i = log(1/n sum_j exp(s x_i.y_j)) over the n training pairs: with one
    prototype w per side, the nets say every one of the n - 1 negatives is w, so the estimate must be the dense
    log partition over [the positive, w repeated n - 1 times]."""
    n = 64
    obj = make(n=n, num_prototypes=16)
    x, y = features(n=8, seed=30, dtype=torch.float32)
    s = torch.tensor(6.0)
    assert obj.estimate_log_normalizers(x, y, s, torch.arange(8)) is None  # no prototypes yet
    g = torch.Generator().manual_seed(31)
    w_txt, w_img = F.normalize(torch.randn(2, 8, generator=g), dim=1)
    obj.text_prototypes[0], obj.image_prototypes[0], obj.num_valid = w_txt, w_img, 1
    est = obj.estimate_log_normalizers(x, y, s, torch.arange(8))
    for key, anchors, positives, w in (("image", x, y, w_txt), ("text", y, x, w_img)):
        for i in range(8):
            others = torch.cat([positives[i:i + 1], w.expand(n - 1, 8)])
            dense = torch.logsumexp(s * others @ anchors[i], 0) - math.log(n)
            torch.testing.assert_close(est[key][i], dense, rtol=1e-5, atol=1e-5)


def test_prototypes_capped_and_preset():
    assert make(n=30, num_prototypes=4096).m == 30
    cfg = build_config("tiny-neuclip")
    assert cfg.objective == "neuclip" and cfg.temperature.scheme == "rescaled"
    assert cfg.section("neuclip").num_prototypes < 4096
    with pytest.raises(ValueError, match="restart_every"):
        get("neuclip").Config(restart_every=0).validate()
