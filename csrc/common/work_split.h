// Work split of a multi-tensor pass over OpenMP threads, shared by every
// kernel family (sgd, rda, admm).
//
// The elements of all tensors are laid end to end and cut into one share per
// thread with equal element counts; each cut is snapped to a multiple of the
// tensor's unit (64 elements, or its row length where a row must be stepped
// by one thread). A share may cover many small tensors and parts of big ones,
// so many small tensors cost about as much per element as one big one, and a
// call is one OpenMP region (on torch's OpenMP runtime).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace regkern {
namespace work_split {

// Default cut granularity: whole cache lines in every stream, byte masks too.
constexpr int64_t kAlign = 64;
// Fewer elements per thread cost more in the region's start than they save.
constexpr int64_t kMinPerThread = 16384;

struct Layout {
  std::vector<int64_t> off;   // off[t]: first global element of tensor t; off.back(): total
  std::vector<int64_t> unit;  // cut granularity of tensor t (>= 1)

  explicit Layout(size_t count) : off(count + 1, 0), unit(count, kAlign) {}
  int64_t total() const { return off.back(); }
};

// The legal cut nearest to global element p.
inline int64_t snap(const Layout& l, int64_t p) {
  const int64_t total = l.total();
  if (p <= 0 || p >= total) return p <= 0 ? 0 : total;
  const size_t t = static_cast<size_t>(std::upper_bound(l.off.begin(), l.off.end(), p) - l.off.begin()) - 1;
  const int64_t unit = l.unit[t];
  const int64_t o = (p - l.off[t] + unit / 2) / unit * unit;
  return l.off[t] + std::min(o, l.off[t + 1] - l.off[t]);
}

// fn(t, lo, hi) for every tensor t overlapping global elements [lo, hi),
// with [lo, hi) in t's own element numbers.
template <class Fn>
void run_range(const Layout& l, int64_t lo, int64_t hi, Fn&& fn) {
  if (lo >= hi) return;
  size_t t = static_cast<size_t>(std::upper_bound(l.off.begin(), l.off.end(), lo) - l.off.begin()) - 1;
  for (; t + 1 < l.off.size() && l.off[t] < hi; ++t) {
    const int64_t a = std::max(lo, l.off[t]) - l.off[t];
    const int64_t b = std::min(hi, l.off[t + 1]) - l.off[t];
    if (a < b) fn(t, a, b);
  }
}

// Run fn over every element of every tensor on up to num_threads threads,
// each at least min_per_thread elements. Call it without the GIL.
template <class Fn>
void parallel_for(const Layout& l, int num_threads, Fn&& fn, int64_t min_per_thread = kMinPerThread) {
  const int64_t total = l.total();
  if (total <= 0) return;
  int64_t want = num_threads < 1 ? 1 : num_threads;
  want = std::min(want, std::max<int64_t>(1, total / min_per_thread));
  if (want == 1) {
    run_range(l, 0, total, fn);
    return;
  }
  // One contiguous share per thread (each thread streams its own region, like
  // at::parallel_for; measured faster than handing out small units).
#pragma omp parallel num_threads(static_cast<int>(want))
  {
    const int64_t n = omp_get_num_threads();
    const int64_t i = omp_get_thread_num();
    // cut j of n: floor(total * j / n) without overflow
    auto cut = [&](int64_t j) { return (total / n) * j + (total % n) * j / n; };
    run_range(l, snap(l, cut(i)), snap(l, cut(i + 1)), fn);
  }
}

}  // namespace work_split
}  // namespace regkern
