// Term math shared by the kernel families that step regularizer terms
// (sgd_kernel.h, adam_kernel.h), for ONE instruction-set variant.
//
// No include guard on purpose: a family's kernel body includes this file at
// its top, and the body is compiled once per variant through
// common/isa_variants.inc (RK_NS, RK_LANES set; the storage conversions of
// common/dtype_kernel.h already compiled in). Everything here is therefore
// compiled for that ISA. It holds the element helpers (select, sign, soft
// threshold, clamp), the row norms, the per-row / per-column stream
// expansions, the per-tensor constants both families fill alike (terms_of,
// d_terms_of), the regularizer gradient terms of reference.sgd.add_terms
// (add_terms_at), the group-lasso finish, the coefficient streams of a
// piece (Streams: per element, or one value per row piece), and TermRunner:
// the block / row / group-lasso machinery of the general path, which a
// family's step object (CRTP) completes with its own update rule (`compute`).
//
// Needs (non-variant, the family's .cpp includes them first): TensorDesc,
// TermScratch, term_scratch(), kBlock and the other sizes (sgd.h).

namespace regkern {
namespace detail {
namespace RK_NS {

using namespace ::regkern::dtype::RK_NS;  // storage conversions (common/dtype_kernel.h)

// One element of a stream stored as fp32 (T float) or bf16 (T uint16_t) as
// fp32, and back (rounded once): the one-loop bf16 kernels read and write the
// storage itself, converting inline (no widened temporaries).
template <typename T>
RK_AI float ld_f32(const T* __restrict p, int64_t j) {
  if constexpr (sizeof(T) == 4) return p[j];
  else return bf16_to_f32(p[j]);
}

template <typename T>
RK_AI void st_f32(T* __restrict p, int64_t j, float v) {
  if constexpr (sizeof(T) == 4) p[j] = v;
  else p[j] = f32_to_bf16(v);
}

// m ? a : b for a mask m of all ones or all zeros
RK_AI float select(uint32_t m, float a, float b) {
  return f32_from_bits((bits_of(a) & m) | (bits_of(b) & ~m));
}

// ---------------------------------------------------------------------------
// Row norms.

#include "common/lane_sums.h"  // abs_sums, sq_sums: row norms in fixed lanes

// Accumulate the norms of the rows met by the stored block x[0, n) = W[i0,
// i0 + n) (as fp32). Rows may span blocks: (acc1, acc2) carry the current
// row's partial sums, and a row's norms are written with its last element.
RK_AI void norms_f32(const float* __restrict x, int64_t i0, int64_t n, const TensorDesc& t,
                     double& acc1, double& acc2) {
  const int64_t len_row = t.row_len;
  float* __restrict out = t.norms;
  int64_t r = i0 / len_row, o = i0 - r * len_row, j = 0;
  if (len_row == 1) {
    for (int64_t k = 0; k < n; ++k) {
      const float v = __builtin_fabsf(x[k]);
      out[3 * (r + k) + 0] = v;
      out[3 * (r + k) + 1] = __builtin_sqrtf(v * v);
      out[3 * (r + k) + 2] = v;
    }
    return;
  }
  if (len_row < kShortRow) {
    // Short rows: sequential fp32 sums, row after row (independent rows, so
    // the CPU overlaps them). A row cut by the block edge carries over.
    float s1 = static_cast<float>(acc1), s2 = static_cast<float>(acc2);
    while (j < n) {
      const int64_t len = rk_min(len_row - o, n - j);
      for (int64_t k = 0; k < len; ++k) {
        const float v = __builtin_fabsf(x[j + k]);
        s1 += v;
        s2 += v * v;
      }
      j += len;
      o += len;
      if (o == len_row) {
        out[3 * r + 0] = s1;
        out[3 * r + 1] = __builtin_sqrtf(s2);
        out[3 * r + 2] = s1 / static_cast<float>(len_row);
        s1 = s2 = 0.0f;
        ++r;
        o = 0;
      }
    }
    acc1 = s1;
    acc2 = s2;
    return;
  }
  // Longer rows: 16-lane fp32 sums per block piece, added up in fp64.
  while (j < n) {
    const int64_t len = rk_min(len_row - o, n - j);
    float s1, s2;
    abs_sums(x + j, len, s1, s2);
    acc1 += s1;
    acc2 += s2;
    j += len;
    o += len;
    if (o == len_row) {
      out[3 * r + 0] = static_cast<float>(acc1);
      out[3 * r + 1] = static_cast<float>(__builtin_sqrt(acc2));
      out[3 * r + 2] = static_cast<float>(acc1 / static_cast<double>(len_row));
      acc1 = acc2 = 0.0;
      ++r;
      o = 0;
    }
  }
}

template <int DT>
RK_AI void norms_block(const typename Storage<DT>::type* __restrict w, int64_t i0, int64_t n,
                       const TensorDesc& t, double& acc1, double& acc2) {
  if constexpr (DT == 0) {
    norms_f32(w, i0, n, t, acc1, acc2);
  } else {
    alignas(64) float x[kBlock];
    widen_n<DT>(w, x, n);
    norms_f32(x, i0, n, t, acc1, acc2);
  }
}

// out[j] = per_row[row of element i0 + j], j < n
template <typename V>
RK_AI void expand_rows(const V* __restrict per_row, int64_t len_row, int64_t i0, int64_t n,
                       V* __restrict out) {
  int64_t r = i0 / len_row, o = i0 - r * len_row, j = 0;
  while (j < n) {
    const int64_t len = rk_min(len_row - o, n - j);
    const V v = per_row[r];
    for (int64_t k = 0; k < len; ++k) out[j + k] = v;
    j += len;
    o = 0;
    ++r;
  }
}

// out[j] = lr * per_row[row of element i0 + j], j < n (one fp32 product per
// row, like torch's lr * prox_lam)
RK_AI void expand_rows_times(const float* __restrict per_row, int64_t len_row, int64_t i0, int64_t n,
                             float lr, float* __restrict out) {
  if (len_row == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = lr * per_row[i0 + j];
    return;
  }
  int64_t r = i0 / len_row, o = i0 - r * len_row, j = 0;
  while (j < n) {
    const int64_t len = rk_min(len_row - o, n - j);
    const float v = lr * per_row[r];
    for (int64_t k = 0; k < len; ++k) out[j + k] = v;
    j += len;
    o = 0;
    ++r;
  }
}

// out[j] = per_col[column of element i0 + j], j < n: column c = (i % len_row)
// / col_len of cols (len_row = cols * col_len), the pattern repeating each row
template <typename V>
RK_AI void expand_cols(const V* __restrict per_col, int64_t cols, int64_t col_len, int64_t len_row,
                       int64_t i0, int64_t n, V* __restrict out) {
  const int64_t in_row = i0 % len_row;
  int64_t c = in_row / col_len, o = in_row - c * col_len, j = 0;
  if (col_len == 1) {  // a linear weight: the row is per_col itself, copied in pieces
    while (j < n) {
      const int64_t len = rk_min(cols - c, n - j);
      for (int64_t k = 0; k < len; ++k) out[j + k] = per_col[c + k];
      j += len;
      c = 0;
    }
    return;
  }
  while (j < n) {
    const int64_t len = rk_min(col_len - o, n - j);
    const V v = per_col[c];
    for (int64_t k = 0; k < len; ++k) out[j + k] = v;
    j += len;
    o = 0;
    if (++c == cols) c = 0;
  }
}

// Per-tensor constants of the general path.
struct Terms {
  float scale, wd, lr, mu, damp1, p_lam, p_t, p_m, p_s, rho, lo, hi;
  uint32_t negate, wd_m, nesterov_m;
};

RK_AI uint32_t mask_of(bool b) { return 0u - static_cast<uint32_t>(b); }

// torch's sign: (0 < x) - (x < 0), so sign(+-0) = sign(NaN) = +0
RK_AI float sign_of(float x) {
  return static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f);
}

// Soft threshold of one value: sign(x) * max(|x| - thr, 0) (clamp_min keeps
// NaN); thr = lr * prox_lam[r], the fp32 product torch computes. The product
// by sign(x) is exact, so it is written as bits: v's sign bit where |v| > 0
// (sign(+-0) = sign(NaN) = +0 leaves the +0 or NaN of the max as it is).
// Same bits as the product, without sign_of's compares and conversions.
RK_AI float soft(float v, float thr) {
  const float av = __builtin_fabsf(v);
  const float a = av - thr;
  const uint32_t sgn = bits_of(v) & 0x80000000u & mask_of(av > 0.0f);
  return f32_from_bits(bits_of(select(mask_of(a < 0.0f), 0.0f, a)) | sgn);
}

// torch's clamp, min(max(x, lo), hi): -0 stays -0 for lo = 0, NaN stays NaN;
// (lo, hi) = (-inf, inf) changes nothing.
RK_AI float clamped(float v, float lo, float hi) {
  const float a = select(mask_of(v < lo), lo, v);
  return select(mask_of(hi < a), hi, a);
}


// The d terms a d_loop instantiation computes (bits of its template argument).
constexpr int kDScale = 1, kDLam = 2, kDLamCols = 4, kDL1 = 8, kDPolar = 16, kDAdmm = 32;
constexpr int kDVariants = 64;

// The scalar coefficients of the terms (by value: registers in the loops).
struct TermCoefs {
  float rho, p_lam, p_t, p_m, p_s;
};

RK_AI TermCoefs coefs_of(const Terms& c) { return TermCoefs{c.rho, c.p_lam, c.p_t, c.p_m, c.p_s}; }

// The kD* bits of a tensor's d terms (kDScale: the step unscales g).
RK_AI int d_terms_of(const TensorDesc& t, bool has_scale) {
  return (has_scale ? kDScale : 0) | (t.lam != nullptr ? kDLam : 0) | (t.lam_cols != nullptr ? kDLamCols : 0) |
         (t.l1 != nullptr ? kDL1 : 0) | (t.polar != nullptr ? kDPolar : 0) | (t.target != nullptr ? kDAdmm : 0);
}

// Whether the update loops clamp: the group lasso clamps after its scale
// instead (TermRunner's group_loop).
RK_AI bool update_clamps(const TensorDesc& t) { return t.clamp && t.prox != 2; }

// The Terms both families fill alike (H: Hyper or AdamHyper): the gradient's
// scale and sign, L2 decay, lr, the polarization and ADMM coefficients, and
// the bounds the update loops clamp to (the tensor's, or bounds that change
// nothing). The family's own (mu, damp1, nesterov_m) are left 0.
template <class H>
RK_AI Terms terms_of(const TensorDesc& t, const H& h) {
  Terms c{};
  c.scale = h.scale;
  c.wd = h.wd;
  c.lr = h.lr;
  c.negate = h.maximize ? 0x80000000u : 0u;
  c.wd_m = mask_of(h.has_wd);
  c.p_lam = t.polar != nullptr ? t.polar[0] : 0.0f;
  c.p_t = t.polar != nullptr ? t.polar[1] : 0.0f;
  c.p_m = t.polar != nullptr ? t.polar[2] : 0.0f;
  c.p_s = t.polar != nullptr ? t.polar[3] : 0.0f;
  c.rho = t.rho;
  const bool clamp_now = update_clamps(t);
  c.lo = clamp_now ? t.clamp_lo : -__builtin_inff();
  c.hi = clamp_now ? t.clamp_hi : __builtin_inff();
  return c;
}

// The regularizer gradient terms of reference.sgd.add_terms, added to d in
// the contract's order, each one fp32 rounding, no FMA (F: the kD* bits of
// the terms a loop computes; lam, lamc, l1, tgt per element at j).
template <int F>
RK_AI float add_terms_at(float dv, float wv, const float* __restrict lam, const float* __restrict lamc,
                         const float* __restrict l1, const float* __restrict tgt, int64_t j, TermCoefs k) {
  if constexpr ((F & kDLam) != 0) dv = dv + lam[j] * wv;
  if constexpr ((F & kDLamCols) != 0) dv = dv + lamc[j] * wv;
  if constexpr ((F & kDL1) != 0) dv = dv + sign_of(wv) * l1[j];
  if constexpr ((F & kDPolar) != 0) dv = dv + k.p_lam * (k.p_t * sign_of(wv) - sign_of(wv - k.p_m) + k.p_s);
  if constexpr ((F & kDAdmm) != 0) dv = dv + k.rho * (wv - tgt[j]);
  return dv;
}

// Group lasso's finish of one value: x * scale where the row's norm > 0,
// else +0 (ok: the row's "norm > 0" mask), then the clamp and the mask again
// when clamped.
template <bool MASK, bool CLAMP>
RK_AI float group_value(float x, float scale, uint32_t ok, uint8_t keep, float lo, float hi) {
  float v = select(ok, x * scale, 0.0f);
  if constexpr (CLAMP) {
    v = clamped(v, lo, hi);
    if constexpr (MASK) v = v * static_cast<float>(keep);
  }
  return v;
}

// group_value over n values: per-element scales and masks (rsc, rok), or
// (ROW) one scale and mask for a piece of one row. T float: x in place;
// T uint16_t: stored to the bf16 storage `out`, rounded once (the finish and
// the store in one loop).
template <bool MASK, bool CLAMP, bool ROW, typename T>
static void group_loop(float* __restrict x, T* __restrict out, const float* __restrict rsc,
                       const uint32_t* __restrict rok, float scale, uint32_t ok, const uint8_t* __restrict keep,
                       int64_t n, const Terms& c) {
  const float lo = c.lo, hi = c.hi;
  for (int64_t j = 0; j < n; ++j) {
    const float v = group_value<MASK, CLAMP>(x[j], ROW ? scale : rsc[j], ROW ? ok : rok[j],
                                             MASK && CLAMP ? keep[j] : uint8_t{1}, lo, hi);
    if constexpr (sizeof(T) == 4) x[j] = v;
    else out[j] = f32_to_bf16(v);
  }
}

template <typename T>
using GroupFnT = void (*)(float*, T*, const float*, const uint32_t*, float, uint32_t, const uint8_t*, int64_t,
                          const Terms&);

// The coefficient streams of a piece of a block: per element; or, `rows`
// (a piece inside one row, kernels instantiated with ROWS), the per-row ones
// as the row's single value at [0] (lam, l1, keep, and prox_lam[r] for thr:
// the kernel forms the threshold lr * prox_lam[r]); lamc stays per element.
// Absent streams point at kZeros / kZeroBytes, never null.
struct Streams {
  const float *lam, *lamc, *l1, *thr;
  const uint8_t* keep;
  bool rows;

  Streams at(int64_t j) const {
    if (rows) return Streams{lam, lamc + j, l1, thr, keep, true};
    return Streams{lam + j, lamc + j, l1 + j, thr + j, keep + j, false};
  }
};

// A per-row value of a ROWS kernel (hoisted: read once per call) or the
// element's own.
template <bool ROWS, typename V>
RK_AI V row_or_elem(V row_value, const V* __restrict p, int64_t j) {
  if constexpr (ROWS) return row_value;
  else return p[j];
}

// ---------------------------------------------------------------------------
// The block / row / group-lasso machinery of the general path, completed by
// a family's step object `Step` (CRTP: `struct S : TermRunner<S, DT>`), which
// provides
//   void compute(int64_t i0, int64_t n, float* X, bool store_state)
// updating elements [i0, i0 + n) (inside one block) into X: the stepped,
// masked fp32 values, soft-thresholded and clamped unless the tensor takes
// the group lasso (then finished here, finish_group). fp32 storage: X is
// W + i0 (in place). The family's state tensors (momentum buffer, moments)
// are stored when `store_state` (16-bit storage only; fp32 state is updated
// in place and computed once).
template <class Step, int DT>
struct TermRunner {
  typedef typename Storage<DT>::type T;
  const TensorDesc& t;
  TermScratch& s;
  T* w;
  float lr;              // the step's lr: thresholds lr * prox_lam[r]
  Terms gc;              // the tensor's clamp bounds, for group_loop
  // bf16 storage: the group-lasso finish stores W itself (group_loop)
  static constexpr bool kGroupStores = DT == 1;
  typedef typename Storage<kGroupStores ? 1 : 0>::type GroupOut;
  GroupFnT<GroupOut> group;      // group-lasso scale, clamp, mask (per-element scales)
  GroupFnT<GroupOut> group_row;  // the same on a piece of one row
  float sqrt_n;
  double acc1 = 0.0, acc2 = 0.0;  // row norms carried across blocks (norms_f32)
  // Set by a compute that wrote the stored W itself (rounded once, bf16
  // storage, never under the group lasso): store() then has nothing to do.
  bool direct_w = false;

  TermRunner(const TensorDesc& td, float lr_) : t(td), s(*term_scratch()), lr(lr_) {
    w = static_cast<T*>(t.w);
    const bool mask = t.mask != nullptr;
    static constexpr GroupFnT<GroupOut> groups[2][2][2] = {
        {{&group_loop<false, false, false, GroupOut>, &group_loop<false, false, true, GroupOut>},
         {&group_loop<false, true, false, GroupOut>, &group_loop<false, true, true, GroupOut>}},
        {{&group_loop<true, false, false, GroupOut>, &group_loop<true, false, true, GroupOut>},
         {&group_loop<true, true, false, GroupOut>, &group_loop<true, true, true, GroupOut>}}};
    group = groups[mask ? 1 : 0][t.clamp ? 1 : 0][0];
    group_row = groups[mask ? 1 : 0][t.clamp ? 1 : 0][1];
    gc = Terms{};
    gc.lo = t.clamp_lo;
    gc.hi = t.clamp_hi;
    // torch multiplies the fp32 threshold by the Python float sqrt(n_r)
    sqrt_n = static_cast<float>(__builtin_sqrt(static_cast<double>(t.row_len)));
  }

  // What a scratch stream holds from an earlier block of this share: its
  // first n values are all the value of bits `bits` (n = 0: nothing known).
  // A block inside one row whose value is that one needs no refill (a long
  // row spans several blocks; a scalar regularizer gives every row the same
  // value), so the expansions cost nothing on long rows.
  struct Fill {
    uint32_t bits = 0;
    int64_t n = 0;
  };
  mutable Fill lam_fill, l1_fill, plam_fill;

  // tmp[0, n) = v, unless `f` says it already holds that.
  static const float* fill_row(float* tmp, float v, int64_t n, Fill& f) {
    if (f.n >= n && f.bits == bits_of(v)) return tmp;
    for (int64_t j = 0; j < n; ++j) tmp[j] = v;
    f.bits = bits_of(v);
    f.n = n;
    return tmp;
  }

  // Per-element values of a per-row stream over [i0, i0 + n) (zeros if absent).
  const float* per_element(const float* per_row, float* tmp, int64_t i0, int64_t n, Fill& f) const {
    if (per_row == nullptr) return kZeros;
    if (t.row_len == 1) return per_row + i0;
    const int64_t r = i0 / t.row_len;
    if (i0 + n <= (r + 1) * t.row_len) return fill_row(tmp, per_row[r], n, f);  // inside one row
    expand_rows(per_row, t.row_len, i0, n, tmp);
    f.n = 0;
    return tmp;
  }

  const float* lam_at(int64_t i0, int64_t n) const {
    if (t.lam != nullptr && t.lam_kind == kLamElement) return t.lam + i0;
    return per_element(t.lam, s.lam, i0, n, lam_fill);
  }

  // Column lambdas repeat with every row: for rows short enough, one row's
  // per-element values followed by a block's worth of the next row's
  // (s.lamc_pat) serve every block of the share at offset i0 % row_len,
  // expanded once per share instead of once per block (a 3x3 conv's
  // 9-element runs expand slowly).
  const float* lamc_pat = nullptr;
  void prepare_cols(int64_t lo, int64_t hi) {
    if (t.lam_cols == nullptr) return;
    const int64_t span = t.row_len + rk_min(kBlock, hi - lo);
    if (span > kColPattern || hi - lo < span) return;  // a short share: per block is cheaper
    expand_cols(t.lam_cols, t.cols, t.col_len, t.row_len, 0, span, s.lamc_pat);
    lamc_pat = s.lamc_pat;
  }

  const float* lam_cols_at(int64_t i0, int64_t n) const {
    if (t.lam_cols == nullptr) return kZeros;
    if (lamc_pat != nullptr) return lamc_pat + i0 % t.row_len;
    if (t.col_len == 1) {  // a linear weight: inside one row, the values are lam_cols itself
      const int64_t in_row = i0 % t.row_len;
      if (in_row + n <= t.row_len) return t.lam_cols + in_row;
    }
    expand_cols(t.lam_cols, t.cols, t.col_len, t.row_len, i0, n, s.lamc);
    return s.lamc;
  }

  const float* l1_at(int64_t i0, int64_t n) const {
    return t.l1 != nullptr ? per_element(t.l1, s.l1, i0, n, l1_fill) : kZeros;
  }

  // Soft-threshold thresholds lr * prox_lam[r] (zeros without PROX 1).
  const float* thresholds_at(int64_t i0, int64_t n) const {
    if (t.prox != 1) return kZeros;
    if (t.row_len > 1) {
      const int64_t r = i0 / t.row_len;
      if (i0 + n <= (r + 1) * t.row_len) return fill_row(s.plam, lr * t.prox_lam[r], n, plam_fill);
    }
    expand_rows_times(t.prox_lam, t.row_len, i0, n, lr, s.plam);
    plam_fill.n = 0;
    return s.plam;
  }

  // Whether the per-row coefficients can be passed as one value per row
  // piece (Streams::rows): rows long enough that a call per row piece costs
  // less than expanding them per element, lam and mask absent or per row.
  bool rows_ok() const {
    return t.row_len >= kLongRow && (t.lam == nullptr || t.lam_kind == kLamRow) &&
           (t.mask == nullptr || t.mask_kind == kMaskRow);
  }

  // The streams of block [i0, i0 + n) as TermRunner expands them (per element).
  Streams streams_at(int64_t i0, int64_t n) const {
    return Streams{lam_at(i0, n), lam_cols_at(i0, n), l1_at(i0, n), thresholds_at(i0, n), keep(i0, n), false};
  }

  // fn(j, m, streams) for each piece [i0 + j, i0 + j + m) of the block that
  // lies inside one row, with that row's values (Streams::rows).
  template <class Fn>
  void row_pieces(int64_t i0, int64_t n, Fn&& fn) const {
    const int64_t len = t.row_len;
    const float* lamc = lam_cols_at(i0, n);
    int64_t r = i0 / len, o = i0 - r * len;
    for (int64_t j = 0; j < n; ++r, o = 0) {
      const int64_t m = rk_min(len - o, n - j);
      fn(j, m, Streams{t.lam != nullptr ? t.lam + r : kZeros, lamc + j, t.l1 != nullptr ? t.l1 + r : kZeros,
                       t.prox == 1 ? t.prox_lam + r : kZeros, t.mask != nullptr ? t.mask + r : kZeroBytes, true});
      j += m;
    }
  }

  const uint8_t* keep(int64_t i0, int64_t n) const {
    if (t.mask == nullptr) return kZeroBytes;
    if (t.mask_kind == kMaskElement || t.row_len == 1) return t.mask + i0;
    expand_rows(t.mask, t.row_len, i0, n, s.keep);
    return s.keep;
  }

  // Where the fp32 values of elements from i0 live between compute and
  // store: W itself for fp32 storage, else `tmp`.
  float* in_w_or(int64_t i0, float* tmp) const {
    if constexpr (DT == 0) return w + i0;
    else return tmp;
  }

  // Store W (rounded once) from its fp32 values X.
  void store(int64_t i0, int64_t n, const float* X) {
    if constexpr (DT != 0) {
      if (!direct_w) narrow_n<DT>(X, w + i0, n);
    } else {
      (void)i0, (void)n, (void)X;
    }
  }

  void norms(int64_t i0, int64_t n) {
    if (t.norms != nullptr) norms_block<DT>(w + i0, i0, n, t, acc1, acc2);
  }

  void compute(int64_t i0, int64_t n, float* X, bool store_state) {
    static_cast<Step*>(this)->compute(i0, n, X, store_state);
  }

  // Group lasso: the scale of row r from the sum of squares of its updated values.
  void row_scale(int64_t r, double sumsq, float& scale, uint32_t& ok) const {
    const float norm = __builtin_sqrtf(static_cast<float>(sumsq));
    const float thr = lr * t.prox_lam[r];
    const float q = 1.0f - thr * sqrt_n / norm;
    scale = q < 0.0f ? 0.0f : q;  // clamp_min(0)
    ok = mask_of(norm > 0.0f);    // a row of norm 0 (or NaN) becomes +0
  }

  // Sum of squares of the row whose first element (tensor index e0) is x[0],
  // in pieces cut where blocks are (16-lane fp32 sums added in fp64): the
  // same pieces whatever the thread split or the buffer.
  static double row_sumsq(const float* x, int64_t e0, int64_t len) {
    double acc = 0.0;
    for (int64_t p = 0; p < len;) {
      const int64_t q = rk_min(len, ((e0 + p) / kBlock + 1) * kBlock - e0);
      acc += sq_sums(x + p, q - p);
      p = q;
    }
    return acc;
  }

  static int64_t block_end(int64_t i0, int64_t hi) { return rk_min(hi, (i0 / kBlock + 1) * kBlock); }

  // Group lasso's finish of block [i0, i0 + n) whose first element is row
  // r0's element o: each row's scale (rs[r - r0], rk[r - r0]), clamp,
  // mask, then store and norms. Rows at least kLongRow long take their
  // scale as a scalar per row piece, shorter ones expanded per element.
  void finish_group(int64_t i0, int64_t n, float* X, const float* rs, const uint32_t* rk) {
    const uint8_t* kp = t.clamp ? keep(i0, n) : kZeroBytes;
    const int64_t len = t.row_len;
    GroupOut* out = nullptr;  // bf16: W itself
    if constexpr (kGroupStores) out = w + i0;
    if (len == 1) {
      group(X, out, rs, rk, 0.0f, 0u, kp, n, gc);
    } else if (len < kLongRow) {
      const int64_t o = i0 % len;  // rs[0] is the scale of the row element i0 is in
      expand_rows(rs, len, o, n, s.rsx);
      expand_rows(rk, len, o, n, s.rkx);
      group(X, out, s.rsx, s.rkx, 0.0f, 0u, kp, n, gc);
    } else {
      int64_t o = i0 % len;
      for (int64_t j = 0, k = 0; j < n; ++k, o = 0) {
        const int64_t m = rk_min(len - o, n - j);
        group_row(X + j, kGroupStores ? out + j : nullptr, nullptr, nullptr, rs[k], rk[k], kp + j, m, gc);
        j += m;
      }
    }
    if constexpr (!kGroupStores) store(i0, n, X);
    norms(i0, n);
  }

  // Step elements [lo, hi) of the tensor (whole rows under the group lasso
  // or row norms: row-aligned cuts).
  void run(int64_t lo, int64_t hi) {
    prepare_cols(lo, hi);
    if (t.prox != 2) {
      // blocks stepped and stored one after the other, with their row norms
      for (int64_t i0 = lo; i0 < hi;) {
        const int64_t i1 = block_end(i0, hi);
        float* X = in_w_or(i0, s.x);
        compute(i0, i1 - i0, X, true);
        store(i0, i1 - i0, X);
        norms(i0, i1 - i0);
        i0 = i1;
      }
      return;
    }
    // Group lasso: [lo, hi) is whole rows (row-aligned cuts).
    const int64_t len = t.row_len;
    if (len <= kRowBuf) {
      // Chunks of whole rows (at least one, about kChunk elements): update
      // into the buffer, reduce each row, then scale, round and store once.
      const int64_t rows_per_chunk = len >= kChunk ? 1 : kChunk / len;
      for (int64_t c0 = lo; c0 < hi;) {
        const int64_t c1 = rk_min(hi, c0 + rows_per_chunk * len);
        float* X0 = in_w_or(c0, s.row);  // X0[i - c0] holds element i
        for (int64_t i0 = c0; i0 < c1;) {
          const int64_t i1 = block_end(i0, c1);
          compute(i0, i1 - i0, X0 + (i0 - c0), true);
          i0 = i1;
        }
        const int64_t r0 = c0 / len, nr = (c1 - c0) / len;
        for (int64_t k = 0; k < nr; ++k)
          row_scale(r0 + k, row_sumsq(X0 + k * len, c0 + k * len, len), s.rs[k], s.rk[k]);
        for (int64_t i0 = c0; i0 < c1;) {
          const int64_t i1 = block_end(i0, c1), k = (i0 - c0) / len;  // chunk row of element i0
          finish_group(i0, i1 - i0, X0 + (i0 - c0), s.rs + k, s.rk + k);
          i0 = i1;
        }
        c0 = c1;
      }
      return;
    }
    // Rows longer than the buffer: two passes over each row. fp32 storage
    // keeps the unscaled row in W between them; bf16/fp16 storage computes
    // the row twice (nothing is stored by the first pass, and the update is
    // deterministic, so the second pass sees the same values).
    for (int64_t e0 = lo; e0 < hi; e0 += len) {
      double sumsq = 0.0;
      for (int64_t i0 = e0; i0 < e0 + len;) {
        const int64_t i1 = block_end(i0, e0 + len);
        float* X = in_w_or(i0, s.x);
        compute(i0, i1 - i0, X, DT == 0);
        sumsq += sq_sums(X, i1 - i0);
        i0 = i1;
      }
      float scale;
      uint32_t ok;
      row_scale(e0 / len, sumsq, scale, ok);
      for (int64_t i0 = e0; i0 < e0 + len;) {
        const int64_t i1 = block_end(i0, e0 + len);
        float* X = in_w_or(i0, s.x);
        if constexpr (DT != 0) compute(i0, i1 - i0, X, true);
        finish_group(i0, i1 - i0, X, &scale, &ok);
        i0 = i1;
      }
    }
  }
};

}  // namespace RK_NS
}  // namespace detail
}  // namespace regkern
