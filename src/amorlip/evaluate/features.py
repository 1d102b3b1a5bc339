"""Frozen features of a trained run: the training pairs and held-out pairs encoded once by a checkpoint's model.

`amorlip bench amortizer` (can Stage I learn log Z?) and `amorlip eval RUN --gradient-fidelity` (how biased is the
minibatch gradient?) both study the objectives on features that do not move, so that the question is about the
estimator alone. `run_features` reads a run folder or checkpoint, encodes `n_train` of its training pairs (all of
them by default: the exact full-data partition functions are then exact) with their dataset indices, and
`n_heldout` pairs never trained on (the source's held-out split or data.val_path), with the model's s = exp(logit
scale). `exact_log_z` gives the exact log partition functions of both against the training pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from amorlip.config import Config, ConfigError
from amorlip.data.sources import SOURCES
from amorlip.evaluate.log_normalizers import error_stats, mean_log_partition


@dataclass
class FrozenFeatures:
    """L2-normalised features (float32, CPU). `indices`: the training pairs' dataset indices; `dataset_size`: the
    training set's N (equal to len(indices) when every pair was encoded); `scale`: the model's s."""

    image: torch.Tensor
    text: torch.Tensor
    indices: torch.Tensor
    heldout_image: torch.Tensor | None
    heldout_text: torch.Tensor | None
    scale: float
    dataset_size: int
    config: Config
    step: int | None

    def describe(self) -> str:
        held = 0 if self.heldout_image is None else self.heldout_image.shape[0]
        return (f"{self.image.shape[0]} training pairs (of {self.dataset_size}) and {held} held-out pairs, "
                f"d = {self.image.shape[1]}, s = {self.scale:.2f}")


def encode_run(loaded: Any, device: torch.device, n_train: int | None = None, n_heldout: int = 2000,
               batch_size: int = 512, progress: bool = False) -> FrozenFeatures:
    """Encode a run's training pairs (`n_train`, default all; a seeded random subset otherwise) and `n_heldout`
    held-out pairs with its model (see the module docstring). `loaded`: the run's checkpoint as
    `evaluate.cli.load_for_eval` loads it (`evaluate.cli.load_run_features` does both)."""
    from amorlip import objectives
    from amorlip.data.loader import build_train_stream
    from amorlip.evaluate.normalizers import build_diagnostic_sets
    from amorlip.evaluate.retrieval import encode_split

    cfg = loaded.config
    if cfg is None:
        raise ConfigError(f"{loaded.source} is an export without a run config: pass the run folder (its training "
                          "data defines the partition functions)")
    torch_device = device
    stream = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed,
                                needs_indices=objectives.get(cfg.objective).needs_indices)
    big_n = int(stream.dataset_size)
    n = big_n if n_train is None else min(int(n_train), big_n)
    if n < 2:
        raise ConfigError(f"need at least 2 training pairs, got {n}")
    train = build_diagnostic_sets(cfg, stream, size=n)
    if train.train is None:
        raise ConfigError(f"data.source={cfg.data.source}: its training pairs cannot be read one by one "
                          f"(use a map-style source: {', '.join(name for name, s in SOURCES.items() if s.map_style)})")
    x, y = encode_split(loaded.model, loaded.tokenizer, train.train, loaded.eval_transform, torch_device,
                        batch_size, progress)
    hx = hy = None
    if n_heldout > 0:
        held = build_diagnostic_sets(cfg, stream, size=max(2, n_heldout)).heldout
        if held is not None:
            hx, hy = encode_split(loaded.model, loaded.tokenizer, held, loaded.eval_transform, torch_device,
                                  batch_size, progress)
    scale = float(loaded.model.logit_scale.detach().exp().cpu())
    return FrozenFeatures(x, y, train.train_indices.clone(), hx, hy, scale, big_n, cfg, loaded.state.get("step"))


def exact_log_z(feats: FrozenFeatures) -> dict[str, Any]:
    """The exact log partition functions against the encoded training pairs (the full data when all were
    encoded): `train_image` / `train_text` (n,) and, with held-out pairs, `heldout_image` / `heldout_text`."""
    out = {"train_image": mean_log_partition(feats.image, feats.text, feats.scale),
           "train_text": mean_log_partition(feats.text, feats.image, feats.scale)}
    if feats.heldout_image is not None:
        out["heldout_image"] = mean_log_partition(feats.heldout_image, feats.text, feats.scale)
        out["heldout_text"] = mean_log_partition(feats.heldout_text, feats.image, feats.scale)
    return out


def r2_score(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(r2, bias) of an estimate (`log_normalizers.error_stats`): the share of the per-sample spread of the truth
    that the estimate follows once its constant offset is removed, and the mean error."""
    _, bias, r2 = error_stats(estimate, truth)
    return r2, bias
