"""Triton kernels of the `admm` family (docs/admm.md): classic ADMM's Z/U update
(score pass and update pass) and the SAS-ADMM step.

Each launch steps every tensor of one storage dtype. The caller gives the
int64 metadata table of ``regkern.backends.admm`` (``build_zu_table`` or
``build_sas_table``) on the device and a work list of units (int64
``[U, 3]``: tensor, first element, end element; :func:`build_units`), built
once on the CPU. Program ``u`` steps elements ``[start, end)`` of tensor
``t`` in pieces of ``BLOCK``.

- ``admm_scores``: ``|W + U|`` per element (fp32) for top-k element tensors;
  for top-k row tensors (units of whole rows) the float64 sum of
  ``(W + U)^2`` per row with a segmented scan (reset at each row's first
  element, a row's partial sum carried into the next piece), stored at the
  row's last element. A NaN score is stored as +inf.
- ``admm_zu``: ``v = W + U``; ``Z = keep ? v : 0`` (keep: score above the
  threshold, or equal to it at a flat index <= CUT; or the row's flag) or
  ``Z = v - clamp(v, -tau, tau)``; ``U = (U + W) - Z``; ``target = Z - U``.
- ``sas_admm_step``: ``W_breve``, ``W``, the outer update where the table's
  OUTER flag is set, and ``W_hat`` into the parameter.

The float coefficients are float64 columns of the table rounded once to fp32
here (new hyper-parameters compile nothing). Compile-time constants are the
storage dtype and ``BLOCK``. Math is fp32, rounded op by op like the
reference (no fma contraction); stored values are rounded once to their dtype.

The kernels implement the table values ``ZU_MODES`` and ``SAS_OUTER``;
``check_zu_table`` and ``check_sas_table`` refuse a table holding any other
(or sizes that disagree, a missing pointer, a KEEP, CUT or THRESHOLD its
mode cannot mean) before a launch, like the C++ kernels do
(``csrc/table_check.h``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from regkern.layouts import DTYPE_CODE, MODE_ELEMENT, MODE_ROWS, MODE_SOFT, SAS_COLUMN, SAS_FIELDS, ZU_COLUMN, ZU_FIELDS

from .common import (UNIT_FIELDS, aligned16, column_f32, for_pieces, lane_rows, last_lane, piece_origin, program_unit,
                     row_origin, row_running_sum, rows_of, tl_dtype, units_of)
from .table_checks import TableCheck

DEFAULT_CHUNK = 16384  # elements per work unit

# The table values these kernels implement (check_zu_table / check_sas_table
# refuse any other before a launch; the kernels' branches would take it for
# another).
ZU_MODES = (MODE_ELEMENT, MODE_ROWS, MODE_SOFT)  # MODE: top-k elements, top-k rows, soft threshold
SAS_OUTER = (0, 1)                               # OUTER: inner step only, outer update after it
DEFAULT_BLOCK = 1024   # elements per piece

_ZU_NUM_FIELDS = tl.constexpr(len(ZU_FIELDS))
_ZU_PARAM = tl.constexpr(ZU_COLUMN["PARAM"])
_ZU_Z = tl.constexpr(ZU_COLUMN["Z"])
_ZU_U = tl.constexpr(ZU_COLUMN["U"])
_ZU_TARGET = tl.constexpr(ZU_COLUMN["TARGET"])
_ZU_ROW_LEN = tl.constexpr(ZU_COLUMN["ROW_LEN"])
_ZU_MODE = tl.constexpr(ZU_COLUMN["MODE"])
_ZU_SCORES = tl.constexpr(ZU_COLUMN["SCORES"])
_ZU_ROW_KEEP = tl.constexpr(ZU_COLUMN["ROW_KEEP"])
_ZU_THRESHOLD = tl.constexpr(ZU_COLUMN["THRESHOLD"])
_ZU_CUT = tl.constexpr(ZU_COLUMN["CUT"])
_MODE_ELEMENT = tl.constexpr(MODE_ELEMENT)
_MODE_SOFT = tl.constexpr(MODE_SOFT)

_SAS_NUM_FIELDS = tl.constexpr(len(SAS_FIELDS))
_SAS_PARAM = tl.constexpr(SAS_COLUMN["PARAM"])
_SAS_GRAD = tl.constexpr(SAS_COLUMN["GRAD"])
_SAS_W = tl.constexpr(SAS_COLUMN["W"])
_SAS_W_BREVE = tl.constexpr(SAS_COLUMN["W_BREVE"])
_SAS_ANCHOR = tl.constexpr(SAS_COLUMN["ANCHOR"])
_SAS_Z = tl.constexpr(SAS_COLUMN["Z"])
_SAS_U = tl.constexpr(SAS_COLUMN["U"])
_SAS_OUTER = tl.constexpr(SAS_COLUMN["OUTER"])
_SAS_C = tl.constexpr(SAS_COLUMN["C"])
_SAS_INV_CR = tl.constexpr(SAS_COLUMN["INV_CR"])
_SAS_B = tl.constexpr(SAS_COLUMN["B"])
_SAS_B1 = tl.constexpr(SAS_COLUMN["B1"])
_SAS_BN = tl.constexpr(SAS_COLUMN["BN"])
_SAS_BN1 = tl.constexpr(SAS_COLUMN["BN1"])
_SAS_RB = tl.constexpr(SAS_COLUMN["RB"])
_SAS_INV_BETA = tl.constexpr(SAS_COLUMN["INV_BETA"])
_SAS_TAU = tl.constexpr(SAS_COLUMN["TAU"])
_SAS_SB = tl.constexpr(SAS_COLUMN["SB"])
_SAS_BETA = tl.constexpr(SAS_COLUMN["BETA"])
_SAS_RHO = tl.constexpr(SAS_COLUMN["RHO"])


@triton.jit
def _no_nan(x):
    return tl.where(x != x, float("inf"), x)


@triton.jit
def _clamp_tau(x, tau):
    # clamp(x, -tau, tau); a NaN stays NaN, like torch.clamp
    return tl.where(x < -tau, -tau, tl.where(x > tau, tau, x))


@triton.jit
def _scores_kernel(table, units, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    meta, start, end = program_unit(table, units, _ZU_NUM_FIELDS)
    w_ptr = tl.load(meta + _ZU_PARAM).to(tl.pointer_type(DTYPE)) + start
    u_ptr = tl.load(meta + _ZU_U).to(tl.pointer_type(tl.float32)) + start
    scores = tl.load(meta + _ZU_SCORES)
    size = (end - start).to(tl.int32)
    idx = tl.arange(0, BLOCK)
    # The two branches name their score pointers apart: a GPU compile types a
    # variable once for both sides of a branch (fp32 elements, float64 rows).
    if tl.load(meta + _ZU_MODE) == _MODE_ELEMENT:
        element_scores = scores.to(tl.pointer_type(tl.float32)) + start
        for piece in range(0, size, BLOCK):
            i = piece + idx
            inb = i < size
            v = tl.load(w_ptr + i, mask=inb).to(tl.float32) + tl.load(u_ptr + i, mask=inb)
            tl.store(element_scores + i, _no_nan(tl.abs(v)), mask=inb)
    else:
        # units of row tensors hold whole rows: start is a row's first element
        r0, c0, row_len = row_origin(start, tl.load(meta + _ZU_ROW_LEN))
        row_scores = scores.to(tl.pointer_type(tl.float64))
        carry = tl.zeros((), tl.float64)  # the sum of the row the previous piece left unfinished
        for piece in range(0, size, BLOCK):
            i = piece + idx
            inb = i < size
            v = (tl.load(w_ptr + i, mask=inb).to(tl.float32) + tl.load(u_ptr + i, mask=inb)).to(tl.float64)
            rp, cp = piece_origin(r0, c0, row_len, piece)
            rows, head, tail = lane_rows(idx, rp, cp, row_len)
            sq = tl.where(inb, v * v, 0.0)  # exact: an fp32 value squared fits a float64
            sq = row_running_sum(sq, head, carry, idx)
            tl.store(row_scores + rows, _no_nan(sq), mask=inb & tail)
            carry = last_lane(sq, idx, BLOCK)


@triton.jit
def _zu_piece(at, idx, inb, start, r0, c0, row_len, carry, args, FLAGS: tl.constexpr, DTYPE: tl.constexpr):
    """Z, U and the target of one piece (.common.for_pieces's PIECE, no
    carry: its lanes idx at elements start + idx, the first at row r0,
    column c0; ``at``: W, Z, U and the target at element start)."""
    w_at, z_at, u_at, t_at = at
    keep_ptr, mode, threshold, cut, has_target = args
    w = tl.load(w_at + idx, mask=inb).to(tl.float32)
    u = tl.load(u_at + idx, mask=inb)
    v = w + u
    if mode == _MODE_SOFT:
        z = v - _clamp_tau(v, threshold)
    else:
        if mode == _MODE_ELEMENT:
            s = _no_nan(tl.abs(v))
            keep = (s > threshold) | ((s == threshold) & (start + idx <= cut))
        else:
            keep = tl.load(keep_ptr + rows_of(idx, r0, c0, row_len), mask=inb, other=0) != 0
        z = tl.where(keep, v, 0.0)
    u = (u + w) - z
    tl.store(z_at + idx, z, mask=inb)
    tl.store(u_at + idx, u, mask=inb)
    if has_target:
        tl.store(t_at + idx, (z - u).to(DTYPE), mask=inb)
    return carry


@triton.jit
def _zu_kernel(table, units, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    meta, start, end = program_unit(table, units, _ZU_NUM_FIELDS)
    w_addr = tl.load(meta + _ZU_PARAM)
    z_addr = tl.load(meta + _ZU_Z)
    u_addr = tl.load(meta + _ZU_U)
    target = tl.load(meta + _ZU_TARGET)
    aligned = aligned16(w_addr | z_addr | u_addr | target)  # whole pieces then move 16 bytes per access
    ptrs = (w_addr.to(tl.pointer_type(DTYPE)) + start, z_addr.to(tl.pointer_type(tl.float32)) + start,
            u_addr.to(tl.pointer_type(tl.float32)) + start, target.to(tl.pointer_type(DTYPE)) + start)
    keep_ptr = tl.load(meta + _ZU_ROW_KEEP).to(tl.pointer_type(tl.int8))  # torch.bool: one byte
    mode = tl.load(meta + _ZU_MODE)
    threshold = column_f32(meta, _ZU_THRESHOLD)
    cut = tl.load(meta + _ZU_CUT)
    # element start lies in row r0 at column c0; each piece finds its own (piece_origin)
    r0, c0, row_len = row_origin(start, tl.load(meta + _ZU_ROW_LEN))
    size = (end - start).to(tl.int32)
    nothing = 0.0  # no carry between pieces
    for_pieces(_zu_piece, ptrs, aligned, start, size, r0, c0, row_len, nothing,
               (keep_ptr, mode, threshold, cut, target != 0), (), DTYPE, BLOCK)


@triton.jit
def _sas_piece(at, idx, inb, start, r0, c0, row_len, carry, args, FLAGS: tl.constexpr, DTYPE: tl.constexpr):
    """One SAS-ADMM piece (.common.for_pieces's PIECE, no rows, no carry;
    ``at``: the parameter, gradient, W, W_breve, anchor, Z and U at its first
    element): W_breve, W, the outer update where due, W_hat into the
    parameter."""
    p_at, g_at, w_at, wb_at, a_at, z_at, u_at = at
    meta, outer, c, inv_cr, b, b1, bn, bn1 = args
    g = tl.load(g_at + idx, mask=inb).to(tl.float32)
    wb = ((c * tl.load(wb_at + idx, mask=inb) + tl.load(a_at + idx, mask=inb)) - g) * inv_cr
    w = b * wb + b1 * tl.load(w_at + idx, mask=inb)
    if outer:
        rb = column_f32(meta, _SAS_RB)
        inv_beta = column_f32(meta, _SAS_INV_BETA)
        tau = column_f32(meta, _SAS_TAU)
        sb = column_f32(meta, _SAS_SB)
        beta = column_f32(meta, _SAS_BETA)
        rho = column_f32(meta, _SAS_RHO)
        u = tl.load(u_at + idx, mask=inb) - rb * (w - tl.load(z_at + idx, mask=inb))
        x = w - u * inv_beta
        z = x - _clamp_tau(x, tau)
        d = w - z
        u = u - sb * d
        tl.store(a_at + idx, rho * w + (u - beta * d), mask=inb)
        tl.store(z_at + idx, z, mask=inb)
        tl.store(u_at + idx, u, mask=inb)
    tl.store(wb_at + idx, wb, mask=inb)
    tl.store(w_at + idx, w, mask=inb)
    tl.store(p_at + idx, (bn * wb + bn1 * w).to(DTYPE), mask=inb)
    return carry


@triton.jit
def _sas_kernel(table, units, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    meta, start, end = program_unit(table, units, _SAS_NUM_FIELDS)
    addresses = (tl.load(meta + _SAS_PARAM) | tl.load(meta + _SAS_GRAD) | tl.load(meta + _SAS_W)
                 | tl.load(meta + _SAS_W_BREVE) | tl.load(meta + _SAS_ANCHOR) | tl.load(meta + _SAS_Z)
                 | tl.load(meta + _SAS_U))
    aligned = aligned16(addresses)  # whole pieces then move 16 bytes per access
    ptrs = (tl.load(meta + _SAS_PARAM).to(tl.pointer_type(DTYPE)) + start,
            tl.load(meta + _SAS_GRAD).to(tl.pointer_type(DTYPE)) + start,
            tl.load(meta + _SAS_W).to(tl.pointer_type(tl.float32)) + start,
            tl.load(meta + _SAS_W_BREVE).to(tl.pointer_type(tl.float32)) + start,
            tl.load(meta + _SAS_ANCHOR).to(tl.pointer_type(tl.float32)) + start,
            tl.load(meta + _SAS_Z).to(tl.pointer_type(tl.float32)) + start,
            tl.load(meta + _SAS_U).to(tl.pointer_type(tl.float32)) + start)
    outer = tl.load(meta + _SAS_OUTER) != 0
    c = column_f32(meta, _SAS_C)
    inv_cr = column_f32(meta, _SAS_INV_CR)
    b = column_f32(meta, _SAS_B)
    b1 = column_f32(meta, _SAS_B1)
    bn = column_f32(meta, _SAS_BN)
    bn1 = column_f32(meta, _SAS_BN1)
    size = (end - start).to(tl.int32)
    nothing = 0.0  # no carry between pieces
    # elements without rows: the pieces' rows (one row of every element) go unused
    for_pieces(_sas_piece, ptrs, aligned, start, size, start, 0, 1, nothing, (meta, outer, c, inv_cr, b, b1, bn, bn1),
               (), DTYPE, BLOCK)


def build_units(numel: Tensor, row_len: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tensor:
    """Work list (int64 ``[U, 3]``: tensor, start, end; on the CPU) covering
    ``numel[t]`` elements of each tensor in units of ``chunk`` elements, or of
    whole rows (``max(1, chunk // row_len)`` of them) where ``row_len[t] > 0``.
    Tensors with ``numel == 0`` get no unit; pass ``numel`` 0 to leave a tensor
    out. ``chunk`` defaults to the module's ``DEFAULT_CHUNK`` (read at each call)."""
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}.")
    numel = torch.as_tensor(numel, dtype=torch.int64).cpu()
    length = torch.full_like(numel, chunk)
    if row_len is not None:
        row_len = torch.as_tensor(row_len, dtype=torch.int64).cpu()
        length = torch.where(row_len > 0, (chunk // row_len.clamp(min=1)).clamp(min=1) * row_len, length)
    return units_of(numel, length)


def check_zu_table(table: Tensor, dtype: Optional[torch.dtype] = None, full: bool = True) -> None:
    """Refuse (``TableError``, a ``ValueError`` naming the row, the column and
    the value) a Z/U table these kernels cannot step: a MODE outside
    ``ZU_MODES``, an unknown DTYPE (or, given ``dtype``, one other than the
    launch's), sizes that disagree, a missing pointer (SCORES wherever a
    selection needs them: the torch selection reads them), a buffer its mode
    would ignore, a KEEP, CUT or THRESHOLD its mode cannot mean (these only
    when ``full``: ``zu_units`` reads modes and sizes). The C++ kernels'
    checks (csrc/admm.cpp), on a CPU copy of the table."""
    c = TableCheck(table, "zu", "regkern.backends.admm.build_zu_table", ZU_COLUMN, full)
    c.rows_cover()
    c.one_of("DTYPE", tuple(DTYPE_CODE.values()), "0 float32, 1 bfloat16, 2 float16")
    if dtype is not None:
        c.dtype_is(DTYPE_CODE[dtype], dtype)
    c.one_of("MODE", ZU_MODES, "0 top-k elements, 1 top-k rows, 2 soft threshold")
    elements = c["NUMEL"] > 0
    for name in ("PARAM", "Z", "U"):
        c.present(name, elements, "a tensor with elements")
    if not full:
        return
    mode, numel, rows, keep, cut = c["MODE"], c["NUMEL"], c["ROWS"], c["KEEP"], c["CUT"]
    threshold = c.floats("THRESHOLD")
    soft, by_rows, element = mode == MODE_SOFT, mode == MODE_ROWS, mode == MODE_ELEMENT
    c.absent("SCORES", soft, "MODE 2 (soft threshold) scores nothing")
    c.absent("ROW_KEEP", soft, "MODE 2 (soft threshold) keeps no rows")
    c.refuse(soft & ~((threshold >= 0) & threshold.isfinite()), "THRESHOLD",
             "but the soft-threshold level tau must be finite and >= 0", threshold)
    count = torch.where(by_rows, rows, numel)

    def entries(r):
        return f"{int(count[r])} {'rows' if int(mode[r]) == MODE_ROWS else 'elements'}"

    c.refuse(~soft & ((keep < 0) | (keep > count)), "KEEP",
             lambda r: f"but MODE {int(mode[r])} keeps between 0 and {entries(r)}")
    c.present("ROW_KEEP", by_rows & (rows > 0), "MODE 1 (top-k rows)")
    selecting = ~soft & (keep > 0) & (keep < count)
    c.present("SCORES", selecting, lambda r: f"selecting {int(keep[r])} of {entries(r)}")
    c.absent("ROW_KEEP", element, "MODE 0 (top-k elements) keeps no rows")
    c.refuse(element & threshold.isnan(), "THRESHOLD", "but a selection threshold cannot be NaN", threshold)
    c.refuse(element & ((cut < -1) | (cut > numel)), "CUT",
             lambda r: f"but a tie cut lies between -1 and NUMEL = {int(numel[r])}")


def check_sas_table(table: Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """Refuse (``TableError``) a SAS table the step cannot take: an OUTER
    outside ``SAS_OUTER``, an unknown DTYPE (or, given ``dtype``, one other
    than the launch's), a negative NUMEL, a missing pointer."""
    c = TableCheck(table, "sas", "regkern.backends.admm.build_sas_table", SAS_COLUMN)
    c.non_negative("NUMEL")
    c.one_of("DTYPE", tuple(DTYPE_CODE.values()), "0 float32, 1 bfloat16, 2 float16")
    if dtype is not None:
        c.dtype_is(DTYPE_CODE[dtype], dtype)
    c.one_of("OUTER", SAS_OUTER, "0 or 1")
    elements = c["NUMEL"] > 0
    for name in ("PARAM", "GRAD", "W", "W_BREVE", "ANCHOR", "Z", "U"):
        c.present(name, elements, "a tensor with elements")


def zu_units(table: Tensor, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(score_units, update_units)`` of a Z/U table: the score pass covers
    tensors with a SCORES buffer (row tensors in whole rows), the update pass
    every tensor. The table's modes and sizes are checked first
    (``check_zu_table``; its pointers and values are checked by the launches)."""
    table = table.cpu()
    check_zu_table(table, full=False)
    numel = table[:, ZU_COLUMN["NUMEL"]]
    scored = table[:, ZU_COLUMN["SCORES"]] != 0
    by_rows = scored & (table[:, ZU_COLUMN["MODE"]] == MODE_ROWS)
    score_units = build_units(torch.where(scored, numel, 0), torch.where(by_rows, table[:, ZU_COLUMN["ROW_LEN"]], 0),
                              chunk)
    return score_units, build_units(numel, chunk=chunk)


def _launch(kernel, table: Tensor, dtype: torch.dtype, units: Tensor, block: Optional[int], num_warps: int) -> None:
    block = DEFAULT_BLOCK if block is None else block
    tl_type = tl_dtype(dtype, "the admm kernels take")
    if units.numel() == 0:
        return
    kernel[(units.shape[0],)](table, units, DTYPE=tl_type, BLOCK=block, num_warps=num_warps,
                              enable_fp_fusion=False)  # no mul+add -> fma: rounds op by op like the reference


def admm_scores(table: Tensor, dtype: torch.dtype, *, units: Optional[Tensor] = None,
                block: Optional[int] = None, num_warps: int = 4) -> None:
    """Score pass of every tensor of a Z/U ``table`` (all of storage ``dtype``), one launch.
    The table is checked (``check_zu_table``, nothing written on a refusal)
    when it is on the CPU or ``units`` are built here (else by ``zu_units``)."""
    if units is None or table.device.type == "cpu":
        check_zu_table(table, dtype)
    if units is None:
        units = zu_units(table)[0].to(table.device)
    _launch(_scores_kernel, table, dtype, units, block, num_warps)


def admm_zu(table: Tensor, dtype: torch.dtype, *, units: Optional[Tensor] = None,
            block: Optional[int] = None, num_warps: int = 4) -> None:
    """Update pass (Z, U, target) of every tensor of a Z/U ``table`` with its
    thresholds, cuts and row flags filled in, one launch. The table is
    checked like ``admm_scores`` checks it."""
    if units is None or table.device.type == "cpu":
        check_zu_table(table, dtype)
    if units is None:
        units = zu_units(table)[1].to(table.device)
    _launch(_zu_kernel, table, dtype, units, block, num_warps)


def sas_admm_step(table: Tensor, dtype: torch.dtype, *, units: Optional[Tensor] = None,
                  block: Optional[int] = None, num_warps: int = 4) -> None:
    """One SAS-ADMM step of every tensor of a SAS ``table`` (coefficients
    patched in), one launch. The table is checked (``check_sas_table``,
    nothing written on a refusal) when it is on the CPU or ``units`` are built
    here; check a device table's CPU original where it is patched."""
    if units is None or table.device.type == "cpu":
        check_sas_table(table, dtype)
    if units is None:
        units = build_units(table.cpu()[:, SAS_COLUMN["NUMEL"]]).to(table.device)
    _launch(_sas_kernel, table, dtype, units, block, num_warps)
