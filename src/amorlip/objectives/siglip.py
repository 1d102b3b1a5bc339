"""SigLIP: the pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023).

    L = -(1/B) sum_i sum_j log sigmoid( z_ij (s x_i.y_j + b) ),   z_ii = +1, z_ij = -1 (i != j)     (SigLIP's sigmoid loss)

with open_clip's `SigLipLoss` normalisation: the sum runs over this rank's B images against every text
of the global batch and is divided by the LOCAL batch size B. docs/baselines.md gives the derivation of
the multi-process semantics; in short: each rank gathers all ranks' text features WITH gradient
(`distributed.gather_with_grad`, whose backward sums the incoming gradients and returns each rank its own
slice), so rank r's loss and its gradients are exactly those of open_clip's `SigLipLoss(rank=r,
world_size=W)` (which passes the texts around a ring instead). Summed over ranks, the local losses are
W times the 1-process loss of the concatenated batch (which divides by the global batch N = W B); DDP
divides the summed gradients by W, so every parameter sees the 1-process gradient of the concatenated batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from amorlip import distributed
from amorlip.objectives import tiled
from amorlip.objectives.base import Objective, ObjectiveOutput, similarity_logits
from amorlip.objectives.options import SigLipConfig  # noqa: F401 - re-exported


def siglip_labels(num_rows: int, num_cols: int, offset: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """z: +1 at (i, offset + i), -1 elsewhere (the positives of the local rows sit in the column block `offset`)."""
    z = -torch.ones(num_rows, num_cols, device=device, dtype=dtype)
    rows = torch.arange(num_rows, device=device)
    z[rows, rows + offset] = 1.0
    return z


class SigLipObjective(Objective):
    """Sigmoid loss over all (local image, global text) pairs.

    `model_overrides` start the model at SigLIP's initialisation: s = 10 (logit_scale = ln 10), b = -10.

    Tiled (`siglip.tile_size`): `-log sigmoid(-a) = softplus(a)` and `-log sigmoid(a) = softplus(a) - a`, so
    `B L = sum_ij softplus(L_ij) - sum_i L_i,pos`: the pairwise sum in row strips (`tiled.softplus_sum`), the
    positives and the metrics in O(B d).
    """

    model_overrides = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}

    def forward(self, image_features, text_features, scale, bias, indices, *, step, epoch) -> ObjectiveOutput:
        """Collective: every rank calls this together (`gather_with_grad` of the texts)."""
        b = image_features.shape[0]
        all_texts = distributed.gather_with_grad(text_features)
        tile = tiled.resolve_tile(self.cfg.tile_size if self.cfg is not None else None, b, all_texts.shape[0])
        if tile:
            return self._tiled(image_features, all_texts, scale, bias, tile)
        logits = similarity_logits(image_features, all_texts, scale, bias)
        z = siglip_labels(b, all_texts.shape[0], b * distributed.rank(), logits.device, logits.dtype)
        # -(1/B) sum_ij log sigmoid(z_ij * logit_ij): the sigmoid loss with open_clip's 1/B_local normalisation.
        loss = -F.logsigmoid(z * logits).sum() / b
        with torch.no_grad():
            positive = z > 0
            metrics = {
                "pos_logit": logits[positive].mean(),
                "neg_logit": logits[~positive].mean(),
                "bias": bias.detach().reshape(()) if bias is not None else 0.0,
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def _tiled(self, x, all_y, scale, bias, tile) -> ObjectiveOutput:
        b, n = x.shape[0], all_y.shape[0]
        y_pos = all_y.narrow(0, b * distributed.rank(), b)
        pos = scale * (x * y_pos).sum(dim=1)
        if bias is not None:
            pos = pos + bias
        total = tiled.softplus_sum(x, all_y, scale, bias, tile=tile)
        loss = (total - pos.to(total.dtype).sum()) / b
        with torch.no_grad():
            # sum of every logit in O((B + N) d): s (sum_i x_i).(sum_j y_j) + b B N
            every = scale * (x.sum(0) * all_y.sum(0)).sum() + (0.0 if bias is None else bias.reshape(()) * b * n)
            metrics = {
                "pos_logit": pos.mean(),
                "neg_logit": ((every - pos.sum()) / max(1, b * n - b)).reshape(()),
                "bias": bias.detach().reshape(()) if bias is not None else 0.0,
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)
