"""CLIP: symmetric InfoNCE over in-batch negatives (Eq. 3), open_clip's ClipLoss semantics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from amorlip import distributed
from amorlip.objectives.base import Objective, ObjectiveOutput, similarity_logits


class ClipObjective(Objective):
    """Symmetric cross-entropy over `s X Y^T`.

    Multi-process: open_clip's `local_loss=True, gather_with_grad=True`: each rank scores its local
    images against all ranks' texts (and its local texts against all images), features gathered with
    gradient; with DDP's gradient averaging this equals the 1-process gradient of the global batch.
    """

    name = "clip"

    def forward(self, image_features, text_features, scale, bias, indices, *, step, epoch) -> ObjectiveOutput:
        all_images = distributed.gather_with_grad(image_features)
        all_texts = distributed.gather_with_grad(text_features)
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + b * distributed.rank()
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
