"""Tiled exact losses: the objectives' B x N sums computed in row strips, never holding a B x N matrix.

Every in-batch objective reduces the similarity matrix `L_ij = s x_i.y_j + b` (rows: this rank's anchors,
columns: the candidates, possibly gathered from all ranks) to per-row or per-column scalars:

* CLIP and AmorLIP: the row and column log-sum-exps `logsumexp_j (L_ij + w_ij)` and `logsumexp_i (L_ij + w_ij)`,
  `w_ij = log pos_coef` at each row's positive and 0 elsewhere (`TiledLogSumExp`);
* SigLIP: the pairwise sum `sum_ij softplus(L_ij)` (its positive pairs are corrected with O(B d) work,
  `softplus(-a) = softplus(a) - a`) (`TiledSoftplusSum`);
* SogCLR / FastCLIP / NeuCLIP: the anchors' log g (row log-sum-exps, the own pair weighted 0), the surrogate's
  row and column sums of weighted exponentials of one product (`TiledExpWeightSum`), and NeuCLIP's B x m
  prototype log-sum-exps.

The forward pass walks strips of `tile` rows: each strip `L[r0:r1, :]` (tile x N) gives its rows' log-sum-exps at
once, and the columns' log-sum-exps are accumulated online (running max and rescaled sum, as flash attention
does). The backward pass recomputes each strip and forms its gradient `G = dloss/dL` from the saved
log-sum-exps, then `dX = s G Y`, `dY = s G^T X`, `ds = sum_ij G_ij x_i.y_j = sum_i x_i.(G Y)_i`, `db = sum G`.
Only the features, the B + N saved scalars and a few tile x N strips are alive at any time: memory
O((B + N) d + tile N) instead of O(B N). The results equal the dense computation up to rounding.

Half-precision inputs are computed in fp32 (the dense objectives upcast too, or run the B x N logsumexp in fp32).

The tile size is each objective's `tile_size` key (`resolve_tile`):
  None (default, auto): dense while B x N <= AUTO_DENSE_ENTRIES (2048 x 2048), else strips of
        max(AUTO_MIN_ROWS, AUTO_TILE_ENTRIES // N) rows (a strip of ~2M entries, 8 MiB in fp32);
  0: never tiled (the dense reference);
  t > 0: strips of t rows; t >= B means a single strip, i.e. the dense computation.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from amorlip.objectives.options import validate_tile_size

AUTO_DENSE_ENTRIES = 2048 * 2048
"""Auto tiling leaves a B x N matrix of at most this many entries dense (16 MiB in fp32)."""
AUTO_TILE_ENTRIES = 2**21
"""Auto tiling's strip size in entries: tile = AUTO_TILE_ENTRIES // N rows (8 MiB per fp32 strip)."""
AUTO_MIN_ROWS = 32
"""Auto tiling never uses strips of fewer rows (tiny matmuls would dominate)."""

TILE_SIZE_HELP = (
    "Rows per tile of the tiled exact loss (never holds the B x N logits): null = auto (dense up to "
    "2048 x 2048, then ~2M-entry strips), 0 = never tiled, t >= B = dense."
)


def resolve_tile(tile_size: int | None, rows: int, cols: int) -> int:
    """Rows per strip for a rows x cols loss, or 0 for the dense computation (see the module docstring)."""
    if tile_size is None:
        if rows * cols <= AUTO_DENSE_ENTRIES:
            return 0
        tile = max(AUTO_MIN_ROWS, AUTO_TILE_ENTRIES // max(1, cols))
    else:
        tile = int(tile_size)
    if tile <= 0 or tile >= rows:
        return 0
    return tile


def _compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    dt = ts[0].dtype
    for t in ts[1:]:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def _strip(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           pos_index: torch.Tensor | None, log_pos_weight: float, r0: int, r1: int) -> torch.Tensor:
    """`s x[r0:r1] @ y^T + b`, plus `log_pos_weight` at each row's positive column: (r1 - r0) x N."""
    s = torch.mm(x[r0:r1], y.T).mul_(scale)
    if bias is not None:
        s.add_(bias)
    if pos_index is not None and log_pos_weight != 0.0:
        rows = torch.arange(r1 - r0, device=s.device)
        s[rows, pos_index[r0:r1]] += log_pos_weight
    return s


class TiledLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exps of `L = s X Y^T + b (+ w at the positives)` in strips of `tile` rows.

    Returns (lse_rows (B,), lse_cols (N,), row_argmax (B,), int64, no gradient). `cols=False` skips the
    column sums (lse_cols is then zeros and must not be used).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                pos_index: torch.Tensor | None, log_pos_weight: float, tile: int, cols: bool):
        b, n = x.shape[0], y.shape[0]
        with torch.no_grad():
            lse_r = x.new_empty(b)
            argmax = torch.empty(b, dtype=torch.int64, device=x.device)
            col_max = x.new_full((n,), float("-inf"))
            col_sum = x.new_zeros(n)
            for r0 in range(0, b, tile):
                r1 = min(b, r0 + tile)
                s = _strip(x, y, scale, bias, pos_index, log_pos_weight, r0, r1)
                mx, am = s.max(dim=1)
                argmax[r0:r1] = am
                e = torch.sub(s, mx[:, None]).exp_()  # the one other strip-sized buffer, reused for the columns
                lse_r[r0:r1] = mx + e.sum(dim=1).log_()
                if cols:
                    # a column whose entries so far are all -inf (pos_coef = 0) keeps max -inf: shift it by 0
                    new_max = torch.maximum(col_max, s.max(dim=0).values)
                    shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
                    col_sum.mul_(torch.exp(col_max - shift))
                    col_sum.add_(torch.sub(s, shift[None, :], out=e).exp_().sum(dim=0))
                    col_max = new_max
                del s, e
            if cols:
                lse_c = torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max)) + col_sum.log()
            else:
                lse_c = x.new_zeros(n)
        ctx.save_for_backward(x, y, scale, bias, pos_index, lse_r, lse_c)
        ctx.log_pos_weight, ctx.tile, ctx.cols = log_pos_weight, tile, cols
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)
        return lse_r, lse_c, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_rows: torch.Tensor | None, g_cols: torch.Tensor | None, _g_argmax: Any):
        x, y, scale, bias, pos_index, lse_r, lse_c = ctx.saved_tensors
        if not ctx.cols:
            g_cols = None
        b = x.shape[0]
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        dx = torch.zeros_like(x) if need_x else None
        dy = torch.zeros_like(y) if need_y else None
        ds = torch.zeros((), dtype=x.dtype, device=x.device)
        db = torch.zeros((), dtype=x.dtype, device=x.device)
        if g_rows is None and g_cols is None:
            return None, None, None, None, None, None, None, None
        for r0 in range(0, b, ctx.tile):
            r1 = min(b, r0 + ctx.tile)
            s = _strip(x, y, scale, bias, pos_index, ctx.log_pos_weight, r0, r1)
            g = None  # at most two strip-sized buffers: s and g
            if g_rows is not None:  # d lse_i / d L_ij = softmax over the row
                g = torch.sub(s, lse_r[r0:r1, None]).exp_().mul_(g_rows[r0:r1, None])
            if g_cols is not None:  # d lse_j / d L_ij = softmax over the column
                s.sub_(lse_c[None, :]).exp_().mul_(g_cols[None, :])
                g = s if g is None else g.add_(s)
            del s
            _add_strip_grads(g, x, y, scale, r0, r1, dx, dy, ds, db if need_b else None, need_s)
            del g
        if need_y:
            dy.mul_(scale)
        return (dx, dy, ds.reshape(scale.shape) if need_s else None,
                db.reshape(bias.shape) if need_b and bias is not None else None, None, None, None, None)


def _add_strip_grads(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, r0: int, r1: int,
                     dx: torch.Tensor | None, dy: torch.Tensor | None, ds: torch.Tensor, db: torch.Tensor | None,
                     need_s: bool) -> None:
    """Add rows r0:r1's share to the gradients of L = f(s X Y^T + b), given g = dL/d(logits) of those rows:
    dX = s G Y, dY = G^T X (times s once, after the last strip), ds = sum(X * G Y), db = sum(G)."""
    gy = torch.mm(g, y)  # (G Y) for the strip's rows
    if dx is not None:
        dx[r0:r1] = gy * scale
    if need_s:
        ds += (x[r0:r1] * gy).sum()
    if dy is not None:
        dy.addmm_(g.T, x[r0:r1])
    if db is not None:
        db += g.sum()


class TiledSoftplusSum(torch.autograd.Function):
    """`sum_ij softplus(s x_i.y_j + b)` in strips of `tile` rows (a scalar)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, tile: int):
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for r0 in range(0, x.shape[0], tile):
                s = _strip(x, y, scale, bias, None, 0.0, r0, min(x.shape[0], r0 + tile))
                total += torch.nn.functional.softplus(s).sum()
                del s
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile = tile
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, y, scale, bias = ctx.saved_tensors
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        dx = torch.zeros_like(x) if need_x else None
        dy = torch.zeros_like(y) if need_y else None
        ds = torch.zeros((), dtype=x.dtype, device=x.device)
        db = torch.zeros((), dtype=x.dtype, device=x.device)
        for r0 in range(0, x.shape[0], ctx.tile):
            r1 = min(x.shape[0], r0 + ctx.tile)
            g = _strip(x, y, scale, bias, None, 0.0, r0, r1).sigmoid_().mul_(grad)  # softplus' = sigmoid
            _add_strip_grads(g, x, y, scale, r0, r1, dx, dy, ds, db if need_b else None, need_s)
            del g
        if need_y:
            dy.mul_(scale)
        return (dx, dy, ds.reshape(scale.shape) if need_s else None,
                db.reshape(bias.shape) if need_b and bias is not None else None, None)


class TiledExpWeightSum(torch.autograd.Function):
    """SogCLR's weighted negatives over one product `M = R C^T` (R: this rank's anchors, C: all candidates,
    detached), in strips of `tile` rows, the pairs `(i, own[i])` left out:

        sum_ij exp(s_r (M_ij - p_r[i]) - d_r[i]) + exp(s_c (M_ij - p_c[j]) - d_c[j])

    (the row term: local anchors against every candidate; the column term: every anchor against the local
    candidates). Gradients: R, C (if needed), p_r, p_c, s_r, s_c; d gets none (detached denominators).
    """

    @staticmethod
    def forward(ctx: Any, r: torch.Tensor, c: torch.Tensor, p_r: torch.Tensor, p_c: torch.Tensor, s_r: torch.Tensor,
                s_c: torch.Tensor, d_r: torch.Tensor, d_c: torch.Tensor, own: torch.Tensor, tile: int):
        total = torch.zeros((), dtype=r.dtype, device=r.device)
        with torch.no_grad():
            for r0 in range(0, r.shape[0], tile):
                r1 = min(r.shape[0], r0 + tile)
                w1, w2 = TiledExpWeightSum._weights(r, c, p_r, p_c, s_r, s_c, d_r, d_c, own, r0, r1)
                total += w1.sum() + w2.sum()
                del w1, w2
        ctx.save_for_backward(r, c, p_r, p_c, s_r, s_c, d_r, d_c, own)
        ctx.tile = tile
        return total

    @staticmethod
    def _weights(r, c, p_r, p_c, s_r, s_c, d_r, d_c, own, r0, r1):
        m = torch.mm(r[r0:r1], c.T)
        rows = torch.arange(r1 - r0, device=m.device)
        w2 = torch.sub(m, p_c[None, :]).mul_(s_c).sub_(d_c[None, :]).exp_()
        w1 = m.sub_(p_r[r0:r1, None]).mul_(s_r).sub_(d_r[r0:r1, None]).exp_()  # in place: m is not needed again
        w1[rows, own[r0:r1]] = 0.0
        w2[rows, own[r0:r1]] = 0.0
        return w1, w2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        r, c, p_r, p_c, s_r, s_c, d_r, d_c, own = ctx.saved_tensors
        need = ctx.needs_input_grad
        dr = torch.zeros_like(r) if need[0] else None
        dc = torch.zeros_like(c) if need[1] else None
        dp_r = torch.zeros_like(p_r) if need[2] else None
        dp_c = torch.zeros_like(p_c) if need[3] else None
        ds_r = torch.zeros((), dtype=r.dtype, device=r.device)
        ds_c = torch.zeros((), dtype=r.dtype, device=r.device)
        for r0 in range(0, r.shape[0], ctx.tile):
            r1 = min(r.shape[0], r0 + ctx.tile)
            w1, w2 = TiledExpWeightSum._weights(r, c, p_r, p_c, s_r, s_c, d_r, d_c, own, r0, r1)
            w1.mul_(grad)
            w2.mul_(grad)
            row1, col2 = w1.sum(dim=1), w2.sum(dim=0)
            # d/ds_r sum w1 (M - p_r) = sum_i r_i.(w1 C)_i - sum_i row1_i p_r[i]; likewise for the column term
            w1c, w2c = torch.mm(w1, c), torch.mm(w2, c)
            if need[4]:
                ds_r += (r[r0:r1] * w1c).sum() - (row1 * p_r[r0:r1]).sum()
            if need[5]:
                ds_c += (r[r0:r1] * w2c).sum() - (col2 * p_c).sum()
            if need[0]:
                dr[r0:r1] = w1c.mul_(s_r).add_(w2c.mul_(s_c))
            if need[1]:
                dc.add_(torch.mm(w1.T, r[r0:r1]).mul_(s_r)).add_(torch.mm(w2.T, r[r0:r1]).mul_(s_c))
            if need[2]:
                dp_r[r0:r1] = -s_r * row1
            if need[3]:
                dp_c.sub_(s_c * col2)
            del w1, w2, w1c, w2c
        return (dr, dc, dp_r, dp_c, ds_r.reshape(s_r.shape) if need[4] else None,
                ds_c.reshape(s_c.shape) if need[5] else None, None, None, None, None)


def exp_weight_sum(r: torch.Tensor, c: torch.Tensor, p_r: torch.Tensor, p_c: torch.Tensor, s_r: torch.Tensor,
                   s_c: torch.Tensor, d_r: torch.Tensor, d_c: torch.Tensor, own: torch.Tensor, *, tile: int) -> torch.Tensor:
    """`TiledExpWeightSum` (own[i]: the column of row i's own positive, left out of both terms)."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1 rows (got {tile})")
    return TiledExpWeightSum.apply(r, c, p_r, p_c, s_r, s_c, d_r.detach(), d_c.detach(), own, int(tile))


def _prepare(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    dt = _compute_dtype(x, y, scale, bias)
    return x.to(dt), y.to(dt), scale.to(dt), None if bias is None else bias.to(dt)


def log_sum_exps(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *, tile: int,
    pos_index: torch.Tensor | None = None, pos_coef: float = 1.0, cols: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row lse (B,), column lse (N,), row argmax (B,)) of `s X Y^T + b` with the positive `(i, pos_index[i])`
    weighted by `pos_coef`, in strips of `tile` rows (tile >= 1). `cols=False`: no column sums (zeros)."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1 rows (got {tile})")
    log_w = 0.0 if pos_coef == 1.0 else (math.log(pos_coef) if pos_coef > 0 else float("-inf"))
    if log_w != 0.0 and pos_index is None:
        raise ValueError("pos_coef != 1 needs pos_index")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y, scale, bias = _prepare(x, y, scale, bias)
        return TiledLogSumExp.apply(x, y, scale, bias, pos_index, log_w, int(tile), bool(cols))


def softplus_sum(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tile: int) -> torch.Tensor:
    """`sum_ij softplus(s x_i.y_j + b)` in strips of `tile` rows (tile >= 1)."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1 rows (got {tile})")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y, scale, bias = _prepare(x, y, scale, bias)
        return TiledSoftplusSum.apply(x, y, scale, bias, int(tile))


__all__ = [
    "AUTO_DENSE_ENTRIES", "AUTO_MIN_ROWS", "AUTO_TILE_ENTRIES", "TILE_SIZE_HELP", "TiledLogSumExp",
    "TiledExpWeightSum", "TiledSoftplusSum", "exp_weight_sum", "log_sum_exps", "resolve_tile", "softplus_sum", "validate_tile_size",
]
