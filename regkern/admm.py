"""Classic ADMM pruning (Zhang et al. 2018; ``docs/admm.md``): the Z- and U-steps.

The W-step is ``regkern.SGD`` with ``regkern.ADMM(rho)``: its fused kernel adds
``rho * (W - target)`` to the gradient, ``target = Z - U``. Every ``K`` steps
the caller runs, per parameter::

    Z = Proj(W + U)          prox="topk": keep the top-k magnitudes (or rows)
    Z = S_{lam/rho}(W + U)   prox="l1":   soft threshold (the lasso form)
    U = U + W - Z
    target = Z - U

:func:`update` does this for every ADMM parameter of a ``regkern.SGD`` (per-
layer ratios allowed), :func:`admm_update_all` for lists of tensors and
:func:`admm_update` for one. They run on the fused kernels of
``regkern.backends.admm`` (C++ on CPU, Triton on CUDA), all tensors in one
call: the selection finds each tensor's threshold (C++: a radix select on
``|W + U|``; Triton: ``torch.kthvalue``; rows: their norms from a kernel
pass), then one pass over memory reads W and U and writes Z, U and the target.

``k`` counts what is *kept*; ``ratio`` is the fraction to *prune*, counted as
the official per-layer percentile does (``|w| < np.percentile(|w|, 100 *
ratio)`` is pruned): ``ceil(ratio * (n - 1))`` of ``n`` entries (or rows) are
pruned when the magnitudes are distinct, so ``ratio=1`` still keeps one.
Ties are broken by index (the lower flat index, or row, is kept), so exactly
``k`` survive. Row scores are sums of squares in float64; a NaN counts as +inf.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from regkern.backends.admm import admm_zu_step, check_zu
from regkern.reference.admm import keep_mask, kept_count, magnitude_scores, row_scores
from regkern.reference.sgd import num_rows
from regkern.sharding import is_dtensor, local_tensor, whole, write_whole

__all__ = ["project", "admm_update", "admm_update_all", "update", "soft_threshold_", "kept_count"]

PROXES = ("topk", "l1")


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
    if out is not None and out.shape != w.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, but w has shape {tuple(w.shape)}")
    keep = kept_count(num_rows(w) if rows else w.numel(), k, ratio)  # refuse before writing anything
    if out is None:
        out = w.detach().clone()
    elif out is not w:
        out.copy_(w)
    with torch.no_grad():
        if rows:
            if keep < num_rows(out):
                mask = keep_mask(row_scores(out), keep)
                out.masked_fill_(~mask.view((-1,) + (1,) * (out.dim() - 1)) if out.dim() else ~mask[0], 0)
        elif keep < out.numel():
            out.masked_fill_(~keep_mask(magnitude_scores(out), keep).view(out.shape), 0)
    return out


@torch.no_grad()
def soft_threshold_(x: Tensor, tau: float) -> Tensor:
    """``x = sign(x) * max(|x| - tau, 0)`` in place, with exact zeros."""
    if tau < 0:
        raise ValueError(f"the soft-threshold level must be >= 0, got {tau}")
    return x.sub_(x.clamp(-tau, tau))


def _per_tensor(value: Any, params: Sequence[Tensor], name: str, keyed: Optional[Sequence[Tensor]] = None) -> list:
    """One value per tensor from a scalar, a list or tuple (one per tensor) or,
    when ``keyed`` gives the parameters, a mapping parameter -> value."""
    count = len(params)
    if isinstance(value, Mapping):
        if keyed is None:
            raise ValueError(f"{name} as a mapping needs parameters to look up; give one value or one per tensor")
        missing = [i for i, p in enumerate(keyed) if p not in value]
        if missing:
            raise ValueError(f"{name} has no entry for ADMM parameter {missing[0]} (shape "
                             f"{tuple(keyed[missing[0]].shape)}); give one for every ADMM parameter")
        return [value[p] for p in keyed]
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per tensor ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def _modes(params, k, ratio, rows, prox, lam, rho, where):
    """Per tensor ``(keep, rows, tau)`` for the kernels; ``ValueError`` on bad options."""
    keeps, by_rows, taus = [], [], []
    for i, (w, ki, ri, rw, px, lm, rh) in enumerate(zip(params, k, ratio, rows, prox, lam, rho)):
        at = where(i)
        if px not in PROXES:
            raise ValueError(f"{at}prox must be one of {PROXES}, got {px!r}")
        if px == "topk":
            if lm is not None:
                raise ValueError(f"{at}lam is for prox='l1'; prox='topk' takes k or ratio")
            try:
                keep = kept_count(num_rows(w) if rw else w.numel(), ki, ri)
            except ValueError as e:
                raise ValueError(f"{at}{e}") from None
            keeps.append(keep)
            by_rows.append(bool(rw))
            taus.append(None)
        else:
            if ki is not None or ri is not None or rw:
                raise ValueError(f"{at}prox='l1' is the element soft threshold: it takes lam and rho, not k, ratio or rows")
            if lm is None or rh is None:
                raise ValueError(f"{at}prox='l1' needs lam and rho (Z = S_{{lam/rho}}(W + U))")
            if not (lm >= 0 and math.isfinite(lm)) or not (rh > 0 and math.isfinite(rh)):
                raise ValueError(f"{at}prox='l1' needs lam >= 0 and rho > 0, got lam={lm}, rho={rh}")
            keeps.append(None)
            by_rows.append(False)
            taus.append(float(lm) / float(rh))
    return keeps, by_rows, taus


@torch.no_grad()
def admm_update_all(params: Sequence[Tensor], zs: Sequence[Tensor], us: Sequence[Tensor],
                    targets: Optional[Sequence[Optional[Tensor]]] = None, *, k=None, ratio=None, rows=False,
                    prox="topk", lam=None, rho=None, backend: Optional[str] = None) -> None:
    """The classic-ADMM Z- and U-steps of many parameters at once, in place
    (``docs/admm.md``; see :func:`admm_update` for one). ``k``, ``ratio``, ``rows``,
    ``prox``, ``lam`` and ``rho`` are one value for every tensor or a list with
    one per tensor (per-layer ratios). ``zs``, ``us`` hold fp32 (or W's dtype
    for float64 W) state; ``targets`` (``Z - U`` in W's dtype, may hold None)
    is written when given. Everything is checked first: a refused call writes
    nothing. ``backend`` forces a kernel backend (as ``regkern.SGD``)."""
    params = [p.detach() if isinstance(p, Tensor) else p for p in params]
    count = len(params)
    targets = list(targets) if targets is not None else [None] * count
    check_zu(*([local_tensor(t) for t in ts] for ts in (params, zs, us, targets)))  # shards: as the kernels see them
    opts = [_per_tensor(v, params, name) for v, name in
            ((k, "k"), (ratio, "ratio"), (rows, "rows"), (prox, "prox"), (lam, "lam"), (rho, "rho"))]
    where = (lambda i: "") if count == 1 else (lambda i: f"tensor {i}: ")
    keeps, by_rows, taus = _modes(params, *opts, where)
    _zu_step(params, list(zs), list(us), targets, keep=keeps, rows=by_rows, tau=taus, backend=backend)


def _zu_step(params, zs, us, targets, *, keep, **options) -> None:
    """``admm_zu_step`` over tensors that may be sharded (DTensors). An
    element-wise step runs on the local shards; a top-k projection needs
    whole tensors, so then each tensor in turn is gathered with its Z, U and
    target (a collective: call it on every rank), stepped whole, and each
    rank keeps its shard of Z, U and the target. ``options``: per-tensor
    lists (``rows``, ``tau``) and ``backend``."""
    if not any(is_dtensor(t) for t in params):
        admm_zu_step(params, zs, us, targets, keep=keep, **options)
        return
    if all(k is None for k in keep):
        admm_zu_step(*([local_tensor(t) for t in ts] for ts in (params, zs, us, targets)), keep=keep, **options)
        return
    for i, p in enumerate(params):  # one whole tensor at a time: the gathered copies stay small
        state = [zs[i], us[i], targets[i]]
        gathered = [whole(t) for t in state]
        one = {name: [value[i]] if isinstance(value, list) else value for name, value in options.items()}
        admm_zu_step([whole(p)], *([t] for t in gathered), keep=[keep[i]], **one)
        for t, value in zip(state, gathered):
            if is_dtensor(t):
                write_whole(t, value)


@torch.no_grad()
def admm_update(w: Tensor, z: Tensor, u: Tensor, target: Optional[Tensor] = None, *,
                k: Optional[int] = None, ratio: Optional[float] = None, rows: bool = False,
                prox: str = "topk", lam: Optional[float] = None, rho: Optional[float] = None,
                backend: Optional[str] = None) -> None:
    """One classic-ADMM Z- and U-step for one parameter, in place (``docs/admm.md``)::

        Z = Proj(W + U)            prox="topk" (k or ratio; rows=True: whole rows)
        Z = S_{lam/rho}(W + U)     prox="l1"   (lam and rho required)
        U = U + W - Z
        target = Z - U             (when target is given; W's dtype for the SGD kernel)

    ``z`` and ``u`` may be fp32 state of a low-precision ``w``; the math runs in
    their dtype. ``w`` is only read.
    """
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {w.dtype if isinstance(w, Tensor) else type(w).__name__}")
    admm_update_all([w], [z], [u], [target], k=k, ratio=ratio, rows=rows, prox=prox, lam=lam, rho=rho,
                    backend=backend)


def _admm_parameters(optimizer: torch.optim.Optimizer) -> List[tuple]:
    """``(param, state, group)`` of every parameter of ``optimizer`` with ADMM
    state (``admm_z``, ``admm_u``, ``admm_target``: a group with ``regkern.ADMM``)."""
    found = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "admm_z" in st and "admm_u" in st:
                found.append((p, st, group))
    return found


@torch.no_grad()
def update(optimizer: torch.optim.Optimizer, *, k=None, ratio=None, rows=False, prox="topk", lam=None,
           rho=None, backend: Optional[str] = None) -> None:
    """The Z- and U-steps of every ADMM parameter of a ``regkern.SGD`` (the
    parameters of groups with ``regkern.ADMM(rho)``), in place on the
    optimizer's state, fused: e.g. ``regkern.admm.update(opt, ratio=0.85)``
    every K steps. Each option is one value for all, a list with one per ADMM
    parameter (in param-group order), or a mapping parameter -> value (per-
    layer ratios: ``ratio={conv.weight: 0.9, fc.weight: 0.5}``; it must cover
    every ADMM parameter). ``prox="l1"`` takes ``lam``; ``rho`` defaults to
    the group's ``ADMM(rho)``. The backend defaults to the optimizer's."""
    from regkern.regularizers import step_options

    found = _admm_parameters(optimizer)
    if not found:
        raise ValueError("the optimizer has no ADMM parameters: give a param group the regularizer regkern.ADMM(rho)")
    params = [p for p, _, _ in found]
    opts = [_per_tensor(v, params, name, keyed=params) for v, name in
            ((k, "k"), (ratio, "ratio"), (rows, "rows"), (prox, "prox"), (lam, "lam"))]
    if rho is None:
        rhos = [step_options(g.get("regularizer")).get("admm_rho") if px == "l1" else None
                for (_, _, g), px in zip(found, opts[3])]
    else:
        rhos = _per_tensor(rho, params, "rho", keyed=params)
    keeps, by_rows, taus = _modes(params, *opts, rhos, lambda i: f"ADMM parameter {i}: ")
    _zu_step([p.detach() for p in params], [st["admm_z"] for _, st, _ in found], [st["admm_u"] for _, st, _ in found],
             [st.get("admm_target") for _, st, _ in found], keep=keeps, rows=by_rows, tau=taus,
             backend=backend if backend is not None else getattr(optimizer, "backend", None))
