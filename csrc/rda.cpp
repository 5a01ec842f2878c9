// C++ CPU backend of the `rda` kernel family: table checks, decoding and
// the call into the kernel variant that runs.
//
// The kernel body (rda_kernel.h) is compiled once per instruction-set
// variant (common/isa_variants.inc); the one that runs is the process-wide
// choice of common/isa.h, so every family switches together.
//
// The step's coefficients are derived here from each tensor's T, LAM and
// GAMMA columns, in float64 with the operations of
// reference.rda.rda_coefficients (IEEE, no contraction: the same doubles),
// then rounded once to fp32.
//
// Work split (common/work_split.h): the elements of all tensors are laid end
// to end and cut into one share per thread with equal element counts, each cut
// snapped to a multiple of 64 elements, or to a row boundary in a tensor
// stepped by rows (group shrinkage needs the whole row's norm: a row is
// stepped by one thread). A call is one OpenMP region on torch's OpenMP
// runtime. Results do not depend on the split (row sums run in pieces fixed
// by the row's start).
#include "rda.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "common/isa.h"
#include "common/work_split.h"
#include "rda_table.h"
#include "table_check.h"

namespace regkern {
namespace rda_detail {

constexpr int64_t kPiece = 512;  // elements per piece (fp32 temporaries fit L1)
constexpr int64_t kRdaMaskNone = 0, kRdaMaskRow = 1, kRdaMaskElement = 2;

}  // namespace rda_detail
}  // namespace regkern

#define RK_KERNEL_BODY "rda_kernel.h"
#include "common/isa_variants.inc"

namespace regkern {
namespace rda_detail {
namespace {

const Kernels* const kByVariant[isa::kCount] = RK_VARIANT_KERNELS;

// Refuse (TableError, table_check.h) a row the kernel does not know how to
// step, before anything is written: unknown mask kinds, flags and dtype
// codes, sizes that disagree, missing pointers, and a step t, lam or gamma
// outside what reference.rda accepts (t >= 1, 0 <= lam < inf, gamma > 0).
void check_row(const int64_t* row, int64_t index) {
  namespace c = rda_col;
  const table_check::Row r("rda", "regkern.backends.rda.build_rda_table", c::NAMES, row, index);
  r.rows_cover(c::NUMEL, c::ROWS, c::ROW_LEN);
  r.dtype(c::DTYPE);
  r.one_of(c::MASK_KIND, {kRdaMaskNone, kRdaMaskRow, kRdaMaskElement}, "0 none, 1 row mask, 2 element mask");
  r.flag(c::GROUP);
  r.flag(c::STREAM);
  const bool elements = r[c::NUMEL] > 0;
  for (int col : {c::PARAM, c::GRAD, c::GBAR, c::W0}) r.present(col, elements, "a tensor with elements");
  r.absent(c::MASK, r[c::MASK_KIND] == kRdaMaskNone, "MASK_KIND is 0 (none)");
  r.present_for(c::MASK, elements && r[c::MASK_KIND] != kRdaMaskNone, c::MASK_KIND);
  const double t = r.as_double(c::T), lam = r.as_double(c::LAM), gamma = r.as_double(c::GAMMA);
  if (!(t >= 1.0))
    r.refuse(c::T, table_check::float_text(t), "but the step t counts from 1",
             "write the step with regkern.backends.rda.write_step");
  if (!(lam >= 0.0 && std::isfinite(lam)))
    r.refuse(c::LAM, table_check::float_text(lam), "but lam must be finite and non-negative",
             "write the step with regkern.backends.rda.write_step");
  if (!(gamma > 0.0))
    r.refuse(c::GAMMA, table_check::float_text(gamma), "but gamma (the inverse learning rate) must be positive",
             "write the step with regkern.backends.rda.write_step");
}

// A row that check_row accepted.
Desc decode(const int64_t* row) {
  namespace c = rda_col;
  Desc d;
  d.w = reinterpret_cast<void*>(row[c::PARAM]);
  d.g = reinterpret_cast<const void*>(row[c::GRAD]);
  d.gbar = reinterpret_cast<float*>(row[c::GBAR]);
  d.w0 = reinterpret_cast<float*>(row[c::W0]);
  d.mask_kind = static_cast<int>(row[c::MASK_KIND]);
  d.mask = d.mask_kind == kRdaMaskNone ? nullptr : reinterpret_cast<const uint8_t*>(row[c::MASK]);
  d.numel = row[c::NUMEL];
  d.rows = row[c::ROWS];
  d.row_len = row[c::ROW_LEN];
  d.dtype = static_cast<int>(row[c::DTYPE]);
  d.group = row[c::GROUP] != 0;
  d.stream = row[c::STREAM] != 0;
  // reference.rda.rda_coefficients, operation for operation, in float64
  const double t = float_column(row[c::T]), lam = float_column(row[c::LAM]), gamma = float_column(row[c::GAMMA]);
  const double root = std::sqrt(t);
  const double a = (t - 1.0) / t;
  const double cc = root / gamma;
  const double tau = lam * root / gamma;
  const double kappa = tau * std::sqrt(static_cast<double>(d.row_len));
  d.t = static_cast<float>(t);
  d.a = static_cast<float>(a);
  d.c = static_cast<float>(cc);
  d.tau = static_cast<float>(tau);
  d.kappa = static_cast<float>(kappa);
  return d;
}

}  // namespace
}  // namespace rda_detail

void rda_check_table(const int64_t* table, int64_t num_tensors) {
  for (int64_t i = 0; i < num_tensors; ++i) rda_detail::check_row(table + i * rda_col::NUM_FIELDS, i);
}

void rda_step(const int64_t* table, int64_t num_tensors, bool maximize, double grad_scale,
              int num_threads) {
  using namespace rda_detail;
  if (num_tensors <= 0) return;
  Opt o;
  o.scale = static_cast<float>(grad_scale);
  o.has_scale = grad_scale != 1.0;
  o.maximize = maximize;

  rda_check_table(table, num_tensors);  // before anything is written
  const size_t count = static_cast<size_t>(num_tensors);
  std::vector<Desc> ds(count);
  work_split::Layout layout(count);
  for (size_t i = 0; i < count; ++i) {
    ds[i] = decode(table + static_cast<int64_t>(i) * rda_col::NUM_FIELDS);
    layout.off[i + 1] = layout.off[i] + ds[i].numel;
    if (ds[i].group && ds[i].row_len > 0) layout.unit[i] = ds[i].row_len;
  }
  const Kernels* k = kByVariant[isa::active()];
  work_split::parallel_for(layout, num_threads, [&](size_t t, int64_t lo, int64_t hi) {
    k->range(ds[t], o, lo, hi);
#ifdef RK_X86
    // non-temporal stores are weakly ordered: the thread that issued them
    // fences them before the region ends
    if (ds[t].stream && ds[t].dtype == 0) _mm_sfence();
#endif
  });
}

}  // namespace regkern
