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
  smallest with several processes).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
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
               map_style=True, reads_train_path=False, drops_samples=False),
    DataSource("csv", "amorlip.data.csvdata:train_stream", None,
               map_style=True, reads_train_path=True, drops_samples=True),
    DataSource("wds", "amorlip.data.wds:WdsStream.from_config", None,
               map_style=False, reads_train_path=True, drops_samples=True),
    DataSource("fashion-mnist", "amorlip.data.fashion_mnist:train_stream",
               "amorlip.data.fashion_mnist:fashion_mnist_eval_data",
               map_style=True, reads_train_path=False, drops_samples=False),
)}
"""Source name -> entry."""

SourceName = Literal[tuple(SOURCES)]  # type: ignore[valid-type]  # Literal["synthetic", "csv", ...], built here
"""The `data.source` names, in registry order: the config field's type (its `--help` choices and checks)."""

DEFAULT_SOURCE = next(iter(SOURCES))
"""The first entry (the embedded synthetic data): the default `data.source`, and what an export without a run
config is evaluated on."""

HELD_OUT = tuple(name for name, s in SOURCES.items() if s.held_out is not None)
"""The sources with evaluation sets of their own (`amorlip eval --data NAME`)."""
