"""webdataset tar shards as a training stream (`WdsStream`).

Shards hold samples `KEY.{jpg,jpeg,png,webp}` + `KEY.txt` (caption) (+ `KEY.json`). `data.train_path` is
a brace pattern (`shards/{00000..00009}.tar`), several patterns joined with `::`, or a directory (all its
`*.tar`). A sample's index is the json's `"index"` key, else a numeric `__key__` (e.g. `00001234`).
Objectives with per-sample state (`needs_indices`: SogCLR, FastCLIP) need it on every sample, in
[0, dataset_size); for the others a sample without one gets a running id (unique within the epoch).
`dataset_size` (distinct samples, the index range) is `data.dataset_size`, else the sum over the shards of a
`sizes.json` next to them (open_clip's convention: `{"shard-00000.tar": 1000, ...}`), else (objectives
without indices) `data.train_num_samples`. An epoch is `data.train_num_samples` samples when given (open_clip's
`--train-num-samples`, with `--data.resampled true` its `--dataset-resampled`), else `dataset_size`.

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
  decoding). A shard that cannot be read to its end (truncated, zero-byte, not a tar) is counted per shard
  in `stream.stats` with its url and the samples it lost (its sizes.json count minus those read), and
  reading goes on with the next shard. A worker whose shards give no sample at all, and the checks of
  `loader._GuardedStream` (too many unusable samples or batches), raise a `DataError`.

Mid-epoch resume (`iterate(epoch, skip_batches, ...)`): the pipeline is rebuilt with the same seeds, each
worker discards the raw samples of its batches before `skip_batches` (read, never decoded), and the
workers' roles are rotated so the first batch comes out first. The resumed batches are then exactly those
of the uninterrupted run, provided the shards, `world_size`, `data.workers`, batch size and seed are the
same (the split of shards over workers and the shuffle seeds depend on them). Skipping costs reading the
skipped samples once.

Reading and decoding the shards (the shard list, sizes.json, a sample's index, image and caption) is
`amorlip.data.wds_shards`; this module is the stream over them.
"""
from __future__ import annotations

import random
import warnings
from itertools import count, islice
from typing import Any, Callable, Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from amorlip.batching import split_batch
from amorlip.data.samples import (
    OK,
    Collate,
    _GuardedStream,
    _identity,
    loader_items,
    mix_seed,
    prepare_sample,
    preserved_rng,
    sample_seeds,
)
from amorlip.data.types import Batch, DataError
from amorlip.data.wds_shards import (
    IMAGE_EXTS,
    ShardReader,
    check_first_sample,
    dataset_size_from_sizes_json,
    decode_sample,
    expand_shards,
    sample_ref,
    shard_sizes,
)
from amorlip.signals import ignore_in_worker

_TAG_SHARDS, _TAG_SHUFFLE, _TAG_RESAMPLE, _TAG_LOADER = 11, 12, 13, 14


def _buffer_shuffle(src: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle stage with our own seeded generator."""
    return wds.shuffle(bufsize=bufsize, initial=bufsize, rng=rng)(src)


class _WdsEpoch(IterableDataset):
    """One epoch of one rank; each DataLoader worker makes its share of the batches (see module doc).

    Yields (batch | None, counts) as `Collate` does, counts also carrying 'shards' (the unreadable-shard
    events since the last batch); when the worker cannot go on, one last (None, {'error': message}).
    """

    def __init__(self, stream: "WdsStream", epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable):
        self.s, self.epoch, self.skip = stream, epoch, skip_batches
        self.transform, self.collate = transform, Collate(tokenizer)

    def _my_urls(self, w: int, n_workers: int) -> list[str]:
        s = self.s
        urls = list(s.urls)
        random.Random(mix_seed(s.seed, self.epoch, _TAG_SHARDS)).shuffle(urls)
        return urls[s.rank :: s.world_size][w::n_workers]

    def _shards(self, w: int, n_workers: int) -> Iterator[dict[str, str]]:
        s = self.s
        if s.resampled:
            rng = random.Random(mix_seed(s.seed, self.epoch, s.rank, w, _TAG_RESAMPLE))
            while True:
                yield {"url": s.urls[rng.randrange(len(s.urls))]}
        mine = self._my_urls(w, n_workers)
        for _ in count():
            for u in mine:
                yield {"url": u}

    def _resampled_read(self, shards: Iterator[dict[str, str]], reader: ShardReader) -> Iterator[dict[str, Any]]:
        """The drawn shards' samples; ends when `s.max_dry_draws` drawn shards in a row gave no sample."""
        dry = 0
        for shard in shards:
            n = 0
            for sample in reader.read(shard["url"]):
                n += 1
                yield sample
            dry = 0 if n else dry + 1
            if dry >= self.s.max_dry_draws:
                return

    def _samples(self, w: int, n_workers: int, rng: random.Random, reader: ShardReader) -> Iterator[dict[str, Any]]:
        """This worker's raw samples through the seeded shuffle buffer.

        Non-resampled: one pass over the worker's shards; only when the consumer wants more than a pass
        holds is the pass repeated (a new, drained shuffle buffer each pass). A pass without any sample
        ends the stream.
        """
        s = self.s
        shards = self._shards(w, n_workers)
        if s.resampled:
            yield from _buffer_shuffle(self._resampled_read(shards, reader), s.shuffle_buffer, rng)
            return
        n_shards = len(self._my_urls(w, n_workers))
        for p in count():
            if p == 1:
                warnings.warn(
                    f"webdataset rank {s.rank} worker {w}: its shards ran out before its share of epoch "
                    f"{self.epoch}; starting over on them (use equal-size shards, at least world_size x workers)"
                )
            n = 0
            for sample in _buffer_shuffle(reader.read_all(islice(shards, n_shards)), s.shuffle_buffer, rng):
                n += 1
                yield sample
            if n == 0:
                return

    def _dry_message(self, w: int, n_workers: int) -> str:
        s = self.s
        where = f"webdataset rank {s.rank} worker {w} of {n_workers}"
        if s.resampled:
            return f"{where}: the last {s.max_dry_draws} shards it drew gave no readable sample in epoch {self.epoch}"
        mine = self._my_urls(w, n_workers)
        more = f" and {len(mine) - 3} more" if len(mine) > 3 else ""
        return (f"{where}: its shards ({', '.join(mine[:3])}{more}) gave no readable sample in epoch {self.epoch}, "
                f"so it cannot make its share of the batches")

    def __iter__(self) -> Iterator[tuple[Batch | None, dict[str, Any]]]:
        s = self.s
        info = get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (physical + self.skip) % n_workers  # role rotation: the first batch after the skip comes first
        quota = len(range(w, s.steps_per_epoch, n_workers)) - len(range(w, self.skip, n_workers))
        if quota <= 0:
            return
        skipped = len(range(w, self.skip, n_workers))
        rng = random.Random(mix_seed(s.seed, self.epoch, s.rank, w, _TAG_SHUFFLE))
        reader = ShardReader(s.shard_sizes)
        b = s.local_batch_size
        # running ids for samples without index: unique within the epoch over ranks and workers, and the
        # same after a resume (k counts this role's raw samples from the epoch's start)
        stride, offset = s.world_size * n_workers, s.rank * n_workers + w
        stream = enumerate(self._samples(w, n_workers, rng, reader))
        try:
            if skipped:  # the batches before the resume point: read, never decoded, counted before the resume
                for _ in islice(stream, skipped * b):
                    pass
                reader.take()
            for _ in range(quota):
                raw = list(islice(stream, b))
                if len(raw) < b:
                    yield None, {"error": self._dry_message(w, n_workers), "hint": True, "shards": reader.take()}
                    return
                decoded = [decode_sample(sample, s.dataset_size, s.needs_indices, k * stride + offset)
                           for k, sample in raw]
                seeds = sample_seeds(s.seed, self.epoch, [index for _, _, index in decoded])
                with preserved_rng():
                    prepared = [prepare_sample(image, caption, index, self.transform, seed)
                                for (image, caption, index), seed in zip(decoded, seeds)]
                for item, (_, sample) in zip(prepared, raw):
                    if item["status"] != OK:
                        item["ref"] = sample_ref(sample)
                batch, counts = self.collate(prepared)
                counts["shards"] = reader.take()
                yield batch, counts
        except DataError as e:  # raised in the main process (a worker's traceback would bury the message)
            yield None, {"error": str(e), "shards": reader.take()}


class WdsStream(_GuardedStream):
    """`TrainStream` over webdataset shards (see the module docstring for order, resume and limits).

    `dataset_size`: distinct samples (the index range when `needs_indices`); `train_num_samples`: samples
    per epoch (default dataset_size); `shard_sizes`: url -> sample count (sizes.json), to count the samples
    an unreadable shard loses.
    """

    def __init__(self, urls: list[str], dataset_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, resampled: bool = False, shuffle_buffer: int = 1000,
                 pin_memory: bool = False, *, needs_indices: bool = True, train_num_samples: int | None = None,
                 shard_sizes: dict[str, int] | None = None, max_empty_batches: int | None = None,
                 max_skip_fraction: float | None = None):
        self.local_batch_size = split_batch(batch_size, world_size, error=DataError)
        if not urls:
            raise DataError("the webdataset shard list is empty; check --data.train-path")
        if not dataset_size or dataset_size < 1:
            raise DataError(f"dataset_size must be positive, got {dataset_size}")
        if train_num_samples is not None and train_num_samples < 1:
            raise DataError(f"data.train_num_samples must be positive, got {train_num_samples}")
        n_workers = max(1, workers)
        if not resampled and len(urls) < world_size * n_workers:
            raise DataError(
                f"{len(urls)} shards cannot be split over {world_size} processes x {n_workers} workers; "
                f"use at least {world_size * n_workers} shards, fewer --data.workers, or --data.resampled true"
            )
        self.urls, self.dataset_size, self.batch_size, self.seed = list(urls), int(dataset_size), batch_size, seed
        self.rank, self.world_size, self.workers, self.resampled = rank, world_size, max(0, workers), resampled
        self.shuffle_buffer, self.pin_memory = max(1, shuffle_buffer), pin_memory
        self.needs_indices = bool(needs_indices)
        self.train_num_samples = int(train_num_samples) if train_num_samples else None
        self.shard_sizes = dict(shard_sizes or {})
        self.max_dry_draws = max(50, 3 * len(self.urls))  # resampled: shards in a row without a sample
        self.name = "webdataset"
        per_epoch = self.train_num_samples or self.dataset_size
        self.steps_per_epoch = per_epoch // batch_size
        if self.steps_per_epoch < 1:
            raise DataError(
                f"webdataset: {per_epoch} samples per epoch is less than one global batch of {batch_size}; "
                f"lower --train.batch-size or use more data"
            )
        self._init_checks(max_empty_batches, max_skip_fraction, self.steps_per_epoch * self.local_batch_size)

    @classmethod
    def from_config(cls, cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    pin_memory: bool = False, needs_indices: bool = True) -> "WdsStream":
        urls = expand_shards(cfg.train_path)
        per_epoch = getattr(cfg, "train_num_samples", None)
        size = cfg.dataset_size
        if not size:
            try:
                size = dataset_size_from_sizes_json(urls)
            except DataError as e:
                if needs_indices:
                    why = (" (the objective keeps per-sample state: it needs the range of the samples' indices)"
                           if per_epoch else "")
                    raise DataError(f"{e}{why}") from None
                if not per_epoch:
                    raise DataError(f"{e}; or give the samples per epoch with --data.train-num-samples N") from None
                size = per_epoch
        check_first_sample(urls[0], needs_indices)
        return cls(urls, size, batch_size, seed, rank, world_size, workers=int(cfg.workers or 0),
                   resampled=bool(cfg.resampled), shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 1000)),
                   pin_memory=pin_memory, needs_indices=needs_indices, train_num_samples=per_epoch,
                   shard_sizes=shard_sizes(urls), max_empty_batches=getattr(cfg, "max_empty_batches", None),
                   max_skip_fraction=getattr(cfg, "max_skip_fraction", None))

    def _hint(self) -> str:
        st, fixes = self.stats, []
        if st.unreadable_shards:
            fixes.append("re-create the unreadable shards named above or drop them from --data.train-path (a "
                         "worker whose shards are all unreadable cannot make its batches: keep at least "
                         "world_size x workers readable shards, or use --data.resampled true)")
        if st.skipped_no_caption:
            fixes.append("every sample needs a non-empty caption KEY.txt next to its image")
        if st.skipped_corrupt:
            fixes.append(f"every sample needs a decodable image KEY.{{{','.join(IMAGE_EXTS)}}}")
        return "; ".join(fixes) or "check the shards"

    def _loader(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> DataLoader:
        import torch

        return DataLoader(
            _WdsEpoch(self, epoch, skip_batches, transform, tokenizer),
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            worker_init_fn=ignore_in_worker,  # stop signals are the main process's to handle
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_LOADER)),
        )

    def _look_back(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> Batch | None:
        """The last usable batch before position `skip_batches` (at most max_empty_batches back), not counted."""
        start = max(0, skip_batches - self.max_empty_batches)
        last = None
        with loader_items(self._loader(epoch, start, transform, tokenizer)) as items:
            for _, (batch, counts) in zip(range(skip_batches - start), items):
                if counts.get("error"):
                    return None
                if batch is not None:
                    last = batch
        return last

    def iterate(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> Iterator[Batch]:
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        if skip_batches >= self.steps_per_epoch:
            return
        with loader_items(self._loader(epoch, skip_batches, transform, tokenizer)) as items:
            yield from self._guarded(items, epoch, self.steps_per_epoch - skip_batches,
                                     lambda: self._look_back(epoch, skip_batches, transform, tokenizer))
