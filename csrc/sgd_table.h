// Column layout of the per-tensor metadata table of the `sgd` kernel family.
//
// These constants MIRROR `SGD_FIELDS` in regkern/backend.py (same names, same
// order): change both together. The table is a contiguous int64 CPU tensor of
// shape [num_tensors, kSgdNumFields] built by regkern.backends.sgd.build_sgd_table;
// pointers are raw addresses (0 = absent) of contiguous tensors.
#pragma once

#include <cstdint>

namespace regkern {
namespace sgd_col {

constexpr int PARAM = 0;      // W, storage dtype DTYPE
constexpr int GRAD = 1;       // gradient, same dtype and shape as W (never written)
constexpr int BUF = 2;        // momentum buffer, same dtype and shape as W (0: momentum == 0)
constexpr int LAM = 3;        // fp32 L2 coefficient, [ROWS] or W's shape (LAM_KIND; 0: none)
constexpr int MASK = 4;       // bool mask (0: none)
constexpr int MASK_KIND = 5;  // 0 none, 1 row mask [ROWS], 2 element mask (W's shape)
constexpr int NORMS = 6;      // fp32 [ROWS, 3] out: L1, L2, mean |W| of the updated rows (0: none)
constexpr int NUMEL = 7;
constexpr int ROWS = 8;
constexpr int ROW_LEN = 9;    // NUMEL / ROWS (0 when ROWS == 0)
constexpr int DTYPE = 10;     // 0 float32, 1 bfloat16, 2 float16
constexpr int FIRST = 11;     // 1: first momentum step, buf = d
constexpr int L1 = 12;           // fp32 [ROWS]: d += l1[r] * sign(W) (0: none)
constexpr int POLAR = 13;        // fp32 [4] (lam, t, m, s): d += lam (t sign(W) - sign(W - m) + s)
constexpr int ADMM_TARGET = 14;  // Z - U, W's dtype and shape: d += rho (W - target) (0: none)
constexpr int ADMM_RHO = 15;     // float64 bits: rho
constexpr int PROX = 16;         // 0 none, 1 element L1, 2 group lasso
constexpr int PROX_LAM = 17;     // fp32 [ROWS] proximal coefficient
constexpr int CLAMP = 18;        // 1: W = min(max(W, CLAMP_LO), CLAMP_HI)
constexpr int CLAMP_LO = 19;     // float64 bits
constexpr int CLAMP_HI = 20;     // float64 bits
constexpr int LAM_KIND = 21;     // 0 none, 1 per row [ROWS], 2 per element (W's shape)
constexpr int LAM_COLS = 22;     // fp32 [COLS]: d += lam_cols[c] * W (0: none)
constexpr int COLS = 23;         // W.shape[1] (0 below 2 dimensions)
constexpr int COL_LEN = 24;      // ROW_LEN / COLS; element i is in column (i % ROW_LEN) / COL_LEN
constexpr int NUM_FIELDS = 25;

// Names in column order, exported as regkern._C.SGD_FIELDS so a test can
// check them against regkern.layouts.SGD_FIELDS.
constexpr const char* NAMES[NUM_FIELDS] = {
    "PARAM", "GRAD", "BUF", "LAM", "MASK", "MASK_KIND", "NORMS",
    "NUMEL", "ROWS", "ROW_LEN", "DTYPE", "FIRST", "L1", "POLAR", "ADMM_TARGET",
    "ADMM_RHO", "PROX", "PROX_LAM", "CLAMP", "CLAMP_LO", "CLAMP_HI", "LAM_KIND", "LAM_COLS",
    "COLS", "COL_LEN",
};

}  // namespace sgd_col

constexpr int64_t kMaskNone = 0, kMaskRow = 1, kMaskElement = 2;
constexpr int64_t kLamNone = 0, kLamRow = 1, kLamElement = 2;

}  // namespace regkern
