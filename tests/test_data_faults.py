"""Broken data never hangs a run and is counted honestly.

Every case that used to loop forever runs under a timeout (a thread joined with a limit, or a subprocess),
so a regression fails here instead of hanging the test run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from amorlip.config import DataConfig
from amorlip.data.loader import build_train_stream
from amorlip.data.types import DataError, DataStats
from amorlip.data.wds import WdsStream
from amorlip.data.writers import write_synthetic_csv, write_synthetic_wds
from amorlip.models import create_model

LIMIT_S = 120  # generous on a busy 2-core machine; a hang never ends


@pytest.fixture(scope="module")
def micro():
    _, _, eval_tf, tok = create_model("micro-vit")
    return eval_tf, tok


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def within(seconds: float, fn, *args):
    """Run fn(*args) in a thread; fail (instead of hanging) if it is still running after `seconds`.
    Returns the value, or the exception it raised."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still iterating after {seconds} s: the data stream hangs"
    return out.get("error", out.get("value"))


def drive(stream, total_steps: int, transform, tokenizer) -> int:
    """The trainer's loop (train.py): re-enter `iterate` at (epoch, skip) of the current step until done."""
    step = 0
    while step < total_steps:
        epoch, skip = divmod(step, stream.steps_per_epoch)
        for _ in stream.iterate(epoch, skip, transform, tokenizer):
            step += 1
            if step >= total_steps:
                break
    return step


def expect_data_error(stream, micro, steps: int = 20) -> str:
    result = within(LIMIT_S, drive, stream, steps, *micro)
    assert isinstance(result, DataError), f"expected a DataError, got {result!r}"
    msg = str(result)
    assert "\n" not in msg and "Traceback" not in msg, msg  # the CLI prints it as one line
    return msg


def _png(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _indices(batches) -> list[int]:
    return torch.cat([b["index"] for b in batches]).tolist()


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def _rewrite_csv(path: Path, edit) -> None:
    rows = list(csv.reader(path.open()))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def csv_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("csvsrc")
    write_synthetic_csv(out, 48, seed=1, render_size=32)
    return out


def copy_csv(csv_src, tmp_path, corrupt=(), no_caption=()) -> Path:
    root = tmp_path / "csv"
    shutil.copytree(csv_src, root)
    for i in corrupt:
        (root / "images" / f"{i:08d}.png").write_bytes(b"not an image")

    def blank(rows):
        for i in no_caption:
            rows[1 + i][1] = ""

    _rewrite_csv(root / "train.csv", blank)
    return root / "train.csv"


# ------------------------------------------------------------------------------------------ never a hang


@pytest.mark.parametrize("workers", [0, 2])
def test_all_corrupt_csv_raises_naming_files(micro, csv_src, tmp_path, workers):
    path = copy_csv(csv_src, tmp_path, corrupt=range(48))
    stream = build_train_stream(DataConfig(source="csv", train_path=str(path), workers=workers), 8, seed=0)
    msg = expect_data_error(stream, micro)
    assert "corrupt" in msg and "first:" in msg and ".png" in msg
    assert "not readable images" in msg  # the files exist: the fix is to re-create them


def _live_children() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.is_alive()]


@pytest.mark.parametrize("source", ["csv", "wds"])
def test_a_data_error_shuts_its_loader_workers_down(micro, csv_src, tmp_path, source):
    """The workers ignore SIGTERM (stop signals are the main process's), so workers left running by a caught
    DataError -- whose traceback keeps the loader's iterator alive -- made the interpreter's exit wait forever."""
    if source == "csv":
        path = copy_csv(csv_src, tmp_path, corrupt=range(48))
    else:
        _custom_shards(tmp_path / "s", 2, 24, image="junk")
        path = tmp_path / "s"
    before = {p.pid for p in _live_children()}
    stream = build_train_stream(DataConfig(source=source, train_path=str(path), workers=2), 8, seed=0)
    error = within(LIMIT_S, drive, stream, 20, *micro)
    assert isinstance(error, DataError) and error.__traceback__ is not None  # still held here
    left = [p for p in _live_children() if p.pid not in before]
    assert not left, f"loader workers still running after the DataError: {left}"


@pytest.mark.slow
def test_a_process_that_caught_a_data_error_with_workers_exits(csv_src, tmp_path):
    path = copy_csv(csv_src, tmp_path, corrupt=range(48))
    script = f"""
from amorlip.config import DataConfig
from amorlip.data.loader import build_train_stream
from amorlip.data.types import DataError
from amorlip.models import create_model
_, _, transform, tokenizer = create_model("micro-vit")
stream = build_train_stream(DataConfig(source="csv", train_path={str(path)!r}, workers=2), 8, seed=0)
try:
    for _ in stream.iterate(0, 0, transform, tokenizer):
        pass
except DataError as e:
    kept = e  # as a test framework keeps it, with the traceback and the frames it holds
print("caught", type(kept).__name__, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == 0 and "caught DataError" in proc.stdout, proc.stderr[-2000:]


def test_csv_paths_wrong_for_its_folder(micro, csv_src, tmp_path):
    path = copy_csv(csv_src, tmp_path)
    moved = tmp_path / "elsewhere" / "train.csv"
    moved.parent.mkdir()
    shutil.move(path, moved)  # relative paths now point into elsewhere/images, which does not exist
    stream = build_train_stream(DataConfig(source="csv", train_path=str(moved)), 8, seed=0)
    msg = expect_data_error(stream, micro)
    assert "do not exist" in msg and str(moved.parent) in msg and "csv-img-key" in msg


def _custom_shards(folder: Path, n_shards: int, per_shard: int, *, image=True, caption=True, key=lambda i: f"{i:08d}",
                   json_index=True, sizes=True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_shards):
        p = folder / f"shard-{k:05d}.tar"
        with wds.TarWriter(str(p)) as sink:
            for j in range(per_shard):
                i = k * per_shard + j
                sample = {"__key__": key(i)}
                if image is True:
                    sample["png"] = _png((i % 256, 0, 0))
                elif image == "junk":
                    sample["png"] = b"\x89PNG broken"
                if caption:
                    sample["txt"] = f"sample {i}"
                if json_index:
                    sample["json"] = {"index": i}
                sink.write(sample)
        paths.append(p)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({p.name: per_shard for p in paths}))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_all_corrupt_raises(micro, tmp_path, workers):
    _custom_shards(tmp_path / "s", 2, 24, image="junk")
    stream = build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "s"), workers=workers), 8, seed=0)
    msg = expect_data_error(stream, micro)
    assert "48 corrupt" in msg and "shard-0000" in msg and "decodable image" in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_without_captions_raises(micro, tmp_path, workers):
    _custom_shards(tmp_path / "s", 2, 24, caption=False)
    stream = build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "s"), workers=workers), 8, seed=0)
    msg = expect_data_error(stream, micro)
    assert "without caption" in msg and "KEY.txt" in msg


def test_good_shard_plus_zero_byte_shard_with_two_workers(micro, tmp_path):
    paths = _custom_shards(tmp_path / "s", 2, 24)
    paths[1].write_bytes(b"")  # sizes.json still lists 24 samples for it
    stream = build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "s"), workers=2), 4, seed=0)
    assert stream.steps_per_epoch == 12
    msg = expect_data_error(stream, micro, steps=20)
    assert "shard-00001.tar" in msg and "no readable sample" in msg and "empty file" in msg
    assert stream.stats.unreadable_shards == 1 and stream.stats.skipped_unreadable == 24


def test_resampled_unreadable_shards_raise(micro, tmp_path):
    zeros = [tmp_path / f"z{k}.tar" for k in range(2)]
    for z in zeros:
        z.write_bytes(b"")
    stream = WdsStream([str(z) for z in zeros], 16, 4, seed=0, resampled=True, needs_indices=False)
    msg = expect_data_error(stream, micro)
    assert "drew gave no readable sample" in msg and "z0.tar" in msg


def test_index_error_in_a_worker_is_one_clean_line(micro, tmp_path):
    _custom_shards(tmp_path / "s", 2, 12)
    stream = build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "s"), workers=2, dataset_size=16),
                                4, seed=0)
    msg = expect_data_error(stream, micro)
    assert "outside [0, 16)" in msg and "Original Traceback" not in msg


@pytest.mark.slow
def test_cli_all_corrupt_csv_exits_2_with_one_line(csv_src, tmp_path):
    path = copy_csv(csv_src, tmp_path, corrupt=range(48))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "amorlip.cli", "train", "--data.source", "csv", "--data.train-path", str(path),
           "--train.steps", "20", "--train.batch-size", "8", "--model.name", "tiny-vit",
           "--train.output-dir", str(tmp_path / "runs"), "--train.progress", "false", "--train.threads", "1",
           "--eval.zeroshot", "false", "--eval.retrieval", "false", "--train.device", "cpu"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("amorlip train on an all-corrupt CSV did not stop within 300 s")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("amorlip train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "00000000.png" in errors[0] or ".png" in errors[0]


# ------------------------------------------------------------------------------------------ honest counts


def test_truncated_tar_counts_lost_samples_per_shard(micro, tmp_path):
    out = tmp_path / "s"
    paths = write_synthetic_wds(out, 48, seed=2, shard_size=12, image_format="png", render_size=32)
    victim = paths[2]
    with tarfile.open(victim) as t:
        members = t.getmembers()
    # cut inside the first member of the shard's 6th sample: samples 24..28 stay readable, 29..35 are lost
    assert members[15].name == "00000029.json"
    victim.write_bytes(victim.read_bytes()[: members[15].offset_data + 10])
    cfg = DataConfig(source="wds", train_path=str(out), train_num_samples=40)
    stream = build_train_stream(cfg, 8, seed=0)
    assert stream.dataset_size == 48 and stream.steps_per_epoch == 5
    for epoch in (0, 1):
        batches = within(LIMIT_S, lambda e=epoch: list(stream.iterate(e, 0, *micro)))
        assert len(batches) == 5
        seen = set(_indices(batches))
        assert len(seen) == 40 and not seen & set(range(29, 36))
    st = stream.stats
    assert st.seen == 80 and st.unreadable_shards == 1 and st.skipped_unreadable == 7  # distinct
    assert st.extra["unreadable_visits"] == 14 and st.extra["shard_errors"] == 2  # per visit (2 epochs)
    assert st.skipped == 7 and st.skipped_corrupt == 0 and st.read == 94
    text = st.describe()
    assert text.startswith("skipped 7 of 94 samples (1 unreadable shard losing 7 samples)")
    assert str(victim) in text and "unexpected end of data" in text and "14 skips counting repeat reads" in text
    assert st.shards[str(victim)] == {"visits": 2, "lost": 7, "error": st.shards[str(victim)]["error"]}


def test_distinct_and_per_visit_counts_over_two_epochs(micro, csv_src, tmp_path):
    path = copy_csv(csv_src, tmp_path, corrupt=(3, 17), no_caption=(8,))
    stream = build_train_stream(DataConfig(source="csv", train_path=str(path)), 8, seed=0)
    for epoch in (0, 1):
        list(stream.iterate(epoch, 0, *micro))
    st = stream.stats
    assert st.seen == 96  # 48 rows, every one read in both epochs
    assert (st.skipped_corrupt, st.skipped_no_caption) == (2, 1)  # distinct samples
    assert st.extra["corrupt_visits"] == 4 and st.extra["no_caption_visits"] == 2  # every visit
    assert st.bad_ids == {"corrupt": {3, 17}, "no_caption": {8}}
    assert "00000003.png" in st.describe() and "train.csv line 10 (no caption)" in st.describe()
    # the checkpoint form is plain JSON and restores exactly; a restored stream keeps deduplicating
    state = json.loads(json.dumps(st.state_dict()))
    again = build_train_stream(DataConfig(source="csv", train_path=str(path)), 8, seed=0)
    again.stats.load_state_dict(state)
    assert again.stats.state_dict() == st.state_dict()
    list(again.iterate(2, 0, *micro))
    assert (again.stats.skipped_corrupt, again.stats.extra["corrupt_visits"], again.stats.seen) == (2, 6, 144)
    # an older checkpoint's counters (plain ints) still load
    old = DataStats.from_state_dict({"skipped_corrupt": 3, "skipped_no_caption": 1, "extra": {"empty_batches": 2}})
    assert old.skipped_corrupt == 3 and old.extra["empty_batches"] == 2 and old.seen == 0


def test_merge_sums_ranks_and_counts_shared_samples_once(micro, csv_src, tmp_path):
    path = copy_csv(csv_src, tmp_path, corrupt=(3, 17), no_caption=(8,))
    cfg = DataConfig(source="csv", train_path=str(path))
    ranks = [build_train_stream(cfg, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        for epoch in (0, 1):
            list(s.iterate(epoch, 0, *micro))
    states = [json.loads(json.dumps(s.stats.state_dict())) for s in ranks]
    total = DataStats.merge(states)
    assert total.seen == 96 and total.extra["corrupt_visits"] == 4 and total.extra["no_caption_visits"] == 2
    assert (total.skipped_corrupt, total.skipped_no_caption) == (2, 1)  # a sample two ranks read counts once
    assert sum(s.stats.skipped_corrupt for s in ranks) >= 2
    # shards and untracked counts add up; the same shard read by two ranks is one shard
    a, b = DataStats(), DataStats()
    a.note_shard("s1.tar", "ReadError: empty file", lost=12)
    a.note_shard("s2.tar", "ReadError: unexpected end of data", lost=3)
    b.note_shard("s2.tar", "ReadError: unexpected end of data", lost=5)
    b.seen, b.skipped_corrupt, b.extra["untracked"] = 10, 4, 4  # 4 corrupt samples beyond the id cap
    m = DataStats.merge([a.state_dict(), b])
    assert (m.unreadable_shards, m.skipped_unreadable, m.extra["shard_errors"]) == (2, 17, 3)
    assert m.skipped_corrupt == 4 and m.seen == 10 and m.shards["s2.tar"]["visits"] == 2
    assert "distinct counts are upper bounds" in m.describe()


def test_max_skip_fraction_aborts_and_one_disables(micro, csv_src, tmp_path):
    path = copy_csv(csv_src, tmp_path, corrupt=range(0, 48, 2), no_caption=(1, 3, 5, 7))  # 28 of 48 bad
    stream = build_train_stream(DataConfig(source="csv", train_path=str(path)), 8, seed=0)
    msg = expect_data_error(stream, micro, steps=6)
    assert "max_skip_fraction=0.5" in msg and "first:" in msg and "max-skip-fraction" in msg
    assert stream.stats.seen == 48  # checked after one epoch's worth (smaller than SKIP_CHECK_MIN_SAMPLES)
    lenient = build_train_stream(DataConfig(source="csv", train_path=str(path), max_skip_fraction=1.0), 8, seed=0)
    assert within(LIMIT_S, drive, lenient, 12, *micro) == 12
    # a few bad samples in the very first batch do not abort: the check waits for enough samples
    first = build_train_stream(DataConfig(source="csv", train_path=str(csv_src / "train.csv")), 8, seed=0).rank_batches(0)[0]
    few = copy_csv(csv_src, tmp_path / "few", corrupt=first[:5])
    assert within(LIMIT_S, drive, build_train_stream(DataConfig(source="csv", train_path=str(few)), 8, seed=0),
                  6, *micro) == 6
    with pytest.raises(DataError, match="max_skip_fraction"):
        build_train_stream(DataConfig(source="csv", train_path=str(path), max_skip_fraction=1.5), 8, seed=0)
    with pytest.raises(DataError, match="max_empty_batches"):
        build_train_stream(DataConfig(source="csv", train_path=str(path), max_empty_batches=0), 8, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_unusable_batch_is_replaced_so_every_step_gets_one(micro, csv_src, tmp_path, workers):
    probe = build_train_stream(DataConfig(source="csv", train_path=str(csv_src / "train.csv")), 8, seed=0)
    plan = probe.rank_batches(0)
    path = copy_csv(csv_src, tmp_path, corrupt=plan[1] + plan[5])  # batch 1 and the last batch: nothing usable
    stream = build_train_stream(DataConfig(source="csv", train_path=str(path), workers=workers), 8, seed=0)
    full = list(stream.iterate(0, 0, *micro))
    assert len(full) == stream.steps_per_epoch == 6  # the trainer's step stays the batch position
    assert _same([full[1]], [full[2]]) and _same([full[5]], [full[4]])  # next usable; last one at the end
    assert stream.stats.extra["empty_batches"] == 2
    for k in (1, 5):  # a resume inside the unusable stretch gets what the uninterrupted run got
        assert _same(full[k:], list(stream.iterate(0, k, *micro)))


# ------------------------------------------------------------------------------------------ indices, epoch size


def test_wds_without_index_runs_for_objectives_without_per_sample_state(micro, tmp_path):
    folder = tmp_path / "s"
    _custom_shards(folder, 2, 12, key=lambda i: f"photo_{i}", json_index=False, sizes=False)
    cfg = DataConfig(source="wds", train_path=str(folder), train_num_samples=24)
    with pytest.raises(DataError, match='"index"'):  # needs_indices=True (the default): the clear, early error
        build_train_stream(DataConfig(source="wds", train_path=str(folder), dataset_size=24), 8, seed=0)
    for workers in (0, 2):
        cfg.workers = workers
        stream = build_train_stream(cfg, 8, seed=0, needs_indices=False)
        assert stream.dataset_size == 24 and stream.steps_per_epoch == 3
        batches = within(LIMIT_S, lambda: list(stream.iterate(0, 0, *micro)))
        ids = _indices(batches)
        assert len(batches) == 3 and len(set(ids)) == 24  # running ids, distinct within the epoch
        assert _same(batches[1:], list(stream.iterate(0, 1, *micro)))  # and the same after a resume
    with pytest.raises(DataError, match="train-num-samples"):
        build_train_stream(DataConfig(source="wds", train_path=str(folder)), 8, seed=0, needs_indices=False)


def test_train_num_samples_sets_the_epoch_not_the_index_range(micro, tmp_path):
    out = tmp_path / "s"
    write_synthetic_wds(out, 48, seed=2, shard_size=12, image_format="png", render_size=32)
    stream = build_train_stream(DataConfig(source="wds", train_path=str(out), train_num_samples=24), 8, seed=0)
    assert stream.dataset_size == 48 and stream.steps_per_epoch == 3
    assert all(0 <= i < 48 for i in _indices(list(stream.iterate(0, 0, *micro))))
    # open_clip's --dataset-resampled --train-num-samples N on shards without sizes.json
    (out / "sizes.json").unlink()
    cfg = DataConfig(source="wds", train_path=str(out), resampled=True, train_num_samples=40)
    with pytest.raises(DataError, match="per-sample state"):
        build_train_stream(cfg, 8, seed=0)  # an objective with per-sample state needs the index range
    stream = build_train_stream(cfg, 8, seed=0, needs_indices=False)
    assert stream.dataset_size == 40 and stream.steps_per_epoch == 5
    assert len(within(LIMIT_S, lambda: list(stream.iterate(0, 0, *micro)))) == 5
    cfg.dataset_size = 48
    assert build_train_stream(cfg, 8, seed=0).steps_per_epoch == 5  # indices in [0, 48) are fine with it
    with pytest.raises(DataError, match="wds only"):
        build_train_stream(DataConfig(train_num_samples=100), 8, seed=0)


def test_csv_missing_file_message_names_the_real_command(tmp_path):
    with pytest.raises(DataError, match=r"amorlip data csv --out DIR"):
        build_train_stream(DataConfig(source="csv", train_path=str(tmp_path / "nope.csv")), 8, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"amorlip data wds --out DIR"):
        build_train_stream(DataConfig(source="wds", train_path=str(tmp_path / "empty")), 8, seed=0)
