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
//   buf = d (first step) or mu * buf + (1 - dampening) * d
//   s = d + mu * buf (nesterov) or buf (or d when momentum == 0)
//   W = (W - lr * s) * mask, buf = buf * mask
//   norms[r] = L1, L2, mean |W_r| of the stored W (accumulated while writing).

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
// Step elements [lo, hi) of one tensor in blocks whose boundaries sit at
// multiples of kBlock (tensor-local), so the norm sums of a row never depend
// on where a thread's share starts.

template <int DT>
static void range_dt(const TensorDesc& t, const Hyper& h, int64_t lo, int64_t hi) {
  typedef typename Storage<DT>::type T;
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
