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

from typing import Optional, Sequence

import torch
from torch import Tensor

from regkern.reference.sgd import num_rows

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
    rows = []
    for w, g, buf, lam, mask, norm, first in zip(params, grads, bufs, lams, masks, norms, first_step):
        r = num_rows(w)
        rows.append((
            w.data_ptr(), g.data_ptr(), _ptr(buf), _ptr(lam), _ptr(mask),
            mask_kind(mask, w), _ptr(norm), w.numel(), r,
            w.numel() // r if r else 0, DTYPE_CODE[w.dtype], int(bool(first)),
        ))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(SGD_FIELDS))
