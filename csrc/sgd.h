// C++ CPU backend of the `sgd` kernel family (see regkern/reference/sgd.py for
// the contract). Python validates the tensors; sgd_step first checks its
// table (table_check.h: TableError, nothing written) and then computes.
#pragma once

#include <cstdint>

namespace regkern {

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

// Per-ISA entry points (sgd_kernel.h, compiled once per variant in sgd.cpp).
struct IsaKernels {
  // Step elements [lo, hi) of one tensor; row-aligned when the tensor has norms.
  void (*range)(const TensorDesc&, const Hyper&, int64_t lo, int64_t hi);
};

}  // namespace detail
}  // namespace regkern
