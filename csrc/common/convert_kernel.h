// Body of the conversion test entry points for ONE instruction-set variant
// (isa.cpp compiles it through common/isa_variants.inc): the code every
// family inlines, reachable from Python for the exhaustive tests.

namespace regkern {
namespace convert_detail {
namespace RK_NS {

using namespace ::regkern::dtype::RK_NS;

static void to_f32(int dtype, const uint16_t* src, float* dst, int64_t n) {
  if (dtype == kDtypeBF16) widen_n<1>(src, dst, n);
  else widen_n<2>(src, dst, n);
}

static void from_f32(int dtype, const float* src, uint16_t* dst, int64_t n) {
  if (dtype == kDtypeBF16) narrow_n<1>(src, dst, n);
  else narrow_n<2>(src, dst, n);
}

static const Kernels kernels = {&to_f32, &from_f32};

}  // namespace RK_NS
}  // namespace convert_detail
}  // namespace regkern
