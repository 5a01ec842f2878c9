// Body of the `admm` kernel family for ONE instruction-set variant.
//
// No include guard on purpose: admm.cpp compiles this file once per variant
// through common/isa_variants.inc, inside the variant's `#pragma GCC target`
// region, with RK_NS naming a namespace of its own. Keep standard headers out
// of this file.
//
// Math (regkern/reference/admm.py), fp32, one rounding per operation, no FMA
// contraction (-ffp-contract=off), so fp32 results match the reference bit
// for bit (up to the sign of a zero):
//   scores, mode 0:  s = |W + U| (NaN -> +inf)
//   scores, mode 1:  s_r = sum over row r of double(W + U)^2 (NaN -> +inf),
//                    lanes j % 8 summed in a fixed order: independent of ISA
//                    and threads (a row is summed by one thread)
//   update: v = W + U; Z = keep ? v : 0 (modes 0, 1) or v - clamp(v, -tau, tau)
//           (mode 2); U = (U + W) - Z; target = Z - U
//   mode 0 keep: s > thr, or s == thr at a flat index <= cut
//   SAS: W_breve = (c W_breve + anchor - g) * inv_cr; W = b W_breve + b1 W;
//        outer step (Z, U, anchor) where due; W_hat = bn W_breve + bn1 W
// bf16 / fp16 are widened to fp32 and rounded back (to nearest even) with
// the variant's storage conversions (common/dtype_kernel.h).

namespace regkern {
namespace admm_detail {
namespace RK_NS {

using namespace ::regkern::dtype::RK_NS;  // storage conversions (common/dtype_kernel.h)

// ------------------------------------------------------------------ scores

static void magnitudes(float* __restrict s, const float* __restrict w, const float* __restrict u, int64_t n) {
  const float inf = __builtin_inff();
  for (int64_t j = 0; j < n; ++j) {
    const float a = __builtin_fabsf(w[j] + u[j]);
    s[j] = a != a ? inf : a;
  }
}

template <int DT>
static void scores_element(const ZuDesc& d, int64_t lo, int64_t hi) {
  alignas(64) float wf[kPiece];
  float* out = static_cast<float*>(d.scores);
  for (int64_t i0 = lo; i0 < hi;) {
    const int64_t i1 = rk_min(hi, (i0 / kPiece + 1) * kPiece), n = i1 - i0;
    magnitudes(out + i0, as_f32<DT>(d.w, i0, n, wf), d.u + i0, n);
    i0 = i1;
  }
}

typedef double lanes8 __attribute__((vector_size(64)));

// acc lane k += squares of v[j] with j % 8 == k (v: fp32 W + U of n elements).
RK_AI void add_squares(lanes8& acc, const float* __restrict w, const float* __restrict u, int64_t n) {
  alignas(64) double sq[kPiece];
  for (int64_t j = 0; j < n; ++j) {
    const double v = static_cast<double>(w[j] + u[j]);
    sq[j] = v * v;  // exact: a 24-bit significand squared fits in 53 bits
  }
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    lanes8 x;
    __builtin_memcpy(&x, sq + j, sizeof x);
    acc += x;
  }
  for (int k = 0; j < n; ++j, ++k) acc[k] += sq[j];
}

template <int DT>
static void scores_rows(const ZuDesc& d, int64_t lo, int64_t hi) {
  alignas(64) float wf[kPiece];
  const int64_t len = d.row_len;
  if (len <= 0) return;
  double* out = static_cast<double*>(d.scores);
  for (int64_t r = lo / len, r1 = hi / len; r < r1; ++r) {
    lanes8 acc = {};
    for (int64_t p = 0; p < len; p += kPiece) {
      const int64_t n = rk_min(kPiece, len - p), i = r * len + p;
      add_squares(acc, as_f32<DT>(d.w, i, n, wf), d.u + i, n);
    }
    double lane[8];
    __builtin_memcpy(lane, &acc, sizeof lane);
    for (int half = 4; half >= 1; half >>= 1)
      for (int k = 0; k < half; ++k) lane[k] += lane[k + half];
    out[r] = lane[0] != lane[0] ? __builtin_inf() : lane[0];
  }
}

// keys[j] = the bits of the score |W + U| of element i + j (NaN -> +inf), j < n <= kPiece:
// non-negative floats, so the bits order like the scores (the selection's radix keys).
static void keys(const ZuDesc& d, int64_t i, int64_t n, uint32_t* out) {
  alignas(64) float wf[kPiece];
  float* s = reinterpret_cast<float*>(out);
  switch (d.dtype) {
    case 0: magnitudes(s, as_f32<0>(d.w, i, n, wf), d.u + i, n); break;
    case 1: magnitudes(s, as_f32<1>(d.w, i, n, wf), d.u + i, n); break;
    default: magnitudes(s, as_f32<2>(d.w, i, n, wf), d.u + i, n); break;
  }
}

static void scores(const ZuDesc& d, int64_t lo, int64_t hi) {
  if (d.mode == kModeElement) {
    switch (d.dtype) {
      case 0: scores_element<0>(d, lo, hi); break;
      case 1: scores_element<1>(d, lo, hi); break;
      default: scores_element<2>(d, lo, hi); break;
    }
  } else if (d.mode == kModeRows) {
    switch (d.dtype) {
      case 0: scores_rows<0>(d, lo, hi); break;
      case 1: scores_rows<1>(d, lo, hi); break;
      default: scores_rows<2>(d, lo, hi); break;
    }
  }
}

// ------------------------------------------------------------------ Z/U update

enum Keep { kThreshold, kMask, kSoft };

template <int KIND, bool TARGET>
static void update(float* __restrict z, float* __restrict u, float* __restrict t, const float* __restrict w,
                   const uint8_t* __restrict keep, int64_t n, float thr, bool tie) {
  const float inf = __builtin_inff(), tau = thr;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j], uv = u[j];
    const float v = wv + uv;
    float zv;
    if constexpr (KIND == kThreshold) {
      float s = __builtin_fabsf(v);
      s = s != s ? inf : s;
      const bool k = (s > thr) | ((s == thr) & tie);
      zv = k ? v : 0.0f;
    } else if constexpr (KIND == kMask) {
      zv = keep[j] != 0 ? v : 0.0f;
    } else {
      const float c = v < -tau ? -tau : (v > tau ? tau : v);  // a NaN stays NaN, like clamp
      zv = v - c;
    }
    const float un = (uv + wv) - zv;
    z[j] = zv;
    u[j] = un;
    if constexpr (TARGET) t[j] = zv - un;
  }
}

// out[j] = row_keep of element i + j, j < n
RK_AI void expand_rows(const ZuDesc& d, int64_t i, int64_t n, uint8_t* __restrict out) {
  int64_t r = i / d.row_len, o = i - r * d.row_len, j = 0;
  while (j < n) {
    const int64_t len = rk_min(d.row_len - o, n - j);
    __builtin_memset(out + j, d.row_keep[r] != 0 ? 1 : 0, static_cast<size_t>(len));
    j += len;
    o = 0;
    ++r;
  }
}

template <int DT, bool TARGET>
static void zu_range(const ZuDesc& d, int64_t lo, int64_t hi) {
  alignas(64) float wf[kPiece], tf[kPiece];
  alignas(64) uint8_t keep[kPiece];
  for (int64_t i0 = lo; i0 < hi;) {
    const int64_t i1 = rk_min(hi, (i0 / kPiece + 1) * kPiece), n = i1 - i0;
    const float* wp = as_f32<DT>(d.w, i0, n, wf);
    float* z = d.z + i0;
    float* u = d.u + i0;
    float* t = DT == 0 && TARGET ? static_cast<float*>(d.target) + i0 : tf;
    if (d.mode == kModeElement) {
      // ties at the threshold are kept up to flat index cut: split the piece there
      const int64_t split = d.cut + 1 <= i0 ? 0 : d.cut + 1 >= i1 ? n : d.cut + 1 - i0;
      if (split > 0) update<kThreshold, TARGET>(z, u, t, wp, nullptr, split, d.threshold, true);
      if (split < n)
        update<kThreshold, TARGET>(z + split, u + split, t + split, wp + split, nullptr, n - split, d.threshold,
                                   false);
    } else if (d.mode == kModeRows) {
      expand_rows(d, i0, n, keep);
      update<kMask, TARGET>(z, u, t, wp, keep, n, 0.0f, false);
    } else {
      update<kSoft, TARGET>(z, u, t, wp, nullptr, n, d.threshold, false);
    }
    if constexpr (DT != 0 && TARGET) narrow_n<DT>(tf, static_cast<uint16_t*>(d.target) + i0, n);
    i0 = i1;
  }
}

static void zu(const ZuDesc& d, int64_t lo, int64_t hi) {
  const bool target = d.target != nullptr;
  switch (d.dtype) {
    case 0: target ? zu_range<0, true>(d, lo, hi) : zu_range<0, false>(d, lo, hi); break;
    case 1: target ? zu_range<1, true>(d, lo, hi) : zu_range<1, false>(d, lo, hi); break;
    default: target ? zu_range<2, true>(d, lo, hi) : zu_range<2, false>(d, lo, hi); break;
  }
}

// ------------------------------------------------------------------ SAS-ADMM

template <bool OUTER>
static void sas_piece(float* __restrict out, const float* __restrict g, float* __restrict w,
                      float* __restrict wb, float* __restrict anchor, float* __restrict z, float* __restrict u,
                      int64_t n, const SasDesc& d) {
  const float c = d.c, inv_cr = d.inv_cr, b = d.b, b1 = d.b1, bn = d.bn, bn1 = d.bn1;
  const float rb = d.rb, inv_beta = d.inv_beta, tau = d.tau, sb = d.sb, beta = d.beta, rho = d.rho;
  for (int64_t j = 0; j < n; ++j) {
    const float wb_new = ((c * wb[j] + anchor[j]) - g[j]) * inv_cr;
    const float w_new = b * wb_new + b1 * w[j];
    if constexpr (OUTER) {
      const float d1 = w_new - z[j];
      const float u_half = u[j] - rb * d1;
      const float x = w_new - u_half * inv_beta;
      const float cl = x < -tau ? -tau : (x > tau ? tau : x);
      const float z_new = x - cl;
      const float d2 = w_new - z_new;
      const float u_new = u_half - sb * d2;
      anchor[j] = rho * w_new + (u_new - beta * d2);
      z[j] = z_new;
      u[j] = u_new;
    }
    wb[j] = wb_new;
    w[j] = w_new;
    out[j] = bn * wb_new + bn1 * w_new;
  }
}

template <int DT>
static void sas_range(const SasDesc& d, int64_t lo, int64_t hi) {
  alignas(64) float gf[kPiece], pf[kPiece];
  for (int64_t i0 = lo; i0 < hi;) {
    const int64_t i1 = rk_min(hi, (i0 / kPiece + 1) * kPiece), n = i1 - i0;
    const float* gp = as_f32<DT>(d.g, i0, n, gf);
    float* out = DT == 0 ? static_cast<float*>(d.p) + i0 : pf;
    if (d.outer) {
      sas_piece<true>(out, gp, d.w + i0, d.wb + i0, d.anchor + i0, d.z + i0, d.u + i0, n, d);
    } else {
      sas_piece<false>(out, gp, d.w + i0, d.wb + i0, d.anchor + i0, d.z + i0, d.u + i0, n, d);
    }
    if constexpr (DT != 0) narrow_n<DT>(pf, static_cast<uint16_t*>(d.p) + i0, n);
    i0 = i1;
  }
}

static void sas(const SasDesc& d, int64_t lo, int64_t hi) {
  switch (d.dtype) {
    case 0: sas_range<0>(d, lo, hi); break;
    case 1: sas_range<1>(d, lo, hi); break;
    default: sas_range<2>(d, lo, hi); break;
  }
}

static const Kernels kernels = {&scores, &keys, &zu, &sas};

}  // namespace RK_NS
}  // namespace admm_detail
}  // namespace regkern
