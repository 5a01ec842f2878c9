"""Dispatch of the `sgd` kernel family (regkern.SGD; docs/sgd.md): its table,
state checks, routing of terms a backend lacks, and ``SGDPlan``, which the
`adam` family extends."""
from __future__ import annotations

import array
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from regkern.backends.dispatch import TablePlan, _describe, slow_reason
from regkern.layouts import (DTYPE_CODE, LAM_ELEMENT, LAM_NONE, LAM_ROW, MASK_ELEMENT, MASK_NONE, MASK_ROW,  # noqa: F401
                             SGD_COLUMN, SGD_FIELDS, float_bits)
from regkern.reference.sgd import sgd_step as reference_sgd_step
from regkern.reference.sgd import PROX_NONE, num_rows
from regkern.terms import COEFFICIENT_KEYS, CORE_ABSENT, FINITE_STATE, STATE_BY_KEY, TERM_ABSENT, TERM_KEYWORDS


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def mask_kind(mask: Optional[Tensor], param: Tensor) -> int:
    if mask is None:
        return MASK_NONE
    if mask.shape == param.shape:
        return MASK_ELEMENT
    return MASK_ROW


def lam_kind(lam: Optional[Tensor], param: Tensor) -> int:
    """Per element when ``lam`` has W's shape (for a vector W both kinds agree), else per row."""
    if lam is None:
        return LAM_NONE
    if lam.shape == param.shape:
        return LAM_ELEMENT
    return LAM_ROW


def _cols(w: Tensor):
    """(COLS, COL_LEN) of a parameter: its second dimension and the elements
    each (row, column) pair spans; (0, 0) below 2 dimensions."""
    if w.dim() < 2 or w.shape[1] == 0:
        return 0, 0
    cols = w.shape[1]
    r = num_rows(w)
    return cols, (w.numel() // r // cols if r else 0)


def build_sgd_table(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Optional[Tensor]],
    lams: Sequence[Optional[Tensor]],
    masks: Sequence[Optional[Tensor]],
    norms: Sequence[Optional[Tensor]],
    first_step: Sequence[bool],
    *,
    l1s=None, polars=None, admm_targets=None, admm_rhos=None,
    prox_kinds=None, prox_lams=None, clamps=None, lam_cols=None,
) -> Tensor:
    """The int64 ``[T, len(SGD_FIELDS)]`` metadata table (on the CPU); the
    keyword lists are the regularizer terms and column lambdas of
    ``reference.sgd_step``."""
    count = len(params)
    none = [None] * count
    flat = array.array("q")
    for (w, g, buf, lam, mask, norm, first, l1, polar, target, rho, prox, prox_lam, clamp, lam_col) in zip(
            params, grads, bufs, lams, masks, norms, first_step, l1s or none, polars or none,
            admm_targets or none, admm_rhos or [0.0] * count, prox_kinds or [0] * count,
            prox_lams or none, clamps or none, lam_cols or none):
        r = num_rows(w)
        cols, col_len = _cols(w) if lam_col is not None else (0, 0)
        flat.extend((
            w.data_ptr(), g.data_ptr(), _ptr(buf), _ptr(lam), _ptr(mask),
            mask_kind(mask, w), _ptr(norm), w.numel(), r,
            w.numel() // r if r else 0, DTYPE_CODE[w.dtype], int(bool(first)),
            _ptr(l1), _ptr(polar), _ptr(target), float_bits(rho), int(prox), _ptr(prox_lam),
            int(clamp is not None), float_bits(clamp[0] if clamp else 0.0),
            float_bits(clamp[1] if clamp else 0.0),
            lam_kind(lam, w), _ptr(lam_col) if col_len else 0, cols, col_len,
        ))
    if not flat:
        return torch.empty(0, len(SGD_FIELDS), dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).reshape(-1, len(SGD_FIELDS)).clone()


def check_sgd_state(params, bufs, lams, masks, norms, terms=None) -> None:
    """Raise ``ValueError`` (one sentence) on parameters or state the step cannot take."""
    device = params[0].device if params else None
    terms = terms or {}
    none = [None] * len(params)
    for i, (w, buf, lam, mask, norm, l1, polar, target, prox_kind, prox_lam, lam_col) in enumerate(zip(
            params, bufs, lams, masks, norms, terms.get("l1s") or none, terms.get("polars") or none,
            terms.get("admm_targets") or none, terms.get("prox_kinds") or none,
            terms.get("prox_lams") or none, terms.get("lam_cols") or none)):
        where = lambda: f"parameter {i} ({_describe(w)})"  # noqa: E731  (built only on error)
        if w.device != device:
            raise ValueError(f"{where()} is not on {device} like the first parameter of its group; put each device's parameters in their own param group")
        if w.is_sparse:
            raise ValueError(f"{where()} is sparse, which regkern does not support; step it with torch.optim.SparseAdam or torch.optim.SGD")
        if not w.is_floating_point():
            raise ValueError(f"{where()} is not floating point; only floating-point parameters can be optimized")
        rows = num_rows(w)
        if buf is not None and (buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device):
            raise ValueError(f"{where()} has a momentum buffer of {_describe(buf)}; it must match the parameter")
        if lam is not None and (lam.shape not in ((rows,), w.shape) or lam.dtype != torch.float32 or lam.device != device):
            raise ValueError(f"{where()} has a lambda of {_describe(lam)}; it must be a float32 vector of length {rows} (rows) or a float32 tensor of shape {tuple(w.shape)} (elements) on {device}")
        if lam_col is not None:
            if w.dim() < 2:
                raise ValueError(f"{where()} has column lambdas (state['lam_cols']) but fewer than 2 dimensions; only parameters with a second dimension have columns")
            if lam_col.shape != (w.shape[1],) or lam_col.dtype != torch.float32 or lam_col.device != device:
                raise ValueError(f"{where()} has column lambdas (state['lam_cols']) of {_describe(lam_col)}; they must be a float32 vector of length {w.shape[1]} (W.shape[1]) on {device}")
        for name, vector in (("L1 coefficient", l1), ("proximal lambda", prox_lam)):
            if vector is not None and (vector.shape != (rows,) or vector.dtype != torch.float32 or vector.device != device):
                raise ValueError(f"{where()} has a {name} of {_describe(vector)}; it must be a float32 vector of length {rows} on {device}")
        if mask is not None and (mask.dtype != torch.bool or mask.device != device or mask.shape not in ((rows,), w.shape)):
            raise ValueError(f"{where()} has a mask of {_describe(mask)}; it must be a bool tensor of shape ({rows},) (rows) or {tuple(w.shape)} (elements) on {device}")
        if norm is not None and (norm.shape != (rows, 3) or norm.dtype != torch.float32 or norm.device != device):
            raise ValueError(f"{where()} has a row-norm output of {_describe(norm)}; it must be float32 of shape ({rows}, 3) on {device}")
        if polar is not None and (polar.shape != (4,) or polar.dtype != torch.float32 or polar.device != device):
            raise ValueError(f"{where()} has polarization coefficients of {_describe(polar)}; they must be float32 of shape (4,) on {device}")
        if target is not None and (target.shape != w.shape or target.dtype != w.dtype or target.device != device):
            raise ValueError(f"{where()} has an ADMM target of {_describe(target)}; it must match the parameter")
        if prox_kind not in (None, PROX_NONE) and prox_lam is None:
            raise ValueError(f"{where()} asks for a proximal map but has no proximal lambda (state['prox_lam'])")


def _terms_used(terms: Dict[str, list], i: int) -> set:
    def present(key):
        value = terms[key][i]
        return value is not None if TERM_ABSENT[key] is None else value != TERM_ABSENT[key]
    return {name for name, keys in TERM_KEYWORDS.items() if any(present(k) for k in keys if k in terms)}


class SGDPlan(TablePlan):
    """The validated, static part of an ``sgd`` step over tensors on one device.

    Parameters and their state (momentum buffers, lambdas, masks, row-norm
    outputs, regularizer terms) are checked and their metadata built once;
    each step then only checks the gradients and patches their pointers (and
    the first-step flags when they change) into the table, so a step costs one
    C++ call or one launch per dtype and little Python work per tensor.
    Tensors the fast kernels cannot take (float64, a layout with gaps or
    with rows that are not whole blocks of memory, a term the kernel lacks)
    are stepped by the reference, which handles any layout in place, and
    ``warn(i, reason)`` is told (by default a one-time warning). Dense
    non-contiguous layouts such as channels_last take the fast kernels: each
    row is still one block of memory and the element-wise tensors share the
    weight's layout. ``terms`` are the regularizer keyword lists of
    ``reference.sgd_step`` (``l1s``, ``polars``, ``admm_targets``,
    ``admm_rhos``, ``prox_kinds``, ``prox_lams``, ``clamps``) and its column
    lambdas ``lam_cols``.
    """

    family = "sgd"
    grad_column = SGD_COLUMN["GRAD"]

    def __init__(self, params, bufs=None, lams=None, masks=None, norms=None, backend=None, warn=None, **terms):
        count = len(params)
        known = {**TERM_ABSENT, **CORE_ABSENT}
        unknown = set(terms) - set(known)
        if unknown:
            raise TypeError(f"unknown sgd terms {sorted(unknown)}; known: {sorted(known)}")
        bufs = list(bufs) if bufs is not None else [None] * count
        lams = list(lams) if lams is not None else [None] * count
        masks = list(masks) if masks is not None else [None] * count
        norms = list(norms) if norms is not None else [None] * count
        self.terms = {k: list(v) if v is not None else [known[k]] * count for k, v in terms.items()}
        if not all(len(x) == count for x in (bufs, lams, masks, norms, *self.terms.values())):
            raise ValueError("params, momentum buffers, lams, masks, norms and terms must have one entry per parameter")
        check_sgd_state(params, bufs, lams, masks, norms, self.terms)
        self._place(params, backend)
        self.columns = list(zip(params, bufs, lams, masks, norms))
        supported = self.backend.terms(self.family)
        none = [None] * count
        term = lambda key: self.terms.get(key) or none  # noqa: E731
        # the per-row coefficient vectors users and schedules write: checked finite before a
        # step (an entry that may have W's shape is W-sized there and not read)
        given = {"lams": lams, "masks": masks, "norms": norms}

        def coefficient(i, key):
            entry = STATE_BY_KEY[key]
            t = (given.get(entry.keyword) or term(entry.keyword))[i]
            return None if t is None or ("element" in entry.layouts and t.shape == params[i].shape) else t
        self.coefficients = [(i, key, t) for i in range(count) for key, t in
                             ((key, coefficient(i, key)) for key in FINITE_STATE) if t is not None]
        self._checked_versions: Optional[List[int]] = None

        def reason(i):
            missing = _terms_used(self.terms, i) - supported
            if missing:
                return f"the {self.backend} kernels do not compute its {', '.join(sorted(missing))} term"
            w, buf, lam, mask, norm = self.columns[i]
            element_lam = lam if lam is not None and lam.shape == w.shape else None
            element_mask = mask if mask is not None and mask.shape == w.shape else None
            return slow_reason(w, (buf, element_lam, element_mask, term("admm_targets")[i]) + self._state_tensors(i),
                               (lam if element_lam is None else None, mask if element_mask is None else None,
                                norm, term("l1s")[i], term("prox_lams")[i], term("polars")[i], term("lam_cols")[i]),
                               term("lam_cols")[i] is not None)
        fast = self._route([reason(i) for i in range(count)], warn)

        self._split(fast, self._table, lambda t: self.backend.kernels(self.family).build_units(t),
                    *self._check_args(float(any(c[1] is not None for c in self.columns))))
        # what check_coefficients reads itself: all but the vectors of launches whose table check reads them
        slow = set(self.slow_index)
        self._read_coefficients = [c for c in self.coefficients if not self.backend.checks_each_call or c[0] in slow]

    # -- what differs between the families built on this plan (AdamPlan overrides) --
    def _check_args(self, momentum: float) -> tuple:
        """The step options the family's table check depends on."""
        return (momentum,)

    def _state_tensors(self, i: int) -> tuple:
        """Tensor ``i``'s element-wise state besides the sgd columns (its layout must be W's)."""
        return ()

    def _table(self, index: List[int]) -> Tensor:
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        params, bufs, lams, masks, norms = (list(c) for c in zip(*pick(self.columns))) if index else ([],) * 5
        return build_sgd_table(params, params, bufs, lams, masks, norms, [False] * len(index),
                               **{k: pick(v) for k, v in self.terms.items()})

    def check_coefficients(self, momentum: float = 0.0) -> None:
        """``ValueError`` if a per-row coefficient vector (``lam`` per row,
        ``lam_cols``, ``l1``, ``prox_lam``) holds NaN or inf, before anything
        is written. The C++ backend checks its whole table (a few us); the
        reference reads its vectors; the Triton backend reads only vectors
        written since its last check (their version counters tell, so a
        steady step makes no device synchronisation; a write that bypasses
        them, through ``.data`` or numpy, is caught by the C++ and reference
        checks only)."""
        if self.backend.checks_each_call:
            for launch in self.launches:
                try:
                    self.backend.check(self.family, launch, *self._check_args(float(momentum)))
                except ValueError as err:
                    i = launch.pick(range(len(self.params)))[err.row]
                    key = COEFFICIENT_KEYS.get(err.column)
                    if key is None:
                        raise ValueError(f"parameter {i} ({_describe(self.params[i])}): {err}") from None
                    self._refuse_coefficient(i, key)
        vectors = self._read_coefficients
        versions = [t._version for _, _, t in vectors] if self.backend.reads_stall else None
        if versions is not None and versions == self._checked_versions:
            return
        old = self._checked_versions or [None] * len(vectors)
        for (i, key, t), seen, version in zip(vectors, old, versions or old):
            if versions is None or version != seen:
                if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(f"regkern: state['{key}'] of parameter {i} was written since the last step, "
                                       "and checking it reads the device, which a CUDA graph capture forbids; take "
                                       "one step after writing it, then capture")
                if not bool(torch.isfinite(t).all()):
                    self._refuse_coefficient(i, key)
        self._checked_versions = versions

    def _refuse_coefficient(self, i: int, key: str) -> None:
        raise ValueError(f"parameter {i} ({_describe(self.params[i])}) has a non-finite value in state['{key}']; "
                         "write finite coefficients")

    def run(self, grads: Sequence[Tensor], first_step=False, *, lr, momentum=0.0, dampening=0.0,
            nesterov=False, weight_decay=0.0, maximize=False,
            grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
        """Apply the step with gradients from ``checked_grads``."""
        firsts = [first_step] * len(grads) if isinstance(first_step, bool) else list(first_step)
        if not self.params or self.backend.skips(found_inf):  # (no tensors: nothing to read)
            return
        options = dict(momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
                       weight_decay=float(weight_decay), maximize=bool(maximize))
        for launch in self.launches:  # first: a kernel refuses its table before writing anything
            launch.patch_grads(grads, self.grad_column)
            flags = launch.pick(firsts)
            if flags != launch.firsts:
                launch.columns[:, SGD_COLUMN["FIRST"]] = flags
                launch.firsts = flags
            self.backend.run(self.family, launch, lr=lr, **options, grad_scale=grad_scale, found_inf=found_inf)
        if self.slow_index:
            pick = lambda values: [values[i] for i in self.slow_index]  # noqa: E731
            cols = pick(self.columns)
            reference_sgd_step([c[0] for c in cols], pick(grads), [c[1] for c in cols],
                               lams=[c[2] for c in cols], masks=[c[3] for c in cols], norms=[c[4] for c in cols],
                               first_step=pick(firsts), lr=lr, grad_scale=grad_scale, found_inf=found_inf,
                               **{k: pick(v) for k, v in self.terms.items()}, **options)


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers, *,
             lr: Union[float, Tensor], momentum: float = 0.0, dampening: float = 0.0,
             nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False,
             first_step=False, lams=None, masks=None, norms=None,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             backend: Optional[str] = None, **terms) -> None:
    """Functional fused step: same contract as ``regkern.reference.sgd_step``
    (``terms``: its regularizer keyword lists), on the backend chosen for the
    tensors' device."""
    plan = SGDPlan(params, momentum_buffers, lams, masks, norms, backend, **terms)
    grads = plan.checked_grads(grads)
    plan.run(grads, first_step, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
             weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)

