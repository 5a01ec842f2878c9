// Body of the `sgd` kernel family for ONE instruction-set variant.
//
// No include guard on purpose: sgd.cpp includes this file once per variant,
// inside a `#pragma GCC target(...)` region, with RK_NS naming a namespace of
// its own, RK_ISA_NAME the variant's name, RK_F16C its fp16 conversions and
// RK_VEC_LANES its fp32 register width. Everything defined here is
// therefore compiled (and auto-vectorized) for that ISA; keep standard
// headers out of this file (sgd.cpp includes them before the regions).
//
// Math (regkern/reference/sgd.py), in fp32, one rounding per operation, no FMA
// contraction (-ffp-contract=off), so fp32 results match torch bit for bit:
//   g = grad / grad_scale; g = -g if maximize
//   d = g + wd * W (wd != 0) + lam[r] * W (lam given)
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

// ---------------------------------------------------------------------------
// Storage conversions, branch-free bit manipulation so they vectorize.

RK_AI float f32_from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

RK_AI uint32_t bits_of(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

// m ? a : b for a mask m of all ones or all zeros
RK_AI float select(uint32_t m, float a, float b) {
  return f32_from_bits((bits_of(a) & m) | (bits_of(b) & ~m));
}

RK_AI float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// Round to nearest even. NaN -> 0xFFFF, as torch's vectorized `.to()` writes;
// infinities and subnormals come out of the same rounding.
RK_AI uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFu : rounded);
}

// Exact; NaNs are quieted like vcvtph2ps does.
RK_AI float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent+mantissa, fp32 positions
  const uint32_t exp = em & 0x0F800000u;
  const uint32_t normal = em + 0x38000000u;  // rebias 15 -> 127
  const uint32_t infnan = em | 0x7F800000u | ((em & 0x007FE000u) ? 0x00400000u : 0u);
  // subnormal m * 2^-24: (2^-14 + m * 2^-24) - 2^-14, exact
  const float sub = f32_from_bits(em + 0x38800000u) - f32_from_bits(0x38800000u);
  uint32_t out = exp == 0x0F800000u ? infnan : normal;
  out = exp == 0 ? bits_of(sub) : out;
  return f32_from_bits(out | sign);
}

// Round to nearest even; overflow to inf; NaN -> quiet NaN keeping sign and
// the top payload bits (what vcvtps2ph, and so torch's `.to()`, writes).
RK_AI uint16_t f32_to_f16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal results: round 23 -> 10 mantissa bits, rebias 127 -> 15 (the
  // subtraction wraps for small |f|, whose lanes take `sub` below)
  uint32_t normal = (a + 0x0FFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  normal = normal > 0x7C00u ? 0x7C00u : normal;
  // subnormal results (|f| < 2^-14): in |f| + 0.5 the ulp is 2^-24, the
  // half-precision subnormal step, so the FPU's own rounding is the answer
  const uint32_t sub = bits_of(f32_from_bits(a) + 0.5f) - 0x3F000000u;
  const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  uint32_t out = a < 0x38800000u ? sub : normal;
  out = a > 0x7F800000u ? nan : out;
  return static_cast<uint16_t>(out | sign);
}

template <int DT> struct Storage { typedef uint16_t type; };
template <> struct Storage<0> { typedef float type; };

// Array conversions. fp16 uses the F16C instructions where the variant has
// them (RK_F16C: 2 with AVX-512, 1 with AVX2+F16C, 0 bit manipulation).

RK_AI void bf16_to_f32_n(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_f32(src[j]);
}

RK_AI void f32_to_bf16_n(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = f32_to_bf16(src[j]);
}

RK_AI void f16_to_f32_n(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#if RK_F16C
  int64_t j = 0;
#if RK_F16C >= 2
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
#endif
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j]);
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = f16_to_f32(src[j]);
#endif
}

RK_AI void f32_to_f16_n(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#if RK_F16C
  int64_t j = 0;
#if RK_F16C >= 2
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  for (; j < n; ++j) dst[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = f32_to_f16(src[j]);
#endif
}

// Stored 16-bit values <-> fp32 (DT 1 bf16 or 2 fp16).
template <int DT>
RK_AI void widen_n(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  if constexpr (DT == 1) bf16_to_f32_n(src, dst, n);
  else f16_to_f32_n(src, dst, n);
}

template <int DT>
RK_AI void narrow_n(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  if constexpr (DT == 1) f32_to_bf16_n(src, dst, n);
  else f32_to_f16_n(src, dst, n);
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
// lanes live in RK_VEC_LANES-wide registers (one zmm, two ymm or four xmm).
typedef float vacc __attribute__((vector_size(4 * RK_VEC_LANES)));
typedef uint32_t vaccu __attribute__((vector_size(4 * RK_VEC_LANES)));
constexpr int kAccRegs = 16 / RK_VEC_LANES;

RK_AI void abs_sums(const float* __restrict x, int64_t n, float& s1, float& s2) {
  vacc a1[kAccRegs] = {}, a2[kAccRegs] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int q = 0; q < kAccRegs; ++q) {
      vacc v;
      __builtin_memcpy(&v, x + j + q * RK_VEC_LANES, sizeof v);
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

// ---------------------------------------------------------------------------
// The general path: tensors with regularizer terms (L1 subgradient,
// polarization, ADMM pull, proximal map, clamp). Tensors without any of them
// never come here (range_dt's plain path), so absent terms cost nothing. Per
// piece of 128 elements (fp32 storage: in place in W; bf16/fp16: widened to
// fp32 temporaries; short pieces keep the memory streams close in time):
//   d terms    only when L1, polar or ADMM is given: d = g / scale, -g,
//              + wd W, + lam W, + l1 sign(W) (base_d), then one short loop
//              per further term, in the reference's order (add_polar,
//              add_admm); the plain path's kernel then steps with d as its
//              gradient. Otherwise the plain path's kernel computes d itself.
//   step       momentum, W - lr s, mask (`fused`, the plain path's kernel)
//   finish     one short loop per given term: group-lasso row scale or soft
//              threshold, clamp, mask again after a clamp
// then one rounding to the storage dtype; the row norms of the stored W are
// accumulated per kBlock block as on the plain path. The term loops run on a
// piece already in L1 and cost a load and a store per element each:
// selecting them per piece (not per element, not by template) keeps each
// term's cost to itself with a handful of instantiations per ISA. Group
// lasso first updates whole rows into a buffer (TermsStep::run).

// Per-tensor constants of the general path.
struct Terms {
  Hyper h0;  // the call's options minus those base_d applies (scale, maximize, wd)
  float scale, wd, lr, p_lam, p_t, p_m, p_s, rho, lo, hi;
  uint32_t negate, wd_m, lam_m;
};

RK_AI uint32_t mask_of(bool b) { return 0u - static_cast<uint32_t>(b); }

// torch's sign: (0 < x) - (x < 0), so sign(+-0) = sign(NaN) = +0
RK_AI float sign_of(float x) {
  return static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f);
}

// d = g / scale, negated when maximizing, + wd W, + lam W, + l1 sign(W)
// (lam, l1 per element). L1, the commonest d term, is a template flag here:
// one pass fewer over the block (measured ~15% off a large fp32 L1 step).
template <bool SCALE, bool L1>
static void base_d(const float* __restrict w, const float* __restrict g,
                   const float* __restrict lam, const float* __restrict l1, float* __restrict d,
                   int64_t n, const Terms& c) {
  const float scale = c.scale, wd = c.wd;
  const uint32_t negate = c.negate, wd_m = c.wd_m, lam_m = c.lam_m;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j];
    float gv = g[j];
    if constexpr (SCALE) gv = gv / scale;
    gv = f32_from_bits(bits_of(gv) ^ negate);  // -g
    float dv = select(wd_m, gv + wd * wv, gv);
    dv = select(lam_m, dv + lam[j] * wv, dv);
    if constexpr (L1) dv = dv + sign_of(wv) * l1[j];
    d[j] = dv;
  }
}

// d += p_lam * (p_t * sign(W) - sign(W - p_m) + p_s)
static void add_polar(const float* __restrict w, float* __restrict d, int64_t n, const Terms& c) {
  const float p_lam = c.p_lam, p_t = c.p_t, p_m = c.p_m, p_s = c.p_s;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j];
    d[j] = d[j] + p_lam * (p_t * sign_of(wv) - sign_of(wv - p_m) + p_s);
  }
}

// d += rho * (W - target)
static void add_admm(const float* __restrict w, const float* __restrict tgt, float* __restrict d,
                     int64_t n, float rho) {
  for (int64_t j = 0; j < n; ++j) d[j] = d[j] + rho * (w[j] - tgt[j]);
}

// Group lasso: x = x * scale where the row's norm > 0, else +0 (rsc, rok:
// the row's scale and "norm > 0" mask, per element).
static void group_scale(float* __restrict x, const float* __restrict rsc,
                        const uint32_t* __restrict rok, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = select(rok[j], x[j] * rsc[j], 0.0f);
}

// Soft threshold: x = sign(x) * max(|x| - lr * plam, 0) (clamp_min keeps NaN).
static void soft_threshold(float* __restrict x, const float* __restrict plam, int64_t n, float lr) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const float a = __builtin_fabsf(v) - lr * plam[j];
    x[j] = sign_of(v) * select(mask_of(a < 0.0f), 0.0f, a);
  }
}

// torch's clamp, min(max(x, lo), hi): -0 stays -0 for lo = 0, NaN stays NaN.
static void clamp_to(float* __restrict x, int64_t n, float lo, float hi) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const float a = select(mask_of(v < lo), lo, v);
    x[j] = select(mask_of(hi < a), hi, a);
  }
}

static void apply_mask(float* __restrict x, const uint8_t* __restrict keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] * static_cast<float>(keep[j]);
}

typedef void (*BaseFn)(const float*, const float*, const float*, const float*, float*, int64_t,
                       const Terms&);

// One tensor's share [lo, hi) on the general path.
template <int DT>
struct TermsStep {
  typedef typename Storage<DT>::type T;
  const TensorDesc& t;
  const Hyper& h;
  TermScratch& s;
  Terms c;
  FusedFn<0> step;   // the plain kernel on fp32 arrays, computing d itself (no d terms)
  FusedFn<0> step0;  // the plain kernel fed d (d terms)
  BaseFn base;
  int mom;
  bool d_terms;
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
    d_terms = t.l1 != nullptr || t.polar != nullptr || t.target != nullptr;
    const bool mask = t.mask != nullptr;
    const int lam_kind = t.lam != nullptr ? 1 : 0;
    step = mom == 0   ? pick_fused<0, 0>(lam_kind, mask, h.has_scale)
           : mom == 1 ? pick_fused<0, 1>(lam_kind, mask, h.has_scale)
                      : pick_fused<0, 2>(lam_kind, mask, h.has_scale);
    step0 = mom == 0   ? pick_fused<0, 0>(0, mask, false)
            : mom == 1 ? pick_fused<0, 1>(0, mask, false)
                       : pick_fused<0, 2>(0, mask, false);
    const bool l1 = t.l1 != nullptr;
    base = h.has_scale ? (l1 ? &base_d<true, true> : &base_d<true, false>)
                       : (l1 ? &base_d<false, true> : &base_d<false, false>);
    c.h0 = h;
    c.h0.has_wd = false;
    c.h0.maximize = false;
    c.h0.has_scale = false;
    c.scale = h.scale;
    c.wd = h.wd;
    c.lr = h.lr;
    c.negate = h.maximize ? 0x80000000u : 0u;
    c.wd_m = mask_of(h.has_wd);
    c.lam_m = mask_of(t.lam != nullptr);
    c.p_lam = t.polar != nullptr ? t.polar[0] : 0.0f;
    c.p_t = t.polar != nullptr ? t.polar[1] : 0.0f;
    c.p_m = t.polar != nullptr ? t.polar[2] : 0.0f;
    c.p_s = t.polar != nullptr ? t.polar[3] : 0.0f;
    c.rho = t.rho;
    c.lo = t.clamp_lo;
    c.hi = t.clamp_hi;
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

  const uint8_t* keep(int64_t i0, int64_t n) const {
    if (t.mask == nullptr) return kZeroBytes;
    if (t.mask_kind == kMaskElement || t.row_len == 1) return t.mask + i0;
    expand_rows(t.mask, t.row_len, i0, n, s.keep);
    return s.keep;
  }

  // Where the fp32 values of elements from i0 live between compute and
  // finish: W itself for fp32 storage, else `tmp`.
  float* in_w_or(int64_t i0, float* tmp) const {
    if constexpr (DT == 0) return w + i0;
    else return tmp;
  }

  // d of m elements, W (fp32) at wf, gradient at gf, target at tf.
  void grad_terms(const float* wf, const float* gf, const float* tf, const float* lp,
                  const float* l1p, int64_t m) {
    base(wf, gf, lp, l1p, s.d, m, c);
    if (t.polar != nullptr) add_polar(wf, s.d, m, c);
    if (t.target != nullptr) add_admm(wf, tf, s.d, m, c.rho);
  }

  // Update elements [i0, i0 + n) (n <= kBlock, one block) into X: the
  // stepped, masked fp32 values before prox and clamp. fp32 storage: X is
  // W + i0 (in place). The momentum buffer is stored when `store_buf`.
  void compute(int64_t i0, int64_t n, float* __restrict X, bool store_buf) {
    const float* lp = per_element(t.lam, s.lam, i0, n);
    const float* l1p = t.l1 != nullptr ? per_element(t.l1, s.l1, i0, n) : kZeros;
    const uint8_t* kp = keep(i0, n);
    if constexpr (DT == 0) {
      (void)store_buf;
      float* const bp = buf != nullptr ? buf + i0 : nullptr;
      // short pieces: the input streams are read close together in time
      for (int64_t j = 0; j < n; j += kPiece32) {
        const int64_t m = rk_min(kPiece32, n - j);
        float* const bj = bp != nullptr ? bp + j : nullptr;
        if (!d_terms) {
          step(X + j, g + i0 + j, bj, lp + j, 0.0f, kp + j, m, h);
        } else {
          grad_terms(w + i0 + j, g + i0 + j, tgt != nullptr ? tgt + i0 + j : kZeros, lp + j,
                     l1p + j, m);
          step0(X + j, s.d, bj, nullptr, 0.0f, kp + j, m, c.h0);
        }
      }
    } else {
      alignas(64) float gf[kPiece16], tf[kPiece16], bf[kPiece16];
      for (int64_t j = 0; j < n; j += kPiece16) {
        const int64_t m = rk_min(kPiece16, n - j);
        widen_n<DT>(w + i0 + j, X + j, m);
        widen_n<DT>(g + i0 + j, gf, m);
        if (mom == 2) widen_n<DT>(buf + i0 + j, bf, m);
        if (!d_terms) {
          step(X + j, gf, bf, lp + j, 0.0f, kp + j, m, h);
        } else {
          if (tgt != nullptr) widen_n<DT>(tgt + i0 + j, tf, m);
          grad_terms(X + j, gf, tf, lp + j, l1p + j, m);
          step0(X + j, s.d, bf, nullptr, 0.0f, kp + j, m, c.h0);
        }
        if (mom != 0 && store_buf) narrow_n<DT>(bf, buf + i0 + j, m);
      }
    }
  }

  // Prox, clamp and mask on the computed values X of [i0, i0 + n), then
  // store W (rounded once) and accumulate its row norms. rsc, rok: the
  // group-lasso scales (PROX 2).
  void finish(int64_t i0, int64_t n, float* __restrict X, const float* rsc, const uint32_t* rok) {
    if (t.prox == 2) group_scale(X, rsc, rok, n);
    if (t.prox == 1) soft_threshold(X, per_element(t.prox_lam, s.plam, i0, n), n, c.lr);
    if (t.clamp) {
      clamp_to(X, n, c.lo, c.hi);
      if (t.mask != nullptr) apply_mask(X, keep(i0, n), n);
    }
    if constexpr (DT != 0) narrow_n<DT>(X, w + i0, n);
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
      float s1, s2;
      abs_sums(x + p, q - p, s1, s2);
      acc += s2;
      p = q;
    }
    return acc;
  }

  static int64_t block_end(int64_t i0, int64_t hi) { return rk_min(hi, (i0 / kBlock + 1) * kBlock); }

  void run(int64_t lo, int64_t hi) {
    if (t.prox != 2) {
      // short pieces (compute and finish close together in time keep the
      // memory streams going), row norms per block
      for (int64_t i0 = lo; i0 < hi;) {
        const int64_t i1 = block_end(i0, hi);
        for (int64_t p = i0; p < i1; p += kPiece32) {
          const int64_t m = rk_min(kPiece32, i1 - p);
          float* X = in_w_or(p, s.x);
          compute(p, m, X, true);
          finish(p, m, X, nullptr, nullptr);
        }
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
          const int64_t i1 = block_end(i0, c1), n = i1 - i0;
          const float* rsc = s.rs + (i0 - c0);
          const uint32_t* rok = s.rk + (i0 - c0);
          if (len > 1) {
            expand_rows(s.rs, len, i0 - c0, n, s.rsx);
            expand_rows(s.rk, len, i0 - c0, n, s.rkx);
            rsc = s.rsx;
            rok = s.rkx;
          }
          finish(i0, n, X0 + (i0 - c0), rsc, rok);
          norms(i0, n);
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
        float s1, s2;
        abs_sums(X, i1 - i0, s1, s2);
        sumsq += s2;
        i0 = i1;
      }
      float scale;
      uint32_t ok;
      row_scale(e0 / len, sumsq, scale, ok);
      for (int64_t k = 0; k < kBlock; ++k) {
        s.rsx[k] = scale;
        s.rkx[k] = ok;
      }
      for (int64_t i0 = e0; i0 < e0 + len;) {
        const int64_t i1 = block_end(i0, e0 + len);
        float* X = in_w_or(i0, s.x);
        if constexpr (DT != 0) compute(i0, i1 - i0, X, true);
        finish(i0, i1 - i0, X, s.rsx, s.rkx);
        norms(i0, i1 - i0);
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
  // rows at least this long take lam as a scalar per row piece, shorter ones
  // an expanded per-element stream (each call then covers many rows)
  const bool lam_per_piece = lam && len_row >= kLongRow;
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
      if (len_row == 1) {
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

// ---------------------------------------------------------------------------
// Conversion entry points (for the exhaustive tests).

static void to_f32(int dtype, const uint16_t* src, float* dst, int64_t n) {
  if (dtype == kDtypeBF16) bf16_to_f32_n(src, dst, n);
  else f16_to_f32_n(src, dst, n);
}

static void from_f32(int dtype, const float* src, uint16_t* dst, int64_t n) {
  if (dtype == kDtypeBF16) f32_to_bf16_n(src, dst, n);
  else f32_to_f16_n(src, dst, n);
}

static const IsaKernels kernels = {RK_ISA_NAME, &range, &to_f32, &from_f32};

}  // namespace RK_NS
}  // namespace detail
}  // namespace regkern
