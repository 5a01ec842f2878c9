// C++ CPU backend of the `rda` kernel family (see regkern/reference/rda.py for
// the contract). Python validates the tensors; rda_step first checks its
// table (table_check.h: TableError, nothing written) and then computes.
#pragma once

#include <cstdint>

namespace regkern {

// One fused RDA step over every tensor of the metadata table (rda_table.h).
// Runs on up to `num_threads` OpenMP threads; call it without the GIL. The
// instruction-set variant is the process-wide one (common/isa.h).
void rda_step(const int64_t* table, int64_t num_tensors, bool maximize, double grad_scale,
              int num_threads);

// The checks rda_step makes before it writes anything (table_check.h):
// throws TableError on the first row it refuses.
void rda_check_table(const int64_t* table, int64_t num_tensors);

namespace rda_detail {

// Options of one call.
struct Opt {
  float scale;
  bool has_scale, maximize;
};

// One decoded row of the metadata table; coefficients computed in float64
// from T, LAM and GAMMA (as reference.rda.rda_coefficients) and rounded to fp32.
struct Desc {
  void* w;
  const void* g;
  float* gbar;
  float* w0;
  const uint8_t* mask;
  int64_t numel, rows, row_len;
  int mask_kind, dtype;
  bool group;
  // write fp32 W with non-temporal stores (STREAM column: the call's data
  // outgrows the caches, so W, which the step never reads, costs no
  // read-for-ownership and evicts nothing the step still needs)
  bool stream;
  float t, a, c, tau, kappa;
};

// Per-ISA entry points (rda_kernel.h, compiled once per variant in rda.cpp).
struct Kernels {
  // Step elements [lo, hi) of one tensor; row-aligned for group tensors.
  void (*range)(const Desc&, const Opt&, int64_t lo, int64_t hi);
};

}  // namespace rda_detail
}  // namespace regkern
