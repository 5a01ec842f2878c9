// C++ CPU backend of the `sgd` kernel family: ISA dispatch and threading.
//
// The kernel body (sgd_kernel.h) is compiled three times, for AVX-512, AVX2
// and baseline x86-64, each inside its own `#pragma GCC target` region (the
// explicit equivalent of target_clones: it also lets the tests force a
// variant). The best variant the CPU supports is picked once, at load time.
//
// Work split: the elements of all tensors are laid end to end and cut into
// one share per thread with equal element counts (a share may cover many
// small tensors and parts of big ones), each cut snapped to a multiple of 64
// elements, or to a row boundary when the tensor writes row norms or takes
// the group-lasso prox (a row is then stepped by one thread; a row longer
// than a share simply makes that share longer). Many small tensors thus cost
// about as much per element as one big one, and a call is one OpenMP region.
// Results do not depend on the split: row norms (and group-lasso row norms)
// are summed in blocks whose boundaries are fixed per tensor (sgd_kernel.h).
#include "sgd.h"

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "sgd_table.h"
#include "table_check.h"

namespace regkern {
namespace detail {

constexpr int64_t kBlock = 1024;          // elements per inner block (fits L1)
constexpr int64_t kPiece16 = 128;         // elements per piece: bf16/fp16 conversions, two-pass terms
constexpr int64_t kShortRow = 16;         // rows shorter than this: scalar norm sums
constexpr int64_t kLongRow = 64;          // rows this long: per-row values passed per row piece
constexpr int64_t kAlign = 64;            // thread cuts in tensors without norms
constexpr int64_t kMinPerThread = 16384;  // below this a thread costs more than it saves
// Group lasso (PROX 2) needs a whole updated row before it can scale it. Rows
// up to kRowBuf elements are updated into a per-thread fp32 buffer (fp32
// storage: into W itself, still in cache), reduced, scaled, then stored once;
// short rows are taken kChunk elements' worth at a time. Longer rows take a
// second pass over memory (sgd_kernel.h, TermsStep::run).
constexpr int64_t kRowBuf = 65536;
constexpr int64_t kChunk = 4096;

static inline int64_t rk_min(int64_t a, int64_t b) { return a < b ? a : b; }

// Read-only stand-ins for absent per-element streams of the general path.
alignas(64) static const float kZeros[kBlock] = {};
alignas(64) static const uint8_t kZeroBytes[kBlock] = {};

// Per-thread work space of the general path (TermsStep), allocated on a
// thread's first use of it (~330 KB) and kept for the thread's lifetime.
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
};

TermScratch* term_scratch();

}  // namespace detail
}  // namespace regkern

#define RK_AI static inline __attribute__((always_inline))

// The piece temporaries of fused16 are filled by loops GCC cannot bound.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__x86_64__) || defined(__i386__)
#define RK_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,prefer-vector-width=512")
#define RK_NS isa_avx512f
#define RK_ISA_NAME "avx512f"
#define RK_F16C 2
#define RK_VEC_LANES 16
#include "sgd_kernel.h"
#undef RK_NS
#undef RK_ISA_NAME
#undef RK_F16C
#undef RK_VEC_LANES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define RK_NS isa_avx2
#define RK_ISA_NAME "avx2"
#define RK_F16C 1
#define RK_VEC_LANES 8
#include "sgd_kernel.h"
#undef RK_NS
#undef RK_ISA_NAME
#undef RK_F16C
#undef RK_VEC_LANES
#pragma GCC pop_options
#endif

#define RK_NS isa_default
#define RK_ISA_NAME "default"
#define RK_F16C 0
#define RK_VEC_LANES 4
#include "sgd_kernel.h"
#undef RK_NS
#undef RK_ISA_NAME
#undef RK_F16C
#undef RK_VEC_LANES

namespace regkern {
namespace detail {
namespace {

struct Variant {
  const IsaKernels* kernels;
  bool supported;
};

// Best first.
Variant* variants() {
#ifdef RK_X86
  static Variant table[3] = {
      {&isa_avx512f::kernels, false}, {&isa_avx2::kernels, false}, {&isa_default::kernels, true}};
  static bool probed = [] {
    __builtin_cpu_init();
    table[0].supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("f16c");
    table[1].supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return true;
  }();
#else
  static Variant table[3] = {
      {&isa_default::kernels, true}, {&isa_default::kernels, false}, {&isa_default::kernels, false}};
  static bool probed = true;
#endif
  (void)probed;
  return table;
}

const IsaKernels* best_variant() {
  for (int i = 0; i < 3; ++i)
    if (variants()[i].supported) return variants()[i].kernels;
  return &isa_default::kernels;
}

std::atomic<const IsaKernels*> g_active{best_variant()};

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
  namespace c = sgd_col;
  const table_check::Row r("sgd", "regkern.backend.build_sgd_table", c::NAMES, row, index);
  r.rows_cover(c::NUMEL, c::ROWS, c::ROW_LEN);
  r.one_of(c::DTYPE, {kDtypeF32, kDtypeBF16, kDtypeF16}, "0 float32, 1 bfloat16, 2 float16");
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

// A row that check_row accepted.
TensorDesc decode(const int64_t* row) {
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
  t.rho = static_cast<float>(float_column(row[c::ADMM_RHO]));
  t.clamp_lo = static_cast<float>(float_column(row[c::CLAMP_LO]));
  t.clamp_hi = static_cast<float>(float_column(row[c::CLAMP_HI]));
  t.terms = t.l1 != nullptr || t.polar != nullptr || t.target != nullptr || t.prox != 0 || t.clamp ||
            t.lam_cols != nullptr;
  t.row_cuts = t.norms != nullptr || t.prox == 2;
  return t;
}

// Snap a global element position to a legal cut (see the file comment).
int64_t snap(const std::vector<int64_t>& off, const std::vector<TensorDesc>& ts, int64_t p) {
  const int64_t total = off.back();
  if (p <= 0 || p >= total) return p <= 0 ? 0 : total;
  // tensor t with off[t] <= p < off[t + 1] (empty tensors are skipped)
  const size_t t = static_cast<size_t>(std::upper_bound(off.begin(), off.end(), p) - off.begin()) - 1;
  const TensorDesc& d = ts[t];
  int64_t o = p - off[t];
  if (d.row_cuts) {
    o = (o + d.row_len / 2) / d.row_len * d.row_len;
  } else {
    o = (o + kAlign / 2) / kAlign * kAlign;
  }
  return off[t] + rk_min(o, d.numel);
}

// Step global elements [lo, hi) (a share).
void run_share(const IsaKernels* k, const std::vector<int64_t>& off,
               const std::vector<TensorDesc>& ts, const Hyper& h, int64_t lo, int64_t hi) {
  if (lo >= hi) return;
  size_t t = static_cast<size_t>(std::upper_bound(off.begin(), off.end(), lo) - off.begin()) - 1;
  for (; t < ts.size() && off[t] < hi; ++t) {
    const int64_t a = std::max(lo, off[t]) - off[t];
    const int64_t b = rk_min(hi, off[t + 1]) - off[t];
    if (a < b) k->range(ts[t], h, a, b);
  }
}

}  // namespace
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
  std::vector<TensorDesc> ts(static_cast<size_t>(num_tensors));
  std::vector<int64_t> off(static_cast<size_t>(num_tensors) + 1, 0);
  for (int64_t i = 0; i < num_tensors; ++i) {
    TensorDesc& t = ts[static_cast<size_t>(i)];
    t = decode(table + i * sgd_col::NUM_FIELDS);
    off[static_cast<size_t>(i) + 1] = off[static_cast<size_t>(i)] + t.numel;
    if (t.numel == 0 && t.norms != nullptr) {
      // rows of zero elements: L1 = L2 = mean = 0, like the reference
      std::memset(t.norms, 0, static_cast<size_t>(t.rows) * 3 * sizeof(float));
    }
  }
  const int64_t total = off.back();
  if (total == 0) return;

  const IsaKernels* k = g_active.load(std::memory_order_relaxed);
  int64_t want = num_threads < 1 ? 1 : num_threads;
  want = std::min(want, std::max<int64_t>(1, total / kMinPerThread));
  if (want == 1) {
    run_share(k, off, ts, h, 0, total);
    return;
  }
  // One contiguous share per thread (each thread streams its own region, like
  // at::parallel_for; measured faster than handing out small units).
#pragma omp parallel num_threads(static_cast<int>(want))
  {
    const int64_t n = omp_get_num_threads();
    const int64_t i = omp_get_thread_num();
    // cut j of n: floor(total * j / n) without overflow
    auto cut = [&](int64_t j) { return (total / n) * j + (total % n) * j / n; };
    run_share(k, off, ts, h, snap(off, ts, cut(i)), snap(off, ts, cut(i + 1)));
  }
}

const char* active_isa() { return detail::g_active.load()->name; }

int available_isas(const char** names, int capacity) {
  int count = 0;
  for (int i = 0; i < 3; ++i)
    if (detail::variants()[i].supported && count < capacity) names[count++] = detail::variants()[i].kernels->name;
  return count;
}

bool set_isa(const char* name) {
  for (int i = 0; i < 3; ++i) {
    const detail::Variant& v = detail::variants()[i];
    if (v.supported && std::strcmp(v.kernels->name, name) == 0) {
      detail::g_active.store(v.kernels);
      return true;
    }
  }
  return false;
}

void convert_to_f32(int dtype, const uint16_t* src, float* dst, int64_t n) {
  detail::g_active.load()->to_f32(dtype, src, dst, n);
}

void convert_from_f32(int dtype, const float* src, uint16_t* dst, int64_t n) {
  detail::g_active.load()->from_f32(dtype, src, dst, n);
}

}  // namespace regkern
