"""Fashion-MNIST: IDX reading (on small handmade files), and the real data when Debian's package is installed."""
from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from amorlip.config import DataConfig
from amorlip.data import fashion_mnist as fm
from amorlip.data.loader import build_eval_data, build_train_stream
from amorlip.data.types import DataError
from amorlip.models import create_model
from markers import needs_fashion_mnist


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def fake_root(tmp_path):
    """A Fashion-MNIST folder with 40 train and 20 test items (train gzipped, test plain)."""
    rng = np.random.default_rng(0)
    data = {}
    for split, n, gz in (("train", 40, True), ("test", 20, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        img_stem, lbl_stem = fm._FILES[split]
        suffix = ".gz" if gz else ""
        _write_idx(tmp_path / (img_stem + suffix), images, gz)
        _write_idx(tmp_path / (lbl_stem + suffix), labels, gz)
        data[split] = (images, labels)
    return tmp_path, data


def test_read_idx_gz_and_plain(fake_root):
    root, data = fake_root
    images, labels = fm.load_split(str(root), "train")
    assert np.array_equal(images, data["train"][0]) and np.array_equal(labels, data["train"][1])
    t_images, _ = fm.load_split(str(root), "test")
    assert np.array_equal(t_images, data["test"][0])
    bad = root / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        fm.read_idx(bad)
    short = root / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], dtype=">i4").tobytes() + b"\x00" * 5)
    with pytest.raises(DataError, match="truncated"):
        fm.read_idx(short)


def test_pairs_tasks_and_stream_on_small_files(fake_root):
    root, data = fake_root
    pairs = fm.FashionMNISTPairs(root, seed=1)
    assert len(pairs) == 40
    img, cap = pairs[7]
    img2, cap2 = fm.FashionMNISTPairs(root, seed=1)[7]
    assert cap == cap2 and np.array_equal(np.asarray(img), np.asarray(img2)) and img.size == (64, 64)
    task = fm.fashion_mnist_zeroshot_task(root, n=15)
    assert len(task.dataset) == 15 and len(task.classnames) == 10
    timg, tlabel = task.dataset[4]
    assert tlabel == 4 and np.array_equal(np.asarray(timg)[..., 0], data["test"][0][4])  # unmodified test item
    split = fm.fashion_mnist_retrieval_split(root, n=8, seed=0)
    assert len(split.dataset) == 8 and split.dataset[0][0].size == (64, 64)

    _, train_tf, tok = create_model("micro-vit")[1:]
    cfg = DataConfig(source="fashion-mnist", fmnist_root=str(root), eval_size=10, val_size=6)
    stream = build_train_stream(cfg, 8, seed=0)
    assert stream.dataset_size == 40 and stream.steps_per_epoch == 5
    batches = list(stream.iterate(0, 0, train_tf, tok))
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(40))
    tasks, retrieval = build_eval_data(cfg, seed=0)
    assert [t.name for t in tasks] == ["fashion-mnist"] and len(tasks[0].dataset) == 10 and len(retrieval.dataset) == 6
    with pytest.raises(DataError, match=r"dataset_size=41"):
        build_train_stream(DataConfig(source="fashion-mnist", fmnist_root=str(root), dataset_size=41), 8, seed=0)


def test_missing_files_error_names_the_fix(tmp_path):
    assert not fm.available(tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*--data.fmnist-root"):
        build_train_stream(DataConfig(source="fashion-mnist", fmnist_root=str(tmp_path)), 8, seed=0)


real = needs_fashion_mnist


@real
def test_real_files_shapes_and_class_balance():
    images, labels = fm.load_split(None, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert Counter(labels.tolist()) == {k: 6000 for k in range(10)}
    t_images, t_labels = fm.load_split(None, "test")
    assert t_images.shape == (10000, 28, 28) and Counter(t_labels.tolist()) == {k: 1000 for k in range(10)}


@real
def test_real_pairs_mix_plain_and_composed_captions():
    pairs = fm.FashionMNISTPairs(seed=0)
    _, labels = fm.load_split(None, "train")
    colours = list(fm._COLORS)
    n_plain = 0
    for i in range(600):
        img, cap = pairs[i]
        assert img.size == (64, 64) and img.mode == "RGB"
        assert any(w in cap for w in fm._CLASS_WORDS[labels[i]]), cap  # the caption names the item
        arr = np.asarray(img, dtype=np.int16)
        if not any(c in cap.replace("black and white", "") for c in colours):  # a plain look: grey, filling the canvas
            n_plain += 1
            assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
        else:  # composed: a named colour, size and position; outside the item's box the canvas is black
            ys, xs = np.nonzero(arr.max(axis=2))
            assert ys.max() - ys.min() < 46 and xs.max() - xs.min() < 46
    assert 0.24 < n_plain / 600 < 0.36, n_plain
    task = fm.fashion_mnist_zeroshot_task(n=200)
    assert task.classnames[7] == "sneaker" and all("{}" in t for t in task.templates)
    assert len(set(task.dataset[i][1] for i in range(200))) == 10
