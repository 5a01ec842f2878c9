// C++ CPU backend of the `sgd` kernel family: table checks, decoding and
// the call into the kernel variant that runs.
//
// The kernel body (sgd_kernel.h) is compiled once per instruction-set variant
// (common/isa_variants.inc); the one that runs is the process-wide choice of
// common/isa.h, shared with the other families.
//
// Work split (common/work_split.h): the elements of all tensors are laid end
// to end and cut into one share per thread, each cut snapped to a multiple of
// 64 elements, or to a row boundary when the tensor writes row norms or takes
// the group-lasso prox (a row is then stepped by one thread; a row longer
// than a share simply makes that share longer). Results do not depend on the
// split: row norms (and group-lasso row norms) are summed in blocks whose
// boundaries are fixed per tensor (common/term_math.h).
#include "sgd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/isa.h"
#include "common/work_split.h"
#include "sgd_table.h"
#include "table_check.h"

// The piece temporaries of fused16 are filled by loops GCC cannot bound.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define RK_KERNEL_BODY "sgd_kernel.h"
#include "common/isa_variants.inc"

namespace regkern {
namespace detail {
namespace {

const IsaKernels* const kByVariant[isa::kCount] = RK_VARIANT_KERNELS;

struct ScratchHolder {
  TermScratch* p = nullptr;
  ~ScratchHolder() { delete p; }
};

}  // namespace

TermScratch* term_scratch() {
  static thread_local ScratchHolder holder;
  if (holder.p == nullptr) holder.p = new TermScratch;
  return holder.p;
}

namespace {

// Refuse (TableError, table_check.h) a row the kernel does not know how to
// step, before anything is written: unknown kinds, flags and dtype codes,
// sizes that disagree, pointers its kinds need but lack, clamp bounds that
// are NaN or crossed, and non-finite per-row coefficients (LAM per row,
// LAM_COLS, L1, PROX_LAM, POLAR's lam and t; the per-element LAM is W-sized
// and not read here). Only per-row vectors of tensors with elements are read.
void check_row(const int64_t* row, int64_t index, bool momentum) {
  check_sgd_columns(table_check::Row("sgd", "regkern.backends.sgd.build_sgd_table", sgd_col::NAMES, row, index),
                    momentum);
}

// A row that check_row accepted.
TensorDesc decode(const int64_t* row) { return decode_sgd_columns(row); }

}  // namespace

void check_sgd_columns(const table_check::Row& r, bool momentum) {
  namespace c = sgd_col;
  r.rows_cover(c::NUMEL, c::ROWS, c::ROW_LEN);
  r.dtype(c::DTYPE);
  r.flag(c::FIRST);
  r.one_of(c::MASK_KIND, {kMaskNone, kMaskRow, kMaskElement}, "0 none, 1 row mask, 2 element mask");
  r.one_of(c::LAM_KIND, {kLamNone, kLamRow, kLamElement}, "0 none, 1 per row, 2 per element");
  r.one_of(c::PROX, {0, 1, 2}, "0 none, 1 element L1, 2 group lasso");
  r.flag(c::CLAMP);
  r.non_negative(c::COLS);
  r.non_negative(c::COL_LEN);
  const bool elements = r[c::NUMEL] > 0;
  r.present(c::PARAM, elements, "a tensor with elements");
  r.present(c::GRAD, elements, "a tensor with elements");
  r.present(c::BUF, elements && momentum, "a step with momentum");
  r.absent(c::MASK, r[c::MASK_KIND] == kMaskNone, "MASK_KIND is 0 (none)");
  r.present_for(c::MASK, elements && r[c::MASK_KIND] != kMaskNone, c::MASK_KIND);
  r.absent(c::LAM, r[c::LAM_KIND] == kLamNone, "LAM_KIND is 0 (none)");
  r.present_for(c::LAM, elements && r[c::LAM_KIND] != kLamNone, c::LAM_KIND);
  r.present_for(c::PROX_LAM, elements && r[c::PROX] != 0, c::PROX);
  if (r[c::CLAMP] != 0) {
    const double lo = r.as_double(c::CLAMP_LO), hi = r.as_double(c::CLAMP_HI);
    if (std::isnan(lo)) r.refuse(c::CLAMP_LO, "nan", "but a clamp bound cannot be NaN");
    if (std::isnan(hi)) r.refuse(c::CLAMP_HI, "nan", "but a clamp bound cannot be NaN");
    if (lo > hi)
      r.refuse(c::CLAMP_LO, table_check::float_text(lo),
               "above CLAMP_HI = " + table_check::float_text(hi) + ", so the clamp interval is empty",
               "give the lower bound first");
  }
  // LAM_COLS (fp32 [COLS]) splits each row into COLS columns of COL_LEN elements
  if (r[c::COLS] == 0) {
    if (r[c::COL_LEN] != 0) r.refuse(c::COL_LEN, "but COLS is 0 (no column lambdas)");
    r.absent(c::LAM_COLS, true, "COLS is 0 (no columns)");
  } else if (elements || r[c::COL_LEN] != 0) {
    const int64_t len = r[c::ROW_LEN], cols = r[c::COLS];
    if (r[c::COL_LEN] == 0 || len % cols != 0 || len / cols != r[c::COL_LEN])
      r.refuse(c::COL_LEN, "but ROW_LEN / COLS is " + std::to_string(len) + " / " + std::to_string(cols));
    r.present_for(c::LAM_COLS, elements, c::COLS);
  }
  if (!elements) return;
  // per-row coefficient vectors: finite (a few floats per tensor)
  if (r[c::LAM_KIND] == kLamRow) r.finite(c::LAM, reinterpret_cast<const float*>(r[c::LAM]), r[c::ROWS]);
  if (r[c::LAM_COLS] != 0) r.finite(c::LAM_COLS, reinterpret_cast<const float*>(r[c::LAM_COLS]), r[c::COLS]);
  if (r[c::L1] != 0) r.finite(c::L1, reinterpret_cast<const float*>(r[c::L1]), r[c::ROWS]);
  if (r[c::PROX] != 0) r.finite(c::PROX_LAM, reinterpret_cast<const float*>(r[c::PROX_LAM]), r[c::ROWS]);
  if (r[c::POLAR] != 0) r.finite(c::POLAR, reinterpret_cast<const float*>(r[c::POLAR]), 2);  // lam, t
}

TensorDesc decode_sgd_columns(const int64_t* row) {
  namespace c = sgd_col;
  TensorDesc t;
  t.w = reinterpret_cast<void*>(row[c::PARAM]);
  t.g = reinterpret_cast<const void*>(row[c::GRAD]);
  t.buf = reinterpret_cast<void*>(row[c::BUF]);
  t.lam = reinterpret_cast<const float*>(row[c::LAM]);
  t.mask = reinterpret_cast<const uint8_t*>(row[c::MASK]);
  t.mask_kind = static_cast<int>(row[c::MASK_KIND]);
  t.norms = reinterpret_cast<float*>(row[c::NORMS]);
  t.numel = row[c::NUMEL];
  t.rows = row[c::ROWS];
  t.row_len = row[c::ROW_LEN];
  t.dtype = static_cast<int>(row[c::DTYPE]);
  t.first = row[c::FIRST] != 0;
  if (t.mask_kind == kMaskNone) t.mask = nullptr;
  t.lam_kind = t.lam != nullptr ? static_cast<int>(row[c::LAM_KIND]) : 0;
  t.cols = row[c::COLS];
  t.col_len = row[c::COL_LEN];
  t.lam_cols = t.cols > 0 && t.col_len > 0 ? reinterpret_cast<const float*>(row[c::LAM_COLS]) : nullptr;
  t.l1 = reinterpret_cast<const float*>(row[c::L1]);
  t.polar = reinterpret_cast<const float*>(row[c::POLAR]);
  t.target = reinterpret_cast<const void*>(row[c::ADMM_TARGET]);
  t.prox_lam = reinterpret_cast<const float*>(row[c::PROX_LAM]);
  t.prox = t.prox_lam != nullptr ? static_cast<int>(row[c::PROX]) : 0;
  t.clamp = row[c::CLAMP] != 0;
  // float64 bits; rounded to fp32 like torch rounds a Python float that
  // multiplies (rho) or clamps (lo, hi) an fp32 tensor
  t.rho = float_column_f32(row[c::ADMM_RHO]);
  t.clamp_lo = float_column_f32(row[c::CLAMP_LO]);
  t.clamp_hi = float_column_f32(row[c::CLAMP_HI]);
  t.terms = t.l1 != nullptr || t.polar != nullptr || t.target != nullptr || t.prox != 0 || t.clamp ||
            t.lam_cols != nullptr;
  t.row_cuts = t.norms != nullptr || t.prox == 2;
  return t;
}

}  // namespace detail

void sgd_check_table(const int64_t* table, int64_t num_tensors, double momentum) {
  for (int64_t i = 0; i < num_tensors; ++i) detail::check_row(table + i * sgd_col::NUM_FIELDS, i, momentum != 0.0);
}

void sgd_step(const int64_t* table, int64_t num_tensors, double lr, double momentum,
              double dampening, bool nesterov, double weight_decay, bool maximize,
              double grad_scale, int num_threads) {
  using namespace detail;
  if (num_tensors <= 0) return;
  Hyper h;
  h.lr = static_cast<float>(lr);
  h.mu = static_cast<float>(momentum);
  h.damp1 = static_cast<float>(1.0 - dampening);
  h.wd = static_cast<float>(weight_decay);
  h.scale = static_cast<float>(grad_scale);
  h.nesterov = nesterov;
  h.maximize = maximize;
  h.has_scale = grad_scale != 1.0;
  h.has_wd = weight_decay != 0.0;
  h.has_momentum = momentum != 0.0;

  sgd_check_table(table, num_tensors, momentum);  // before anything is written
  const size_t count = static_cast<size_t>(num_tensors);
  std::vector<TensorDesc> ts(count);
  work_split::Layout layout(count);
  for (size_t i = 0; i < count; ++i) {
    TensorDesc& t = ts[i];
    t = decode(table + static_cast<int64_t>(i) * sgd_col::NUM_FIELDS);
    layout.off[i + 1] = layout.off[i] + t.numel;
    if (t.row_cuts && t.row_len > 0) layout.unit[i] = t.row_len;
    if (t.numel == 0 && t.norms != nullptr) {
      // rows of zero elements: L1 = L2 = mean = 0, like the reference
      std::memset(t.norms, 0, static_cast<size_t>(t.rows) * 3 * sizeof(float));
    }
  }
  const IsaKernels* k = kByVariant[isa::active()];
  work_split::parallel_for(layout, num_threads, [&](size_t t, int64_t lo, int64_t hi) { k->range(ts[t], h, lo, hi); });
}

}  // namespace regkern
