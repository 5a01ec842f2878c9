"""The column layouts of the metadata tables every kernel family shares
between Python, C++ and Triton: one home, imported by the dispatchers
(``regkern.backends``) and by the Triton kernels (``regkern.kernels``),
which import nothing else of regkern. The C++ headers (``csrc/*_table.h``)
mirror these names; ``tests/backends/test_kernel_tables.py`` checks that they agree.

Every table is an int64 tensor with one row per tensor; pointers are raw
addresses (0 = absent); columns marked "float" hold the bits of a float64
(``float_bits``).
"""
from __future__ import annotations

import struct

import torch

# Columns of the per-tensor metadata table shared by the C++ and Triton
# backends. Pointers are raw addresses (0 = absent); every tensor is
# contiguous. A row is W[r] (first dimension); ROW_LEN = numel // ROWS. A
# column is W[:, c] (second dimension): element i lies in row i // ROW_LEN and
# column (i % ROW_LEN) // COL_LEN. Columns marked "float" hold the bits of a
# float64 (see float_bits).
SGD_FIELDS = (
    "PARAM",        # W, storage dtype DTYPE
    "GRAD",         # gradient, same dtype and shape as W
    "BUF",          # momentum buffer, same dtype and shape as W (0: momentum == 0)
    "LAM",          # fp32 L2 coefficient, [ROWS] or W's shape (LAM_KIND; 0: none)
    "MASK",         # bool mask (0: none)
    "MASK_KIND",    # 0 none, 1 row mask [ROWS], 2 element mask (W's shape)
    "NORMS",        # fp32 [ROWS, 3] out: L1, L2, mean |W| of the updated rows (0: none)
    "NUMEL",
    "ROWS",
    "ROW_LEN",
    "DTYPE",        # 0 float32, 1 bfloat16, 2 float16
    "FIRST",        # 1: first momentum step, buf = d
    "L1",           # fp32 [ROWS] L1 subgradient coefficient: d += l1[r] * sign(W) (0: none)
    "POLAR",        # fp32 [4] (lam, t, m, s): d += lam * (t sign(W) - sign(W - m) + s) (0: none)
    "ADMM_TARGET",  # Z - U, same dtype and shape as W: d += rho * (W - target) (0: none)
    "ADMM_RHO",     # float: rho
    "PROX",         # 0 none, 1 element L1, 2 group lasso (threshold lr * PROX_LAM[r])
    "PROX_LAM",     # fp32 [ROWS] proximal coefficient (0: none)
    "CLAMP",        # 1: W = min(max(W, CLAMP_LO), CLAMP_HI) after the prox
    "CLAMP_LO",     # float
    "CLAMP_HI",     # float
    "LAM_KIND",     # 0 none, 1 per row [ROWS]: d += lam[r] * W, 2 per element (W's shape): d += lam * W
    "LAM_COLS",     # fp32 [COLS] per-column L2 coefficient: d += lam_cols[c] * W (0: none)
    "COLS",         # W.shape[1] (0 for tensors with fewer than 2 dimensions)
    "COL_LEN",      # ROW_LEN // COLS: elements per (row, column) (0 when COLS == 0)
)
SGD_COLUMN = {name: i for i, name in enumerate(SGD_FIELDS)}
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MASK_NONE, MASK_ROW, MASK_ELEMENT = 0, 1, 2
LAM_NONE, LAM_ROW, LAM_ELEMENT = 0, 1, 2


def float_bits(x: float) -> int:
    """A float64 as the int64 with the same bits (for the "float" columns)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]



# The `adam` family's table: the sgd table (BUF 0, FIRST 0) and the moments.
ADAM_FIELDS = SGD_FIELDS + (
    "EXP_AVG",         # m, W's dtype and shape
    "EXP_AVG_SQ",      # v, W's dtype and shape
    "MAX_EXP_AVG_SQ",  # vmax, W's dtype and shape (amsgrad; 0 otherwise)
    "STEP",            # fp32 0-d step count, incremented by the step (torch's state["step"])
)
ADAM_COLUMN = {name: i for i, name in enumerate(ADAM_FIELDS)}

# Columns of the `rda` table (mirrored by csrc/rda_table.h).
RDA_FIELDS = (
    "PARAM",      # W, storage dtype DTYPE (written, never read)
    "GRAD",       # gradient, same dtype and shape as W
    "GBAR",       # fp32, W's shape: running mean of the gradients
    "W0",         # fp32, W's shape: W at the first step (written only under a mask)
    "MASK",       # bool mask (0: none)
    "MASK_KIND",  # 0 none, 1 row mask [ROWS], 2 element mask (W's shape)
    "NUMEL",
    "ROWS",
    "ROW_LEN",
    "DTYPE",      # 0 float32, 1 bfloat16, 2 float16
    "GROUP",      # 0 element soft threshold, 1 row (group) shrinkage
    "STREAM",     # 1: the C++ kernel writes fp32 W with non-temporal stores (same results)
    "T",          # float: the step t (1 at the first step)
    "LAM",        # float: the L1 strength lam
    "GAMMA",      # float: gamma = 1 / lr (may be inf)
    "NORM_SQ",    # fp32 [ROWS] scratch of the Triton kernel for group tensors (0: none)
)
RDA_COLUMN = {name: i for i, name in enumerate(RDA_FIELDS)}

# Columns of the Z/U table (mirrored by csrc/admm_table.h, namespace zu_col).
ZU_FIELDS = (
    "PARAM",      # W, storage dtype DTYPE (read only)
    "Z",          # fp32, W's shape (written)
    "U",          # fp32, W's shape (read, written)
    "TARGET",     # Z - U, W's dtype (written; 0: none)
    "NUMEL",
    "ROWS",
    "ROW_LEN",
    "DTYPE",      # 0 float32, 1 bfloat16, 2 float16
    "MODE",       # MODE_ELEMENT, MODE_ROWS or MODE_SOFT
    "SCORES",     # scratch: fp32 [NUMEL] (elements) or float64 [ROWS] (rows); 0: no score pass
    "ROW_KEEP",   # bool [ROWS]: the rows kept (MODE_ROWS)
    "THRESHOLD",  # float: the keep-th largest score (MODE_ELEMENT) or tau (MODE_SOFT)
    "CUT",        # MODE_ELEMENT: a score equal to THRESHOLD is kept at flat indices <= CUT
    "KEEP",       # MODE_ELEMENT, MODE_ROWS: how many entries (rows) to keep
)
ZU_COLUMN = {name: i for i, name in enumerate(ZU_FIELDS)}
MODE_ELEMENT, MODE_ROWS, MODE_SOFT = 0, 1, 2

# Columns of the SAS-ADMM table (mirrored by csrc/admm_table.h, namespace sas_col).
SAS_FIELDS = (
    "PARAM",      # W_hat out, storage dtype DTYPE
    "GRAD",       # gradient, W's dtype and layout
    "W", "W_BREVE", "ANCHOR", "Z", "U",  # fp32 state, the parameter's layout
    "NUMEL",
    "DTYPE",
    "OUTER",      # 1: the outer update is due after this inner step
    # floats (SASCoefficients of regkern.reference.admm, in this order):
    "C", "INV_CR", "B", "B1", "BN", "BN1", "RB", "INV_BETA", "TAU", "SB", "BETA", "RHO",
)
SAS_COLUMN = {name: i for i, name in enumerate(SAS_FIELDS)}
SAS_FLOATS = ("c", "inv_cr", "b", "b1", "bn", "bn1", "rb", "inv_beta", "tau", "sb", "beta", "rho")
