// Column layouts of the per-tensor metadata tables of the `admm` kernel family
// (docs/admm.md; contract in regkern/reference/admm.py).
//
// These constants MIRROR `ZU_FIELDS` and `SAS_FIELDS` in
// regkern/backend_admm.py (same names, same order): change both together. A
// table is a contiguous int64 CPU tensor [num_tensors, NUM_FIELDS]; pointers
// are raw addresses (0 = absent) of tensors that are contiguous (ZU) or that
// share one dense layout (SAS: the kernel walks them as flat arrays).
// "float64 bits" columns hold the bits of a double, rounded to fp32 here.
#pragma once

#include <cstdint>

namespace regkern {

// Classic ADMM Z/U update: a score pass and a selection (top-k tensors), then
// the update pass.
namespace zu_col {

constexpr int PARAM = 0;      // W, storage dtype DTYPE (read only)
constexpr int Z = 1;          // fp32, W's shape (written)
constexpr int U = 2;          // fp32, W's shape (read, written)
constexpr int TARGET = 3;     // Z - U, W's dtype and shape (written; 0: none)
constexpr int NUMEL = 4;
constexpr int ROWS = 5;
constexpr int ROW_LEN = 6;    // NUMEL / ROWS (0 when ROWS == 0)
constexpr int DTYPE = 7;      // 0 float32, 1 bfloat16, 2 float16
constexpr int MODE = 8;       // 0 top-k elements, 1 top-k rows, 2 soft threshold
constexpr int SCORES = 9;     // mode 0: fp32 [NUMEL] |W + U|; mode 1: float64 [ROWS] sum of squares
constexpr int ROW_KEEP = 10;  // mode 1: bool [ROWS], the rows kept (written by the selection)
constexpr int THRESHOLD = 11; // float64 bits; mode 0: the keep-th largest score (written by the selection); mode 2: tau
constexpr int CUT = 12;       // mode 0: a score equal to THRESHOLD is kept at flat indices <= CUT
constexpr int KEEP = 13;      // modes 0, 1: how many entries (rows) to keep
constexpr int NUM_FIELDS = 14;

// Names in column order (messages; exported as regkern._C.ZU_FIELDS).
constexpr const char* NAMES[NUM_FIELDS] = {
    "PARAM", "Z", "U", "TARGET", "NUMEL", "ROWS", "ROW_LEN", "DTYPE", "MODE",
    "SCORES", "ROW_KEEP", "THRESHOLD", "CUT", "KEEP",
};

}  // namespace zu_col

// SAS-ADMM step: inner iteration, and the outer update where OUTER is set.
namespace sas_col {

constexpr int PARAM = 0;      // W_hat out, storage dtype DTYPE (written)
constexpr int GRAD = 1;       // gradient, W's dtype and layout (read only)
constexpr int W = 2;          // fp32 state: W
constexpr int W_BREVE = 3;    // fp32 state: W_breve
constexpr int ANCHOR = 4;     // fp32 state: rho W^k + U^k - beta (W^k - Z^k)
constexpr int Z = 5;          // fp32 state (read, written only when OUTER)
constexpr int U = 6;          // fp32 state (read, written only when OUTER)
constexpr int NUMEL = 7;
constexpr int DTYPE = 8;      // 0 float32, 1 bfloat16, 2 float16
constexpr int OUTER = 9;      // 1: the outer step is due after this inner one
constexpr int C = 10;         // float64 bits from here on: c_t
constexpr int INV_CR = 11;    // 1 / (c_t + rho)
constexpr int B = 12;         // b_t
constexpr int B1 = 13;        // 1 - b_t
constexpr int BN = 14;        // b of the next inner iteration
constexpr int BN1 = 15;       // 1 - BN
constexpr int RB = 16;        // r * beta
constexpr int INV_BETA = 17;  // 1 / beta
constexpr int TAU = 18;       // lam / beta
constexpr int SB = 19;        // s * beta
constexpr int BETA = 20;      // beta
constexpr int RHO = 21;       // rho
constexpr int NUM_FIELDS = 22;

// Names in column order (messages; exported as regkern._C.SAS_FIELDS).
constexpr const char* NAMES[NUM_FIELDS] = {
    "PARAM", "GRAD", "W", "W_BREVE", "ANCHOR", "Z", "U", "NUMEL", "DTYPE", "OUTER", "C",
    "INV_CR", "B", "B1", "BN", "BN1", "RB", "INV_BETA", "TAU", "SB", "BETA", "RHO",
};

}  // namespace sas_col
}  // namespace regkern
