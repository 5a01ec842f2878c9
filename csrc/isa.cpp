// The process-wide instruction-set switch every kernel family reads
// (common/isa.h), and the storage conversions' test entry points.
#include "common/isa.h"

#include <atomic>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace regkern {
namespace convert_detail {

struct Kernels {
  void (*to_f32)(int dtype, const uint16_t* src, float* dst, int64_t n);
  void (*from_f32)(int dtype, const float* src, uint16_t* dst, int64_t n);
};

}  // namespace convert_detail
}  // namespace regkern

#define RK_KERNEL_BODY "common/convert_kernel.h"
#include "common/isa_variants.inc"

namespace regkern {
namespace convert_detail {

const Kernels* const kByVariant[isa::kCount] = RK_VARIANT_KERNELS;

}  // namespace convert_detail

namespace isa {
namespace {

constexpr const char* kNames[kCount] = {"avx512f", "avx2", "default"};

// What this CPU can run, by variant index; the features asked for are those
// of the target pragmas in isa_variants.inc.
const bool* supported() {
  static bool table[kCount] = {false, false, true};
#ifdef RK_X86
  static const bool probed = [] {
    __builtin_cpu_init();
    table[kAvx512f] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("f16c");
    table[kAvx2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
    return true;
  }();
  (void)probed;
#endif
  return table;
}

int best() {
  for (int i = 0; i < kCount; ++i)
    if (supported()[i]) return i;
  return kDefault;
}

// Picked once, at load time; set_isa (testing) may change it between calls.
std::atomic<int> g_active{best()};

}  // namespace

int active() { return g_active.load(std::memory_order_relaxed); }

}  // namespace isa

const char* active_isa() { return isa::kNames[isa::active()]; }

int available_isas(const char** names, int capacity) {
  int count = 0;
  for (int i = 0; i < isa::kCount; ++i)
    if (isa::supported()[i] && count < capacity) names[count++] = isa::kNames[i];
  return count;
}

bool set_isa(const char* name) {
  for (int i = 0; i < isa::kCount; ++i) {
    if (isa::supported()[i] && std::strcmp(isa::kNames[i], name) == 0) {
      isa::g_active.store(i);
      return true;
    }
  }
  return false;
}

void convert_to_f32(int dtype, const uint16_t* src, float* dst, int64_t n) {
  convert_detail::kByVariant[isa::active()]->to_f32(dtype, src, dst, n);
}

void convert_from_f32(int dtype, const float* src, uint16_t* dst, int64_t n) {
  convert_detail::kByVariant[isa::active()]->from_f32(dtype, src, dst, n);
}

}  // namespace regkern
