// Column layout of the per-tensor metadata table of the `adam` kernel family:
// the sgd table's columns (sgd_table.h; BUF and FIRST always 0) followed by
// the moments and the step count.
//
// These constants MIRROR `ADAM_FIELDS` in regkern/layouts.py (same names,
// same order): change both together. The table is a contiguous int64 CPU
// tensor of shape [num_tensors, NUM_FIELDS] built by
// regkern.backends.adam.build_adam_table; pointers are raw addresses (0 = absent)
// of contiguous tensors.
#pragma once

#include "sgd_table.h"

namespace regkern {
namespace adam_col {

// The sgd columns, same positions.
constexpr int PARAM = sgd_col::PARAM, GRAD = sgd_col::GRAD, BUF = sgd_col::BUF, LAM = sgd_col::LAM;
constexpr int MASK = sgd_col::MASK, MASK_KIND = sgd_col::MASK_KIND, NORMS = sgd_col::NORMS;
constexpr int NUMEL = sgd_col::NUMEL, ROWS = sgd_col::ROWS, ROW_LEN = sgd_col::ROW_LEN, DTYPE = sgd_col::DTYPE;
constexpr int FIRST = sgd_col::FIRST, L1 = sgd_col::L1, POLAR = sgd_col::POLAR;
constexpr int ADMM_TARGET = sgd_col::ADMM_TARGET, ADMM_RHO = sgd_col::ADMM_RHO, PROX = sgd_col::PROX;
constexpr int PROX_LAM = sgd_col::PROX_LAM, CLAMP = sgd_col::CLAMP, CLAMP_LO = sgd_col::CLAMP_LO;
constexpr int CLAMP_HI = sgd_col::CLAMP_HI, LAM_KIND = sgd_col::LAM_KIND, LAM_COLS = sgd_col::LAM_COLS;
constexpr int COLS = sgd_col::COLS, COL_LEN = sgd_col::COL_LEN;

constexpr int EXP_AVG = sgd_col::NUM_FIELDS;  // m, W's dtype and shape
constexpr int EXP_AVG_SQ = EXP_AVG + 1;       // v, W's dtype and shape
constexpr int MAX_EXP_AVG_SQ = EXP_AVG + 2;   // vmax, W's dtype and shape (amsgrad; 0 otherwise)
constexpr int STEP = EXP_AVG + 3;             // fp32 0-d step count, incremented by the step
constexpr int NUM_FIELDS = EXP_AVG + 4;
static_assert(NUM_FIELDS == 29, "ADAM_FIELDS: the 25 sgd columns and 4 more");

// Names in column order, exported as regkern._C.ADAM_FIELDS so a test can
// check them against regkern.layouts.ADAM_FIELDS.
constexpr const char* NAMES[NUM_FIELDS] = {
    "PARAM", "GRAD", "BUF", "LAM", "MASK", "MASK_KIND", "NORMS",
    "NUMEL", "ROWS", "ROW_LEN", "DTYPE", "FIRST", "L1", "POLAR", "ADMM_TARGET",
    "ADMM_RHO", "PROX", "PROX_LAM", "CLAMP", "CLAMP_LO", "CLAMP_HI", "LAM_KIND", "LAM_COLS",
    "COLS", "COL_LEN", "EXP_AVG", "EXP_AVG_SQ", "MAX_EXP_AVG_SQ", "STEP",
};

}  // namespace adam_col
}  // namespace regkern
