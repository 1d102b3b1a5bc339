"""Normalizer diagnostics: hand-computed values, brute-force references, the objective hook, encode_split."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amorlip.data.types import RetrievalSplit
from amorlip.evaluate.normalizers import (
    encode_split,
    exact_log_normalizers,
    inbatch_log_normalizers,
    normalizer_diagnostics,
)
from amorlip.models import create_model
from amorlip.objectives.base import Objective


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
