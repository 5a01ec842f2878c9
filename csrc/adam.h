// C++ CPU backend of the `adam` kernel family: fused Adam / AdamW with the
// regularizer terms of the sgd family (see regkern/reference/adam.py for the
// contract). adam_step first checks its table (table_check.h: TableError,
// nothing written) and then computes.
#pragma once

#include <cstdint>

#include "sgd.h"

namespace regkern {

// One fused Adam / AdamW step over every tensor of the metadata table
// (adam_table.h): every STEP is incremented by 1 (fp32), then each tensor is
// stepped with its bias corrections. weight_decay: Adam's L2 decay (h = g +
// wd W); decay: AdamW's decoupled decay (W *= 1 - lr decay). coupled: the
// regularizer terms join the gradient (else W -= lr * terms). Runs on up to
// `num_threads` OpenMP threads; call it without the GIL.
void adam_step(const int64_t* table, int64_t num_tensors, double lr, double beta1, double beta2, double eps,
               double weight_decay, double decay, bool amsgrad, bool maximize, bool coupled, double grad_scale,
               int num_threads);

// The checks adam_step makes before it writes anything: throws TableError on
// the first row it refuses (those of the sgd columns, sgd.cpp, plus BUF and
// FIRST set, the moments and STEP of a tensor with elements missing, and
// MAX_EXP_AVG_SQ missing under amsgrad).
void adam_check_table(const int64_t* table, int64_t num_tensors, bool amsgrad);

namespace detail {

// MKL's vmsSqrt (n, a, r, mode) as torch calls it (at::vml::vsqrt), or null.
typedef void (*VmlSqrtFn)(int n, const float* a, float* r, long long mode);
// torch's mode: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
constexpr long long kVmlSqrtMode = 0x2 | 0x140000 | 0x100;

// The sqrt torch's CPU `sqrt` uses on fp32 tensors: MKL's vmsSqrt (high
// accuracy mode, not always correctly rounded) found in the loaded
// libtorch_cpu, or null where torch has no MKL (its sqrt is then the
// correctly rounded one). Looked up once.
VmlSqrtFn torch_vml_sqrt();

// Hyper-parameters of one call, each rounded once to fp32 like torch rounds
// a Python scalar that multiplies an fp32 tensor.
struct AdamHyper {
  float lr, scale, wd;
  float keep_w;     // 1 - lr * decay (computed in double; 1 without decay)
  float lerp_coef;  // torch's lerp weight 1 - b1, or (weight >= 0.5) weight - 1
  uint32_t lerp_small;  // all ones: m = fma(w, h - m, m); zero: m = fma(w - 1, h - m, h)
  float b2, one_b2, eps;
  bool has_scale, has_wd, maximize, amsgrad, coupled;
  VmlSqrtFn vml_sqrt;  // torch_vml_sqrt() (null: __builtin_sqrtf)
};

// Elements per piece of the bf16 in-place path (adam_kernel.h, AdamStep::part):
// its moments, square roots and W pass run piece after piece; measured on
// ResNet-50 bf16 at 1 thread, 512 beat kPiece16 (128) by 5% (fewer calls).
constexpr int64_t kAdamPiece16 = 512;

// One decoded row: the sgd columns, the moments and the per-tensor bias
// corrections of this step.
struct AdamDesc {
  TensorDesc t;
  void* m;
  void* v;
  void* vmax;          // amsgrad only
  float neg_step_size;  // -(lr / (1 - b1^t)), rounded once
  float bc2_sqrt;       // sqrt(1 - b2^t), rounded once
};

// Per-ISA entry points (adam_kernel.h, compiled once per variant in adam.cpp).
struct AdamIsaKernels {
  // Step elements [lo, hi) of one tensor; row-aligned when the tensor has
  // norms or the group lasso.
  void (*range)(const AdamDesc&, const AdamHyper&, int64_t lo, int64_t hi);
};

}  // namespace detail
}  // namespace regkern
