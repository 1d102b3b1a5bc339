"""Normalizer diagnostics of a training run: how well is each sample's log partition function estimated, on
pairs of the run's own data?

`normalizer_diagnostics` (amorlip.evaluate.log_normalizers: the references, the estimates compared and
their error statistics, defined there) computes it from features. `build_diagnostic_sets` (once, at set-up) and
`run_diagnostics` (at every evaluation) run it on two splits of a training run: `train`, a fixed subset of
the training pairs with their dataset indices (where the amortiser and the u buffers are meant to be
accurate), and `heldout`, pairs never trained on (the source's held-out pairs or data.val_path). Per-sample
objectives (`needs_indices`: SogCLR, FastCLIP) index their buffers by dataset index, which a held-out pair
does not have: their `heldout/objective` entries are absent.

The estimator functions of `amorlip.evaluate.log_normalizers` are re-exported here (`__all__`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from amorlip.data.samples import mix_seed, preserved_rng
from amorlip.data.types import RetrievalSplit
from amorlip.evaluate.log_normalizers import (
    error_stats,
    exact_log_normalizers,
    inbatch_log_normalizers,
    mean_log_partition,
    normalizer_diagnostics,
    reference_noise,
    reference_scale,
)
from amorlip.evaluate.retrieval import encode_split

if TYPE_CHECKING:
    from amorlip.config import Config

__all__ = [
    "normalizer_diagnostics",
    "exact_log_normalizers",
    "mean_log_partition",
    "error_stats",
    "reference_noise",
    "inbatch_log_normalizers",
    "reference_scale",
    "encode_split",
    "DiagnosticSets",
    "build_diagnostic_sets",
    "run_diagnostics",
    "SPLITS",
]

SPLITS = ("train", "heldout")
_TAG_DIAG = 21
"""Seed tag of the training subset's draw (data/samples.py and data/wds.py use 1-14)."""


# ----------------------------------------------------------------------------------------------------
# The two splits of a training run
# ----------------------------------------------------------------------------------------------------


class _Pairs(Dataset):
    """`ds[k] -> (PIL image, caption)` of chosen items of a map-style (image, caption) dataset."""

    def __init__(self, base: Dataset, items: Sequence[int]):
        self.base, self.items = base, [int(i) for i in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        image, caption = self.base[self.items[k]]
        return image, caption.strip()


class _RawWdsPairs(Dataset):
    """`ds[k] -> (PIL image, caption)` of raw webdataset samples kept in memory (their encoded bytes)."""

    def __init__(self, samples: list[dict[str, Any]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int):
        from amorlip.data.wds_shards import decode_sample

        image, caption, _ = decode_sample(self.samples[k], 1, needs_indices=False, running_id=k)
        return image, caption.strip()


def _usable(image: Any, caption: Any) -> bool:
    """What training keeps (data/samples.py `prepare_sample`): an image and a non-empty caption."""
    return image is not None and isinstance(caption, str) and bool(caption.strip())


def _map_subset(dataset: Dataset, n: int, seed: int) -> tuple[Dataset, torch.Tensor]:
    """n usable items of a map-style dataset, in a seeded random order of its own generator."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(mix_seed(seed, _TAG_DIAG)))
    chosen: list[int] = []
    for i in order.tolist():
        try:
            image, caption = dataset[i]
        except (OSError, SyntaxError):  # an unreadable file: training skips it too
            continue
        if _usable(image, caption):
            chosen.append(i)
            if len(chosen) == n:
                break
    return _Pairs(dataset, chosen), torch.tensor(chosen, dtype=torch.int64)


def _wds_subset(urls: Sequence[str], n: int, dataset_size: int, needs_indices: bool
                ) -> tuple[Dataset, torch.Tensor]:
    """The first n usable samples of the shards in their listed order, with their indices (running ids for
    samples without one when the objective needs none)."""
    from amorlip.data.wds_shards import ShardReader, decode_sample

    kept: list[dict[str, Any]] = []
    indices: list[int] = []
    seen = 0
    reader = ShardReader({})  # an unreadable shard is passed over, as training does
    for url in urls:
        for sample in reader.read(url):
            image, caption, index = decode_sample(sample, dataset_size, needs_indices, running_id=seen)
            seen += 1
            if _usable(image, caption):
                kept.append({k: v for k, v in sample.items() if not k.startswith("__") or k in ("__key__", "__url__")})
                indices.append(index)
                if len(kept) == n:
                    return _RawWdsPairs(kept), torch.tensor(indices, dtype=torch.int64)
    return _RawWdsPairs(kept), torch.tensor(indices, dtype=torch.int64)


def _heldout_subset(split: RetrievalSplit, n: int, seed: int) -> RetrievalSplit:
    """At most n pairs of a held-out split: a seeded random subset of a map-style one, the first n of a
    sequential (webdataset) one."""
    ds = split.dataset
    if isinstance(ds, IterableDataset):
        from amorlip.data.imagefolder import WdsPairs

        if isinstance(ds, WdsPairs):
            sub, _ = _wds_subset(ds.urls, n, 1, needs_indices=False)
            return RetrievalSplit(split.name, sub)
        raise TypeError(f"held-out split {split.name!r}: a sequential dataset other than WdsPairs")
    size = len(ds)  # type: ignore[arg-type]
    if size <= n:
        return split
    order = torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, _TAG_DIAG + 1)))[:n]
    return RetrievalSplit(split.name, _Pairs(ds, sorted(order.tolist())))


@dataclass
class DiagnosticSets:
    """The pairs the normalizer diagnostics run on, built once at set-up by `build_diagnostic_sets`.

    Raw (image, caption) pairs: the transform and tokenizer are applied at each call (the current RECLIP
    phase's). `train_indices` are the training pairs' dataset indices; `dataset_size` is the training set's N
    (the reference's convention); `batch_size` the GLOBAL training batch size (the in-batch B); `seed` seeds
    the random batches (the same every call).
    """

    train: RetrievalSplit | None
    train_indices: torch.Tensor | None
    heldout: RetrievalSplit | None
    dataset_size: int
    batch_size: int
    seed: int

    def describe(self) -> str:
        parts = [f"{name} {len(split.dataset)} pairs" for name, split in (("train", self.train), ("heldout", self.heldout))
                 if split is not None]
        return "normalizer diagnostics on " + (", ".join(parts) if parts else "no pairs")


def build_diagnostic_sets(cfg: "Config", stream: Any | None = None, size: int | None = None) -> DiagnosticSets:
    """The `train` and `heldout` pairs of the normalizer diagnostics of the run `cfg` (call once, at set-up).

    * train: `size` (default `cfg.eval.normalizer_size`) usable training pairs, the same at every call:
      map-style sources (synthetic, csv, fashion-mnist; `stream.dataset`) a seeded random subset of the rows;
      webdataset (`stream.urls`) the first usable samples of the shards in their listed order. With their
      dataset indices. Read straight from the dataset: the stream, its order and its skip counters are
      untouched. `stream`: the training stream (None: one is built from `cfg.data`, as `amorlip eval` does);
      a stream that is neither (e.g. `amorlip bench`'s pre-made batches) gives no train split.
    * heldout: `size` pairs of the source's held-out split or of `data.val_path` (a seeded random subset; the
      first ones of webdataset shards), built as `build_eval_data` builds the run's retrieval split; None for
      a csv / wds source without `data.val_path`.

    Consumes no global RNG (`preserved_rng`): building it before the model leaves the initialisation as it was.
    """
    from amorlip.data.loader import build_eval_data, build_train_stream

    n = int(size if size is not None else cfg.eval.normalizer_size)
    if n < 2:
        raise ValueError(f"the normalizer diagnostics need at least 2 pairs per split, got {n}")
    seed = int(cfg.train.seed)
    with preserved_rng():
        if stream is None:
            from amorlip import objectives

            needs = objectives.get(cfg.objective).needs_indices if cfg.objective in objectives.REGISTRY else True
            stream = build_train_stream(cfg.data, cfg.train.batch_size, seed, needs_indices=needs)
        train, train_indices = None, None
        dataset = getattr(stream, "dataset", None)
        if isinstance(dataset, Dataset) and hasattr(dataset, "__len__"):
            sub, train_indices = _map_subset(dataset, n, seed)
        elif getattr(stream, "urls", None):
            sub, train_indices = _wds_subset(stream.urls, n, int(stream.dataset_size),
                                             bool(getattr(stream, "needs_indices", True)))
        else:
            sub = None
        if sub is not None and len(sub) >= 2:
            train = RetrievalSplit("train", sub)
        else:
            train_indices = None
        # the held-out split as the run's evaluation builds it, with `size` pairs where the source makes them
        _, split = build_eval_data(replace(cfg.data, val_size=n), seed)
        heldout = _heldout_subset(split, n, seed) if split is not None else None
        if heldout is not None and len(heldout.dataset) < 2:  # type: ignore[arg-type]
            heldout = None
    return DiagnosticSets(train=train, train_indices=train_indices, heldout=heldout,
                          dataset_size=int(stream.dataset_size), batch_size=int(cfg.train.batch_size), seed=seed)


@torch.no_grad()
def run_diagnostics(
    model: nn.Module,
    objective: nn.Module | None,
    sets: DiagnosticSets,
    transform: Callable,
    tokenizer: Callable,
    device: torch.device | str,
    batch_size: int = 256,
) -> dict[str, float]:
    """Normalizer diagnostics of the model and objective as they are now, on both splits of `sets`.

    Returns flat float keys, for split in (train, heldout) where the split exists:
        normalizer/{split}/inbatch/{image,text}_{mse,bias}     the in-batch estimate at B = train.batch_size
        normalizer/{split}/objective/{image,text}_{mse,bias}   the objective's estimate (when it keeps one;
        normalizer/{split}/objective/coverage                    never heldout for per-sample objectives)
        normalizer/{split}/true/{image,text}_{mean,std}        the reference log Z itself
        normalizer/{split}/true/{image,text}_noise             the reference's own variance (0 when exact)
        normalizer/{split}/n, normalizer/{split}/batch_size    pairs used, in-batch B (capped at n)
    (definitions: the module docstring, docs/evaluation.md).

    How the trainer calls it (rank 0 only; it issues no collective):

        # set-up, once (after the training stream; any time before the loop: it consumes no RNG)
        diag_sets = build_diagnostic_sets(cfg, stream) if is_main and cfg.eval.normalizers else None
        # in run_evaluation, at every eval_every and at the end, with the current phase's transform/tokenizer
        if diag_sets is not None:
            metrics.update(run_diagnostics(model, objective, diag_sets, transform, tokenizer, device,
                                           cfg.eval.batch_size))

    `model` as the trainer holds it (DDP / torch.compile wrappers are removed; run in eval mode, its mode
    restored); `objective` the live objective (read only: `estimate_log_normalizers` under no_grad); `batch_size`
    the encoding batch size. The global torch / Python RNG states are left as they were.
    """
    from amorlip.models import unwrap

    inner = unwrap(model)
    scale = inner.logit_scale.detach().exp()
    per_sample = bool(getattr(objective, "needs_indices", False))
    out: dict[str, float] = {}
    with preserved_rng():
        for name in SPLITS:
            split = sets.train if name == "train" else sets.heldout
            if split is None:
                continue
            img, txt = encode_split(inner, tokenizer, split, transform, device, batch_size)
            indices = sets.train_indices if name == "train" else None
            # per-sample estimates need a training row: none on held-out pairs (still compared at its scale)
            use_objective = objective if (name == "train" or not per_sample) else None
            s = scale if use_objective is not None else reference_scale(objective, scale)
            d = normalizer_diagnostics(img, txt, s, indices, sets.batch_size, objective=use_objective,
                                       seed=sets.seed, dataset_size=sets.dataset_size, from_dataset=name == "train")
            d.pop("scale")
            out.update({f"normalizer/{name}/{k}": v for k, v in d.items()})
    return out
