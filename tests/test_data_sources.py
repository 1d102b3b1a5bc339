"""Training streams: rank slicing, exact resume, CSV and webdataset round-trips, skipping bad samples, errors."""
from __future__ import annotations

import csv
import io
import json
import random
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from amorlip.config import DataConfig
from amorlip.data.loader import build_eval_data, build_train_stream
from amorlip.data.mapstyle import _EpochSamples
from amorlip.data.samples import mix_seed, sample_seed, sample_seeds
from amorlip.data.synthetic import SyntheticScenes
from amorlip.data.types import DataError
from amorlip.data.writers import write_synthetic_csv, write_synthetic_wds
from amorlip.models import create_model


@pytest.fixture(scope="module")
def micro():
    _, train_tf, eval_tf, tok = create_model("micro-vit")
    return train_tf, eval_tf, tok


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"]) and torch.equal(x["text"], y["text"]) and torch.equal(x["image"], y["image"])
        for x, y in zip(a, b)
    )


def _indices(batches: list[dict]) -> list[int]:
    return torch.cat([b["index"] for b in batches]).tolist()


# ---------------------------------------------------------------------------------------------- map-style


def test_synthetic_batches_shape_dtype_and_epoch_permutation(micro):
    train_tf, _, tok = micro
    stream = build_train_stream(DataConfig(synthetic_size=50), batch_size=8, seed=0)
    assert stream.dataset_size == 50 and stream.steps_per_epoch == 6
    batches = list(stream.iterate(0, 0, train_tf, tok))
    assert len(batches) == 6
    b = batches[0]
    assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["text"].shape == (8, 16) and b["text"].dtype == torch.int64
    assert b["index"].dtype == torch.int64
    e0 = _indices(batches)
    assert len(set(e0)) == 48 and all(0 <= i < 50 for i in e0)  # drop_last: 48 distinct of 50
    e1 = _indices(list(stream.iterate(1, 0, train_tf, tok)))
    assert e1 != e0 and len(set(e1)) == 48
    # text tokens are the tokenized captions of exactly those indices
    ds = SyntheticScenes(50, seed=0)
    assert torch.equal(b["text"], tok([ds.caption(i) for i in b["index"].tolist()]))


def test_rank_slices_are_disjoint_and_make_up_the_global_batch(micro):
    train_tf, _, tok = micro
    cfg = DataConfig(synthetic_size=40)
    whole = list(build_train_stream(cfg, 8, seed=5).iterate(2, 0, train_tf, tok))
    ranks = [list(build_train_stream(cfg, 8, seed=5, rank=r, world_size=2).iterate(2, 0, train_tf, tok)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == 5
    for j, g in enumerate(whole):
        r0, r1 = ranks[0][j], ranks[1][j]
        assert r0["index"].shape == (4,) and r1["index"].shape == (4,)
        assert not set(r0["index"].tolist()) & set(r1["index"].tolist())
        # the two local batches are the two halves of the 1-process global batch, augmentation included
        for key in ("index", "text", "image"):
            assert torch.equal(torch.cat([r0[key], r1[key]]), g[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resume_is_exact_with_augmentation(micro, workers):
    train_tf, _, tok = micro
    stream = build_train_stream(DataConfig(synthetic_size=48, workers=workers), 8, seed=1)
    rng_before = torch.get_rng_state()
    full = list(stream.iterate(3, 0, train_tf, tok))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the stream never touches the caller's RNG
    resumed = list(stream.iterate(3, 4, train_tf, tok))
    assert len(resumed) == 2 and _same(full[4:], resumed)
    assert list(stream.iterate(3, 6, train_tf, tok)) == []


def test_augmentation_is_per_sample_and_independent_of_workers(micro):
    train_tf, _, tok = micro
    cfg0, cfg2 = DataConfig(synthetic_size=32, workers=0), DataConfig(synthetic_size=32, workers=2)
    a = list(build_train_stream(cfg0, 8, seed=2).iterate(0, 0, train_tf, tok))
    b = list(build_train_stream(cfg2, 8, seed=2).iterate(0, 0, train_tf, tok))
    assert _same(a, b)
    # the train transform really is random: the same sample looks different in another epoch
    e1 = list(build_train_stream(cfg0, 8, seed=2).iterate(1, 0, train_tf, tok))
    img0 = {i: x for bt in a for i, x in zip(bt["index"].tolist(), bt["image"])}
    img1 = {i: x for bt in e1 for i, x in zip(bt["index"].tolist(), bt["image"])}
    assert sum(not torch.equal(img0[i], img1[i]) for i in img0) > 24


def _seedsequence(*parts: int) -> int:
    """The reference: numpy's SeedSequence itself."""
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def test_seed_hash_is_numpy_seedsequence():
    """mix_seed (pure Python) and sample_seeds (a whole batch in numpy) give SeedSequence's seeds exactly, so
    data orders and augmentations are those of earlier versions."""
    rng = random.Random(0)
    for _ in range(2000):
        parts = [rng.choice([0, rng.randrange(256), rng.randrange(1 << 32), rng.randrange(1 << 63), -rng.randrange(1 << 40)])
                 for _ in range(rng.randrange(1, 7))]
        assert mix_seed(*parts) == _seedsequence(*parts), parts
    for seed, epoch in [(0, 0), (7, 3), ((1 << 40) + 3, 1 << 33)]:
        idx = [rng.randrange(1 << 32) for _ in range(200)] + [0, 1, (1 << 32) - 1]
        for indices in (idx, idx + [1 << 35]):  # an index of two 32-bit words takes the one-at-a-time path
            assert sample_seeds(seed, epoch, indices) == [_seedsequence(seed, epoch, i, 2) for i in indices]
            assert sample_seeds(seed, epoch, indices) == [sample_seed(seed, epoch, i) for i in indices]


def test_batched_fetch_is_the_per_sample_reference_and_restores_the_rngs(micro):
    train_tf, _, _ = micro
    base = SyntheticScenes(20, seed=0)
    ds = _EpochSamples(base, train_tf, seed=4, epoch=1)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    batch = ds.__getitems__([3, 0, 7])
    single = [ds[i] for i in (3, 0, 7)]
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    for i, a, b in zip((3, 0, 7), batch, single):
        torch.manual_seed(sample_seed(4, 1, i))  # the slow obvious reference: seed, then transform
        random.seed(sample_seed(4, 1, i))
        ref = train_tf(base[i][0])
        assert a["index"] == b["index"] == i and torch.equal(a["image"], b["image"]) and torch.equal(a["image"], ref)
    torch.set_rng_state(torch_state)
    random.setstate(py_state)


def test_batch_size_errors():
    with pytest.raises(DataError, match="not divisible"):
        build_train_stream(DataConfig(synthetic_size=40), 9, seed=0, rank=0, world_size=2)
    with pytest.raises(DataError, match="less than one global batch"):
        build_train_stream(DataConfig(synthetic_size=10), 16, seed=0)
    with pytest.raises(DataError, match="unknown data.source"):
        build_train_stream(DataConfig(source="nope"), 8, seed=0)


def test_build_eval_data_by_source():
    cfg = DataConfig(eval_size=12, val_size=7)
    tasks, split = build_eval_data(cfg, seed=0)
    assert [t.name for t in tasks] == ["synthetic-shape", "synthetic-colour", "synthetic-size", "synthetic-position"]
    assert len(tasks[0].dataset) == 12 and len(split.dataset) == 7
    csv_cfg = DataConfig(source="csv", train_path="x.csv")
    assert build_eval_data(csv_cfg, seed=0) == ([], None)
    tasks2, split2 = build_eval_data(csv_cfg, seed=0, source="synthetic")
    assert len(tasks2) == 4 and split2.dataset[3][1] == split.dataset[3][1]


# ---------------------------------------------------------------------------------------------- CSV


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("csvdata")
    write_synthetic_csv(out, 24, seed=7)
    return out


def test_csv_round_trip(micro, csv_dir):
    _, eval_tf, tok = micro
    cfg = DataConfig(source="csv", train_path=str(csv_dir / "train.csv"))
    stream = build_train_stream(cfg, 8, seed=0)
    assert stream.dataset_size == 24 and stream.steps_per_epoch == 3
    batches = list(stream.iterate(0, 0, eval_tf, tok))
    assert sorted(_indices(batches)) == list(range(24))  # every row once per epoch
    ds = SyntheticScenes(24, seed=7)
    for b in batches:
        for i, img, txt in zip(b["index"].tolist(), b["image"], b["text"]):
            src_img, caption = ds[i]  # PNG is lossless: identical pixels after the eval transform
            assert torch.equal(img, eval_tf(src_img))
            assert torch.equal(txt, tok([caption])[0])
    assert stream.stats.skipped_corrupt == 0 and stream.stats.skipped_no_caption == 0


def test_csv_corrupt_and_missing_caption_are_skipped_and_counted(micro, csv_dir, tmp_path):
    _, eval_tf, tok = micro
    shutil.copytree(csv_dir, tmp_path / "d")
    root = tmp_path / "d"
    (root / "images" / "00000003.png").write_bytes(b"this is not a png")
    (root / "images" / "00000005.png").unlink()
    rows = list(csv.reader((root / "train.csv").open()))
    rows[1 + 8][1] = "   "  # row 8: blank caption
    with (root / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    stream = build_train_stream(DataConfig(source="csv", train_path=str(root / "train.csv"), workers=2), 8, seed=0)
    batches = list(stream.iterate(0, 0, eval_tf, tok))
    seen = _indices(batches)
    assert sorted(seen) == sorted(set(range(24)) - {3, 5, 8})
    assert sum(b["index"].numel() for b in batches) == 21 and len(batches) == 3
    assert stream.stats.skipped_corrupt == 2 and stream.stats.skipped_no_caption == 1


def test_csv_validation_errors(csv_dir, tmp_path):
    with pytest.raises(DataError, match="not found.*--data.train-path"):
        build_train_stream(DataConfig(source="csv", train_path=str(tmp_path / "missing.csv")), 8, seed=0)
    with pytest.raises(DataError, match="'caption'.*--data.csv-caption-key"):
        build_train_stream(DataConfig(source="csv", train_path=str(csv_dir / "train.csv"), csv_caption_key="caption"), 8, seed=0)
    # a tab-separated file read with the default comma separator: the columns are not found
    tsv = tmp_path / "train.tsv"
    rows = list(csv.reader((csv_dir / "train.csv").open()))
    tsv.write_text("\n".join("\t".join([str(csv_dir / r[0]) if k else r[0], r[1]]) for k, r in enumerate(rows)))
    with pytest.raises(DataError, match="csv-separator"):
        build_train_stream(DataConfig(source="csv", train_path=str(tsv)), 8, seed=0)
    stream = build_train_stream(DataConfig(source="csv", train_path=str(tsv), csv_separator="\\t"), 8, seed=0)
    assert stream.dataset_size == 24  # absolute paths work too
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(DataError, match="no rows"):
        build_train_stream(DataConfig(source="csv", train_path=str(tmp_path / "empty.csv")), 8, seed=0)


# ---------------------------------------------------------------------------------------------- webdataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("wds")
    paths = write_synthetic_wds(out, 48, seed=3, shard_size=12, image_format="png")
    return out, paths


def test_wds_writer_layout(shards):
    out, paths = shards
    assert [p.name for p in paths] == [f"shard-{k:05d}.tar" for k in range(4)]
    assert json.loads((out / "sizes.json").read_text()) == {p.name: 12 for p in paths}
    sample = next(iter(wds.WebDataset(str(paths[1]), shardshuffle=False)))
    assert json.loads(sample["json"])["index"] == 12 and sample["__key__"] == "00000012"
    assert sample["txt"].decode() == SyntheticScenes(48, seed=3).caption(12)


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_round_trip_every_sample_once(micro, shards, workers):
    _, eval_tf, tok = micro
    out, _ = shards
    stream = build_train_stream(DataConfig(source="wds", train_path=str(out), workers=workers), 8, seed=0)
    assert stream.dataset_size == 48 and stream.steps_per_epoch == 6  # size from sizes.json
    batches = list(stream.iterate(0, 0, eval_tf, tok))
    assert len(batches) == 6 and sorted(_indices(batches)) == list(range(48))
    ds = SyntheticScenes(48, seed=3)
    for b in batches[:2]:
        for i, img, txt in zip(b["index"].tolist(), b["image"], b["text"]):
            src_img, caption = ds[i]
            assert torch.equal(txt, tok([caption])[0]) and torch.equal(img, eval_tf(src_img))
    other_epoch = _indices(list(stream.iterate(1, 0, eval_tf, tok)))
    assert sorted(other_epoch) == list(range(48)) and other_epoch != _indices(batches)


def test_every_stream_is_a_train_stream(csv_dir, shards):
    """The synthetic (map-style), csv, wds and benchmark streams all have what the trainer reads, with the
    counters as DataStats (the trainer calls their state_dict / merge / describe without checking)."""
    from amorlip.bench.common import BenchStream
    from amorlip.data.types import DataStats, TrainStream

    streams = [build_train_stream(DataConfig(synthetic_size=16), 8, seed=0),
               build_train_stream(DataConfig(source="csv", train_path=str(csv_dir / "train.csv")), 8, seed=0),
               build_train_stream(DataConfig(source="wds", train_path=str(shards[0])), 8, seed=0),
               BenchStream(8, 16)]
    for stream in streams:
        assert isinstance(stream, TrainStream) and type(stream.stats) is DataStats, type(stream).__name__


def test_wds_brace_pattern_and_joined_patterns(micro, shards):
    _, eval_tf, tok = micro
    out, _ = shards
    path = f"{out}/shard-{{00000..00001}}.tar::{out}/shard-00002.tar"
    stream = build_train_stream(DataConfig(source="wds", train_path=path), 12, seed=0)
    assert stream.dataset_size == 36  # sizes.json entries of the three chosen shards
    seen = _indices(list(stream.iterate(0, 0, eval_tf, tok)))
    assert sorted(seen) == list(range(36))
    # indices must lie in [0, dataset_size): the last two shards alone hold indices 24..47 but only 24 samples
    tail = build_train_stream(DataConfig(source="wds", train_path=f"{out}/shard-{{00002..00003}}.tar"), 8, seed=0)
    with pytest.raises(DataError, match="outside"):
        list(tail.iterate(0, 0, eval_tf, tok))


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_skip_batches_resume_is_exact(micro, shards, workers):
    train_tf, _, tok = micro
    out, _ = shards
    stream = build_train_stream(DataConfig(source="wds", train_path=str(out), workers=workers), 8, seed=4)
    full = list(stream.iterate(2, 0, train_tf, tok))
    for k in (1, 3):
        assert _same(full[k:], list(stream.iterate(2, k, train_tf, tok)))


def test_wds_two_ranks_split_the_shards(micro, shards):
    _, eval_tf, tok = micro
    out, _ = shards
    cfg = DataConfig(source="wds", train_path=str(out))
    per_rank = [list(build_train_stream(cfg, 8, seed=0, rank=r, world_size=2).iterate(0, 0, eval_tf, tok)) for r in range(2)]
    assert [len(p) for p in per_rank] == [6, 6]  # every rank makes steps_per_epoch local batches of 4
    assert all(b["index"].numel() == 4 for p in per_rank for b in p)
    a, b = set(_indices(per_rank[0])), set(_indices(per_rank[1]))
    assert not a & b and a | b == set(range(48))


def test_wds_resampled_is_deterministic_and_sized(micro, shards):
    _, eval_tf, tok = micro
    out, _ = shards
    cfg = DataConfig(source="wds", train_path=str(out), resampled=True)
    cfg.shuffle_buffer = 100  # optional knob (default 1000): an infinite stream first fills the whole buffer
    stream = build_train_stream(cfg, 8, seed=0)
    e0 = list(stream.iterate(0, 0, eval_tf, tok))
    assert len(e0) == stream.steps_per_epoch == 6
    assert _same(e0, list(stream.iterate(0, 0, eval_tf, tok)))
    assert _same(e0[2:], list(stream.iterate(0, 2, eval_tf, tok)))
    assert _indices(e0) != _indices(list(stream.iterate(1, 0, eval_tf, tok)))


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def test_wds_corrupt_and_missing_caption_are_skipped_and_counted(micro, tmp_path):
    _, eval_tf, tok = micro
    with wds.TarWriter(str(tmp_path / "bad-0.tar")) as sink:
        for i in range(8):
            sample = {"__key__": f"{i:06d}", "png": _png((i * 20, 0, 0)), "txt": f"sample {i}"}
            if i == 1:
                sample["png"] = b"\x89PNG broken"
            if i == 2:
                sample["txt"] = ""
            if i == 6:
                del sample["png"]
            sink.write(sample)
    stream = build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "bad-0.tar"), dataset_size=8), 4, seed=0)
    batches = list(stream.iterate(0, 0, eval_tf, tok))
    assert sorted(_indices(batches)) == [0, 3, 4, 5, 7]
    assert stream.stats.skipped_corrupt == 2 and stream.stats.skipped_no_caption == 1


def test_wds_errors(shards, tmp_path):
    out, _ = shards
    with pytest.raises(DataError, match="do not exist"):
        build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "s-{000..003}.tar")), 8, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "empty")), 8, seed=0)
    with pytest.raises(DataError, match="train-path"):
        build_train_stream(DataConfig(source="wds", train_path=None), 8, seed=0)
    nosize = tmp_path / "nosize"
    nosize.mkdir()
    shutil.copy(out / "shard-00000.tar", nosize / "a.tar")
    with pytest.raises(DataError, match="dataset-size"):
        build_train_stream(DataConfig(source="wds", train_path=str(nosize)), 4, seed=0)
    assert build_train_stream(DataConfig(source="wds", train_path=str(nosize), dataset_size=48), 4, seed=0).steps_per_epoch == 12
    with pytest.raises(DataError, match="4 shards cannot be split over 2 processes x 3 workers"):
        build_train_stream(DataConfig(source="wds", train_path=str(out), workers=3), 8, seed=0, rank=0, world_size=2)
    with pytest.raises(DataError, match="not divisible"):
        build_train_stream(DataConfig(source="wds", train_path=str(out)), 7, seed=0, rank=0, world_size=2)
    with wds.TarWriter(str(tmp_path / "noindex.tar")) as sink:
        sink.write({"__key__": "cat_photo", "png": _png((1, 2, 3)), "txt": "a cat"})
    with pytest.raises(DataError, match='"index"'):
        build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "noindex.tar"), dataset_size=4), 2, seed=0)
