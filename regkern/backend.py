"""Kernel dispatch: one entry per kernel family.

CPU tensors go to the C++ extension (``regkern._C``), CUDA tensors to the
Triton kernels (``regkern.kernels``), anything else to the pure-torch
reference. ``backend=`` or the environment variable ``REGKERN_BACKEND``
(``cpp``, ``triton`` or ``reference``) forces one.

The fast backends share one metadata format, an int64 table with one row per
tensor (see ``SGD_FIELDS``), built once per plan and patched per step with the
gradient pointers: one C++ call or one kernel launch steps every tensor.
"""
from __future__ import annotations

import array
import os
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from regkern import reference
from regkern.reference.sgd import num_rows

BACKENDS = ("cpp", "triton", "reference")
NATIVE_BACKEND = {"cpu": "cpp", "cuda": "triton"}
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_fallbacks = set()

# Columns of the per-tensor metadata table shared by the C++ and Triton
# backends. Pointers are raw addresses (0 = absent); every tensor is
# contiguous. A row is W[r] (first dimension); ROW_LEN = numel // ROWS.
SGD_FIELDS = (
    "PARAM",      # W, storage dtype DTYPE
    "GRAD",       # gradient, same dtype and shape as W
    "BUF",        # momentum buffer, same dtype and shape as W (0: momentum == 0)
    "LAM",        # fp32 [ROWS] per-row L2 coefficient (0: none)
    "MASK",       # bool mask (0: none)
    "MASK_KIND",  # 0 none, 1 row mask [ROWS], 2 element mask (W's shape)
    "NORMS",      # fp32 [ROWS, 3] out: L1, L2, mean |W| of the updated rows (0: none)
    "NUMEL",
    "ROWS",
    "ROW_LEN",
    "DTYPE",      # 0 float32, 1 bfloat16, 2 float16
    "FIRST",      # 1: first momentum step, buf = d
)
SGD_COLUMN = {name: i for i, name in enumerate(SGD_FIELDS)}
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MASK_NONE, MASK_ROW, MASK_ELEMENT = 0, 1, 2


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def mask_kind(mask: Optional[Tensor], param: Tensor) -> int:
    if mask is None:
        return MASK_NONE
    if mask.shape == param.shape:
        return MASK_ELEMENT
    return MASK_ROW


def build_sgd_table(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Optional[Tensor]],
    lams: Sequence[Optional[Tensor]],
    masks: Sequence[Optional[Tensor]],
    norms: Sequence[Optional[Tensor]],
    first_step: Sequence[bool],
) -> Tensor:
    """The int64 ``[T, len(SGD_FIELDS)]`` metadata table (on the CPU)."""
    flat = array.array("q")
    for w, g, buf, lam, mask, norm, first in zip(params, grads, bufs, lams, masks, norms, first_step):
        r = num_rows(w)
        flat.extend((
            w.data_ptr(), g.data_ptr(), _ptr(buf), _ptr(lam), _ptr(mask),
            mask_kind(mask, w), _ptr(norm), w.numel(), r,
            w.numel() // r if r else 0, DTYPE_CODE[w.dtype], int(bool(first)),
        ))
    if not flat:
        return torch.empty(0, len(SGD_FIELDS), dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).reshape(-1, len(SGD_FIELDS)).clone()


def load_cpp():
    """The C++ extension, or None when it was not built."""
    try:
        from regkern import _C
    except ImportError:
        return None
    return _C


def load_triton():
    """The Triton kernels, or None when triton is not installed."""
    try:
        from regkern.kernels import sgd as triton_sgd
    except ImportError:
        return None
    return triton_sgd


def _warn_fallback(device: torch.device, why: str) -> None:
    key = (device.type, why)
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(f"regkern: {why}; {device.type} tensors are stepped by the pure-torch reference (slower).", stacklevel=4)


def choose_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """The backend for tensors on ``device``: forced by ``requested`` or
    ``REGKERN_BACKEND``, else C++ on CPU, Triton on CUDA, reference elsewhere."""
    name = requested or os.environ.get("REGKERN_BACKEND") or "auto"
    if name == "auto":
        name = NATIVE_BACKEND.get(device.type)
        if name is None:
            _warn_fallback(device, f"no fused kernel exists for {device.type} tensors")
            return "reference"
        if name == "cpp" and load_cpp() is None:
            _warn_fallback(device, "the C++ extension regkern._C is not built (reinstall with `pip install -e .`)")
            return "reference"
        if name == "triton" and load_triton() is None:
            _warn_fallback(device, "triton is not installed")
            return "reference"
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown regkern backend {name!r}; choose one of {BACKENDS} or 'auto'")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"the cpp backend steps CPU tensors only, not {device.type} tensors")
    if name == "cpp" and load_cpp() is None:
        raise RuntimeError("the cpp backend was asked for but regkern._C is not built; reinstall with `pip install -e .`")
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            raise ValueError(f"the triton backend steps CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type} tensors")
        if load_triton() is None:
            raise RuntimeError("the triton backend was asked for but triton is not installed")
    return name


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"


def check_sgd_inputs(params, grads, bufs, lams, masks, norms) -> None:
    """Raise ``ValueError`` (one sentence) on input the step cannot take."""
    device = params[0].device if params else None
    for i, (w, g, buf, lam, mask, norm) in enumerate(zip(params, grads, bufs, lams, masks, norms)):
        where = f"parameter {i} ({_describe(w)})"
        if w.device != device:
            raise ValueError(f"{where} is not on {device} like the first parameter of its group; put each device's parameters in their own param group")
        if g.is_sparse or w.is_sparse:
            raise ValueError(f"{where} has a sparse gradient, which regkern does not support; step it with torch.optim.SparseAdam or torch.optim.SGD")
        if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
            raise ValueError(f"{where} has a gradient of {_describe(g)}; it must match the parameter's shape, dtype and device")
        if not w.is_floating_point():
            raise ValueError(f"{where} is not floating point; only floating-point parameters can be optimized")
        rows = num_rows(w)
        if buf is not None and (buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device):
            raise ValueError(f"{where} has a momentum buffer of {_describe(buf)}; it must match the parameter")
        if lam is not None and (lam.shape != (rows,) or lam.dtype != torch.float32 or lam.device != device):
            raise ValueError(f"{where} has a lambda of {_describe(lam)}; it must be a float32 vector of length {rows} on {device}")
        if mask is not None and (mask.dtype != torch.bool or mask.device != device or mask.shape not in ((rows,), w.shape)):
            raise ValueError(f"{where} has a mask of {_describe(mask)}; it must be a bool tensor of shape ({rows},) (rows) or {tuple(w.shape)} (elements) on {device}")
        if norm is not None and (norm.shape != (rows, 3) or norm.dtype != torch.float32 or norm.device != device):
            raise ValueError(f"{where} has a row-norm output of {_describe(norm)}; it must be float32 of shape ({rows}, 3) on {device}")


def _fast_path_ok(*tensors: Optional[Tensor]) -> bool:
    return tensors[0].dtype in FAST_DTYPES and all(t is None or t.is_contiguous() for t in tensors)


class SGDLaunch:
    """One validated step of the ``sgd`` family over tensors on one device.

    Building it checks every input and builds the metadata, so a rejected step
    changes nothing; ``run`` then applies the update with the chosen backend.
    Tensors the fast kernels cannot take (non-contiguous, float64) are stepped
    by the reference, which handles any layout in place.
    """

    def __init__(self, params, grads, bufs, lams=None, masks=None, norms=None, first_step=False, backend=None):
        count = len(params)
        bufs = list(bufs) if bufs is not None else [None] * count
        lams = list(lams) if lams is not None else [None] * count
        masks = list(masks) if masks is not None else [None] * count
        norms = list(norms) if norms is not None else [None] * count
        firsts = [first_step] * count if isinstance(first_step, bool) else list(first_step)
        if not all(len(x) == count for x in (grads, bufs, lams, masks, norms, firsts)):
            raise ValueError("params, grads, momentum buffers, lams, masks, norms and first_step must have one entry per parameter")
        check_sgd_inputs(params, grads, bufs, lams, masks, norms)
        columns = list(zip(params, grads, bufs, lams, masks, norms, firsts))
        self.backend = choose_backend(params[0].device, backend) if count else "reference"
        if self.backend == "reference":
            fast, slow = [], columns
        else:
            fast = [c for c in columns if _fast_path_ok(*c[:6])]
            slow = [c for c in columns if not _fast_path_ok(*c[:6])]
        self.slow = [list(x) for x in zip(*slow)] if slow else None
        self.fast = []  # (dtype or None, table, extra) per launch
        self.keep_alive = fast
        if not fast:
            return
        if self.backend == "cpp":
            self.fast.append((None, build_sgd_table(*zip(*fast)), None))
        else:
            triton_sgd = load_triton()
            for dtype in FAST_DTYPES:
                same = [c for c in fast if c[0].dtype == dtype]
                if same:
                    table = build_sgd_table(*zip(*same))
                    units = triton_sgd.build_units(table).to(params[0].device)
                    self.fast.append((dtype, table.to(params[0].device), units))

    def run(self, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
            maximize=False, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
        options = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                       weight_decay=float(weight_decay), maximize=maximize)
        if self.slow is not None:
            params, grads, bufs, lams, masks, norms, firsts = self.slow
            reference.sgd_step(params, grads, bufs, lr=lr, lams=lams, masks=masks, norms=norms,
                               first_step=firsts, grad_scale=grad_scale, found_inf=found_inf, **options)
        if not self.fast:
            return
        if self.backend == "cpp":
            if found_inf is not None and bool(found_inf.item()):
                return
            (_, table, _), = self.fast
            scale = 1.0 if grad_scale is None else float(grad_scale)
            load_cpp().sgd_step(table.data_ptr(), table.shape[0], float(lr), float(momentum),
                                float(dampening), bool(nesterov), options["weight_decay"],
                                bool(maximize), scale, torch.get_num_threads())
            return
        triton_sgd = load_triton()
        for dtype, table, units in self.fast:
            triton_sgd.sgd_step(table, dtype, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
                                units=units, **options)


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers, *,
             lr: Union[float, Tensor], momentum: float = 0.0, dampening: float = 0.0,
             nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False,
             first_step=False, lams=None, masks=None, norms=None,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             backend: Optional[str] = None) -> None:
    """Functional fused step: same contract as ``regkern.reference.sgd_step``,
    on the backend chosen for the tensors' device."""
    launch = SGDLaunch(params, grads, momentum_buffers, lams, masks, norms, first_step, backend)
    launch.run(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
               weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
