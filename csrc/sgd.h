// C++ CPU backend of the `sgd` kernel family (see regkern/reference/sgd.py for
// the contract). Python validates the tensors; sgd_step first checks its
// table (table_check.h: TableError, nothing written) and then computes.
#pragma once

#include <cstdint>

namespace regkern {

namespace table_check {
class Row;
}

// One fused SGD step over every tensor of the metadata table (sgd_table.h).
// Runs on up to `num_threads` OpenMP threads; call it without the GIL.
void sgd_step(const int64_t* table, int64_t num_tensors, double lr, double momentum,
              double dampening, bool nesterov, double weight_decay, bool maximize,
              double grad_scale, int num_threads);

// The checks sgd_step makes before it writes anything (table_check.h): throws
// TableError on the first row it refuses. `momentum`: the step's (a nonzero
// momentum needs every BUF). For a caller that must refuse before it writes
// elsewhere (tensors the reference steps).
void sgd_check_table(const int64_t* table, int64_t num_tensors, double momentum);

namespace detail {

// Hyper-parameters of one call, already rounded to fp32 like torch rounds a
// Python scalar that multiplies an fp32 tensor.
struct Hyper {
  float lr, mu, damp1, wd, scale;
  bool nesterov, maximize, has_scale, has_wd, has_momentum;
};

// One decoded row of the metadata table.
struct TensorDesc {
  void* w;
  const void* g;
  void* buf;
  const float* lam;       // per row [rows] (lam_kind 1) or per element (lam_kind 2)
  const uint8_t* mask;
  float* norms;
  int64_t numel, rows, row_len;
  int mask_kind, lam_kind, dtype;
  bool first;
  // Regularizer terms (docs/regularizers.md); absent ones are null / 0.
  const float* l1;        // fp32 [rows]: d += l1[r] * sign(W)
  const float* polar;     // fp32 [4] (lam, t, m, s)
  const void* target;     // ADMM Z - U, W's dtype and shape: d += rho * (W - target)
  const float* prox_lam;  // fp32 [rows], threshold lr * prox_lam[r]
  const float* lam_cols;  // fp32 [cols]: d += lam_cols[c] * W, c = (i % row_len) / col_len
  int64_t cols, col_len;
  float rho, clamp_lo, clamp_hi;  // float64 columns rounded to fp32, like torch does
  int prox;               // 0 none, 1 element L1, 2 group lasso
  bool clamp;
  bool terms;             // any of the above: the general path (sgd_kernel.h, TermsStep)
  bool row_cuts;          // thread cuts must fall on row boundaries (norms or group lasso)
};

// The sgd table's own columns, shared with the families whose tables start
// with them (adam: adam_table.h): the checks of sgd.cpp's check_row on row
// `r` (whose family, builder and names are the caller's), and the decode of
// a row those checks accepted.
void check_sgd_columns(const table_check::Row& r, bool momentum);
TensorDesc decode_sgd_columns(const int64_t* row);

// Sizes of the general path's blocks and pieces (term_math.h, TermRunner),
// shared by every family that steps regularizer terms (sgd, adam).
constexpr int64_t kBlock = 1024;          // elements per inner block (fits L1)
constexpr int64_t kPiece16 = 128;         // elements per piece: bf16/fp16 conversions, two-pass terms
constexpr int64_t kShortRow = 16;         // rows shorter than this: scalar norm sums
constexpr int64_t kLongRow = 64;          // rows this long: per-row values passed per row piece
// Group lasso (PROX 2) needs a whole updated row before it can scale it. Rows
// up to kRowBuf elements are updated into a per-thread fp32 buffer (fp32
// storage: into W itself, still in cache), reduced, scaled, then stored once;
// short rows are taken kChunk elements' worth at a time. Longer rows take a
// second pass over memory (term_math.h, TermRunner::run).
constexpr int64_t kRowBuf = 65536;
constexpr int64_t kChunk = 4096;
// Column lambdas expanded once per share for rows up to kColPattern - kBlock
// elements (TermRunner::prepare_cols).
constexpr int64_t kColPattern = 8192 + kBlock;

// Read-only stand-ins for absent per-element streams of the general path.
alignas(64) inline const float kZeros[kBlock] = {};
alignas(64) inline const uint8_t kZeroBytes[kBlock] = {};

// Per-thread work space of the general path (TermRunner), allocated on a
// thread's first use of it (~360 KB) and kept for the thread's lifetime;
// shared by the families (one call runs one family at a time per thread).
struct TermScratch {
  alignas(64) float lam[kBlock];
  alignas(64) float l1[kBlock];
  alignas(64) float lamc[kBlock];
  alignas(64) float plam[kBlock];
  alignas(64) float d[kBlock];
  alignas(64) float gs[kBlock];
  alignas(64) float x[kBlock];
  alignas(64) float rsx[kBlock];
  alignas(64) uint32_t rkx[kBlock];
  alignas(64) uint8_t keep[kBlock];
  alignas(64) float rs[kChunk];
  alignas(64) uint32_t rk[kChunk];
  alignas(64) float row[kRowBuf];
  alignas(64) float lamc_pat[kColPattern];
};

TermScratch* term_scratch();

// Per-ISA entry points (sgd_kernel.h, compiled once per variant in sgd.cpp).
struct IsaKernels {
  // Step elements [lo, hi) of one tensor; row-aligned when the tensor has norms.
  void (*range)(const TensorDesc&, const Hyper&, int64_t lo, int64_t hi);
};

}  // namespace detail
}  // namespace regkern
