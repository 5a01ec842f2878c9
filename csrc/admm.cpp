// C++ CPU backend of the `admm` kernel family: table checks, decoding, the
// top-k selection, and the calls into the kernel variant that runs.
//
// The kernel body (admm_kernel.h) is compiled once per instruction-set
// variant (common/isa_variants.inc); the one that runs is the process-wide
// choice of common/isa.h, so every family switches together. The work split
// over threads is common/work_split.h: cuts on multiples of 64 elements, or
// on row boundaries in tensors scored by rows (a row's sum belongs to one
// thread). Results do not depend on the split or on the variant.
#include "admm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "admm_table.h"
#include "common/dtype.h"
#include "common/isa.h"
#include "common/work_split.h"
#include "table_check.h"

namespace regkern {
namespace admm_detail {

constexpr int64_t kPiece = 512;  // elements per piece (fp32 temporaries fit L1)
constexpr int kModeElement = 0, kModeRows = 1, kModeSoft = 2;

}  // namespace admm_detail
}  // namespace regkern

#define RK_KERNEL_BODY "admm_kernel.h"
#include "common/isa_variants.inc"

namespace regkern {
namespace admm_detail {
namespace {

const Kernels* const kByVariant[isa::kCount] = RK_VARIANT_KERNELS;

// Refuse (TableError, table_check.h) a zu row the passes do not know how to
// step, before any of them writes: unknown modes and dtype codes, sizes that
// disagree, missing pointers, buffers the row's mode would ignore, and a
// KEEP, CUT or THRESHOLD outside what its mode can mean.
void check_zu_row(const int64_t* row, int64_t index) {
  namespace c = zu_col;
  const table_check::Row r("zu", "regkern.backends.admm.build_zu_table", c::NAMES, row, index);
  r.rows_cover(c::NUMEL, c::ROWS, c::ROW_LEN);
  r.dtype(c::DTYPE);
  r.one_of(c::MODE, {kModeElement, kModeRows, kModeSoft}, "0 top-k elements, 1 top-k rows, 2 soft threshold");
  const bool elements = r[c::NUMEL] > 0;
  for (int col : {c::PARAM, c::Z, c::U}) r.present(col, elements, "a tensor with elements");
  const int64_t mode = r[c::MODE], numel = r[c::NUMEL], rows = r[c::ROWS];
  const double threshold = r.as_double(c::THRESHOLD);
  if (mode == kModeSoft) {
    r.absent(c::SCORES, true, "MODE 2 (soft threshold) scores nothing");
    r.absent(c::ROW_KEEP, true, "MODE 2 (soft threshold) keeps no rows");
    if (!(threshold >= 0.0 && std::isfinite(threshold)))
      r.refuse(c::THRESHOLD, table_check::float_text(threshold),
               "but the soft-threshold level tau must be finite and >= 0");
    return;
  }
  const int64_t count = mode == kModeRows ? rows : numel;
  if (r[c::KEEP] < 0 || r[c::KEEP] > count)
    r.refuse(c::KEEP, "but MODE " + std::to_string(mode) + " keeps between 0 and " + std::to_string(count) +
                          (mode == kModeRows ? " rows" : " elements"));
  if (mode == kModeRows) {
    r.present(c::ROW_KEEP, rows > 0, "MODE 1 (top-k rows)");
    if (r[c::KEEP] > 0 && r[c::KEEP] < rows && r[c::SCORES] == 0)
      r.refuse(c::SCORES, "but selecting " + std::to_string(r[c::KEEP]) + " of " + std::to_string(rows) +
                              " rows needs it");
    return;
  }
  r.absent(c::ROW_KEEP, true, "MODE 0 (top-k elements) keeps no rows");
  if (std::isnan(threshold)) r.refuse(c::THRESHOLD, "nan", "but a selection threshold cannot be NaN");
  if (r[c::CUT] < -1 || r[c::CUT] > numel)
    r.refuse(c::CUT, "but a tie cut lies between -1 and NUMEL = " + std::to_string(numel));
}

// Refuse a sas row the step does not know how to take, before it writes.
void check_sas_row(const int64_t* row, int64_t index) {
  namespace c = sas_col;
  const table_check::Row r("sas", "regkern.backends.admm.build_sas_table", c::NAMES, row, index);
  r.non_negative(c::NUMEL);
  r.dtype(c::DTYPE);
  r.flag(c::OUTER);
  for (int col : {c::PARAM, c::GRAD, c::W, c::W_BREVE, c::ANCHOR, c::Z, c::U})
    r.present(col, r[c::NUMEL] > 0, "a tensor with elements");
}

void check_zu_table(const int64_t* table, int64_t num_tensors) {
  for (int64_t i = 0; i < num_tensors; ++i) check_zu_row(table + i * zu_col::NUM_FIELDS, i);
}

ZuDesc decode_zu(const int64_t* row) {
  namespace c = zu_col;
  ZuDesc d;
  d.w = reinterpret_cast<const void*>(row[c::PARAM]);
  d.z = reinterpret_cast<float*>(row[c::Z]);
  d.u = reinterpret_cast<float*>(row[c::U]);
  d.target = reinterpret_cast<void*>(row[c::TARGET]);
  d.numel = row[c::NUMEL];
  d.rows = row[c::ROWS];
  d.row_len = row[c::ROW_LEN];
  d.dtype = static_cast<int>(row[c::DTYPE]);
  d.mode = static_cast<int>(row[c::MODE]);
  d.scores = reinterpret_cast<void*>(row[c::SCORES]);
  d.row_keep = reinterpret_cast<const uint8_t*>(row[c::ROW_KEEP]);
  d.threshold = float_column_f32(row[c::THRESHOLD]);
  d.cut = row[c::CUT];
  return d;
}

SasDesc decode_sas(const int64_t* row) {
  namespace c = sas_col;
  SasDesc d;
  d.p = reinterpret_cast<void*>(row[c::PARAM]);
  d.g = reinterpret_cast<const void*>(row[c::GRAD]);
  d.w = reinterpret_cast<float*>(row[c::W]);
  d.wb = reinterpret_cast<float*>(row[c::W_BREVE]);
  d.anchor = reinterpret_cast<float*>(row[c::ANCHOR]);
  d.z = reinterpret_cast<float*>(row[c::Z]);
  d.u = reinterpret_cast<float*>(row[c::U]);
  d.numel = row[c::NUMEL];
  d.dtype = static_cast<int>(row[c::DTYPE]);
  d.outer = row[c::OUTER] != 0;
  d.c = float_column_f32(row[c::C]);
  d.inv_cr = float_column_f32(row[c::INV_CR]);
  d.b = float_column_f32(row[c::B]);
  d.b1 = float_column_f32(row[c::B1]);
  d.bn = float_column_f32(row[c::BN]);
  d.bn1 = float_column_f32(row[c::BN1]);
  d.rb = float_column_f32(row[c::RB]);
  d.inv_beta = float_column_f32(row[c::INV_BETA]);
  d.tau = float_column_f32(row[c::TAU]);
  d.sb = float_column_f32(row[c::SB]);
  d.beta = float_column_f32(row[c::BETA]);
  d.rho = float_column_f32(row[c::RHO]);
  return d;
}

// The zu tensors a pass steps (the score pass only those with a SCORES buffer),
// laid end to end; rows stay whole where they are scored.
void run_zu(const int64_t* table, int64_t num_tensors, int num_threads, bool scoring) {
  std::vector<ZuDesc> ds;
  ds.reserve(static_cast<size_t>(num_tensors));
  for (int64_t i = 0; i < num_tensors; ++i) {
    ZuDesc d = decode_zu(table + i * zu_col::NUM_FIELDS);
    if (!scoring || (d.mode != kModeSoft && d.scores != nullptr)) ds.push_back(d);
  }
  work_split::Layout layout(ds.size());
  for (size_t t = 0; t < ds.size(); ++t) {
    layout.off[t + 1] = layout.off[t] + ds[t].numel;
    if (scoring && ds[t].mode == kModeRows) layout.unit[t] = ds[t].row_len > 0 ? ds[t].row_len : 1;
  }
  const Kernels* k = kByVariant[isa::active()];
  if (scoring) {
    work_split::parallel_for(layout, num_threads, [&](size_t t, int64_t lo, int64_t hi) { k->scores(ds[t], lo, hi); });
  } else {
    work_split::parallel_for(layout, num_threads, [&](size_t t, int64_t lo, int64_t hi) { k->zu(ds[t], lo, hi); });
  }
}

// The keep largest scores |W + U| of a tensor (0 < keep < numel), ties by
// lowest index, as (threshold, cut): kept are the scores above the threshold
// and those equal to it at indices <= cut. Radix select on the scores' bits
// (non-negative floats: the bits order like the values), computed per piece
// by the kernels: a histogram of bits 31..21 over all of them, the
// threshold's bin copied out in a second pass, then bits 20..10 and 9..0 on
// the copy. Count is uint32_t below 2^32 elements (histograms that fit L1).
template <typename Count>
void select_elements(const Kernels* k, const ZuDesc& d, int64_t keep, float* threshold, int64_t* cut) {
  constexpr int kBins = 2048;
  const int64_t n = d.numel;
  alignas(64) uint32_t key[kPiece];
  // four interleaved histograms: neighbours often share a bin, and one
  // histogram would serialize their increments
  std::vector<Count> hist(4 * kBins, 0);
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
    const int64_t m = rk_min(kPiece, n - i0);
    k->keys(d, i0, m, key);
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      ++hist[key[j] >> 21];
      ++hist[kBins + (key[j + 1] >> 21)];
      ++hist[2 * kBins + (key[j + 2] >> 21)];
      ++hist[3 * kBins + (key[j + 3] >> 21)];
    }
    for (; j < m; ++j) ++hist[key[j] >> 21];
  }
  for (int b = 0; b < kBins; ++b) hist[b] += hist[kBins + b] + hist[2 * kBins + b] + hist[3 * kBins + b];
  int64_t need = keep;  // kept entries still to place, counting from the top
  int b1 = kBins - 1;
  while (static_cast<int64_t>(hist[b1]) < need) need -= static_cast<int64_t>(hist[b1--]);
  std::vector<uint32_t> bin(static_cast<size_t>(hist[b1]) + 1);
  size_t found = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
    const int64_t m = rk_min(kPiece, n - i0);
    k->keys(d, i0, m, key);
    for (int64_t j = 0; j < m; ++j) {  // branch-free copy of bin b1 (one slot of slack)
      bin[found] = key[j];
      found += (key[j] >> 21) == static_cast<uint32_t>(b1);
    }
  }
  bin.resize(found);
  std::fill(hist.begin(), hist.begin() + kBins, Count(0));
  for (const uint32_t x : bin) ++hist[(x >> 10) & 0x7FF];
  int b2 = kBins - 1;
  while (static_cast<int64_t>(hist[b2]) < need) need -= static_cast<int64_t>(hist[b2--]);
  std::fill(hist.begin(), hist.begin() + 1024, Count(0));
  for (const uint32_t x : bin)
    if (((x >> 10) & 0x7FF) == static_cast<uint32_t>(b2)) ++hist[x & 0x3FF];
  int b3 = 1023;
  while (static_cast<int64_t>(hist[b3]) < need) need -= static_cast<int64_t>(hist[b3--]);
  const uint32_t at = (static_cast<uint32_t>(b1) << 21) | (static_cast<uint32_t>(b2) << 10) | static_cast<uint32_t>(b3);
  std::memcpy(threshold, &at, sizeof at);
  *cut = n - 1;
  if (need == static_cast<int64_t>(hist[b3])) return;  // every score equal to the threshold is kept
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {  // ties straddle the cut: the need-th tie in index order
    const int64_t m = rk_min(kPiece, n - i0);
    k->keys(d, i0, m, key);
    for (int64_t j = 0; j < m; ++j) {
      if (key[j] == at && --need == 0) {
        *cut = i0 + j;
        return;
      }
    }
  }
}

// flags[r] = 1 for the keep rows of largest score (float64, no NaN), ties by lowest row.
void select_rows(const double* scores, int64_t rows, int64_t keep, uint8_t* flags) {
  std::vector<int64_t> order(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) order[static_cast<size_t>(r)] = r;
  std::nth_element(order.begin(), order.begin() + keep, order.end(), [scores](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  std::memset(flags, 0, static_cast<size_t>(rows));
  for (int64_t j = 0; j < keep; ++j) flags[order[static_cast<size_t>(j)]] = 1;
}

}  // namespace
}  // namespace admm_detail

void admm_select(int64_t* table, int64_t num_tensors, int num_threads) {
  using namespace admm_detail;
  namespace c = zu_col;
  check_zu_table(table, num_tensors);  // before anything is written
  std::vector<int64_t> work;  // table rows to select, largest first
  for (int64_t i = 0; i < num_tensors; ++i) {
    const int64_t* row = table + i * c::NUM_FIELDS;
    const bool element = row[c::MODE] == kModeElement && row[c::KEEP] > 0 && row[c::KEEP] < row[c::NUMEL];
    const bool rows = row[c::MODE] == kModeRows && row[c::SCORES] != 0;
    if (element || rows) work.push_back(i);
  }
  std::sort(work.begin(), work.end(), [table](int64_t a, int64_t b) {
    return table[a * c::NUM_FIELDS + c::NUMEL] > table[b * c::NUM_FIELDS + c::NUMEL];
  });
  const Kernels* k = kByVariant[isa::active()];
  const int64_t count = static_cast<int64_t>(work.size());
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, count)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t j = 0; j < count; ++j) {
    int64_t* row = table + work[static_cast<size_t>(j)] * c::NUM_FIELDS;
    const ZuDesc d = decode_zu(row);
    if (d.mode == kModeElement) {
      float threshold = 0.0f;
      int64_t cut = -1;
      if (d.numel < (int64_t{1} << 32)) {
        select_elements<uint32_t>(k, d, row[c::KEEP], &threshold, &cut);
      } else {
        select_elements<int64_t>(k, d, row[c::KEEP], &threshold, &cut);
      }
      const double wide = threshold;
      std::memcpy(&row[c::THRESHOLD], &wide, sizeof wide);
      row[c::CUT] = cut;
    } else {
      select_rows(static_cast<const double*>(d.scores), d.rows, row[c::KEEP], const_cast<uint8_t*>(d.row_keep));
    }
  }
}


void admm_check_zu_table(const int64_t* table, int64_t num_tensors) {
  admm_detail::check_zu_table(table, num_tensors);
}

void admm_check_sas_table(const int64_t* table, int64_t num_tensors) {
  for (int64_t i = 0; i < num_tensors; ++i) admm_detail::check_sas_row(table + i * sas_col::NUM_FIELDS, i);
}

void admm_scores(const int64_t* table, int64_t num_tensors, int num_threads) {
  admm_detail::check_zu_table(table, num_tensors);  // before anything is written
  if (num_tensors > 0) admm_detail::run_zu(table, num_tensors, num_threads, true);
}

void admm_zu(const int64_t* table, int64_t num_tensors, int num_threads) {
  admm_detail::check_zu_table(table, num_tensors);  // before anything is written
  if (num_tensors > 0) admm_detail::run_zu(table, num_tensors, num_threads, false);
}

void sas_admm_step(const int64_t* table, int64_t num_tensors, int num_threads) {
  using namespace admm_detail;
  if (num_tensors <= 0) return;
  admm_check_sas_table(table, num_tensors);  // before anything is written
  std::vector<SasDesc> ds(static_cast<size_t>(num_tensors));
  work_split::Layout layout(ds.size());
  for (size_t t = 0; t < ds.size(); ++t) {
    ds[t] = decode_sas(table + static_cast<int64_t>(t) * sas_col::NUM_FIELDS);
    layout.off[t + 1] = layout.off[t] + ds[t].numel;
  }
  const Kernels* k = kByVariant[isa::active()];
  work_split::parallel_for(layout, num_threads, [&](size_t t, int64_t lo, int64_t hi) { k->sas(ds[t], lo, hi); });
}

}  // namespace regkern
