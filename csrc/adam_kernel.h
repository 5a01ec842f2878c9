// Body of the `adam` kernel family for ONE instruction-set variant.
//
// No include guard on purpose: adam.cpp compiles this file once per variant
// through common/isa_variants.inc (see sgd_kernel.h for the conventions);
// keep standard headers out of it.
//
// Math (regkern/reference/adam.py), fp32, one rounding per operation, FMA
// exactly where torch's CPU kernels have one (__builtin_fmaf; the build
// contracts nothing else, -ffp-contract=off):
//   g = grad / grad_scale; g = -g if maximize
//   h = fma(wd, W, g)                                 (Adam's weight decay)
//   r = the regularizer terms of the sgd family (term_math.h, add_terms_at)
//   x = W * (1 - lr decay)                            (AdamW's decay)
//   coupled: h = h + terms;  decoupled: x = x - lr * (0 + terms)
//   m = fma(w, h - m, m) or fma(w - 1, h - m, h)      (torch's lerp, w = 1 - b1)
//   v = fma((1 - b2) * h, h, v * b2);  vmax = max(vmax, v) (amsgrad)
//   W = x + (-step_size * m) / (sqrt(v or vmax) / bc2_sqrt + eps)
//                      (sqrt: torch's own, MKL's vmsSqrt where torch uses it)
//   W, m, v, vmax *= mask; W = prox(W), clamp, mask again; row norms
// Per block of kBlock elements the per-row / per-column streams are expanded
// once (TermRunner, common/term_math.h), or, for the fused loop on rows of
// kLongRow elements or more, passed per row piece as the row's values
// (Streams::rows: lambda, mask, threshold); then piece after piece of kPiece16
// elements (kAdamPiece16 on the bf16 in-place path), in L1: the terms and
// moments (adam_fused, one loop, for tensors whose terms are at most a
// lambda: plain Adam / AdamW and L2; else the terms pass adam_terms then the
// moments pass adam_moments), the square roots
// (torch_sqrt_n), and the W pass (adam_weights), each instantiated for the
// flags that matter. Working piece by piece keeps the memory streams busy
// while a piece computes, with a software prefetch RK_PREFETCH_AHEAD fp32
// elements' worth of bytes ahead (measured: the block-wise passes left the
// streams idle and ran 1.6x slower). bf16/fp16 storage widens each piece to
// fp32 and rounds W, m, v, vmax back once; bf16 tensors of the fused case
// (not under the group lasso) skip the widened copies: adam_fused reads the
// bf16 storage and stores the moments, adam_weights stores W, converting
// inline (same roundings; measured 10-15% faster per element at one thread.
// An explicit 8-lane intrinsic version of the whole update in one loop, the
// sqrt inline, measured 20% slower than these auto-vectorized 16-lane passes
// on Zen 4: the divisions and conversions want the 512-bit width). Group lasso, row norms and thread
// cuts are TermRunner's, as for sgd.

#include "common/term_math.h"  // select, row norms, expansions, terms, TermRunner

#ifndef RK_PREFETCH_AHEAD
#define RK_PREFETCH_AHEAD 2048
#endif

namespace regkern {
namespace detail {
namespace RK_NS {

// Per-tensor constants of the moments and W passes.
struct AdamConsts {
  float coef, b2, one_b2, eps, neg_ss, bc2, lo, hi;
  float lr;  // the soft threshold lr * prox_lam[r] of a ROWS W pass
  uint32_t small;
};

// The terms pass over n elements: h (the gradient the moments see) and x (W
// before the moment step: decayed, minus lr * the decoupled terms). F: the
// kD* bits (kDScale: divide by grad_scale; the term bits). COUPLED: the terms
// join h, else they are subtracted from x.
template <int F, bool COUPLED>
static void adam_terms(const float* __restrict w, const float* __restrict g, const float* __restrict lam,
                       const float* __restrict lamc, const float* __restrict l1, const float* __restrict tgt,
                       float* __restrict hout, float* __restrict xout, int64_t n, const Terms& c) {
  constexpr bool kTerms = (F & ~kDScale) != 0;
  const float scale = c.scale, wd = c.wd, lr = c.lr, keep_w = c.mu;  // mu: 1 - lr * decay here
  const TermCoefs k = coefs_of(c);
  const uint32_t negate = c.negate, wd_m = c.wd_m;
  (void)lr;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j];
    float gv = g[j];
    if constexpr ((F & kDScale) != 0) gv = gv / scale;
    gv = f32_from_bits(bits_of(gv) ^ negate);  // -g
    float hv = select(wd_m, __builtin_fmaf(wd, wv, gv), gv);
    float xv = wv * keep_w;
    if constexpr (kTerms) {
      if constexpr (COUPLED) {
        hv = add_terms_at<F>(hv, wv, lam, lamc, l1, tgt, j, k);
      } else {
        const float r = add_terms_at<F>(0.0f, wv, lam, lamc, l1, tgt, j, k);
        xv = xv - lr * r;
      }
    }
    hout[j] = hv;
    xout[j] = xv;
  }
}

typedef void (*AdamTermsFn)(const float*, const float*, const float*, const float*, const float*, const float*,
                            float*, float*, int64_t, const Terms&);

// Index F * 2 + COUPLED.
template <int... I>
RK_AI AdamTermsFn adam_terms_for(int i, std::integer_sequence<int, I...>) {
  static constexpr AdamTermsFn table[] = {&adam_terms<I / 2, (I & 1) != 0>...};
  return table[i];
}

// torch.maximum: the larger value, NaN if either is NaN.
RK_AI float maximum(float a, float b) {
  const float mx = select(mask_of(a < b), b, a);
  return select(mask_of(a != a || b != b), a + b, mx);
}

// Whether x is off the main path of MKL's sqrt algorithm (sqrt_ex below):
// its bits outside [0x00800000, 0x7f7ff000] (not a positive normal, or near
// FLT_MAX). Branch-free, so the loops that OR it up vectorize.
RK_AI uint32_t sqrt_special(float x) {
  return static_cast<uint32_t>(bits_of(x) - 0x00800000u > 0x7f7ff000u - 0x00800000u);
}

// The moments of one element from h: m, v (vmax) stored times the mask
// (fp32 values, in place); the unmasked m (mu) and the second moment the
// step divides by (sq: v, or vmax under amsgrad) for the W pass. Returns
// sqrt_special(sq).
// T: the storage of m, v, vmax (fp32, or bf16 read and rounded inline).
// kv: the element's mask value (read only under MASK).
template <bool AMS, bool MASK, typename T = float>
RK_AI uint32_t moment_at(float hv, T* __restrict m, T* __restrict v, T* __restrict vmax, uint8_t kv,
                         float* __restrict mu, float* __restrict sq, int64_t j, float coef, uint32_t small,
                         float b2, float one_b2) {
  const float mv = ld_f32(m, j);
  const float mn = __builtin_fmaf(coef, hv - mv, select(small, mv, hv));  // torch's lerp
  const float vn = __builtin_fmaf(one_b2 * hv, hv, ld_f32(v, j) * b2);    // mul_, addcmul_
  float second = vn;
  if constexpr (AMS) second = maximum(ld_f32(vmax, j), vn);
  mu[j] = mn;
  sq[j] = second;
  float k = 1.0f;
  if constexpr (MASK) k = static_cast<float>(kv);
  st_f32(m, j, MASK ? mn * k : mn);
  st_f32(v, j, MASK ? vn * k : vn);
  if constexpr (AMS) st_f32(vmax, j, MASK ? second * k : second);
  return sqrt_special(second);
}

// The moments pass over n elements from h (the general path's second pass).
template <bool AMS, bool MASK>
static uint32_t adam_moments(const float* __restrict h, float* __restrict m, float* __restrict v,
                             float* __restrict vmax, const uint8_t* __restrict keep, float* __restrict mu,
                             float* __restrict sq, int64_t n, const AdamConsts& a) {
  const float coef = a.coef, b2 = a.b2, one_b2 = a.one_b2;
  const uint32_t small = a.small;
  uint32_t special = 0;
  for (int64_t j = 0; j < n; ++j)
    special |= moment_at<AMS, MASK>(h[j], m, v, vmax, MASK ? keep[j] : uint8_t{1}, mu, sq, j, coef, small, b2,
                                    one_b2);
  return special;
}

typedef uint32_t (*AdamMomentsFn)(const float*, float*, float*, float*, const uint8_t*, float*, float*, int64_t,
                                  const AdamConsts&);

// The terms and moments passes in one loop, for the tensors whose terms are
// at most a lambda (F: kDScale, kDLam bits): plain Adam / AdamW and L2.
// T: the storage of w, g, m, v, vmax: fp32, or bf16 read and rounded inline
// (the moments stored here, rounded once). ROWS: the n elements lie in one
// row, lam and keep hold its single value (Streams::rows).
template <typename T, int F, bool COUPLED, bool AMS, bool MASK, bool ROWS>
static uint32_t adam_fused(const T* __restrict w, const T* __restrict g, const float* __restrict lam,
                           T* __restrict m, T* __restrict v, T* __restrict vmax,
                           const uint8_t* __restrict keep, float* __restrict xout, float* __restrict mu,
                           float* __restrict sq, int64_t n, const Terms& c, const AdamConsts& a) {
  const float scale = c.scale, wd = c.wd, lr = c.lr, keep_w = c.mu;
  const uint32_t negate = c.negate, wd_m = c.wd_m;
  const float coef = a.coef, b2 = a.b2, one_b2 = a.one_b2;
  const uint32_t small = a.small;
  const TermCoefs k = coefs_of(c);
  (void)lr;
  // the row's values, read once (ROWS)
  const float lam_r = ROWS && (F & kDLam) != 0 ? lam[0] : 0.0f;
  const uint8_t keep_r = ROWS && MASK ? keep[0] : 1;
  uint32_t special = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = ld_f32(w, j);
    float gv = ld_f32(g, j);
    if constexpr ((F & kDScale) != 0) gv = gv / scale;
    gv = f32_from_bits(bits_of(gv) ^ negate);  // -g
    float hv = select(wd_m, __builtin_fmaf(wd, wv, gv), gv);
    float xv = wv * keep_w;
    if constexpr ((F & kDLam) != 0) {
      // ROWS: the row's lam as a one-element stream (add_terms_at reads [j])
      const float* lj = ROWS ? &lam_r : lam;
      const int64_t jj = ROWS ? 0 : j;
      if constexpr (COUPLED) hv = add_terms_at<kDLam>(hv, wv, lj, nullptr, nullptr, nullptr, jj, k);
      else xv = xv - lr * add_terms_at<kDLam>(0.0f, wv, lj, nullptr, nullptr, nullptr, jj, k);
    }
    xout[j] = xv;
    special |= moment_at<AMS, MASK, T>(hv, m, v, vmax, MASK ? row_or_elem<ROWS>(keep_r, keep, j) : uint8_t{1}, mu,
                                       sq, j, coef, small, b2, one_b2);
  }
  return special;
}

template <typename T>
using AdamFusedFnT = uint32_t (*)(const T*, const T*, const float*, T*, T*, T*, const uint8_t*, float*, float*,
                                  float*, int64_t, const Terms&, const AdamConsts&);
typedef AdamFusedFnT<float> AdamFusedFn;

// Index (((F * 2 + COUPLED) * 2 + AMS) * 2 + MASK) * 2 + ROWS, F < 4.
template <typename T, int... I>
RK_AI AdamFusedFnT<T> adam_fused_for(int i, std::integer_sequence<int, I...>) {
  static constexpr AdamFusedFnT<T> table[] = {
      &adam_fused<T, I / 16, ((I / 8) & 1) != 0, ((I / 4) & 1) != 0, ((I / 2) & 1) != 0, (I & 1) != 0>...};
  return table[i];
}

// ---------------------------------------------------------------------------
// torch's fp32 sqrt. Where torch has MKL, its CPU `sqrt` is MKL's vmsSqrt
// (VML_HA), which is not always correctly rounded; the kernel must give the
// same bits. vmsSqrt costs about 1 ns per element (its call, and the SSE
// path MKL takes on some CPUs), so where its results are those of MKL's
// SSE algorithm (its "EX" kernel: an rsqrtps estimate refined by
// Goldschmidt steps, no FMA), checked once per variant against vmsSqrt
// itself on a large sample, the kernel computes that algorithm inline, with
// the same rsqrtps; inputs off its main path (zero, subnormal, near
// FLT_MAX, negative, inf, NaN: MKL's own special-case test) and the tail of
// a block are handed to vmsSqrt. Without MKL, torch's sqrt (and the
// kernel's) is the correctly rounded one.

#if RK_LANES >= 8
typedef __m256 vsq;
constexpr int kSqLanes = 8;
RK_AI vsq sq_load(const float* p) { return _mm256_loadu_ps(p); }
RK_AI void sq_store(float* p, vsq v) { _mm256_storeu_ps(p, v); }
RK_AI vsq sq_rsqrt(vsq v) { return _mm256_rsqrt_ps(v); }
RK_AI vsq sq_set1(float f) { return _mm256_set1_ps(f); }
#elif defined(RK_X86)
typedef __m128 vsq;
constexpr int kSqLanes = 4;
RK_AI vsq sq_load(const float* p) { return _mm_loadu_ps(p); }
RK_AI void sq_store(float* p, vsq v) { _mm_storeu_ps(p, v); }
RK_AI vsq sq_rsqrt(vsq v) { return _mm_rsqrt_ps(v); }
RK_AI vsq sq_set1(float f) { return _mm_set1_ps(f); }
#endif

#ifdef RK_X86
// MKL's EX algorithm on a full vector of main-path inputs (one rounding per
// operation, in its order).
RK_AI vsq sqrt_ex(vsq x) {
  const vsq half = sq_set1(0.5f);
  const vsq r = sq_rsqrt(x);
  const vsq s = x * r;
  const vsq h = r * half;
  const vsq e = half - s * h;
  const vsq s1 = s * e + s;
  const vsq h1 = h * e + h;
  const vsq d = x - s1 * s1;
  return d * h1 + s1;
}

// y = MKL's sqrt of x[0, n), all on the main path: inline, the tail in a
// padded vector (lanes are independent).
RK_AI void sqrt_ex_n(const float* __restrict x, float* __restrict y, int64_t n) {
  int64_t j = 0;
  for (; j + kSqLanes <= n; j += kSqLanes) sq_store(y + j, sqrt_ex(sq_load(x + j)));
  if (j < n) {
    alignas(64) float t[kSqLanes];
    for (int k = 0; k < kSqLanes; ++k) t[k] = j + k < n ? x[j + k] : 1.0f;
    sq_store(t, sqrt_ex(sq_load(t)));
    for (int64_t k = 0; j + k < n; ++k) y[j + k] = t[k];
  }
}

// Once per variant: does the inline algorithm give vmsSqrt's bits? On a
// sample of the main path's inputs: the top 18 mantissa bits (every rsqrtps
// table entry many times over) in two binades of either exponent parity,
// with pseudo-random low bits, then pseudo-random bit patterns over the
// whole main path.
static bool sqrt_ex_matches(VmlSqrtFn vml) {
  constexpr int64_t kN = 1024;
  alignas(64) float x[kN], a[kN], b[kN];
  uint32_t state = 0x9E3779B9u;
  for (int round = 0; round < 640; ++round) {
    for (int64_t j = 0; j < kN; ++j) {
      state ^= state << 13;
      state ^= state >> 17;
      state ^= state << 5;
      uint32_t u;
      if (round < 512) {
        // [0.5, 2): exponent parity k & 1, top mantissa bits k >> 1, random low 5 bits
        const uint32_t k = static_cast<uint32_t>(round) * kN + static_cast<uint32_t>(j);
        u = ((k & 1u) != 0 ? 0x3f800000u : 0x3f000000u) | ((k >> 1) << 5) | (state & 31u);
      } else {
        u = 0x00800000u + state % (0x7f7ff000u - 0x00800000u + 1u);
      }
      __builtin_memcpy(x + j, &u, sizeof u);
    }
    vml(static_cast<int>(kN), x, a, kVmlSqrtMode);
    for (int64_t j = 0; j < kN; j += kSqLanes) sq_store(b + j, sqrt_ex(sq_load(x + j)));
    if (__builtin_memcmp(a, b, sizeof a) != 0) return false;
  }
  return true;
}
#endif

// rt = sqrt of sq[0, n) as torch computes it; `special`: some sq is off
// the main path of MKL's algorithm (sqrt_special).
static void torch_sqrt_n(const float* __restrict sq, float* __restrict rt, int64_t n, uint32_t special,
                         VmlSqrtFn vml) {
  if (vml == nullptr) {
    for (int64_t j = 0; j < n; ++j) rt[j] = __builtin_sqrtf(sq[j]);
    return;
  }
#ifdef RK_X86
  static const bool inline_ex = sqrt_ex_matches(vml);  // per variant, thread-safe
  if (inline_ex && special == 0) {
    sqrt_ex_n(sq, rt, n);
    return;
  }
#else
  (void)special;
#endif
  vml(static_cast<int>(n), sq, rt, kVmlSqrtMode);
}

// The W pass: W = x + (-step_size * m) / (sqrt(second) / bc2 + eps) (rt:
// the square roots), the mask, the soft threshold (PROX1, thr per element),
// the clamp (CLAMP) and the mask again (a clamp to no bounds and the mask
// again change nothing: left out without CLAMP). T: the storage of wout
// (fp32, or bf16 rounded here). ROWS: the n elements lie in one row, keep
// and thr hold its single value (thr: prox_lam[r], the threshold formed
// here as lr * prox_lam[r]).
template <bool MASK, bool PROX1, bool CLAMP, bool ROWS, typename T = float>
static void adam_weights(T* __restrict wout, const float* __restrict x, const float* __restrict mu,
                         const float* __restrict rt, const uint8_t* __restrict keep,
                         const float* __restrict thr, int64_t n, const AdamConsts& a) {
  const float eps = a.eps, neg_ss = a.neg_ss, bc2 = a.bc2, lo = a.lo, hi = a.hi;
  const float thr_r = ROWS && PROX1 ? a.lr * thr[0] : 0.0f;
  const uint8_t keep_r = ROWS && MASK ? keep[0] : 1;
  (void)lo, (void)hi;
  for (int64_t j = 0; j < n; ++j) {
    const float denom = rt[j] / bc2 + eps;
    float nw = x[j] + (neg_ss * mu[j]) / denom;  // addcdiv
    float k = 1.0f;
    if constexpr (MASK) {
      k = static_cast<float>(row_or_elem<ROWS>(keep_r, keep, j));
      nw = nw * k;
    }
    if constexpr (PROX1) nw = soft(nw, row_or_elem<ROWS>(thr_r, thr, j));
    if constexpr (CLAMP) {
      nw = clamped(nw, lo, hi);
      if constexpr (MASK) nw = nw * k;
    }
    st_f32(wout, j, nw);
  }
}

template <typename T>
using AdamWeightsFnT = void (*)(T*, const float*, const float*, const float*, const uint8_t*, const float*,
                                int64_t, const AdamConsts&);
typedef AdamWeightsFnT<float> AdamWeightsFn;

// Index ((MASK * 2 + PROX1) * 2 + CLAMP) * 2 + ROWS.
template <typename T, int... I>
RK_AI AdamWeightsFnT<T> adam_weights_for(int i, std::integer_sequence<int, I...>) {
  static constexpr AdamWeightsFnT<T> table[] = {
      &adam_weights<((I / 8) & 1) != 0, ((I / 4) & 1) != 0, ((I / 2) & 1) != 0, (I & 1) != 0, T>...};
  return table[i];
}

// One tensor's share [lo, hi): TermRunner's blocks, rows and group lasso
// with the adam update (compute).
template <int DT>
struct AdamStep : TermRunner<AdamStep<DT>, DT> {
  typedef TermRunner<AdamStep<DT>, DT> Base;
  typedef typename Storage<DT>::type T;
  using Base::t;
  using Base::s;
  using Base::w;
  Terms c;
  AdamConsts a;
  AdamFusedFn fused;  // terms and moments in one loop (at most a lambda), or null
  // bf16 storage, fused loop, not the group lasso: the fused loop and the W
  // pass on the storage itself (no widened pieces), or null
  AdamFusedFnT<T> fused_direct;
  AdamWeightsFnT<T> weights_direct;
  AdamTermsFn terms;
  AdamMomentsFn moments;
  AdamWeightsFn weights;
  VmlSqrtFn vml;
  const T* g;
  const T* tgt;
  T* m;
  T* v;
  T* vmax;

  bool rows;  // the fused loop and the W pass take the per-row values per row piece (Streams::rows)

  int weights_index(bool mask, bool clamp, bool rows_) const {
    return (((mask ? 1 : 0) * 2 + (t.prox == 1 ? 1 : 0)) * 2 + (clamp ? 1 : 0)) * 2 + (rows_ ? 1 : 0);
  }

  AdamStep(const AdamDesc& d, const AdamHyper& h) : Base(d.t, h.lr) {
    g = static_cast<const T*>(t.g);
    tgt = static_cast<const T*>(t.target);
    m = static_cast<T*>(d.m);
    v = static_cast<T*>(d.v);
    vmax = static_cast<T*>(d.vmax);
    const bool mask = t.mask != nullptr;
    const int f = d_terms_of(t, h.has_scale);
    fused = nullptr;
    fused_direct = nullptr;
    weights_direct = nullptr;
    rows = false;
    const bool clamp_now = update_clamps(t);
    if ((f & ~(kDScale | kDLam)) == 0) {
      rows = this->rows_ok();
      const int fi =
          (((f * 2 + (h.coupled ? 1 : 0)) * 2 + (vmax != nullptr ? 1 : 0)) * 2 + (mask ? 1 : 0)) * 2 + (rows ? 1 : 0);
      fused = adam_fused_for<float>(fi, std::make_integer_sequence<int, 64>{});
      if constexpr (DT == 1) {
        if (t.prox != 2) {
          fused_direct = adam_fused_for<T>(fi, std::make_integer_sequence<int, 64>{});
          weights_direct =
              adam_weights_for<T>(weights_index(mask, clamp_now, rows), std::make_integer_sequence<int, 16>{});
          this->direct_w = true;
        }
      }
    }
    terms = adam_terms_for(f * 2 + (h.coupled ? 1 : 0), std::make_integer_sequence<int, kDVariants * 2>{});
    static constexpr AdamMomentsFn moment_fns[2][2] = {
        {&adam_moments<false, false>, &adam_moments<false, true>},
        {&adam_moments<true, false>, &adam_moments<true, true>}};
    moments = moment_fns[vmax != nullptr ? 1 : 0][mask ? 1 : 0];
    weights = adam_weights_for<float>(weights_index(mask, clamp_now, rows), std::make_integer_sequence<int, 16>{});
    vml = h.vml_sqrt;
    c = terms_of(t, h);
    c.mu = h.keep_w;
    a.coef = h.lerp_coef;
    a.small = h.lerp_small;
    a.b2 = h.b2;
    a.one_b2 = h.one_b2;
    a.eps = h.eps;
    a.neg_ss = d.neg_step_size;
    a.bc2 = d.bc2_sqrt;
    a.lr = h.lr;
    a.lo = c.lo;
    a.hi = c.hi;
  }

  // Software prefetch of the streams kAhead elements past [e, e + q) (and
  // not past the tensor): the W pass and the square roots of a block leave
  // the memory streams idle, which the hardware prefetchers do not cover.
  static constexpr int64_t kAhead = RK_PREFETCH_AHEAD * 4 / static_cast<int64_t>(sizeof(T));  // same bytes
  void prefetch_ahead(int64_t e, int64_t q) const {
    const int64_t f = e + kAhead;
    if (f + q > t.numel) return;
    constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
    for (int64_t k = 0; k < q; k += kLine) {
      __builtin_prefetch(w + f + k, 1);
      __builtin_prefetch(g + f + k, 0);
      __builtin_prefetch(m + f + k, 1);
      __builtin_prefetch(v + f + k, 1);
      if (vmax != nullptr) __builtin_prefetch(vmax + f + k, 1);
    }
  }

  // Elements [e0, e0 + n) into X (fp32: X is W + e0) with streams k, the
  // 16-bit moments stored when `store_state` (fp32 ones are in place). Per
  // piece the terms pass and the moments pass, the square roots and the W
  // pass, all in L1.
  void part(int64_t e0, int64_t n, float* __restrict X, bool store_state, const Streams& k) {
    alignas(64) float hb[kPiece16], xb[kAdamPiece16], mu[kAdamPiece16], sq[kAdamPiece16], rt[kAdamPiece16];
    // piece [j, j + q) with W's fp32 values at X + j (fp32: W itself),
    // the other streams' at gp, tp, mp, vp, vxp: the terms and moments,
    // the square roots, then W into X + j (one piece after the other, so the
    // memory streams are read while the previous piece computes)
    auto piece = [&](int64_t j, int64_t q, const float* gp, const float* tp, float* mp, float* vp, float* vxp) {
      const Streams kj = k.at(j);
      uint32_t special;
      if (fused != nullptr) {
        special = fused(X + j, gp, kj.lam, mp, vp, vxp, kj.keep, xb, mu, sq, q, c, a);
      } else {
        terms(X + j, gp, kj.lam, kj.lamc, kj.l1, tp, hb, xb, q, c);
        special = moments(hb, mp, vp, vxp, kj.keep, mu, sq, q, a);
      }
      torch_sqrt_n(sq, rt, q, special, vml);
      weights(X + j, xb, mu, rt, kj.keep, kj.thr, q, a);
    };
    if (fused_direct != nullptr) {
      // bf16 storage: per piece the fused loop reads the stored W, g, m, v
      // (vmax) and stores the moments, the square roots, then the W pass
      // stores W (store_state: always, outside the group lasso)
      (void)store_state;
      for (int64_t j = 0; j < n; j += kAdamPiece16) {
        const int64_t q = rk_min(kAdamPiece16, n - j), e = e0 + j;
        const Streams kj = k.at(j);
        prefetch_ahead(e, q);
        const uint32_t special = fused_direct(w + e, g + e, kj.lam, m + e, v + e, vmax != nullptr ? vmax + e : nullptr,
                                              kj.keep, xb, mu, sq, q, c, a);
        torch_sqrt_n(sq, rt, q, special, vml);
        weights_direct(w + e, xb, mu, rt, kj.keep, kj.thr, q, a);
      }
      return;
    }
    if constexpr (DT == 0) {
      (void)store_state;
      for (int64_t j = 0; j < n; j += kPiece16) {
        const int64_t q = rk_min(kPiece16, n - j), e = e0 + j;
        prefetch_ahead(e, q);
        piece(j, q, g + e, tgt != nullptr ? tgt + e : kZeros, m + e, v + e, vmax != nullptr ? vmax + e : nullptr);
      }
    } else {
      alignas(64) float gf[kPiece16], tf[kPiece16], mf[kPiece16], vf[kPiece16], vxf[kPiece16];
      for (int64_t j = 0; j < n; j += kPiece16) {
        const int64_t q = rk_min(kPiece16, n - j), e = e0 + j;
        prefetch_ahead(e, q);
        widen_n<DT>(w + e, X + j, q);
        widen_n<DT>(g + e, gf, q);
        widen_n<DT>(m + e, mf, q);
        widen_n<DT>(v + e, vf, q);
        if (vmax != nullptr) widen_n<DT>(vmax + e, vxf, q);
        if (tgt != nullptr) widen_n<DT>(tgt + e, tf, q);
        piece(j, q, gf, tgt != nullptr ? tf : kZeros, mf, vf, vxf);
        if (store_state) {
          narrow_n<DT>(mf, m + e, q);
          narrow_n<DT>(vf, v + e, q);
          if (vmax != nullptr) narrow_n<DT>(vxf, vmax + e, q);
        }
      }
    }
  }

  // TermRunner's compute: elements [i0, i0 + n) into X; long rows one call
  // per row piece with the row's values (Streams::rows), else the block's
  // expanded streams.
  void compute(int64_t i0, int64_t n, float* __restrict X, bool store_state) {
    if (rows) {
      this->row_pieces(i0, n, [&](int64_t j, int64_t len, const Streams& k) {
        part(i0 + j, len, X + j, store_state, k);
      });
    } else {
      part(i0, n, X, store_state, this->streams_at(i0, n));
    }
  }
};

template <int DT>
static void range_dt(const AdamDesc& d, const AdamHyper& h, int64_t lo, int64_t hi) {
  AdamStep<DT>(d, h).run(lo, hi);
}

static void range(const AdamDesc& d, const AdamHyper& h, int64_t lo, int64_t hi) {
  switch (d.t.dtype) {
    case kDtypeF32: range_dt<0>(d, h, lo, hi); break;
    case kDtypeBF16: range_dt<1>(d, h, lo, hi); break;
    default: range_dt<2>(d, h, lo, hi); break;
  }
}

static const AdamIsaKernels kernels = {&range};

}  // namespace RK_NS
}  // namespace detail
}  // namespace regkern
