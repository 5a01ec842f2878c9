// Body of the `rda` kernel family for ONE instruction-set variant.
//
// No include guard on purpose: rda.cpp includes this file once per variant,
// inside a `#pragma GCC target(...)` region, with RK_NS naming a namespace of
// its own and RK_ISA_NAME the variant's name (the pattern of sgd_kernel.h).
// Everything defined here is compiled (and auto-vectorized) for that ISA;
// keep standard headers out of this file (rda.cpp includes them first).
//
// Math (regkern/reference/rda.py), in fp32, one rounding per operation, no FMA
// contraction (-ffp-contract=off), so fp32 results match torch bit for bit
// (group rows: up to the order of the norm's sum):
//   g = grad / grad_scale; g = -g if maximize
//   gbar = gbar * a + g / t;  v = W0 - c * gbar
//   gbar *= keep; W0 *= keep; v *= keep                         (under a mask)
//   element: W = sign(v) * max(|v| - tau, 0) + 0
//   group:   W_r = ||v_r|| > 0 ? v_r * max(1 - kappa / ||v_r||, 0) + 0 : 0
// bf16 / fp16 are widened to fp32 and rounded back with the sgd family's
// conversions of the active variant (regkern::convert_to_f32 / _from_f32).

namespace regkern {
namespace rda_detail {
namespace RK_NS {

RK_AI float from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

RK_AI uint32_t to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

// The element-wise part of a step over n fp32 values. GROUP false: out = W
// (soft threshold); GROUP true: out = v (the group shrinkage needs the whole
// row first). gbar and, under a mask, W0 are updated in place.
template <bool GROUP, bool MASK, bool SCALE>
static void update(float* __restrict out, const float* __restrict g, float* __restrict gbar,
                   float* __restrict w0, const uint8_t* __restrict keep, int64_t n, const Desc& d,
                   const Opt& o) {
  const float a = d.a, t = d.t, c = d.c, tau = d.tau, scale = o.scale;
  const uint32_t negate = o.maximize ? 0x80000000u : 0u;
  for (int64_t j = 0; j < n; ++j) {
    float gv = g[j];
    if constexpr (SCALE) gv = gv / scale;
    gv = from_bits(to_bits(gv) ^ negate);  // -g
    float gb = gbar[j] * a + gv / t;
    const float w0v = w0[j];
    float v = w0v - c * gb;
    if constexpr (MASK) {
      const float k = static_cast<float>(keep[j]);
      gb = gb * k;
      v = v * k;
      w0[j] = w0v * k;
    }
    gbar[j] = gb;
    if constexpr (GROUP) {
      out[j] = v;
    } else {
      float x = __builtin_fabsf(v) - tau;
      x = x < 0.0f ? 0.0f : x;  // keeps a NaN, like clamp_min
      out[j] = __builtin_copysignf(x, v) + 0.0f;
    }
  }
}

// Second pass of a group row: v recomputed from the stored gbar and W0 (the
// same fp32 operations, so the same v; masked entries are 0 there already).
static void shrink(float* __restrict out, const float* __restrict gbar, const float* __restrict w0,
                   int64_t n, float c, float s, bool nonzero) {
  if (!nonzero) {
    for (int64_t j = 0; j < n; ++j) out[j] = 0.0f;
    return;
  }
  for (int64_t j = 0; j < n; ++j) out[j] = (w0[j] - c * gbar[j]) * s + 0.0f;
}

// Sum of x^2 over n values in 16 fixed lanes (lane k: elements j % 16 == k)
// added up in a fixed order: the result depends on n only, not on the ISA.
typedef float lanes16 __attribute__((vector_size(64)));

RK_AI float sum_squares(const float* __restrict x, int64_t n) {
  lanes16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    lanes16 v;
    __builtin_memcpy(&v, x + j, sizeof v);
    acc += v * v;
  }
  float r[16];
  __builtin_memcpy(r, &acc, sizeof r);
  for (int k = 0; j < n; ++j, ++k) r[k] += x[j] * x[j];
  for (int half = 8; half >= 1; half >>= 1)
    for (int k = 0; k < half; ++k) r[k] += r[k + half];
  return r[0];
}

using UpdateFn = void (*)(float*, const float*, float*, float*, const uint8_t*, int64_t, const Desc&,
                          const Opt&);

template <bool GROUP>
static UpdateFn pick_update(bool mask, bool scale) {
  if (mask) return scale ? &update<GROUP, true, true> : &update<GROUP, true, false>;
  return scale ? &update<GROUP, false, true> : &update<GROUP, false, false>;
}

// Gradient piece [i, i + n) as fp32: the storage itself, or widened into tmp.
template <int DT>
RK_AI const float* grad_f32(const Desc& d, int64_t i, int64_t n, float* tmp) {
  if constexpr (DT == 0) {
    return static_cast<const float*>(d.g) + i;
  } else {
    convert_to_f32(DT, static_cast<const uint16_t*>(d.g) + i, tmp, n);
    return tmp;
  }
}

// out[j] = row mask of element i + j, j < n
RK_AI void expand_row_mask(const Desc& d, int64_t i, int64_t n, uint8_t* __restrict out) {
  int64_t r = i / d.row_len, o = i - r * d.row_len, j = 0;
  while (j < n) {
    const int64_t len = rk_min(d.row_len - o, n - j);
    const uint8_t v = d.mask[r];
    for (int64_t k = 0; k < len; ++k) out[j + k] = v;
    j += len;
    o = 0;
    ++r;
  }
}

// Elements [lo, hi) of a tensor stepped element-wise.
template <int DT>
static void range_element(const Desc& d, const Opt& o, int64_t lo, int64_t hi) {
  alignas(64) float gf[kPiece], wf[kPiece];
  alignas(64) uint8_t keepx[kPiece];
  const bool mask = d.mask != nullptr;
  const UpdateFn fn = pick_update<false>(mask, o.has_scale);
  for (int64_t i0 = lo; i0 < hi;) {
    const int64_t i1 = rk_min(hi, (i0 / kPiece + 1) * kPiece);
    const int64_t n = i1 - i0;
    const float* gp = grad_f32<DT>(d, i0, n, gf);
    const uint8_t* kp = nullptr;
    if (mask) {
      if (d.mask_kind == kRdaMaskElement || d.row_len == 1) {
        kp = d.mask + i0;
      } else {
        expand_row_mask(d, i0, n, keepx);
        kp = keepx;
      }
    }
    float* out = DT == 0 ? static_cast<float*>(d.w) + i0 : wf;
    fn(out, gp, d.gbar + i0, d.w0 + i0, kp, n, d, o);
    if constexpr (DT != 0) convert_from_f32(DT, wf, static_cast<uint16_t*>(d.w) + i0, n);
    i0 = i1;
  }
}

// Whole rows [lo / row_len, hi / row_len) of a tensor stepped by rows: a first
// pass updates gbar (and W0) and sums ||v_r||^2 in pieces aligned to the row's
// start, a second pass writes W_r while the row is still in cache.
template <int DT>
static void range_group(const Desc& d, const Opt& o, int64_t lo, int64_t hi) {
  alignas(64) float gf[kPiece], vf[kPiece];
  alignas(64) uint8_t keepx[kPiece];
  const int64_t len_row = d.row_len;
  const bool mask = d.mask != nullptr;
  const bool row_mask = mask && d.mask_kind != kRdaMaskElement;
  const UpdateFn fn = pick_update<true>(mask, o.has_scale);
  for (int64_t r = lo / len_row, r1 = hi / len_row; r < r1; ++r) {
    const int64_t base = r * len_row;
    if (row_mask) {
      for (int64_t k = 0; k < rk_min(kPiece, len_row); ++k) keepx[k] = d.mask[r];
    }
    double acc = 0.0;
    for (int64_t p = 0; p < len_row; p += kPiece) {
      const int64_t n = rk_min(kPiece, len_row - p), i = base + p;
      const float* gp = grad_f32<DT>(d, i, n, gf);
      const uint8_t* kp = !mask ? nullptr : row_mask ? keepx : d.mask + i;
      fn(vf, gp, d.gbar + i, d.w0 + i, kp, n, d, o);
      acc += static_cast<double>(sum_squares(vf, n));
    }
    const float norm = static_cast<float>(__builtin_sqrt(acc));
    float s = 1.0f - d.kappa / norm;
    s = s < 0.0f ? 0.0f : s;
    const bool nonzero = norm > 0.0f;
    for (int64_t p = 0; p < len_row; p += kPiece) {
      const int64_t n = rk_min(kPiece, len_row - p), i = base + p;
      float* out = DT == 0 ? static_cast<float*>(d.w) + i : vf;
      shrink(out, d.gbar + i, d.w0 + i, n, d.c, s, nonzero);
      if constexpr (DT != 0) convert_from_f32(DT, vf, static_cast<uint16_t*>(d.w) + i, n);
    }
  }
}

static void range(const Desc& d, const Opt& o, int64_t lo, int64_t hi) {
  if (d.group) {
    switch (d.dtype) {
      case 0: range_group<0>(d, o, lo, hi); break;
      case 1: range_group<1>(d, o, lo, hi); break;
      default: range_group<2>(d, o, lo, hi); break;
    }
  } else {
    switch (d.dtype) {
      case 0: range_element<0>(d, o, lo, hi); break;
      case 1: range_element<1>(d, o, lo, hi); break;
      default: range_element<2>(d, o, lo, hi); break;
    }
  }
}

static const Kernels kernels = {RK_ISA_NAME, &range};

}  // namespace RK_NS
}  // namespace rda_detail
}  // namespace regkern
