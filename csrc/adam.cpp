// C++ CPU backend of the `adam` kernel family: table checks, decoding, the
// step counts and bias corrections, and the call into the kernel variant
// that runs.
//
// The table is the sgd table (whose checks and decode are sgd.cpp's,
// check_sgd_columns / decode_sgd_columns) with the moments and the step
// count after it (adam_table.h). The kernel body (adam_kernel.h) is compiled
// once per instruction-set variant (common/isa_variants.inc) and shares the
// term math and the block / row / group-lasso machinery of the sgd family
// (common/term_math.h). Work split as sgd's (common/work_split.h): row
// cuts where a tensor writes row norms or takes the group lasso.
#include "adam.h"

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "adam_table.h"
#include "common/dtype.h"
#include "common/isa.h"
#include "common/work_split.h"
#include "sgd.h"
#include "table_check.h"

// The piece temporaries are filled by loops GCC cannot bound.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define RK_KERNEL_BODY "adam_kernel.h"
#include "common/isa_variants.inc"

namespace regkern {
namespace detail {
namespace {

const AdamIsaKernels* const kByVariant[isa::kCount] = RK_VARIANT_KERNELS;

// Refuse a row before anything is written: what sgd's check refuses (the
// shared columns), a momentum buffer or first-step flag (the adam family has
// neither), missing moments or step count of a tensor with elements, and a
// missing MAX_EXP_AVG_SQ under amsgrad (without amsgrad it is not read).
void check_row(const int64_t* row, int64_t index, bool amsgrad) {
  namespace c = adam_col;
  const table_check::Row r("adam", "regkern.backends.adam.build_adam_table", c::NAMES, row, index);
  check_sgd_columns(r, false);
  r.absent(c::BUF, true, "the adam family keeps no momentum buffer");
  if (r[c::FIRST] != 0) r.refuse(c::FIRST, "but the adam family has no first momentum step (FIRST must be 0)");
  const bool elements = r[c::NUMEL] > 0;
  r.present(c::EXP_AVG, elements, "a tensor with elements");
  r.present(c::EXP_AVG_SQ, elements, "a tensor with elements");
  r.present(c::MAX_EXP_AVG_SQ, elements && amsgrad, "an amsgrad step of a tensor with elements");
  r.present(c::STEP, elements, "a tensor with elements");
}

// dl_iterate_phdr callback: vmsSqrt of the loaded libtorch_cpu (searched
// with its dependencies, so a dynamically linked MKL is found too).
int find_vml_sqrt(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name == nullptr || std::strstr(name, "libtorch_cpu") == nullptr) return 0;
  void* lib = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return 0;
  void* fn = dlsym(lib, "vmsSqrt");
  dlclose(lib);  // torch keeps it loaded
  *static_cast<void**>(out) = fn;
  return 1;
}

}  // namespace

VmlSqrtFn torch_vml_sqrt() {
  static const VmlSqrtFn fn = [] {
    void* found = nullptr;
    dl_iterate_phdr(&find_vml_sqrt, &found);
    return reinterpret_cast<VmlSqrtFn>(found);
  }();
  return fn;
}

}  // namespace detail

void adam_check_table(const int64_t* table, int64_t num_tensors, bool amsgrad) {
  for (int64_t i = 0; i < num_tensors; ++i) detail::check_row(table + i * adam_col::NUM_FIELDS, i, amsgrad);
}

void adam_step(const int64_t* table, int64_t num_tensors, double lr, double beta1, double beta2, double eps,
               double weight_decay, double decay, bool amsgrad, bool maximize, bool coupled, double grad_scale,
               int num_threads) {
  using namespace detail;
  if (num_tensors <= 0) return;
  AdamHyper h;
  h.lr = static_cast<float>(lr);
  h.scale = static_cast<float>(grad_scale);
  h.wd = static_cast<float>(weight_decay);
  h.keep_w = decay != 0.0 ? static_cast<float>(1.0 - lr * decay) : 1.0f;  // W * 1 changes nothing
  // torch's lerp(m, h, w): fma(w, h - m, m) for |w| < 0.5, else
  // fma(w - 1, h - m, h), with w = 1 - b1 rounded to fp32
  const float w1 = static_cast<float>(1.0 - beta1);
  const bool small = std::fabs(w1) < 0.5f;
  h.lerp_coef = small ? w1 : w1 - 1.0f;
  h.lerp_small = small ? ~0u : 0u;
  h.b2 = static_cast<float>(beta2);
  h.one_b2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.has_scale = grad_scale != 1.0;
  h.has_wd = weight_decay != 0.0;
  h.maximize = maximize;
  h.amsgrad = amsgrad;
  h.coupled = coupled;
  h.vml_sqrt = torch_vml_sqrt();

  adam_check_table(table, num_tensors, amsgrad);  // before anything is written
  const size_t count = static_cast<size_t>(num_tensors);
  std::vector<AdamDesc> ts(count);
  work_split::Layout layout(count);
  for (size_t i = 0; i < count; ++i) {
    const int64_t* row = table + static_cast<int64_t>(i) * adam_col::NUM_FIELDS;
    AdamDesc& d = ts[i];
    d.t = decode_sgd_columns(row);
    d.m = reinterpret_cast<void*>(row[adam_col::EXP_AVG]);
    d.v = reinterpret_cast<void*>(row[adam_col::EXP_AVG_SQ]);
    d.vmax = amsgrad ? reinterpret_cast<void*>(row[adam_col::MAX_EXP_AVG_SQ]) : nullptr;
    // the step count: fp32 += 1 like torch's `step += 1`, then the bias
    // corrections in double from the updated count (torch's Python floats:
    // `**` is C pow), each rounded once to fp32
    d.neg_step_size = 0.0f;
    d.bc2_sqrt = 1.0f;
    if (float* step = reinterpret_cast<float*>(row[adam_col::STEP])) {
      *step = *step + 1.0f;
      const double t = static_cast<double>(*step);
      d.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, t))));
      d.bc2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(beta2, t), 0.5));
    }
    const TensorDesc& t = d.t;
    layout.off[i + 1] = layout.off[i] + t.numel;
    if (t.row_cuts && t.row_len > 0) layout.unit[i] = t.row_len;
    if (t.numel == 0 && t.norms != nullptr) {
      // rows of zero elements: L1 = L2 = mean = 0, like the reference
      std::memset(t.norms, 0, static_cast<size_t>(t.rows) * 3 * sizeof(float));
    }
  }
  const AdamIsaKernels* k = kByVariant[isa::active()];
  work_split::parallel_for(layout, num_threads, [&](size_t t, int64_t lo, int64_t hi) { k->range(ts[t], h, lo, hi); });
}

}  // namespace regkern
