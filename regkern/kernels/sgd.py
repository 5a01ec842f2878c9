"""Triton kernel for the `sgd` family (docs/sgd.md, docs/regularizers.md).

One launch steps every tensor of a dtype group. The caller gives

- ``table``: the int64 ``[T, len(SGD_FIELDS)]`` metadata of
  ``regkern.backends.sgd.build_sgd_table``, on the device;
- ``units``: the work list of :func:`build_units` (int64 ``[U, 3]``: tensor,
  first element, end element), built once on the CPU from the same table and
  cached on the device with it.

Program ``u`` steps the elements ``[start, end)`` of tensor ``t`` in pieces of
``BLOCK``, in the order of ``regkern.reference.sgd``: the gradient terms (L2
``lam`` per row or per element, per-column ``lam_cols``, L1 subgradient,
polarization, ADMM pull), the SGD core, the mask, the
proximal map, the clamp, the mask again, W and buf rounded once to their dtype,
then the row norms. Units are ``chunk`` elements long, except for tensors that
ask for norms or a group-lasso proximal map: theirs hold whole rows
(``max(1, chunk // row_len)`` of them), so one program sees every element of a
row.

Row sums come from a segmented scan (reset at each row's first element):

- norms: the partial sum of a row that runs past a piece is carried into the
  next piece, so rows of any length keep every lane busy with neither a second
  pass nor an atomic;
- group lasso needs ``||W_r||`` before it writes W_r. Rows up to ``BLOCK``
  elements are stepped whole rows per piece (``BLOCK // row_len`` of them):
  the scan's total at each row's last element is gathered back to the row, and
  W is written once. Longer rows take two passes: the first only sums the
  squares of the updated row, the second recomputes the same fp32 values,
  shrinks and writes them (W, buf rounded once; the extra cost is one more
  read of the row's inputs, for these rows only).

Hyper-parameters are runtime arguments (a new lr does not compile a new
kernel); ``lr`` may be a 0-d tensor on the device, read by the kernel (no host
sync). The regularizer terms are read from the table (the polarization
coefficients from device memory, so they may change every step without a
sync); an absent term is skipped by a branch on its table entry. The term
math, the piece loop and the post-update part (gradient terms, mask,
proximal maps, clamp, row norms; ``.common.step_unit``) live in ``.common``,
shared with the ``adam`` kernel. Compile-time constants are the storage
dtype, the flags that change the code (momentum on, nesterov, maximize, lr /
grad_scale / found_inf given) and ``BLOCK``. Math is
fp32 whatever the storage, rounded op by op like the reference (no fma
contraction, IEEE division and square root); W and the momentum buffer are
rounded once to their dtype, to nearest even.

The kernel implements the table values ``PROX_KINDS``, ``MASK_KINDS`` and
``LAM_KINDS``; ``check_table`` refuses a table holding any other (or sizes
that disagree, a pointer a kind needs but lacks, crossed clamp bounds)
before a launch, like the C++ kernel does (``csrc/table_check.h``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from regkern.layouts import (DTYPE_CODE, LAM_ELEMENT, LAM_NONE, LAM_ROW, MASK_ELEMENT, MASK_NONE, MASK_ROW,
                             SGD_COLUMN, SGD_FIELDS)

from .common import (UNIT_FIELDS, add_terms, descent_grad, device_lr, keep_mask, load_grad_scale, place_amp_scalars,
                     program_unit, register_ceiling, skip_step, step_unit, tl_dtype, unit_pointers, units_of)
from .table_checks import TableCheck, float_text

# The regularizer terms of the contract this kernel computes (names as
# regkern.terms.TERM_KEYWORDS); tensors with other terms go to the reference.
SGD_TERMS = ("l1", "polar", "admm", "prox", "clamp")

DEFAULT_CHUNK = 16384  # elements per work unit (a multiple of the block)
# Elements per piece, warps and (NVIDIA) the register ceiling: 4 elements per
# thread (one 16-byte access per fp32 stream) in at most 168 registers. With
# 8 per thread (BLOCK 1024) the terms, the row scans and their 64-bit
# addresses need 139-168 registers on sm_90 and spill under momentum and
# GradScaler; ptxas's own choice spills on sm_80 even without momentum.
DEFAULT_BLOCK = 512
DEFAULT_WARPS = 4
MAX_REGISTERS = 168
PROX_NONE, PROX_L1, PROX_GROUP = 0, 1, 2  # the PROX column (regkern.reference.sgd)

# The table values this kernel implements (check_table refuses any other
# before a launch; the kernel's branches would step it as something else).
PROX_KINDS = (PROX_NONE, PROX_L1, PROX_GROUP)    # PROX: none, element L1 (soft threshold), group lasso
MASK_KINDS = (MASK_NONE, MASK_ROW, MASK_ELEMENT)  # MASK_KIND: none, per row, per element
LAM_KINDS = (LAM_NONE, LAM_ROW, LAM_ELEMENT)      # LAM_KIND: none, per row, per element

# Columns of the metadata table, as compile-time constants for the kernel
# (the regularizer terms' columns are read by the helpers of .common).
_NUM_FIELDS = tl.constexpr(len(SGD_FIELDS))
_PARAM = tl.constexpr(SGD_COLUMN["PARAM"])
_GRAD = tl.constexpr(SGD_COLUMN["GRAD"])
_BUF = tl.constexpr(SGD_COLUMN["BUF"])
_MASK_KIND = tl.constexpr(SGD_COLUMN["MASK_KIND"])
_FIRST = tl.constexpr(SGD_COLUMN["FIRST"])


@triton.jit
def _updated(meta, at, idx, inb, start, r0, c0, row_len, args, FLAGS: tl.constexpr, DTYPE: tl.constexpr,
             WRITE: tl.constexpr):
    """The contract up to the first mask for the lanes idx of a piece
    (elements start + idx, the first at row r0, column c0; ``at``: W, the
    gradient and buf at element start): fp32 W; with ``WRITE`` the masked
    buf is stored, rounded once (``.common.step_unit``'s UPDATE)."""
    w_at, g_at, b_at = at
    lr, momentum, keep_d, weight_decay, grad_scale, first = args
    MOMENTUM: tl.constexpr = FLAGS[0]
    NESTEROV: tl.constexpr = FLAGS[1]
    MAXIMIZE: tl.constexpr = FLAGS[2]
    HAS_GRAD_SCALE: tl.constexpr = FLAGS[3]
    w = tl.load(w_at + idx, mask=inb).to(tl.float32)
    d = descent_grad(g_at, idx, inb, grad_scale, HAS_GRAD_SCALE, MAXIMIZE)
    if weight_decay != 0:
        d = d + weight_decay * w
    d = add_terms(meta, d, w, idx, inb, start, r0, c0, row_len, DTYPE)
    if MOMENTUM:
        if first:
            b = d
        else:
            b = momentum * tl.load(b_at + idx, mask=inb).to(tl.float32) + keep_d * d
        if NESTEROV:
            s = d + momentum * b
        else:
            s = b
    else:
        b = d  # no buffer: unused
        s = d
    w = w - lr * s
    if tl.load(meta + _MASK_KIND) != 0:
        keep = keep_mask(meta, idx, inb, start, r0, c0, row_len)
        w = w * keep
        if MOMENTUM:
            b = b * keep
    if WRITE:
        if MOMENTUM:
            tl.store(b_at + idx, b.to(DTYPE), mask=inb)
    return w


@triton.jit
def _sgd_kernel(
    table, units,
    lr, lr_ptr, momentum, keep_d, weight_decay, grad_scale_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_FOUND_INF):
        return
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    grad_scale = load_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE)
    meta, start, end = program_unit(table, units, _NUM_FIELDS)
    aligned, ptrs = unit_pointers((tl.load(meta + _PARAM), tl.load(meta + _GRAD), tl.load(meta + _BUF)), start,
                                  DTYPE)
    first = tl.load(meta + _FIRST) != 0
    step_unit(meta, start, end, ptrs, aligned, lr, (lr, momentum, keep_d, weight_decay, grad_scale, first),
              (MOMENTUM, NESTEROV, MAXIMIZE, HAS_GRAD_SCALE), _updated, DTYPE, BLOCK)


def check_table(table: Tensor, dtype: Optional[torch.dtype] = None, momentum: float = 0.0,
                full: bool = True) -> None:
    """Refuse (``TableError``, a ``ValueError`` naming the row, the column and
    the value) a table this kernel cannot step: a kind outside ``PROX_KINDS``,
    ``MASK_KINDS`` or ``LAM_KINDS``, a flag other than 0/1, an unknown DTYPE
    (or, given ``dtype``, one other than the launch's), sizes that disagree,
    a pointer that a kind (or ``momentum``) needs but lacks or that its kind
    would ignore, NaN or crossed clamp bounds (these two only when ``full``:
    ``build_units`` reads kinds, flags and sizes). The same checks as the C++
    kernel's (csrc/sgd.cpp, check_row), on a CPU copy of the table."""
    check_columns(TableCheck(table, "sgd", "regkern.backends.sgd.build_sgd_table", SGD_COLUMN, full), dtype, momentum)


def check_columns(c: TableCheck, dtype: Optional[torch.dtype] = None, momentum: float = 0.0) -> None:
    """The checks of :func:`check_table` on a table under check ``c``: its sgd
    columns (SGD_FIELDS; the adam table starts with the same columns, and the
    adam kernel checks them here)."""
    c.rows_cover()
    c.one_of("DTYPE", tuple(DTYPE_CODE.values()), "0 float32, 1 bfloat16, 2 float16")
    if dtype is not None:
        c.dtype_is(DTYPE_CODE[dtype], dtype)
    c.flag("FIRST")
    c.one_of("MASK_KIND", MASK_KINDS, "0 none, 1 row mask, 2 element mask")
    c.one_of("LAM_KIND", LAM_KINDS, "0 none, 1 per row, 2 per element")
    c.one_of("PROX", PROX_KINDS, "0 none, 1 element L1, 2 group lasso")
    c.flag("CLAMP")
    c.non_negative("COLS")
    c.non_negative("COL_LEN")
    elements = c["NUMEL"] > 0
    c.present("PARAM", elements, "a tensor with elements")
    c.present("GRAD", elements, "a tensor with elements")
    if momentum != 0:
        c.present("BUF", elements, "a step with momentum")
    for kind, ptr in (("MASK_KIND", "MASK"), ("LAM_KIND", "LAM")):
        kinds = c[kind]
        c.absent(ptr, kinds == 0, f"{kind} is 0 (none)")
        c.present(ptr, elements & (kinds != 0), lambda r, kind=kind, kinds=kinds: f"{kind} {int(kinds[r])}")
    prox = c["PROX"]
    c.present("PROX_LAM", elements & (prox != PROX_NONE), lambda r: f"PROX {int(prox[r])}")
    if c.full:
        clamped = c["CLAMP"] != 0
        lo, hi = c.floats("CLAMP_LO"), c.floats("CLAMP_HI")
        c.refuse(clamped & lo.isnan(), "CLAMP_LO", "but a clamp bound cannot be NaN", lo)
        c.refuse(clamped & hi.isnan(), "CLAMP_HI", "but a clamp bound cannot be NaN", hi)
        c.refuse(clamped & (lo > hi), "CLAMP_LO",
                 lambda r: f"above CLAMP_HI = {float_text(float(hi[r]))}, so the clamp interval is empty", lo,
                 remedy="give the lower bound first")
    # LAM_COLS (fp32 [COLS]) splits each row into COLS columns of COL_LEN elements
    cols, col_len, row_len = c["COLS"], c["COL_LEN"], c["ROW_LEN"]
    c.refuse((cols == 0) & (col_len != 0), "COL_LEN", "but COLS is 0 (no column lambdas)")
    c.absent("LAM_COLS", cols == 0, "COLS is 0 (no columns)")
    split = (cols > 0) & (elements | (col_len != 0))
    c.refuse(split & ((col_len == 0) | (row_len != cols * col_len)), "COL_LEN",
             lambda r: f"but ROW_LEN / COLS is {int(row_len[r])} / {int(cols[r])}")
    c.present("LAM_COLS", (cols > 0) & elements, lambda r: f"COLS {int(cols[r])}")


def build_units(table: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """The work list of a metadata table: int64 ``[U, 3]`` (tensor, start, end), on the CPU.

    Build it once per table (it depends only on sizes and which tensors have
    norms or a group-lasso proximal map) and keep it on the device beside the
    table. Units are ``chunk`` elements; tensors with norms or group lasso get
    units of whole rows. The table's kinds, flags and sizes are checked first
    (``check_table``; its pointers and bounds are checked by the launch).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}.")
    table = table.cpu()
    check_table(table, full=False)
    return work_units(table, chunk)


def work_units(table: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """:func:`build_units` of a CPU table already checked: it reads only the
    sgd columns NUMEL, ROW_LEN, ROWS, NORMS and PROX (the adam kernel's work
    list comes from here too)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}.")
    numel = table[:, SGD_COLUMN["NUMEL"]]
    row_len = table[:, SGD_COLUMN["ROW_LEN"]]
    rows = table[:, SGD_COLUMN["ROWS"]]
    with_norms = table[:, SGD_COLUMN["NORMS"]] != 0
    by_rows = (with_norms | (table[:, SGD_COLUMN["PROX"]] == PROX_GROUP)) & (row_len > 0)
    length = torch.where(by_rows, (chunk // row_len.clamp(min=1)).clamp(min=1) * row_len, chunk)
    count = (numel + length - 1) // length
    # a tensor of empty rows still has norms (zeros) to write: one empty unit
    count = torch.where(with_norms & (numel == 0) & (rows > 0), 1, count)
    return units_of(numel, length, count)


def sgd_step(
    table: Tensor,
    dtype: torch.dtype,
    *,
    lr: Union[float, Tensor],
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    units: Optional[Tensor] = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_WARPS,
) -> None:
    """One SGD step of every tensor in ``table`` (all of storage ``dtype``), one launch.

    ``table`` and ``units`` live on the tensors' device; without ``units`` they
    are built here (a device-to-host copy: pass cached ones in a training
    loop). ``lr``, ``grad_scale`` and ``found_inf`` may be device tensors; the
    kernel reads them, so nothing waits on the device.

    The table is checked (``check_table``, nothing written on a refusal) when
    it is on the CPU or ``units`` are built here; a device table with cached
    units had its kinds, flags and sizes checked when ``build_units`` made
    them from it (reading it back every step would wait on the device).
    """
    tl_type = tl_dtype(dtype, "the sgd kernel takes")
    if units is None or table.device.type == "cpu":
        check_table(table, dtype, momentum)
    if units is None:
        units = build_units(table).to(table.device)
    if units.numel() == 0:
        return
    device = table.device
    skip, found_inf, grad_scale = place_amp_scalars(found_inf, grad_scale, device)
    if skip:
        return
    lr, lr_on_device = device_lr(lr, device)
    _sgd_kernel[(units.shape[0],)](
        table, units,
        0.0 if lr_on_device else float(lr), lr if lr_on_device else table,
        float(momentum), float(1.0 - dampening), float(weight_decay),
        table if grad_scale is None else grad_scale,
        table if found_inf is None else found_inf,
        DTYPE=tl_type, LR_ON_DEVICE=lr_on_device, MOMENTUM=momentum != 0,
        NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False,  # no mul+add -> fma: rounds op by op like the reference
        **register_ceiling(device, MAX_REGISTERS),
    )
