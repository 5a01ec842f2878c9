// Scalar encodings shared by every kernel family (sgd, rda, admm), and the
// test entry points of the storage conversions (common/dtype_kernel.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace regkern {

// Storage dtype codes of every table's DTYPE column (and the kernels' DT).
constexpr int64_t kDtypeF32 = 0, kDtypeBF16 = 1, kDtypeF16 = 2;

// A float64 stored bit for bit in an int64 table column (regkern.layouts.float_bits).
inline double float_column(int64_t bits) {
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The same, rounded once to fp32, as torch rounds a Python float that scales
// or bounds an fp32 tensor.
inline float float_column_f32(int64_t bits) { return static_cast<float>(float_column(bits)); }

// Storage conversions of the active variant (testing; isa.cpp): dtype code 1 bf16, 2 f16.
void convert_to_f32(int dtype, const uint16_t* src, float* dst, int64_t n);
void convert_from_f32(int dtype, const float* src, uint16_t* dst, int64_t n);

}  // namespace regkern
