"""CLIP: symmetric InfoNCE over in-batch negatives (Eq. 3), open_clip's ClipLoss semantics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from amorlip import distributed
from amorlip.objectives import tiled
from amorlip.objectives.base import Objective, ObjectiveOutput, similarity_logits
from amorlip.objectives.options import ClipConfig  # noqa: F401 - re-exported


class ClipObjective(Objective):
    """Symmetric cross-entropy over `s X Y^T`.

    Multi-process: open_clip's `local_loss=True, gather_with_grad=True`: each rank scores its local
    images against all ranks' texts (and its local texts against all images), features gathered with
    gradient; with DDP's gradient averaging this equals the 1-process gradient of the global batch.

    Tiled (`clip.tile_size`): each cross-entropy is `mean_i (lse_i - logit_i,pos)`, the log-sum-exps computed
    in row strips by `tiled.log_sum_exps` (1 process: rows and columns of the one matrix in one pass).
    """


    def forward(self, image_features, text_features, scale, bias, indices, *, step, epoch) -> ObjectiveOutput:
        """Collective: every rank calls this together (`gather_with_grad` of both modalities)."""
        all_images = distributed.gather_with_grad(image_features)
        all_texts = distributed.gather_with_grad(text_features)
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + b * distributed.rank()
        tile_size = self.cfg.tile_size if self.cfg is not None else None
        tile = tiled.resolve_tile(tile_size, b, all_texts.shape[0])
        if tile:
            return self._tiled(image_features, text_features, all_images, all_texts, scale, bias, labels, tile)
        logits_per_image = similarity_logits(image_features, all_texts, scale, bias)
        if distributed.world_size() == 1:  # the same matrix transposed: one matmul and one B x B buffer saved
            logits_per_text = logits_per_image.T
        else:
            logits_per_text = similarity_logits(text_features, all_images, scale, bias)
        loss_i = F.cross_entropy(logits_per_image, labels)
        loss_t = F.cross_entropy(logits_per_text, labels)
        loss = 0.5 * (loss_i + loss_t)
        with torch.no_grad():
            acc = (logits_per_image.argmax(1) == labels).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"loss_i2t": loss_i.detach(), "loss_t2i": loss_t.detach(), "batch_acc": acc})

    def _tiled(self, x, y, all_x, all_y, scale, bias, labels, tile) -> ObjectiveOutput:
        b = x.shape[0]

        def positive(anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            # the positives are this rank's slice of the gathered candidates (a view, no copy)
            pos = scale * (anchors * candidates.narrow(0, b * distributed.rank(), b)).sum(dim=1)
            return pos if bias is None else pos + bias

        if distributed.world_size() == 1:
            lse_i, lse_t, argmax = tiled.log_sum_exps(x, all_y, scale, bias, tile=tile)
            pos_i = pos_t = positive(x, all_y)
        else:
            lse_i, _, argmax = tiled.log_sum_exps(x, all_y, scale, bias, tile=tile, cols=False)
            lse_t, _, _ = tiled.log_sum_exps(y, all_x, scale, bias, tile=tile, cols=False)
            pos_i, pos_t = positive(x, all_y), positive(y, all_x)
        loss_i = (lse_i - pos_i.to(lse_i.dtype)).mean()
        loss_t = (lse_t - pos_t.to(lse_t.dtype)).mean()
        loss = 0.5 * (loss_i + loss_t)
        with torch.no_grad():
            acc = (argmax == labels).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"loss_i2t": loss_i.detach(), "loss_t2i": loss_t.detach(), "batch_acc": acc})
