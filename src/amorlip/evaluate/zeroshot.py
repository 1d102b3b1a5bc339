"""Zero-shot classification: open_clip's prompt-ensemble classifier, top-k accuracy, mean per-class recall.

The classifier is open_clip's `build_zero_shot_classifier`: for class c, the mean of the L2-normalised
text features of every prompt `template(c)`, renormalised (CLIP's prompt ensembling). An image is
assigned to the class whose weight has the largest cosine with its normalised image feature (the logit
scale does not change a ranking, so it is left out).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from open_clip import build_zero_shot_classifier
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from amorlip.data.types import ZeroShotTask
from amorlip.models import unwrap
from amorlip.progress import iterate


class TransformedDataset(Dataset):
    """`dataset[i] = (PIL image, y)` seen as `(transform(image), y)`."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image, y = self.dataset[i]
        return self.transform(image), y


class TransformedIterable(IterableDataset):
    """An iterable of `(PIL image, y)` (read in order, e.g. webdataset validation shards) as `(transform(image), y)`."""

    def __init__(self, dataset: IterableDataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for image, y in self.dataset:
            yield self.transform(image), y


def eval_loader(dataset: Dataset, transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    """An ordered loader over `(transform(image), y)`; labels collate to a tensor, captions to a list.

    An IterableDataset is read in order in this process (workers would each repeat it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(dataset, IterableDataset):
        return DataLoader(TransformedIterable(dataset, transform), batch_size=batch_size, num_workers=0)
    return DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, drop_last=False)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Yield the unwrapped open_clip model (DDP / torch.compile removed) in eval mode; restore the mode after."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        yield inner
    finally:
        inner.train(was_training)


def template_fns(templates: Sequence[Any]) -> list[Callable[[str], str]]:
    """Prompt templates as callables `classname -> prompt`.

    Accepts open_clip's conventions (format strings with one `{}`, or callables) and clip_benchmark's
    (format strings with `{c}`), in any mix.
    """
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty list of format strings ('a photo of a {}.') or callables")
    fns: list[Callable[[str], str]] = []
    for t in templates:
        if callable(t):
            fns.append(t)
        elif isinstance(t, str) and "{c}" in t:
            fns.append(lambda c, t=t: t.format(c=c))
        elif isinstance(t, str) and "{}" in t:
            fns.append(lambda c, t=t: t.format(c))
        else:
            raise ValueError(f"template {t!r} has no '{{}}' or '{{c}}' placeholder for the class name")
    return fns


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the classes present in `targets` of the fraction of their samples predicted correctly.

    This is scikit-learn's `balanced_accuracy_score` (what clip_benchmark and DataComp report as
    `mean_per_class_recall`): classes that never occur in `targets` are left out.
    """
    predictions, targets = predictions.reshape(-1).cpu(), targets.reshape(-1).cpu()
    if targets.numel() == 0:
        raise ValueError("mean_per_class_recall: no samples")
    classes = targets.unique()
    recalls = [(predictions[targets == c] == c).double().mean() for c in classes]
    return float(torch.stack(recalls).mean())


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of samples whose target is among the k largest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == targets.reshape(-1, 1)).any(dim=1).double().mean())


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """`top1`, `top5` (k capped at the class count) and `mean_per_class_recall` from (N, C) logits."""
    if logits.ndim != 2 or logits.shape[0] != targets.numel():
        raise ValueError(f"logits must be (N, C) with N = len(targets); got {tuple(logits.shape)} and {targets.numel()}")
    return {
        "top1": topk_accuracy(logits, targets, 1),
        "top5": topk_accuracy(logits, targets, 5),
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), targets),
    }


@torch.no_grad()
def zeroshot_logits(
    model: nn.Module,
    tokenizer: Callable,
    task: ZeroShotTask,
    transform: Callable,
    device: torch.device | str,
    batch_size: int = 256,
    progress: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits (N, C) of every image of `task` against its zero-shot classifier, and the targets (N,)."""
    if len(task.classnames) == 0:
        raise ValueError(f"zero-shot task {task.name!r} has no class names")
    if len(task.dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"zero-shot task {task.name!r} has no images")
    with eval_mode(model) as m:
        classifier = build_zero_shot_classifier(
            m, tokenizer, task.classnames, template_fns(task.templates), num_classes_per_batch=10,
            device=device, use_tqdm=False,
        )  # (d, C), columns L2-normalised
        logits, targets = [], []
        loader = eval_loader(task.dataset, transform, batch_size, num_workers)
        for images, labels in iterate(loader, f"zero-shot {task.name}", enabled=progress):
            feats = m.encode_image(images.to(device), normalize=True)
            logits.append((feats @ classifier.to(feats.dtype)).float().cpu())
            targets.append(torch.as_tensor(labels).reshape(-1).long())
    return torch.cat(logits), torch.cat(targets)


def zeroshot_eval(
    model: nn.Module,
    tokenizer: Callable,
    task: ZeroShotTask,
    transform: Callable,
    device: torch.device | str,
    batch_size: int = 256,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, float]:
    """Zero-shot classification of `task`: {"top1", "top5", "mean_per_class_recall"} as fractions in [0, 1].

    top-5 uses k = min(5, number of classes). The model may be DDP-wrapped; it is evaluated in eval
    mode and its mode is restored afterwards. No collectives: call it on one rank (or on all with the
    same data).
    """
    logits, targets = zeroshot_logits(model, tokenizer, task, transform, device, batch_size, progress, num_workers)
    return classification_metrics(logits, targets)
