"""Shared data types: what a data source hands to the trainer and to evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import Dataset

class DataError(ValueError):
    """A data source that cannot be used as configured; the message names the problem and the fix."""


Batch = dict[str, torch.Tensor]
"""{'image': float (B,3,H,W), 'text': int64 (B,L) tokens, 'index': int64 (B,) stable sample ids}."""


@dataclass
class ZeroShotTask:
    """A zero-shot classification task: class names, prompt templates and labelled images.

    `dataset[i]` returns `(PIL.Image, int label)`. Templates are format strings with one `{}` or
    callables `classname -> prompt` (open_clip's convention).
    """

    name: str
    classnames: list[str]
    templates: list[Any]
    dataset: Dataset


@dataclass
class RetrievalSplit:
    """Held-out image-caption pairs: `dataset[i]` returns `(PIL.Image, str caption)`."""

    name: str
    dataset: Dataset


@dataclass
class DataStats:
    """Counters a training stream keeps (logged; part of the checkpoint)."""

    skipped_corrupt: int = 0
    skipped_no_caption: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class TrainStream(Protocol):
    """What the trainer needs from a training data source.

    * `dataset_size`: number of distinct samples (indices are in [0, dataset_size)).
    * `steps_per_epoch`: optimizer steps in one epoch at the global batch size.
    * `iterate(epoch, skip_batches, transform, tokenizer)`: this rank's batches of `epoch`, starting after
      `skip_batches` batches (exact mid-epoch resume). Order and augmentation are a deterministic function
      of (seed, epoch, sample index), so a resumed run sees exactly what an uninterrupted run would.
    * `stats`: skip counters.
    """

    dataset_size: int
    steps_per_epoch: int
    stats: DataStats

    def iterate(
        self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable
    ) -> Iterator[Batch]: ...
