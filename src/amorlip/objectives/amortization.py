"""AmorLIP's parts below the objective: the amortization networks lambda_l (Sec. 3.2) and the math of its two
stages as pure functions (the batch log partition, Eq. 12's combination, the Stage-I losses Eq. 8-10, the Stage-II
loss Eq. 6), each tested against a dense reference. `amorlip.objectives.amorlip.AmorLIPObjective` runs them
(Algorithm 1); the conventions are that module's docstring and docs/amorlip.md.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from amorlip.objectives.options import AMOR_LOSSES, ARCHS, FDIVS

FDIV_MAX_LOG_RATIO = 30.0
"""log(Z / lambda) beyond which the f-div losses continue linearly (finite fp32 gradients for a fresh net)."""


# ----------------------------------------------------------------------------------------------------
# Amortization networks


class AmortizationNet(nn.Module):
    """`log lambda(u) = MLP(psi(u))` for one modality (Sec. 3.2): (B, d) features -> (B,) log lambda."""

    def __init__(self, dim: int, hidden: int, arch: str = "mlp") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown amortizer arch {arch!r}; choose one of: {', '.join(ARCHS)}")
        self.arch = arch
        if arch == "mlp":  # the paper's three-layer MLP (Sec. 4, "AmorLIP implementation")
            self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.head = nn.Linear(hidden, 1)
        else:  # the released residual variant
            self.body = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                nn.Linear(hidden, dim), nn.ReLU(), nn.LayerNorm(dim),
            )
            self.head = nn.Linear(dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.body(features)
        if self.arch == "residual":
            h = torch.relu(h + features)
        return self.head(h).squeeze(-1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default init (U(+-1/sqrt(fan_in)) for Linear, ones/zeros for LayerNorm), drawn on the CPU
        from `generator`, so that every rank and every device gets the same weights from the same seed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                for p in (module.weight, module.bias):
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.fill_(0.0)


def net_pair(dim: int, hidden: int, arch: str) -> nn.ModuleDict:
    """One `AmortizationNet` per modality: {'image': ..., 'text': ...}."""
    return nn.ModuleDict({"image": AmortizationNet(dim, hidden, arch), "text": AmortizationNet(dim, hidden, arch)})


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 pass through (the tests check gradients in fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ----------------------------------------------------------------------------------------------------
# The math, as pure functions (tested against dense references)


def log_partition(logits: torch.Tensor, pos_index: torch.Tensor, pos_coef: float = 1.0) -> torch.Tensor:
    """Per row i: `log( (1/N) [pos_coef * exp(logits[i, p_i]) + sum_{j != p_i} exp(logits[i, j])] )`.

    `logits` (B, N): anchors against the N negatives (positive included); `pos_index` (B,): the column of
    each row's positive. The mean over N estimates the expectation in Eq. 2.
    """
    if pos_coef != 1.0:
        rows = torch.arange(logits.shape[0], device=logits.device)
        shift = torch.zeros_like(logits)
        shift[rows, pos_index] = math.log(pos_coef) if pos_coef > 0 else float("-inf")
        logits = logits + shift
    return torch.logsumexp(logits, dim=1) - math.log(logits.shape[1])


def combine_with_previous(log_z: torch.Tensor, log_prev: torch.Tensor | None, beta: float) -> torch.Tensor:
    """Eq. 12 in log space: `log(beta * exp(log_prev) + (1 - beta) * exp(log_z))`."""
    if log_prev is None or beta <= 0.0:
        return log_z
    if beta >= 1.0:
        return log_prev
    return torch.logaddexp(log_prev + math.log(beta), log_z + math.log1p(-beta))


def amortization_loss(
    log_lambda: torch.Tensor,
    log_target: torch.Tensor,
    log_z_batch: torch.Tensor,
    loss: str = "l2-log",
    fdiv: str = "kl",
    l2_coef: float = 0.1,
) -> torch.Tensor:
    """Stage-I loss for one modality, averaged over anchors; gradients reach `log_lambda` only.

    * l2-log (Eq. 10): `0.5 * mean_i (log lambda_i - log Z_i)^2`, Z the (combined) target.
    * f-div (Eq. 8) as its Monte-Carlo estimate over the batch pairs:
      `mean_ij exp(E_ij - log Z_i) f(Z_i / lambda_i) = mean_i exp(log Zhat_i - log Z_i) f(Z_i / lambda_i)`,
      Zhat the batch's own partition (`log_z_batch`), plus `l2_coef` * l2-log (App. D).
      f: kl `t log t - t + 1`; js `(t log t - (t+1) log((t+1)/2)) / 2`; kl-eq9 `t log t` (Eq. 9 literally).
      Computed in float64 on the B scalars (returns float64); beyond `log(Z/lambda) = FDIV_MAX_LOG_RATIO`
      f continues linearly in log lambda so that a fresh net gets a finite gradient of the right sign.
    """
    target = log_target.detach()
    l2 = 0.5 * (log_lambda - target).pow(2).mean()
    if loss == "l2-log":
        return l2
    if loss != "f-div":
        raise ValueError(f"unknown amortization loss {loss!r}; choose one of: {', '.join(AMOR_LOSSES)}")
    r = target.double() - log_lambda.double()  # log t, t = Z / lambda
    # Beyond log t = FDIV_MAX_LOG_RATIO (a fresh net far below a large log Z) f(e^r) continues linearly in
    # r with the slope it has there (C1, same sign), so the value and the fp32 gradient stay finite.
    r_c = r.clamp(max=FDIV_MAX_LOG_RATIO)
    t = torch.exp(r_c)
    if fdiv == "kl":
        f, slope = t * (r_c - 1.0) + 1.0, t * r_c  # t log t - t + 1: f(1) = f'(1) = 0, minimiser lambda = Z
    elif fdiv == "kl-eq9":
        f, slope = t * r_c, t * (r_c + 1.0)  # Eq. 9 as printed: f'(1) = 1 moves the minimiser to lambda = e Z
    elif fdiv == "js":
        softplus = nn.functional.softplus(r_c)
        f = 0.5 * (t * r_c - (t + 1.0) * (softplus - math.log(2.0)))
        slope = 0.5 * t * (r_c - softplus + math.log(2.0))  # = t f'(t) = (t/2) log(2t / (t + 1))
    else:
        raise ValueError(f"unknown f-divergence {fdiv!r}; choose one of: {', '.join(FDIVS)}")
    f = f + slope.detach() * (r - r_c)  # zero (value and gradient) below the cap
    weight = torch.exp(log_z_batch.detach().double() - target.double())
    return (weight * f).mean() + l2_coef * l2.double()


def amortized_nce_loss(
    pos_logits: torch.Tensor,
    log_z_img: torch.Tensor,
    log_z_txt: torch.Tensor,
    log_lambda_img: torch.Tensor,
    log_lambda_txt: torch.Tensor,
    max_log_ratio: float | None = None,
) -> torch.Tensor:
    """Stage II, Eq. 6 with both directions summed:

        L = -(2/B) sum_i s x_i.y_i + (1/B) sum_i exp(log Z_img_i - log lambda_img_i)
                                   + (1/B) sum_i exp(log Z_txt_i - log lambda_txt_i)

    `pos_logits`: `s x_i.y_i` WITHOUT the logit bias (Eq. 6 and the release; the bias enters the partitions only).

    `log_z_*` (with gradient): the anchors' batch log partitions (`log_partition`, mean convention), so
    `exp(log Z_i - log lambda_i)` is `(1/N) sum_j exp(E_ij) / lambda_i`, the per-anchor term of Eq. 6.
    `log_lambda_*` are detached (stop-grad, Eq. 5); `max_log_ratio` floors them at `log Z - max_log_ratio`.
    With `log lambda = sg(log Z)` the gradient equals that of the summed two-way InfoNCE (w.r.t. features and s;
    a logit bias b gets 2 from the partitions and nothing from the positive).
    """

    def term(log_z: torch.Tensor, log_lambda: torch.Tensor) -> torch.Tensor:
        log_lambda = log_lambda.detach().to(log_z.dtype)
        if max_log_ratio is not None:
            log_lambda = torch.maximum(log_lambda, log_z.detach() - max_log_ratio)
        return torch.exp(log_z - log_lambda).mean()

    return -2.0 * pos_logits.mean() + term(log_z_img, log_lambda_img) + term(log_z_txt, log_lambda_txt)
