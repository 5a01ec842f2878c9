"""Kernel dispatch of the `admm` family (docs/admm.md): classic ADMM's Z/U update
and the SAS-ADMM step.

Same scheme as the sgd and rda families: CPU tensors go to the C++ extension
(``regkern._C.admm_scores`` / ``admm_zu`` / ``sas_admm_step``), CUDA tensors
to the Triton kernels (``regkern.kernels.admm``), anything else to the
reference (``regkern.reference.admm``); ``backend=`` or ``REGKERN_BACKEND``
forces one (``regkern.backends.dispatch.choose_backend``). Each pass is one C++ call
(all tensors) or one launch per storage dtype, over an int64 metadata table
with a row per tensor (``ZU_FIELDS``, ``SAS_FIELDS``).

Z/U update (:func:`admm_zu_step`): a score pass writes ``|W + U|`` (top-k
tensors) or float64 row sums of ``(W + U)^2`` (top-k rows) into one scratch
buffer (C++: row tensors only); the selection finds each tensor's threshold
(C++: a radix select on the bits of ``|W + U|`` computed on the fly, two
passes over W and U, tensors shared out over threads; Triton:
``torch.kthvalue`` per tensor on the scores, one host sync for all) and
resolves ties at the threshold to the lowest indices, exactly as the
reference does; then one fused pass writes Z, U and the target.
Soft-threshold tensors skip the first two.

SAS-ADMM (:class:`SASPlan`): one fused pass per step, the outer update of the
tensors whose outer iteration ends folded into the same pass.
"""
from __future__ import annotations

import array
import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

import regkern.backends.dispatch as _backend
from regkern.backends.backend import Backend, CppBackend, TritonBackend, choose_backend
from regkern.backends.dispatch import FAST_DTYPES, TablePlan, _Launch
from regkern.layouts import (DTYPE_CODE, MODE_ELEMENT, MODE_ROWS, MODE_SOFT, SAS_COLUMN, SAS_FIELDS,  # noqa: F401
                             SAS_FLOATS, ZU_COLUMN, ZU_FIELDS, float_bits)
from regkern.reference import admm as _reference
from regkern.reference.sgd import num_rows

_INF_BITS = float_bits(math.inf)
_MINUS_ONE_BITS = float_bits(-1.0)


def _describe(t: Tensor) -> str:
    return _backend._describe(t)


def _dense_like(t: Tensor, ref: Tensor) -> bool:
    """``t`` has ``ref``'s shape and strides and ``ref`` covers its memory
    densely (any dense layout, e.g. channels_last): both walk as flat arrays."""
    return t.shape == ref.shape and t.stride() == ref.stride() and _backend.is_dense(ref)


# =========================================================================== Z/U update

def check_zu(params, zs, us, targets) -> None:
    """Raise ``ValueError`` (one sentence) on tensors the Z/U update cannot take."""
    count = len(params)
    if not (len(zs) == len(us) == len(targets) == count):
        raise ValueError(f"params, zs, us and targets must have one entry per tensor ({count}), got "
                         f"{len(zs)}, {len(us)} and {len(targets)}")
    device = getattr(params[0], "device", None) if count else None
    for i, (w, z, u, target) in enumerate(zip(params, zs, us, targets)):
        where = "" if count == 1 else f"tensor {i}: "
        if not isinstance(w, Tensor) or not w.is_floating_point() or w.is_complex():
            raise ValueError(f"{where}W must be a real floating-point tensor, got "
                             f"{_describe(w) if isinstance(w, Tensor) else type(w).__name__}")
        for name, t in (("z", z), ("u", u), ("target", target)):
            if t is None and name == "target":
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"{where}{name} must be a floating-point tensor")
            if t.shape != w.shape:
                raise ValueError(f"{where}{name} has shape {tuple(t.shape)}, but W has shape {tuple(w.shape)}")
            if t.device != device:
                raise ValueError(f"{where}{name} is on {t.device}, but W{'' if count == 1 else ' of tensor 0'} "
                                 f"is on {device}")
            if t.is_sparse:
                raise ValueError(f"{where}{name} is sparse; the ADMM update takes dense tensors")
        if w.device != device:
            raise ValueError(f"tensor {i} is on {w.device}, but tensor 0 is on {device}; update each device's tensors in their own call")
        if z.dtype != u.dtype:
            raise ValueError(f"{where}z and u must share a dtype, got {z.dtype} and {u.dtype}")
        ptrs = [t.data_ptr() for t in (w, z, u, target) if t is not None and t.numel()]
        if len(set(ptrs)) != len(ptrs):
            raise ValueError(f"{where}W, z, u and target must be distinct tensors (they share memory)")


def check_zu_modes(params, keeps, rows, taus) -> None:
    """Raise ``ValueError`` unless each tensor has exactly one of ``keep``
    (an int in range) and ``tau`` (finite, >= 0)."""
    count = len(params)
    for i, (w, keep, by_rows, tau) in enumerate(zip(params, keeps, rows, taus)):
        where = "" if count == 1 else f"tensor {i}: "
        if (keep is None) == (tau is None):
            raise ValueError(f"{where}give exactly one of keep (top-k projection) and tau (soft threshold)")
        if tau is not None:
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < math.inf:
                raise ValueError(f"{where}the soft-threshold level tau must be finite and >= 0, got {tau!r}")
            continue
        n = num_rows(w) if by_rows else w.numel()
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= n:
            raise ValueError(f"{where}keep={keep!r} is out of range: it must be an int between 0 and {n}")


def _zu_fast(w: Tensor, z: Tensor, u: Tensor, target: Optional[Tensor]) -> bool:
    return (w.dtype in FAST_DTYPES and z.dtype == torch.float32 and u.dtype == torch.float32
            and (target is None or target.dtype == w.dtype)
            and all(t is None or t.is_contiguous() for t in (w, z, u, target)))


def build_zu_table(params, zs, us, targets, modes, keeps, taus, scores=None, row_keeps=None) -> Tensor:
    """The int64 ``[T, len(ZU_FIELDS)]`` Z/U table (on the CPU). THRESHOLD
    holds tau (soft threshold) or, for element tensors that keep all or
    nothing, a threshold that does so; the selection fills in THRESHOLD and
    CUT of the other element tensors."""
    count = len(params)
    none = [None] * count
    flat = array.array("q")
    for w, z, u, target, mode, keep, tau, score, row_keep in zip(params, zs, us, targets, modes, keeps, taus,
                                                                 scores or none, row_keeps or none):
        r = num_rows(w)
        threshold, cut = 0, 0
        if mode == MODE_SOFT:
            threshold = float_bits(tau)
        elif mode == MODE_ELEMENT and not 0 < keep < w.numel():
            threshold, cut = (_MINUS_ONE_BITS, w.numel()) if keep > 0 else (_INF_BITS, -1)
        flat.extend((
            w.data_ptr(), z.data_ptr(), u.data_ptr(), 0 if target is None else target.data_ptr(),
            w.numel(), r, w.numel() // r if r else 0, DTYPE_CODE[w.dtype], int(mode),
            0 if score is None else score.data_ptr(), 0 if row_keep is None else row_keep.data_ptr(),
            threshold, cut, 0 if keep is None else int(keep),
        ))
    if not flat:
        return torch.empty(0, len(ZU_FIELDS), dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).reshape(-1, len(ZU_FIELDS)).clone()


def element_thresholds(scores: Sequence[Tensor], keeps: Sequence[int]):
    """``(threshold, cut)`` per 1-D score tensor (no NaN) keeping exactly
    ``keep`` entries: those above the threshold and, among those equal to it,
    the lowest indices up to ``cut``. ``0 < keep < numel``. One host sync for
    all tensors; tensors whose ties straddle the cut take one more each."""
    if not scores:
        return [], []
    thresholds = [torch.kthvalue(s, s.numel() - keep + 1).values for s, keep in zip(scores, keeps)]
    at_least = [torch.count_nonzero(s >= t) for s, t in zip(scores, thresholds)]
    values, counts = torch.stack([torch.stack(thresholds).double(), torch.stack(at_least).double()]).cpu().tolist()
    cuts = []
    for s, t, keep, count in zip(scores, thresholds, keeps, counts):
        if int(count) == keep:  # every score equal to the threshold is kept
            cuts.append(s.numel() - 1)
            continue
        above = int(torch.count_nonzero(s > t))
        tied = torch.nonzero(s == t).view(-1)
        cuts.append(int(tied[keep - above - 1]))
    return values, cuts


class _ZULaunch(_Launch):
    """The update pass of the Z/U update over some tensors (one C++ call or
    Triton launch); ``scoring`` is its score pass over the same table."""

    def __init__(self, dtype, index, table):
        super().__init__(dtype, index, table)
        self.scored = bool((self.columns[:, ZU_COLUMN["SCORES"]] != 0).any())
        self.scoring = _Launch(dtype, index, table)
        self.scratch = None  # buffers the table points into, kept alive until the update pass


def admm_zu_step(params: Sequence[Tensor], zs: Sequence[Tensor], us: Sequence[Tensor],
                 targets: Optional[Sequence[Optional[Tensor]]] = None, *, keep=None, rows=False, tau=None,
                 backend: Optional[str] = None) -> None:
    """The classic-ADMM Z/U update of every tensor, in place: same contract as
    ``regkern.reference.admm.admm_zu_step`` (``keep``, ``rows``, ``tau``: one
    value or one per tensor), on the backend chosen for the tensors' device.
    Everything is validated before anything is written."""
    count = len(params)
    targets = list(targets) if targets is not None else [None] * count
    keeps = _reference._per_tensor(keep, count, "keep")
    by_rows = [bool(r) for r in _reference._per_tensor(rows, count, "rows")]
    taus = _reference._per_tensor(tau, count, "tau")
    check_zu(params, zs, us, targets)
    check_zu_modes(params, keeps, by_rows, taus)
    if not count:
        return
    device = params[0].device
    backend = choose_backend(device, backend)
    fast = [backend.fast and _zu_fast(*c) for c in zip(params, zs, us, targets)]
    slow = [i for i, f in enumerate(fast) if not f]
    modes = [MODE_SOFT if t is not None else MODE_ROWS if r else MODE_ELEMENT for t, r in zip(taus, by_rows)]
    launches = []
    if len(slow) < count:
        launches = _zu_launches(params, zs, us, targets, modes, keeps, taus, fast, backend, device)
    if slow:  # selection of the fast tensors is done: nothing below can refuse
        pick = lambda values: [values[i] for i in slow]  # noqa: E731
        _reference.admm_zu_step(pick(params), pick(zs), pick(us), pick(targets), keep=pick(keeps),
                                rows=pick(by_rows), tau=pick(taus))
    for launch in launches:
        backend.run("admm", launch, kernel="admm_zu")


def _zu_launches(params, zs, us, targets, modes, keeps, taus, fast, backend: Backend, device) -> List[_ZULaunch]:
    """Tables of the fast tensors, scored and selected (nothing of theirs is written yet)."""
    index = [i for i, f in enumerate(fast) if f]
    # scratch: scores of the tensors that need a selection, the row-keep flags of row tensors
    scored = {i for i in index if modes[i] != MODE_SOFT
              and 0 < keeps[i] < (num_rows(params[i]) if modes[i] == MODE_ROWS else params[i].numel())}
    # element scores: only the selection in torch reads them; the C++ extension selects on its own
    selects_itself = isinstance(backend, CppBackend)
    element = [i for i in index if i in scored and modes[i] == MODE_ELEMENT and not selects_itself]
    scored_rows = [i for i in index if i in scored and modes[i] == MODE_ROWS]
    row_wise = scored_rows + [i for i in index if modes[i] == MODE_ROWS and i not in scored]  # scored first
    scores, row_keeps = [None] * len(params), [None] * len(params)
    flat32 = torch.empty(sum(params[i].numel() for i in element), dtype=torch.float32, device=device)
    flat64 = torch.zeros(sum(num_rows(params[i]) for i in scored_rows), dtype=torch.float64, device=device)
    keep_flags = torch.empty(sum(num_rows(params[i]) for i in row_wise), dtype=torch.bool, device=device)
    for buffer, which, size, out in ((flat32, element, Tensor.numel, scores), (flat64, scored_rows, num_rows, scores),
                                     (keep_flags, row_wise, num_rows, row_keeps)):
        offset = 0
        for i in which:
            out[i] = buffer[offset:offset + size(params[i])]
            offset += size(params[i])
    for i in row_wise:
        if scores[i] is None:  # all rows or none
            row_keeps[i].fill_(keeps[i] > 0)

    launches = []
    for dtype, mine in backend.launch_groups(index, [p.dtype for p in params]).items():
        if not mine:
            continue
        pick = lambda values: [values[i] for i in mine]  # noqa: E731
        table = build_zu_table(pick(params), pick(zs), pick(us), pick(targets), pick(modes), pick(keeps),
                               pick(taus), pick(scores), pick(row_keeps))
        launch = _ZULaunch(dtype, mine, table)
        if isinstance(backend, TritonBackend):  # a work list per pass
            launch.scoring.units, launch.units = (u.to(device) for u in backend.kernels("admm").zu_units(table))
        launch.scratch = keep_flags  # read by the update pass
        launches.append(launch)
    for launch in launches:
        if launch.scored:
            backend.run("admm", launch.scoring, kernel="admm_scores")
    if selects_itself:
        if scored:
            backend.run("admm", launches[0], kernel="admm_select")
        return launches

    # selection in torch: thresholds of element tensors (on the device), row flags (on the CPU: tiny)
    values, cuts = element_thresholds([scores[i] for i in element], [keeps[i] for i in element])
    selected = {i: (float_bits(v), c) for i, v, c in zip(element, values, cuts)}
    if scored_rows:  # their flags lead keep_flags, in the order of their scores in flat64
        host = flat64.cpu()
        flags = torch.empty(host.shape, dtype=torch.bool)
        offset = 0
        for i in scored_rows:
            r = num_rows(params[i])
            flags[offset:offset + r] = _reference.keep_mask(host[offset:offset + r], keeps[i])
            offset += r
        keep_flags[:offset].copy_(flags)
    for launch in launches:
        for row, i in enumerate(launch.index):
            if i in selected:
                launch.columns[row, ZU_COLUMN["THRESHOLD"]], launch.columns[row, ZU_COLUMN["CUT"]] = selected[i]
    return launches


# =========================================================================== SAS-ADMM

SAS_STATE = ("w", "w_breve", "anchor", "z", "u")


def check_sas_state(params, ws, w_breves, anchors, zs, us) -> None:
    """Raise ``ValueError`` (one sentence) on parameters or state the SAS-ADMM step cannot take."""
    device = params[0].device if params else None
    for i, (p, *state) in enumerate(zip(params, ws, w_breves, anchors, zs, us)):
        where = lambda: f"parameter {i} ({_describe(p)})"  # noqa: E731
        if p.device != device:
            raise ValueError(f"{where()} is not on {device} like the first parameter of its group; put each device's parameters in their own param group")
        if not p.is_floating_point() or p.is_complex() or p.is_sparse:
            raise ValueError(f"{where()} is not a dense real floating-point tensor")
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        for name, t in zip(SAS_STATE, state):
            if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != dtype or t.device != device:
                got = _describe(t) if isinstance(t, Tensor) else repr(t)
                raise ValueError(f"{where()} has SAS-ADMM state {name!r} of {got}; it must be "
                                 f"{str(dtype).replace('torch.', '')} of the parameter's shape on {device}")


def build_sas_table(params, grads, ws, w_breves, anchors, zs, us) -> Tensor:
    """The int64 ``[T, len(SAS_FIELDS)]`` SAS table (on the CPU), coefficients 0."""
    flat = array.array("q")
    tail = [0] * (len(SAS_FIELDS) - SAS_COLUMN["OUTER"])
    for p, g, w, wb, anchor, z, u in zip(params, grads, ws, w_breves, anchors, zs, us):
        flat.extend((p.data_ptr(), g.data_ptr(), w.data_ptr(), wb.data_ptr(), anchor.data_ptr(), z.data_ptr(),
                     u.data_ptr(), p.numel(), DTYPE_CODE[p.dtype], *tail))
    if not flat:
        return torch.empty(0, len(SAS_FIELDS), dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).reshape(-1, len(SAS_FIELDS)).clone()


def sas_float_columns(coefficients: Sequence[_reference.SASCoefficients]) -> np.ndarray:
    """The OUTER flags and float columns (float64 bits) of a table, int64
    ``[T, 13]``; each distinct coefficient set is converted once (usually one
    per param group)."""
    def row(c):
        return np.concatenate([np.array([int(c.outer)], dtype=np.int64),
                               np.array([getattr(c, name) for name in SAS_FLOATS], dtype=np.float64).view(np.int64)])

    first = coefficients[0]
    if all(c is first for c in coefficients):
        return np.broadcast_to(row(first), (len(coefficients), 1 + len(SAS_FLOATS)))
    rows = {}
    return np.stack([rows[id(c)] if id(c) in rows else rows.setdefault(id(c), row(c)) for c in coefficients])


def _sas_slow_reason(w: Tensor, state: Sequence[Tensor]) -> Optional[str]:
    if w.dtype not in FAST_DTYPES:
        return f"its dtype {str(w.dtype).replace('torch.', '')} has no fused kernel"
    if not all(_dense_like(t, w) for t in state):
        return "it or its SAS-ADMM state is not one dense block of memory laid out alike"
    return None


class SASPlan(TablePlan):
    """The validated, static part of a SAS-ADMM step over tensors on one device.

    Parameters and their state (W, W_breve, anchor, Z, U) are checked and the
    metadata built once; each step then checks the gradients, patches their
    pointers, the coefficients and the outer flags into the table and makes
    one C++ call or one launch per dtype. Tensors the fast kernels cannot take
    (float64, a layout with gaps, state in another layout than the parameter)
    go to the reference, and ``warn(i, reason)`` is told.
    """

    family = "sas_admm"
    grad_column = SAS_COLUMN["GRAD"]

    def __init__(self, params, ws, w_breves, anchors, zs, us, backend=None, warn=None):
        count = len(params)
        if not all(len(x) == count for x in (ws, w_breves, anchors, zs, us)):
            raise ValueError("params and every SAS-ADMM state list must have one entry per parameter")
        check_sas_state(params, ws, w_breves, anchors, zs, us)
        self._place(params, backend)
        self.columns = list(zip(params, ws, w_breves, anchors, zs, us))
        fast = self._route([_sas_slow_reason(c[0], c[1:]) for c in self.columns], warn)
        self._split(fast, self._table,
                    lambda table: self.backend.kernels(self.family).build_units(table[:, SAS_COLUMN["NUMEL"]]))

    def _table(self, index: List[int]) -> Tensor:
        p, w, wb, anchor, z, u = zip(*(self.columns[i] for i in index))
        return build_sas_table(p, p, w, wb, anchor, z, u)  # gradients patched in per step

    def run(self, grads: Sequence[Tensor], coefficients) -> None:
        """Apply the step with gradients from ``checked_grads``; ``coefficients``:
        one ``SASCoefficients`` per parameter (or one for all)."""
        count = len(self.params)
        coefs = [coefficients] * count if isinstance(coefficients, _reference.SASCoefficients) else list(coefficients)
        if self.slow_index:
            idx = self.slow_index
            p, w, wb, anchor, z, u = zip(*(self.columns[i] for i in idx))
            _reference.sas_admm_step(p, [grads[i] for i in idx], w, wb, anchor, z, u,
                                     coefficients=[coefs[i] for i in idx])
        floats = sas_float_columns(coefs) if self.launches else None
        for launch in self.launches:
            launch.patch_grads(grads, self.grad_column)
            launch.columns[:, SAS_COLUMN["OUTER"]:] = floats if launch.index is None else floats[launch.index]
            self.backend.run(self.family, launch)


def sas_admm_step(params, grads, ws, w_breves, anchors, zs, us, *, coefficients, backend=None) -> None:
    """Functional fused SAS-ADMM step: same contract as
    ``regkern.reference.admm.sas_admm_step``, on the backend chosen for the
    tensors' device."""
    plan = SASPlan(params, ws, w_breves, anchors, zs, us, backend)
    plan.run(plan.checked_grads(grads), coefficients)
