"""AmorLIP: contrastive language-image pretraining with amortized partition functions.

Sun et al., "AmorLIP: Efficient Language-Image Pretraining via Amortization" (NeurIPS 2025).
Equation numbers below refer to that paper; docs/amorlip.md gives the math as implemented.

Per modality l in {image, text} a small network predicts the log partition function of its anchors,
`log lambda_l(u) = MLP_l(psi_l(u))` (Sec. 3.2), on the DETACHED normalised feature. Each training step
(Algorithm 1):

* Stage I (every `t_online` steps): fit the online net to the batch's partition target
  `log Z_comb` (Eq. 12: the batch's log partition mixed with the previous epoch's frozen target net)
  with `t_lambda` Adam steps of the l2-log (Eq. 10) or an f-divergence (Eq. 8/9) loss; the batch is
  gathered (without gradient) from all ranks, so the target is global and every rank takes the same steps.
* Target net: an EMA of the online net every `t_target` steps (Eq. 11).
* Stage II: the encoders' loss Eq. 6, each ratio `exp(log Z_batch_i - log lambda_i)`, with lambda from
  the target net (`divide_by=target`, the paper), the online net (`online`), or this batch's `Z_comb`
  (`comb`, the released code, the default).
* At every epoch start (Algorithm 1 line 4) the previous-epoch net becomes a frozen copy of the target,
  and the online and target nets are re-initialised (or warm-started) with a fresh Adam.

Convention: every partition function here is the MEAN over the negatives, `Z_i = (1/N) sum_j
w_ij exp(s x_i.y_j + b)` with `w_ii = pos_coef`, `w_ij = 1` otherwise, so lambda does not depend on the
batch or world size, and a local-negatives Stage II against a global target stays consistent.

The networks and the math of both stages, as pure functions, are `amorlip.objectives.amortization` (re-exported
here); this module is the objective that runs them.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from amorlip import distributed
from amorlip.checkpoint import load_optimizer_state
from amorlip.objectives import tiled
from amorlip.objectives.amortization import (
    FDIV_MAX_LOG_RATIO,
    AmortizationNet,
    amortization_loss,
    amortized_nce_loss,
    combine_with_previous,
    log_partition,
    net_pair,
    upcast,
)
from amorlip.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from amorlip.objectives.options import (  # noqa: F401 - re-exported
    AMOR_LOSSES, ARCHS, DIVIDE_BY, FDIVS, REINITS, STAGE2_NEGATIVES, AmorConfig,
)
from amorlip.schedules import cosine_ramp


class AmorLIPObjective(Objective):
    """`--objective amorlip`: Algorithm 1 of the paper (see the module docstring and docs/amorlip.md)."""

    def __init__(self, cfg: AmorConfig | None, ctx: ObjectiveContext) -> None:
        """Collective: every rank builds the objective together (the nets' seed is broadcast from rank 0)."""
        cfg = cfg if cfg is not None else AmorConfig()
        cfg.validate()
        super().__init__(cfg, ctx)
        dim = int(ctx.embed_dim)
        hidden = max(1, int(round(cfg.dim_factor * dim)))
        self.amortizer = net_pair(dim, hidden, cfg.arch)  # online nets lambda_theta
        self.target_net = net_pair(dim, hidden, cfg.arch)  # EMA nets lambda_theta_hat (Eq. 11)
        self.previous_net = net_pair(dim, hidden, cfg.arch)  # frozen target of the previous epoch (Eq. 12)
        for p in [*self.target_net.parameters(), *self.previous_net.parameters()]:
            p.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.amortizer.parameters(), lr=cfg.lr)

        # The re-initialisation seed comes from torch's RNG (seeded by the trainer with train.seed) and is
        # broadcast, so all ranks build identical nets; re-inits use it with the epoch, never the global RNG.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        self._seed = int(distributed.broadcast_(seed.to(ctx.device)).item())
        self._started_epoch: int | None = None
        self._epoch_start_step: int | None = None
        self._has_previous = False
        self._ema_updates = 0
        self._stage1_updates = 0
        self._needs_bias_init = False
        self._last_bias: float | None = None
        self._reinitialise(epoch=-1)

    # --- epoch boundary (Algorithm 1 line 4) -----------------------------------------------------------

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self._seed + 1_000_003 * (epoch + 2)) % 2**63)

    @torch.no_grad()
    def _reinitialise(self, epoch: int) -> None:
        """Fresh online nets (or warm-started from the previous-epoch net); target = online; fresh Adam."""
        if self.cfg.reinit == "warm" and self._has_previous:
            self.amortizer.load_state_dict(self.previous_net.state_dict())
            self._needs_bias_init = False
        else:
            gen = self._generator(epoch)
            for net in self.amortizer.values():
                net.reset_parameters(gen)
            self._needs_bias_init = self.cfg.init_bias
        self.target_net.load_state_dict(self.amortizer.state_dict())
        self.optimizer.state.clear()
        self._ema_updates = 0

    def on_epoch_start(self, epoch: int) -> None:
        """Previous-epoch net <- current target (frozen); re-initialise online and target nets, fresh Adam.

        Idempotent for a given epoch (a resume at an epoch boundary may call it again).
        """
        if self._started_epoch == epoch:
            return
        if self._started_epoch is not None:  # a previous epoch ran: its target net becomes lambda^(t-1)
            with torch.no_grad():
                self.previous_net.load_state_dict(self.target_net.state_dict())
            self._has_previous = True
        self._reinitialise(epoch)
        self._started_epoch = epoch
        self._epoch_start_step = None

    def beta(self, epoch: int) -> float:
        """beta_t of Eq. 12: cosine ramp 0 -> beta_T over `beta_decay_epochs`; 0 without a previous net."""
        if not self._has_previous:
            return 0.0
        span = self.cfg.beta_decay_epochs if self.cfg.beta_decay_epochs is not None else self.ctx.total_epochs
        return cosine_ramp(epoch, span, 0.0, self.cfg.beta_final)

    # --- Stage I (Algorithm 1 line 7) and the target net (line 8) -------------------------------------

    def _targets(
        self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
        beta: float,
    ) -> dict[str, torch.Tensor]:
        """Batch log partitions and Z_comb targets (Eq. 12) of both modalities, fp32, no gradient."""
        with torch.no_grad():
            n = image_features.shape[0]
            idx = torch.arange(n, device=image_features.device)
            tile = tiled.resolve_tile(self.cfg.tile_size, n, n)
            if tile:
                lse_i, lse_t, _ = tiled.log_sum_exps(
                    image_features, text_features, scale.detach().float(),
                    None if bias is None else bias.detach().float(), tile=tile, pos_index=idx, pos_coef=self.cfg.pos_coef)
                out = {"z_image": lse_i - math.log(n), "z_text": lse_t - math.log(n)}
            else:
                logits = scale.detach().float() * image_features @ text_features.T
                if bias is not None:
                    logits = logits + bias.detach().float()
                out = {"z_image": log_partition(logits, idx, self.cfg.pos_coef),
                       "z_text": log_partition(logits.T, idx, self.cfg.pos_coef)}
            for key, feats in (("image", image_features), ("text", text_features)):
                prev = self.previous_net[key](feats) if beta > 0 else None
                out[f"target_{key}"] = combine_with_previous(out[f"z_{key}"], prev, beta)
        return out

    def amortize(
        self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
        bias: torch.Tensor | None, beta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Collective: every rank calls this together on the same steps. Stage I: `t_lambda` Adam steps of the
        amortization loss on all ranks' (detached) batch.

        Collectives: one all_gather of the features, plus one all_reduce per Adam step with `sync_grads`.
        Returns the amortization loss at the first (`amor_loss`, before any update on this batch) and at the
        last of the `t_lambda` iterations (`amor_loss_last`).
        """
        cfg = self.cfg
        local = torch.cat([image_features.detach(), text_features.detach()], dim=1)
        both = distributed.gather_no_grad(local).float()
        x, y = both.split(image_features.shape[1], dim=1)
        tg = self._targets(x, y, scale, bias, beta)

        if self._needs_bias_init:  # optional: start the fresh nets at the batch's mean target
            with torch.no_grad():
                for key, feats in (("image", x), ("text", y)):
                    shift = (tg[f"target_{key}"] - self.amortizer[key](feats)).mean()
                    self.amortizer[key].head.bias.add_(shift)
                    self.target_net[key].head.bias.add_(shift)
            self._needs_bias_init = False

        params = [p for p in self.amortizer.parameters()]
        first = last = torch.zeros(())
        with torch.enable_grad():
            for it in range(cfg.t_lambda):
                loss = sum(
                    amortization_loss(self.amortizer[key](feats), tg[f"target_{key}"], tg[f"z_{key}"],
                                      cfg.loss, cfg.fdiv, cfg.fdiv_l2_coef)
                    for key, feats in (("image", x), ("text", y))
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.sync_grads and distributed.world_size() > 1:
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    flat = distributed.all_reduce_mean_(torch.cat([g.reshape(-1) for g in grads]))
                    for p, g in zip(params, flat.split([p.numel() for p in params])):
                        p.grad = g.view_as(p).clone()
                self.optimizer.step()
                if it == 0:
                    first = loss.detach()
                last = loss.detach()
            self.optimizer.zero_grad(set_to_none=True)
        self._stage1_updates += 1
        return {"amor_loss": first, "amor_loss_last": last}

    @torch.no_grad()
    def update_target(self) -> None:
        """Eq. 11: theta_hat <- a * theta_hat + (1 - a) * theta; with `ema_debias`, a = alpha (1 - alpha^(k-1)) /
        (1 - alpha^k) at the k-th update since the re-init (the bias-corrected EMA of the online iterates)."""
        self._ema_updates += 1
        alpha = self.cfg.alpha
        if self.cfg.ema_debias:
            k = self._ema_updates
            alpha = alpha * (1.0 - alpha ** (k - 1)) / (1.0 - alpha**k)
        for p_hat, p in zip(self.target_net.parameters(), self.amortizer.parameters()):
            p_hat.mul_(alpha).add_(p.detach(), alpha=1.0 - alpha)

    # --- the step ---------------------------------------------------------------------------------------

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        indices: torch.Tensor,
        *,
        step: int,
        epoch: int,
    ) -> ObjectiveOutput:
        """Collective: every rank calls this together at every step (Stage I's gathers on its steps, Stage II's
        with `stage2_negatives global`). One step of Algorithm 1: Stage I every `t_online` steps within the epoch,
        the target net's EMA every `t_target`, then the Stage-II loss; metrics for the log."""
        cfg = self.cfg
        if self.training and self._started_epoch != epoch:
            self.on_epoch_start(epoch)
        if self.training and self._epoch_start_step is None:
            self._epoch_start_step = step
        k = step - (self._epoch_start_step or 0)  # step within the epoch (Algorithm 1's k, 0-based)
        beta = self.beta(epoch)
        self._last_bias = None if bias is None else float(bias.detach())
        metrics: dict[str, Any] = {"beta": beta}

        # The amortization nets and the loss run in fp32 even under autocast (DESIGN: numerics).
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            if self.training:
                if k % cfg.t_online == 0:  # Stage I (line 7)
                    metrics.update(self.amortize(image_features, text_features, scale, bias, beta))
                if k % cfg.t_target == 0:  # target net (line 8)
                    self.update_target()
            loss, stage2_metrics = self._stage2(upcast(image_features), upcast(text_features), upcast(scale),
                                                bias, beta)
        metrics.update(stage2_metrics)
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def _stage2(
        self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, beta: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Collective with `stage2_negatives global` (every rank calls this together: `gather_with_grad`).
        Stage II (line 9): Eq. 6 over local pairs, or local anchors against all ranks' pairs (global)."""
        cfg = self.cfg
        b = x.shape[0]
        if cfg.stage2_negatives == "global" and distributed.world_size() > 1:
            both = distributed.gather_with_grad(torch.cat([x, y], dim=1))
            x_all, y_all = both.split(x.shape[1], dim=1)
            offset = b * distributed.rank()
        else:
            x_all, y_all, offset = x, y, 0
        pos_index = torch.arange(b, device=x.device) + offset
        pos_logits = scale * (x * y).sum(dim=1)  # Eq. 6's positive term: no logit bias (as the release)
        log_z = self._batch_log_partitions(x, y, x_all, y_all, scale, bias, pos_index)

        with torch.no_grad():
            feats = {"image": x.detach().float(), "text": y.detach().float()}
            estimate = {key: self.target_net[key](feats[key]) for key in feats}
            divisor = self._divisors(log_z, feats, estimate, beta)

        loss = amortized_nce_loss(pos_logits, log_z["image"], log_z["text"], divisor["image"], divisor["text"],
                                  cfg.max_log_ratio)
        metrics = {}
        with torch.no_grad():
            for key, short in (("image", "img"), ("text", "txt")):
                metrics[f"log_lambda_{short}"] = estimate[key].mean()
                metrics[f"log_z_{short}"] = log_z[key].detach().mean()
                metrics[f"log_lambda_mae_{short}"] = (estimate[key] - log_z[key].detach()).abs().mean()
        return loss, metrics

    def _batch_log_partitions(
        self, x: torch.Tensor, y: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor, scale: torch.Tensor,
        bias: torch.Tensor | None, pos_index: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Stage II's log partitions (with gradient) of the local image and text anchors against `y_all` /
        `x_all` (`x_all is x`: the local pairs), dense or in row strips with `tile_size`."""
        cfg = self.cfg
        tile = tiled.resolve_tile(cfg.tile_size, x.shape[0], y_all.shape[0])
        if tile:  # the same log partitions in row strips (objectives/tiled.py), no B x N matrix kept
            ub = None if bias is None else upcast(bias)
            n = y_all.shape[0]
            if x_all is x:  # local pairs: the text anchors' partitions are the columns of the same matrix
                lse_i, lse_t, _ = tiled.log_sum_exps(x, y, scale, ub, tile=tile, pos_index=pos_index,
                                                     pos_coef=cfg.pos_coef)
            else:
                lse_i, _, _ = tiled.log_sum_exps(x, y_all, scale, ub, tile=tile, pos_index=pos_index,
                                                 pos_coef=cfg.pos_coef, cols=False)
                lse_t, _, _ = tiled.log_sum_exps(y, x_all, scale, ub, tile=tile, pos_index=pos_index,
                                                 pos_coef=cfg.pos_coef, cols=False)
            return {"image": lse_i - math.log(n), "text": lse_t - math.log(n)}
        logits_img = scale * x @ y_all.T
        if bias is not None:
            logits_img = logits_img + upcast(bias)
        if x_all is x:  # local pairs: the text-anchor matrix is the image-anchor one transposed
            logits_txt = logits_img.T
        else:
            logits_txt = scale * y @ x_all.T
            if bias is not None:
                logits_txt = logits_txt + upcast(bias)
        return {"image": log_partition(logits_img, pos_index, cfg.pos_coef),
                "text": log_partition(logits_txt, pos_index, cfg.pos_coef)}

    def _divisors(self, log_z: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
                  estimate: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
        """Stage II's lambda per modality (`divide_by`), under no_grad: this batch's Z_comb, the target net's
        `estimate` or the online net's output."""
        if self.cfg.divide_by == "comb":  # this batch's Z_comb (released code, flag fit_w_prev)
            return {
                key: combine_with_previous(log_z[key].detach(),
                                           self.previous_net[key](feats[key]) if beta > 0 else None, beta)
                for key in feats
            }
        if self.cfg.divide_by == "target":  # the paper: the target net's output
            return estimate
        return {key: self.amortizer[key](feats[key]) for key in feats}

    # --- diagnostics --------------------------------------------------------------------------------------

    estimate_variants = ("online",)
    """Other nets whose estimates the normalizer diagnostics also score (`objective_online/...`): the online
    net that Stage I trains, beside the EMA target net that `estimate_log_normalizers` reads by default."""

    @torch.no_grad()
    def estimate_log_normalizers(
        self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor,
        net: str = "target",
    ) -> dict[str, torch.Tensor]:
        """The target net's estimate (`net="online"`: the online net's, `"previous"`: the previous epoch's),
        converted to base.py's convention (mean over the dataset, positive counted once, no logit bias):
        subtract the bias last seen in training, and move the positive's weight from `pos_coef` to 1 with the
        dataset size N: `log(lambda + (1 - pos_coef)/N exp(s x_i.y_i))`."""
        nets = {"target": self.target_net, "online": self.amortizer, "previous": self.previous_net}
        if net not in nets:
            raise ValueError(f"net={net!r} is not one of: {', '.join(nets)}")
        x, y = upcast(image_features), upcast(text_features)
        pos = upcast(scale.detach()) * (x * y).sum(-1)
        n = max(1, int(self.ctx.dataset_size))
        out = {}
        for key, feats in (("image", x), ("text", y)):
            log_lam = nets[net][key](feats.float()).to(pos.dtype)
            if self._last_bias is not None:
                log_lam = log_lam - self._last_bias
            c = 1.0 - self.cfg.pos_coef
            if c > 0:
                log_lam = torch.logaddexp(log_lam, pos + math.log(c / n))
            elif c < 0:  # remove the excess positive weight; floor keeps the log finite
                excess = torch.exp(pos + math.log(-c / n) - log_lam).clamp(max=1.0 - 1e-6)
                log_lam = log_lam + torch.log1p(-excess)
            out[key] = log_lam
        return out

    # --- checkpointing ------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "seed": self._seed,
            "started_epoch": self._started_epoch,
            "epoch_start_step": self._epoch_start_step,
            "has_previous": self._has_previous,
            "ema_updates": self._ema_updates,
            "stage1_updates": self._stage1_updates,
            "needs_bias_init": self._needs_bias_init,
            "last_bias": self._last_bias,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("this checkpoint's AmorLIP state is not in a format this version can read (version 1)")
        # the moments from the checkpoint, amor.lr from this run's settings (a change accepted on resume applies)
        load_optimizer_state(self.optimizer, copy.deepcopy(state["optimizer"]))
        self._seed = int(state["seed"])
        self._started_epoch = state["started_epoch"]
        self._epoch_start_step = state["epoch_start_step"]
        self._has_previous = bool(state["has_previous"])
        self._ema_updates = int(state["ema_updates"])
        self._stage1_updates = int(state["stage1_updates"])
        self._needs_bias_init = bool(state["needs_bias_init"])
        self._last_bias = state["last_bias"]


__all__ = [
    "AmorConfig",
    "FDIV_MAX_LOG_RATIO",
    "AmortizationNet",
    "AmorLIPObjective",
    "amortization_loss",
    "amortized_nce_loss",
    "combine_with_previous",
    "log_partition",
]
