"""Kernel dispatch shared by every family: the checks every plan makes on
parameters and gradients, and ``TablePlan``, the plan base of the families.

Each plan steps its tensors with the backend of their device
(``regkern.backends.backend``): CPU tensors go to the C++ extension
(``regkern._C``), CUDA tensors to the Triton kernels (``regkern.kernels``),
anything else to the pure-torch reference. ``backend=`` or the environment
variable ``REGKERN_BACKEND`` (``cpp``, ``triton`` or ``reference``) forces one.

The fast backends share one metadata format per family, an int64 table with
one row per tensor (``regkern.layouts``), built once per plan and patched per
step with the gradient pointers: one C++ call or one kernel launch steps every
tensor.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from regkern.backends.backend import FAST_DTYPES, Backend, ReferenceBackend, _warned_fallbacks, choose_backend


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"


def check_sgd_grads(params, grads) -> None:
    """Raise ``ValueError`` (one sentence) on gradients the step cannot take."""
    strided = torch.strided
    for i, (w, g) in enumerate(zip(params, grads)):
        if g.layout is not strided or g.shape != w.shape or g.dtype is not w.dtype:
            break
    else:
        return
    if g.layout is not strided:
        raise ValueError(f"parameter {i} ({_describe(w)}) has a sparse gradient, which regkern does not support; step it with torch.optim.SparseAdam or torch.optim.SGD")
    raise ValueError(f"parameter {i} ({_describe(w)}) has a gradient of {_describe(g)}; it must match the parameter's shape and dtype")


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory without gaps or
    overlaps, in some order of its dimensions (contiguous, channels_last, a
    permutation): a kernel may then treat it as a flat array in memory order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def checked_grads(params, shapes, dtypes, strides, grads: Sequence[Tensor]) -> List[Tensor]:
    """``grads`` (one per parameter of the given shapes, dtypes and strides,
    as the plan recorded them; ``strides`` None: every parameter contiguous)
    ready for a fused step; ``ValueError`` on gradients that cannot be
    stepped, or when a parameter no longer has the recorded shape or layout
    (the caller then builds a new plan). A gradient laid out unlike its dense
    parameter (or, for a parameter that is not dense, not contiguous) is
    copied into that layout."""
    if len(grads) != len(params):
        raise ValueError(f"expected {len(params)} gradients, got {len(grads)}")
    # the common case in three C-level passes, the details only on a mismatch
    if [g.shape for g in grads] == shapes and [g.dtype for g in grads] == dtypes and (
            all(map(Tensor.is_contiguous, grads)) if strides is None else list(map(Tensor.stride, grads)) == strides):
        return grads
    if [p.shape for p in params] != shapes or (
            not all(p.is_contiguous() for p in params) if strides is None else [p.stride() for p in params] != strides):
        raise ValueError("a parameter changed shape or layout since the step plan was built; build a new plan")
    check_sgd_grads(params, grads)
    return [g if _same_layout(g, w) else torch.empty_like(w, memory_format=torch.preserve_format).copy_(g)
            for w, g in zip(params, grads)]


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` can be read in ``b``'s flat memory order (``b`` dense) or
    is contiguous (``b`` not dense: the reference steps it, any layout)."""
    if not is_dense(b):
        return a.is_contiguous()
    return a.stride() == b.stride() or (a.is_contiguous() and b.is_contiguous())


def slow_reason(w: Tensor, elementwise: Sequence[Optional[Tensor]], per_row: Sequence[Optional[Tensor]],
                columns: bool) -> Optional[str]:
    """Why a fast kernel cannot step ``w`` with these state tensors, or None.
    ``elementwise``: tensors of W's shape read in W's memory order (gradient
    layout is handled per step); ``per_row``: small vectors read by row index;
    ``columns``: column lambdas (the kernels index columns of a row-major W)."""
    if w.dtype not in FAST_DTYPES:
        return f"its dtype {str(w.dtype).replace('torch.', '')} has no fused kernel (float32, bfloat16 and float16 have)"
    if not is_dense(w):
        return f"its memory layout (strides {tuple(w.stride())}) has gaps or overlaps; make it contiguous"
    if w.dim() > 1 and w.shape[0] > 1 and w.stride()[0] != w.numel() // w.shape[0]:
        return (f"its rows W[r] are not whole blocks of memory (strides {tuple(w.stride())}); "
                "store it contiguous or channels_last")
    if columns and not w.is_contiguous():
        return "its column lambdas (state['lam_cols']) need a contiguous (row-major) weight"
    for t in elementwise:
        if t is not None and not _same_layout(t, w):
            return (f"a state tensor of its shape has strides {tuple(t.stride())} unlike the weight's "
                    f"{tuple(w.stride())}; create it with torch.empty_like / zeros_like of the weight")
    for t in per_row:
        if t is not None and not t.is_contiguous():
            return "a per-row state vector is not contiguous"
    return None


class _GradsInTables:
    """What a plan's ``run`` gets instead of gradients when the step reader
    has already written their addresses into its tables."""

    def __repr__(self) -> str:
        return "GRADS_IN_TABLES"


GRADS_IN_TABLES = _GradsInTables()


class _Launch:
    """One C++ call or Triton launch: a metadata table over some of a plan's tensors."""

    def __init__(self, dtype, index, table):
        self.dtype, self.index, self.table = dtype, index, table
        self.units = None  # the Triton work list (Backend.prepare)
        self.device_table = self.sent = None  # the Triton table on the device, and what it holds
        self.stream = None  # the CUDA stream of the last launch
        self.columns = table.numpy()  # a view: per-step patches cost no torch op
        self.firsts = None  # the first-step flags now in the table

    def pick(self, values):
        """This launch's entries of a list with one entry per tensor of the plan."""
        return values if self.index is None else [values[i] for i in self.index]

    def patch_grads(self, grads: Sequence[Tensor], column: int) -> None:
        """Write this launch's gradient addresses into the table's ``column``
        (``GRADS_IN_TABLES``: the step reader has)."""
        if grads is GRADS_IN_TABLES:
            return
        self.columns[:, column] = list(map(Tensor.data_ptr, self.pick(grads)))


class TablePlan:
    """What the plans of the kernel families share (``SGDPlan``,
    ``regkern.backends.rda.RDAPlan``): the parameters' shapes and dtypes for the
    per-step gradient check, the backend of their device, the tensors the
    reference steps (``slow_index``) and the launches over the others, each a
    metadata table whose gradient pointers a step patches: one C++ call for
    all, or one Triton launch per storage dtype."""

    #: the kernel family (``Backend.run``): its kernels are ``<family>_step``
    family = ""
    #: the table column of the gradient's address
    grad_column = -1

    def _place(self, params: Sequence[Tensor], backend: Optional[str]) -> None:
        self.params = list(params)
        self.shapes = [p.shape for p in params]
        self.dtypes = [p.dtype for p in params]
        # None when every parameter is contiguous: the per-step check then
        # asks is_contiguous, which also holds for strides of size-1 dimensions
        self.strides = None if all(p.is_contiguous() for p in params) else [p.stride() for p in params]
        self.device = params[0].device if params else torch.device("cpu")
        self.backend: Backend = choose_backend(self.device, backend) if params else ReferenceBackend(self.device)

    def _split(self, fast: Sequence[bool], build_table: Callable[[List[int]], Tensor],
               build_units: Callable[[Tensor], Tensor], *check_args) -> None:
        """Tensor ``i`` goes to the reference unless ``fast[i]``; the others to
        launches with the table ``build_table(indices)``, made ready by the
        backend (``Backend.prepare``: the work list ``build_units(table)``, the
        check of the table with ``check_args``)."""
        count = len(self.params)
        self.slow_index = [i for i, f in enumerate(fast) if not f]
        self.launches: List[_Launch] = []
        for dtype, index in self.backend.launch_groups([i for i, f in enumerate(fast) if f], self.dtypes).items():
            if not index:
                continue
            launch = _Launch(dtype, None if len(index) == count else index, build_table(index))
            self.backend.prepare(self.family, launch, build_units, *check_args)
            self.launches.append(launch)

    def checked_grads(self, grads: Sequence[Tensor]) -> List[Tensor]:
        """``grads`` (one per parameter) ready for ``run``; ``ValueError`` on
        gradients that cannot be stepped. Ones laid out unlike their parameter are copied."""
        return checked_grads(self.params, self.shapes, self.dtypes, self.strides, grads)

    def _route(self, reasons: Sequence[Optional[str]], warn: Optional[Callable[[int, str], None]]) -> List[bool]:
        """Which tensors the fast kernels take (``reasons[i]`` None); the
        others go to the reference, each announced once through ``warn(i, reason)``
        (a backend forced to "reference" is the caller's choice: no warning)."""
        if not self.backend.fast:
            return [False] * len(reasons)
        for i, why in enumerate(reasons):
            if why is not None:
                if warn is not None:
                    warn(i, why)
                elif why not in _warned_fallbacks:
                    _warned_fallbacks.add(why)
                    warnings.warn(f"regkern: tensor {i} of the step is stepped by the pure-torch reference "
                                  f"(slower) because {why}.", stacklevel=3)
        return [why is None for why in reasons]

