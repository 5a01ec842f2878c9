"""Classic ADMM pruning (Zhang et al. 2018; SPEC 6): the Z- and U-steps.

The W-step is ``regkern.SGD`` with ``regkern.ADMM(rho)``: its fused kernel adds
``rho * (W - target)`` to the gradient, ``target = Z - U``. Every ``K`` steps
the caller runs, per parameter::

    Z = Proj(W + U)          prox="topk": keep the top-k magnitudes (or rows)
    Z = S_{lam/rho}(W + U)   prox="l1":   soft threshold (the lasso form)
    U = U + W - Z
    target = Z - U

These run every K steps, not every step, so they are plain torch ops, done in
place with few passes over memory.

``k`` counts what is *kept*; ``ratio`` is the fraction to *prune*, counted as
the official per-layer percentile does (``|w| < np.percentile(|w|, 100 *
ratio)`` is pruned): ``ceil(ratio * (n - 1))`` of ``n`` entries (or rows) are
pruned when the magnitudes are distinct, so ``ratio=1`` still keeps one.
Ties are broken by index (the lower flat index, or row, is kept), so exactly
``k`` survive.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor

from regkern.reference.sgd import as_rows, num_rows

__all__ = ["project", "admm_update", "soft_threshold_", "kept_count"]

PROXES = ("topk", "l1")


def kept_count(n: int, k: Optional[int] = None, ratio: Optional[float] = None) -> int:
    """How many of ``n`` entries (or rows) a projection keeps: ``k`` itself, or
    ``n - ceil(ratio * (n - 1))`` from the fraction ``ratio`` to prune (the
    official percentile rule)."""
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k (how many to keep) and ratio (the fraction to prune)")
    if k is not None:
        try:
            if isinstance(k, bool):
                raise TypeError
            k = operator.index(k)
        except TypeError:
            raise ValueError(f"k must be an int (how many entries or rows to keep), got {k!r}") from None
        if not 0 <= k <= n:
            raise ValueError(f"k={k} is out of range: it must be between 0 and {n} (the number of entries or rows)")
        return k
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio} is out of range: it is the fraction to prune, between 0 and 1")
    if n == 0:
        return 0
    # 1e-9 absorbs the rounding of ratio * (n - 1) (0.85 * 101 is 85.85, 0.5 * 7 is 3.5 exactly, ...)
    return n - min(n, math.ceil(ratio * (n - 1) - 1e-9))


def _keep_mask(score: Tensor, keep: int) -> Tensor:
    """Bool mask of the ``keep`` largest entries of the 1-D ``score``; among
    equal scores the lower indices are kept. O(n): one kthvalue, one cumsum."""
    n = score.numel()
    if keep >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(score, n - keep + 1).values  # the keep-th largest
    above = score > threshold
    tied = score == threshold
    room = keep - int(above.sum())
    return above | (tied & (tied.cumsum(0) <= room))


def project(w: Tensor, k: Optional[int] = None, ratio: Optional[float] = None, rows: bool = False,
            *, out: Optional[Tensor] = None) -> Tensor:
    """Keep exactly ``k`` entries of ``w`` with the largest magnitudes (with
    ``rows=True``: the ``k`` rows ``w[r]`` with the largest L2 norms) and zero
    the rest; returns the result (a new tensor, or ``out``, which may be ``w``
    itself for an in-place projection). Give ``k`` (how many to keep) or
    ``ratio`` (the fraction to prune, see the module docstring)."""
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"project takes a floating-point tensor, got {type(w).__name__}"
                         f"{'' if not isinstance(w, Tensor) else ' of dtype ' + str(w.dtype)}")
    if out is None:
        out = w.detach().clone()
    else:
        if out.shape != w.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, but w has shape {tuple(w.shape)}")
        if out is not w:
            out.copy_(w)
    _project_(out, k, ratio, rows)
    return out


@torch.no_grad()
def _project_(x: Tensor, k: Optional[int], ratio: Optional[float], rows: bool) -> None:
    """Project ``x`` in place (any layout): one score pass, one masked write."""
    if rows:
        keep = kept_count(num_rows(x), k, ratio)
        if keep == num_rows(x):
            return
        view = as_rows(x.detach())
        if x.dtype != torch.float64:
            view = view.float()
        mask = _keep_mask(view.square().sum(dim=1), keep)
        x.masked_fill_(~mask.view((-1,) + (1,) * (x.dim() - 1)) if x.dim() else ~mask[0], 0)
    else:
        keep = kept_count(x.numel(), k, ratio)
        if keep == x.numel():
            return
        mask = _keep_mask(x.detach().abs().reshape(-1), keep)
        x.masked_fill_(~mask.view(x.shape), 0)


@torch.no_grad()
def soft_threshold_(x: Tensor, tau: float) -> Tensor:
    """``x = sign(x) * max(|x| - tau, 0)`` in place, with exact zeros (SPEC 3)."""
    if tau < 0:
        raise ValueError(f"the soft-threshold level must be >= 0, got {tau}")
    return x.sub_(x.clamp(-tau, tau))


@torch.no_grad()
def admm_update(w: Tensor, z: Tensor, u: Tensor, target: Optional[Tensor] = None, *,
                k: Optional[int] = None, ratio: Optional[float] = None, rows: bool = False,
                prox: str = "topk", lam: Optional[float] = None, rho: Optional[float] = None) -> None:
    """One classic-ADMM Z- and U-step for one parameter, in place (SPEC 6)::

        Z = Proj(W + U)            prox="topk" (k or ratio; rows=True: whole rows)
        Z = S_{lam/rho}(W + U)     prox="l1"   (lam and rho required)
        U = U + W - Z
        target = Z - U             (when target is given; W's dtype for the SGD kernel)

    ``z`` and ``u`` may be fp32 state of a low-precision ``w``; the math runs in
    their dtype. ``w`` is only read.
    """
    if prox not in PROXES:
        raise ValueError(f"prox must be one of {PROXES}, got {prox!r}")
    for name, t in (("z", z), ("u", u), ("target", target)):
        if t is None and name == "target":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if t.shape != w.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, but W has shape {tuple(w.shape)}")
        if t.device != w.device:
            raise ValueError(f"{name} is on {t.device}, but W is on {w.device}")
    if not w.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {w.dtype}")
    if z.dtype != u.dtype:
        raise ValueError(f"z and u must share a dtype, got {z.dtype} and {u.dtype}")
    if prox == "topk":
        if lam is not None:
            raise ValueError("lam is for prox='l1'; prox='topk' takes k or ratio")
        kept_count(num_rows(w) if rows else w.numel(), k, ratio)  # refuse before writing anything
    else:
        if k is not None or ratio is not None or rows:
            raise ValueError("prox='l1' is the element soft threshold: it takes lam and rho, not k, ratio or rows")
        if lam is None or rho is None:
            raise ValueError("prox='l1' needs lam and rho (Z = S_{lam/rho}(W + U))")
        if not (lam >= 0 and math.isfinite(lam)) or not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"prox='l1' needs lam >= 0 and rho > 0, got lam={lam}, rho={rho}")
    torch.add(w, u, out=z)                        # W + U
    if prox == "topk":
        _project_(z, k, ratio, rows)
    else:
        soft_threshold_(z, lam / rho)
    u.add_(w).sub_(z)                             # U + W - Z
    if target is not None:
        torch.sub(z, u, out=target)               # Z - U, rounded once to target's dtype
