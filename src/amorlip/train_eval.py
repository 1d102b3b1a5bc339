"""Evaluation inside a training run: the held-out sets, built at set-up, and one evaluation of the model.

The trainer's glue to `amorlip.evaluate`: which tasks `eval.zeroshot` / `eval.retrieval` keep, and the normalizer
diagnostics of `eval.normalizers` (amorlip.evaluate.normalizers). Main rank only; nothing here is collective.
"""
from __future__ import annotations

from typing import Any

import torch

from amorlip.config import Config
from amorlip.models import unwrap


def build_eval_sets(cfg: Config) -> tuple[list, Any]:
    """(zero-shot tasks, retrieval set) of `cfg.data` (amorlip.data.loader.build_eval_data), with the user's
    val_path / imagenet_root read and checked; the RNG state is left as it was."""
    from amorlip.data.loader import build_eval_data
    from amorlip.data.samples import preserved_rng

    with preserved_rng():  # built before the model: must not change its initialisation
        return build_eval_data(cfg.data, cfg.train.seed, imagenet_root=cfg.eval.imagenet_root)


def run_evaluation(model, tokenizer, transform, eval_sets, cfg: Config, device: torch.device, *,
                   objective: torch.nn.Module | None = None, diagnostic_sets: Any = None) -> dict[str, float]:
    """Zero-shot and retrieval on `eval_sets`; with `diagnostic_sets` (eval.normalizers) also the normalizer
    diagnostics of the model and `objective` as they are now (`normalizer/...` keys, amorlip.evaluate.normalizers)."""
    from amorlip.evaluate import evaluate_model

    tasks, retrieval = eval_sets
    metrics = evaluate_model(
        unwrap(model),
        tokenizer,
        transform,
        tasks if cfg.eval.zeroshot else [],
        retrieval if cfg.eval.retrieval else None,
        device,
        cfg.eval.batch_size,
    )
    if diagnostic_sets is not None:
        from amorlip.evaluate.normalizers import run_diagnostics

        metrics.update(run_diagnostics(model, objective, diagnostic_sets, transform, tokenizer, device,
                                       cfg.eval.batch_size))
    return metrics
