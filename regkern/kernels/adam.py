"""Triton kernel for the `adam` family (docs/adam.md): fused Adam / AdamW with
the regularizer terms of the `sgd` family.

One step of every tensor of a dtype group is two launches. The caller gives

- ``table``: the int64 ``[T, len(ADAM_FIELDS)]`` metadata of
  ``regkern.backends.adam.build_adam_table`` (the sgd columns, then EXP_AVG,
  EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP), on the device;
- ``units``: the work list of :func:`build_units` (int64 ``[U, 3]``: tensor,
  first element, end element; the sgd kernel's units: whole rows for tensors
  with norms or group lasso), built once on the CPU and cached on the device.

``_count_steps`` (one program per 128 table rows) adds 1 to every STEP (torch's
fp32 ``state["step"]``); then ``_adam_kernel`` (one program per unit) reads
its tensor's updated count ``t`` and computes the bias corrections in float64
(``step_size = lr / (1 - b1^t)``, ``bc2_sqrt = sqrt(1 - b2^t)``, ``b^t`` as
``exp2(t * log2(b))``), each rounded once to fp32 like the reference's Python
floats. Two launches on one stream order the count before its readers
without a host sync and without a race (a count written by one program of the
same launch while another reads it would be one).

Program ``u`` steps the elements ``[start, end)`` of its tensor in pieces of
``BLOCK``, in the order of ``regkern.reference.adam``: the gradient (unscaled,
negated under maximize), Adam's L2 decay ``h = fma(wd, W, g)``, AdamW's
decay ``W * (1 - lr * decay)``, the regularizer terms (``.common.add_terms``:
coupled, added to h; decoupled, ``W - lr * (0 + terms)``), the moments
(torch's lerp and addcmul, with fma where torch's CPU kernels have one), the
amsgrad maximum, the update, the mask of W and every moment, then the sgd
family's post-update part (``.common.step_unit``, the piece loop of both
kernels: proximal map, clamp, mask again, row norms; group lasso on rows
longer than a block in two passes). W and the
moments are stored rounded once to W's dtype.

No host synchronisation: ``lr`` may be a 0-d device tensor and GradScaler's
``grad_scale`` / ``found_inf`` are read by the kernels (``found_inf`` set:
nothing is written, step counts included). float64 hyper-parameters travel
as the int64 bits of the double (a Python float argument is fp32 in a
Triton kernel); fp32 ones as fp32. Compile-time constants: the storage dtype,
the flags that change the code (amsgrad, maximize, coupled, lr / grad_scale /
found_inf given) and ``BLOCK``. Math is fp32 op by op (no fma contraction,
``tl.fma`` where the reference has fma, IEEE division and square root).

``check_table`` refuses, before a launch, a table the kernels cannot step
(the sgd kernel's checks of the shared columns, then the moments and step
counts), like the C++ kernel (csrc/adam.cpp).
"""
from __future__ import annotations

import struct
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from regkern.layouts import ADAM_COLUMN, ADAM_FIELDS, DTYPE_CODE

from .common import (UNIT_FIELDS, add_terms, descent_grad, device_lr, has_terms, keep_mask, load_grad_scale,
                     place_amp_scalars, program_unit, register_ceiling, skip_step, step_unit, tl_dtype,
                     unit_pointers)
from .sgd import DEFAULT_CHUNK, check_columns, work_units
from .table_checks import TableCheck

__all__ = ["ADAM_TERMS", "UNIT_FIELDS", "DEFAULT_BLOCK", "DEFAULT_CHUNK", "adam_step", "build_units",
           "check_table"]

# The regularizer terms of the contract this kernel computes (names as
# regkern.terms.TERM_KEYWORDS); tensors with other terms go to the reference.
ADAM_TERMS = ("l1", "polar", "admm", "prox", "clamp")

COUNT_BLOCK = 128  # table rows per program of _count_steps
# Elements per piece, warps and (NVIDIA) the register ceiling of _adam_kernel:
# 4 elements per thread in at most 168 registers, 3 programs of 128 threads per
# SM. (With 8 per thread, BLOCK 1024 as the sgd kernel, the five streams, the
# row scans and their 64-bit addresses need ~220 registers; ptxas's own
# choice for 4 per thread spills a few bytes on sm_80.) Group-lasso rows up
# to DEFAULT_BLOCK are stepped in one pass, longer ones in two.
DEFAULT_BLOCK = 512
DEFAULT_WARPS = 4
MAX_REGISTERS = 168

# Columns of the metadata table, as compile-time constants for the kernels
# (the regularizer terms' columns are read by the helpers of .common).
_NUM_FIELDS = tl.constexpr(len(ADAM_FIELDS))
_PARAM = tl.constexpr(ADAM_COLUMN["PARAM"])
_GRAD = tl.constexpr(ADAM_COLUMN["GRAD"])
_MASK_KIND = tl.constexpr(ADAM_COLUMN["MASK_KIND"])
_EXP_AVG = tl.constexpr(ADAM_COLUMN["EXP_AVG"])
_EXP_AVG_SQ = tl.constexpr(ADAM_COLUMN["EXP_AVG_SQ"])
_MAX_EXP_AVG_SQ = tl.constexpr(ADAM_COLUMN["MAX_EXP_AVG_SQ"])
_STEP = tl.constexpr(ADAM_COLUMN["STEP"])


def _bits(x: float) -> int:
    """A float64 as the int64 with the same bits (a kernel argument; see _f64)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64(bits):
    """The float64 whose bits a kernel argument carries (an i32 when the bits
    fit one, e.g. 0.0, which widening keeps)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _power(b, t):
    """b ** t in float64 for 0 <= b < 1 and a count t >= 1, as exp2(t * log2(b))
    (a beta of 0 counts as 2^-1022: its powers are 0 once subtracted from 1)."""
    return tl.exp2(t * tl.log2(tl.maximum(b, 2.2250738585072014e-308)))


@triton.jit
def _count_steps(table, count, found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """STEP += 1 (fp32) for the table rows of this program that have one."""
    if skip_step(found_inf_ptr, HAS_FOUND_INF):
        return
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = rows < count
    step = tl.load(table + rows.to(tl.int64) * _NUM_FIELDS + _STEP, mask=inb, other=0)
    live = inb & (step != 0)
    step_ptr = step.to(tl.pointer_type(tl.float32))
    tl.store(step_ptr, tl.load(step_ptr, mask=live) + 1.0, mask=live)


@triton.jit
def _updated(meta, at, idx, inb, start, r0, c0, row_len, args, FLAGS: tl.constexpr, DTYPE: tl.constexpr,
             WRITE: tl.constexpr):
    """The contract up to the first mask for the lanes idx of a piece
    (elements start + idx, the first at row r0, column c0; ``at``: W, the
    gradient, the moments at element start): W in fp32. With ``WRITE`` the
    masked moments are stored here, rounded once (their registers and
    addresses are free before the post-update part); without, nothing is
    written (``.common.step_unit``'s UPDATE)."""
    w_at, g_at, m_at, v_at, vmax_at = at
    (lr, w1, small_w1, b2, one_minus_b2, eps, weight_decay, decay, decay_factor, terms, neg_step_size, bc2_sqrt,
     grad_scale) = args
    AMSGRAD: tl.constexpr = FLAGS[0]
    MAXIMIZE: tl.constexpr = FLAGS[1]
    COUPLED: tl.constexpr = FLAGS[2]
    HAS_GRAD_SCALE: tl.constexpr = FLAGS[3]
    w = tl.load(w_at + idx, mask=inb).to(tl.float32)
    h = descent_grad(g_at, idx, inb, grad_scale, HAS_GRAD_SCALE, MAXIMIZE)
    if weight_decay != 0:
        h = tl.fma(w, weight_decay, h)  # torch's g.add(W, alpha=wd)
    x = w
    if decay != 0:
        x = x * decay_factor  # AdamW: W * (1 - lr * decay)
    if COUPLED:
        h = add_terms(meta, h, w, idx, inb, start, r0, c0, row_len, DTYPE)
    elif terms:
        x = x - lr * add_terms(meta, tl.zeros_like(w), w, idx, inb, start, r0, c0, row_len, DTYPE)
    m = tl.load(m_at + idx, mask=inb).to(tl.float32)
    # torch's lerp: fma(w1, h - m, m) for a weight below 0.5, else fma(-(1 - w1), h - m, h)
    m = tl.fma(tl.where(small_w1, w1, -(1.0 - w1)), h - m, tl.where(small_w1, m, h))
    v = tl.load(v_at + idx, mask=inb).to(tl.float32)
    v = tl.fma(one_minus_b2 * h, h, v * b2)  # torch's v.mul_(b2).addcmul_(h, h, value=1 - b2)
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_at + idx, mask=inb).to(tl.float32), v, propagate_nan=tl.PropagateNan.ALL)
        second = vmax
    else:
        vmax = v  # unused
        second = v
    denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
    x = x + tl.div_rn(neg_step_size * m, denom)
    if tl.load(meta + _MASK_KIND) != 0:
        keep = keep_mask(meta, idx, inb, start, r0, c0, row_len)
        x = x * keep
        m = m * keep
        v = v * keep
        if AMSGRAD:
            vmax = vmax * keep
    if WRITE:
        tl.store(m_at + idx, m.to(DTYPE), mask=inb)
        tl.store(v_at + idx, v.to(DTYPE), mask=inb)
        if AMSGRAD:
            tl.store(vmax_at + idx, vmax.to(DTYPE), mask=inb)
    return x


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "decay_bits"])
def _adam_kernel(
    table, units,
    lr_bits, lr_ptr, beta1_bits, beta2_bits, w1, b2, one_minus_b2, eps, weight_decay, decay_bits,
    grad_scale_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    COUPLED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_FOUND_INF):
        return
    if LR_ON_DEVICE:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = _f64(lr_bits)
    lr = lr64.to(tl.float32)
    grad_scale = load_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE)
    meta, start, end = program_unit(table, units, _NUM_FIELDS)

    # bias corrections of the count _count_steps wrote, in float64, rounded once
    # (a tensor without elements may have no count; its unit only zeroes its norms)
    step_ptr = tl.load(meta + _STEP)
    t = tl.load(step_ptr.to(tl.pointer_type(tl.float32)), mask=step_ptr != 0, other=1.0).to(tl.float64)
    neg_step_size = (-(lr64 / (1.0 - _power(_f64(beta1_bits), t)))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - _power(_f64(beta2_bits), t)).to(tl.float32)
    decay = _f64(decay_bits)
    decay_factor = (1.0 - lr64 * decay).to(tl.float32)
    small_w1 = tl.abs(w1) < 0.5  # torch's is_lerp_weight_small
    terms = has_terms(meta)

    aligned, ptrs = unit_pointers((tl.load(meta + _PARAM), tl.load(meta + _GRAD), tl.load(meta + _EXP_AVG),
                                   tl.load(meta + _EXP_AVG_SQ), tl.load(meta + _MAX_EXP_AVG_SQ)), start, DTYPE)
    step_unit(meta, start, end, ptrs, aligned, lr,
              (lr, w1, small_w1, b2, one_minus_b2, eps, weight_decay, decay, decay_factor, terms, neg_step_size,
               bc2_sqrt, grad_scale),
              (AMSGRAD, MAXIMIZE, COUPLED, HAS_GRAD_SCALE), _updated, DTYPE, BLOCK)


def check_table(table: Tensor, dtype: Optional[torch.dtype] = None, amsgrad: bool = False,
                full: bool = True) -> None:
    """Refuse (``TableError``, a ``ValueError`` naming the row, the column and
    the value) a table this kernel cannot step, before anything is written:
    what the sgd kernel refuses in the shared columns (``sgd.check_columns``:
    kinds, flags, DTYPE (or one other than ``dtype``), sizes, the pointers a
    kind needs, NaN or crossed clamp bounds), a momentum buffer or a FIRST
    flag (the family has neither), a tensor with elements lacking EXP_AVG,
    EXP_AVG_SQ, STEP (or, under ``amsgrad``, MAX_EXP_AVG_SQ), and two rows
    sharing one STEP (each step count is advanced once and read by its own
    tensor only). The pointer checks need ``full``; ``build_units`` checks
    kinds, flags and sizes. The same checks as the C++ kernel's
    (csrc/adam.cpp, check_row), plus the shared STEP, on a CPU copy."""
    c = TableCheck(table, "adam", "regkern.backends.adam.build_adam_table", ADAM_COLUMN, full)
    check_columns(c, dtype)
    c.refuse(c["FIRST"] != 0, "FIRST", "but the adam family has no first momentum step (FIRST must be 0)")
    c.absent("BUF", torch.ones_like(c["BUF"], dtype=torch.bool), "the adam family keeps no momentum buffer")
    elements = c["NUMEL"] > 0
    c.present("EXP_AVG", elements, "a tensor with elements")
    c.present("EXP_AVG_SQ", elements, "a tensor with elements")
    if amsgrad:
        c.present("MAX_EXP_AVG_SQ", elements, "an amsgrad step of a tensor with elements")
    c.present("STEP", elements, "a tensor with elements")
    if full:
        step = c["STEP"]
        _, inverse, counts = torch.unique(step, return_inverse=True, return_counts=True)
        shared = (step != 0) & (counts[inverse] > 1)
        c.refuse(shared, "STEP", "but another row has the same step count, which one step would advance twice",
                 remedy="give every tensor a step tensor of its own")


def build_units(table: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """The work list of an adam table: int64 ``[U, 3]`` (tensor, start, end), on
    the CPU; the sgd kernel's (``sgd.work_units``: ``chunk`` elements, whole
    rows for tensors with norms or group lasso). Build it once per table and
    keep it on the device beside the table. The table's kinds, flags and sizes
    are checked first (``check_table``; the launch checks its pointers)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}.")
    table = table.cpu()
    check_table(table, full=False)
    return work_units(table, chunk)


def adam_step(
    table: Tensor,
    dtype: torch.dtype,
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: float,
    amsgrad: bool,
    maximize: bool,
    coupled: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    units: Optional[Tensor] = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_WARPS,
) -> None:
    """One Adam / AdamW step of every tensor in ``table`` (all of storage
    ``dtype``): every STEP += 1, then the update, two launches.

    ``weight_decay`` is Adam's L2 decay (added to the gradient), ``decay``
    AdamW's decoupled decay (``W *= 1 - lr * decay``); ``coupled``: the
    regularizer terms join the gradient before the moments, otherwise they
    step W directly (``W -= lr * terms``). ``table`` and ``units`` live on the
    tensors' device; without ``units`` they are built here (a device-to-host
    copy: pass cached ones in a training loop). ``lr``, ``grad_scale`` and
    ``found_inf`` may be device tensors; the kernels read them, so nothing
    waits on the device.

    The table is checked (``check_table``, nothing written on a refusal) when
    it is on the CPU or ``units`` are built here; a device table with cached
    units had its kinds, flags and sizes checked when ``build_units`` made
    them from it (reading it back every step would wait on the device).
    """
    tl_type = tl_dtype(dtype, "the adam kernel takes")
    if units is None or table.device.type == "cpu":
        check_table(table, dtype, amsgrad)
    if units is None:
        units = build_units(table).to(table.device)
    count = table.shape[0]
    if count == 0:
        return
    device = table.device
    skip, found_inf, grad_scale = place_amp_scalars(found_inf, grad_scale, device)
    if skip:
        return
    lr, lr_on_device = device_lr(lr, device)
    has_found_inf = found_inf is not None
    found_inf_arg = table if found_inf is None else found_inf
    _count_steps[(triton.cdiv(count, COUNT_BLOCK),)](
        table, count, found_inf_arg, HAS_FOUND_INF=has_found_inf, BLOCK=COUNT_BLOCK, num_warps=4)
    if units.numel() == 0:
        return
    _adam_kernel[(units.shape[0],)](
        table, units,
        0 if lr_on_device else _bits(lr), lr if lr_on_device else table,
        _bits(beta1), _bits(beta2), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
        float(weight_decay), _bits(decay),
        table if grad_scale is None else grad_scale, found_inf_arg,
        DTYPE=tl_type, LR_ON_DEVICE=lr_on_device, AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
        COUPLED=bool(coupled), HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=has_found_inf,
        BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False,  # no mul+add -> fma beyond the tl.fma of the contract
        **register_ceiling(device, MAX_REGISTERS),
    )

