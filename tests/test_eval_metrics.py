"""Zero-shot and retrieval metrics: hand-computed examples, scikit-learn and clip_benchmark cross-checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader, Dataset

from amorlip.data.types import RetrievalSplit, ZeroShotTask
from amorlip.evaluate import evaluate_model
from amorlip.evaluate.report import format_table, write_json
from amorlip.evaluate.retrieval import recall_at_k, retrieval_eval, retrieval_metrics
from amorlip.evaluate.zeroshot import (
    TransformedDataset,
    classification_metrics,
    mean_per_class_recall,
    template_fns,
    zeroshot_eval,
)
from amorlip.models import create_model

CLASSNAMES = ["red square", "green circle", "blue star", "cat", "dog", "tree", "car"]
TEMPLATES_CB = ["a photo of a {c}.", "a picture of a {c}.", "{c}"]  # clip_benchmark style
TEMPLATES_OC = ["a photo of a {}.", "a picture of a {}.", "{}"]  # open_clip style


class NoiseImages(Dataset):
    """Random RGB images (distinct per index) with labels i % n_classes or captions."""

    def __init__(self, n: int, n_classes: int = len(CLASSNAMES), captions: bool = False, size: int = 20) -> None:
        self.n, self.n_classes, self.captions, self.size = n, n_classes, captions, size
        self.classes = CLASSNAMES[:n_classes]  # clip_benchmark's evaluate reads dataset.classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(1000 + i)
        img = Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
        if self.captions:
            return img, f"a picture number {i} of {CLASSNAMES[i % len(CLASSNAMES)]}"
        return img, i % self.n_classes


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model, _, eval_tf, tok = create_model("micro-vit")
    return model.eval(), eval_tf, tok


# ---------------------------------------------------------------------------------------- retrieval


def test_recall_at_k_hand_example():
    # rows = queries, columns = items; the match of query i is item i
    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.0],   # match ranked 1st
        [0.8, 0.5, 0.1, 0.6],   # match 0.5 ranked 3rd (0.8 and 0.6 above)
        [0.3, 0.3, 0.3, 0.2],   # match ties with two others: ranked behind both (pessimistic) -> 3rd
        [0.9, 0.8, 0.7, 0.1],   # match ranked 4th
    ])
    # ranks (1-based): 1, 3, 3, 4
    assert recall_at_k(sim, 1) == pytest.approx(1 / 4)
    assert recall_at_k(sim, 2) == pytest.approx(1 / 4)
    assert recall_at_k(sim, 3) == pytest.approx(3 / 4)
    assert recall_at_k(sim, 4) == pytest.approx(1.0)
    assert recall_at_k(sim, 10) == pytest.approx(1.0)  # k capped
    m = retrieval_metrics(sim, ks=(1, 2, 3))
    # columns as queries (text -> image), match = diagonal entry:
    # col0 (.9 .8 .3 .9): .9 ties item 3 -> 2nd; col1 (.1 .5 .3 .8): .8 above -> 2nd;
    # col2 (.2 .1 .3 .7): .7 above -> 2nd; col3 (0 .6 .2 .1): .6 and .2 above -> 3rd
    assert m["image_to_text_R@1"] == pytest.approx(0.25)
    assert m["text_to_image_R@1"] == pytest.approx(0.0)
    assert m["text_to_image_R@2"] == pytest.approx(0.75)
    assert m["text_to_image_R@3"] == pytest.approx(1.0)
    assert m["mean_R@1"] == pytest.approx(0.125)


def test_recall_at_k_collapsed_model_scores_zero():
    assert recall_at_k(torch.ones(5, 5), 1) == 0.0
    assert recall_at_k(torch.ones(5, 5), 5) == 1.0


def test_recall_at_k_multiple_positives_matches_clip_benchmark():
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as cb_recall

    g = torch.Generator().manual_seed(0)
    sim = torch.randn(12, 30, generator=g)  # 12 images, 30 texts
    owner = torch.randint(0, 12, (30,), generator=g)
    owner[:12] = torch.arange(12)  # every image has at least one caption
    pos = torch.zeros(12, 30, dtype=torch.bool)
    pos[owner, torch.arange(30)] = True
    for k in (1, 3, 5):
        # clip_benchmark: a query is a hit when its "actual recall" is > 0 (some positive in the top k)
        ref_i2t = (cb_recall(sim, pos, k) > 0).float().mean().item()
        ref_t2i = (cb_recall(sim.T, pos.T, k) > 0).float().mean().item()
        assert recall_at_k(sim, k, pos) == pytest.approx(ref_i2t)
        assert recall_at_k(sim.T, k, pos.T) == pytest.approx(ref_t2i)


def test_recall_at_k_errors():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(torch.zeros(2, 2), 0)


# ----------------------------------------------------------------------------------- classification


def test_mean_per_class_recall_matches_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(5):
        targets = rng.integers(0, 6, 200)
        targets[targets == 5] = 4  # class 5 never a target, but may be predicted
        preds = np.where(rng.random(200) < 0.4, targets, rng.integers(0, 6, 200))
        ours = mean_per_class_recall(torch.from_numpy(preds), torch.from_numpy(targets))
        with pytest.warns(UserWarning) if (preds == 5).any() else _nothing():
            ref = balanced_accuracy_score(targets, preds)
        assert ours == pytest.approx(ref, abs=1e-12)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_topk_capped_and_hand_values():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2, 0, 1])
    m = classification_metrics(logits, targets)
    assert m["top1"] == pytest.approx(1 / 4)
    assert m["top5"] == pytest.approx(1.0)  # k = min(5, 3) = 3: every target is in the top 3
    # per class: class 0 -> samples 0 (ok), 2 (pred 2): 1/2; class 1 -> sample 3 (pred 0): 0; class 2 -> sample 1 (pred 1): 0
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0) / 3)


def test_template_fns_accepts_both_conventions():
    fns = template_fns(["a {}.", "the {c}!", lambda c: f"<{c}>"])
    assert [f("cat") for f in fns] == ["a cat.", "the cat!", "<cat>"]
    with pytest.raises(ValueError, match="placeholder"):
        template_fns(["no placeholder"])


def _numpy2_safe_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy` formula; its own does float() on a 1-element array, an error in NumPy >= 2.4."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zeroshot_eval_matches_clip_benchmark(micro, monkeypatch):
    """Our zero-shot numbers equal clip_benchmark's zeroshot_classification.evaluate on the same model and data."""
    from clip_benchmark.metrics import zeroshot_classification as zsc

    if int(np.__version__.split(".")[0]) >= 2:
        monkeypatch.setattr(zsc, "accuracy", _numpy2_safe_accuracy)
    model, tf, tok = micro
    data = NoiseImages(70)
    ours = zeroshot_eval(model, tok, ZeroShotTask("noise", CLASSNAMES, TEMPLATES_OC, data), tf, "cpu", batch_size=16)
    ours_cb_templates = zeroshot_eval(model, tok, ZeroShotTask("noise", CLASSNAMES, TEMPLATES_CB, data), tf, "cpu",
                                      batch_size=32)
    loader = DataLoader(TransformedDataset(data, tf), batch_size=16)
    loader.dataset.classes = data.classes
    ref = zsc.evaluate(model, loader, tok, CLASSNAMES, TEMPLATES_CB, "cpu", amp=False)
    for o in (ours, ours_cb_templates):
        assert o["top1"] == pytest.approx(ref["acc1"], abs=1e-9)
        assert o["top5"] == pytest.approx(ref["acc5"], abs=1e-9)
        assert o["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-9)
    # a random model is not at 0 or 1 everywhere: the comparison is informative
    assert 0 < ref["acc5"] < 1


def test_retrieval_eval_matches_clip_benchmark(micro):
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    model, tf, tok = micro
    data = NoiseImages(40, captions=True)
    ours = retrieval_eval(model, tok, RetrievalSplit("noise", data), tf, "cpu", batch_size=16)

    def collate(batch):
        return torch.stack([b[0] for b in batch]), [[b[1]] for b in batch]  # one caption per image

    loader = DataLoader(TransformedDataset(data, tf), batch_size=16, collate_fn=collate)
    ref = zsr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-9)
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-9)
    assert 0 < ours["image_to_text_R@10"] < 1


def test_evaluate_model_flat_names_and_mode_restored(micro):
    model, tf, tok = micro
    model.train()
    seen_modes = []
    hook = model.visual.register_forward_hook(lambda mod, inp, out: seen_modes.append(mod.training))
    try:
        tasks = [ZeroShotTask("a", CLASSNAMES, TEMPLATES_OC, NoiseImages(14)),
                 ZeroShotTask("b", CLASSNAMES[:3], TEMPLATES_OC, NoiseImages(9, n_classes=3))]
        out = evaluate_model(model, tok, tf, tasks, RetrievalSplit("val", NoiseImages(12, captions=True)),
                             "cpu", batch_size=8)
    finally:
        hook.remove()
    assert model.training, "evaluate_model must restore train mode"
    assert seen_modes and not any(seen_modes), "the model must run in eval mode"
    for t in ("a", "b"):
        for k in ("top1", "top5", "mean_per_class_recall"):
            assert 0.0 <= out[f"zeroshot/{t}/{k}"] <= 1.0
    assert out["zeroshot/b/top5"] == 1.0  # 3 classes: top-5 capped at 3
    assert out["zeroshot/mean_top1"] == pytest.approx((out["zeroshot/a/top1"] + out["zeroshot/b/top1"]) / 2)
    for k in (1, 5, 10):
        assert f"retrieval/val/image_to_text_R@{k}" in out and f"retrieval/val/text_to_image_R@{k}" in out
    assert all(isinstance(v, float) for v in out.values())
    model.eval()
    again = evaluate_model(model, tok, tf, tasks, None, "cpu", batch_size=5)
    assert not model.training
    assert again["zeroshot/a/top1"] == pytest.approx(out["zeroshot/a/top1"])  # batch size does not matter


def test_evaluate_model_under_ddp(micro, tmp_path):
    """A DDP-wrapped model (here a 1-process gloo group) is unwrapped and gives the plain model's numbers."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, tf, tok = micro
    tasks = [ZeroShotTask("a", CLASSNAMES, TEMPLATES_OC, NoiseImages(10))]
    splits = [RetrievalSplit("val", NoiseImages(8, captions=True))]
    model.eval()
    expected = evaluate_model(model, tok, tf, tasks, splits, "cpu", batch_size=4)
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        ddp.train()
        out = evaluate_model(ddp, tok, tf, tasks, splits, "cpu", batch_size=4)
        assert ddp.training and model.training
    finally:
        dist.destroy_process_group()
        model.eval()
    assert out.keys() == expected.keys()
    for k in expected:
        assert out[k] == pytest.approx(expected[k], abs=1e-6)


def test_evaluate_model_rejects_duplicate_names(micro):
    model, tf, tok = micro
    t = ZeroShotTask("a", CLASSNAMES, TEMPLATES_OC, NoiseImages(3))
    with pytest.raises(ValueError, match="share a name"):
        evaluate_model(model, tok, tf, [t, t], None, "cpu")


# ------------------------------------------------------------------------------------------- report


def test_write_json_atomic_and_nan(tmp_path):
    import json

    p = write_json(tmp_path / "sub" / "r.json", {"a": float("nan"), "b": torch.tensor(0.5), "c": np.int64(3),
                                                   "d": [np.float32(1.5), math.inf]})
    assert json.loads(p.read_text()) == {"a": None, "b": 0.5, "c": 3, "d": [1.5, None]}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]  # no temp file left behind
    with pytest.raises(TypeError, match="JSON"):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert json.loads(p.read_text())["b"] == 0.5  # the earlier file is intact after a failed write


def test_format_table():
    t = format_table({"zeroshot/a/top1": 0.5, "n": 3, "none": None, "nan": float("nan")})
    lines = t.splitlines()
    assert lines[0].startswith("| metric") and set(lines[1]) <= {"|", "-"}
    assert "| zeroshot/a/top1 | 0.5000 |" in t and "| none            | -      |" in t and "| nan" in t
    assert len({len(line) for line in lines}) == 1  # aligned columns
    rows = format_table([["x", 1.0], ["y", None]], headers=["task", "score"], precision=2)
    assert "| x    | 1.00  |" in rows
    with pytest.raises(ValueError, match="headers"):
        format_table([["x", 1.0]])
