"""Reference for the `rda` kernel family: L1 regularized dual averaging (docs/rda.md).

Xiao's RDA with the proximal centre at the initial weights W0 (He et al.,
arXiv 1807.04222). For each tensor ``i`` at its step ``t`` (``t = 1`` at the
first step; the caller counts), with ``sign(0) = 0``:

    g    = grads[i] (as fp32) / grad_scale        (when grad_scale is given)
    g    = -g                                     (when maximize)
    gbar = gbar * a + g / t                       a = (t - 1) / t
    v    = W0 - c * gbar                          c = sqrt(t) / gamma
    gbar *= mask; W0 *= mask; v *= mask           (mask: bool row [R] or element)
    element (group=False):  W = sign(v) * max(|v| - tau, 0)      tau = lam * sqrt(t) / gamma
    group   (group=True):   W_r = v_r * max(0, 1 - kappa / ||v_r||)    kappa = tau * sqrt(n_r)
                            (||v_r|| of this fp32 row; a row of norm 0 gives 0)
    W    = W + 0.0                                (a zero is +0.0, never -0.0)

``lam = 0`` is plain dual averaging (``W = v``). ``gamma`` is the inverse
learning rate (``regkern.RDA`` passes ``1 / lr``); ``gamma = inf`` gives
``W = W0``. The scalars ``a, c, tau, kappa`` are computed in float64 (see
:func:`rda_coefficients`; the fast kernels evaluate the same operations from
``t``, ``lam`` and ``gamma``) and rounded once to fp32, as every backend does; the
tensor math is fp32, one rounding per operation, for fp32 / bf16 / fp16
storage (float64 parameters, which only the reference takes, keep float64).
``gbar`` and ``W0`` are stored in fp32 (float64 for float64 parameters) and
written in place; W is written once, rounded to its storage dtype; W itself is
never read. A row is ``W[r]`` (first dimension; a 0-d tensor is one row). The
mask is applied before the shrinkage (as in the sgd contract, where the mask
precedes the proximal map), so a group's norm counts only the kept weights and
pruned weights stay exactly 0. When ``found_inf`` is a non-zero tensor
nothing at all is written.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from regkern.reference.sgd import element_mask, as_rows, num_rows

Number = Union[float, Tensor]


def rda_coefficients(t: float, gamma: float, lam: float, row_len: int) -> Tuple[float, float, float, float]:
    """``(a, c, tau, kappa)`` of a tensor at step ``t``, in float64, evaluated
    exactly as the fast kernels evaluate them (IEEE operations in this order)."""
    t = float(t)
    root = math.sqrt(t)
    a = (t - 1.0) / t
    c = root / gamma
    tau = lam * root / gamma
    kappa = tau * math.sqrt(row_len)
    return a, c, tau, kappa


def _per_tensor(value, count, name):
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per parameter ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def rda_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    gbars: Sequence[Tensor],
    w0s: Sequence[Tensor],
    *,
    step: Union[int, Sequence[int]],
    gamma: Number,
    lams: Union[float, Sequence[float]] = 0.0,
    group: Union[bool, Sequence[bool]] = False,
    maximize: bool = False,
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """Apply one RDA step in place (see the module docstring). ``step``,
    ``lams`` and ``group`` are one value for all tensors or one per tensor."""
    if found_inf is not None and bool(found_inf.item()):
        return
    count = len(params)
    gamma = float(gamma)
    steps = _per_tensor(step, count, "step")
    lams = _per_tensor(lams, count, "lams")
    groups = _per_tensor(group, count, "group")
    for w, grad, gbar, w0, t, lam, grouped, mask in zip(params, grads, gbars, w0s, steps, lams, groups,
                                                        masks or [None] * count):
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        rows = num_rows(w)
        a, c, tau, kappa = rda_coefficients(t, gamma, float(lam), w.numel() // rows if rows else 0)
        g = grad.to(compute)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=compute)
        if maximize:
            g = -g
        new_gbar = gbar.to(compute) * a + g / float(t)
        new_w0 = w0.to(compute)
        v = new_w0 - c * new_gbar
        if mask is not None:
            keep = element_mask(mask, w.shape).to(compute)
            new_gbar = new_gbar * keep
            new_w0 = new_w0 * keep
            v = v * keep
        if grouped:
            v_rows = as_rows(v)
            norm = v_rows.square().sum(dim=1, keepdim=True).sqrt()
            scale = (1 - kappa / norm).clamp_min(0)
            new_w = torch.where(norm > 0, v_rows * scale, torch.zeros_like(v_rows)).reshape(w.shape)
        else:
            new_w = v.sign() * (v.abs() - tau).clamp_min(0)
        new_w = new_w + 0.0
        with torch.no_grad():
            gbar.copy_(new_gbar)
            if mask is not None:
                w0.copy_(new_w0)
            w.copy_(new_w)
