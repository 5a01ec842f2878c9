// C++ CPU backend of the `rda` kernel family: ISA variants and threading.
//
// Same shape as sgd.cpp: the kernel body (rda_kernel.h) is compiled three
// times, for AVX-512, AVX2 and baseline x86-64, each inside its own
// `#pragma GCC target` region. The variant that runs is the one the sgd
// family runs (regkern::active_isa(): the best the CPU supports, or the one a
// test forced with regkern::set_isa), so both families switch together; the
// 16-bit conversions are the sgd family's (regkern::convert_to_f32 /
// convert_from_f32, public in sgd.h).
//
// Work split: the elements of all tensors are laid end to end and cut into
// one share per thread with equal element counts, each cut snapped to a
// multiple of 64 elements, or to a row boundary in a tensor stepped by rows
// (group shrinkage needs the whole row's norm: a row is stepped by one
// thread). A call is one OpenMP region on torch's OpenMP runtime. Results do
// not depend on the split (row sums run in pieces fixed by the row's start).
#include "rda.h"

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rda_table.h"
#include "sgd.h"

namespace regkern {
namespace rda_detail {

constexpr int64_t kPiece = 512;           // elements per piece (fp32 temporaries fit L1)
constexpr int64_t kAlign = 64;            // thread cuts in element-wise tensors
constexpr int64_t kMinPerThread = 16384;  // below this a thread costs more than it saves
constexpr int64_t kRdaMaskNone = 0, kRdaMaskRow = 1, kRdaMaskElement = 2;

static inline int64_t rk_min(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace rda_detail
}  // namespace regkern

#define RK_AI static inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define RK_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,prefer-vector-width=512")
#define RK_NS isa_avx512f
#define RK_ISA_NAME "avx512f"
#include "rda_kernel.h"
#undef RK_NS
#undef RK_ISA_NAME
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define RK_NS isa_avx2
#define RK_ISA_NAME "avx2"
#include "rda_kernel.h"
#undef RK_NS
#undef RK_ISA_NAME
#pragma GCC pop_options
#endif

#define RK_NS isa_default
#define RK_ISA_NAME "default"
#include "rda_kernel.h"
#undef RK_NS
#undef RK_ISA_NAME

namespace regkern {
namespace rda_detail {
namespace {

// The variant named like the sgd family's active one.
const Kernels* active() {
  const char* name = regkern::active_isa();
#ifdef RK_X86
  if (std::strcmp(name, isa_avx512f::kernels.name) == 0) return &isa_avx512f::kernels;
  if (std::strcmp(name, isa_avx2::kernels.name) == 0) return &isa_avx2::kernels;
#endif
  (void)name;
  return &isa_default::kernels;
}

double as_double(int64_t bits) {
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

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
  // fp32 coefficients, rounded once from the doubles Python computed
  d.t = static_cast<float>(as_double(row[c::T]));
  d.a = static_cast<float>(as_double(row[c::A]));
  d.c = static_cast<float>(as_double(row[c::C]));
  d.tau = static_cast<float>(as_double(row[c::TAU]));
  d.kappa = static_cast<float>(as_double(row[c::KAPPA]));
  return d;
}

// Snap a global element position to a legal cut (see the file comment).
int64_t snap(const std::vector<int64_t>& off, const std::vector<Desc>& ds, int64_t p) {
  const int64_t total = off.back();
  if (p <= 0 || p >= total) return p <= 0 ? 0 : total;
  const size_t t = static_cast<size_t>(std::upper_bound(off.begin(), off.end(), p) - off.begin()) - 1;
  const Desc& d = ds[t];
  int64_t o = p - off[t];
  const int64_t unit = d.group ? d.row_len : kAlign;
  o = (o + unit / 2) / unit * unit;
  return off[t] + rk_min(o, d.numel);
}

// Step global elements [lo, hi) (a share).
void run_share(const Kernels* k, const std::vector<int64_t>& off, const std::vector<Desc>& ds,
               const Opt& o, int64_t lo, int64_t hi) {
  if (lo >= hi) return;
  size_t t = static_cast<size_t>(std::upper_bound(off.begin(), off.end(), lo) - off.begin()) - 1;
  for (; t < ds.size() && off[t] < hi; ++t) {
    const int64_t a = std::max(lo, off[t]) - off[t];
    const int64_t b = rk_min(hi, off[t + 1]) - off[t];
    if (a < b) k->range(ds[t], o, a, b);
  }
}

}  // namespace
}  // namespace rda_detail

int rda_num_fields() { return rda_col::NUM_FIELDS; }

void rda_step(const int64_t* table, int64_t num_tensors, bool maximize, double grad_scale,
              int num_threads) {
  using namespace rda_detail;
  if (num_tensors <= 0) return;
  Opt o;
  o.scale = static_cast<float>(grad_scale);
  o.has_scale = grad_scale != 1.0;
  o.maximize = maximize;

  std::vector<Desc> ds(static_cast<size_t>(num_tensors));
  std::vector<int64_t> off(static_cast<size_t>(num_tensors) + 1, 0);
  for (int64_t i = 0; i < num_tensors; ++i) {
    ds[static_cast<size_t>(i)] = decode(table + i * rda_col::NUM_FIELDS);
    off[static_cast<size_t>(i) + 1] = off[static_cast<size_t>(i)] + ds[static_cast<size_t>(i)].numel;
  }
  const int64_t total = off.back();
  if (total == 0) return;

  const Kernels* k = active();
  int64_t want = num_threads < 1 ? 1 : num_threads;
  want = std::min(want, std::max<int64_t>(1, total / kMinPerThread));
  if (want == 1) {
    run_share(k, off, ds, o, 0, total);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(want))
  {
    const int64_t n = omp_get_num_threads();
    const int64_t i = omp_get_thread_num();
    auto cut = [&](int64_t j) { return (total / n) * j + (total % n) * j / n; };
    run_share(k, off, ds, o, snap(off, ds, cut(i)), snap(off, ds, cut(i + 1)));
  }
}

}  // namespace regkern
