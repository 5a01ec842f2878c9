"""Reference for the `sgd` kernel family (docs/sgd.md, docs/regularizers.md).

The contract every backend implements, for each tensor ``i`` (every term is
optional; ``sign(0) = 0``; W on the right-hand side of ``d`` is the value
before the step):

    g = grads[i] (as fp32) / grad_scale          (when grad_scale is given)
    g = -g                                       (when maximize)
    d = g + weight_decay * W
          + lam[r] * W                           (lam: fp32 per row [R]; L2, docs/sgd.md)
            or lam * W                           (lam: fp32 of W's shape, per element)
          + lam_cols[c] * W[:, c, ...]           (lam_cols: fp32 [W.shape[1]], W.dim() >= 2;
                                                  c indexes dim 1: columns of a linear
                                                  weight, input channels of a conv)
          + l1[r] * sign(W)                      (l1: fp32 per row; L1 subgradient)
          + p_lam * (p_t * sign(W) - sign(W - p_m) + p_s)
                                                 (polar = fp32 (p_lam, p_t, p_m, p_s); docs/regularizers.md)
          + rho * (W - target)                   (ADMM: target = Z - U, W's shape; docs/admm.md)
    buf = d if first_step[i] else momentum * buf + (1 - dampening) * d
    s = d + momentum * buf if nesterov else buf  (s = d when momentum == 0)
    W = W - lr * s
    W *= mask, buf *= mask                       (mask: bool row [R] or element)
    W = prox(W)                                  (docs/regularizers.md, threshold lr * prox_lam[r]):
          kind 1, element L1: sign(W) * max(|W| - lr * prox_lam[r], 0)
          kind 2, group lasso: W_r * max(0, 1 - lr * prox_lam[r] * sqrt(n_r) / ||W_r||)
                               (||W_r|| of this fp32 row; a row of norm 0 stays 0)
    W = min(max(W, lo), hi)                      (clamp = (lo, hi); docs/regularizers.md)
    W *= mask                                    (a clamp must not revive a pruned weight)
    norms[r] = (sum |W_r|, ||W_r||_2, mean |W_r|) of the stored, updated W

A row ``r`` is ``W[r]``: the first dimension indexes rows, a 0-d tensor is one
row. Element ``i`` of the flattened W lies in row ``r = i // ROW_LEN`` and
column ``c = (i % ROW_LEN) // COL_LEN`` (``ROW_LEN = numel / R``, ``COL_LEN =
ROW_LEN / W.shape[1]``). Each ``+`` above is one fp32 rounding, in that
order. All math is fp32 (float64 parameters, which only the reference takes,
keep float64); W and buf are rounded once to their storage dtype. When
``found_inf`` is a non-zero tensor nothing at all is written.
"""
from __future__ import annotations

import math

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Number = Union[float, Tensor]
PROX_NONE, PROX_L1, PROX_GROUP = 0, 1, 2


def num_rows(t: Tensor) -> int:
    """Rows of a parameter: its first dimension (a 0-d tensor is one row)."""
    return t.shape[0] if t.dim() > 0 else 1


def as_rows(t: Tensor) -> Tensor:
    """View ``t`` as ``[R, n_r]`` (works for empty and 0-d tensors)."""
    rows = num_rows(t)
    return t.reshape(rows, t.numel() // rows if rows else 0)


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Optional[Tensor]],
    *,
    lr: Number,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    first_step: Union[bool, Sequence[bool]] = False,
    lams: Optional[Sequence[Optional[Tensor]]] = None,
    lam_cols: Optional[Sequence[Optional[Tensor]]] = None,
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    norms: Optional[Sequence[Optional[Tensor]]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    l1s: Optional[Sequence[Optional[Tensor]]] = None,
    polars: Optional[Sequence[Optional[Tensor]]] = None,
    admm_targets: Optional[Sequence[Optional[Tensor]]] = None,
    admm_rhos: Optional[Sequence[float]] = None,
    prox_kinds: Optional[Sequence[int]] = None,
    prox_lams: Optional[Sequence[Optional[Tensor]]] = None,
    clamps: Optional[Sequence[Optional[Tuple[float, float]]]] = None,
) -> None:
    """Apply one regularized SGD step in place (see the module docstring)."""
    if found_inf is not None and bool(found_inf.item()):
        return
    count = len(params)
    firsts = [first_step] * count if isinstance(first_step, bool) else list(first_step)
    tensors = zip(params, grads, momentum_buffers, firsts)
    terms = term_columns(count, lams, lam_cols, masks, norms, l1s, polars, admm_targets, admm_rhos, prox_kinds,
                         prox_lams, clamps)
    for (w, grad, buf, first), (lam, lam_col, mask, norm, l1, polar, target, rho, prox_kind, prox_lam,
                                clamp) in zip(tensors, terms):
        compute = compute_dtype(w)
        lr32 = lr.to(device=w.device, dtype=compute) if isinstance(lr, Tensor) else lr
        w32 = w.detach().to(compute)
        g = descent_grad(grad, compute, grad_scale, maximize)
        d = g + weight_decay * w32 if weight_decay != 0 else g
        d = add_terms(d, w32, lam, lam_col, l1, polar, target, rho)
        if momentum != 0:
            if first:
                b = d
            else:
                b = momentum * buf.to(compute) + (1 - dampening) * d
            s = d + momentum * b if nesterov else b
        else:
            b, s = None, d
        new_w, (b,) = finish_update(w32 - lr32 * s, [b], w, mask, prox_kind, prox_lam, clamp, lr32)
        with torch.no_grad():
            w.copy_(new_w)
            if b is not None:
                buf.copy_(b)
        if norm is not None:
            write_norms(w, norm)


def term_columns(count: int, lams, lam_cols, masks, norms, l1s, polars, admm_targets, admm_rhos, prox_kinds,
                 prox_lams, clamps):
    """Each tensor's regularizer keywords of a step (``sgd_step``'s, which
    ``adam_step`` shares): ``(lam, lam_col, mask, norm, l1, polar, target,
    rho, prox_kind, prox_lam, clamp)`` for each of ``count`` tensors; a
    keyword not given is None for every tensor (rho 0.0, prox_kind PROX_NONE)."""
    none = [None] * count
    return zip(lams or none, lam_cols or none, masks or none, norms or none, l1s or none, polars or none,
               admm_targets or none, admm_rhos or [0.0] * count, prox_kinds or [PROX_NONE] * count,
               prox_lams or none, clamps or none)


def compute_dtype(w: Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 storage; float64 parameters keep float64."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def descent_grad(grad: Tensor, compute: torch.dtype, grad_scale: Optional[Tensor], maximize: bool) -> Tensor:
    """The gradient as the step sees it: unscaled by ``grad_scale``, negated when maximizing."""
    g = grad.to(compute)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=compute)
    return -g if maximize else g


def add_terms(d: Tensor, w32: Tensor, lam: Optional[Tensor], lam_col: Optional[Tensor], l1: Optional[Tensor],
              polar: Optional[Tensor], target: Optional[Tensor], rho: float) -> Tensor:
    """``d`` plus every regularizer gradient term of ``W`` (``w32``, the
    computed value of W), each one fp32 rounding, in the contract's order."""
    compute = w32.dtype
    if lam is not None:
        if lam.shape == w32.shape:  # per element (for a vector W the two kinds agree)
            d = d + w32 * lam.to(torch.float32)
        else:
            d = d + (as_rows(w32) * lam.to(torch.float32)[:, None]).reshape(w32.shape)
    if lam_col is not None:
        d = d + w32 * lam_col.to(torch.float32).reshape((1, -1) + (1,) * (w32.dim() - 2))
    if l1 is not None:
        d = d + (as_rows(w32.sign()) * l1.to(torch.float32)[:, None]).reshape(w32.shape)
    if polar is not None:
        p_lam, p_t, p_m, p_s = polar.to(compute).unbind()
        d = d + p_lam * (p_t * w32.sign() - (w32 - p_m).sign() + p_s)
    if target is not None:
        d = d + rho * (w32 - target.to(compute))
    return d


def finish_update(new_w: Tensor, states: Sequence[Optional[Tensor]], w: Tensor, mask: Optional[Tensor],
                  prox_kind: int, prox_lam: Optional[Tensor], clamp, lr32: Number):
    """What follows the update of every family: W and its state tensors
    (``states``, None where absent) times the mask, W's proximal map
    (threshold ``lr * prox_lam[r]``), the clamp and the mask again. Returns
    the new W and the states."""
    compute = new_w.dtype
    keep = element_mask(mask, w.shape).to(compute) if mask is not None else None
    if keep is not None:
        new_w = new_w * keep
        states = [None if s is None else s * keep for s in states]
    if prox_kind != PROX_NONE:
        new_w = _prox(new_w, prox_kind, lr32 * as_rows(prox_lam.to(compute).reshape(-1, 1)))
    if clamp is not None:
        new_w = new_w.clamp(clamp[0], clamp[1])
        if keep is not None:
            new_w = new_w * keep
    return new_w, list(states)


def write_norms(w: Tensor, norm: Tensor) -> None:
    """``norm[r]`` = (sum |W_r|, ||W_r||_2, mean |W_r|) of the stored W."""
    stored = as_rows(w.detach().to(torch.float32)).abs()
    n_r = stored.shape[1]
    l1 = stored.sum(dim=1)
    norm[:, 0] = l1
    norm[:, 1] = stored.square().sum(dim=1).sqrt()
    norm[:, 2] = l1 / n_r if n_r else 0.0


def element_mask(mask: Tensor, shape) -> Tensor:
    """A row mask ``[R]`` or an element mask of ``shape``, as an element mask
    of ``shape`` (a row mask: a broadcast view)."""
    shape = tuple(shape)
    if tuple(mask.shape) == shape:
        return mask
    if not shape:  # a scalar parameter: one row of one element
        return mask.reshape(shape)
    return mask.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)


def _prox(w: Tensor, kind: int, threshold: Tensor) -> Tensor:
    """The proximal map of ``threshold`` (per row, ``[R, 1]``) on ``w`` (docs/regularizers.md)."""
    rows = as_rows(w)
    if kind == PROX_L1:
        return (rows.sign() * (rows.abs() - threshold).clamp_min(0)).reshape(w.shape)
    if kind == PROX_GROUP:
        norm = rows.square().sum(dim=1, keepdim=True).sqrt()
        scale = (1 - threshold * math.sqrt(rows.shape[1]) / norm).clamp_min(0)
        return torch.where(norm > 0, rows * scale, torch.zeros_like(rows)).reshape(w.shape)
    raise ValueError(f"unknown proximal map kind {kind}")
