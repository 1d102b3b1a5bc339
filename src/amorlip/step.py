"""One optimizer step's forward and backward: plain, or cached-feature accumulation (GradCache).

`forward_backward(...)` leaves the step's gradients in the model's (and the objective's) parameters and
returns the loss; the trainer then clips, steps the optimizer and logs. It knows nothing about any
objective: every objective sees the whole (per-rank) batch's features exactly once per step.

Cached-feature accumulation (`train.accum_steps K`, Gao et al.'s GradCache), for a batch too large for
one forward with autograd:

1. pass 1: the K micro-batches' features without autograd (activations are freed at once);
2. the objective runs ONCE on the concatenated features, which are leaves: its state (Stage I and EMA,
   u buffers, prototypes, ...) updates exactly as with K = 1, and backward gives the loss's gradient with
   respect to every feature, the scale s and the bias b;
3. pass 2: each micro-batch again, with autograd, back-propagating `<features, cached gradient>` (+ s and b
   terms): the sum over micro-batches of these vector-Jacobian products is the full batch's gradient.

Randomness replays: the RNG state before each micro-batch's first forward is restored before its second,
so dropout and stochastic depth draw the same masks. Layers with batch statistics (BatchNorm) see
micro-batch statistics in both passes, so accumulation is not exact for them; their running statistics
are updated in pass 2 only (pass 1 restores them). Under DDP only the last micro-batch's backward
all-reduces (`no_sync`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from amorlip.objectives.base import ObjectiveOutput
from amorlip.schedules import apply_temperature_scheme


def objective_loss(objective: nn.Module, out: dict[str, Any], indices: torch.Tensor, *, step: int, epoch: int,
                   scheme: str, rho: float) -> tuple[torch.Tensor, ObjectiveOutput]:
    """Collective: every rank calls this together (the objective's own collectives). The objective on one
    batch's model outputs, then the shared temperature scheme and the extra loss."""
    scale = out["logit_scale"]
    result = objective(out["image_features"], out["text_features"], scale, out.get("logit_bias"), indices,
                       step=step, epoch=epoch)
    loss = apply_temperature_scheme(result.loss, scale, scheme, rho)
    if result.extra_loss is not None:
        loss = loss + result.extra_loss
    return loss, result


def forward_backward(train_model: nn.Module, objective: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                     indices: torch.Tensor, *, step: int, epoch: int, scheme: str, rho: float,
                     autocast: Callable[[], Any], backward: Callable[[torch.Tensor], None],
                     accum_steps: int = 1) -> tuple[torch.Tensor, ObjectiveOutput]:
    """Collective: every rank calls this together, with the same `accum_steps` (the objective, DDP's backward).
    Gradients of one step, plain (`accum_steps` 1) or accumulated; returns (loss, objective output).

    `autocast()` gives a fresh autocast context; `backward(loss)` back-propagates the loss (the trainer's
    GradScaler scales it). The caller zeroes the gradients before and steps the optimizer after.
    """
    if accum_steps <= 1:
        with autocast():
            out = train_model(images, texts)
            loss, result = objective_loss(objective, out, indices, step=step, epoch=epoch, scheme=scheme, rho=rho)
        backward(loss)
        return loss, result
    return _accumulated(train_model, objective, images, texts, indices, step=step, epoch=epoch, scheme=scheme,
                        rho=rho, autocast=autocast, backward=backward, accum_steps=accum_steps)


def _accumulated(train_model: nn.Module, objective: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                 indices: torch.Tensor, *, step: int, epoch: int, scheme: str, rho: float,
                 autocast: Callable[[], Any], backward: Callable[[torch.Tensor], None],
                 accum_steps: int) -> tuple[torch.Tensor, ObjectiveOutput]:
    """Collective: every rank calls this together (the objective once, DDP's backward on the last micro-batch).
    Cached-feature accumulation: features of every micro-batch without autograd, the objective on the whole
    batch's features, then each micro-batch's backward of <features, their gradient> (RNG and BatchNorm replayed)."""
    chunks = list(zip(images.chunk(accum_steps), texts.chunk(accum_steps)))
    bn_state = _batch_norm_state(train_model)
    rng_before: list[dict[str, torch.Tensor]] = []
    features: dict[str, list[torch.Tensor]] = {"image_features": [], "text_features": []}
    out: dict[str, Any] = {}
    with torch.no_grad():  # pass 1: features only
        for imgs, txts in chunks:
            rng_before.append(_rng_state(imgs.device))
            with autocast():
                out = train_model(imgs, txts)
            for key in features:
                features[key].append(out[key])
    _restore_batch_norm(bn_state)  # running statistics are updated in pass 2 only
    rng_after = _rng_state(images.device)

    # the objective, once, on leaves standing for the model's outputs
    leaves = {key: torch.cat(parts).detach().requires_grad_() for key, parts in features.items()}
    leaves["logit_scale"] = out["logit_scale"].detach().requires_grad_()
    if out.get("logit_bias") is not None:
        leaves["logit_bias"] = out["logit_bias"].detach().requires_grad_()
    with autocast():
        loss, result = objective_loss(objective, leaves, indices, step=step, epoch=epoch, scheme=scheme, rho=rho)
    backward(loss)  # -> gradients of the loss w.r.t. the features, s and b (and the objective's own parameters)
    cached = {key: (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)) for key, leaf in leaves.items()}

    offsets = [0]
    for imgs, _ in chunks:
        offsets.append(offsets[-1] + imgs.shape[0])
    sync_free = getattr(train_model, "no_sync", None)
    for k, (imgs, txts) in enumerate(chunks):  # pass 2: each micro-batch's share of the gradient
        _set_rng_state(rng_before[k])
        last = k == len(chunks) - 1
        with (sync_free() if sync_free is not None and not last else contextlib.nullcontext()):
            with autocast():
                out = train_model(imgs, txts)
                rows = slice(offsets[k], offsets[k + 1])
                surrogate = sum((out[key] * cached[key][rows]).sum() for key in ("image_features", "text_features"))
                # s and b come out the same from every micro-batch: each carries 1/K of their gradient
                for key in ("logit_scale", "logit_bias"):
                    if key in cached:
                        surrogate = surrogate + (out[key] * cached[key]).sum() / len(chunks)
            surrogate.backward()  # the cached gradients already carry the GradScaler's factor
    _set_rng_state(rng_after)
    return loss, result


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _batch_norm_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, {name: buf.clone() for name, buf in m.named_buffers(recurse=False) if buf is not None}))
    return saved


def _restore_batch_norm(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    with torch.no_grad():
        for m, buffers in saved:
            for name, value in buffers.items():
                getattr(m, name).copy_(value)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether accumulation is inexact for `model` (its layers normalise with batch statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
