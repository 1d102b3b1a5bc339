"""SogCLR and FastCLIP: the global contrastive loss (GCL) with per-sample moving-average estimators.

SogCLR: Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch Does
Not Harm Performance" (ICML 2022). FastCLIP: Wei et al., "FastCLIP: A Suite of Optimization Techniques to
Accelerate CLIP Training with Limited Resources" (2024). docs/baselines.md gives the math as implemented.

Notation: s = exp(logit_scale), x_i / y_i the normalised image / text features, N the global batch.
For an image anchor i and a text anchor j, over the NEGATIVES of the batch:

    g_i = 1/(N-1) sum_{j != i} exp(s (x_i.y_j - x_i.y_i))        h_j = 1/(N-1) sum_{i != j} exp(s (y_j.x_i - y_j.x_j))

GCL = 1/2 [ mean_i log g_i + mean_j log h_j ] over the dataset, where g_i is a mean over the whole dataset;
the per-sample estimators track it across epochs (the moving average of FastCLIP's Eq. (2), SogCLR's estimator):

    u_i <- (1 - gamma) u_i + gamma g_i(batch)      (gamma = 1 on a sample's first visit)

and the encoders follow the gradient of GCL with the 1/g factor replaced by 1/u (FastCLIP Alg. 1, line 9):

    grad = 1/2 [ mean_i (1/u_i) grad g_i + mean_j (1/v_j) grad h_j ]

which is the gradient of the surrogate `1/2 [mean_i g_i / sg(u_i) + mean_j h_j / sg(v_j)]`. The surrogate's
value is ~1 and says nothing, so the objective's `loss` reports the batch GCL `1/2 [mean log g + mean log h]`
and carries the surrogate's gradient (value + surrogate - sg(surrogate)). With `eps` > 0 (FastCLIP's default
1e-14, its release's `--fastclip_eps`) the objective is `log(eps + g)`: the weights are `1/(u + eps)` and the
reported value `1/2 [mean log(eps + g) + mean log(eps + h)]`.

We keep log u (float32, one per sample and modality) rather than u: the same memory, and exp(2 s) at
s = 100 overflows float32; every weight is computed as exp(logit - log u).

Multi-process (FastCLIP's scheme): features are gathered WITHOUT gradient; rank r back-propagates through
its local features only, as anchors (its rows against all candidates) and as candidates (all anchors, detached,
against its local columns), with the temperature detached in the second term so that every (anchor, candidate)
pair reaches s exactly once over the ranks (FastCLIP's `temperature_grad exact`; `release` keeps s attached in
both terms, as the released FastCLIP code does, so every pair reaches s twice). With the local batch B and global batch N = W B, the rank's
surrogate is scaled by W/N = 1/B, so after DDP averages the gradients every parameter, s included, sees the
1-process gradient of the concatenated batch. The updated log u of the local anchors are all-gathered with
their indices, so every rank holds identical buffers (and the remote anchors' weights use them).

FastCLIP versions (`fastclip.version`), all with gamma cosine-decayed from 1 to gamma_min over E epochs:
  0: GCL, the global temperature learnt by the surrogate's own gradient (use temperature.scheme plain);
  1: GCL, constant temperature (`fastclip.temperature`);
  3: RGCL-g (the default; the temperature update of FastCLIP Alg. 1, line 11): temperature.scheme
     rescaled gives `L / sg(s) + rho / s`, and this objective's `extra_loss = (mean log u + mean log v) / (2 s)`
     completes the gradient of `tau * GCL + rho * tau` (`temperature_grad exact`; `release`, the default, counts
     the surrogate's pair term twice in d/ds and takes log u without eps, as the released code does).
  2 (individual per-sample temperatures, iSogCLR's RGCL) is not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from amorlip import distributed
from amorlip.objectives import tiled
from amorlip.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from amorlip.objectives.options import FASTCLIP_VERSIONS, TEMPERATURE_GRADS, FastCLIPConfig, SogCLRConfig  # noqa: F401 - re-exported
from amorlip.schedules import cosine_ramp

U_CPU_THRESHOLD = 1_000_000
"""Datasets larger than this keep their u buffers in CPU memory by default (see docs/baselines.md)."""


# ----------------------------------------------------------------------------------------------------
# Shared math (also used by NeuCLIP, which replaces log u by its network's alpha).


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 features (per-sample statistics stay fp32), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: every rank calls this together. All ranks' features, detached, in rank order (one all_gather
    for both modalities)."""
    d = image_features.shape[1]
    both = distributed.gather_no_grad(torch.cat([image_features, text_features], dim=1))
    return both[:, :d], both[:, d:]


def negative_logits(
    similarities: torch.Tensor,
    positive_sim: torch.Tensor,
    scale: torch.Tensor,
    own: torch.Tensor,
) -> torch.Tensor:
    """`s (a_i.c_j - a_i.p_i)` from the anchors-by-candidates similarities `a_i.c_j`, with -inf where `own`
    marks candidate j as anchor i's own positive. `positive_sim` is a_i.p_i."""
    logits = scale * (similarities - positive_sim[:, None])
    return logits.masked_fill(own, float("-inf"))


def log_mean_exp_negatives(logits: torch.Tensor) -> torch.Tensor:
    """log( 1/(C-1) sum_{j != i} exp(logits_ij) ): the log of g_i, for rows masked by `negative_logits`."""
    return torch.logsumexp(logits, dim=1) - math.log(logits.shape[1] - 1)


def log_eps_plus(log_g: torch.Tensor, eps: float) -> torch.Tensor:
    """log(eps + g) from log g (log g itself for eps = 0)."""
    if eps <= 0.0:
        return log_g
    return torch.logaddexp(log_g, torch.full_like(log_g, math.log(eps)))


def log_partition_from_log_g(log_g: torch.Tensor, positive_logit: torch.Tensor, n: int) -> torch.Tensor:
    """Convert g (mean over the n-1 negatives of exp(s(x_i.y_j - x_i.y_i))) to base.py's convention.

    log Z_i = log( 1/n sum_j exp(s x_i.y_j) ), positive included
            = s x_i.y_i + log( (1 + (n-1) g_i) / n ).
    """
    return positive_logit + torch.logaddexp(torch.zeros_like(log_g), log_g + math.log(max(n - 1, 1))) - math.log(n)


@dataclass
class GlobalBatch:
    """One step's features, local (with grad) and gathered (detached), in the compute dtype."""

    x: torch.Tensor
    y: torch.Tensor
    all_x: torch.Tensor
    all_y: torch.Tensor
    local_ids: torch.Tensor
    all_ids: torch.Tensor
    tile: int = 0
    """Rows per strip of the tiled path (objectives/tiled.py); 0: the dense B x N products."""

    @property
    def local_size(self) -> int:
        return self.x.shape[0]

    @cached_property
    def own(self) -> torch.Tensor:
        """(B, N) True where global candidate j is local anchor i's own positive (made once per step)."""
        return self.local_ids[:, None] == self.all_ids[None, :]

    @property
    def size(self) -> int:
        return self.all_x.shape[0]

    @classmethod
    def build(cls, image_features: torch.Tensor, text_features: torch.Tensor,
              tile_size: int | None = 0) -> "GlobalBatch":
        """Collective: every rank calls this together (`gather_features`). This rank's anchors and every rank's
        features; `tile_size`: the objective's key (tiled.resolve_tile: None auto, 0 dense, t rows)."""
        dtype = compute_dtype(image_features)
        x, y = image_features.to(dtype), text_features.to(dtype)
        all_x, all_y = gather_features(x, y)
        b, device = x.shape[0], x.device
        local_ids = torch.arange(b, device=device) + b * distributed.rank()
        return cls(x, y, all_x, all_y, local_ids, torch.arange(all_x.shape[0], device=device),
                   tiled.resolve_tile(tile_size, b, all_x.shape[0]))

    def products(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`x @ all_y^T` and `y @ all_x^T` (B x N): the only two matmuls. Each serves two roles: along its rows
        the local anchors against every candidate, along its columns every (detached) anchor against the
        local candidates; in both the gradient reaches the local features through it. None when tiled (the
        strips are made, and remade in the backward pass, by objectives/tiled.py)."""
        if self.tile:
            return None
        return self.x @ self.all_y.T, self.y @ self.all_x.T

    @torch.no_grad()
    def anchor_log_g(self, scale: torch.Tensor, products: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """log g of the local anchors on this batch (detached): image anchors over s (x_i.y_j - x_i.y_i),
        text anchors over s (y_j.x_i - y_j.x_j), own positives excluded."""
        pos = (self.x * self.y).sum(dim=1)
        if products is None:  # tiled: logsumexp_{j != own} s a_i.c_j - s a_i.p_i, the own pair weighted 0
            n = self.size
            return tuple(  # type: ignore[return-value]
                tiled.log_sum_exps(a, c, scale, tile=self.tile, pos_index=self.local_ids, pos_coef=0.0,
                                   cols=False)[0] - scale * pos - math.log(n - 1)
                for a, c in ((self.x, self.all_y), (self.y, self.all_x))
            )
        xy, yx = products
        return tuple(  # type: ignore[return-value]
            log_mean_exp_negatives(negative_logits(sim, pos, scale, self.own)) for sim in (xy, yx)
        )

    def weighted_negatives(
        self,
        scale: torch.Tensor,
        products: tuple[torch.Tensor, torch.Tensor],
        log_den_local: tuple[torch.Tensor, torch.Tensor],
        log_den_all: tuple[torch.Tensor, torch.Tensor],
        column_scale_grad: bool = False,
    ) -> torch.Tensor:
        """The rank's share of `1/2 [mean_i g_i / sg(u_i) + mean_j h_j / sg(v_j)]` (SogCLR's gradient estimator).

        Four terms, two per product: the local anchors against all candidates (rows; graph into the anchors,
        their positives and s) and all anchors, detached and with sg(s), against the local candidates
        (columns; the gradient reaches a local sample as a negative of any anchor, once). `column_scale_grad`
        keeps s attached in the columns too (the released FastCLIP code): every pair then reaches s twice. `log_den_*` are the
        (image, text) anchors' log denominators (log u, or NeuCLIP's alpha), detached, for the local anchors
        and for all anchors of the global batch. Scaled by 1/(2 B (N-1)) so that the ranks' gradients,
        averaged by DDP, are the 1-process gradient of the concatenated batch.
        """
        pos_local = (self.x * self.y).sum(dim=1)
        pos_all = (self.all_x * self.all_y).sum(dim=1)
        s_detached = scale if column_scale_grad else scale.detach()
        if products is None:  # tiled: each product's row and column terms in one pass over its strips
            total = (
                tiled.exp_weight_sum(self.x, self.all_y, pos_local, pos_all, scale, s_detached, log_den_local[0],
                                     log_den_all[1], self.local_ids, tile=self.tile)
                + tiled.exp_weight_sum(self.y, self.all_x, pos_local, pos_all, scale, s_detached, log_den_local[1],
                                       log_den_all[0], self.local_ids, tile=self.tile)
            )
            return total / (2 * self.local_size * (self.size - 1))
        xy, yx = products
        terms = (  # (similarities, positives, s, log denominators, anchors along rows (0) or columns (1))
            (xy, pos_local, scale, log_den_local[0], 0),  # image anchors x_i vs texts
            (yx, pos_local, scale, log_den_local[1], 0),  # text anchors y_j vs images
            (yx, pos_all, s_detached, log_den_all[0], 1),  # every image anchor vs the local texts
            (xy, pos_all, s_detached, log_den_all[1], 1),  # every text anchor vs the local images
        )
        total = sum(ExpWeightSum.apply(sim, pos, sc, den.detach(), self.own, axis) for sim, pos, sc, den, axis in terms)
        return total / (2 * self.local_size * (self.size - 1))


class ExpWeightSum(torch.autograd.Function):
    """`sum_ij exp(s (S_ij - p_a) - d_a)` over the pairs that are not `own`, a the anchor of the pair (the row
    index i for axis 0, the column index j for axis 1); one B x N buffer of weights, no intermediate graph.

    The same value and gradients as the composition of autograd ops (tests compare the two): w = the
    weights, d/dS = s w, d/dp_a = -s sum(w over a's pairs), d/ds = sum(w (S - p)). `d` gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, sim: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor, log_den: torch.Tensor,
                own: torch.Tensor, axis: int) -> torch.Tensor:
        shape = (-1, 1) if axis == 0 else (1, -1)
        diff = sim - pos.view(shape)
        weights = diff * scale
        weights.sub_(log_den.view(shape)).exp_().masked_fill_(own, 0.0)
        ctx.save_for_backward(weights, diff if ctx.needs_input_grad[2] else None, scale)
        ctx.axis = axis
        return weights.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        weights, diff, scale = ctx.saved_tensors
        g = weights * grad
        grad_scale = (g * diff).sum().reshape(scale.shape) if ctx.needs_input_grad[2] else None
        grad_pos = g.sum(dim=1 - ctx.axis).mul_(-scale) if ctx.needs_input_grad[1] else None
        grad_sim = g.mul_(scale) if ctx.needs_input_grad[0] else None
        return grad_sim, grad_pos, grad_scale, None, None, None


def with_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is `value` and whose gradient is the surrogate's."""
    return value.detach() + (surrogate - surrogate.detach())


def no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off for the enclosed math: per-sample statistics are computed in fp32 (or fp64)."""
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------------------------------


class SogCLRObjective(Objective):
    """GCL with per-sample moving averages u (images) and v (texts), constant gamma."""

    needs_indices = True
    partition_without_positive = True

    _cpu_buffers = ("log_u_img", "log_u_txt", "visited")

    def __init__(self, cfg: Any, ctx: ObjectiveContext) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), ctx)
        n = int(ctx.dataset_size)
        if n < 2:
            raise ValueError(f"{self.name} needs the dataset size (got {n}); set --data.dataset-size")
        self.u_on_cpu = self.cfg.u_on_cpu if self.cfg.u_on_cpu is not None else n > U_CPU_THRESHOLD
        device = torch.device("cpu") if self.u_on_cpu else ctx.device
        # log u per sample, float32 (see the module docstring); `visited` marks samples seen at least once.
        self.register_buffer("log_u_img", torch.zeros(n, dtype=torch.float32, device=device))
        self.register_buffer("log_u_txt", torch.zeros(n, dtype=torch.float32, device=device))
        self.register_buffer("visited", torch.zeros(n, dtype=torch.bool, device=device))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """`.to(device)` / `.half()` leave the u buffers alone when they are kept in CPU memory (fp32)."""
        if not getattr(self, "u_on_cpu", False):
            return super()._apply(fn, recurse)
        kept = {name: self._buffers.pop(name) for name in self._cpu_buffers}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    # -- hooks FastCLIP overrides ----------------------------------------------------------------------
    def gamma(self, epoch: int) -> float:
        return float(self.cfg.gamma)

    def effective_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The s the loss uses: the model's, or a constant (still connected to the graph with zero gradient,
        so DDP sees logit_scale used)."""
        if self.cfg.temperature is None:
            return scale
        return scale * 0.0 + 1.0 / self.cfg.temperature

    def temperature_term(
        self, log_u_img: torch.Tensor, log_u_txt: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor | None:
        return None

    def column_scale_grad(self) -> bool:
        """Whether s keeps its gradient in the column block (FastCLIP's `temperature_grad release`)."""
        return False

    # -- the step --------------------------------------------------------------------------------------
    def update_estimators(
        self, indices: torch.Tensor, log_g_img: torch.Tensor, log_g_txt: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective: every rank calls this together (`gather_no_grad`). u <- (1-gamma) u + gamma g for the
        local anchors (gamma = 1 on first visits), in log space; then all-gather (indices, new values) and write
        the whole global batch into the buffers on every rank.

        Returns the new log u / log v of the local anchors and of all anchors of the global batch (values
        as stored, float32, cast to the compute dtype) and the fraction of first visits in the local batch.
        """
        dtype = log_g_img.dtype
        buf_idx = indices.to(self.visited.device)
        seen = self.visited[buf_idx].to(log_g_img.device)
        new = []
        for buf, log_g in ((self.log_u_img, log_g_img), (self.log_u_txt, log_g_txt)):
            if gamma >= 1.0:
                log_u = log_g
            else:
                old = buf[buf_idx].to(device=log_g.device, dtype=dtype)
                moved = torch.logaddexp(old + math.log1p(-gamma), log_g + math.log(gamma))
                log_u = torch.where(seen, moved, log_g)
            new.append(log_u.to(torch.float32))
        meta = torch.stack([indices.to(torch.float64), new[0].double(), new[1].double()], dim=1)
        meta = distributed.gather_no_grad(meta)  # indices < 2^53 travel exactly in float64
        all_idx = meta[:, 0].round().long().to(self.visited.device)
        all_img, all_txt = meta[:, 1].float(), meta[:, 2].float()
        self.log_u_img[all_idx] = all_img.to(self.log_u_img.device)
        self.log_u_txt[all_idx] = all_txt.to(self.log_u_txt.device)
        self.visited[all_idx] = True
        first = (~seen).float().mean()
        return new[0].to(dtype), new[1].to(dtype), all_img.to(dtype), all_txt.to(dtype), first

    def forward(self, image_features, text_features, scale, bias, indices, *, step, epoch) -> ObjectiveOutput:
        """Collective: every rank calls this together (`GlobalBatch.build`, `update_estimators`)."""
        with no_autocast(image_features.device):
            batch = GlobalBatch.build(image_features, text_features, self.cfg.tile_size)
            s = self.effective_scale(scale).to(batch.x.dtype)
            products = batch.products()
            log_g_img, log_g_txt = batch.anchor_log_g(s, products)
            gamma = self.gamma(epoch)
            lu_img, lu_txt, lu_img_all, lu_txt_all, first = self.update_estimators(indices, log_g_img, log_g_txt, gamma)
            eps = float(self.cfg.eps)  # weights 1/(u + eps): log denominators log(eps + u)
            surrogate = batch.weighted_negatives(
                s, products, (log_eps_plus(lu_img, eps), log_eps_plus(lu_txt, eps)),
                (log_eps_plus(lu_img_all, eps), log_eps_plus(lu_txt_all, eps)), self.column_scale_grad(),
            )
            del products
            gcl = 0.5 * (log_eps_plus(log_g_img, eps).mean() + log_eps_plus(log_g_txt, eps).mean())
            loss = with_value(gcl, surrogate)
            extra = self.temperature_term(lu_img, lu_txt, s)
        metrics = {
            "gamma": gamma,
            "log_u_img": lu_img.mean().detach(),
            "log_u_txt": lu_txt.mean().detach(),
            "first_visits": first,
        }
        return ObjectiveOutput(loss=loss, metrics=metrics, extra_loss=extra)

    @torch.no_grad()
    def estimate_log_normalizers(self, image_features, text_features, scale, indices):
        """log Z from the stored u (base.py's convention, via `log_partition_from_log_g`); NaN for samples
        never visited. u was tracked at the loss's temperature (the constant one when configured)."""
        dtype = compute_dtype(image_features)
        x, y = image_features.to(dtype), text_features.to(dtype)
        s = self.effective_scale(scale.detach()).to(dtype)
        pos = s * (x * y).sum(dim=1)
        buf_idx = indices.to(self.visited.device)
        seen = self.visited[buf_idx].to(x.device)
        out = {}
        for key, buf in (("image", self.log_u_img), ("text", self.log_u_txt)):
            log_u = buf[buf_idx].to(device=x.device, dtype=dtype)
            log_z = log_partition_from_log_g(log_u, pos, self.ctx.dataset_size)
            out[key] = torch.where(seen, log_z, torch.full_like(log_z, float("nan")))
        return out


class FastCLIPObjective(SogCLRObjective):
    """FastCLIP (v3 = RGCL-g by default): SogCLR's estimators with gamma cosine-decayed per epoch."""

    def gamma(self, epoch: int) -> float:
        """FastCLIP's inner-rate schedule: cosine from 1 (epoch 0) to gamma_min at epoch E, then constant."""
        return cosine_ramp(epoch, self.cfg.gamma_decay_epochs, 1.0, self.cfg.gamma_min)

    def effective_scale(self, scale: torch.Tensor) -> torch.Tensor:
        if self.cfg.version == 1:
            return scale * 0.0 + 1.0 / self.cfg.temperature
        return scale

    def column_scale_grad(self) -> bool:
        return self.cfg.temperature_grad == "release"

    def temperature_term(
        self, log_u_img: torch.Tensor, log_u_txt: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor | None:
        """RGCL-g's temperature term `(mean log(eps + u) + mean log(eps + v)) / (2 s)` (v3 only; u, v detached).

        With the trainer's `L / sg(s) + rho / s` it makes d/ds the derivative of `tau GCL_eps(tau) + rho tau`
        (tau = 1/s) with g replaced by u (`exact`), and leaves the encoders' gradient `L / s` unchanged.
        `release` takes `log u` without eps, as the released code does.
        """
        if self.cfg.version != 3:
            return None
        eps = 0.0 if self.cfg.temperature_grad == "release" else float(self.cfg.eps)
        log_u = log_eps_plus(log_u_img.detach(), eps).mean() + log_eps_plus(log_u_txt.detach(), eps).mean()
        return log_u / (2.0 * scale)
