"""webdataset tar shards as a training stream (`WdsStream`).

Shards hold samples `KEY.{jpg,jpeg,png,webp}` + `KEY.txt` (caption) (+ `KEY.json`). `data.train_path` is
a brace pattern (`shards/{00000..00009}.tar`), several patterns joined with `::`, or a directory (all its
`*.tar`). Each sample needs a stable integer index in [0, dataset_size): the json's `"index"` key, else a
numeric `__key__` (e.g. `00001234`). `dataset_size` is `data.dataset_size`, else the sum over the shards
of a `sizes.json` next to them (open_clip's convention: `{"shard-00000.tar": 1000, ...}`).

Epoch structure (rank r of R, W = max(1, data.workers) loader workers, local batch b, S steps per epoch):
* non-resampled: the shard list is shuffled with (seed, epoch) and split by node (`shards[r::R]`), then by
  worker. Within a worker, samples pass a shuffle buffer seeded with (seed, epoch, r, worker) and are cut
  into batches of b. Worker w makes the batches j = w, w+W, ... of the epoch, which the DataLoader returns
  in order, so every rank yields exactly S batches (a worker whose shards run out before its share starts
  over on them; keep shards of equal size and at least R*W of them to see every sample once per epoch).
* resampled (`data.resampled`): each (rank, worker) draws shards with replacement from a generator
  seeded with (seed, epoch, r, worker): an infinite stream cut at S batches per epoch.
* a sample whose image is missing or cannot be decoded, or whose caption is missing or empty, is dropped
  and counted in `stream.stats`; its batch is then smaller (the batch boundaries are fixed before
  decoding). A broken tar member is skipped with a warning (webdataset's `warn_and_continue`).

Mid-epoch resume (`iterate(epoch, skip_batches, ...)`): the pipeline is rebuilt with the same seeds, each
worker discards the raw samples of its batches before `skip_batches` (read, never decoded), and the
workers' roles are rotated so the first batch comes out first. The resumed batches are then exactly those
of the uninterrupted run, provided the shards, `world_size`, `data.workers`, batch size and seed are the
same (the split of shards over workers and the shuffle seeds depend on them). Skipping costs reading the
skipped samples once.
"""
from __future__ import annotations

import io
import json
import random
import warnings
from itertools import count, islice
from pathlib import Path
from typing import Any, Callable, Iterator

import braceexpand
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from amorlip.data.loader import (
    Collate,
    _identity,
    check_batch_size,
    mix_seed,
    prepare_sample,
    preserved_rng,
    sample_seeds,
    update_stats,
)
from amorlip.data.types import Batch, DataError, DataStats

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TAG_SHARDS, _TAG_SHUFFLE, _TAG_RESAMPLE, _TAG_LOADER = 11, 12, 13, 14


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(train_path: str) -> list[str]:
    """Shard URLs of `train_path`: brace patterns joined with `::`, or directories (their *.tar).

    Local shards must exist; an empty result is an error.
    """
    if not train_path:
        raise DataError("data.source=wds needs --data.train-path: a shard pattern like 'shards/{00000..00009}.tar' or a folder")
    urls: list[str] = []
    for part in train_path.split("::"):
        part = part.strip()
        if not part:
            continue
        if not _is_remote(part) and Path(part).expanduser().is_dir():
            found = sorted(str(p) for p in Path(part).expanduser().glob("*.tar"))
            if not found:
                raise DataError(f"folder {part!r} has no .tar shards; write some with `amorlip data wds` or point elsewhere")
            urls.extend(found)
        else:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise DataError(f"data.train_path={train_path!r} names no shards; give a pattern like 'shards/{{00000..00009}}.tar'")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).expanduser().is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(
            f"{len(missing)} of {len(urls)} shards do not exist: {', '.join(missing[:3])}{more}; "
            f"check --data.train-path (brace ranges like {{00000..00009}} must match the files)"
        )
    return [str(Path(u).expanduser()) if not _is_remote(u) else u for u in urls]


def dataset_size_from_sizes_json(urls: list[str]) -> int:
    """Sum of the shards' sample counts from `sizes.json` files next to them (open_clip's convention)."""
    tables: dict[Path, dict[str, int]] = {}
    total = 0
    for url in urls:
        if _is_remote(url):
            raise DataError(f"cannot read sizes.json for remote shard {url}; pass --data.dataset-size N")
        folder = Path(url).parent
        if folder not in tables:
            f = folder / "sizes.json"
            if not f.is_file():
                raise DataError(
                    f"the number of samples is unknown: no {f}; pass --data.dataset-size N or write a sizes.json "
                    f"mapping each shard's file name to its sample count"
                )
            try:
                tables[folder] = {str(k): int(v) for k, v in json.loads(f.read_text()).items()}
            except (ValueError, AttributeError, TypeError) as e:
                raise DataError(f"{f} is not a JSON object of shard name -> count ({e}); fix it or pass --data.dataset-size N") from None
        name = Path(url).name
        if name not in tables[folder]:
            raise DataError(f"{folder / 'sizes.json'} has no entry for {name}; add it or pass --data.dataset-size N")
        total += tables[folder][name]
    return total


def sample_index(sample: dict[str, Any]) -> int | None:
    """The stable index of a raw sample: json "index", else a numeric key; None when neither exists."""
    raw = sample.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw)
            if isinstance(meta, dict) and "index" in meta:
                return int(meta["index"])
        except (ValueError, TypeError):
            pass
    key = str(sample.get("__key__", "")).rsplit("/", 1)[-1]
    return int(key) if key.isdigit() else None


_INDEX_HELP = (
    "each webdataset sample needs a stable integer index in [0, dataset_size): store it as "
    '"index" in the sample\'s .json (e.g. {"index": 17}) or name the sample with a number (key 00000017); '
    "amorlip.data.writers.write_synthetic_wds shows the layout"
)


def check_first_sample(url: str) -> None:
    """Read the first sample of a local shard and check that it carries an index (fails early and clearly)."""
    if _is_remote(url):
        return
    try:
        first = next(iter(wds.tarfile_samples(iter([{"url": url}]))), None)
    except Exception as e:  # a truncated or non-tar file
        raise DataError(f"cannot read shard {url} as a tar archive ({e}); re-create it") from None
    if first is None:
        raise DataError(f"shard {url} holds no samples; remove it from --data.train-path")
    if sample_index(first) is None:
        raise DataError(f"shard {url}: sample {first.get('__key__')!r} has no index; {_INDEX_HELP}")


def decode_sample(sample: dict[str, Any], dataset_size: int) -> tuple[Image.Image | None, str | None, int]:
    """(image or None if missing/undecodable, caption or None, index) of a raw tar sample."""
    index = sample_index(sample)
    if index is None:
        raise DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has no index; {_INDEX_HELP}")
    if not 0 <= index < dataset_size:
        raise DataError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has index {index}, outside "
            f"[0, {dataset_size}); fix the indices or --data.dataset-size / sizes.json"
        )
    caption = None
    if sample.get("txt") is not None:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            caption = None
    image = None
    for ext in IMAGE_EXTS:
        if sample.get(ext) is not None:
            try:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                image = None
            break
    return image, caption, index


def _buffer_shuffle(src: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle stage with our own seeded generator."""
    return wds.shuffle(bufsize=bufsize, initial=bufsize, rng=rng)(src)


class _WdsEpoch(IterableDataset):
    """One epoch of one rank; each DataLoader worker makes its share of the batches (see module doc)."""

    def __init__(self, stream: "WdsStream", epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable):
        self.s, self.epoch, self.skip = stream, epoch, skip_batches
        self.transform, self.collate = transform, Collate(tokenizer)

    def _shards(self, w: int, n_workers: int) -> Iterator[dict[str, str]]:
        s = self.s
        if s.resampled:
            rng = random.Random(mix_seed(s.seed, self.epoch, s.rank, w, _TAG_RESAMPLE))
            while True:
                yield {"url": s.urls[rng.randrange(len(s.urls))]}
        urls = list(s.urls)
        random.Random(mix_seed(s.seed, self.epoch, _TAG_SHARDS)).shuffle(urls)
        mine = urls[s.rank :: s.world_size][w::n_workers]
        for _ in count():
            for u in mine:
                yield {"url": u}

    def _samples(self, w: int, n_workers: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """This worker's raw samples through the seeded shuffle buffer.

        Non-resampled: one pass over the worker's shards; only when the consumer wants more than a pass
        holds is the pass repeated (a new, drained shuffle buffer each pass).
        """
        s = self.s
        shards = self._shards(w, n_workers)
        read = wds.tarfile_to_samples(handler=wds.warn_and_continue)
        if s.resampled:
            yield from _buffer_shuffle(read(shards), s.shuffle_buffer, rng)
            return
        n_shards = len(s.urls[s.rank :: s.world_size][w::n_workers])
        for p in count():
            if p == 1:
                warnings.warn(
                    f"webdataset rank {s.rank} worker {w}: its shards ran out before its share of epoch "
                    f"{self.epoch}; starting over on them (use equal-size shards, at least world_size x workers)"
                )
            n = 0
            for sample in _buffer_shuffle(read(islice(shards, n_shards)), s.shuffle_buffer, rng):
                n += 1
                yield sample
            if n == 0:
                return

    def __iter__(self) -> Iterator[tuple[Batch | None, dict[str, int]]]:
        s = self.s
        info = get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (physical + self.skip) % n_workers  # role rotation: the first batch after the skip comes first
        quota = len(range(w, s.steps_per_epoch, n_workers)) - len(range(w, self.skip, n_workers))
        if quota <= 0:
            return
        skipped = len(range(w, self.skip, n_workers))
        rng = random.Random(mix_seed(s.seed, self.epoch, s.rank, w, _TAG_SHUFFLE))
        stream = islice(self._samples(w, n_workers, rng), skipped * s.local_batch_size, None)
        b = s.local_batch_size
        for _ in range(quota):
            raw = list(islice(stream, b))
            if len(raw) < b:
                return
            decoded = [decode_sample(sample, s.dataset_size) for sample in raw]
            seeds = sample_seeds(s.seed, self.epoch, [index for _, _, index in decoded])
            with preserved_rng():
                prepared = [prepare_sample(image, caption, index, self.transform, seed)
                            for (image, caption, index), seed in zip(decoded, seeds)]
            yield self.collate(prepared)


class WdsStream:
    """`TrainStream` over webdataset shards (see the module docstring for order, resume and limits)."""

    def __init__(self, urls: list[str], dataset_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, resampled: bool = False, shuffle_buffer: int = 1000,
                 pin_memory: bool = False):
        self.local_batch_size = check_batch_size(batch_size, world_size)
        if not urls:
            raise DataError("the webdataset shard list is empty; check --data.train-path")
        if dataset_size < 1:
            raise DataError(f"dataset_size must be positive, got {dataset_size}")
        n_workers = max(1, workers)
        if not resampled and len(urls) < world_size * n_workers:
            raise DataError(
                f"{len(urls)} shards cannot be split over {world_size} processes x {n_workers} workers; "
                f"use at least {world_size * n_workers} shards, fewer --data.workers, or --data.resampled true"
            )
        self.urls, self.dataset_size, self.batch_size, self.seed = list(urls), int(dataset_size), batch_size, seed
        self.rank, self.world_size, self.workers, self.resampled = rank, world_size, max(0, workers), resampled
        self.shuffle_buffer, self.pin_memory = max(1, shuffle_buffer), pin_memory
        self.steps_per_epoch = self.dataset_size // batch_size
        if self.steps_per_epoch < 1:
            raise DataError(
                f"webdataset: {self.dataset_size} samples is less than one global batch of {batch_size}; "
                f"lower --train.batch-size or use more data"
            )
        self.stats = DataStats()

    @classmethod
    def from_config(cls, cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    pin_memory: bool = False) -> "WdsStream":
        urls = expand_shards(cfg.train_path)
        size = cfg.dataset_size if cfg.dataset_size else dataset_size_from_sizes_json(urls)
        check_first_sample(urls[0])
        return cls(urls, size, batch_size, seed, rank, world_size, workers=int(cfg.workers or 0),
                   resampled=bool(cfg.resampled), shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 1000)),
                   pin_memory=pin_memory)

    def iterate(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> Iterator[Batch]:
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        if skip_batches >= self.steps_per_epoch:
            return
        import torch

        loader = DataLoader(
            _WdsEpoch(self, epoch, skip_batches, transform, tokenizer),
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_LOADER)),
        )
        n = 0
        for batch, counts in loader:
            n += 1
            update_stats(self.stats, counts, empty=batch is None)
            if batch is None:
                warnings.warn(f"webdataset: a whole batch of epoch {epoch} was unusable and is skipped")
                continue
            yield batch
        if n < self.steps_per_epoch - skip_batches:
            warnings.warn(
                f"webdataset rank {self.rank}: epoch {epoch} ended after {n} of {self.steps_per_epoch - skip_batches} "
                f"batches (shards with no readable samples?)"
            )
