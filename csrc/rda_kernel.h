// Body of the `rda` kernel family for ONE instruction-set variant.
//
// No include guard on purpose: rda.cpp compiles this file once per variant
// through common/isa_variants.inc, inside the variant's `#pragma GCC target`
// region, with RK_NS naming a namespace of its own and RK_LANES its fp32
// register width. Everything defined here is compiled for that ISA; keep
// standard headers out of this file (rda.cpp includes them first).
//
// Math (regkern/reference/rda.py), in fp32, one rounding per operation, no FMA
// contraction (-ffp-contract=off), so fp32 results match torch bit for bit
// (group rows: up to the order of the norm's sum):
//   g = grad / grad_scale; g = -g if maximize
//   gbar = gbar * a + g / t;  v = W0 - c * gbar
//   gbar *= keep; W0 *= keep; v *= keep                         (under a mask)
//   element: W = sign(v) * max(|v| - tau, 0) + 0
//   group:   W_r = ||v_r|| > 0 ? v_r * max(1 - kappa / ||v_r||, 0) + 0 : 0
// bf16 / fp16 are widened to fp32 and rounded back with the variant's
// storage conversions (common/dtype_kernel.h).
//
// The loops are written on RK_LANES-wide vectors (GCC vector extensions) with
// a scalar head and tail doing the same operations, so every lane rounds like
// the scalar code and the results do not depend on the variant. Options are
// template flags (no branch per element). An fp32 tensor whose STREAM column
// is set writes W with non-temporal stores from an aligned address on.

namespace regkern {
namespace rda_detail {
namespace RK_NS {

using namespace ::regkern::dtype::RK_NS;  // storage conversions (common/dtype_kernel.h)

typedef float vf __attribute__((vector_size(4 * RK_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * RK_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * RK_LANES)));
typedef uint8_t vb __attribute__((vector_size(RK_LANES)));
constexpr int64_t kLanes = RK_LANES;

// ---------------------------------------------------------------------------
// One fp32 value or a vector of them, with the same spelling for both.

RK_AI uint32_t as_bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
}
RK_AI vu as_bits(vf x) { return (vu)x; }
RK_AI float as_float(uint32_t u) {
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
}
RK_AI vf as_float(vu u) { return (vf)u; }

RK_AI float clamp_min0(float x) { return x < 0.0f ? 0.0f : x; }  // keeps a NaN, like clamp_min
RK_AI vf clamp_min0(vf x) {
  const vi below = x < 0.0f;
  return as_float(as_bits(x) & ~(vu)below);
}

RK_AI void load(const float* p, float& x) { x = *p; }
RK_AI void load(const float* p, vf& x) { __builtin_memcpy(&x, p, sizeof x); }
RK_AI void load(const uint8_t* p, float& x) { x = static_cast<float>(*p); }
RK_AI void load(const uint8_t* p, vf& x) {
  vb b;
  __builtin_memcpy(&b, p, sizeof b);
  x = __builtin_convertvector(b, vf);
}
RK_AI void store(float* p, float x) { *p = x; }
RK_AI void store(float* p, vf x) { __builtin_memcpy(p, &x, sizeof x); }

// A non-temporal store of a vector to an address aligned to its size.
RK_AI void store_stream(float* p, vf x) {
#if defined(RK_X86) && RK_LANES == 16
  _mm512_stream_ps(p, (__m512)x);
#elif defined(RK_X86) && RK_LANES == 8
  _mm256_stream_ps(p, (__m256)x);
#elif defined(RK_X86) && RK_LANES == 4
  _mm_stream_ps(p, (__m128)x);
#else
  store(p, x);
#endif
}
RK_AI void store_stream(float* p, float x) { *p = x; }

// The fp32 coefficients of a call on one tensor.
struct Coef {
  float a, t, c, tau, scale;
  uint32_t negate;  // sign bit flipped in g when maximizing
};

// Dual averaging of one value or vector: the new gbar and v (gbar, w0, v
// masked when MASK; `keep` is 0 or 1).
template <bool MASK, bool SCALE, class F>
RK_AI void average(F g, F& gbar, F& w0, F& v, F keep, const Coef& k) {
  if constexpr (SCALE) g = g / k.scale;
  g = as_float(as_bits(g) ^ k.negate);  // -g
  gbar = gbar * k.a + g / k.t;
  v = w0 - k.c * gbar;
  if constexpr (MASK) {
    gbar = gbar * keep;
    v = v * keep;
    w0 = w0 * keep;
  }
}

// sign(v) * max(|v| - tau, 0), a zero always +0.0.
template <class F>
RK_AI F soft_threshold(F v, float tau) {
  const F x = clamp_min0(as_float(as_bits(v) & 0x7FFFFFFFu) - tau);
  return as_float((as_bits(x) & 0x7FFFFFFFu) | (as_bits(v) & 0x80000000u)) + 0.0f;
}

// Element j (F = float) or elements j .. j + kLanes - 1 (F = vf) of a piece.
// GROUP false: out = W; GROUP true: out = v (the row shrinkage needs the norm).
template <bool GROUP, bool MASK, bool SCALE, bool STREAM, class F>
RK_AI void update_at(float* __restrict out, const float* __restrict g, float* __restrict gbar,
                     float* __restrict w0, const uint8_t* __restrict keep, int64_t j, const Coef& k) {
  F gv, gb, w0v, v, kv = F{} + 1.0f;
  load(g + j, gv);
  load(gbar + j, gb);
  load(w0 + j, w0v);
  if constexpr (MASK) load(keep + j, kv);
  average<MASK, SCALE>(gv, gb, w0v, v, kv, k);
  store(gbar + j, gb);
  if constexpr (MASK) store(w0 + j, w0v);
  if constexpr (!GROUP) v = soft_threshold(v, k.tau);
  if constexpr (STREAM) store_stream(out + j, v);
  else store(out + j, v);
}

// First index from which out + j is aligned for non-temporal vector stores
// (0 without STREAM), at most n.
template <bool STREAM>
RK_AI int64_t stream_head(const float* out, int64_t n) {
  if constexpr (!STREAM) return 0;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(out) % sizeof(vf);
  if (mis % sizeof(float) != 0) return n;  // never aligned: all scalar
  const int64_t head = mis ? static_cast<int64_t>((sizeof(vf) - mis) / sizeof(float)) : 0;
  return head < n ? head : n;
}

// The element-wise part of a step over n fp32 values (see update_at); gbar
// and, under a mask, W0 are updated in place.
template <bool GROUP, bool MASK, bool SCALE, bool STREAM>
static void update(float* __restrict out, const float* __restrict g, float* __restrict gbar,
                   float* __restrict w0, const uint8_t* __restrict keep, int64_t n, const Coef& coef) {
  const Coef k = coef;  // a local copy: no store in the loops can alias it
  int64_t j = 0;
  for (const int64_t head = stream_head<STREAM>(out, n); j < head; ++j)
    update_at<GROUP, MASK, SCALE, false, float>(out, g, gbar, w0, keep, j, k);
  for (; j + kLanes <= n; j += kLanes)
    update_at<GROUP, MASK, SCALE, STREAM, vf>(out, g, gbar, w0, keep, j, k);
  for (; j < n; ++j) update_at<GROUP, MASK, SCALE, false, float>(out, g, gbar, w0, keep, j, k);
}

using UpdateFn = void (*)(float*, const float*, float*, float*, const uint8_t*, int64_t, const Coef&);

template <bool GROUP>
static UpdateFn pick_update(bool mask, bool scale, bool stream) {
  if (stream) {
    if (mask) return scale ? &update<GROUP, true, true, true> : &update<GROUP, true, false, true>;
    return scale ? &update<GROUP, false, true, true> : &update<GROUP, false, false, true>;
  }
  if (mask) return scale ? &update<GROUP, true, true, false> : &update<GROUP, true, false, false>;
  return scale ? &update<GROUP, false, true, false> : &update<GROUP, false, false, false>;
}

// Second pass of a group row: v recomputed from the stored gbar and W0 (the
// same fp32 operations, so the same v; masked entries are 0 there already),
// W = v * s + 0.
template <bool STREAM, class F>
RK_AI void shrink_at(float* __restrict out, const float* __restrict gbar, const float* __restrict w0,
                     int64_t j, float c, float s) {
  F gb, w0v;
  load(gbar + j, gb);
  load(w0 + j, w0v);
  const F w = (w0v - c * gb) * s + 0.0f;
  if constexpr (STREAM) store_stream(out + j, w);
  else store(out + j, w);
}

template <bool STREAM>
static void shrink(float* __restrict out, const float* __restrict gbar, const float* __restrict w0,
                   int64_t n, float c, float s, bool nonzero) {
  if (!nonzero) {  // a row of norm 0 (or NaN): W = 0
    for (int64_t j = 0; j < n; ++j) out[j] = 0.0f;
    return;
  }
  int64_t j = 0;
  for (const int64_t head = stream_head<STREAM>(out, n); j < head; ++j)
    shrink_at<false, float>(out, gbar, w0, j, c, s);
  for (; j + kLanes <= n; j += kLanes) shrink_at<STREAM, vf>(out, gbar, w0, j, c, s);
  for (; j < n; ++j) shrink_at<false, float>(out, gbar, w0, j, c, s);
}

#include "common/lane_sums.h"  // sq_sums: the group row norm in fixed lanes

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

RK_AI Coef coef_of(const Desc& d, const Opt& o) {
  return Coef{d.a, d.t, d.c, d.tau, o.scale, o.maximize ? 0x80000000u : 0u};
}

// Elements [lo, hi) of a tensor stepped element-wise. fp32 storage with no
// mask or an element mask runs in one sweep over the range; a row mask is
// expanded, and 16-bit gradients widened, piece by piece into L1 buffers.
template <int DT>
static void range_element(const Desc& d, const Opt& o, int64_t lo, int64_t hi) {
  const Coef k = coef_of(d, o);
  const bool mask = d.mask != nullptr;
  const bool row_mask = mask && d.mask_kind != kRdaMaskElement && d.row_len != 1;
  const UpdateFn fn = pick_update<false>(mask, o.has_scale, DT == 0 && d.stream);
  if (DT == 0 && !row_mask) {
    fn(static_cast<float*>(d.w) + lo, static_cast<const float*>(d.g) + lo, d.gbar + lo, d.w0 + lo,
       mask ? d.mask + lo : nullptr, hi - lo, k);
    return;
  }
  alignas(64) float gf[kPiece], wf[kPiece];
  alignas(64) uint8_t keepx[kPiece];
  for (int64_t i0 = lo; i0 < hi;) {
    const int64_t i1 = rk_min(hi, (i0 / kPiece + 1) * kPiece);
    const int64_t n = i1 - i0;
    const float* gp = as_f32<DT>(d.g, i0, n, gf);
    const uint8_t* kp = nullptr;
    if (row_mask) {
      expand_row_mask(d, i0, n, keepx);
      kp = keepx;
    } else if (mask) {
      kp = d.mask + i0;
    }
    float* out = DT == 0 ? static_cast<float*>(d.w) + i0 : wf;
    fn(out, gp, d.gbar + i0, d.w0 + i0, kp, n, k);
    if constexpr (DT != 0) narrow_n<DT>(wf, static_cast<uint16_t*>(d.w) + i0, n);
    i0 = i1;
  }
}

// Whole rows [lo / row_len, hi / row_len) of a tensor stepped by rows: a first
// pass updates gbar (and W0) and sums ||v_r||^2 in pieces aligned to the row's
// start, a second pass writes W_r while the row is still in cache.
template <int DT>
static void range_group(const Desc& d, const Opt& o, int64_t lo, int64_t hi) {
  alignas(64) float gf[kPiece], vf_[kPiece];
  alignas(64) uint8_t keepx[kPiece];
  const Coef k = coef_of(d, o);
  const int64_t len_row = d.row_len;
  const bool mask = d.mask != nullptr;
  const bool row_mask = mask && d.mask_kind != kRdaMaskElement;
  const UpdateFn fn = pick_update<true>(mask, o.has_scale, false);
  const bool stream = DT == 0 && d.stream;
  for (int64_t r = lo / len_row, r1 = hi / len_row; r < r1; ++r) {
    const int64_t base = r * len_row;
    if (row_mask) {
      for (int64_t j = 0; j < rk_min(kPiece, len_row); ++j) keepx[j] = d.mask[r];
    }
    double acc = 0.0;
    for (int64_t p = 0; p < len_row; p += kPiece) {
      const int64_t n = rk_min(kPiece, len_row - p), i = base + p;
      const float* gp = as_f32<DT>(d.g, i, n, gf);
      const uint8_t* kp = !mask ? nullptr : row_mask ? keepx : d.mask + i;
      fn(vf_, gp, d.gbar + i, d.w0 + i, kp, n, k);
      acc += static_cast<double>(sq_sums(vf_, n));
    }
    const float norm = static_cast<float>(__builtin_sqrt(acc));
    const float s = clamp_min0(1.0f - d.kappa / norm);
    const bool nonzero = norm > 0.0f;
    for (int64_t p = 0; p < len_row; p += kPiece) {
      const int64_t n = rk_min(kPiece, len_row - p), i = base + p;
      if constexpr (DT == 0) {
        float* out = static_cast<float*>(d.w) + i;
        if (stream) shrink<true>(out, d.gbar + i, d.w0 + i, n, d.c, s, nonzero);
        else shrink<false>(out, d.gbar + i, d.w0 + i, n, d.c, s, nonzero);
      } else {
        shrink<false>(vf_, d.gbar + i, d.w0 + i, n, d.c, s, nonzero);
        narrow_n<DT>(vf_, static_cast<uint16_t*>(d.w) + i, n);
      }
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

static const Kernels kernels = {&range};

}  // namespace RK_NS
}  // namespace rda_detail
}  // namespace regkern
