"""Image-text retrieval: Recall@K in both directions on held-out pairs (image i <-> caption i).

Recall@K (CLIP convention): the fraction of queries for which at least one matching item is among
the K most similar items of the other modality. Ties are broken against the query: a non-matching
item that scores exactly as high as the best match counts as ranked above it, so a collapsed model
(all similarities equal) scores 0, never 1.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from amorlip.data.types import RetrievalSplit
from amorlip.evaluate.zeroshot import eval_loader, eval_mode
from amorlip.progress import iterate

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, k: int, positives: torch.Tensor | None = None) -> float:
    """Recall@k of the queries (rows) of `similarity` (n_queries, n_items).

    `positives` (bool, same shape) marks the matching items of each query; by default item i matches
    query i only (one caption per image). A query is a hit when fewer than k non-matching items score
    at least as high as its best-scoring match (ties count against the query). k larger than the
    number of items is capped (every query with a match is then a hit).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sim = similarity.float()
    if positives is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"without `positives` the similarity must be square (pair i <-> i), got {tuple(sim.shape)}")
        positives = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    positives = positives.to(device=sim.device, dtype=torch.bool)
    if positives.shape != sim.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must have the shape of similarity {tuple(sim.shape)}")
    has_match = positives.any(dim=1)
    best_match = sim.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    n_above = ((sim >= best_match) & ~positives).sum(dim=1)  # non-matching items ranked at or above the best match
    hits = (n_above < k) & has_match
    return float(hits.float().mean())


def retrieval_metrics(similarity: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k both ways from the (n_images, n_texts) similarity of paired data (image i <-> text i).

    Keys: `image_to_text_R@k` (image queries, text gallery), `text_to_image_R@k`, and `mean_R@1`
    (the mean of the two R@1, DataComp's retrieval score) when 1 is in `ks`.
    """
    out = {f"image_to_text_R@{k}": recall_at_k(similarity, k) for k in ks}
    out.update({f"text_to_image_R@{k}": recall_at_k(similarity.T, k) for k in ks})
    if 1 in ks:
        out["mean_R@1"] = 0.5 * (out["image_to_text_R@1"] + out["text_to_image_R@1"])
    return out


@torch.no_grad()
def encode_split(
    model: nn.Module,
    tokenizer: Callable,
    split: RetrievalSplit,
    transform: Callable,
    device: torch.device | str,
    batch_size: int = 256,
    progress: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and caption features (float32, CPU, shapes (N, d)) of a retrieval split.

    Row i of both is sample i. The model may be DDP-wrapped; it runs in eval mode, restored after.
    """
    if len(split.dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"retrieval split {split.name!r} is empty")
    images_out, texts_out = [], []
    with eval_mode(model) as m:
        loader = eval_loader(split.dataset, transform, batch_size, num_workers)
        for images, captions in iterate(loader, f"encode {split.name}", enabled=progress):
            if isinstance(captions, torch.Tensor) or not all(isinstance(c, str) for c in captions):
                raise TypeError(
                    f"retrieval split {split.name!r}: dataset[i] must return (PIL image, str caption); "
                    f"got captions of type {type(captions[0]).__name__}"
                )
            tokens = tokenizer(list(captions)).to(device)
            images_out.append(m.encode_image(images.to(device), normalize=True).float().cpu())
            texts_out.append(m.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(images_out), torch.cat(texts_out)


def retrieval_eval(
    model: nn.Module,
    tokenizer: Callable,
    split: RetrievalSplit,
    transform: Callable,
    device: torch.device | str,
    batch_size: int = 256,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, float]:
    """Retrieval Recall@k both ways on `split` (one caption per image, pair i <-> i); see `retrieval_metrics`."""
    img, txt = encode_split(model, tokenizer, split, transform, device, batch_size, progress, num_workers)
    return retrieval_metrics(img @ txt.T, ks)
