"""Kernel dispatch of the `rda` family (L1 regularized dual averaging, docs/rda.md).

Same scheme as the sgd family in ``regkern.backends.sgd`` (``RDAPlan`` is a
``TablePlan`` like ``SGDPlan``): CPU tensors go to the C++ extension
(``regkern._C.rda_step``), CUDA tensors to the Triton kernel
(``regkern.kernels.rda``), anything else to the reference
(``regkern.reference.rda``); ``backend=`` or ``REGKERN_BACKEND`` forces one
(``regkern.backends.dispatch.choose_backend``).

Both fast backends read one int64 metadata table with a row per tensor (see
``RDA_FIELDS``), built once per plan. A table holds each tensor's step ``t``,
``lam`` and ``gamma``; the kernels derive the step's coefficients from them
(``(t-1)/t``, ``sqrt(t)/gamma``, ``tau``, ``kappa``: the float64 operations
of ``reference.rda.rda_coefficients``). So a step patches the gradient
pointers and the ``t`` column through a numpy view (``lam`` and ``gamma``
only when they change), then makes one C++ call, or one launch per dtype.
"""
from __future__ import annotations

import array
import functools
import glob
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

import regkern.backends.dispatch as _backend
from regkern.backends.backend import CppBackend, TritonBackend
from regkern.backends.dispatch import TablePlan, slow_reason
from regkern.backends.sgd import mask_kind
from regkern.layouts import DTYPE_CODE, RDA_COLUMN, RDA_FIELDS, float_bits  # noqa: F401
from regkern.reference import rda as _reference
from regkern.reference.sgd import num_rows

# Columns of the per-tensor metadata table (mirrored by csrc/rda_table.h).
# Pointers are raw addresses (0 = absent); every tensor is contiguous.
# Columns marked "float" hold the bits of a float64.
_T, _LAM, _GAMMA, _GRAD = (RDA_COLUMN[k] for k in ("T", "LAM", "GAMMA", "GRAD"))
_FALLBACK_L2 = 1 << 20


@functools.lru_cache(maxsize=None)
def cache_bytes() -> int:
    """The private (level 2) caches of all CPUs together, in bytes (Linux
    sysfs; 1 MiB per CPU when unknown)."""
    size = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{index}/size") as f:
                text = f.read().strip().upper()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
    return (size or _FALLBACK_L2) * (os.cpu_count() or 1)


def streams_w(params: Sequence[Tensor]) -> bool:
    """Whether the C++ kernel should write fp32 W with non-temporal stores.
    The step never reads W, so a plain store first reads the line it
    overwrites (read-for-ownership): a sixth of RDA's memory traffic. Once a
    step's data (W, grad, gbar, W0) outgrows the CPUs' private caches, W
    would not stay close to them anyway and streaming it skips that read
    (measured on ResNet-56 and ResNet-50: the step goes from about 80% to
    about 95% of the in-place x += y bandwidth)."""
    working = sum(p.numel() * (2 * p.element_size() + 8) for p in params)
    return working > cache_bytes()


def build_rda_table(params, grads, gbars, w0s, masks, groups, scratch=None, stream=False) -> Tensor:
    """The int64 ``[T, len(RDA_FIELDS)]`` metadata table (on the CPU), with
    ``t = 1``, ``lam = 0`` and ``gamma = 1`` (``write_step`` sets the step's).
    ``stream``: non-temporal stores for the fp32 tensors (``streams_w``)."""
    count = len(params)
    flat = array.array("q")
    one = float_bits(1.0)
    for w, g, gbar, w0, mask, grouped, norm_sq in zip(params, grads, gbars, w0s, masks, groups,
                                                       scratch or [None] * count):
        r = num_rows(w)
        flat.extend((
            w.data_ptr(), g.data_ptr(), gbar.data_ptr(), w0.data_ptr(),
            0 if mask is None else mask.data_ptr(), mask_kind(mask, w), w.numel(), r,
            w.numel() // r if r else 0, DTYPE_CODE[w.dtype], int(bool(grouped)),
            int(bool(stream) and w.dtype == torch.float32), one, 0, one,
            0 if norm_sq is None else norm_sq.data_ptr(),
        ))
    if not flat:
        return torch.empty(0, len(RDA_FIELDS), dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).reshape(-1, len(RDA_FIELDS)).clone()


def write_step(columns: np.ndarray, steps, gamma: float, lams) -> None:
    """Write a step's ``t`` and ``lam`` (one value or one per row) and
    ``gamma`` into a table's numpy view."""
    rows = columns.shape[0]
    columns[:, _T] = np.broadcast_to(np.asarray(steps, dtype=np.float64), (rows,)).view(np.int64)
    columns[:, _LAM] = np.broadcast_to(np.asarray(lams, dtype=np.float64), (rows,)).view(np.int64)
    columns[:, _GAMMA] = float_bits(gamma)


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


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam < np.inf:  # also refuses NaN
        raise ValueError(f"lam must be finite and non-negative, got {lam}")


def _slow_reason(w: Tensor, gbar: Tensor, w0: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    element_mask = mask if mask is not None and mask.shape == w.shape else None
    return slow_reason(w, (gbar, w0, element_mask), (mask if element_mask is None else None,), False)


class RDAPlan(TablePlan):
    """The validated, static part of an ``rda`` step over tensors on one device.

    Parameters and their state (gbar, W0, masks) are checked and their
    metadata built once; each step then checks the gradients, patches their
    pointers and the step counts into the table (lam and gamma when they
    changed) and makes one C++ call or one launch per dtype. Tensors the fast
    kernels cannot take (float64, a layout that is not dense with whole rows
    in memory, state laid out unlike the weight) are stepped by the reference
    and ``warn(i, reason)`` is told.
    """

    family = "rda"
    grad_column = _GRAD

    def __init__(self, params, gbars, w0s, masks=None, groups=False, backend=None, warn=None):
        count = len(params)
        masks = list(masks) if masks is not None else [None] * count
        groups = [bool(g) for g in _reference._per_tensor(groups, count, "group")]
        if not (len(gbars) == len(w0s) == len(masks) == count):
            raise ValueError("params, gbars, w0s and masks must have one entry per parameter")
        check_rda_state(params, gbars, w0s, masks)
        self._place(params, backend)
        self.groups = groups
        self.columns = list(zip(params, gbars, w0s, masks))
        fast = self._route([_slow_reason(*c) for c in self.columns], warn)
        stream = isinstance(self.backend, CppBackend) and streams_w([p for p, f in zip(params, fast) if f])
        self._scratch = []  # per-row sums of squares of the Triton kernel (group tensors)

        def table(index):
            cols = [self.columns[i] for i in index]
            scratch = None
            if isinstance(self.backend, TritonBackend):
                scratch = [torch.empty(num_rows(c[0]), dtype=torch.float32, device=self.device)
                           if groups[i] else None for i, c in zip(index, cols)]
                self._scratch.append(scratch)
            return build_rda_table([c[0] for c in cols], [c[0] for c in cols], [c[1] for c in cols],
                                   [c[2] for c in cols], [c[3] for c in cols], [groups[i] for i in index],
                                   scratch, stream)
        self._split(fast, table, lambda t: self.backend.kernels(self.family).build_units(t))
        for launch in self.launches:
            launch.rows = None if launch.index is None else np.asarray(launch.index, dtype=np.int64)
            launch.lam = launch.gamma = None  # the values now in the table

    def run(self, grads: Sequence[Tensor], steps, *, gamma: Union[float, Tensor], lams=0.0,
            maximize: bool = False, grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None) -> None:
        """Apply the step with gradients from ``checked_grads``; ``steps``
        (the t of each tensor, 1 at its first step) and ``lams`` are one value
        or one per tensor (a float64 numpy array of steps is used as it is)."""
        count = len(self.params)
        gamma = float(gamma)
        if not gamma > 0:  # also refuses NaN
            raise ValueError(f"gamma (the inverse learning rate) must be positive, got {gamma}")
        if not (isinstance(steps, np.ndarray) and steps.dtype == np.float64 and steps.shape == (count,)):
            steps = np.ascontiguousarray(np.broadcast_to(np.asarray(steps, dtype=np.float64), (count,)))
        if count and not steps.min() >= 1:  # also refuses NaN
            raise ValueError(f"the step t counts from 1 at the first step; got {steps.min()}")
        if isinstance(lams, (list, tuple, np.ndarray)):
            lams = np.broadcast_to(np.asarray(lams, dtype=np.float64), (count,))
            for lam in lams:
                _check_lam(float(lam))
        else:
            lams = float(lams)
            _check_lam(lams)
        if not self.params or self.backend.skips(found_inf):  # (no tensors: nothing to read)
            return
        if self.slow_index:
            idx = self.slow_index
            cols = [self.columns[i] for i in idx]
            _reference.rda_step([c[0] for c in cols], [grads[i] for i in idx], [c[1] for c in cols],
                                [c[2] for c in cols], masks=[c[3] for c in cols],
                                step=[float(steps[i]) for i in idx], gamma=gamma,
                                lams=lams if isinstance(lams, float) else [float(lams[i]) for i in idx],
                                group=[self.groups[i] for i in idx],
                                maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
        for launch in self.launches:
            launch.patch_grads(grads, self.grad_column)
            cols = launch.columns
            cols[:, _T] = (steps if launch.rows is None else steps[launch.rows]).view(np.int64)
            if gamma != launch.gamma:
                cols[:, _GAMMA] = float_bits(gamma)
                launch.gamma = gamma
            mine = lams if isinstance(lams, float) or launch.rows is None else lams[launch.rows]
            if not (isinstance(mine, float) and mine == launch.lam):
                cols[:, _LAM] = np.broadcast_to(np.asarray(mine, dtype=np.float64), (len(cols),)).view(np.int64)
                launch.lam = mine if isinstance(mine, float) else None
            self.backend.run(self.family, launch, maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf)


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
