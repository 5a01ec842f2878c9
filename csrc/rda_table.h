// Column layout of the per-tensor metadata table of the `rda` kernel family
// (L1 regularized dual averaging, docs/rda.md; contract in regkern/reference/rda.py).
//
// These constants MIRROR `RDA_FIELDS` in regkern/backend_rda.py (same names,
// same order): change both together. The table is a contiguous int64 CPU
// tensor of shape [num_tensors, NUM_FIELDS] built by
// regkern.backends.rda.build_rda_table; pointers are raw addresses (0 = absent)
// of contiguous tensors. "float64 bits" columns hold the bits of a double.
// The step's coefficients (a, c, tau, kappa) are not in the table: the
// kernels derive them from T, LAM and GAMMA (rda_coefficients in the
// reference), so a step patches only the gradient pointers and T.
#pragma once

#include <cstdint>

namespace regkern {
namespace rda_col {

constexpr int PARAM = 0;       // W, storage dtype DTYPE (written, never read)
constexpr int GRAD = 1;        // gradient, same dtype and shape as W (never written)
constexpr int GBAR = 2;        // fp32, W's shape: running mean of the gradients
constexpr int W0 = 3;          // fp32, W's shape: W at the first step (written only under a mask)
constexpr int MASK = 4;        // bool mask (0: none)
constexpr int MASK_KIND = 5;   // 0 none, 1 row mask [ROWS], 2 element mask (W's shape)
constexpr int NUMEL = 6;
constexpr int ROWS = 7;
constexpr int ROW_LEN = 8;     // NUMEL / ROWS (0 when ROWS == 0)
constexpr int DTYPE = 9;       // 0 float32, 1 bfloat16, 2 float16
constexpr int GROUP = 10;      // 0 element soft threshold, 1 row (group) shrinkage
constexpr int STREAM = 11;     // 1: write fp32 W with non-temporal stores (C++ only; same results)
constexpr int T = 12;          // float64 bits: the step t (1 at the first step)
constexpr int LAM = 13;        // float64 bits: the L1 strength lam
constexpr int GAMMA = 14;      // float64 bits: gamma = 1 / lr (may be inf)
constexpr int NORM_SQ = 15;    // fp32 [ROWS] scratch of the Triton kernel (group tensors); unused here
constexpr int NUM_FIELDS = 16;

// Names in column order (messages; exported as regkern._C.RDA_FIELDS).
constexpr const char* NAMES[NUM_FIELDS] = {
    "PARAM", "GRAD", "GBAR", "W0", "MASK", "MASK_KIND", "NUMEL", "ROWS",
    "ROW_LEN", "DTYPE", "GROUP", "STREAM", "T", "LAM", "GAMMA", "NORM_SQ",
};

}  // namespace rda_col
}  // namespace regkern
