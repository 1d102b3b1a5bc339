"""Embedded synthetic scenes: determinism, caption variety, and zero-shot labels that match the pixels."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from amorlip.data.synthetic import (
    COLOR_RGB,
    COLOR_WORDS,
    COLORS,
    POSITIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    SyntheticScenes,
    synthetic_retrieval_split,
    synthetic_zeroshot_tasks,
)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _foreground(img: Image.Image) -> np.ndarray:
    """Object pixels: every object colour has a channel >= 200, the background stays below 80."""
    return _pixels(img).max(axis=2) > 140


def test_same_seed_same_samples_and_different_index_differs():
    a, b = SyntheticScenes(50, seed=3), SyntheticScenes(50, seed=3)
    for i in (0, 7, 49):
        ia, ca = a[i]
        ib, cb = b[i]
        assert ca == cb
        assert np.array_equal(_pixels(ia), _pixels(ib))
        assert ia.mode == "RGB" and ia.size == (64, 64)
    assert a[0][1] != a[1][1] or not np.array_equal(_pixels(a[0][0]), _pixels(a[1][0]))
    assert not np.array_equal(_pixels(a[0][0]), _pixels(a[1][0]))
    other = SyntheticScenes(50, seed=4)
    assert sum(other[i][1] == a[i][1] for i in range(50)) < 5
    # the stream is order independent: sample i does not depend on what was generated before
    fresh = SyntheticScenes(50, seed=3)
    assert fresh[49][1] == a[49][1]


def test_train_and_val_splits_differ_and_render_size():
    train, val = SyntheticScenes(200, seed=0, split="train"), SyntheticScenes(200, seed=0, split="val")
    assert sum(train.caption(i) == val.caption(i) for i in range(200)) < 10
    split = synthetic_retrieval_split(20, seed=0)
    assert split.dataset[5][1] == val[5][1]
    small = SyntheticScenes(5, seed=0, render_size=32)
    assert small[0][0].size == (32, 32) and small[0][1] == SyntheticScenes(5, seed=0)[0][1]
    with pytest.raises(ValueError):
        SyntheticScenes(5, split="test")
    with pytest.raises(IndexError):
        train[200]


def test_caption_uniqueness_and_attribute_words():
    ds = SyntheticScenes(2000, seed=0)
    captions = [ds.caption(i) for i in range(2000)]
    unique_rate = len(set(captions)) / len(captions)
    print(f"caption uniqueness on 2000 samples: {unique_rate:.4f}")
    assert unique_rate > 0.95
    n_two = n_objects = n_colour = n_size = 0
    for i in range(300):
        objs = ds.objects(i)
        cap = captions[i]
        n_two += len(objs) == 2
        for o in objs:  # every object's shape is named (canonical word or a synonym), mostly its colour and size too
            assert any(w in cap for w in SHAPE_WORDS[SHAPES[o.shape]]), (cap, o)
            n_objects += 1
            n_colour += any(w in cap for w in COLOR_WORDS[COLORS[o.color]])
            n_size += any(w in cap for w in SIZE_WORDS[SIZES[o.size]])
    assert 40 < n_two < 120  # about 25% two-object scenes
    assert 0.8 < n_colour / n_objects < 0.95 and 0.8 < n_size / n_objects < 0.95  # one attribute sometimes left out


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in synthetic_zeroshot_tasks(72, seed=1)}


def test_zeroshot_tasks_well_formed_and_balanced(tasks):
    assert sorted(tasks) == sorted(["synthetic-shape", "synthetic-colour", "synthetic-size", "synthetic-position"])
    expected = {"synthetic-shape": SHAPES, "synthetic-colour": COLORS, "synthetic-size": SIZES,
                "synthetic-position": POSITIONS}
    for name, task in tasks.items():
        assert task.classnames == expected[name]
        assert len(task.templates) >= 3 and all(t.count("{}") == 1 for t in task.templates)
        labels = [task.dataset[i][1] for i in range(len(task.dataset))]
        counts = Counter(labels)
        assert set(counts) == set(range(len(task.classnames)))
        assert max(counts.values()) - min(counts.values()) <= 1
        img, label = task.dataset[3]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and isinstance(label, int)
    # deterministic, and different from the training stream
    again = synthetic_zeroshot_tasks(72, seed=1)[0].dataset[5][0]
    assert np.array_equal(_pixels(again), _pixels(tasks["synthetic-shape"].dataset[5][0]))


def test_zeroshot_labels_match_pixels(tasks):
    """The labels are what the pixels show: colour, area (size) and centroid (position) of the object."""
    colour = tasks["synthetic-colour"]
    for i in range(len(colour.dataset)):
        img, label = colour.dataset[i]
        px = _pixels(img)[_foreground(img)]
        mean = px.mean(axis=0)
        nearest = min(range(len(COLORS)), key=lambda c: np.sum((mean - np.array(COLOR_RGB[COLORS[c]])) ** 2))
        assert nearest == label, (i, mean, COLORS[label])

    size = tasks["synthetic-size"]
    areas: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i in range(len(size.dataset)):
        img, label = size.dataset[i]
        areas[label].append(int(_foreground(img).sum()))
    # same shape mix in every class: the mean areas grow by the squared size ratio (~2.5x and ~2x)
    m = [np.mean(areas[k]) for k in range(3)]
    assert m[1] > 1.7 * m[0] and m[2] > 1.5 * m[1], m

    pos = tasks["synthetic-position"]
    for i in range(len(pos.dataset)):
        img, label = pos.dataset[i]
        ys, xs = np.nonzero(_foreground(img))
        row, col = int(ys.mean() // (64 / 3)), int(xs.mean() // (64 / 3))
        assert row * 3 + col == label, (i, POSITIONS[label], ys.mean(), xs.mean())

    shape = tasks["synthetic-shape"]
    fill = {k: [] for k in range(len(SHAPES))}  # filled fraction of the bounding box tells shapes apart
    for i in range(len(shape.dataset)):
        img, label = shape.dataset[i]
        fg = _foreground(img)
        ys, xs = np.nonzero(fg)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill[label].append(fg.sum() / box)
    f = {SHAPES[k]: float(np.mean(v)) for k, v in fill.items()}
    # square ~0.84 (up to 8 degrees of rotation), circle pi/4, triangle / diamond / cross ~0.5, star ~0.4
    half = [f["triangle"], f["diamond"], f["cross"]]
    assert f["square"] > f["circle"] + 0.03 and f["circle"] > max(half) + 0.15 and f["star"] < min(half) - 0.03, f
