"""The map-style training stream (`MapStream`): a dataset read by index, for the synthetic, CSV and Fashion-MNIST
sources (`amorlip.data.sources`), and `map_stream`, which builds one from a `DataConfig`.

Epoch `e` visits `torch.randperm(N)` drawn from a generator seeded with (seed, e); global batch j is positions
[j*B, (j+1)*B) of it (drop_last) and rank r takes the r-th of its `world_size` equal slices. Skipping k batches
starts at position k*B. `amorlip.data.loader` describes the augmentation seeding and the unusable-data guards.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from amorlip.batching import split_batch
from amorlip.data.samples import (
    CORRUPT,
    _TAG_LOADER,
    _TAG_PERM,
    Collate,
    _GuardedStream,
    loader_items,
    mix_seed,
    prepare_sample,
    preserved_rng,
    sample_seeds,
)
from amorlip.data.types import Batch, DataError
from amorlip.signals import ignore_in_worker


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
        self.local_batch_size = split_batch(batch_size, world_size, error=DataError)
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


def map_stream(dataset: Dataset, cfg: Any, batch_size: int, seed: int, rank: int, world_size: int, name: str,
               pin_memory: bool = False) -> MapStream:
    """`MapStream` over `dataset` with the loader settings of `cfg` (a `DataConfig`: `workers`, and the
    unusable-data limits `max_empty_batches` / `max_skip_fraction`)."""
    return MapStream(dataset, batch_size, seed, rank, world_size, int(getattr(cfg, "workers", 0) or 0), name=name,
                     pin_memory=pin_memory, max_empty_batches=getattr(cfg, "max_empty_batches", None),
                     max_skip_fraction=getattr(cfg, "max_skip_fraction", None))
