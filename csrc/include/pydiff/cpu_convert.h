// Bulk fp16 / bf16 <-> fp32 conversion of a run of elements for the CPU kernels, compiled with an
// AVX2 clone (target_clones: resolved once at load time), so the branch-free element conversions of
// cpu_types.h vectorise 8 wide; the kernels' own template bodies are not cloned and would run them at
// the baseline SSE2 width. Internal linkage: each kernel file gets its own copy.
#pragma once
#include <cstdint>

#include "pydiff/cpu_types.h"

namespace pydiff {
namespace {

[[maybe_unused]] PYDIFF_CLONES_AVX2 void convert_to_float(const half_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
[[maybe_unused]] PYDIFF_CLONES_AVX2 void convert_to_float(const bf16_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
[[maybe_unused]] inline void convert_to_float(const float* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
[[maybe_unused]] PYDIFF_CLONES_AVX2 void convert_from_float(const float* __restrict__ src, int64_t n, half_t* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<half_t>(src[i]);
}
[[maybe_unused]] PYDIFF_CLONES_AVX2 void convert_from_float(const float* __restrict__ src, int64_t n, bf16_t* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<bf16_t>(src[i]);
}
[[maybe_unused]] inline void convert_from_float(const float* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

}  // namespace
}  // namespace pydiff
