"""Triton kernel for the `rda` family (L1 regularized dual averaging, docs/rda.md).

One launch steps every tensor of a dtype group. The caller gives

- ``table``: the int64 ``[T, len(RDA_FIELDS)]`` metadata of
  ``regkern.backends.rda.build_rda_table`` with the step's ``t``, ``lam`` and
  ``gamma`` written in (``write_step``), on the device;
- ``units``: the work list of :func:`build_units` (int64 ``[U, 3]``: tensor,
  first element, end element), built once on the CPU and cached on the device.

Program ``u`` steps the elements ``[start, end)`` of tensor ``t`` in pieces of
``BLOCK``. Element-wise tensors have units of ``chunk`` elements. Tensors
stepped by rows (group shrinkage) have units of whole rows and a per-row fp32
scratch (``NORM_SQ``): a first pass over the unit updates gbar (and W0 under
a mask) and sums each row's v^2 with a segmented scan (reset at each row's
first element, the partial sum of a row that runs past a piece carried into
the next piece), storing the total at the row's last element; after a barrier
a second pass recomputes v from the stored gbar and W0 (same fp32 operations,
so the same v) and writes W = v * max(1 - kappa / ||v||, 0).

The per-tensor coefficients ((t-1)/t, sqrt(t)/gamma, tau, kappa) are computed
here from the float64 columns T, LAM and GAMMA with the float64 operations of
``reference.rda.rda_coefficients`` (IEEE float64 division and square root),
then rounded once to fp32, so a new gamma or lam compiles nothing.
Compile-time constants are the storage dtype, ``maximize``, whether
grad_scale / found_inf are given, and ``BLOCK``. Math is fp32 whatever
the storage, rounded op by op like the reference (no fma contraction, IEEE
division and square root); W is rounded once to its dtype, to nearest even.

The kernel implements the table values ``MASK_KINDS`` and ``GROUP_KINDS``;
``check_table`` refuses a table holding any other (or sizes that disagree, a
missing pointer, a step t, lam or gamma the reference refuses) before a
launch, like the C++ kernel does (``csrc/table_check.h``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from regkern.layouts import DTYPE_CODE, MASK_ELEMENT, MASK_NONE, MASK_ROW, RDA_COLUMN, RDA_FIELDS

from .common import (UNIT_FIELDS, aligned16, column_f64, descent_grad, for_pieces, lane_rows, last_lane,
                     load_grad_scale, piece_origin, place_amp_scalars, program_unit, row_origin, row_running_sum,
                     rows_of, skip_step, tl_dtype, units_of)
from .table_checks import TableCheck

DEFAULT_CHUNK = 16384  # elements per work unit
DEFAULT_BLOCK = 1024   # elements per piece

# The table values this kernel implements (check_table refuses any other
# before a launch; the kernel's branches would step it as something else).
MASK_KINDS = (MASK_NONE, MASK_ROW, MASK_ELEMENT)  # MASK_KIND: none, per row, per element
GROUP_KINDS = (0, 1)                              # GROUP: element soft threshold, row (group) shrinkage


_NUM_FIELDS = tl.constexpr(len(RDA_FIELDS))
_PARAM = tl.constexpr(RDA_COLUMN["PARAM"])
_GRAD = tl.constexpr(RDA_COLUMN["GRAD"])
_GBAR = tl.constexpr(RDA_COLUMN["GBAR"])
_W0 = tl.constexpr(RDA_COLUMN["W0"])
_MASK = tl.constexpr(RDA_COLUMN["MASK"])
_MASK_KIND = tl.constexpr(RDA_COLUMN["MASK_KIND"])
_ROW_LEN = tl.constexpr(RDA_COLUMN["ROW_LEN"])
_GROUP = tl.constexpr(RDA_COLUMN["GROUP"])
_T = tl.constexpr(RDA_COLUMN["T"])
_LAM = tl.constexpr(RDA_COLUMN["LAM"])
_GAMMA = tl.constexpr(RDA_COLUMN["GAMMA"])
_NORM_SQ = tl.constexpr(RDA_COLUMN["NORM_SQ"])
_MASK_ROW = tl.constexpr(MASK_ROW)


@triton.jit
def _first_pass_piece(ptrs, idx, inb, start, r0, c0, row_len, carry, args, FLAGS: tl.constexpr,
                      DTYPE: tl.constexpr):
    """One piece of the first pass (.common.for_pieces's PIECE: its lanes idx
    at elements start + idx, the first at row r0, column c0; ``ptrs``: W,
    the gradient, gbar and W0 at element start): gbar (and W0 under a mask)
    updated, then W written (element tensors) or the rows' sums of v^2
    stored (group tensors). Returns the carry of the row sum into the next
    piece."""
    w_at, g_at, gbar_at, w0_at = ptrs
    mask_ptr, norm_sq_ptr, mask_kind, grouped, a, c, t, tau, grad_scale = args
    MAXIMIZE: tl.constexpr = FLAGS[0]
    HAS_GRAD_SCALE: tl.constexpr = FLAGS[1]
    BLOCK: tl.constexpr = idx.shape[0]
    g = descent_grad(g_at, idx, inb, grad_scale, HAS_GRAD_SCALE, MAXIMIZE)
    gb = tl.load(gbar_at + idx, mask=inb) * a + tl.div_rn(g, t)
    w0 = tl.load(w0_at + idx, mask=inb)
    v = w0 - c * gb
    if mask_kind != 0:
        if mask_kind == _MASK_ROW:
            at = rows_of(idx, r0, c0, row_len)
        else:
            at = start + idx
        keep = tl.load(mask_ptr + at, mask=inb).to(tl.float32)
        gb = gb * keep
        v = v * keep
        tl.store(w0_at + idx, w0 * keep, mask=inb)
    tl.store(gbar_at + idx, gb, mask=inb)
    if grouped:
        rows, head, tail = lane_rows(idx, r0, c0, row_len)
        sq = row_running_sum(tl.where(inb, v * v, 0.0), head, carry, idx)
        tl.store(norm_sq_ptr + rows, sq, mask=inb & tail)
        carry = last_lane(sq, idx, BLOCK)
    else:
        x = tl.abs(v) - tau
        x = tl.where(x < 0.0, 0.0, x)  # keeps a NaN, like clamp_min
        w = tl.where(v < 0.0, -x, x) + 0.0  # sign(v) * x, a zero always +0.0
        tl.store(w_at + idx, w.to(DTYPE), mask=inb)
    return carry


@triton.jit
def _rda_kernel(
    table, units, grad_scale_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_FOUND_INF):
        return
    grad_scale = load_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE)
    meta, start, end = program_unit(table, units, _NUM_FIELDS)

    w_addr = tl.load(meta + _PARAM)
    g_addr = tl.load(meta + _GRAD)
    gbar_addr = tl.load(meta + _GBAR)
    w0_addr = tl.load(meta + _W0)
    aligned = aligned16(w_addr | g_addr | gbar_addr | w0_addr)  # whole pieces then move 16 bytes per access
    w_ptr = w_addr.to(tl.pointer_type(DTYPE)) + start
    g_ptr = g_addr.to(tl.pointer_type(DTYPE)) + start
    gbar_ptr = gbar_addr.to(tl.pointer_type(tl.float32)) + start
    w0_ptr = w0_addr.to(tl.pointer_type(tl.float32)) + start
    mask_kind = tl.load(meta + _MASK_KIND)
    mask_ptr = tl.load(meta + _MASK).to(tl.pointer_type(tl.int8))  # torch.bool: one byte, 0 or 1
    grouped = tl.load(meta + _GROUP) != 0
    # reference.rda.rda_coefficients in float64 (float64 division and square
    # root are IEEE: div.rn.f64, sqrt.rn.f64), rounded once to fp32
    t64 = column_f64(meta, _T)
    gamma64 = column_f64(meta, _GAMMA)
    root = tl.sqrt(t64)
    tau64 = column_f64(meta, _LAM) * root / gamma64
    t = t64.to(tl.float32)
    a = ((t64 - 1.0) / t64).to(tl.float32)
    c = (root / gamma64).to(tl.float32)
    tau = tau64.to(tl.float32)
    kappa = (tau64 * tl.sqrt(tl.load(meta + _ROW_LEN).to(tl.float64))).to(tl.float32)
    norm_sq_ptr = tl.load(meta + _NORM_SQ).to(tl.pointer_type(tl.float32))
    idx = tl.arange(0, BLOCK)

    # Element start lies in row r0 at column c0; each piece finds its own (piece_origin).
    r0, c0, row_len = row_origin(start, tl.load(meta + _ROW_LEN))
    size = (end - start).to(tl.int32)
    carry = 0.0  # the sum of squares of the row the previous piece left unfinished
    for_pieces(_first_pass_piece, (w_ptr, g_ptr, gbar_ptr, w0_ptr), aligned, start, size, r0, c0, row_len, carry,
               (mask_ptr, norm_sq_ptr, mask_kind, grouped, a, c, t, tau, grad_scale), (MAXIMIZE, HAS_GRAD_SCALE),
               DTYPE, BLOCK)

    if grouped:
        tl.debug_barrier()  # the row sums stored above are read by every lane below
        for piece in range(0, size, BLOCK):
            i = piece + idx
            inb = i < size
            v = tl.load(w0_ptr + i, mask=inb) - c * tl.load(gbar_ptr + i, mask=inb)
            rp, cp = piece_origin(r0, c0, row_len, piece)
            norm = tl.sqrt_rn(tl.load(norm_sq_ptr + rows_of(idx, rp, cp, row_len), mask=inb, other=0.0))
            s = 1.0 - tl.div_rn(kappa + tl.zeros_like(norm), tl.where(norm > 0.0, norm, 1.0))
            s = tl.where(s < 0.0, 0.0, s)
            w = tl.where(norm > 0.0, v * s + 0.0, 0.0)
            tl.store(w_ptr + i, w.to(DTYPE), mask=inb)


def check_table(table: Tensor, dtype: Optional[torch.dtype] = None, full: bool = True) -> None:
    """Refuse (``TableError``, a ``ValueError`` naming the row, the column and
    the value) a table this kernel cannot step: a MASK_KIND outside
    ``MASK_KINDS``, a GROUP outside ``GROUP_KINDS``, a STREAM flag other than
    0/1, an unknown DTYPE (or, given ``dtype``, one other than the launch's),
    sizes that disagree; when ``full`` (not for ``build_units``, which reads
    kinds, flags and sizes) also a missing pointer (NORM_SQ for group
    tensors), a mask its kind would ignore, or a step t, lam or gamma that
    ``reference.rda`` refuses. The C++ kernel's checks (csrc/rda.cpp), plus
    the Triton scratch, on a CPU copy of the table."""
    c = TableCheck(table, "rda", "regkern.backends.rda.build_rda_table", RDA_COLUMN, full)
    c.rows_cover()
    c.one_of("DTYPE", tuple(DTYPE_CODE.values()), "0 float32, 1 bfloat16, 2 float16")
    if dtype is not None:
        c.dtype_is(DTYPE_CODE[dtype], dtype)
    c.one_of("MASK_KIND", MASK_KINDS, "0 none, 1 row mask, 2 element mask")
    c.one_of("GROUP", GROUP_KINDS, "0 element soft threshold, 1 row shrinkage")
    c.flag("STREAM")
    elements = c["NUMEL"] > 0
    for name in ("PARAM", "GRAD", "GBAR", "W0"):
        c.present(name, elements, "a tensor with elements")
    kinds = c["MASK_KIND"]
    c.absent("MASK", kinds == MASK_NONE, "MASK_KIND is 0 (none)")
    c.present("MASK", elements & (kinds != MASK_NONE), lambda r: f"MASK_KIND {int(kinds[r])}")
    c.present("NORM_SQ", elements & (c["GROUP"] != 0), "GROUP 1 (its per-row sums)")
    if not full:
        return
    t, lam, gamma = c.floats("T"), c.floats("LAM"), c.floats("GAMMA")
    write = "write the step with regkern.backends.rda.write_step"
    c.refuse(~(t >= 1), "T", "but the step t counts from 1", t, remedy=write)
    c.refuse(~((lam >= 0) & lam.isfinite()), "LAM", "but lam must be finite and non-negative", lam, remedy=write)
    c.refuse(~(gamma > 0), "GAMMA", "but gamma (the inverse learning rate) must be positive", gamma, remedy=write)


def build_units(table: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """The work list of a metadata table: int64 ``[U, 3]`` (tensor, start, end), on the CPU.

    Build it once per table (it depends only on sizes and which tensors are
    stepped by rows) and keep it on the device beside the table. Units are
    ``chunk`` elements; tensors stepped by rows get units of whole rows. The
    table's kinds, flags and sizes are checked first (``check_table``; its
    pointers and step values are checked by the launch).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}.")
    table = table.cpu()
    check_table(table, full=False)
    numel = table[:, RDA_COLUMN["NUMEL"]]
    row_len = table[:, RDA_COLUMN["ROW_LEN"]]
    by_rows = (table[:, RDA_COLUMN["GROUP"]] != 0) & (row_len > 0)
    length = torch.where(by_rows, (chunk // row_len.clamp(min=1)).clamp(min=1) * row_len, chunk)
    return units_of(numel, length)


def rda_step(
    table: Tensor,
    dtype: torch.dtype,
    *,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    units: Optional[Tensor] = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = 4,
) -> None:
    """One RDA step of every tensor in ``table`` (all of storage ``dtype``), one launch.

    ``table`` (with the step's coefficients) and ``units`` live on the
    tensors' device; without ``units`` they are built here (a device-to-host
    copy: pass cached ones in a training loop). ``grad_scale`` and
    ``found_inf`` may be device tensors; the kernel reads them.

    The table is checked (``check_table``, nothing written on a refusal) when
    it is on the CPU or ``units`` are built here; a device table with cached
    units had its kinds, flags and sizes checked when ``build_units`` made
    them from it.
    """
    tl_type = tl_dtype(dtype, "the rda kernel takes")
    if units is None or table.device.type == "cpu":
        check_table(table, dtype)
    if units is None:
        units = build_units(table).to(table.device)
    if units.numel() == 0:
        return
    skip, found_inf, grad_scale = place_amp_scalars(found_inf, grad_scale, table.device)
    if skip:
        return
    _rda_kernel[(units.shape[0],)](
        table, units,
        table if grad_scale is None else grad_scale,
        table if found_inf is None else found_inf,
        DTYPE=tl_type, MAXIMIZE=bool(maximize),
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False,  # no mul+add -> fma: rounds op by op like the reference
    )
