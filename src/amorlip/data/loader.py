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

from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from amorlip.data.types import Batch, DataError, RetrievalSplit, ZeroShotTask
from amorlip.data.samples import (  # noqa: F401 - re-exported: the names callers import from here
    OK,
    NO_CAPTION,
    CORRUPT,
    DEFAULT_MAX_EMPTY_BATCHES,
    DEFAULT_MAX_SKIP_FRACTION,
    SKIP_CHECK_MIN_SAMPLES,
    _TAG_PERM,
    _TAG_LOADER,
    mix_seed,
    sample_seed,
    sample_seeds,
    preserved_rng,
    seed_rng,
    loader_items,
    prepare_sample,
    Collate,
    _identity,
    update_stats,
    check_batch_size,
    check_limits,
    _GuardedStream,
)
from amorlip.signals import ignore_in_worker


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
        with loader_items(loader) as items:
            yield from self._guarded(items, epoch, len(batches),
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


def build_eval_data(cfg: Any, seed: int, source: str | None = None,
                    imagenet_root: str | None = None) -> tuple[list[ZeroShotTask], RetrievalSplit | None]:
    """Zero-shot tasks and retrieval split for evaluation; every error is raised here, before any model.

    `source` None (what training and `amorlip eval RUN` use): the held-out sets of `cfg.source` (synthetic: its
    4 attribute tasks + held-out scenes; fashion-mnist: the test-split task + composed test pairs; csv / wds:
    none), with the user's validation data on top: `cfg.val_path` (a CSV or webdataset shards) replaces the
    retrieval split (as split `val`) and `imagenet_root` (an ImageNet-style class folder, `eval.imagenet_root`)
    adds a zero-shot task (see amorlip.data.imagefolder). An explicit `source` gives only that source's held-out
    sets (csv / wds: none).
    """
    explicit = source is not None
    source = source or cfg.source
    tasks: list[ZeroShotTask] = []
    split: RetrievalSplit | None = None
    if source == "synthetic":
        tasks, split = synthetic_eval_data(cfg, seed)
    elif source == "fashion-mnist":
        from amorlip.data.fashion_mnist import fashion_mnist_retrieval_split, fashion_mnist_zeroshot_task

        tasks, split = ([fashion_mnist_zeroshot_task(cfg.fmnist_root, cfg.eval_size)],
                        fashion_mnist_retrieval_split(cfg.fmnist_root, cfg.val_size, seed))
    elif source not in ("csv", "wds"):
        raise DataError(f"unknown evaluation data {source!r}; choose synthetic or fashion-mnist")
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
