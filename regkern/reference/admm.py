"""Reference for the `admm` kernel family (docs/admm.md): classic ADMM's Z/U update
and the SAS-ADMM step.

**Classic Z/U update** (Zhang et al. 2018), run every K steps. For each tensor
``i``, in the dtype of its ``Z`` and ``U`` (fp32 state of an fp32 / bf16 /
fp16 ``W``; float64 state computes in float64), one rounding per operation::

    v      = W + U                                   (W widened first)
    Z      = keep ? v : 0        top-k:  keep the ``keep`` largest scores
    Z      = v - clamp(v, -tau, tau)                 soft threshold (tau = lam / rho)
    U      = (U + W) - Z
    target = Z - U                                   rounded once to target's dtype

The score of an element is ``|v|``; with ``rows=True`` the score of row ``r``
(``W[r]``, first dimension; a 0-d tensor is one row) is ``sum(v_r ** 2)``
summed in float64 (the squares of fp32 values are exact there, so backends
that sum in another order agree to ~1e-16 and only on exact ties could a
different order matter: exact ties give equal sums in any order). A NaN score
counts as +inf. Exactly ``keep`` entries (rows) survive: among equal scores
the lower flat index (row) is kept. ``keep`` is ``regkern.admm.kept_count``
of ``k`` or ``ratio``. Zeros written are +0.0.

**SAS-ADMM step** (Yuan et al. 2024; see ``regkern.SASADMM``), per tensor at
inner iteration ``t`` of outer iteration ``k``, with the float64 coefficients
of :func:`sas_coefficients` rounded once to the state's dtype::

    W_breve = (c * W_breve + anchor - grad) * inv_cr      inv_cr = 1 / (c_t + rho)
    W       = b * W_breve + b1 * W                        b = b_t, b1 = 1 - b_t
    when the outer step is due (t = M_k):
      d      = W - Z
      U      = U - rb * d                                 rb = r * beta
      x      = W - U * inv_beta
      Z      = x - clamp(x, -tau, tau)                    tau = lam / beta
      d      = W - Z
      U      = U - sb * d                                 sb = s * beta
      anchor = rho * W + (U - beta * d)
    param   = bn * W_breve + bn1 * W                      W_hat of the next inner iteration

``grad`` is widened to the state's dtype; ``param`` is rounded once to its
dtype. Division is multiplication by a float64 reciprocal rounded to fp32, so
every backend computes the same fp32 operations.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from regkern.reference.rda import _per_tensor
from regkern.reference.sgd import as_rows


# --------------------------------------------------------------------------- selection

def kept_count(n: int, k: Optional[int] = None, ratio: Optional[float] = None) -> int:
    """How many of ``n`` entries (or rows) a projection keeps: ``k`` itself, or
    ``n - ceil(ratio * (n - 1))`` from the fraction ``ratio`` to prune (the
    official percentile rule: ``|w| < np.percentile(|w|, 100 * ratio)`` is pruned)."""
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k (how many to keep) and ratio (the fraction to prune)")
    if k is not None:
        if isinstance(k, bool) or not hasattr(k, "__index__"):
            raise ValueError(f"k must be an int (how many entries or rows to keep), got {k!r}")
        k = k.__index__()
        if not 0 <= k <= n:
            raise ValueError(f"k={k} is out of range: it must be between 0 and {n} (the number of entries or rows)")
        return k
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number (the fraction to prune), got {ratio!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio} is out of range: it is the fraction to prune, between 0 and 1")
    if n == 0:
        return 0
    # 1e-9 absorbs the rounding of ratio * (n - 1) (0.85 * 101 is 85.85, 0.5 * 7 is 3.5 exactly, ...)
    return n - min(n, math.ceil(ratio * (n - 1) - 1e-9))


def magnitude_scores(v: Tensor) -> Tensor:
    """``|v|`` flattened, a NaN counted as +inf (a new tensor)."""
    score = v.detach().abs().reshape(-1)
    return score.masked_fill_(score.isnan(), math.inf)


def row_scores(v: Tensor) -> Tensor:
    """float64 ``sum(v_r ** 2)`` of each row, a NaN counted as +inf."""
    score = as_rows(v.detach()).double().square().sum(dim=1)
    return score.masked_fill_(score.isnan(), math.inf)


def keep_mask(score: Tensor, keep: int) -> Tensor:
    """Bool mask of the ``keep`` largest entries of the 1-D ``score`` (no
    NaN); among equal scores the lower indices are kept. One kthvalue, one cumsum."""
    n = score.numel()
    if keep >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(score, n - keep + 1).values  # the keep-th largest
    above = score > threshold
    tied = score == threshold
    room = keep - int(above.sum())
    return above | (tied & (tied.cumsum(0) <= room))


# --------------------------------------------------------------------------- classic Z/U

@torch.no_grad()
def admm_zu_step(
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    us: Sequence[Tensor],
    targets: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    keep=None,
    rows=False,
    tau=None,
) -> None:
    """The classic-ADMM Z/U update in place (module docstring). Per tensor
    (one value for all, or a sequence): ``keep`` (an int: top-k projection,
    by rows when ``rows``) or ``tau`` (a float: soft threshold); exactly one
    of the two is not None. Inputs are not validated here."""
    count = len(params)
    keeps = _per_tensor(keep, count, "keep")
    by_rows = _per_tensor(rows, count, "rows")
    taus = _per_tensor(tau, count, "tau")
    targets = list(targets) if targets is not None else [None] * count
    for w, z, u, target, kept, row_wise, threshold in zip(params, zs, us, targets, keeps, by_rows, taus):
        wide = w.to(z.dtype)
        v = wide + u
        if threshold is not None:
            z_new = v - v.clamp(-threshold, threshold)
        elif row_wise:
            mask = keep_mask(row_scores(v), kept)
            shaped = mask.view((-1,) + (1,) * (v.dim() - 1)) if v.dim() else mask[0]
            z_new = torch.where(shaped, v, torch.zeros_like(v))
        else:
            mask = keep_mask(magnitude_scores(v), kept).view(v.shape)
            z_new = torch.where(mask, v, torch.zeros_like(v))
        u_new = (u + wide) - z_new
        z.copy_(z_new)
        u.copy_(u_new)
        if target is not None:
            target.copy_(z_new - u_new)


# --------------------------------------------------------------------------- SAS-ADMM

class SASCoefficients(NamedTuple):
    """The float64 scalars of one SAS-ADMM step of a tensor (module docstring)."""
    c: float
    inv_cr: float
    b: float
    b1: float
    bn: float
    bn1: float
    outer: bool
    rb: float
    inv_beta: float
    tau: float
    sb: float
    beta: float
    rho: float


def sas_coefficients(t: int, m_k: int, eta_k: float, *, beta: float, lam: float, r: float, s: float,
                     rho: float) -> SASCoefficients:
    """Coefficients of inner iteration ``t`` (1-based) of an outer iteration of
    ``m_k`` inner ones and step ``eta_k``; the outer step is due when ``t >= m_k``,
    and the W_hat written is that of the next inner iteration (``t + 1``, or 1)."""
    b = 2.0 / (t + 1)
    c = 2.0 / (eta_k * t)
    outer = t >= m_k
    b_next = 2.0 / ((1 if outer else t + 1) + 1)
    return SASCoefficients(c=c, inv_cr=1.0 / (c + rho), b=b, b1=1.0 - b, bn=b_next, bn1=1.0 - b_next,
                           outer=outer, rb=r * beta, inv_beta=1.0 / beta, tau=lam / beta, sb=s * beta,
                           beta=beta, rho=rho)


@torch.no_grad()
def sas_admm_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    ws: Sequence[Tensor],
    w_breves: Sequence[Tensor],
    anchors: Sequence[Tensor],
    zs: Sequence[Tensor],
    us: Sequence[Tensor],
    *,
    coefficients,
) -> None:
    """One SAS-ADMM step in place (module docstring); ``coefficients`` is one
    :class:`SASCoefficients` for all tensors or one per tensor. Inputs are not
    validated here."""
    count = len(params)
    coefs = [coefficients] * count if isinstance(coefficients, SASCoefficients) else list(coefficients)
    for p, g, w, wb, anchor, z, u, co in zip(params, grads, ws, w_breves, anchors, zs, us, coefs):
        wb_new = (co.c * wb + anchor - g.to(w.dtype)) * co.inv_cr
        w_new = co.b * wb_new + co.b1 * w
        if co.outer:
            d = w_new - z
            u_half = u - co.rb * d
            x = w_new - u_half * co.inv_beta
            z_new = x - x.clamp(-co.tau, co.tau)
            d = w_new - z_new
            u_new = u_half - co.sb * d
            anchor.copy_(co.rho * w_new + (u_new - co.beta * d))
            z.copy_(z_new)
            u.copy_(u_new)
        wb.copy_(wb_new)
        w.copy_(w_new)
        p.copy_(co.bn * wb_new + co.bn1 * w_new)
