// Sums over a row piece in 16 fixed lanes, for ONE instruction-set variant:
// the row norms of the step families (common/term_math.h) and RDA's group
// norm (rda_kernel.h).
//
// No include guard and no namespace of its own on purpose: a kernel body
// includes it inside its per-variant namespace (RK_NS, RK_LANES set), so
// everything here is compiled for that ISA.

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
// value as its s2): the group-lasso and RDA group row norms need nothing else.
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
