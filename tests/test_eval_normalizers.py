"""Normalizer diagnostics: hand-computed values, brute-force references, the objective hook, encode_split, and the
two splits of a training run (build_diagnostic_sets / run_diagnostics) against dense references."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amorlip import objectives
from amorlip.config import ConfigError, build_config
from amorlip.data.loader import build_eval_data, build_train_stream
from amorlip.data.types import RetrievalSplit
from amorlip.evaluate.normalizers import (
    DiagnosticSets,
    build_diagnostic_sets,
    encode_split,
    exact_log_normalizers,
    inbatch_log_normalizers,
    normalizer_diagnostics,
    reference_noise,
    run_diagnostics,
)
from amorlip.models import create_model
from amorlip.objectives.base import Objective, ObjectiveContext


def test_hand_computed_two_samples():
    # x = y = identity: logits s*X@Y^T = [[s, 0], [0, s]] with s = 2
    x = torch.eye(2)
    s = 2.0
    true = math.log((math.exp(2) + math.exp(0)) / 2)  # log (1/2)(e^2 + 1) = 1.43378...
    li, lt = exact_log_normalizers(x, x, s)
    assert li.tolist() == pytest.approx([true, true]) and lt.tolist() == pytest.approx([true, true])
    # batch size 1: the in-batch estimate is the positive logit alone, log (1/1) e^2 = 2
    d = normalizer_diagnostics(x, x, torch.tensor(s), None, batch_size=1)
    err = 2.0 - true  # 0.56622...
    for mod in ("image", "text"):
        assert d[f"inbatch/{mod}_bias"] == pytest.approx(err)
        assert d[f"inbatch/{mod}_mse"] == pytest.approx(err ** 2)
    assert d["true/image_mean"] == pytest.approx(true) and d["n"] == 2 and d["batch_size"] == 1
    assert "objective/image_mse" not in d


def test_hand_computed_asymmetric():
    # three 1-d "features" (not normalised on purpose: the formula is what is checked)
    x = torch.tensor([[1.0], [0.0], [-1.0]])
    y = torch.tensor([[1.0], [0.5], [0.0]])
    s = 1.0
    # image i: logits x_i * y_j ; text j: logits x_i * y_j over i
    img = [math.log((math.e + math.exp(0.5) + 1) / 3), math.log(1.0), math.log((math.exp(-1) + math.exp(-0.5) + 1) / 3)]
    txt = [math.log((math.e + 1 + math.exp(-1)) / 3), math.log((math.exp(0.5) + 1 + math.exp(-0.5)) / 3), math.log(1.0)]
    li, lt = exact_log_normalizers(x, y, s)
    assert li.tolist() == pytest.approx(img) and lt.tolist() == pytest.approx(txt)


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = F.normalize(x + 0.7 * torch.randn(n, d, generator=g), dim=1)
    return x, y


def test_exact_matches_brute_force_loops():
    x, y = _features(9, 4, 0)
    s = 7.5
    li, lt = exact_log_normalizers(x, y, s)
    for i in range(9):
        ref_i = math.log(sum(math.exp(s * float(x[i] @ y[j])) for j in range(9)) / 9)
        ref_t = math.log(sum(math.exp(s * float(x[j] @ y[i])) for j in range(9)) / 9)
        assert li[i].item() == pytest.approx(ref_i, rel=1e-6) and lt[i].item() == pytest.approx(ref_t, rel=1e-6)


def test_inbatch_matches_brute_force_on_its_batches():
    x, y = _features(10, 3, 1)
    s, b = 5.0, 4
    ei, et = inbatch_log_normalizers(x, y, s, b, seed=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    for batch in perm.split(b):  # batches of 4, 4, 2
        idx = batch.tolist()
        for i in idx:
            ref_i = math.log(sum(math.exp(s * float(x[i] @ y[j])) for j in idx) / len(idx))
            ref_t = math.log(sum(math.exp(s * float(x[j] @ y[i])) for j in idx) / len(idx))
            assert ei[i].item() == pytest.approx(ref_i, rel=1e-6) and et[i].item() == pytest.approx(ref_t, rel=1e-6)


def test_full_batch_has_zero_error_and_small_batches_do_not():
    x, y = _features(64, 8, 2)
    s = torch.tensor(20.0)
    full = normalizer_diagnostics(x, y, s, torch.arange(64), batch_size=64)
    over = normalizer_diagnostics(x, y, s, torch.arange(64), batch_size=1000)
    for d in (full, over):
        for mod in ("image", "text"):
            assert d[f"inbatch/{mod}_mse"] == pytest.approx(0.0, abs=1e-20)
            assert d[f"inbatch/{mod}_bias"] == pytest.approx(0.0, abs=1e-12)
    small = normalizer_diagnostics(x, y, s, torch.arange(64), batch_size=8)
    assert small["inbatch/image_mse"] > 1e-3 and small["inbatch/text_mse"] > 1e-3
    assert small["inbatch/image_mse"] >= small["inbatch/image_bias"] ** 2  # Var >= 0
    # the same seed gives the same batches
    assert normalizer_diagnostics(x, y, s, None, 8)["inbatch/text_mse"] == small["inbatch/text_mse"]


class _ConstObjective(Objective):
    """Estimates log Z_img = a + index and log Z_txt = b; records the batches it is called on."""

    name = "const"

    def __init__(self, a: float, b: float) -> None:
        super().__init__(None, None)
        self.a, self.b = a, b
        self.register_buffer("dummy", torch.zeros(1))
        self.calls: list[int] = []

    def estimate_log_normalizers(self, image_features, text_features, scale, indices):
        self.calls.append(len(indices))
        return {"image": self.a + indices.double(), "text": torch.full((len(indices),), self.b)}


def test_objective_estimate_errors():
    x = torch.eye(2)
    true = math.log((math.exp(2) + 1) / 2)
    obj = _ConstObjective(a=1.0, b=3.0)
    d = normalizer_diagnostics(x, x, 2.0, torch.tensor([10, 20]), batch_size=1, objective=obj)
    assert obj.calls == [1, 1]  # called batch by batch
    # image estimates 11 and 21 -> errors 11 - t, 21 - t
    e1, e2 = 11 - true, 21 - true
    assert d["objective/image_bias"] == pytest.approx((e1 + e2) / 2)
    assert d["objective/image_mse"] == pytest.approx((e1 ** 2 + e2 ** 2) / 2)
    assert d["objective/text_bias"] == pytest.approx(3 - true)
    assert d["objective/text_mse"] == pytest.approx((3 - true) ** 2)


def test_r2_is_one_for_an_offset_estimate_and_zero_for_a_constant():
    """r2 = 1 - Var(error) / Var(log Z): an estimate off by a constant follows all of the spread (1), a constant
    estimate none (0), the negated spread around the mean less than none (-3); a NaN sample is left out of both."""
    x, y = _features(8, 3, 11)
    true_img, _ = exact_log_normalizers(x, y, 4.0)

    class Fixed(Objective):
        name = "fixed"

        def __init__(self, image):
            super().__init__(None, None)
            self.image = image

        def estimate_log_normalizers(self, image_features, text_features, scale, indices):
            return {"image": self.image[indices], "text": torch.zeros(len(indices), dtype=torch.float64)}

    mean = float(true_img.mean())
    for image, r2 in ((true_img + 0.5, 1.0), (torch.full((8,), 0.3, dtype=torch.float64), 0.0),
                      (2 * mean - true_img, -3.0)):
        d = normalizer_diagnostics(x, y, 4.0, torch.arange(8), 4, objective=Fixed(image))
        assert d["objective/image_r2"] == pytest.approx(r2, abs=1e-9)
        assert d["objective/image_r2"] == pytest.approx(
            1 - (d["objective/image_mse"] - d["objective/image_bias"] ** 2) / float(true_img.var(unbiased=False)))
    with_nan = (true_img + 0.5).clone()
    with_nan[0] = float("nan")
    d = normalizer_diagnostics(x, y, 4.0, torch.arange(8), 4, objective=Fixed(with_nan))
    assert d["objective/image_r2"] == pytest.approx(1.0) and d["objective/coverage"] == pytest.approx(7 / 8)
    assert math.isnan(normalizer_diagnostics(torch.eye(2), torch.eye(2), 2.0, None, 1)["inbatch/image_r2"])


def test_objective_without_estimate_is_skipped():
    class NoEstimate(Objective):
        name = "none"

        def __init__(self):
            super().__init__(None, None)

    x, y = _features(6, 3, 4)
    d = normalizer_diagnostics(x, y, 3.0, None, 2, objective=NoEstimate())
    assert not any(k.startswith("objective/") for k in d)


def test_bad_inputs():
    x, y = _features(4, 3, 5)
    with pytest.raises(ValueError, match="positive"):
        normalizer_diagnostics(x, y, 0.0, None, 2)
    with pytest.raises(ValueError, match="batch_size"):
        normalizer_diagnostics(x, y, 1.0, None, 0)
    with pytest.raises(ValueError, match="indices"):
        normalizer_diagnostics(x, y, 1.0, torch.arange(3), 2)


def test_encode_split_normalised_features():
    torch.manual_seed(0)
    model, _, tf, tok = create_model("micro-vit")

    class Caps(torch.utils.data.Dataset):
        def __len__(self):
            return 11

        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            return Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)), f"caption {i}"

    model.train()
    img, txt = encode_split(model, tok, RetrievalSplit("v", Caps()), tf, "cpu", batch_size=4)
    assert model.training
    assert img.shape == (11, 32) and txt.shape == (11, 32) and img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=1), torch.ones(11), atol=1e-5)
    model.eval()
    with torch.no_grad():
        ref = model.encode_text(tok(["caption 3"]), normalize=True)
    assert torch.allclose(txt[3], ref[0], atol=1e-5)
    d = normalizer_diagnostics(img, txt, model.logit_scale.exp(), None, batch_size=4)
    assert math.isfinite(d["inbatch/image_mse"]) and d["n"] == 11


# ----------------------------------------------------------------------------------------------------
# The reference with the training set's size, NaN estimates, the objective's effective scale
# ----------------------------------------------------------------------------------------------------


def test_reference_with_dataset_size_matches_brute_force():
    x, y = (t.double() for t in _features(9, 4, 6))
    s, big_n = 6.0, 1000
    li, lt = exact_log_normalizers(x, y, s, dataset_size=big_n)
    for i in range(9):
        neg_i = sum(math.exp(s * float(x[i] @ y[j])) for j in range(9) if j != i) / 8
        neg_t = sum(math.exp(s * float(x[j] @ y[i])) for j in range(9) if j != i) / 8
        pos = math.exp(s * float(x[i] @ y[i]))
        assert li[i].item() == pytest.approx(math.log(pos / big_n + (1 - 1 / big_n) * neg_i), rel=1e-9)
        assert lt[i].item() == pytest.approx(math.log(pos / big_n + (1 - 1 / big_n) * neg_t), rel=1e-9)
    # N = n: the plain mean over the set; a chunked computation gives the same values
    plain = exact_log_normalizers(x, y, s)
    same = exact_log_normalizers(x, y, s, dataset_size=9)
    assert torch.equal(plain[0], same[0]) and torch.equal(plain[1], same[1])
    import amorlip.evaluate.log_normalizers as nm

    chunk = nm._CHUNK
    try:
        nm._CHUNK = 4
        chunked = exact_log_normalizers(x, y, s, dataset_size=big_n)
    finally:
        nm._CHUNK = chunk
    assert torch.allclose(chunked[0], li, atol=1e-12) and torch.allclose(chunked[1], lt, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        exact_log_normalizers(x[:1], y[:1], s, dataset_size=big_n)


def test_reference_noise_formula_and_its_monte_carlo_check():
    x, y = (t.double() for t in _features(7, 3, 8))
    s, big_n = 4.0, 50
    ni, nt = reference_noise(x, y, s, big_n)
    fpc = (big_n - 7) / (big_n - 2)
    for i in range(7):
        w = [math.exp(s * float(x[i] @ y[j])) for j in range(7) if j != i]
        mean = sum(w) / 6
        var = sum((v - mean) ** 2 for v in w) / 5
        z = math.exp(s * float(x[i] @ y[i])) / big_n + (1 - 1 / big_n) * mean
        assert ni[i].item() == pytest.approx((1 - 1 / big_n) ** 2 * fpc * var / 6 / z ** 2, rel=1e-9)
    assert (nt > 0).all()
    assert torch.allclose(reference_noise(x, y, s, big_n, from_dataset=False)[0], ni / fpc, rtol=1e-12)  # held out
    assert reference_noise(x, y, s, None)[0].eq(0).all() and reference_noise(x, y, s, 7)[1].eq(0).all()
    # the variance of the reference of pair 0 over random subsets of a "training set" of 400 pairs that hold it
    gx, gy = (t.double() for t in _features(400, 3, 9))
    g = torch.Generator().manual_seed(0)
    values, predicted = [], []
    for _ in range(300):
        sub = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(399, generator=g)[:39]])
        values.append(float(exact_log_normalizers(gx[sub], gy[sub], s, dataset_size=400)[0][0]))
        predicted.append(float(reference_noise(gx[sub], gy[sub], s, dataset_size=400)[0][0]))
    empirical = float(np.var(values, ddof=1))
    assert 0.7 < empirical / float(np.mean(predicted)) < 1.4
    exact = float(exact_log_normalizers(gx, gy, s)[0][0])  # the whole set: the value the subsets estimate
    assert abs(float(np.mean(values)) - exact) < 3 * math.sqrt(empirical / 300) + 0.5 * empirical


class _PartialObjective(Objective):
    """Knows log Z = 0 for even indices only (NaN for the others), at a constant effective scale 5."""

    name = "partial"

    def __init__(self) -> None:
        super().__init__(None, None)
        self.scales: list[float] = []

    def effective_scale(self, scale):
        return scale * 0.0 + 5.0

    def estimate_log_normalizers(self, image_features, text_features, scale, indices):
        self.scales.append(float(scale))
        est = torch.where(indices % 2 == 0, torch.zeros(len(indices)), torch.full((len(indices),), float("nan")))
        return {"image": est, "text": est}


def test_nan_estimates_are_left_out_and_the_effective_scale_is_the_reference():
    x, y = _features(10, 3, 7)
    obj = _PartialObjective()
    d = normalizer_diagnostics(x, y, 2.0, torch.arange(10), batch_size=4, objective=obj, dataset_size=50)
    assert obj.scales == [2.0, 2.0, 2.0]  # the objective receives the model's scale ...
    assert d["scale"] == 5.0  # ... and the reference is taken at the scale its estimate tracks
    li, lt = exact_log_normalizers(x, y, 5.0, dataset_size=50)
    even = torch.arange(0, 10, 2)
    assert d["objective/coverage"] == 0.5
    assert d["objective/image_bias"] == pytest.approx(float((0 - li[even]).mean()))
    assert d["objective/text_mse"] == pytest.approx(float((lt[even] ** 2).mean()))
    assert d["inbatch/image_mse"] == pytest.approx(
        float(((inbatch_log_normalizers(x, y, 5.0, 4)[0] - li) ** 2).mean()))


# ----------------------------------------------------------------------------------------------------
# The two splits of a training run: build_diagnostic_sets / run_diagnostics
# ----------------------------------------------------------------------------------------------------

N_TRAIN, N_DIAG, BATCH = 96, 24, 16
SPLIT_KEYS = {"n", "batch_size", "true/image_mean", "true/image_std", "true/text_mean", "true/text_std",
              "true/image_noise", "true/text_noise",
              "inbatch/image_mse", "inbatch/image_bias", "inbatch/image_r2",
              "inbatch/text_mse", "inbatch/text_bias", "inbatch/text_r2"}
OBJECTIVE_KEYS = {"objective/image_mse", "objective/image_bias", "objective/image_r2", "objective/text_mse",
                  "objective/text_bias", "objective/text_r2", "objective/coverage"}


def _cfg(objective: str = "clip", *extra: tuple[str, str]):
    return build_config(None, [("objective", objective), ("model.name", "micro-vit"),
                               ("data.synthetic_size", str(N_TRAIN)), ("data.val_size", "10"),
                               ("train.batch_size", str(BATCH)), ("eval.normalizer_size", str(N_DIAG)), *extra])


@pytest.fixture(scope="module")
def run_parts():
    cfg = _cfg()
    stream = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed)
    torch.manual_seed(0)
    model, _, tf, tok = create_model("micro-vit")
    return cfg, stream, model, tf, tok


def _objective(name: str, cfg, stream, **section):
    cls = objectives.get(name)
    sec = cfg.sections.get(cls.section) if cls.section else None
    for k, v in section.items():
        setattr(sec, k, v)
    ctx = ObjectiveContext(dataset_size=stream.dataset_size, steps_per_epoch=stream.steps_per_epoch, total_steps=100,
                           total_epochs=2, embed_dim=32, local_batch_size=cfg.train.batch_size)
    return cls(sec, ctx)


def _rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def test_sets_fixed_training_subset_with_dataset_indices_and_no_rng_or_stream_change(run_parts):
    cfg, stream, model, tf, tok = run_parts
    before, stats = _rng_states(), stream.stats.state_dict()
    a = build_diagnostic_sets(cfg, stream)
    b = build_diagnostic_sets(cfg, stream)
    assert _same_rng(before, _rng_states()) and stream.stats.state_dict() == stats
    assert a.train_indices.tolist() == b.train_indices.tolist()
    idx = a.train_indices.tolist()
    assert len(idx) == N_DIAG == len(set(idx)) and all(0 <= i < N_TRAIN for i in idx)
    assert idx != list(range(N_DIAG))  # a random subset of the rows, not the first ones
    for k in (0, 7, N_DIAG - 1):  # pair k is training row idx[k], caption as training reads it
        image, caption = a.train.dataset[k]
        ref_image, ref_caption = stream.dataset[idx[k]]
        assert caption == ref_caption.strip() and np.array_equal(np.asarray(image), np.asarray(ref_image))
    assert len(a.heldout.dataset) == N_DIAG  # eval.normalizer_size held-out pairs, whatever data.val_size says
    assert (a.dataset_size, a.batch_size, a.seed) == (N_TRAIN, BATCH, cfg.train.seed)
    # the training stream's first batch is what it would have been
    fresh = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed)
    first = next(iter(stream.iterate(0, 0, tf, tok)))
    ref = next(iter(fresh.iterate(0, 0, tf, tok)))
    assert torch.equal(first["index"], ref["index"]) and torch.equal(first["image"], ref["image"])


def test_clip_run_diagnostics_keys_values_and_repeatability(run_parts):
    cfg, stream, model, tf, tok = run_parts
    sets = build_diagnostic_sets(cfg, stream)
    obj = _objective("clip", cfg, stream)
    model.train()
    before = _rng_states()
    d1 = run_diagnostics(model, obj, sets, tf, tok, "cpu", batch_size=10)
    assert _same_rng(before, _rng_states()) and model.training  # RNG untouched, mode restored
    assert run_diagnostics(model, obj, sets, tf, tok, "cpu", batch_size=10) == d1  # the same pairs and batches
    d2 = run_diagnostics(model, obj, sets, tf, tok, "cpu", batch_size=7)  # encoded in other batches: rounding only
    assert d2 == pytest.approx(d1, rel=1e-5)
    assert set(d1) == {f"normalizer/{s}/{k}" for s in ("train", "heldout") for k in SPLIT_KEYS}
    assert all(math.isfinite(v) for v in d1.values())
    assert d1["normalizer/train/n"] == N_DIAG and d1["normalizer/train/batch_size"] == BATCH
    assert d1["normalizer/train/inbatch/image_mse"] > 0


def _encode_pairs(model, tf, tok, pairs):
    model.eval()
    with torch.no_grad():
        x = model.encode_image(torch.stack([tf(im) for im, _ in pairs]), normalize=True).double()
        y = model.encode_text(tok([c for _, c in pairs]), normalize=True).double()
    return x, y


def _dense(x, y, s, big_n):
    """log Z per the module docstring, by loops: positive at 1/N, the other pairs of the set as negatives."""
    n = x.shape[0]
    e = torch.exp(s * x @ y.T)
    li = [math.log(e[i, i] / big_n + (1 - 1 / big_n) * (e[i].sum() - e[i, i]) / (n - 1)) for i in range(n)]
    lt = [math.log(e[i, i] / big_n + (1 - 1 / big_n) * (e[:, i].sum() - e[i, i]) / (n - 1)) for i in range(n)]
    return torch.tensor(li, dtype=torch.float64), torch.tensor(lt, dtype=torch.float64)


def _inbatch(x, y, s, batch, seed):
    n = x.shape[0]
    li, lt = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for b in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(batch):
        e = torch.exp(s * x[b] @ y[b].T)
        li[b], lt[b] = torch.log(e.mean(dim=1)), torch.log(e.mean(dim=0))
    return li, lt


def test_run_diagnostics_against_a_dense_reference(run_parts):
    """Both splits, rebuilt independently: the training rows by their dataset indices, the held-out pairs from the
    source's held-out split; SogCLR's u filled on half of the training subset (the other half: NaN)."""
    cfg, stream, model, tf, tok = run_parts
    cfg = _cfg("sogclr", ("sogclr.temperature", "0.2"))
    sets = build_diagnostic_sets(cfg, stream)
    obj = _objective("sogclr", cfg, stream)
    idx = sets.train_indices
    x, y = _encode_pairs(model, tf, tok, [stream.dataset[i] for i in idx.tolist()])
    s_model = model.logit_scale.exp().detach()
    half = slice(0, N_DIAG // 2)
    obj.train()
    obj(x[half].float(), y[half].float(), s_model, None, idx[half], step=0, epoch=0)  # u of the first half
    d = run_diagnostics(model, obj, sets, tf, tok, "cpu")
    s = 1.0 / cfg.sections["sogclr"].temperature  # SogCLR's constant temperature: the scale u is tracked at
    assert abs(s - float(s_model)) > 5
    ref_i, ref_t = _dense(x, y, s, N_TRAIN)
    inb_i, inb_t = _inbatch(x, y, s, BATCH, cfg.train.seed)
    est = obj.estimate_log_normalizers(x.float(), y.float(), s_model, idx)  # per sample: batching does not matter
    seen = torch.zeros(N_DIAG, dtype=torch.bool)
    seen[half] = True
    assert torch.isnan(est["image"][~seen]).all() and not torch.isnan(est["image"][seen]).any()
    p = "normalizer/train/"
    assert d[p + "true/image_mean"] == pytest.approx(float(ref_i.mean()), rel=1e-5)
    assert d[p + "inbatch/image_mse"] == pytest.approx(float(((inb_i - ref_i) ** 2).mean()), rel=1e-4)
    assert d[p + "inbatch/text_bias"] == pytest.approx(float((inb_t - ref_t).mean()), rel=1e-4, abs=1e-7)
    err_i = est["image"].double()[seen] - ref_i[seen]
    err_t = est["text"].double()[seen] - ref_t[seen]
    assert d[p + "objective/coverage"] == 0.5
    assert d[p + "objective/image_mse"] == pytest.approx(float((err_i ** 2).mean()), rel=1e-4)
    assert d[p + "objective/text_bias"] == pytest.approx(float(err_t.mean()), rel=1e-4, abs=1e-7)
    # held-out: the source's held-out pairs, no objective entries (u is indexed by training row)
    _, split = build_eval_data(cfg.data.__class__(**{**cfg.data.__dict__, "val_size": N_DIAG}), cfg.train.seed)
    hx, hy = _encode_pairs(model, tf, tok, [split.dataset[i] for i in range(N_DIAG)])
    href_i, href_t = _dense(hx, hy, s, N_TRAIN)
    hinb_i, _ = _inbatch(hx, hy, s, BATCH, cfg.train.seed)
    q = "normalizer/heldout/"
    assert d[q + "true/text_mean"] == pytest.approx(float(href_t.mean()), rel=1e-5)
    assert d[q + "inbatch/image_mse"] == pytest.approx(float(((hinb_i - href_i) ** 2).mean()), rel=1e-4)
    assert not any(k.startswith(q + "objective/") for k in d)
    assert set(d) == ({p + k for k in SPLIT_KEYS | OBJECTIVE_KEYS} | {q + k for k in SPLIT_KEYS})


def test_amorlip_trained_on_the_training_subset_estimates_it(run_parts):
    """AmorLIP's lambda nets fitted (Stage I) on the training subset's batches: a finite estimate on both splits,
    and a better one on the training pairs than the fresh nets'."""
    cfg, stream, model, tf, tok = run_parts
    cfg = _cfg("amorlip")
    sets = build_diagnostic_sets(cfg, stream)
    torch.manual_seed(0)
    obj = _objective("amorlip", cfg, stream, t_online=1, t_target=1, alpha=0.5, lr=1e-2)
    fresh = run_diagnostics(model, obj, sets, tf, tok, "cpu")
    x, y = _encode_pairs(model, tf, tok, [sets.train.dataset[k] for k in range(N_DIAG)])
    s = model.logit_scale.exp().detach()
    obj.train()
    g = torch.Generator().manual_seed(1)
    for step in range(60):
        b = torch.randperm(N_DIAG, generator=g)[:BATCH]
        obj(x[b].float(), y[b].float(), s, None, sets.train_indices[b], step=step, epoch=0)
    d = run_diagnostics(model, obj, sets, tf, tok, "cpu")
    for split in ("train", "heldout"):
        for mod in ("image", "text"):
            assert math.isfinite(d[f"normalizer/{split}/objective/{mod}_mse"])
            assert math.isfinite(d[f"normalizer/{split}/objective/{mod}_bias"])
        assert d[f"normalizer/{split}/objective/coverage"] == 1.0
    for mod in ("image", "text"):
        assert d[f"normalizer/train/objective/{mod}_mse"] < fresh[f"normalizer/train/objective/{mod}_mse"]


def test_webdataset_training_subset(tmp_path):
    from amorlip.data.writers import write_synthetic_wds

    write_synthetic_wds(tmp_path / "shards", 40, seed=0, shard_size=16, render_size=16)
    cfg = build_config(None, [("objective", "sogclr"), ("model.name", "micro-vit"), ("data.source", "wds"),
                              ("data.train_path", str(tmp_path / "shards")), ("train.batch_size", "8"),
                              ("eval.normalizer_size", "20")])
    stream = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed, needs_indices=True)
    before = _rng_states()
    sets = build_diagnostic_sets(cfg, stream)
    assert _same_rng(before, _rng_states())
    assert sets.heldout is None  # a wds source without data.val_path has no held-out pairs
    assert sets.train_indices.tolist() == list(range(20))  # the first samples in shard order, their json indices
    assert sets.dataset_size == 40 and len(sets.train.dataset) == 20
    image, caption = sets.train.dataset[3]
    from amorlip.data.synthetic import SyntheticScenes

    assert caption == SyntheticScenes(40, seed=0, split="train", render_size=16)[3][1]
    torch.manual_seed(0)
    model, _, tf, tok = create_model("micro-vit")
    d = run_diagnostics(model, _objective("sogclr", cfg, stream), sets, tf, tok, "cpu")
    assert d["normalizer/train/objective/coverage"] == 0.0  # nothing visited yet: no estimate entered
    assert math.isnan(d["normalizer/train/objective/image_mse"])
    assert not any(k.startswith("normalizer/heldout/") for k in d)


def test_a_stream_without_random_access_gives_no_training_split(run_parts):
    cfg, stream, model, tf, tok = run_parts

    class Batches:  # like `amorlip bench`'s pre-made batches
        dataset_size, steps_per_epoch = stream.dataset_size, stream.steps_per_epoch

    sets = build_diagnostic_sets(cfg, Batches())
    assert isinstance(sets, DiagnosticSets) and sets.train is None and sets.heldout is not None
    d = run_diagnostics(model, None, sets, tf, tok, "cpu")
    assert d and all(k.startswith("normalizer/heldout/inbatch/") or k.startswith("normalizer/heldout/true/")
                     or k in ("normalizer/heldout/n", "normalizer/heldout/batch_size") for k in d)


def test_config_keys_neutral_and_checked():
    from amorlip.resume import config_hash, is_neutral

    on, off = _cfg("clip", ("eval.normalizers", "true")), _cfg()
    assert on.eval.normalizers and not off.eval.normalizers and off.eval.normalizer_size == N_DIAG
    assert build_config(None, []).eval.normalizers is False and build_config(None, []).eval.normalizer_size == 512
    # only adds metrics: resuming with it changed is allowed, and compare's run names do not change
    assert is_neutral("eval.normalizers", "synthetic") and is_neutral("eval.normalizer_size", "synthetic")
    assert config_hash(on.to_dict()) == config_hash(off.to_dict())
    with pytest.raises(ConfigError, match="eval.normalizer_size"):
        _cfg("clip", ("eval.normalizer_size", "1"))


def test_csv_training_subset_leaves_out_what_training_skips(tmp_path):
    rows = ["filepath,title"]
    for i in range(8):
        if i != 2:  # row 2: its image is missing
            Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'' if i == 5 else f'item {i}'}")  # row 5: no caption
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = build_config(None, [("model.name", "micro-vit"), ("data.source", "csv"),
                              ("data.train_path", str(tmp_path / "train.csv")), ("train.batch_size", "2"),
                              ("eval.normalizer_size", "100")])
    stream = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed)
    sets = build_diagnostic_sets(cfg, stream)
    assert sorted(sets.train_indices.tolist()) == [0, 1, 3, 4, 6, 7] and sets.heldout is None
    k = sets.train_indices.tolist().index(4)
    assert sets.train.dataset[k][1] == "item 4"
