"""What every training stream shares: per-sample seeds, the RNG discipline, sample preparation, collation,
skip counting and the guard that turns unusable data into a DataError (see amorlip.data.loader's docstring).

The lowest room of the data package: the map-style streams (mapstyle.py) and webdataset (wds.py) both build on
it, and neither imports the other at module level.
"""
from __future__ import annotations

import atexit
import random
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from amorlip.data.types import Batch, DataError, DataStats

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


_LIVE_LOADER_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()


@contextmanager
def loader_items(loader: Any) -> Iterator[Iterator[Any]]:
    """`iter(loader)`, whose worker processes are shut down when the block ends: by an error, a `break`, or
    the generator around it being closed, not when the garbage collector gets to it. A DataError's traceback
    keeps the iterator alive, and the workers ignore SIGTERM (`ignore_in_worker`), so without this a caught
    error left them running and the interpreter's exit (multiprocessing joins its children) waited forever."""
    items = iter(loader)
    if hasattr(items, "_shutdown_workers"):
        _LIVE_LOADER_ITERATORS.add(items)
    try:
        yield items
    finally:
        _shut_down(items)


def _shut_down(items: Any) -> None:
    shutdown = getattr(items, "_shutdown_workers", None)  # torch's own clean shutdown (idempotent)
    if shutdown is not None:
        shutdown()
        _LIVE_LOADER_ITERATORS.discard(items)


@atexit.register  # registered after multiprocessing's exit hook, so it runs before it
def _shut_down_all() -> None:
    for items in list(_LIVE_LOADER_ITERATORS):
        _shut_down(items)


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
