"""Training streams (the `TrainStream` protocol) and evaluation data for every data source, built by the source's
entry in the registry (`amorlip.data.sources`).

`build_train_stream(cfg, batch_size, seed, rank, world_size)` returns a stream whose
`iterate(epoch, skip_batches, transform, tokenizer)` yields this rank's slice of each GLOBAL batch as
`{'image': float (b,3,H,W), 'text': int64 (b,L), 'index': int64 (b,)}` with b = batch_size / world_size.

Determinism (exact mid-epoch resume):
* map-style sources (`amorlip.data.mapstyle`): epoch `e` visits `torch.randperm(N)` drawn from a
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

from typing import Any

from amorlip.batching import split_batch
from amorlip.data.samples import check_limits
from amorlip.data.sources import HELD_OUT, SOURCES
from amorlip.data.types import DataError, RetrievalSplit, TrainStream, ZeroShotTask
from amorlip.errors import one_of


def build_train_stream(cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False, needs_indices: bool = True) -> TrainStream:
    """The training stream of `cfg.source` (a `DataConfig`); every error is raised here, before any model.

    `batch_size` is the GLOBAL batch size; each rank receives `batch_size // world_size` samples per batch.
    `pin_memory` (set when training on CUDA): batches arrive in page-locked memory, so the copy to the GPU
    runs asynchronously (as open_clip's loaders do). `needs_indices` (the objective's `needs_indices`):
    whether every sample must carry a stable index in [0, dataset_size); without it webdataset samples
    that have none get running ids. Map-style sources always index by row.
    """
    split_batch(batch_size, world_size, error=DataError)
    check_limits(getattr(cfg, "max_empty_batches", None), getattr(cfg, "max_skip_fraction", None))
    source = SOURCES.get(cfg.source)
    if source is None:
        raise DataError(f"unknown data.source {cfg.source!r}; choose {one_of(list(SOURCES))}")
    if source.map_style and getattr(cfg, "train_num_samples", None):
        streamed = "/".join(name for name, s in SOURCES.items() if not s.map_style)
        raise DataError(f"data.train_num_samples applies to data.source={streamed} only; for {cfg.source} an epoch "
                        f"is the whole dataset (limit it with --data.dataset-size)")
    return source.train_builder()(cfg, batch_size, seed, rank, world_size, pin_memory=pin_memory,
                                  needs_indices=needs_indices)


def build_eval_data(cfg: Any, seed: int, source: str | None = None,
                    imagenet_root: str | None = None) -> tuple[list[ZeroShotTask], RetrievalSplit | None]:
    """Zero-shot tasks and retrieval split for evaluation; every error is raised here, before any model.

    `source` None (what training and `amorlip eval RUN` use): the held-out sets of `cfg.source` (its registry
    entry's `held_out`: synthetic, its 4 attribute tasks + held-out scenes; fashion-mnist, the test-split task +
    composed test pairs; csv / wds: none), with the user's validation data on top: `cfg.val_path` (a CSV or
    webdataset shards) replaces the retrieval split (as split `val`) and `imagenet_root` (an ImageNet-style class
    folder, `eval.imagenet_root`) adds a zero-shot task (see amorlip.data.imagefolder). An explicit `source` gives
    only that source's held-out sets (csv / wds: none).
    """
    explicit = source is not None
    source = source or cfg.source
    if source not in SOURCES:
        raise DataError(f"unknown evaluation data {source!r}; choose {one_of(HELD_OUT)}")
    held_out = SOURCES[source].held_out_builder()
    tasks, split = held_out(cfg, seed) if held_out is not None else ([], None)
    if explicit:
        return tasks, split
    from amorlip.data.imagefolder import imagenet_folder_task, val_pairs

    val_path = getattr(cfg, "val_path", None)
    if val_path:
        split = val_pairs(val_path, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
    if imagenet_root:
        folder = imagenet_folder_task(imagenet_root)
        if any(t.name == folder.name for t in tasks):
            folder.name = f"folder-{folder.name}"
        tasks = [*tasks, folder]
    return tasks, split
