"""What the Triton kernels of every family (``sgd``, ``rda``, ``admm``) share.

Launch side (Python):

- ``TL_DTYPE``: the storage dtypes the kernels take, as Triton types, and
  :func:`tl_dtype`, which refuses any other;
- :func:`place_amp_scalars`: GradScaler's ``found_inf`` and ``grad_scale``
  moved where a kernel reads them;
- :func:`units_of`: the ``[U, 3]`` work list (tensor, start, end) from each
  tensor's element count and unit length.

Kernel side (``@triton.jit``, inlined into the caller):

- the unit prologue: :func:`skip_step` (the found_inf flag; the kernel body
  returns on it, a helper cannot return from its caller),
  :func:`load_grad_scale`, :func:`program_unit` (the table row and element
  range of this program's unit) and :func:`row_origin` (where the unit starts
  in its tensor's rows);
- table columns holding float64 bits (:func:`column_f64`, :func:`column_f32`);
- :func:`descent_grad`: a gradient loaded in fp32, unscaled and negated
  under ``maximize``;
- row reductions: the segmented-sum combine functions and
  :func:`row_running_sum` / :func:`row_running_sums`, per-row inclusive sums
  over one piece that continue a row's unfinished sum from the previous
  piece (:func:`last_lane` gives the carry).

This module imports nothing from regkern: the kernel modules bring their
table layouts.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

UNIT_FIELDS = 3  # a unit: tensor index, first element, end element
_UNIT_FIELDS = tl.constexpr(UNIT_FIELDS)

# Storage dtypes of the tensors a kernel steps (the math is fp32 whatever the storage).
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype, who: str):
    """The Triton type of storage ``dtype``; ``TypeError`` (``who`` starts the
    sentence, e.g. "the sgd kernel takes") for a dtype no kernel takes."""
    if dtype not in TL_DTYPE:
        raise TypeError(f"{who} float32, bfloat16 or float16 tensors, not {dtype}.")
    return TL_DTYPE[dtype]


def place_amp_scalars(found_inf: Optional[Tensor], grad_scale: Optional[Tensor], device):
    """GradScaler's ``found_inf`` and ``grad_scale`` where a kernel can read
    them: ``(skip, found_inf, grad_scale)``. A CPU ``found_inf`` is read here
    (no device sync): set, the whole step is skipped; clear, it is dropped."""
    if found_inf is not None and found_inf.device != device:
        if found_inf.device.type != "cpu":
            found_inf = found_inf.to(device)
        elif bool(found_inf):
            return True, None, None
        else:
            found_inf = None
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device)
    return False, found_inf, grad_scale


def units_of(numel: Tensor, length: Tensor, count: Optional[Tensor] = None) -> Tensor:
    """Work list (int64 ``[U, 3]``: tensor, start, end; on the CPU): ``count[t]``
    units of ``length[t]`` elements for tensor ``t``, the last one cut at
    ``numel[t]``. ``count`` defaults to enough units to cover ``numel``."""
    if count is None:
        count = (numel + length - 1) // length
    tensor = torch.repeat_interleave(torch.arange(len(numel)), count)
    first_unit = torch.cumsum(count, 0) - count
    start = (torch.arange(len(tensor)) - first_unit[tensor]) * length[tensor]
    end = torch.minimum(start + length[tensor], numel[tensor])
    return torch.stack([tensor, start, end], dim=1).contiguous()


@triton.jit
def skip_step(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """Whether GradScaler found an inf or NaN (the kernel then returns, writing nothing)."""
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    return skip


@triton.jit
def load_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """GradScaler's scale as fp32 (1.0, unused, without one)."""
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    return grad_scale


@triton.jit
def program_unit(table, units, NUM_FIELDS: tl.constexpr):
    """This program's unit: its tensor's table row (a pointer), first and end element."""
    unit = units + tl.program_id(0) * _UNIT_FIELDS
    meta = table + tl.load(unit) * NUM_FIELDS
    start = tl.load(unit + 1)
    end = tl.load(unit + 2)
    return meta, start, end


@triton.jit
def row_origin(start, row_len):
    """``(r0, c0, row_len)``: element start + i lies in row r0 + (c0 + i) // row_len
    (c0 and row_len int32, for int32 math per element; a row_len of 0 counts as 1)."""
    row_len = tl.maximum(row_len, 1)
    r0 = start // row_len
    c0 = (start - r0 * row_len).to(tl.int32)
    return r0, c0, row_len.to(tl.int32)


@triton.jit
def column_f64(meta, column):
    """A float column of the table (float64 bits)."""
    return tl.load(meta + column).to(tl.float64, bitcast=True)


@triton.jit
def column_f32(meta, column):
    """A float column of the table (float64 bits) rounded to fp32."""
    return tl.load(meta + column).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def descent_grad(g_ptr, i, inb, grad_scale, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient of elements i in fp32, divided by the grad scale (IEEE
    division), negated under maximize."""
    g = tl.load(g_ptr + i, mask=inb).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def segmented_sum(head_a, x_a, head_b, x_b):
    # (head, sum) pairs: a segment restarts at every element flagged head
    return head_a | head_b, tl.where(head_b != 0, x_b, x_a + x_b)


@triton.jit
def segmented_sums(head_a, x_a, y_a, head_b, x_b, y_b):
    # (head, sum, sum) triples: two sums over the same segments
    return head_a | head_b, tl.where(head_b != 0, x_b, x_a + x_b), tl.where(head_b != 0, y_b, y_a + y_b)


@triton.jit
def row_running_sum(x, col, carry, idx):
    """Inclusive sums of x over each row within one piece (col: each lane's
    column, 0 at a row's first element; a row's total lands on its last
    element), the piece's first lane continuing ``carry`` when it lies inside
    a row (the next piece's carry is :func:`last_lane` of the sums)."""
    x = tl.where((idx == 0) & (col != 0), x + carry, x)
    _, x = tl.associative_scan(((col == 0).to(tl.int32), x), 0, segmented_sum)
    return x


@triton.jit
def row_running_sums(x, y, col, carry_x, carry_y, idx):
    """:func:`row_running_sum` of two quantities in one scan."""
    continued = (idx == 0) & (col != 0)
    x = tl.where(continued, x + carry_x, x)
    y = tl.where(continued, y + carry_y, y)
    _, x, y = tl.associative_scan(((col == 0).to(tl.int32), x, y), 0, segmented_sums)
    return x, y


@triton.jit
def last_lane(x, idx, BLOCK: tl.constexpr):
    """The value in the piece's last lane (a running sum's carry into the next piece)."""
    return tl.sum(tl.where(idx == BLOCK - 1, x, 0.0))
