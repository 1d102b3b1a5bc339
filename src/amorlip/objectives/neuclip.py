"""NeuCLIP: the log-normaliser of each sample as the minimiser of its convex-conjugate form, predicted by a
compact prototype network (Wei et al., "NeuCLIP: Efficient Large-Scale CLIP Training with Neural Normalizer
Optimization", 2025).

Only the abstract of the paper is public to this project; the formulas below follow a secondary description
that is NOT verified against the paper or a release. docs/neuclip.md writes out the derivation implemented
here and every choice this implementation had to make; "(choice)" below marks them. (N1), (N2) are
that page's labels, not the paper's equation numbers.

Per anchor (image i; text anchors are symmetric), with g_i the mean over the negatives of
exp(s (x_i.y_j - x_i.y_i)) as in SogCLR (objectives/sogclr.py):

  (N1) log(eps + g_i) = min_alpha { exp(-alpha) (eps + g_i) + alpha - 1 }          (minimiser alpha* = log(eps + g_i))

so the robust global contrastive loss  1/2 [mean_i log(eps + g_i) + mean_j log(eps + h_j)]  becomes a joint
minimisation over the encoders and one alpha per sample, LINEAR in g for fixed alpha (an unbiased minibatch
gradient). The n alphas are replaced by a function of the anchor:

  (N2) alpha(x_i) = log( eps + 1/m sum_k exp( s (cos(x_i, W_k) - x_i.y_i) ) )

with m learned prototypes W_k (text-side prototypes for image anchors, image-side ones for text anchors), i.e.
g_i estimated against m learned "pseudo-negatives". Every step (alternating optimisation):

  1. every `restart_every` (T_r) steps the prototypes restart from the most recent m gathered batch
     embeddings (a ring bank, (choice)), with a fresh AdaGrad state;
  2. `inner_steps` (T_u) AdaGrad steps on the prototypes minimise (N1)'s objective on this batch, encoders'
     features detached: J(W) = 1/2 [mean_i exp(log(eps + g_i) - alpha_i(W)) + alpha_i(W)] + (text);
  3. the encoders get the gradient of (N1) with alpha = alpha(x_i) detached:
         1/2 [mean_i exp(-alpha_i) grad g_i + mean_j exp(-alpha_j) grad h_j]
     which is SogCLR's surrogate with u_i = exp(alpha_i) (so the same multi-process decomposition is used);
  4. temperature (choice, FastCLIP-v3's RGCL-g): with temperature.scheme rescaled, `extra_loss =
     (mean alpha_img + mean alpha_txt) / (2 s)` completes the gradient of `tau * loss + rho * tau`.

When alpha equals the batch's exact log(eps + g), the encoders' gradient is that of the batch loss; with
eps = 1/(N-1) that is exactly InfoNCE's (CLIP) gradient, since InfoNCE_i = log(N-1) + log(1/(N-1) + g_i).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from amorlip import distributed
from amorlip.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from amorlip.objectives.options import NeuCLIPConfig  # noqa: F401 - re-exported
from amorlip.objectives.sogclr import (
    GlobalBatch,
    compute_dtype,
    log_partition_from_log_g,
    no_autocast,
    with_value,
)


def prototype_log_normalizer(
    anchors: torch.Tensor, prototypes: torch.Tensor, positive_sim: torch.Tensor, scale: torch.Tensor, eps: float,
    tile_size: int | None = 0,
) -> torch.Tensor:
    """Eq. N2: alpha_i = log(eps + 1/m sum_k exp(s (cos(a_i, W_k) - a_i.p_i))), computed in log space.
    `tile_size` (the objective's key; 0 dense): the B x m log-sum-exp in row strips (objectives/tiled.py)."""
    from amorlip.objectives import tiled

    m = prototypes.shape[0]
    tile = tiled.resolve_tile(tile_size, anchors.shape[0], m)
    if tile:
        lse = tiled.log_sum_exps(anchors, F.normalize(prototypes, dim=1), scale, tile=tile, cols=False)[0]
        log_mean = lse - scale * positive_sim - math.log(m)
        return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps)))
    cos = anchors @ F.normalize(prototypes, dim=1).T
    log_mean = torch.logsumexp(scale * (cos - positive_sim[:, None]), dim=1) - math.log(m)
    return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps)))


def conjugate_value(log_target: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. N1's objective exp(log_target - alpha) + alpha - 1, per anchor (>= log_target; equal at the minimiser
    alpha = log_target)."""
    return torch.exp(log_target - alpha) + alpha - 1.0


class NeuCLIPObjective(Objective):
    """Conjugate-form GCL with alpha predicted by m prototypes per modality, trained by AdaGrad."""

    def __init__(self, cfg: Any, ctx: ObjectiveContext) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), ctx)
        self.m = max(1, min(int(self.cfg.num_prototypes), int(ctx.dataset_size)))
        d, dev = int(ctx.embed_dim), ctx.device
        for name in ("text_prototypes", "image_prototypes", "text_sq_grad", "image_sq_grad", "text_bank", "image_bank"):
            self.register_buffer(name, torch.zeros(self.m, d, dtype=torch.float32, device=dev))
        # Python-side counters (saved through get_extra_state).
        self.num_valid = 0
        """Prototypes in use (rows [0, num_valid)); < m only until the bank first fills."""
        self.bank_filled = 0
        self.bank_cursor = 0

    # -- state -----------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, int]:
        return {"num_valid": self.num_valid, "bank_filled": self.bank_filled, "bank_cursor": self.bank_cursor}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.num_valid = int(state["num_valid"])
        self.bank_filled = int(state["bank_filled"])
        self.bank_cursor = int(state["bank_cursor"])

    # -- prototypes ------------------------------------------------------------------------------------
    def push_bank(self, all_images: torch.Tensor, all_texts: torch.Tensor) -> None:
        """Write the global batch's (detached) embeddings into the ring banks of the last m embeddings."""
        k = min(all_images.shape[0], self.m)
        slots = (self.bank_cursor + torch.arange(k, device=self.image_bank.device)) % self.m
        self.image_bank[slots] = all_images[-k:].detach().to(self.image_bank)
        self.text_bank[slots] = all_texts[-k:].detach().to(self.text_bank)
        self.bank_cursor = (self.bank_cursor + k) % self.m
        self.bank_filled = min(self.m, self.bank_filled + k)

    def restart(self) -> None:
        """Prototypes <- the bank (the last m batch embeddings); AdaGrad accumulators reset (step 1)."""
        self.num_valid = self.bank_filled
        self.text_prototypes.copy_(self.text_bank)
        self.image_prototypes.copy_(self.image_bank)
        self.text_sq_grad.zero_()
        self.image_sq_grad.zero_()

    def alphas(self, anchors_img: Tensor, anchors_txt: Tensor, positive_sim: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """alpha for image anchors (against the text-side prototypes) and text anchors (image-side)."""
        v, dtype, eps = self.num_valid, anchors_img.dtype, self.cfg.eps
        ts = self.cfg.tile_size
        a_img = prototype_log_normalizer(anchors_img, self.text_prototypes[:v].to(dtype), positive_sim, scale, eps, ts)
        a_txt = prototype_log_normalizer(anchors_txt, self.image_prototypes[:v].to(dtype), positive_sim, scale, eps, ts)
        return a_img, a_txt

    def prototype_objective(
        self, x: Tensor, y: Tensor, log_target_img: Tensor, log_target_txt: Tensor, scale: Tensor,
        text_protos: Tensor, image_protos: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """J(W) = 1/2 [mean_i conj(log(eps+g_i), alpha_i(W)) + mean_j conj(log(eps+h_j), alpha_j(W))] (step 2).

        Returns J and the alphas (image anchors, text anchors)."""
        pos = (x * y).sum(dim=1)
        a_img = prototype_log_normalizer(x, text_protos, pos, scale, self.cfg.eps, self.cfg.tile_size)
        a_txt = prototype_log_normalizer(y, image_protos, pos, scale, self.cfg.eps, self.cfg.tile_size)
        j = 0.5 * (conjugate_value(log_target_img, a_img).mean() + conjugate_value(log_target_txt, a_txt).mean())
        return j, a_img, a_txt

    def prototype_step(
        self, x: Tensor, y: Tensor, log_target_img: Tensor, log_target_txt: Tensor, scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Collective: every rank calls this together (`all_reduce_mean_`). One AdaGrad step on J over this rank's
        anchors; the gradient is averaged over ranks first, so every
        rank takes the same step (the 1-process step on the global batch). Returns J and the alphas before it."""
        v, dtype = self.num_valid, x.dtype
        w_txt = self.text_prototypes[:v].to(dtype, copy=True).requires_grad_(True)
        w_img = self.image_prototypes[:v].to(dtype, copy=True).requires_grad_(True)
        with torch.enable_grad():
            j, a_img, a_txt = self.prototype_objective(
                x.detach(), y.detach(), log_target_img, log_target_txt, scale.detach(), w_txt, w_img
            )
            g_txt, g_img = torch.autograd.grad(j, [w_txt, w_img])
        grads = distributed.all_reduce_mean_(torch.stack([g_txt, g_img])).float()
        for proto, sq, grad in ((self.text_prototypes, self.text_sq_grad, grads[0]),
                                (self.image_prototypes, self.image_sq_grad, grads[1])):
            sq[:v] += grad * grad
            proto[:v] -= self.cfg.lr * grad / (sq[:v].sqrt() + self.cfg.adagrad_eps)
        return j.detach(), a_img.detach(), a_txt.detach()

    def log_eps_plus(self, log_g: torch.Tensor) -> torch.Tensor:
        """log(eps + g) from log g."""
        return torch.logaddexp(log_g, torch.full_like(log_g, math.log(self.cfg.eps)))

    # -- the step --------------------------------------------------------------------------------------
    def forward(self, image_features, text_features, scale, bias, indices, *, step, epoch) -> ObjectiveOutput:
        """Collective: every rank calls this together (`GlobalBatch.build`, `prototype_step`)."""
        with no_autocast(image_features.device):
            batch = GlobalBatch.build(image_features, text_features, self.cfg.tile_size)
            s = scale.to(batch.x.dtype)
            products = batch.products()
            # log(eps + g) of the local anchors on this batch: the targets of Eq. N1's inner minimisation.
            log_g_img, log_g_txt = batch.anchor_log_g(s, products)
            target_img, target_txt = self.log_eps_plus(log_g_img), self.log_eps_plus(log_g_txt)

            pushed = False
            if self.num_valid == 0 or step % self.cfg.restart_every == 0:
                if self.bank_filled == 0:  # very first step: nothing older to start from
                    self.push_bank(batch.all_x, batch.all_y)
                    pushed = True
                self.restart()
            metrics: dict[str, Any] = {}
            for k in range(self.cfg.inner_steps):
                j, a_img_before, a_txt_before = self.prototype_step(batch.x, batch.y, target_img, target_txt, s)
                if k == 0:
                    metrics["proto_objective"] = j
                    # the normaliser-estimation error of the prediction BEFORE it saw this batch
                    metrics["alpha_mse"] = 0.5 * (((a_img_before - target_img) ** 2).mean()
                                                  + ((a_txt_before - target_txt) ** 2).mean())

            with torch.no_grad():
                pos_all = (batch.all_x * batch.all_y).sum(dim=1)
                alpha_img_all, alpha_txt_all = self.alphas(batch.all_x, batch.all_y, pos_all, s.detach())
            alpha_img, alpha_txt = alpha_img_all[batch.local_ids], alpha_txt_all[batch.local_ids]

            # Step 3: SogCLR's surrogate with u = exp(alpha); value = Eq. N1's objective on the local anchors.
            surrogate = batch.weighted_negatives(s, products, (alpha_img, alpha_txt),
                                                 (alpha_img_all, alpha_txt_all))
            del products
            value = 0.5 * (conjugate_value(target_img, alpha_img).mean() + conjugate_value(target_txt, alpha_txt).mean())
            loss = with_value(value, surrogate)
            extra = None
            if self.cfg.temperature_term:
                extra = (alpha_img.mean() + alpha_txt.mean()) / (2.0 * s)
            if not pushed:
                self.push_bank(batch.all_x, batch.all_y)
        metrics.update({"alpha_img": alpha_img.mean(), "alpha_txt": alpha_txt.mean(), "prototypes": self.num_valid})
        return ObjectiveOutput(loss=loss, metrics=metrics, extra_loss=extra)

    @torch.no_grad()
    def estimate_log_normalizers(self, image_features, text_features, scale, indices):
        """log Z from alpha (base.py's convention): g = exp(alpha) - eps, then `log_partition_from_log_g`.
        None before the first training step (no prototypes yet)."""
        if self.num_valid == 0:
            return None
        dtype = compute_dtype(image_features)
        x, y = image_features.to(dtype), text_features.to(dtype)
        s = scale.detach().to(dtype)
        pos = (x * y).sum(dim=1)
        out = {}
        for key, alpha in zip(("image", "text"), self.alphas(x, y, pos, s)):
            # log(exp(alpha) - eps), guarded where the prediction sits at the eps floor
            log_g = alpha + torch.log1p(-torch.clamp(self.cfg.eps * torch.exp(-alpha), max=1.0 - 1e-6))
            out[key] = log_partition_from_log_g(log_g, s * pos, self.ctx.dataset_size)
        return out
