// Storage conversions of ONE instruction-set variant, shared by every kernel
// family: bf16 / fp16 <-> fp32, exactly as torch's `.to()` rounds.
//
// No include guard on purpose: common/isa_variants.inc includes this file in
// each variant's target region, before the family's kernel body, with RK_NS
// and RK_F16C set. A body reaches it with
// `using namespace ::regkern::dtype::RK_NS;` and so calls the conversions of
// its own variant inline (no call through another family's table).
// Dtype codes (DT): 0 float32, 1 bfloat16, 2 float16.

namespace regkern {
namespace dtype {
namespace RK_NS {

// Scalar conversions: branch-free bit manipulation, so that their loops
// vectorize on every variant.

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

// GCC's 512-bit F16C intrinsics pass an "undefined" register as their unused
// merge source, which -Wmaybe-uninitialized reports wherever they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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
#pragma GCC diagnostic pop

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

// A piece [i, i + n) of a W-shaped tensor as fp32: the storage itself, or
// widened into tmp.
template <int DT>
RK_AI const float* as_f32(const void* src, int64_t i, int64_t n, float* tmp) {
  if constexpr (DT == 0) {
    return static_cast<const float*>(src) + i;
  } else {
    widen_n<DT>(static_cast<const uint16_t*>(src) + i, tmp, n);
    return tmp;
  }
}

}  // namespace RK_NS
}  // namespace dtype
}  // namespace regkern
