"""Reference for the `adam` kernel family (docs/adam.md).

The contract every backend implements, for each tensor ``i`` (every term
optional, as in ``regkern.reference.sgd``; W on the right-hand side of ``h``
and ``e`` is the value before the step):

    t = step[i] + 1, written back to step[i]      (fp32 0-d tensor, as torch keeps it)
    g = grads[i] (as fp32) / grad_scale; g = -g when maximize
    r = lam[r] * W + lam_cols[c] * W + l1[r] * sign(W) + polar(W) + rho * (W - target)
                                                  (the regularizer terms of reference.sgd, same order)
    h = fma(weight_decay, W, g)                   (weight_decay: Adam's L2 decay; 0 for AdamW)
    W = W * (1 - lr * decay)                      (decay: AdamW's decoupled weight decay; 0 for Adam)
    coupled:   h = h + r
    decoupled: W = W - lr * (0 + r)               (r summed from +0)
    m = fma(1 - b1, h - m, m)                     (torch's lerp; when 1 - b1 >= 0.5 its other
                                                   form fma(-(1 - (1 - b1)), h - m, h))
    v = fma((1 - b2) * h, h, v * b2)              (torch's mul_ then addcmul_)
    vmax = max(vmax, v)                           (amsgrad; then vmax stands for v below)
    W = W + ((-step_size) * m) / (sqrt(v) / bc2_sqrt + eps)
    W *= mask, m *= mask, v *= mask, vmax *= mask
    W = prox(W), W = clamp(W), W *= mask, norms   (as reference.sgd)

with ``step_size = lr / (1 - b1**t)`` and ``bc2_sqrt = sqrt(1 - b2**t)``
computed in float64 from the updated step and rounded once to fp32, like
every other float hyper-parameter that multiplies an fp32 tensor (``lr``,
``1 - b1``, ``b2``, ``1 - b2``, ``eps``, ``weight_decay``, ``1 - lr * decay``). Each
operation is one fp32 rounding, in the order written (``fma``: one rounding
of ``a * b + c``, as torch's CPU kernels compute lerp and addcmul); float64 parameters
(reference only) keep float64. W, m, v and vmax are stored in W's dtype,
rounded once. When ``found_inf`` is a non-zero tensor nothing at all is
written (not even the step count).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from regkern.reference.sgd import add_terms, compute_dtype, descent_grad, finish_update, term_columns, write_norms

Number = Union[float, Tensor]


def bias_corrections(step: float, beta1: float, beta2: float, lr: float) -> Tuple[float, float]:
    """(step_size, bc2_sqrt) of step ``step`` in float64: ``lr / (1 - b1**t)``,
    ``(1 - b2**t) ** 0.5`` (torch's expressions, so the same doubles)."""
    return lr / (1.0 - beta1 ** step), (1.0 - beta2 ** step) ** 0.5


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Optional[Tensor]],
    steps: Sequence[Tensor],
    *,
    lr: Number,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    coupled: bool = False,
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
    """Apply one regularized Adam / AdamW step in place (see the module docstring)."""
    if found_inf is not None and bool(found_inf.item()):
        return
    count = len(params)
    lr_value = float(lr)
    tensors = zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * count, steps)
    terms = term_columns(count, lams, lam_cols, masks, norms, l1s, polars, admm_targets, admm_rhos, prox_kinds,
                         prox_lams, clamps)
    for (w, grad, m, v, vmax, step), (lam, lam_col, mask, norm, l1, polar, target, rho, prox_kind, prox_lam,
                                      clamp) in zip(tensors, terms):
        compute = compute_dtype(w)
        lr32 = lr.to(device=w.device, dtype=compute) if isinstance(lr, Tensor) else lr
        w32 = w.detach().to(compute)
        g = descent_grad(grad, compute, grad_scale, maximize)
        h = g.add(w32, alpha=weight_decay) if weight_decay != 0 else g  # torch's fma
        w_before = w32
        if decay != 0:  # AdamW's decoupled decay, as torch computes it
            w32 = w32 * (1 - lr_value * decay)
        if any(x is not None for x in (lam, lam_col, l1, polar, target)):
            if coupled:
                h = add_terms(h, w_before, lam, lam_col, l1, polar, target, rho)
            else:
                r = add_terms(torch.zeros_like(w_before), w_before, lam, lam_col, l1, polar, target, rho)
                w32 = w32 - lr32 * r
        with torch.no_grad():
            step.add_(1)
        step_size, bc2_sqrt = bias_corrections(float(step), beta1, beta2, lr_value)
        # torch's own ops, so the rounding (FMA in lerp and addcmul on CPU) is torch's
        m32 = m.to(compute, copy=True).lerp_(h, 1 - beta1)
        v32 = v.to(compute, copy=True).mul_(beta2).addcmul_(h, h, value=1 - beta2)
        moments = [m32, v32]
        second = v32
        if vmax is not None:
            second = torch.maximum(vmax.to(compute), v32)
            moments.append(second)
        denom = (second.sqrt() / bc2_sqrt).add_(eps)
        new_w = w32.addcdiv(m32, denom, value=-step_size)
        new_w, moments = finish_update(new_w, moments, w, mask, prox_kind, prox_lam, clamp, lr32)
        with torch.no_grad():
            w.copy_(new_w)
            for stored, value in zip((m, v, vmax), moments):
                stored.copy_(value)
        if norm is not None:
            write_norms(w, norm)
