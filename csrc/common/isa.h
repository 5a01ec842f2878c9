// Instruction-set variants shared by every kernel family (sgd, rda, admm).
//
// Each family's kernel body is compiled once per variant (isa_variants.inc)
// into namespaces isa_avx512f, isa_avx2 and isa_default of its own, and runs
// the variant named by one process-wide switch (isa.cpp): the best the CPU
// supports, or the one a test forced with set_isa. One switch, so every
// family runs the same variant and a forced variant is tested everywhere.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#define RK_X86 1
#include <immintrin.h>
#endif

// Small helpers of the kernel bodies: forced inlining keeps them inside the
// caller's target region.
#define RK_AI static inline __attribute__((always_inline))

namespace regkern {

// Name of the instruction-set variant in use: "avx512f", "avx2" or "default".
const char* active_isa();
// Variants this CPU can run, best first.
int available_isas(const char** names, int capacity);
// Force a variant (testing); returns false if unknown or unsupported here.
bool set_isa(const char* name);

static inline int64_t rk_min(int64_t a, int64_t b) { return a < b ? a : b; }

namespace isa {

// Variant indices, best first; isa_variants.inc compiles them in this order.
constexpr int kAvx512f = 0, kAvx2 = 1, kDefault = 2, kCount = 3;

// Index of the variant in use (only ever one this CPU supports).
int active();

}  // namespace isa
}  // namespace regkern

// A family's table of `kernels` objects by variant index, written inside the
// family's namespace after isa_variants.inc; without x86 only the default
// variant exists and stands in for the others (never active there).
#ifdef RK_X86
#define RK_VARIANT_KERNELS {&isa_avx512f::kernels, &isa_avx2::kernels, &isa_default::kernels}
#else
#define RK_VARIANT_KERNELS {&isa_default::kernels, &isa_default::kernels, &isa_default::kernels}
#endif
