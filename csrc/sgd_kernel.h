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
// contraction (-ffp-contract=off), so fp32 results match the reference bit for
// bit. (torch's CPU SGD computes its `add(x, alpha=a)` steps as one FMA, so
// torch.optim.SGD differs from both by an ulp here and there.)
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

#include "common/term_math.h"  // select, row norms, expansions, terms, TermRunner

namespace regkern {
namespace detail {
namespace RK_NS {
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
// then one rounding to the storage dtype (bf16 tensors of the one-pass case
// without grad_scale: one_pass on the bf16 storage itself, converting
// inline, no widened pieces; under the group lasso it writes the fp32
// update to the row buffer instead of W). On rows of kLongRow elements or
// more, one_pass runs once per row piece with the row's lambda, L1, mask and
// threshold as scalars (Streams::rows: no per-element streams); shorter rows
// get per-row streams filled once per row value, not per block. Column
// lambdas are expanded once per share (TermRunner::prepare_cols); measured
// on ResNet-50 bf16, 1 thread: ColumnL2 1.17 -> 0.97x, RowL2 with columns
// 1.28 -> 1.02x, ProxL1 1.16 -> 1.07x of the plain step. Group lasso leaves the update
// unscaled, reduces each row, then scales it (group_loop, with the clamp and
// mask; bf16: the scale and the rounded store in one loop), see
// TermRunner::run (common/term_math.h). The row norms of the stored W are accumulated
// per block as on the plain path. The block, row and group-lasso machinery
// is TermRunner's (common/term_math.h), shared with the adam family;
// TermsStep adds the sgd update (compute).

// The d term of one_pass besides wd and lam (at most one).
constexpr int kOneNone = 0, kOneL1 = 1, kOneAdmm = 2, kOneLamCols = 3;

// One pass over n elements: g already divided by grad_scale; -g when
// maximizing; d = g + wd W (+ lam W) (+ the DK term: lam_cols W, l1 sign(W)
// or rho (W - target), `coef` holding lam_cols or l1 per element); buf = mu
// buf + (1 - dampening) d; s = d + mu buf (nesterov) or buf; x = (x - lr s)
// * keep, buf *= keep; soft threshold (thr per element); clamp to [lo, hi]
// and the mask again. x holds W on entry, the new W on exit. T: the storage
// of x, g, buf, tgt: fp32 (W itself or the widened piece), or bf16 storage
// read and rounded back inline (the bf16 one-loop path: no widened
// temporaries, W and buf rounded once as before).
// ROWS: the n elements lie in one row; lam, keep, the L1 coef and thr hold
// that row's single value (thr: prox_lam[r], the threshold formed here as
// lr * prox_lam[r], the same fp32 product), see Streams. OUT: the new W goes
// to the fp32 `xo` instead of x (bf16 storage under the group lasso, which
// scales the fp32 update before its one rounding).
template <typename T, bool MASK, int DK, bool LAM, bool PROX1, bool CLAMP, bool ROWS, bool OUT = false>
static void one_pass(T* __restrict x, float* __restrict xo, const T* __restrict g, T* __restrict buf,
                     const float* __restrict lam, const float* __restrict coef,
                     const T* __restrict tgt, const uint8_t* __restrict keep,
                     const float* __restrict thr, int64_t n, const Terms& c) {
  const float wd = c.wd, rho = c.rho, lr = c.lr, mu = c.mu, damp1 = c.damp1, lo = c.lo, hi = c.hi;
  const uint32_t negate = c.negate, wd_m = c.wd_m, nesterov_m = c.nesterov_m;
  (void)lo, (void)hi, (void)rho;
  // the row's values, read once (ROWS)
  const float lam_r = ROWS && LAM ? lam[0] : 0.0f;
  const float l1_r = ROWS && DK == kOneL1 ? coef[0] : 0.0f;
  const float thr_r = ROWS && PROX1 ? lr * thr[0] : 0.0f;
  const uint8_t keep_r = ROWS && MASK ? keep[0] : 1;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = ld_f32(x, j);
    const float gv = f32_from_bits(bits_of(ld_f32(g, j)) ^ negate);  // -g
    float dv = select(wd_m, gv + wd * wv, gv);
    if constexpr (LAM) dv = dv + row_or_elem<ROWS>(lam_r, lam, j) * wv;
    if constexpr (DK == kOneLamCols) dv = dv + coef[j] * wv;
    if constexpr (DK == kOneL1) dv = dv + sign_of(wv) * row_or_elem<ROWS>(l1_r, coef, j);
    if constexpr (DK == kOneAdmm) dv = dv + rho * (wv - ld_f32(tgt, j));
    float b = mu * ld_f32(buf, j) + damp1 * dv;
    const float s = select(nesterov_m, dv + mu * b, b);
    float nw = wv - lr * s;
    float k = 1.0f;
    if constexpr (MASK) {
      k = static_cast<float>(row_or_elem<ROWS>(keep_r, keep, j));
      nw = nw * k;
      b = b * k;
    }
    if constexpr (PROX1) nw = soft(nw, row_or_elem<ROWS>(thr_r, thr, j));
    if constexpr (CLAMP) {
      nw = clamped(nw, lo, hi);
      if constexpr (MASK) nw = nw * k;
    }
    if constexpr (OUT) xo[j] = nw;
    else st_f32(x, j, nw);
    st_f32(buf, j, b);
  }
  (void)xo;
}

template <typename T>
using OnePassFnT = void (*)(T*, float*, const T*, T*, const float*, const float*, const T*, const uint8_t*,
                            const float*, int64_t, const Terms&);
typedef OnePassFnT<float> OnePassFn;

// Index ((((MASK * 4 + DK) * 2 + LAM) * 2 + PROX1) * 2 + CLAMP) * 2 + ROWS.
template <typename T, int... I>
RK_AI OnePassFnT<T> one_pass_for(int i, std::integer_sequence<int, I...>) {
  static constexpr OnePassFnT<T> table[] = {&one_pass<T, ((I / 64) & 1) != 0, (I / 16) & 3, ((I / 8) & 1) != 0,
                                                      ((I / 4) & 1) != 0, ((I / 2) & 1) != 0, (I & 1) != 0>...};
  return table[i];
}
constexpr int kOnePassVariants = 128;

// one_pass with OUT for the group lasso (no soft threshold, no clamp before
// the scale). Index ((MASK * 4 + DK) * 2 + LAM) * 2 + ROWS.
template <typename T, int... I>
RK_AI OnePassFnT<T> one_pass_out_for(int i, std::integer_sequence<int, I...>) {
  static constexpr OnePassFnT<T> table[] = {
      &one_pass<T, ((I / 16) & 1) != 0, (I / 4) & 3, ((I / 2) & 1) != 0, false, false, (I & 1) != 0, true>...};
  return table[i];
}


// d = g / scale, negated when maximizing, + wd W, + lam W, + lam_cols W,
// + l1 sign(W), + p_lam (p_t sign(W) - sign(W - p_m) + p_s), + rho (W - target)
// (lam, lamc, l1, target per element; each term only when F has its bit).
template <int F>
static void d_loop(const float* __restrict w, const float* __restrict g, const float* __restrict lam,
                   const float* __restrict lamc, const float* __restrict l1,
                   const float* __restrict tgt, float* __restrict d, int64_t n, const Terms& c) {
  const float scale = c.scale, wd = c.wd;
  const TermCoefs k = coefs_of(c);
  const uint32_t negate = c.negate, wd_m = c.wd_m;
  for (int64_t j = 0; j < n; ++j) {
    const float wv = w[j];
    float gv = g[j];
    if constexpr ((F & kDScale) != 0) gv = gv / scale;
    gv = f32_from_bits(bits_of(gv) ^ negate);  // -g
    const float dv = select(wd_m, gv + wd * wv, gv);
    d[j] = add_terms_at<F>(dv, wv, lam, lamc, l1, tgt, j, k);
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

// g / scale (the one-pass path's first pass under a grad_scale).
static void divide_by(const float* __restrict g, float* __restrict out, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = g[j] / scale;
}

// One tensor's share [lo, hi) on the general path: TermRunner's blocks,
// rows and group lasso (common/term_math.h) with the sgd update (compute).
template <int DT>
struct TermsStep : TermRunner<TermsStep<DT>, DT> {
  typedef TermRunner<TermsStep<DT>, DT> Base;
  typedef typename Storage<DT>::type T;
  using Base::t;
  using Base::s;
  using Base::w;
  const Hyper& h;
  Terms c;
  OnePassFn one;    // the one-pass kernel, or null: two passes
  OnePassFnT<T> one_direct;  // bf16: the one-pass kernel on the storage itself, or null
  OnePassFnT<T> one_out;     // bf16 under the group lasso: one loop from the storage to fp32 X, or null
  bool rows;        // `one` takes the per-row values per row piece (Streams::rows)
  DFn dfn;          // two passes: d with the tensor's d terms
  UpdateFn update;  // two passes: the step fed d
  int mom;
  const T* g;
  T* buf;
  const T* tgt;

  TermsStep(const TensorDesc& td, const Hyper& hy) : Base(td, hy.lr), h(hy) {
    g = static_cast<const T*>(t.g);
    buf = static_cast<T*>(t.buf);
    tgt = static_cast<const T*>(t.target);
    mom = (!h.has_momentum || buf == nullptr) ? 0 : (t.first ? 1 : 2);
    const bool mask = t.mask != nullptr;
    const bool lam = t.lam != nullptr;
    const bool prox1 = t.prox == 1;
    const int d_count = (t.lam_cols != nullptr) + (t.l1 != nullptr) + (t.target != nullptr);
    const bool clamp_now = update_clamps(t);
    one = nullptr;
    one_direct = nullptr;
    one_out = nullptr;
    rows = false;
    if (mom == 2 && t.polar == nullptr && d_count <= 1) {
      const int dk = t.lam_cols != nullptr ? kOneLamCols
                     : t.l1 != nullptr     ? kOneL1
                     : t.target != nullptr ? kOneAdmm
                                           : kOneNone;
      rows = this->rows_ok();
      const int i =
          (((((mask ? 1 : 0) * 4 + dk) * 2 + (lam ? 1 : 0)) * 2 + (prox1 ? 1 : 0)) * 2 + (clamp_now ? 1 : 0)) * 2 +
          (rows ? 1 : 0);
      one = one_pass_for<float>(i, std::make_integer_sequence<int, kOnePassVariants>{});
      // bf16 storage, no grad_scale (its division pass needs fp32 g): one
      // loop on the storage, W and buf rounded once in it; the group lasso
      // (which needs the unscaled fp32 update) has it write the fp32 W to X
      if constexpr (DT == 1) {
        if (!h.has_scale && t.prox != 2) {
          one_direct = one_pass_for<T>(i, std::make_integer_sequence<int, kOnePassVariants>{});
          this->direct_w = true;
        } else if (!h.has_scale) {
          const int io = (((mask ? 1 : 0) * 4 + dk) * 2 + (lam ? 1 : 0)) * 2 + (rows ? 1 : 0);
          one_out = one_pass_out_for<T>(io, std::make_integer_sequence<int, 32>{});
        }
      }
    }
    dfn = d_loop_for(d_terms_of(t, h.has_scale), std::make_integer_sequence<int, kDVariants>{});
    update = update_loop_for((mom * 2 + (mask ? 1 : 0)) * 2 + (prox1 ? 1 : 0), std::make_integer_sequence<int, 12>{});
    c = terms_of(t, h);
    c.mu = h.mu;
    c.damp1 = h.damp1;
    c.nesterov_m = mask_of(h.nesterov);
  }

  // Step the fp32 values xf (W on entry) of m elements with gradient gf
  // (fp32), buffer bf, target tf and the coefficient streams k.
  void kernel(float* xf, const float* gf, float* bf, const float* tf, const Streams& k, int64_t m) {
    if (one != nullptr) {
      const float* gs = gf;
      if (h.has_scale) {
        divide_by(gf, s.gs, m, c.scale);
        gs = s.gs;
      }
      one(xf, nullptr, gs, bf, k.lam, t.lam_cols != nullptr ? k.lamc : k.l1, tf, k.keep, k.thr, m, c);
    } else {
      // in short pieces, so that the second pass finds d and W in L1 and
      // the memory streams of both passes are read close together in time
      // (never Streams::rows: that needs `one`)
      for (int64_t j = 0; j < m; j += kPiece16) {
        const int64_t q = rk_min(kPiece16, m - j);
        const Streams kj = k.at(j);
        dfn(xf + j, gf + j, kj.lam, kj.lamc, kj.l1, tf + j, s.d, q, c);
        update(xf + j, s.d, bf != nullptr ? bf + j : nullptr, kj.keep, kj.thr, q, c);
      }
    }
  }

  // Elements [e, e + m) into X (fp32: X is W + e) with streams k.
  void part(int64_t e, int64_t m, float* __restrict X, bool store_buf, const Streams& k) {
    if (one_direct != nullptr) {
      // bf16 storage, one loop (store_buf: always, outside the group lasso)
      one_direct(w + e, nullptr, g + e, buf + e, k.lam, t.lam_cols != nullptr ? k.lamc : k.l1,
                 tgt != nullptr ? tgt + e : nullptr, k.keep, k.thr, m, c);
      return;
    }
    if (one_out != nullptr && store_buf) {
      // bf16 under the group lasso: W's update into X, buf stored, in one
      // loop (a first pass that must not store buf takes the pieces below)
      one_out(w + e, X, g + e, buf + e, k.lam, t.lam_cols != nullptr ? k.lamc : k.l1,
              tgt != nullptr ? tgt + e : nullptr, k.keep, k.thr, m, c);
      return;
    }
    if constexpr (DT == 0) {
      (void)store_buf;
      kernel(X, g + e, buf != nullptr ? buf + e : nullptr, tgt != nullptr ? tgt + e : kZeros, k, m);
    } else {
      // short pieces: the input streams are read close together in time
      alignas(64) float gf[kPiece16], tf[kPiece16], bf[kPiece16];
      for (int64_t j = 0; j < m; j += kPiece16) {
        const int64_t q = rk_min(kPiece16, m - j), p = e + j;
        widen_n<DT>(w + p, X + j, q);
        widen_n<DT>(g + p, gf, q);
        if (mom == 2) widen_n<DT>(buf + p, bf, q);
        if (tgt != nullptr) widen_n<DT>(tgt + p, tf, q);
        kernel(X + j, gf, bf, tgt != nullptr ? tf : kZeros, k.at(j), q);
        if (mom != 0 && store_buf) narrow_n<DT>(bf, buf + p, q);
      }
    }
  }

  // TermRunner's compute: elements [i0, i0 + n) into X, the momentum buffer
  // stored when `store_buf`; long rows one call per row piece with the
  // row's values (Streams::rows), else the block's expanded streams.
  void compute(int64_t i0, int64_t n, float* __restrict X, bool store_buf) {
    if (rows) {
      this->row_pieces(i0, n, [&](int64_t j, int64_t m, const Streams& k) { part(i0 + j, m, X + j, store_buf, k); });
    } else {
      part(i0, n, X, store_buf, this->streams_at(i0, n));
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
