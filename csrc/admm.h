// C++ CPU backend of the `admm` kernel family (docs/admm.md; see
// regkern/reference/admm.py for the contract). Python validates the tensors;
// each function first checks its table (table_check.h: TableError, nothing
// written) and then computes. Each runs on up to `num_threads` OpenMP
// threads (call them without the GIL) and uses the process-wide
// instruction-set variant (common/isa.h).
#pragma once

#include <cstdint>

namespace regkern {

// Score pass of the classic Z/U update over the zu table (admm_table.h):
// tensors with a SCORES buffer get |W + U| per element (mode 0, fp32: the
// Triton backend's kthvalue reads them; admm_select does not need them) or
// the float64 sum of (W + U)^2 per row (mode 1), a NaN counted as +inf.
void admm_scores(const int64_t* table, int64_t num_tensors, int num_threads);

// Selection of the classic Z/U update over the zu table: keep exactly KEEP
// entries (rows), the largest scores, ties by lowest index. Mode 0 tensors
// with 0 < KEEP < NUMEL: THRESHOLD (the KEEP-th largest |W + U|) and CUT are
// written into the table, by a radix select on the scores' bits computed
// from W and U on the fly (three histogram levels of 11, 11 and 10 bits: two
// passes over W and U, no score buffer); mode 1 tensors with a SCORES buffer
// (after admm_scores): the ROW_KEEP flags. Tensors are shared out over
// threads whole, largest first.
void admm_select(int64_t* table, int64_t num_tensors, int num_threads);

// Update pass of the classic Z/U update over the zu table: Z, U and the target.
void admm_zu(const int64_t* table, int64_t num_tensors, int num_threads);

// One SAS-ADMM step over the sas table: W_breve, W, (outer: Z, U, anchor), W_hat.
void sas_admm_step(const int64_t* table, int64_t num_tensors, int num_threads);

// The checks the passes above make before they write anything
// (table_check.h): throw TableError on the first row they refuse.
void admm_check_zu_table(const int64_t* table, int64_t num_tensors);
void admm_check_sas_table(const int64_t* table, int64_t num_tensors);


namespace admm_detail {

// One decoded row of a zu table.
struct ZuDesc {
  const void* w;
  float* z;
  float* u;
  void* target;
  int64_t numel, rows, row_len;
  int dtype, mode;
  void* scores;            // fp32 [numel] (mode 0) or double [rows] (mode 1)
  const uint8_t* row_keep; // mode 1
  float threshold;         // mode 0: threshold score; mode 2: tau
  int64_t cut;             // mode 0
};

// One decoded row of a sas table; coefficients rounded to fp32.
struct SasDesc {
  void* p;
  const void* g;
  float *w, *wb, *anchor, *z, *u;
  int64_t numel;
  int dtype;
  bool outer;
  float c, inv_cr, b, b1, bn, bn1, rb, inv_beta, tau, sb, beta, rho;
};

// Per-ISA entry points (admm_kernel.h, compiled once per variant in admm.cpp):
// each steps elements [lo, hi) of one tensor (row-aligned for row scores).
struct Kernels {
  void (*scores)(const ZuDesc&, int64_t lo, int64_t hi);
  // Radix keys (bits of |W + U|, NaN -> +inf) of elements [i, i + n), n <= 512.
  void (*keys)(const ZuDesc&, int64_t i, int64_t n, uint32_t* out);
  void (*zu)(const ZuDesc&, int64_t lo, int64_t hi);
  void (*sas)(const SasDesc&, int64_t lo, int64_t hi);
};

}  // namespace admm_detail
}  // namespace regkern
