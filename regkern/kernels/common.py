"""What the Triton kernels of every family (``sgd``, ``rda``, ``admm``) share.

Launch side (Python):

- ``TL_DTYPE``: the storage dtypes the kernels take, as Triton types, and
  :func:`tl_dtype`, which refuses any other;
- :func:`place_amp_scalars`: GradScaler's ``found_inf`` and ``grad_scale``
  moved where a kernel reads them, and :func:`device_lr` the learning rate;
- :func:`units_of`: the ``[U, 3]`` work list (tensor, start, end) from each
  tensor's element count and unit length;
- :func:`register_ceiling`: the ``maxnreg`` launch option on NVIDIA GPUs.

Kernel side (``@triton.jit``, inlined into the caller):

- the unit prologue: :func:`skip_step` (the found_inf flag; the kernel body
  returns on it, a helper cannot return from its caller),
  :func:`load_grad_scale`, :func:`program_unit` (the table row and element
  range of this program's unit) and :func:`row_origin` (where the unit starts
  in its tensor's rows);
- rows and columns without a division per element: :func:`piece_origin`
  (a piece's first row and column, int64, one division per piece),
  :func:`lane_rows` (each lane's row, row start and row end flags),
  :func:`lane_columns`, both on :func:`small_divmod`;
- vector accesses: :func:`aligned16`, :func:`vector_piece`, :func:`whole`,
  :func:`piece_at` (a piece whose tensors start on 16 bytes and that is whole
  is stepped with pointers and a mask the compiler knows, so loads and
  stores move 16 bytes; other pieces take the same code with plain ones),
  and :func:`for_pieces`, a unit's loop over such pieces;
- table columns holding float64 bits (:func:`column_f64`, :func:`column_f32`);
- :func:`descent_grad`: a gradient loaded in fp32, unscaled and negated
  under ``maximize``;
- row reductions: the segmented-sum combine functions and
  :func:`row_running_sum` / :func:`row_running_sums`, per-row inclusive sums
  over one piece that continue a row's unfinished sum from the previous
  piece (:func:`last_lane` gives the carry).

The regularizer terms of the sgd-style tables (``regkern.layouts.SGD_FIELDS``;
the ``adam`` table starts with the same columns, so the same code reads
both), in one home for the ``sgd`` and ``adam`` kernels:

- :func:`sign`, :func:`rows_of` (the lanes' rows);
- :func:`add_terms`: the gradient terms (L2 ``lam`` per row or element,
  ``lam_cols``, L1 subgradient, polarization, ADMM pull) added to ``d`` in
  the contract's order;
- :func:`keep_mask`: the row or element mask as fp32 0 / 1;
- the post-update part: :func:`piece_plan` (how a unit is cut into pieces
  and rows for group lasso), :func:`prox_map` (soft threshold or group-lasso
  shrink, :func:`soft_threshold`, :func:`group_shrink`), :func:`clamped`
  (the clamp and the mask again), :func:`zero_empty_row_norms` and
  :func:`store_row_norms` (the row norms of the stored W);
- the unit's piece loop of both kernels: :func:`step_unit` (pieces, the
  two group-lasso passes, vector pieces, the post-update part) around the
  family's contract, on the pointers of :func:`unit_pointers`.

This module imports only the table layouts (``regkern.layouts``) of regkern.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from regkern.layouts import MASK_ROW, LAM_ELEMENT, SGD_COLUMN

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


def device_lr(lr, device):
    """``(lr, on_device)``: a 0-d tensor on ``device`` the kernel reads (no
    host sync), or else a number (a CPU tensor read here: that costs no
    device sync)."""
    on_device = isinstance(lr, Tensor) and lr.device == device
    if isinstance(lr, Tensor) and not on_device:
        lr = float(lr)
    return lr, on_device


def register_ceiling(device, max_registers: int) -> dict:
    """The launch option ``maxnreg=max_registers`` on NVIDIA GPUs (ptxas then
    fits the kernel in that many registers; the interpreter ignores it), none
    on ROCm, whose compiler has no such option (its tensors' device type is
    "cuda" too)."""
    if device.type == "cuda" and torch.version.hip is not None:
        return {}
    return {"maxnreg": max_registers}


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
    """``(r0, c0, row_len)``: element ``start`` lies in row r0 at column c0
    (int64; a row_len of 0 counts as 1)."""
    row_len = tl.maximum(row_len, 1)
    r0 = start // row_len
    return r0, start - r0 * row_len, row_len


@triton.jit
def piece_origin(r0, c0, row_len, piece):
    """``(rp, cp)``: the row and column (int64) of a piece's first element,
    ``piece`` elements after the unit's first (row r0, column c0): one
    division per piece, so that the lanes need none (:func:`lane_rows`)."""
    at = c0 + piece
    rows = at // row_len
    return r0 + rows, at - rows * row_len


@triton.jit
def small_divmod(x, d):
    """``(x // d, x % d)`` of int32 lanes 0 <= x, d >= 1 with a quotient below
    2^20, without an integer division: the fp32 reciprocal's estimate is off
    by at most one, and one correction makes it exact."""
    q = (x.to(tl.float32) * (1.0 / d.to(tl.float32))).to(tl.int32)
    r = x - q * d
    low = r < 0
    high = r >= d
    q = tl.where(low, q - 1, tl.where(high, q + 1, q))
    r = tl.where(low, r + d, tl.where(high, r - d, r))
    return q, r


@triton.jit
def lane_rows(i, rp, cp, row_len):
    """``(rows, head, tail)`` of a piece's lanes ``i`` (0..BLOCK-1; the first
    at row rp, column cp, int64): each lane's row (int64), whether it is its
    row's first and last element. Lanes in the first row are told apart by
    one comparison; the rows after it hold fewer than BLOCK lanes, so their
    offsets are small and :func:`small_divmod` divides them (rows of BLOCK or
    more elements: nothing to divide). Any int64 row length."""
    BLOCK: tl.constexpr = i.shape[0]
    left = tl.minimum(row_len - cp, BLOCK).to(tl.int32)  # lanes in the first row
    step = tl.minimum(row_len, BLOCK).to(tl.int32)
    later = i - left
    q, col = small_divmod(tl.maximum(later, 0), step)
    first = later < 0
    rows = rp + tl.where(first, 0, q + 1)
    # the scalar conditions pick the lane that matches (BLOCK: none), so that
    # only blocks are combined
    first_head = tl.where(cp == 0, 0, BLOCK)
    first_tail = tl.where(row_len - cp <= BLOCK, left - 1, BLOCK)
    later_tail = tl.where(row_len <= BLOCK, step - 1, BLOCK)
    head = (first & (i == first_head)) | ((later >= 0) & (col == 0))
    tail = (first & (i == first_tail)) | ((later >= 0) & (col == later_tail))
    return rows, head, tail


@triton.jit
def lane_columns(i, cp, row_len, col_len):
    """The column ``(element's column in its row) // col_len`` of a piece's
    lanes ``i`` (first lane at column cp), as :func:`lane_rows` counts them:
    small quotients only."""
    BLOCK: tl.constexpr = i.shape[0]
    left = tl.minimum(row_len - cp, BLOCK).to(tl.int32)
    step = tl.minimum(row_len, BLOCK).to(tl.int32)
    later = i - left
    _, col = small_divmod(tl.maximum(later, 0), step)
    first_col = cp // col_len
    col_len32 = col_len.to(tl.int32)
    first_q, _ = small_divmod((cp - first_col * col_len).to(tl.int32) + i, col_len32)
    later_q, _ = small_divmod(col, col_len32)
    return tl.where(later < 0, first_col + first_q, later_q)


@triton.jit
def aligned16(addresses):
    """Whether the OR of some base addresses (raw, in bytes) is a multiple of 16."""
    return (addresses & 15) == 0


@triton.jit
def vector_piece(aligned, start, piece, piece_end, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """Whether a piece of ``BLOCK`` elements at element ``start + piece`` of
    tensors whose base addresses are ``aligned`` (:func:`aligned16`) lies whole
    before ``piece_end`` and starts on 16 bytes of the storage ``DTYPE`` (fp32
    companions of a 16-bit tensor then start on 16 bytes too): its pointers
    may be declared 16-byte aligned (``tl.multiple_of(ptr + piece, 16)``
    where the sum is computed: the hint marks the operation that computes the
    pointer, which a helper's argument is not; :func:`piece_at`) and its mask
    all true (:func:`whole`),
    so each thread moves its elements in vector accesses."""
    return aligned & (piece + BLOCK <= piece_end) & (((start + piece) * (DTYPE.primitive_bitwidth // 8)) % 16 == 0)


@triton.jit
def whole(BLOCK: tl.constexpr):
    """The mask of a whole piece: all true, and known so at compile time."""
    return tl.full([BLOCK], 1, tl.int1)


@triton.jit
def piece_at(ptrs, piece, VECTOR: tl.constexpr):
    """The pointers ``ptrs`` moved ``piece`` elements on; for a vector piece
    (:func:`vector_piece`) declared 16-byte aligned where the sum is computed
    (the hint marks that operation)."""
    if VECTOR:
        at = [tl.multiple_of(p + piece, 16) for p in ptrs]
    else:
        at = [p + piece for p in ptrs]
    return at


@triton.jit
def for_pieces(PIECE: tl.constexpr, ptrs, aligned, start, size, r0, c0, row_len, carry, args, FLAGS: tl.constexpr,
               DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``carry = PIECE(at, idx, inb, start + piece, rp, cp, row_len, carry,
    args, FLAGS, DTYPE)`` on each piece of BLOCK elements of a unit of
    ``size`` elements from element ``start`` (row r0, column c0): ``at`` the
    pointers ``ptrs`` (at element start; :func:`aligned16` of their bases:
    ``aligned``) moved to the piece, whose first element lies at row rp,
    column cp; a vector piece (:func:`vector_piece`) with pointers and mask
    known at compile time. ``carry`` (a row sum continued into the next
    piece, or anything passed on) must be a tensor, not a literal: a
    constexpr is not carried by the loop. Returns the last carry."""
    idx = tl.arange(0, BLOCK)
    for piece in range(0, size, BLOCK):
        i = piece + idx
        rp, cp = piece_origin(r0, c0, row_len, piece)
        if vector_piece(aligned, start, piece, size, BLOCK, DTYPE):
            # the same code with pointers known 16-byte aligned and a mask known true
            carry = PIECE(piece_at(ptrs, piece, True), idx, whole(BLOCK), start + piece, rp, cp, row_len, carry,
                          args, FLAGS, DTYPE)
        else:
            carry = PIECE(piece_at(ptrs, piece, False), idx, i < size, start + piece, rp, cp, row_len, carry, args,
                          FLAGS, DTYPE)
    return carry


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
def row_running_sum(x, head, carry, idx):
    """Inclusive sums of x over each row within one piece (head: each lane is
    its row's first element; a row's total lands on its last element), the
    piece's first lane continuing ``carry`` when it lies inside a row (the
    next piece's carry is :func:`last_lane` of the sums)."""
    x = tl.where((idx == 0) & (head == 0), x + carry, x)
    _, x = tl.associative_scan((head.to(tl.int32), x), 0, segmented_sum)
    return x


@triton.jit
def row_running_sums(x, y, head, carry_x, carry_y, idx):
    """:func:`row_running_sum` of two quantities in one scan."""
    continued = (idx == 0) & (head == 0)
    x = tl.where(continued, x + carry_x, x)
    y = tl.where(continued, y + carry_y, y)
    _, x, y = tl.associative_scan((head.to(tl.int32), x, y), 0, segmented_sums)
    return x, y


@triton.jit
def last_lane(x, idx, BLOCK: tl.constexpr):
    """The value in the piece's last lane (a running sum's carry into the next piece)."""
    return tl.sum(tl.where(idx == BLOCK - 1, x, 0.0))


# ---------------------------------------------------------------------------
# Regularizer terms and the post-update part of the sgd-style tables (the
# sgd columns; the adam table starts with them, so the indices are the same).

_LAM = tl.constexpr(SGD_COLUMN["LAM"])
_LAM_KIND = tl.constexpr(SGD_COLUMN["LAM_KIND"])
_LAM_COLS = tl.constexpr(SGD_COLUMN["LAM_COLS"])
_COL_LEN = tl.constexpr(SGD_COLUMN["COL_LEN"])
_MASK = tl.constexpr(SGD_COLUMN["MASK"])
_MASK_KIND = tl.constexpr(SGD_COLUMN["MASK_KIND"])
_L1 = tl.constexpr(SGD_COLUMN["L1"])
_POLAR = tl.constexpr(SGD_COLUMN["POLAR"])
_ADMM_TARGET = tl.constexpr(SGD_COLUMN["ADMM_TARGET"])
_ADMM_RHO = tl.constexpr(SGD_COLUMN["ADMM_RHO"])
_ROWS = tl.constexpr(SGD_COLUMN["ROWS"])
_CLAMP = tl.constexpr(SGD_COLUMN["CLAMP"])
_CLAMP_LO = tl.constexpr(SGD_COLUMN["CLAMP_LO"])
_CLAMP_HI = tl.constexpr(SGD_COLUMN["CLAMP_HI"])
_LAM_ELEMENT_KIND = tl.constexpr(LAM_ELEMENT)
_MASK_ROW_KIND = tl.constexpr(MASK_ROW)
_PROX_L1_KIND = tl.constexpr(1)     # the PROX column: 1 element L1 (soft threshold)
_PROX_GROUP_KIND = tl.constexpr(2)  # 2 group lasso


@triton.jit
def sign(x):
    """torch.sign: -1, 0 or 1 (a zero keeps its sign bit, NaN stays NaN)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


@triton.jit
def rows_of(i, r0, c0, row_len):
    """Row (int64) of lanes ``i`` of a piece whose first element lies at row
    r0, column c0 (:func:`lane_rows`)."""
    rows, _, _ = lane_rows(i, r0, c0, row_len)
    return rows


@triton.jit
def keep_mask(meta, i, inb, start, r0, c0, row_len):
    """The mask (row or element) of elements start + i, as fp32 0 or 1."""
    mask_ptr = tl.load(meta + _MASK).to(tl.pointer_type(tl.int8))  # torch.bool: one byte, 0 or 1
    if tl.load(meta + _MASK_KIND) == _MASK_ROW_KIND:
        at = rows_of(i, r0, c0, row_len)
    else:
        at = start + i
    return tl.load(mask_ptr + at, mask=inb).to(tl.float32)


@triton.jit
def add_terms(meta, d, w, i, inb, start, r0, c0, row_len, DTYPE: tl.constexpr):
    """``d`` plus the regularizer gradient terms of W (``w``, fp32, elements
    start + i) that the table row ``meta`` holds, each one fp32 rounding in the
    contract's order: lam[r] * W (or per element), lam_cols[c] * W,
    l1[r] * sign(W), polarization, rho * (W - target). An absent term is
    skipped by a branch on its table entry."""
    lam = tl.load(meta + _LAM)
    if lam != 0:
        if tl.load(meta + _LAM_KIND) == _LAM_ELEMENT_KIND:
            at = start + i
        else:
            at = rows_of(i, r0, c0, row_len)
        d = d + tl.load(lam.to(tl.pointer_type(tl.float32)) + at, mask=inb) * w
    lam_cols = tl.load(meta + _LAM_COLS)
    if lam_cols != 0:
        col = lane_columns(i, c0, row_len, tl.load(meta + _COL_LEN))
        d = d + tl.load(lam_cols.to(tl.pointer_type(tl.float32)) + col, mask=inb) * w
    l1 = tl.load(meta + _L1)
    if l1 != 0:
        d = d + tl.load(l1.to(tl.pointer_type(tl.float32)) + rows_of(i, r0, c0, row_len), mask=inb) * sign(w)
    polar = tl.load(meta + _POLAR)
    if polar != 0:
        p = polar.to(tl.pointer_type(tl.float32))  # (lam, t, m, s), written on the device
        d = d + tl.load(p) * (tl.load(p + 1) * sign(w) - sign(w - tl.load(p + 2)) + tl.load(p + 3))
    target = tl.load(meta + _ADMM_TARGET)
    if target != 0:
        z = tl.load(target.to(tl.pointer_type(DTYPE)) + start + i, mask=inb).to(tl.float32)
        d = d + column_f32(meta, _ADMM_RHO) * (w - z)
    return d


@triton.jit
def has_terms(meta):
    """Whether the table row holds any gradient term of :func:`add_terms`."""
    return ((tl.load(meta + _LAM) != 0) | (tl.load(meta + _LAM_COLS) != 0) | (tl.load(meta + _L1) != 0)
            | (tl.load(meta + _POLAR) != 0) | (tl.load(meta + _ADMM_TARGET) != 0))


@triton.jit
def soft_threshold(w, threshold):
    """Element L1 proximal map: sign(W) * max(|W| - threshold, 0) (NaN stays NaN)."""
    return sign(w) * tl.maximum(tl.abs(w) - threshold, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def group_shrink(w, norm, threshold, row_len):
    """Group lasso: W_r * max(0, 1 - threshold * sqrt(n_r) / ||W_r||); a row of norm 0 stays 0."""
    nonzero = norm > 0
    shrink = tl.div_rn(threshold * tl.sqrt_rn(row_len.to(tl.float32)), tl.where(nonzero, norm, 1.0))
    return tl.where(nonzero, w * tl.maximum(1.0 - shrink, 0.0), 0.0)


@triton.jit
def piece_plan(prox, row_len, size, BLOCK: tl.constexpr):
    """How a unit of ``size`` elements is stepped: ``(long_rows, step, span)``.

    Pieces of ``step`` elements (BLOCK, or whole rows with group lasso when a
    row fits a block: ``BLOCK // row_len`` of them), within spans of ``span``
    elements (the whole unit, or one row when group-lasso rows are longer than
    a block: ``long_rows``, each stepped after a first pass that only computes
    ``||W_r||``)."""
    group = prox == _PROX_GROUP_KIND
    long_rows = group & (row_len > BLOCK)
    # int32 like size: a long row is a whole unit at most
    step = tl.where(group & (row_len <= BLOCK), (BLOCK // row_len) * row_len, BLOCK).to(tl.int32)
    span = tl.where(long_rows, row_len, tl.maximum(size, 1)).to(tl.int32)
    return long_rows, step, span


@triton.jit
def prox_map(w, prox, prox_lam_ptr, lr, norm, long_rows, i, inb, idx, r0, c0, row_len, BLOCK: tl.constexpr):
    """The proximal map (threshold lr * prox_lam[r]) of one piece's updated,
    masked W: kind 1 the soft threshold, kind 2 the group-lasso shrink, with
    ``norm`` = ||W_r|| from the first pass for long rows, or, for pieces of
    whole rows, each row's norm from a segmented scan gathered to the row."""
    if prox == _PROX_L1_KIND:
        threshold = lr * tl.load(prox_lam_ptr + rows_of(i, r0, c0, row_len), mask=inb)
        w = soft_threshold(w, threshold)
    elif prox == _PROX_GROUP_KIND:
        threshold = lr * tl.load(prox_lam_ptr + rows_of(i, r0, c0, row_len), mask=inb)
        if long_rows:
            w = group_shrink(w, norm, threshold, row_len)
        else:
            # ||W_r||: the segmented scan's total at the row's last lane, gathered to
            # the row (pieces of whole rows: lane idx at column idx % row_len)
            short_row = row_len.to(tl.int32)  # at most BLOCK
            _, col = small_divmod(idx, short_row)
            _, sq = tl.associative_scan(((col == 0).to(tl.int32), tl.where(inb, w * w, 0.0)), 0,
                                        segmented_sum)
            sq = tl.gather(sq, tl.minimum(idx - col + short_row - 1, BLOCK - 1), 0)
            w = group_shrink(w, tl.sqrt_rn(sq), threshold, row_len)
    return w


@triton.jit
def clamped(meta, w, i, inb, start, r0, c0, row_len):
    """The clamp, then the mask again (a clamp must not revive a pruned weight)."""
    if tl.load(meta + _CLAMP) != 0:
        w = tl.minimum(tl.maximum(w, column_f32(meta, _CLAMP_LO), propagate_nan=tl.PropagateNan.ALL),
                       column_f32(meta, _CLAMP_HI), propagate_nan=tl.PropagateNan.ALL)
        if tl.load(meta + _MASK_KIND) != 0:
            w = w * keep_mask(meta, i, inb, start, r0, c0, row_len)
    return w


@triton.jit
def zero_empty_row_norms(meta, norms_ptr, idx, BLOCK: tl.constexpr):
    """Rows without elements (shape (R, 0)): their norms are 0."""
    n_norms = tl.load(meta + _ROWS) * 3
    for piece in range(0, n_norms, BLOCK):
        tl.store(norms_ptr + piece + idx, 0.0, mask=piece + idx < n_norms)


@triton.jit
def store_row_norms(norms_ptr, stored, i, inb, idx, r0, c0, row_len, carry_l1, carry_sq, BLOCK: tl.constexpr):
    """(sum |W_r|, ||W_r||, mean |W_r|) of the stored W of one piece (lanes
    ``i``, the first at row r0, column c0), written at each row's last element;
    a row running past the piece continues from ``(carry_l1, carry_sq)``.
    Returns the carries into the next piece."""
    rows, head, tail = lane_rows(i, r0, c0, row_len)
    l1 = tl.where(inb, tl.abs(stored.to(tl.float32)), 0.0)
    l1, sq = row_running_sums(l1, l1 * l1, head, carry_l1, carry_sq, idx)
    out = norms_ptr + rows * 3
    tail = inb & tail
    tl.store(out, l1, mask=tail)
    tl.store(out + 1, tl.sqrt_rn(sq), mask=tail)
    tl.store(out + 2, tl.div_rn(l1, row_len.to(tl.float32)), mask=tail)
    return last_lane(l1, idx, BLOCK), last_lane(sq, idx, BLOCK)


# ---------------------------------------------------------------------------
# The unit's piece loop of the sgd-style kernels (sgd, adam): one home for
# the pieces, the two group-lasso passes, the vector pieces and the
# post-update part. A family gives its contract up to the first mask as
# UPDATE(meta, at, i, inb, start, r0, c0, row_len, args, FLAGS, DTYPE, WRITE)
# -> fp32 W: ``at`` its tensors' pointers at the piece (W first), ``args`` its
# runtime hyper-parameters (a tuple), ``FLAGS`` its compile-time flags (a
# tuple read by index: unpacking a tuple turns constexprs into tensors); with
# WRITE its state (momentum buffer, moments) is stored, masked and rounded
# once, without it nothing is written.

_NORMS = tl.constexpr(SGD_COLUMN["NORMS"])
_ROW_LEN = tl.constexpr(SGD_COLUMN["ROW_LEN"])
_PROX = tl.constexpr(SGD_COLUMN["PROX"])
_PROX_LAM = tl.constexpr(SGD_COLUMN["PROX_LAM"])


@triton.jit
def unit_pointers(addrs, start, DTYPE: tl.constexpr):
    """``(aligned, ptrs)``: the tensors at the raw addresses ``addrs`` (a
    tuple) as ``DTYPE`` pointers at element ``start``, and whether they all
    start on 16 bytes (:func:`aligned16`: whole pieces then move 16 bytes per
    access)."""
    bits = addrs[0]
    for k in tl.static_range(1, len(addrs)):
        bits = bits | addrs[k]
    return aligned16(bits), [a.to(tl.pointer_type(DTYPE)) + start for a in addrs]


@triton.jit
def _step_piece(meta, at, idx, inb, start, r0, c0, row_len, lr, args, FLAGS: tl.constexpr, norms_ptr, prox,
                prox_lam_ptr, norm, long_rows, carry_l1, carry_sq, with_norms, UPDATE: tl.constexpr,
                DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One piece (its lanes idx at elements start + idx, the first at row r0,
    column c0; ``at`` at element start) stepped and written: the family's
    contract with its state stored, the proximal map, the clamp, W rounded
    once, the row norms. Returns the norms' carries into the next piece."""
    w = UPDATE(meta, at, idx, inb, start, r0, c0, row_len, args, FLAGS, DTYPE, True)
    w = prox_map(w, prox, prox_lam_ptr, lr, norm, long_rows, idx, inb, idx, r0, c0, row_len, BLOCK)
    w = clamped(meta, w, idx, inb, start, r0, c0, row_len)
    stored = w.to(DTYPE)
    tl.store(at[0] + idx, stored, mask=inb)
    if with_norms:
        carry_l1, carry_sq = store_row_norms(norms_ptr, stored, idx, inb, idx, r0, c0, row_len, carry_l1, carry_sq,
                                             BLOCK)
    return carry_l1, carry_sq


@triton.jit
def step_unit(meta, start, end, ptrs, aligned, lr, args, FLAGS: tl.constexpr, UPDATE: tl.constexpr,
              DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Step the elements [start, end) of the tensor of table row ``meta``
    (``ptrs``, ``aligned``: :func:`unit_pointers`) in pieces of ``BLOCK``:
    the family's ``UPDATE``, then the post-update part, row norms included.

    With group lasso (units start on a row: c0 == 0), rows up to BLOCK long
    are stepped whole rows per piece, and longer rows one row at a time
    (span), each after a first pass that only computes ||W_r|| (:func:`piece_plan`)."""
    norms = tl.load(meta + _NORMS)
    norms_ptr = norms.to(tl.pointer_type(tl.float32))
    prox = tl.load(meta + _PROX)
    prox_lam_ptr = tl.load(meta + _PROX_LAM).to(tl.pointer_type(tl.float32))
    row_len = tl.load(meta + _ROW_LEN)
    idx = tl.arange(0, BLOCK)

    if (norms != 0) & (row_len == 0):
        zero_empty_row_norms(meta, norms_ptr, idx, BLOCK)

    # Element start lies in row r0 at column c0; each piece finds its own (piece_origin).
    r0, c0, row_len = row_origin(start, row_len)
    size = (end - start).to(tl.int32)

    long_rows, step, span = piece_plan(prox, row_len, size, BLOCK)
    carry_l1 = 0.0  # norms: sums of the row that the previous piece left unfinished
    carry_sq = 0.0
    for row_start in range(0, size, span):
        row_end = tl.minimum(row_start + span, size)
        norm = 0.0
        if long_rows:
            # pass 1: ||W_r|| of the updated, masked row; nothing written
            for piece in range(row_start, row_end, BLOCK):
                i = piece + idx
                inb = i < row_end
                rp, cp = piece_origin(r0, c0, row_len, piece)
                w = UPDATE(meta, piece_at(ptrs, piece, False), idx, inb, start + piece, rp, cp, row_len, args,
                           FLAGS, DTYPE, False)
                norm += tl.sum(tl.where(inb, w * w, 0.0))
            norm = tl.sqrt_rn(norm)
        for piece in range(row_start, row_end, step):
            i = piece + idx
            rp, cp = piece_origin(r0, c0, row_len, piece)
            if vector_piece(aligned, start, piece, row_end, BLOCK, DTYPE) & (step == BLOCK):
                # the same code with pointers known 16-byte aligned and a mask known true
                carry_l1, carry_sq = _step_piece(
                    meta, piece_at(ptrs, piece, True), idx, whole(BLOCK), start + piece, rp, cp, row_len, lr, args,
                    FLAGS, norms_ptr, prox, prox_lam_ptr, norm, long_rows, carry_l1, carry_sq, norms != 0,
                    UPDATE, DTYPE, BLOCK)
            else:
                carry_l1, carry_sq = _step_piece(
                    meta, piece_at(ptrs, piece, False), idx, (i < row_end) & (idx < step), start + piece, rp, cp,
                    row_len, lr, args, FLAGS, norms_ptr, prox, prox_lam_ptr, norm, long_rows, carry_l1, carry_sq,
                    norms != 0, UPDATE, DTYPE, BLOCK)
