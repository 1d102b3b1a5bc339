"""Evaluation: zero-shot classification, retrieval, DataComp (via clip_benchmark), normalizer diagnostics.

`evaluate_model` is what the trainer calls on its held-out tasks; it returns flat metric names:

    zeroshot/<task>/top1, zeroshot/<task>/top5, zeroshot/<task>/mean_per_class_recall, zeroshot/mean_top1,
    retrieval/<split>/image_to_text_R@{1,5,10}, retrieval/<split>/text_to_image_R@{1,5,10},
    retrieval/<split>/mean_R@1
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from amorlip.data.types import RetrievalSplit, ZeroShotTask
from amorlip.evaluate.report import format_table, write_json
from amorlip.evaluate.retrieval import encode_split, recall_at_k, retrieval_eval, retrieval_metrics
from amorlip.evaluate.zeroshot import classification_metrics, eval_mode, mean_per_class_recall, zeroshot_eval

__all__ = [
    "evaluate_model",
    "zeroshot_eval",
    "retrieval_eval",
    "encode_split",
    "recall_at_k",
    "retrieval_metrics",
    "classification_metrics",
    "mean_per_class_recall",
    "format_table",
    "write_json",
]


def _as_list(x, kind: type) -> list:
    if x is None:
        return []
    if isinstance(x, kind):
        return [x]
    return list(x)


def evaluate_model(
    model: nn.Module,
    tokenizer: Callable,
    transform: Callable,
    tasks: ZeroShotTask | Sequence[ZeroShotTask] | None = None,
    retrieval: RetrievalSplit | Sequence[RetrievalSplit] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot classification on `tasks` and retrieval on `retrieval`, as one flat dict of floats.

    The model may be wrapped in DDP or torch.compile (it is unwrapped); it is put in eval mode and its
    previous mode is restored afterwards, also on error. No collectives are issued: call this on one
    rank (typically rank 0) or on every rank with the same data.
    """
    task_list: list[ZeroShotTask] = _as_list(tasks, ZeroShotTask)
    split_list: list[RetrievalSplit] = _as_list(retrieval, RetrievalSplit)
    for kind, items in (("zero-shot task", task_list), ("retrieval split", split_list)):
        names = [t.name for t in items]
        if len(set(names)) != len(names):
            raise ValueError(f"two {kind}s share a name in {names}: metric names would collide; rename one")
    out: dict[str, float] = {}
    with eval_mode(model) as m:
        top1 = []
        for task in task_list:
            res = zeroshot_eval(m, tokenizer, task, transform, device, batch_size, progress=progress)
            out.update({f"zeroshot/{task.name}/{k}": v for k, v in res.items()})
            top1.append(res["top1"])
        if top1:
            out["zeroshot/mean_top1"] = sum(top1) / len(top1)
        for split in split_list:
            res = retrieval_eval(m, tokenizer, split, transform, device, batch_size, progress=progress)
            out.update({f"retrieval/{split.name}/{k}": v for k, v in res.items()})
    return out
