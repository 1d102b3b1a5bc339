"""The data-source registry: one entry per `data.source NAME`, the only place that names a source outside its own
module. Torch-free: config validation, `--help` and the `eval --data` choices read it without importing torch;
the builders are imported on first use.

An entry names:

* `train`: "module:function" building the training stream, called as
  `function(cfg, batch_size, seed, rank, world_size, pin_memory=..., needs_indices=...)` with `cfg` the run's
  `DataConfig` and `batch_size` the global batch; it returns a `TrainStream` (`amorlip.data.types`);
* `held_out`: "module:function" giving the source's own evaluation sets, `function(cfg, seed)` ->
  `(zero-shot tasks, retrieval split)`, or None when it has none (the user's files: `data.val_path` and
  `eval.imagenet_root` are the only evaluation data then);
* `map_style`: samples are read by index (a seeded permutation per epoch; the worker count never changes the
  batches) rather than streamed from shards;
* `reads_train_path`: it reads `data.train_path` (required then, refused otherwise);
* `drops_samples`: unreadable samples are dropped, so ranks may get batches of different sizes (trimmed to the
  smallest with several processes);
* `open_clip_name`: open_clip's `--dataset-type` value for it where that is another name (accepted as an alias);
* `path_patterns`: regular expressions of the data.train_path values it reads, by which `--data.source auto`
  (open_clip's `--dataset-type auto`) and a bare `--train-data PATH` pick it; `reads_directories`: a folder
  path means it too;
* `epoch_size_keys`, `full_size`: the samples in one epoch without reading the data: the first of these
  `DataConfig` keys that is set, else `full_size` (None: known only once the data is read), as
  `train --print-config` reports the steps that `train.epochs` gives.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class DataSource:
    """One registered data source (see the module docstring)."""

    name: str
    train: str
    held_out: str | None
    map_style: bool
    reads_train_path: bool
    drops_samples: bool
    open_clip_name: str | None = None
    path_patterns: tuple[str, ...] = ()
    reads_directories: bool = False
    epoch_size_keys: tuple[str, ...] = ("dataset_size",)
    full_size: int | None = None

    def epoch_size(self, cfg: Any) -> int | None:
        """Samples per epoch from the `DataConfig` alone (`epoch_size_keys`, `full_size`), or None."""
        return next((getattr(cfg, k) for k in self.epoch_size_keys if getattr(cfg, k) is not None), self.full_size)

    def train_builder(self) -> Callable[..., Any]:
        """The training-stream builder (imports its module)."""
        return _resolve(self.train)

    def held_out_builder(self) -> Callable[..., Any] | None:
        """The builder of its own evaluation sets, or None."""
        return None if self.held_out is None else _resolve(self.held_out)


def _resolve(path: str) -> Callable[..., Any]:
    """"module:attr.attr" -> the object."""
    module_name, attrs = path.split(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


SOURCES: dict[str, DataSource] = {s.name: s for s in (
    DataSource("synthetic", "amorlip.data.synthetic:train_stream", "amorlip.data.synthetic:synthetic_eval_data",
               map_style=True, reads_train_path=False, drops_samples=False,
               epoch_size_keys=("dataset_size", "synthetic_size")),
    DataSource("csv", "amorlip.data.csvdata:train_stream", None,
               map_style=True, reads_train_path=True, drops_samples=True,
               path_patterns=(r"\.(csv|tsv)$",)),
    DataSource("wds", "amorlip.data.wds:WdsStream.from_config", None,
               map_style=False, reads_train_path=True, drops_samples=True, open_clip_name="webdataset",
               path_patterns=(r"\.tar($|::)", r"^pipe:", r"\{.*\}", r"::"), reads_directories=True,
               epoch_size_keys=("train_num_samples", "dataset_size")),
    DataSource("fashion-mnist", "amorlip.data.fashion_mnist:train_stream",
               "amorlip.data.fashion_mnist:fashion_mnist_eval_data",
               map_style=True, reads_train_path=False, drops_samples=False, full_size=60000),
)}
"""Source name -> entry."""

SourceName = Literal[tuple(SOURCES)]  # type: ignore[valid-type]  # Literal["synthetic", "csv", ...], built here
"""The `data.source` names, in registry order: the config field's type (its `--help` choices and checks)."""

DEFAULT_SOURCE = next(iter(SOURCES))
"""The first entry (the embedded synthetic data): the default `data.source`, and what an export without a run
config is evaluated on."""

HELD_OUT = tuple(name for name, s in SOURCES.items() if s.held_out is not None)
"""The sources with evaluation sets of their own (`amorlip eval --data NAME`)."""


OPEN_CLIP_SOURCE_NAMES: dict[str, str] = {
    s.open_clip_name: s.name for s in SOURCES.values() if s.open_clip_name}
"""open_clip's `--dataset-type` values that name one of our sources by another name."""


def source_for_path(path: str) -> str | None:
    """The source whose `path_patterns` match data.train_path `path` (a folder: the one that reads folders), or
    None when the name tells nothing (`--data.source auto`, open_clip's `--dataset-type auto`)."""
    for source in SOURCES.values():
        if any(re.search(p, path, flags=re.IGNORECASE) for p in source.path_patterns):
            return source.name
    if Path(path).expanduser().is_dir():
        return next((s.name for s in SOURCES.values() if s.reads_directories), None)
    return None
