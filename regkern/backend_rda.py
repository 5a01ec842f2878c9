"""Kernel dispatch of the `rda` family (L1 regularized dual averaging, SPEC 4).

Same scheme as the sgd family in ``regkern.backend``: CPU tensors go to the
C++ extension (``regkern._C.rda_step``), CUDA tensors to the Triton kernel
(``regkern.kernels.rda``), anything else to the reference
(``regkern.reference.rda``); ``backend=`` or ``REGKERN_BACKEND`` forces one
(``regkern.backend.choose_backend``).

Both fast backends read one int64 metadata table with a row per tensor (see
``RDA_FIELDS``), built once per plan. Each step patches the gradient pointers
and the step's coefficients (``t``, ``(t-1)/t``, ``sqrt(t)/gamma``, ``tau``,
``kappa``, computed in float64 for all tensors at once with numpy, exactly as
``reference.rda.rda_coefficients`` computes them) through a numpy view, then
makes one C++ call, or one launch per storage dtype.
"""
from __future__ import annotations

import array
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from regkern import backend as _backend
from regkern.backend import DTYPE_CODE, FAST_DTYPES, choose_backend, load_cpp, mask_kind
from regkern.reference import rda as _reference
from regkern.reference.sgd import num_rows

# Columns of the per-tensor metadata table (mirrored by csrc/rda_table.h).
# Pointers are raw addresses (0 = absent); every tensor is contiguous.
# Columns marked "float" hold the bits of a float64.
RDA_FIELDS = (
    "PARAM",      # W, storage dtype DTYPE (written, never read)
    "GRAD",       # gradient, same dtype and shape as W
    "GBAR",       # fp32, W's shape: running mean of the gradients
    "W0",         # fp32, W's shape: W at the first step (written only under a mask)
    "MASK",       # bool mask (0: none)
    "MASK_KIND",  # 0 none, 1 row mask [ROWS], 2 element mask (W's shape)
    "NUMEL",
    "ROWS",
    "ROW_LEN",
    "DTYPE",      # 0 float32, 1 bfloat16, 2 float16
    "GROUP",      # 0 element soft threshold, 1 row (group) shrinkage
    "T",          # float: the step t (1 at the first step)
    "A",          # float: (t - 1) / t
    "C",          # float: sqrt(t) / gamma
    "TAU",        # float: lam * sqrt(t) / gamma
    "KAPPA",      # float: tau * sqrt(ROW_LEN)
    "NORM_SQ",    # fp32 [ROWS] scratch of the Triton kernel for group tensors (0: none)
)
RDA_COLUMN = {name: i for i, name in enumerate(RDA_FIELDS)}
_COEFFICIENTS = slice(RDA_COLUMN["T"], RDA_COLUMN["KAPPA"] + 1)


def load_triton_rda():
    """The Triton rda kernel module, or None when triton is not installed."""
    try:
        from regkern.kernels import rda as triton_rda
    except ImportError:
        return None
    return triton_rda


def build_rda_table(params, grads, gbars, w0s, masks, groups, scratch=None) -> Tensor:
    """The int64 ``[T, len(RDA_FIELDS)]`` metadata table (on the CPU), with
    zero coefficients (``coefficients`` fills them per step)."""
    count = len(params)
    flat = array.array("q")
    for w, g, gbar, w0, mask, grouped, norm_sq in zip(params, grads, gbars, w0s, masks, groups,
                                                       scratch or [None] * count):
        r = num_rows(w)
        flat.extend((
            w.data_ptr(), g.data_ptr(), gbar.data_ptr(), w0.data_ptr(),
            0 if mask is None else mask.data_ptr(), mask_kind(mask, w), w.numel(), r,
            w.numel() // r if r else 0, DTYPE_CODE[w.dtype], int(bool(grouped)),
            0, 0, 0, 0, 0, 0 if norm_sq is None else norm_sq.data_ptr(),
        ))
    if not flat:
        return torch.empty(0, len(RDA_FIELDS), dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).reshape(-1, len(RDA_FIELDS)).clone()


def coefficients(steps, gamma: float, lams, row_len) -> np.ndarray:
    """float64 ``[T, 5]``: (t, a, c, tau, kappa) per tensor, vectorized
    ``reference.rda.rda_coefficients`` (the same float64 operations)."""
    t = np.asarray(steps, dtype=np.float64)
    lam = np.broadcast_to(np.asarray(lams, dtype=np.float64), t.shape)
    root = np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (t - 1.0) / t
        c = root / gamma
        tau = lam * root / gamma
        kappa = tau * np.sqrt(np.asarray(row_len, dtype=np.float64))
    return np.stack([t, a, c, tau, kappa], axis=1)


def check_rda_state(params, gbars, w0s, masks) -> None:
    """Raise ``ValueError`` (one sentence) on parameters or state the step cannot take."""
    describe = _backend._describe
    device = params[0].device if params else None
    for i, (w, gbar, w0, mask) in enumerate(zip(params, gbars, w0s, masks)):
        where = lambda: f"parameter {i} ({describe(w)})"  # noqa: E731  (built only on error)
        if w.device != device:
            raise ValueError(f"{where()} is not on {device} like the first parameter of its group; put each device's parameters in their own param group")
        if w.is_sparse:
            raise ValueError(f"{where()} is sparse, which regkern does not support; step it with torch.optim.SparseAdam or torch.optim.SGD")
        if not w.is_floating_point():
            raise ValueError(f"{where()} is not floating point; only floating-point parameters can be optimized")
        state_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        for name, t in (("running gradient mean (gbar)", gbar), ("initial weights (w0)", w0)):
            if t.shape != w.shape or t.dtype != state_dtype or t.device != device:
                raise ValueError(f"{where()} has {name} of {describe(t)}; it must be {str(state_dtype).replace('torch.', '')} of the parameter's shape on {device}")
        rows = num_rows(w)
        if mask is not None and (mask.dtype != torch.bool or mask.device != device or mask.shape not in ((rows,), w.shape)):
            raise ValueError(f"{where()} has a mask of {describe(mask)}; it must be a bool tensor of shape ({rows},) (rows) or {tuple(w.shape)} (elements) on {device}")


def _check_scalars(steps: np.ndarray, gamma: float, lams: np.ndarray) -> None:
    if not gamma > 0:  # also refuses NaN
        raise ValueError(f"gamma (the inverse learning rate) must be positive, got {gamma}")
    if not (steps >= 1).all():
        raise ValueError(f"the step t counts from 1 at the first step; got {steps.min()}")
    if not ((lams >= 0) & (lams < np.inf)).all():
        raise ValueError(f"lam must be finite and non-negative, got {lams[~((lams >= 0) & (lams < np.inf))][0]}")


def _fast_path_ok(w: Tensor, gbar: Tensor, w0: Tensor, mask: Optional[Tensor]) -> bool:
    return w.dtype in FAST_DTYPES and all(t is None or t.is_contiguous() for t in (w, gbar, w0, mask))


class _Launch:
    """One C++ call or Triton launch: a metadata table over some of a plan's tensors."""

    def __init__(self, dtype, index, table, units, scratch):
        self.dtype, self.index, self.table, self.units, self.scratch = dtype, index, table, units, scratch
        self.columns = table.numpy()  # a view: per-step patches cost no torch op
        self.row_len = self.columns[:, RDA_COLUMN["ROW_LEN"]].copy()
        self.groups = None


class RDAPlan:
    """The validated, static part of an ``rda`` step over tensors on one device.

    Parameters and their state (gbar, W0, masks) are checked and their
    metadata built once; each step then checks the gradients, patches their
    pointers and the step's coefficients into the table and makes one C++
    call or one launch per dtype. Tensors the fast kernels cannot take
    (non-contiguous, float64) are stepped by the reference.
    """

    def __init__(self, params, gbars, w0s, masks=None, groups=False, backend=None):
        count = len(params)
        masks = list(masks) if masks is not None else [None] * count
        groups = [bool(g) for g in _reference._per_tensor(groups, count, "group")]
        if not (len(gbars) == len(w0s) == len(masks) == count):
            raise ValueError("params, gbars, w0s and masks must have one entry per parameter")
        check_rda_state(params, gbars, w0s, masks)
        self.params = list(params)
        self.shapes = [p.shape for p in params]
        self.dtypes = [p.dtype for p in params]
        self.groups = groups
        self.columns = list(zip(params, gbars, w0s, masks))
        self.device = params[0].device if count else torch.device("cpu")
        self.backend = choose_backend(self.device, backend) if count else "reference"
        fast = [self.backend != "reference" and _fast_path_ok(*c) for c in self.columns]
        self.slow_index = [i for i, f in enumerate(fast) if not f]
        self.launches: List[_Launch] = []
        by_dtype = {None: [i for i, f in enumerate(fast) if f]} if self.backend == "cpp" else {
            dtype: [i for i, f in enumerate(fast) if f and params[i].dtype == dtype] for dtype in FAST_DTYPES}
        for dtype, index in by_dtype.items():
            if not index:
                continue
            cols = [self.columns[i] for i in index]
            scratch = None
            if self.backend == "triton":  # per-row sums of squares of group tensors
                scratch = [torch.empty(num_rows(c[0]), dtype=torch.float32, device=self.device)
                           if groups[i] else None for i, c in zip(index, cols)]
            table = build_rda_table([c[0] for c in cols], [c[0] for c in cols], [c[1] for c in cols],
                                    [c[2] for c in cols], [c[3] for c in cols], [groups[i] for i in index],
                                    scratch)
            units = load_triton_rda().build_units(table).to(self.device) if self.backend == "triton" else None
            self.launches.append(_Launch(dtype, None if len(index) == count else index, table, units, scratch))

    def checked_grads(self, grads: Sequence[Tensor]) -> List[Tensor]:
        """``grads`` (one per parameter) ready for ``run``; ``ValueError`` on
        gradients that cannot be stepped. Non-contiguous ones are copied."""
        return _backend.checked_grads(self.params, self.shapes, self.dtypes, grads)

    def run(self, grads: Sequence[Tensor], steps, *, gamma: Union[float, Tensor], lams=0.0,
            maximize: bool = False, grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None) -> None:
        """Apply the step with gradients from ``checked_grads``; ``steps``
        (the t of each tensor, 1 at its first step) and ``lams`` are one value
        or one per tensor."""
        count = len(self.params)
        gamma = float(gamma)
        steps = np.broadcast_to(np.asarray(steps, dtype=np.float64), (count,))
        lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), (count,))
        _check_scalars(steps, gamma, lams)
        if found_inf is not None and self.backend != "triton" and bool(found_inf.item()):
            return
        if self.slow_index:
            idx = self.slow_index
            cols = [self.columns[i] for i in idx]
            _reference.rda_step([c[0] for c in cols], [grads[i] for i in idx], [c[1] for c in cols],
                                [c[2] for c in cols], masks=[c[3] for c in cols],
                                step=[float(steps[i]) for i in idx], gamma=gamma,
                                lams=[float(lams[i]) for i in idx], group=[self.groups[i] for i in idx],
                                maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
        for launch in self.launches:
            index = launch.index
            mine = grads if index is None else [grads[i] for i in index]
            cols = launch.columns
            cols[:, RDA_COLUMN["GRAD"]] = list(map(Tensor.data_ptr, mine))
            coef = coefficients(steps if index is None else steps[index], gamma,
                                lams if index is None else lams[index], launch.row_len)
            cols[:, _COEFFICIENTS] = coef.view(np.int64)
            table = launch.table
            if self.backend == "cpp":
                scale = 1.0 if grad_scale is None else float(grad_scale)
                load_cpp().rda_step(table.data_ptr(), table.shape[0], table.shape[1], bool(maximize), scale,
                                    torch.get_num_threads())
            else:
                load_triton_rda().rda_step(table.to(self.device), launch.dtype, units=launch.units,
                                           maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def rda_step(params: Sequence[Tensor], grads: Sequence[Tensor], gbars: Sequence[Tensor],
             w0s: Sequence[Tensor], *, step, gamma: Union[float, Tensor], lams=0.0, group=False,
             maximize: bool = False, masks=None, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None, backend: Optional[str] = None) -> None:
    """Functional fused step: same contract as ``regkern.reference.rda.rda_step``,
    on the backend chosen for the tensors' device."""
    plan = RDAPlan(params, gbars, w0s, masks, group, backend)
    grads = plan.checked_grads(grads)
    plan.run(grads, step, gamma=gamma, lams=lams, maximize=maximize, grad_scale=grad_scale,
             found_inf=found_inf)
