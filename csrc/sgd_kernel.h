// Body of the `sgd` kernel family for ONE instruction-set variant.
//
// No include guard on purpose: sgd.cpp compiles this file once per variant
// through common/isa_variants.inc, inside the variant's `#pragma GCC target`
// region, with RK_NS naming a namespace of its own and RK_LANES its fp32
// register width. Everything defined here is therefore compiled (and
// auto-vectorized) for that ISA; keep standard headers out of this file
// (sgd.cpp includes them before the regions).
//
// Math (regkern/reference/sgd.py), in fp32, one rounding per operation, no FMA
// contraction (-ffp-contract=off), so fp32 results match torch bit for bit:
//   g = grad / grad_scale; g = -g if maximize
//   d = g + wd * W (wd != 0) + lam[r] * W or lam[i] * W (lam per row or element)
//         + lam_cols[c] * W (c: the element's index along dim 1)
//         + l1[r] * sign(W) + p_lam * (p_t * sign(W) - sign(W - p_m) + p_s)
//         + rho * (W - target)                       (each when given)
//   buf = d (first step) or mu * buf + (1 - dampening) * d
//   s = d + mu * buf (nesterov) or buf (or d when momentum == 0)
//   W = (W - lr * s) * mask, buf = buf * mask
//   W = prox(W) (soft threshold or group-lasso row scale, threshold lr * prox_lam[r])
//   W = min(max(W, lo), hi) * mask                   (when clamped)
//   norms[r] = L1, L2, mean |W_r| of the stored W (accumulated while writing).
// The group-lasso row norm is summed in another order than torch's: the only
// result that is not bit-identical to the reference (within a few ulps).

namespace regkern {
namespace detail {
namespace RK_NS {

using namespace ::regkern::dtype::RK_NS;  // storage conversions (common/dtype_kernel.h)

// m ? a : b for a mask m of all ones or all zeros
RK_AI float select(uint32_t m, float a, float b) {
  return f32_from_bits((bits_of(a) & m) | (bits_of(b) & ~m));
}

// ---------------------------------------------------------------------------
// The fused element-wise update of n fp32 values, in place. MOM: 0 no
// momentum, 1 first step (buf = d), 2 later steps. LAM: 0 none, 1 `lam`
// holds one value per element (expanded from per-row values by the caller),
// 2 one value `lam_row` for all n (a piece of one row: no expansion stream).
// `keep` holds one mask value per element.
// SCALE: divide the grad by grad_scale (a template flag: the division is the
// most expensive instruction of the loop).

template <int MOM, int LAM, bool MASK, bool SCALE>
static void fused(float* __restrict w, const float* __restrict g, float* __restrict buf,
                  const float* __restrict lam, float lam_row, const uint8_t* __restrict keep,
                  int64_t n, const Hyper& h) {
  const float lr = h.lr, mu = h.mu, damp1 = h.damp1, wd = h.wd, scale = h.scale;
  // Run-time options as bit masks: bitwise selects vectorize everywhere
  // (GCC does not vectorize `invariant_bool ? x : y` on floats).
  const uint32_t wd_m = h.has_wd ? ~0u : 0u, nesterov_m = h.nesterov ? ~0u : 0u;
  const uint32_t negate = h.maximize ? 0x80000000u : 0u;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j];
    float gv = g[j];
    if constexpr (SCALE) gv = gv / scale;
    gv = f32_from_bits(bits_of(gv) ^ negate);  // -g
    float d = select(wd_m, gv + wd * wv, gv);
    if constexpr (LAM == 1) d = d + lam[j] * wv;
    if constexpr (LAM == 2) d = d + lam_row * wv;
    float b = d;
    if constexpr (MOM == 2) b = mu * buf[j] + damp1 * d;
    float s = d;
    if constexpr (MOM != 0) s = select(nesterov_m, d + mu * b, b);
    float nw = wv - lr * s;
    if constexpr (MASK) {
      const float k = static_cast<float>(keep[j]);
      nw = nw * k;
      b = b * k;
    }
    w[j] = nw;
    if constexpr (MOM != 0) buf[j] = b;
  }
}

// bf16 / fp16: widen short pieces to fp32 temporaries (F16C for fp16 where
// the variant has it), update them in place, round them back once. Pieces are
// short so that the input streams are read close together in time (measured:
// 64-128 elements beat whole 1024-element blocks by a third for fp16 at 2
// threads; converting bf16 inline in the loop is no faster).
template <int DT, int MOM, int LAM, bool MASK, bool SCALE>
static void fused16(uint16_t* __restrict w, const uint16_t* __restrict g,
                    uint16_t* __restrict buf, const float* __restrict lam, float lam_row,
                    const uint8_t* __restrict keep, int64_t n, const Hyper& h) {
  alignas(64) float wf[kPiece16], gf[kPiece16], bf[kPiece16];
  for (int64_t j = 0; j < n; j += kPiece16) {
    const int64_t m = rk_min(kPiece16, n - j);
    widen_n<DT>(w + j, wf, m);
    widen_n<DT>(g + j, gf, m);
    if constexpr (MOM == 2) widen_n<DT>(buf + j, bf, m);
    fused<MOM, LAM, MASK, SCALE>(wf, gf, bf, LAM == 1 ? lam + j : nullptr, lam_row,
                                 MASK ? keep + j : nullptr, m, h);
    narrow_n<DT>(wf, w + j, m);
    if constexpr (MOM != 0) narrow_n<DT>(bf, buf + j, m);
  }
}

template <int DT>
using FusedFn = void (*)(typename Storage<DT>::type*, const typename Storage<DT>::type*,
                         typename Storage<DT>::type*, const float*, float, const uint8_t*,
                         int64_t, const Hyper&);

template <int DT, int MOM, int LAM, bool MASK>
static FusedFn<DT> fused_for(bool scale) {
  if constexpr (DT == 0) return scale ? &fused<MOM, LAM, MASK, true> : &fused<MOM, LAM, MASK, false>;
  else return scale ? &fused16<DT, MOM, LAM, MASK, true> : &fused16<DT, MOM, LAM, MASK, false>;
}

template <int DT, int MOM>
static FusedFn<DT> pick_fused(int lam, bool mask, bool scale) {
  if (lam == 2) return mask ? fused_for<DT, MOM, 2, true>(scale) : fused_for<DT, MOM, 2, false>(scale);
  if (lam == 1) return mask ? fused_for<DT, MOM, 1, true>(scale) : fused_for<DT, MOM, 1, false>(scale);
  return mask ? fused_for<DT, MOM, 0, true>(scale) : fused_for<DT, MOM, 0, false>(scale);
}

// ---------------------------------------------------------------------------
// Row norms.

// Sum of |x| and x^2 over n values in 16 fixed lanes (lane k takes the
// elements j with j % 16 == k), added up in a fixed order at the end: the
// result depends on n only, never on the address, the ISA or the thread. The
// lanes live in RK_LANES-wide registers (one zmm, two ymm or four xmm).
typedef float vacc __attribute__((vector_size(4 * RK_LANES)));
typedef uint32_t vaccu __attribute__((vector_size(4 * RK_LANES)));
constexpr int kAccRegs = 16 / RK_LANES;

RK_AI void abs_sums(const float* __restrict x, int64_t n, float& s1, float& s2) {
  vacc a1[kAccRegs] = {}, a2[kAccRegs] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int q = 0; q < kAccRegs; ++q) {
      vacc v;
      __builtin_memcpy(&v, x + j + q * RK_LANES, sizeof v);
      v = reinterpret_cast<vacc>(reinterpret_cast<vaccu>(v) & 0x7FFFFFFFu);
      a1[q] += v;
      a2[q] += v * v;
    }
  }
  float r1[16], r2[16];
  __builtin_memcpy(r1, a1, sizeof r1);
  __builtin_memcpy(r2, a2, sizeof r2);
  for (int k = 0; j < n; ++j, ++k) {
    const float v = __builtin_fabsf(x[j]);
    r1[k] += v;
    r2[k] += v * v;
  }
  for (int half = 8; half >= 1; half >>= 1) {
    for (int k = 0; k < half; ++k) {
      r1[k] += r1[k + half];
      r2[k] += r2[k + half];
    }
  }
  s1 = r1[0];
  s2 = r2[0];
}

// Sum of x^2 over n values in the lanes and order of abs_sums (so the same
// value as its s2): the group-lasso row norm needs nothing else.
RK_AI float sq_sums(const float* __restrict x, int64_t n) {
  vacc a2[kAccRegs] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int q = 0; q < kAccRegs; ++q) {
      vacc v;
      __builtin_memcpy(&v, x + j + q * RK_LANES, sizeof v);
      a2[q] += v * v;
    }
  }
  float r2[16];
  __builtin_memcpy(r2, a2, sizeof r2);
  for (int k = 0; j < n; ++j, ++k) r2[k] += x[j] * x[j];
  for (int half = 8; half >= 1; half >>= 1)
    for (int k = 0; k < half; ++k) r2[k] += r2[k + half];
  return r2[0];
}

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

// ---------------------------------------------------------------------------
// The general path: tensors with regularizer terms (column lambdas, L1
// subgradient, polarization, ADMM pull, proximal map, clamp). Tensors without
// any of them never come here (range_dt's plain path), so absent terms cost
// nothing. Which terms a tensor has is decided once per tensor share (the
// instantiations below are picked in TermsStep's constructor): no loop tests
// a term per element. Per block of kBlock elements, the per-row and
// per-column coefficients are first expanded to per-element streams (the
// soft threshold's as lr * prox_lam[r]); fp32 storage then steps the block
// in place in W, bf16/fp16 storage widens it to fp32 in pieces of kPiece16:
//   one pass (one_pass): d, the step, mask, soft threshold, clamp, mask again
//     in one loop, like the plain path's kernel, for what one regularizer on
//     a weight asks: at most one of column lambdas, L1 and ADMM, with any of
//     the row or element lambda, mask, soft threshold and clamp, with a
//     momentum buffer past its first step. A grad_scale is divided out in a
//     short pass first (the division is the costliest instruction either way;
//     not worth twice the instantiations);
//   two passes (the rest: polarization, which acts on small BatchNorm
//     vectors, several d terms, no momentum or its first step): d_loop
//     computes d with every term into a buffer, update_loop steps with it,
//     piece after piece;
// then one rounding to the storage dtype. Group lasso leaves the update
// unscaled, reduces each row, then scales it (group_loop, with the clamp and
// mask), see TermsStep::run. The row norms of the stored W are accumulated
// per block as on the plain path.

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
// NaN); thr = lr * prox_lam[r], the fp32 product torch computes.
RK_AI float soft(float v, float thr) {
  const float a = __builtin_fabsf(v) - thr;
  return sign_of(v) * select(mask_of(a < 0.0f), 0.0f, a);
}

// torch's clamp, min(max(x, lo), hi): -0 stays -0 for lo = 0, NaN stays NaN;
// (lo, hi) = (-inf, inf) changes nothing.
RK_AI float clamped(float v, float lo, float hi) {
  const float a = select(mask_of(v < lo), lo, v);
  return select(mask_of(hi < a), hi, a);
}

// The d term of one_pass besides wd and lam (at most one).
constexpr int kOneNone = 0, kOneL1 = 1, kOneAdmm = 2, kOneLamCols = 3;

// One pass over n elements: g already divided by grad_scale; -g when
// maximizing; d = g + wd W (+ lam W) (+ the DK term: lam_cols W, l1 sign(W)
// or rho (W - target), `coef` holding lam_cols or l1 per element); buf = mu
// buf + (1 - dampening) d; s = d + mu buf (nesterov) or buf; x = (x - lr s)
// * keep, buf *= keep; soft threshold (thr per element); clamp to [lo, hi]
// and the mask again. x holds W on entry, the new W on exit.
template <bool MASK, int DK, bool LAM, bool PROX1, bool CLAMP>
static void one_pass(float* __restrict x, const float* __restrict g, float* __restrict buf,
                     const float* __restrict lam, const float* __restrict coef,
                     const float* __restrict tgt, const uint8_t* __restrict keep,
                     const float* __restrict thr, int64_t n, const Terms& c) {
  const float wd = c.wd, rho = c.rho, lr = c.lr, mu = c.mu, damp1 = c.damp1, lo = c.lo, hi = c.hi;
  const uint32_t negate = c.negate, wd_m = c.wd_m, nesterov_m = c.nesterov_m;
  (void)lo, (void)hi, (void)rho;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = x[j];
    const float gv = f32_from_bits(bits_of(g[j]) ^ negate);  // -g
    float dv = select(wd_m, gv + wd * wv, gv);
    if constexpr (LAM) dv = dv + lam[j] * wv;
    if constexpr (DK == kOneLamCols) dv = dv + coef[j] * wv;
    if constexpr (DK == kOneL1) dv = dv + sign_of(wv) * coef[j];
    if constexpr (DK == kOneAdmm) dv = dv + rho * (wv - tgt[j]);
    float b = mu * buf[j] + damp1 * dv;
    const float s = select(nesterov_m, dv + mu * b, b);
    float nw = wv - lr * s;
    float k = 1.0f;
    if constexpr (MASK) {
      k = static_cast<float>(keep[j]);
      nw = nw * k;
      b = b * k;
    }
    if constexpr (PROX1) nw = soft(nw, thr[j]);
    if constexpr (CLAMP) {
      nw = clamped(nw, lo, hi);
      if constexpr (MASK) nw = nw * k;
    }
    x[j] = nw;
    buf[j] = b;
  }
}

typedef void (*OnePassFn)(float*, const float*, float*, const float*, const float*, const float*,
                          const uint8_t*, const float*, int64_t, const Terms&);

// Index (((MASK * 4 + DK) * 2 + LAM) * 2 + PROX1) * 2 + CLAMP.
template <int... I>
RK_AI OnePassFn one_pass_for(int i, std::integer_sequence<int, I...>) {
  static constexpr OnePassFn table[] = {&one_pass<((I / 32) & 1) != 0, (I / 8) & 3, ((I / 4) & 1) != 0,
                                                  ((I / 2) & 1) != 0, (I & 1) != 0>...};
  return table[i];
}
constexpr int kOnePassVariants = 64;

// The d terms a d_loop instantiation computes (bits of its template argument).
constexpr int kDScale = 1, kDLam = 2, kDLamCols = 4, kDL1 = 8, kDPolar = 16, kDAdmm = 32;
constexpr int kDVariants = 64;

// d = g / scale, negated when maximizing, + wd W, + lam W, + lam_cols W,
// + l1 sign(W), + p_lam (p_t sign(W) - sign(W - p_m) + p_s), + rho (W - target)
// (lam, lamc, l1, target per element; each term only when F has its bit).
template <int F>
static void d_loop(const float* __restrict w, const float* __restrict g, const float* __restrict lam,
                   const float* __restrict lamc, const float* __restrict l1,
                   const float* __restrict tgt, float* __restrict d, int64_t n, const Terms& c) {
  const float scale = c.scale, wd = c.wd, rho = c.rho;
  const float p_lam = c.p_lam, p_t = c.p_t, p_m = c.p_m, p_s = c.p_s;
  const uint32_t negate = c.negate, wd_m = c.wd_m;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j];
    float gv = g[j];
    if constexpr ((F & kDScale) != 0) gv = gv / scale;
    gv = f32_from_bits(bits_of(gv) ^ negate);  // -g
    float dv = select(wd_m, gv + wd * wv, gv);
    if constexpr ((F & kDLam) != 0) dv = dv + lam[j] * wv;
    if constexpr ((F & kDLamCols) != 0) dv = dv + lamc[j] * wv;
    if constexpr ((F & kDL1) != 0) dv = dv + sign_of(wv) * l1[j];
    if constexpr ((F & kDPolar) != 0) dv = dv + p_lam * (p_t * sign_of(wv) - sign_of(wv - p_m) + p_s);
    if constexpr ((F & kDAdmm) != 0) dv = dv + rho * (wv - tgt[j]);
    d[j] = dv;
  }
}

typedef void (*DFn)(const float*, const float*, const float*, const float*, const float*, const float*,
                    float*, int64_t, const Terms&);

template <int... F>
RK_AI DFn d_loop_for(int f, std::integer_sequence<int, F...>) {
  static constexpr DFn table[] = {&d_loop<F>...};
  return table[f];
}

// The step fed d (two-pass path): buf = d (MOM 1) or mu buf + (1 -
// dampening) d (MOM 2), s = d + mu buf (nesterov) or buf (d without
// momentum), x = (x - lr s) * keep, buf *= keep, then the soft threshold
// (PROX1, thr per element), the clamp and the mask again (the clamp to
// (-inf, inf) without one: it changes nothing, and the mask again changes
// no masked value either, the zeros that the soft threshold keeps zero).
template <int MOM, bool MASK, bool PROX1>
static void update_loop(float* __restrict x, const float* __restrict d, float* __restrict buf,
                        const uint8_t* __restrict keep, const float* __restrict thr, int64_t n,
                        const Terms& c) {
  const float lr = c.lr, mu = c.mu, damp1 = c.damp1, lo = c.lo, hi = c.hi;
  const uint32_t nesterov_m = c.nesterov_m;
  for (int64_t j = 0; j < n; ++j) {
    const float dv = d[j];
    float b = dv;
    if constexpr (MOM == 2) b = mu * buf[j] + damp1 * dv;
    float s = dv;
    if constexpr (MOM != 0) s = select(nesterov_m, dv + mu * b, b);
    float nw = x[j] - lr * s;
    float k = 1.0f;
    if constexpr (MASK) {
      k = static_cast<float>(keep[j]);
      nw = nw * k;
      b = b * k;
    }
    if constexpr (PROX1) nw = soft(nw, thr[j]);
    nw = clamped(nw, lo, hi);
    if constexpr (MASK) nw = nw * k;
    x[j] = nw;
    if constexpr (MOM != 0) buf[j] = b;
  }
}

typedef void (*UpdateFn)(float*, const float*, float*, const uint8_t*, const float*, int64_t, const Terms&);

// Index (mom * 2 + MASK) * 2 + PROX1.
template <int... I>
RK_AI UpdateFn update_loop_for(int i, std::integer_sequence<int, I...>) {
  static constexpr UpdateFn table[] = {&update_loop<I / 4, ((I / 2) & 1) != 0, (I & 1) != 0>...};
  return table[i];
}

// Group lasso: x = x * scale where the row's norm > 0, else +0 (rsc, rok:
// the row's scale and "norm > 0" mask, per element), then the clamp and the
// mask again when clamped.
template <bool MASK, bool CLAMP>
static void group_loop(float* __restrict x, const float* __restrict rsc, const uint32_t* __restrict rok,
                       const uint8_t* __restrict keep, int64_t n, const Terms& c) {
  const float lo = c.lo, hi = c.hi;
  for (int64_t j = 0; j < n; ++j) {
    float v = select(rok[j], x[j] * rsc[j], 0.0f);
    if constexpr (CLAMP) {
      v = clamped(v, lo, hi);
      if constexpr (MASK) v = v * static_cast<float>(keep[j]);
    }
    x[j] = v;
  }
}

// group_loop for a piece of one row: its scale and mask as scalars.
template <bool MASK, bool CLAMP>
static void group_row_loop(float* __restrict x, float scale, uint32_t ok, const uint8_t* __restrict keep,
                           int64_t n, const Terms& c) {
  const float lo = c.lo, hi = c.hi;
  for (int64_t j = 0; j < n; ++j) {
    float v = select(ok, x[j] * scale, 0.0f);
    if constexpr (CLAMP) {
      v = clamped(v, lo, hi);
      if constexpr (MASK) v = v * static_cast<float>(keep[j]);
    }
    x[j] = v;
  }
}

typedef void (*GroupFn)(float*, const float*, const uint32_t*, const uint8_t*, int64_t, const Terms&);
typedef void (*GroupRowFn)(float*, float, uint32_t, const uint8_t*, int64_t, const Terms&);

// g / scale (the one-pass path's first pass under a grad_scale).
static void divide_by(const float* __restrict g, float* __restrict out, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = g[j] / scale;
}

// One tensor's share [lo, hi) on the general path.
template <int DT>
struct TermsStep {
  typedef typename Storage<DT>::type T;
  const TensorDesc& t;
  const Hyper& h;
  TermScratch& s;
  Terms c;
  Terms gc;         // c with the tensor's clamp bounds, for group_loop
  OnePassFn one;    // the one-pass kernel, or null: two passes
  DFn dfn;          // two passes: d with the tensor's d terms
  UpdateFn update;  // two passes: the step fed d
  GroupFn group;    // group-lasso scale, clamp, mask (per-element scales)
  GroupRowFn group_row;  // the same on a piece of one row
  int mom;
  T* w;
  const T* g;
  T* buf;
  const T* tgt;
  float sqrt_n;
  double acc1 = 0.0, acc2 = 0.0;  // row norms carried across blocks (norms_f32)

  TermsStep(const TensorDesc& td, const Hyper& hy) : t(td), h(hy), s(*term_scratch()) {
    w = static_cast<T*>(t.w);
    g = static_cast<const T*>(t.g);
    buf = static_cast<T*>(t.buf);
    tgt = static_cast<const T*>(t.target);
    mom = (!h.has_momentum || buf == nullptr) ? 0 : (t.first ? 1 : 2);
    const bool mask = t.mask != nullptr;
    const bool lam = t.lam != nullptr;
    const bool prox1 = t.prox == 1;
    const int d_count = (t.lam_cols != nullptr) + (t.l1 != nullptr) + (t.target != nullptr);
    // group lasso clamps after its scale (group_loop), the others in the update
    const bool clamp_now = t.clamp && t.prox != 2;
    one = nullptr;
    if (mom == 2 && t.polar == nullptr && d_count <= 1) {
      const int dk = t.lam_cols != nullptr ? kOneLamCols
                     : t.l1 != nullptr     ? kOneL1
                     : t.target != nullptr ? kOneAdmm
                                           : kOneNone;
      const int i = ((((mask ? 1 : 0) * 4 + dk) * 2 + (lam ? 1 : 0)) * 2 + (prox1 ? 1 : 0)) * 2 + (clamp_now ? 1 : 0);
      one = one_pass_for(i, std::make_integer_sequence<int, kOnePassVariants>{});
    }
    const int f = (h.has_scale ? kDScale : 0) | (lam ? kDLam : 0) | (t.lam_cols != nullptr ? kDLamCols : 0) |
                  (t.l1 != nullptr ? kDL1 : 0) | (t.polar != nullptr ? kDPolar : 0) |
                  (t.target != nullptr ? kDAdmm : 0);
    dfn = d_loop_for(f, std::make_integer_sequence<int, kDVariants>{});
    update = update_loop_for((mom * 2 + (mask ? 1 : 0)) * 2 + (prox1 ? 1 : 0), std::make_integer_sequence<int, 12>{});
    static constexpr GroupFn groups[2][2] = {{&group_loop<false, false>, &group_loop<false, true>},
                                             {&group_loop<true, false>, &group_loop<true, true>}};
    group = groups[mask ? 1 : 0][t.clamp ? 1 : 0];
    static constexpr GroupRowFn group_rows[2][2] = {
        {&group_row_loop<false, false>, &group_row_loop<false, true>},
        {&group_row_loop<true, false>, &group_row_loop<true, true>}};
    group_row = group_rows[mask ? 1 : 0][t.clamp ? 1 : 0];
    c.scale = h.scale;
    c.wd = h.wd;
    c.lr = h.lr;
    c.mu = h.mu;
    c.damp1 = h.damp1;
    c.negate = h.maximize ? 0x80000000u : 0u;
    c.wd_m = mask_of(h.has_wd);
    c.nesterov_m = mask_of(h.nesterov);
    c.p_lam = t.polar != nullptr ? t.polar[0] : 0.0f;
    c.p_t = t.polar != nullptr ? t.polar[1] : 0.0f;
    c.p_m = t.polar != nullptr ? t.polar[2] : 0.0f;
    c.p_s = t.polar != nullptr ? t.polar[3] : 0.0f;
    c.rho = t.rho;
    // group_loop clamps (after the group-lasso scale) to the tensor's bounds;
    // the update loops to them too, or to bounds that change nothing
    gc = c;
    gc.lo = t.clamp_lo;
    gc.hi = t.clamp_hi;
    c.lo = clamp_now ? t.clamp_lo : -__builtin_inff();
    c.hi = clamp_now ? t.clamp_hi : __builtin_inff();
    // torch multiplies the fp32 threshold by the Python float sqrt(n_r)
    sqrt_n = static_cast<float>(__builtin_sqrt(static_cast<double>(t.row_len)));
  }

  // Per-element values of a per-row stream over [i0, i0 + n) (zeros if absent).
  const float* per_element(const float* per_row, float* tmp, int64_t i0, int64_t n) const {
    if (per_row == nullptr) return kZeros;
    if (t.row_len == 1) return per_row + i0;
    expand_rows(per_row, t.row_len, i0, n, tmp);
    return tmp;
  }

  const float* lam_at(int64_t i0, int64_t n) const {
    if (t.lam != nullptr && t.lam_kind == kLamElement) return t.lam + i0;
    return per_element(t.lam, s.lam, i0, n);
  }

  const float* lam_cols_at(int64_t i0, int64_t n) const {
    if (t.lam_cols == nullptr) return kZeros;
    expand_cols(t.lam_cols, t.cols, t.col_len, t.row_len, i0, n, s.lamc);
    return s.lamc;
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

  // Step the fp32 values xf (W on entry) of m elements with gradient gf
  // (fp32), buffer bf, target tf; the per-element streams at their element
  // (pp: soft-threshold thresholds).
  void kernel(float* xf, const float* gf, float* bf, const float* tf, const float* lp, const float* lcp,
              const float* l1p, const uint8_t* kp, const float* pp, int64_t m) {
    if (one != nullptr) {
      const float* gs = gf;
      if (h.has_scale) {
        divide_by(gf, s.gs, m, c.scale);
        gs = s.gs;
      }
      one(xf, gs, bf, lp, t.lam_cols != nullptr ? lcp : l1p, tf, kp, pp, m, c);
    } else {
      // in short pieces, so that the second pass finds d and W in L1 and
      // the memory streams of both passes are read close together in time
      for (int64_t j = 0; j < m; j += kPiece16) {
        const int64_t q = rk_min(kPiece16, m - j);
        dfn(xf + j, gf + j, lp + j, lcp + j, l1p + j, tf + j, s.d, q, c);
        update(xf + j, s.d, bf != nullptr ? bf + j : nullptr, kp + j, pp + j, q, c);
      }
    }
  }

  // Update elements [i0, i0 + n) (n <= kBlock, inside one block) into X: the
  // stepped, masked fp32 values, soft-thresholded and clamped unless the
  // tensor takes the group lasso (then finished by group_loop). fp32
  // storage: X is W + i0 (in place). The momentum buffer is stored when
  // `store_buf`.
  void compute(int64_t i0, int64_t n, float* __restrict X, bool store_buf) {
    const float* lp = lam_at(i0, n);
    const float* lcp = lam_cols_at(i0, n);
    const float* l1p = t.l1 != nullptr ? per_element(t.l1, s.l1, i0, n) : kZeros;
    const float* pp = kZeros;  // soft-threshold thresholds lr * prox_lam[r]
    if (t.prox == 1) {
      expand_rows_times(t.prox_lam, t.row_len, i0, n, c.lr, s.plam);
      pp = s.plam;
    }
    const uint8_t* kp = keep(i0, n);
    if constexpr (DT == 0) {
      (void)store_buf;
      kernel(X, g + i0, buf != nullptr ? buf + i0 : nullptr, tgt != nullptr ? tgt + i0 : kZeros, lp, lcp, l1p,
             kp, pp, n);
    } else {
      // short pieces: the input streams are read close together in time
      alignas(64) float gf[kPiece16], tf[kPiece16], bf[kPiece16];
      for (int64_t j = 0; j < n; j += kPiece16) {
        const int64_t m = rk_min(kPiece16, n - j), e = i0 + j;
        widen_n<DT>(w + e, X + j, m);
        widen_n<DT>(g + e, gf, m);
        if (mom == 2) widen_n<DT>(buf + e, bf, m);
        if (tgt != nullptr) widen_n<DT>(tgt + e, tf, m);
        kernel(X + j, gf, bf, tgt != nullptr ? tf : kZeros, lp + j, lcp + j, l1p + j, kp + j, pp + j, m);
        if (mom != 0 && store_buf) narrow_n<DT>(bf, buf + e, m);
      }
    }
  }

  // Store W (rounded once) from its fp32 values X.
  void store(int64_t i0, int64_t n, const float* X) {
    if constexpr (DT != 0) narrow_n<DT>(X, w + i0, n);
    else (void)i0, (void)n, (void)X;
  }

  void norms(int64_t i0, int64_t n) {
    if (t.norms != nullptr) norms_block<DT>(w + i0, i0, n, t, acc1, acc2);
  }

  // Group lasso: the scale of row r from the sum of squares of its updated values.
  void row_scale(int64_t r, double sumsq, float& scale, uint32_t& ok) const {
    const float norm = __builtin_sqrtf(static_cast<float>(sumsq));
    const float thr = c.lr * t.prox_lam[r];
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
    if (len == 1) {
      group(X, rs, rk, kp, n, gc);
    } else if (len < kLongRow) {
      const int64_t o = i0 % len;  // rs[0] is the scale of the row element i0 is in
      expand_rows(rs, len, o, n, s.rsx);
      expand_rows(rk, len, o, n, s.rkx);
      group(X, s.rsx, s.rkx, kp, n, gc);
    } else {
      int64_t o = i0 % len;
      for (int64_t j = 0, k = 0; j < n; ++k, o = 0) {
        const int64_t m = rk_min(len - o, n - j);
        group_row(X + j, rs[k], rk[k], kp + j, m, gc);
        j += m;
      }
    }
    store(i0, n, X);
    norms(i0, n);
  }

  void run(int64_t lo, int64_t hi) {
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

// ---------------------------------------------------------------------------
// Step elements [lo, hi) of one tensor in blocks whose boundaries sit at
// multiples of kBlock (tensor-local), so the norm sums of a row never depend
// on where a thread's share starts.

template <int DT>
static void range_dt(const TensorDesc& t, const Hyper& h, int64_t lo, int64_t hi) {
  typedef typename Storage<DT>::type T;
  if (t.terms) {
    TermsStep<DT>(t, h).run(lo, hi);
    return;
  }
  T* const w = static_cast<T*>(t.w);
  const T* const g = static_cast<const T*>(t.g);
  T* const buf = static_cast<T*>(t.buf);
  const int mom = (!h.has_momentum || buf == nullptr) ? 0 : (t.first ? 1 : 2);
  const int64_t len_row = t.row_len;
  const bool lam = t.lam != nullptr;
  // per-element lambdas (or rows of one element) are read as they are
  const bool lam_direct = lam && (t.lam_kind == kLamElement || len_row == 1);
  // rows at least this long take lam as a scalar per row piece, shorter ones
  // an expanded per-element stream (each call then covers many rows)
  const bool lam_per_piece = lam && !lam_direct && len_row >= kLongRow;
  const int lam_kind = !lam ? 0 : (lam_per_piece ? 2 : 1);
  const bool mask = t.mask != nullptr && t.mask_kind != kMaskNone;
  const FusedFn<DT> fn = mom == 0   ? pick_fused<DT, 0>(lam_kind, mask, h.has_scale)
                         : mom == 1 ? pick_fused<DT, 1>(lam_kind, mask, h.has_scale)
                                    : pick_fused<DT, 2>(lam_kind, mask, h.has_scale);
  alignas(64) float lamx[kBlock];
  alignas(64) uint8_t keepx[kBlock];
  double acc1 = 0.0, acc2 = 0.0;
  for (int64_t i0 = lo; i0 < hi;) {
    const int64_t i1 = rk_min(hi, (i0 / kBlock + 1) * kBlock);
    const int64_t n = i1 - i0;
    const float* lp = nullptr;
    if (lam && !lam_per_piece) {
      if (lam_direct) {
        lp = t.lam + i0;
      } else {
        expand_rows(t.lam, len_row, i0, n, lamx);
        lp = lamx;
      }
    }
    const uint8_t* kp = nullptr;
    if (mask) {
      if (t.mask_kind == kMaskElement || len_row == 1) {
        kp = t.mask + i0;
      } else {
        expand_rows(t.mask, len_row, i0, n, keepx);
        kp = keepx;
      }
    }
    T* const bp = buf != nullptr ? buf + i0 : nullptr;
    if (lam_per_piece) {
      // one call per piece of a row, with that row's lam as a scalar
      int64_t r = i0 / len_row, o = i0 - r * len_row;
      for (int64_t j = 0; j < n; ++r, o = 0) {
        const int64_t len = rk_min(len_row - o, n - j);
        fn(w + i0 + j, g + i0 + j, bp != nullptr ? bp + j : nullptr, nullptr, t.lam[r],
           kp != nullptr ? kp + j : nullptr, len, h);
        j += len;
      }
    } else {
      fn(w + i0, g + i0, bp, lp, 0.0f, kp, n, h);
    }
    if (t.norms != nullptr) norms_block<DT>(w + i0, i0, n, t, acc1, acc2);
    i0 = i1;
  }
}

static void range(const TensorDesc& t, const Hyper& h, int64_t lo, int64_t hi) {
  switch (t.dtype) {
    case kDtypeF32: range_dt<0>(t, h, lo, hi); break;
    case kDtypeBF16: range_dt<1>(t, h, lo, hi); break;
    default: range_dt<2>(t, h, lo, hi); break;
  }
}

static const IsaKernels kernels = {&range};

}  // namespace RK_NS
}  // namespace detail
}  // namespace regkern
