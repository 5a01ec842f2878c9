"""Reference for the `sgd` kernel family (SPEC sections 1, 2 and 7).

The contract every backend implements, for each tensor ``i``:

    g = grads[i] (as fp32) / grad_scale          (when grad_scale is given)
    g = -g                                       (when maximize)
    d = g + weight_decay * W + lam[r] * W        (lam: fp32 per row, optional)
    buf = d if first_step[i] else momentum * buf + (1 - dampening) * d
    s = d + momentum * buf if nesterov else buf  (s = d when momentum == 0)
    W = W - lr * s
    W *= mask, buf *= mask                       (mask: bool row [R] or element)
    norms[r] = (sum |W_r|, ||W_r||_2, mean |W_r|) of the stored, updated W

A row ``r`` is ``W[r]``: the first dimension indexes rows, a 0-d tensor is one
row. All math is fp32 (float64 parameters, which only the reference takes, keep
float64); W and buf are rounded once to their storage dtype. When
``found_inf`` is a non-zero tensor nothing at all is written.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Number = Union[float, Tensor]


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
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    norms: Optional[Sequence[Optional[Tensor]]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """Apply one regularized SGD step in place (see the module docstring)."""
    if found_inf is not None and bool(found_inf.item()):
        return
    count = len(params)
    firsts = [first_step] * count if isinstance(first_step, bool) else list(first_step)
    lams = lams if lams is not None else [None] * count
    masks = masks if masks is not None else [None] * count
    norms = norms if norms is not None else [None] * count
    for w, grad, buf, first, lam, mask, norm in zip(
        params, grads, momentum_buffers, firsts, lams, masks, norms
    ):
        # fp32 math for fp32/bf16/fp16 storage; float64 parameters keep float64
        math = torch.float64 if w.dtype == torch.float64 else torch.float32
        lr32 = lr.to(device=w.device, dtype=math) if isinstance(lr, Tensor) else lr
        w32 = w.detach().to(math)
        g = grad.to(math)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=math)
        if maximize:
            g = -g
        d = g + weight_decay * w32 if weight_decay != 0 else g
        if lam is not None:
            d = d + (as_rows(w32) * lam.to(torch.float32)[:, None]).reshape(w.shape)
        if momentum != 0:
            if first:
                b = d
            else:
                b = momentum * buf.to(math) + (1 - dampening) * d
            s = d + momentum * b if nesterov else b
        else:
            b, s = None, d
        new_w = w32 - lr32 * s
        if mask is not None:
            keep = _broadcast_mask(mask, w).to(math)
            new_w = new_w * keep
            if b is not None:
                b = b * keep
        with torch.no_grad():
            w.copy_(new_w)
            if b is not None:
                buf.copy_(b)
        if norm is not None:
            stored = as_rows(w.detach().to(torch.float32)).abs()
            n_r = stored.shape[1]
            l1 = stored.sum(dim=1)
            norm[:, 0] = l1
            norm[:, 1] = stored.square().sum(dim=1).sqrt()
            norm[:, 2] = l1 / n_r if n_r else 0.0


def _broadcast_mask(mask: Tensor, w: Tensor) -> Tensor:
    """A row mask ``[R]`` or an element mask of ``w``'s shape, as w's shape."""
    if mask.shape == w.shape:
        return mask
    return as_rows(torch.ones_like(w, dtype=torch.bool)).logical_and(mask[:, None]).reshape(w.shape)
