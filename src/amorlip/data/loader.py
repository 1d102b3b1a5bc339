"""Training streams (the `TrainStream` protocol) and evaluation data for every data source.

`build_train_stream(cfg, batch_size, seed, rank, world_size)` returns a stream whose
`iterate(epoch, skip_batches, transform, tokenizer)` yields this rank's slice of each GLOBAL batch as
`{'image': float (b,3,H,W), 'text': int64 (b,L), 'index': int64 (b,)}` with b = batch_size / world_size.

Determinism (exact mid-epoch resume):
* map-style sources (synthetic, csv, fashion-mnist): epoch `e` visits `torch.randperm(N)` drawn from a
  generator seeded with (seed, e); global batch j is positions [j*B, (j+1)*B) of it (drop_last) and rank
  r takes the r-th of its `world_size` equal slices. Skipping k batches starts at position k*B.
* augmentation: every sample's transform runs under the global torch (and Python `random`) RNG seeded
  with (seed, epoch, index) -- open_clip's RandomResizedCrop draws from the global torch RNG -- so a
  sample's pixels do not depend on the worker that made it, on the number of workers, or on what ran
  before; the caller's RNG states are restored after each batch.
* a sample without caption, or whose image cannot be read, is dropped in the collate function and
  counted in `stream.stats` (never a crash). That batch is then smaller than b.

Unusable data is an error, never a hang (`_GuardedStream`): `iterate` yields exactly one batch per batch due
(so the trainer's step stays the batch position and resume stays exact) or raises `DataError`:
* a batch left with no usable sample is replaced by the next usable batch of the epoch (the last one before
  it at the epoch's end), counted in `stats.extra['empty_batches']`; `data.max_empty_batches` such batches in
  a row, or an epoch without any usable batch, raise a DataError naming the first unusable items and the fix;
* once `SKIP_CHECK_MIN_SAMPLES` samples (or one epoch's worth) were read, more than `data.max_skip_fraction`
  of them unusable (every visit counted; lost samples of unreadable shards included) raises a DataError.
Healthy data is untouched by all this: same batches, same order.
"""
from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from amorlip.data.types import Batch, DataError, DataStats, RetrievalSplit, ZeroShotTask
from amorlip.signals import ignore_in_worker

OK, NO_CAPTION, CORRUPT = 0, 1, 2
DEFAULT_MAX_EMPTY_BATCHES = 20
DEFAULT_MAX_SKIP_FRACTION = 0.5
SKIP_CHECK_MIN_SAMPLES = 1000
"""The skip fraction is checked once this many samples (or one epoch of this rank, if fewer) were read."""
_TAG_PERM, _TAG_AUG, _TAG_LOADER = 1, 2, 3


# numpy's SeedSequence hash (numpy/random/bit_generator.pyx), written out for integer inputs: the same
# seeds as `np.random.SeedSequence(parts).generate_state(2)`, ~4x faster (it runs once per sample).
_MASK32, _XSHIFT = 0xFFFFFFFF, 16
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715


def _seed_words(parts: Sequence[int]) -> list[int]:
    """The 32-bit words numpy assembles from a sequence of non-negative integers (little-endian per integer)."""
    words: list[int] = []
    for n in parts:
        if n == 0:
            words.append(0)
        while n > 0:
            words.append(n & _MASK32)
            n >>= 32
    return words


def _seed_hash(words: list[Any]) -> Any:
    """SeedSequence's pool mixing and `generate_state(2)` folded into 63 bits. Each word is a Python int or a
    numpy uint64 array of 32-bit values (then every result is an array: one seed per element)."""
    words = list(words) + [0] * (4 - len(words))
    pool, h = [], _INIT_A  # hashmix of the first four words; its multiplier advances on every call
    for value in words[:4]:
        value = value ^ h
        h = (h * _MULT_A) & _MASK32
        value = (value * h) & _MASK32
        pool.append(value ^ (value >> _XSHIFT))
    # every pool word mixed into every other, then the words past the first four into each
    sources = [(i_src, None) for i_src in range(4)] + [(None, word) for word in words[4:]]
    for i_src, word in sources:
        for i_dst in range(4):
            if i_src == i_dst:
                continue
            value = (pool[i_src] if word is None else word) ^ h
            h = (h * _MULT_A) & _MASK32
            value = (value * h) & _MASK32
            value = value ^ (value >> _XSHIFT)
            mixed = (_MIX_MULT_L * pool[i_dst] - _MIX_MULT_R * value) & _MASK32
            pool[i_dst] = mixed ^ (mixed >> _XSHIFT)
    v0 = ((pool[0] ^ _INIT_B) * ((_INIT_B * _MULT_B) & _MASK32)) & _MASK32  # generate_state(2, uint32)
    h = (_INIT_B * _MULT_B * _MULT_B) & _MASK32
    v1 = ((pool[1] ^ ((_INIT_B * _MULT_B) & _MASK32)) * h) & _MASK32
    return ((v0 ^ (v0 >> _XSHIFT)) << 31) ^ (v1 ^ (v1 >> _XSHIFT))


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (numpy SeedSequence hashing, pool of 4 words)."""
    return int(_seed_hash(_seed_words([int(p) % (1 << 63) for p in parts])))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample `index` in `epoch`."""
    return mix_seed(seed, epoch, index, _TAG_AUG)


def sample_seeds(seed: int, epoch: int, indices: Sequence[int]) -> list[int]:
    """`[sample_seed(seed, epoch, i) for i in indices]`, hashed for the whole batch at once."""
    idx = np.asarray([int(i) for i in indices], dtype=np.int64)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= 1 << 32:  # not one 32-bit word each: one at a time
        return [sample_seed(seed, epoch, int(i)) for i in idx]
    words = _seed_words([int(seed) % (1 << 63), int(epoch) % (1 << 63)]) + [idx.astype(np.uint64)] + [_TAG_AUG]
    return _seed_hash(words).tolist()


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Give the global torch (CPU) and Python RNGs back their states after the block.

    Nothing to do in a data-loader worker: its global RNGs serve the loading alone, and every sample seeds
    them afresh (`seed_rng`). Only the CPU default generator is kept: data transforms run on the CPU.
    """
    if get_worker_info() is not None:
        yield
        return
    gen = torch.default_generator
    torch_state, py_state = gen.get_state(), random.getstate()
    try:
        yield
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


def seed_rng(seed: int) -> None:
    """Seed the global torch (CPU) and Python RNGs. Not torch.manual_seed: that would also (lazily) seed every
    accelerator, which costs milliseconds per call."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)


def prepare_sample(image: Any, caption: Any, index: int, transform: Callable, seed: int) -> dict[str, Any]:
    """Check a raw (image, caption) pair and transform the image under its own seeded RNG.

    Returns {'status': OK|NO_CAPTION|CORRUPT, 'index', and for OK: 'image' tensor, 'caption' str}.
    This reseeds the global RNGs: callers hold `preserved_rng()` around their batch.
    """
    if caption is None or not isinstance(caption, str) or not caption.strip():
        return {"status": NO_CAPTION, "index": index}
    if image is None:
        return {"status": CORRUPT, "index": index}
    seed_rng(seed)
    tensor = transform(image)
    return {"status": OK, "index": index, "image": tensor, "caption": caption.strip()}


class Collate:
    """Drop skipped samples, stack images, tokenize captions (tokenizer(list[str]) -> (b, L) tokens).

    Returns (batch or None when nothing is left, counts) with counts = {'seen': n, 'corrupt': [ids],
    'no_caption': [ids]}: a sample's id is its 'ref' (webdataset: 'url:key') else its index. The counts travel
    with the batch out of DataLoader workers and are added to `stream.stats` in the main process.
    """

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[dict[str, Any]]) -> tuple[Batch | None, dict[str, Any]]:
        good = [s for s in samples if s["status"] == OK]
        counts = {
            "seen": len(samples),
            "corrupt": [s.get("ref", s["index"]) for s in samples if s["status"] == CORRUPT],
            "no_caption": [s.get("ref", s["index"]) for s in samples if s["status"] == NO_CAPTION],
        }
        if not good:
            return None, counts
        batch = {
            "image": torch.stack([s["image"] for s in good]),
            "text": torch.as_tensor(self.tokenizer([s["caption"] for s in good])).long(),
            "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        }
        return batch, counts


def _identity(x: Any) -> Any:
    return x


def update_stats(stats: DataStats, counts: dict[str, Any], empty: bool) -> None:
    """Add a collate's counts to `stats` (see `DataStats.record`); `empty`: the batch had no usable sample."""
    stats.record(counts)
    if empty:
        stats.note_empty_batch()


def check_batch_size(batch_size: int, world_size: int) -> int:
    """The local batch size; a clear error when the global batch does not split evenly."""
    if world_size < 1 or batch_size < 1:
        raise DataError(f"batch_size ({batch_size}) and world_size ({world_size}) must be positive")
    if batch_size % world_size:
        raise DataError(
            f"global batch size {batch_size} is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size} for --train.batch-size"
        )
    return batch_size // world_size


def check_limits(max_empty_batches: Any, max_skip_fraction: Any) -> tuple[int, float]:
    """`data.max_empty_batches` (>= 1) and `data.max_skip_fraction` (in [0, 1]) checked; None: the defaults."""
    empty = DEFAULT_MAX_EMPTY_BATCHES if max_empty_batches is None else max_empty_batches
    frac = DEFAULT_MAX_SKIP_FRACTION if max_skip_fraction is None else max_skip_fraction
    if isinstance(empty, bool) or not isinstance(empty, int) or empty < 1:
        raise DataError(f"data.max_empty_batches={max_empty_batches!r} must be a whole number >= 1 "
                        f"(pass e.g. --data.max-empty-batches {DEFAULT_MAX_EMPTY_BATCHES})")
    try:
        frac = float(frac)
    except (TypeError, ValueError):
        frac = float("nan")
    if not 0.0 <= frac <= 1.0:
        raise DataError(f"data.max_skip_fraction={max_skip_fraction!r} must be in [0, 1] "
                        f"(pass e.g. --data.max-skip-fraction {DEFAULT_MAX_SKIP_FRACTION}; 1 disables the check)")
    return int(empty), frac


class _GuardedStream:
    """What every training stream shares: skip counters and the checks that turn unusable data into a
    `DataError` instead of an endless loop (see the module docstring)."""

    name: str
    stats: DataStats

    def _init_checks(self, max_empty_batches: Any, max_skip_fraction: Any, samples_per_epoch: int) -> None:
        self.max_empty_batches, self.max_skip_fraction = check_limits(max_empty_batches, max_skip_fraction)
        self.check_after = max(1, min(SKIP_CHECK_MIN_SAMPLES, int(samples_per_epoch)))
        self.stats = DataStats()

    def _item_name(self, kind: str, sample_id: Any) -> str:
        return str(sample_id)

    def _hint(self) -> str:
        return "check the data"

    def _unusable(self, what: str, fix: str = "") -> DataError:
        return DataError(f"{self.name}: {what}; {self.stats.describe()}. Fix: {self._hint()}{fix}")

    def _check_fraction(self) -> None:
        st, limit = self.stats, self.max_skip_fraction
        if limit < 1.0 and st.read >= self.check_after and st.skip_fraction > limit:
            raise self._unusable(
                f"{st.skipped_visits} of the {st.read} samples read ({st.skip_fraction:.0%}) are unusable, more "
                f"than data.max_skip_fraction={limit:g}",
                " (or raise --data.max-skip-fraction; 1 disables this check)" if st.skip_fraction < 1 else "")

    def _guarded(self, items: Iterator[tuple[Batch | None, dict[str, Any]]], epoch: int, due: int,
                 look_back: Callable[[], Batch | None]) -> Iterator[Batch]:
        """Yield exactly `due` batches from the loader's (batch | None, counts) items, or raise DataError.

        An item whose counts carry 'error' (a worker found its data unusable) raises at once.
        """
        pending, last, received, warned = 0, None, 0, False
        for batch, counts in items:
            self.stats.record(counts, self._item_name)
            if counts.get("error"):  # with 'hint': a data problem (counted); without: a message complete in itself
                if counts.get("hint"):
                    raise DataError(f"{counts['error']}; {self.stats.describe()}. Fix: {self._hint()}")
                raise DataError(str(counts["error"]))
            received += 1
            self._check_fraction()
            if batch is None:
                self.stats.note_empty_batch()
                pending += 1
                if pending >= self.max_empty_batches:
                    raise self._unusable(
                        f"{pending} batches in a row of epoch {epoch} held no usable sample "
                        f"(data.max_empty_batches={self.max_empty_batches})")
                if not warned:
                    warnings.warn(f"{self.name}: a whole batch of epoch {epoch} was unusable; the next usable batch "
                                  f"takes its place (stream.stats counts it)")
                    warned = True
                continue
            for _ in range(pending + 1):
                yield batch
            last, pending = batch, 0
        if received < due:
            raise self._unusable(f"epoch {epoch} ended after {received} of its {due} batches")
        if pending:
            if last is None:
                last = look_back()
            if last is None:
                raise self._unusable(f"epoch {epoch} gave no usable batch (of the {due} due)")
            for _ in range(pending):
                yield last


# ----------------------------------------------------------------------------------------------------
# Map-style sources
# ----------------------------------------------------------------------------------------------------


class _EpochSamples(Dataset):
    """View of a map-style (image, caption) dataset for one epoch: index -> prepared sample."""

    def __init__(self, base: Dataset, transform: Callable, seed: int, epoch: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch's samples (the DataLoader fetches whole batches through this): the seeds hashed at once
        and the caller's RNG states saved and restored once per batch, not per sample."""
        seeds = sample_seeds(self.seed, self.epoch, indices)
        with preserved_rng():
            return [self._prepare(int(index), seed) for index, seed in zip(indices, seeds)]

    def _prepare(self, index: int, seed: int) -> dict[str, Any]:
        try:
            image, caption = self.base[index]
        except (OSError, SyntaxError):  # an unreadable file (PIL raises these); anything else is a bug
            return {"status": CORRUPT, "index": index}
        return prepare_sample(image, caption, index, self.transform, seed)


class MapStream(_GuardedStream):
    """`TrainStream` over a map-style dataset whose items are `(PIL image | None, caption)`.

    Epoch order: a permutation from a torch.Generator seeded with (seed, epoch); drop_last; this rank
    takes slice `rank` of each global batch. Loading runs in a torch DataLoader with `workers` workers.
    The dataset may offer `describe(index, kind)` (a bad sample's name in messages) and
    `hint(corrupt_ids, no_caption_ids)` (the fix to suggest), as `CsvCaptions` does.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, name: str = "map", pin_memory: bool = False, *,
                 max_empty_batches: int | None = None, max_skip_fraction: float | None = None):
        self.local_batch_size = check_batch_size(batch_size, world_size)
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, {world_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.workers, self.name = rank, world_size, max(0, workers), name
        self.pin_memory = pin_memory
        self.dataset_size = len(dataset)
        self.steps_per_epoch = self.dataset_size // batch_size
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{name}: {self.dataset_size} samples is less than one global batch of {batch_size}; "
                f"lower --train.batch-size or use more data"
            )
        self._init_checks(max_empty_batches, max_skip_fraction, self.steps_per_epoch * self.local_batch_size)

    def _item_name(self, kind: str, sample_id: Any) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(int(sample_id), kind) if describe is not None else f"{self.name} sample {sample_id}"

    def _hint(self) -> str:
        hint = getattr(self.dataset, "hint", None)
        st = self.stats
        if hint is not None:
            return hint(sorted(st.bad_ids.get("corrupt", ()))[:20], sorted(st.bad_ids.get("no_caption", ()))[:20])
        return "check the images and captions of the samples named above"

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_PERM))
        return torch.randperm(self.dataset_size, generator=g)

    def global_batches(self, epoch: int) -> torch.Tensor:
        """(steps_per_epoch, batch_size) sample indices of every global batch of `epoch`."""
        perm = self.epoch_permutation(epoch)
        return perm[: self.steps_per_epoch * self.batch_size].view(self.steps_per_epoch, self.batch_size)

    def rank_batches(self, epoch: int, skip_batches: int = 0) -> list[list[int]]:
        """This rank's index lists for the batches of `epoch` after the first `skip_batches`."""
        b = self.local_batch_size
        local = self.global_batches(epoch)[skip_batches:, self.rank * b : (self.rank + 1) * b]
        return local.tolist()

    def _look_back(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> Batch | None:
        """The last usable batch before position `skip_batches` (at most max_empty_batches back), not counted:
        what an uninterrupted run used for the epoch's trailing unusable batches."""
        earlier = self.rank_batches(epoch)[max(0, skip_batches - self.max_empty_batches) : skip_batches]
        samples, collate = _EpochSamples(self.dataset, transform, self.seed, epoch), Collate(tokenizer)
        for indices in reversed(earlier):
            batch, _ = collate(samples.__getitems__(indices))
            if batch is not None:
                return batch
        return None

    def iterate(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> Iterator[Batch]:
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        batches = self.rank_batches(epoch, skip_batches)
        if not batches:
            return
        loader = DataLoader(
            _EpochSamples(self.dataset, transform, self.seed, epoch),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=Collate(tokenizer),
            pin_memory=self.pin_memory,
            worker_init_fn=ignore_in_worker,  # stop signals are the main process's to handle
            # a private generator: building the loader must not consume the caller's global RNG
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_LOADER)),
        )
        yield from self._guarded(iter(loader), epoch, len(batches),
                                 lambda: self._look_back(epoch, skip_batches, transform, tokenizer))


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------


def build_train_stream(cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False, needs_indices: bool = True):
    """The training stream of `cfg.source` (a `DataConfig`); every error is raised here, before any model.

    `batch_size` is the GLOBAL batch size; each rank receives `batch_size // world_size` samples per batch.
    `pin_memory` (set when training on CUDA): batches arrive in page-locked memory, so the copy to the GPU
    runs asynchronously (as open_clip's loaders do). `needs_indices` (the objective's `needs_indices`):
    whether every sample must carry a stable index in [0, dataset_size); without it webdataset samples
    that have none get running ids. Map-style sources always index by row.
    """
    check_batch_size(batch_size, world_size)
    source = cfg.source
    workers = int(getattr(cfg, "workers", 0) or 0)
    limits = {"max_empty_batches": getattr(cfg, "max_empty_batches", None),
              "max_skip_fraction": getattr(cfg, "max_skip_fraction", None)}
    check_limits(**limits)
    if source != "wds" and getattr(cfg, "train_num_samples", None):
        raise DataError(f"data.train_num_samples applies to data.source=wds only; for {source} an epoch is the "
                        f"whole dataset (limit it with --data.dataset-size)")
    if source == "synthetic":
        from amorlip.data.synthetic import SyntheticScenes

        size = cfg.dataset_size or cfg.synthetic_size
        dataset = SyntheticScenes(size, seed=seed, split="train", render_size=int(getattr(cfg, "synthetic_render_size", 64)))
        return MapStream(dataset, batch_size, seed, rank, world_size, workers, name="synthetic",
                         pin_memory=pin_memory, **limits)
    if source == "csv":
        from amorlip.data.csvdata import CsvCaptions

        if not cfg.train_path:
            raise DataError("data.source=csv needs --data.train-path pointing to a CSV file")
        dataset = CsvCaptions(cfg.train_path, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator,
                              limit=cfg.dataset_size)
        return MapStream(dataset, batch_size, seed, rank, world_size, workers, name=f"csv {cfg.train_path}",
                         pin_memory=pin_memory, **limits)
    if source == "fashion-mnist":
        from amorlip.data.fashion_mnist import FashionMNISTPairs

        dataset = FashionMNISTPairs(cfg.fmnist_root, seed=seed, size=cfg.dataset_size)
        return MapStream(dataset, batch_size, seed, rank, world_size, workers, name="fashion-mnist",
                         pin_memory=pin_memory, **limits)
    if source == "wds":
        from amorlip.data.wds import WdsStream

        return WdsStream.from_config(cfg, batch_size, seed, rank, world_size, pin_memory=pin_memory,
                                     needs_indices=needs_indices)
    raise DataError(f"unknown data.source {source!r}; choose synthetic, csv, wds or fashion-mnist")


def synthetic_eval_data(cfg: Any, seed: int) -> tuple[list[ZeroShotTask], RetrievalSplit]:
    """The synthetic attribute tasks and held-out retrieval split (usable whatever the training source)."""
    from amorlip.data.synthetic import synthetic_retrieval_split, synthetic_zeroshot_tasks

    render = int(getattr(cfg, "synthetic_render_size", 64))
    return (synthetic_zeroshot_tasks(cfg.eval_size, seed, render),
            synthetic_retrieval_split(cfg.val_size, seed, render))


def build_eval_data(cfg: Any, seed: int, source: str | None = None) -> tuple[list[ZeroShotTask], RetrievalSplit | None]:
    """Zero-shot tasks and retrieval split matching `source` (default `cfg.source`).

    synthetic: its 4 attribute tasks + held-out scenes; fashion-mnist: the test-split task + composed test
    pairs; csv / wds: nothing (there is no natural held-out set; pass source="synthetic" to get those).
    """
    source = source or cfg.source
    if source == "synthetic":
        return synthetic_eval_data(cfg, seed)
    if source == "fashion-mnist":
        from amorlip.data.fashion_mnist import fashion_mnist_retrieval_split, fashion_mnist_zeroshot_task

        return ([fashion_mnist_zeroshot_task(cfg.fmnist_root, cfg.eval_size)],
                fashion_mnist_retrieval_split(cfg.fmnist_root, cfg.val_size, seed))
    if source in ("csv", "wds"):
        return [], None
    raise DataError(f"unknown evaluation data {source!r}; choose synthetic or fashion-mnist")
