// Exact categorical sampling: kernel declarations (raw pointers, sizes, stream). No torch here.
//
// Per row r of logits [R, V] (row stride `row_stride` elements, unit column stride), temperature
// T > 0 (T == 0: argmax) and optional threshold tau[r] (tokens with l < tau[r] are dropped):
//   e_i = exp((l_i - M) / T') for kept tokens (T' = min(T, 2^100), or 1 when T == 0; the kernels form
//   (l_i - M) / T' in fp32), Z = sum e_i (float64),
//   u = uniform53(seed[r], offset[r]), token = min{i : e_0 + ... + e_i > u Z}.
// Outputs: tokens (int64; -1 for rows off in row_mask, -2 for rows with NaN/+inf or no finite kept
// logit), prob (float64, e_token / Z) and stats (float64 [R, 3]: top-1 prob, top-1 - top-2, entropy).
// Definition: pydiff/reference/sampling.py.
#pragma once
#include <cstdint>

#include "pydiff/solver.h"  // DType

namespace pydiff {

// Temperatures above this sample as this one (see above): 1 / T stays a normal fp32 number, and an
// l_i - M that overflows fp32 (|l_i - M| > FLT_MAX) still weighs exp(< -2.6e8) = 0, as it should.
constexpr double kMaxTemperature = 0x1p100;

struct SampleArgs {
  DType dtype;
  int64_t rows, vocab, row_stride;
  const void* logits;
  const float* threshold;    // may be null
  const bool* row_mask;      // may be null
  const int64_t* seeds;      // [rows]
  const int64_t* offsets;    // [rows]
  double temperature;
  int64_t* tokens;           // [rows]
  double* prob;              // [rows]
  double* stats;             // [rows, 3]
  // false: tokens + prob only (the kernels skip the per-logit statistics work and write NaN
  // statistics; the tokens and probabilities are the same). Temperature 0 always computes them.
  bool want_stats = true;
};

#ifdef __CUDACC__
#define PYDIFF_HD __host__ __device__
#else
#define PYDIFF_HD
#endif

// splitmix64 finaliser and the counter-based uniform every backend shares.
PYDIFF_HD inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
PYDIFF_HD inline double uniform53(int64_t seed, int64_t offset) {
  const uint64_t h = mix64(uint64_t(seed) ^ mix64(uint64_t(offset)));
  return double(h >> 11) * (1.0 / 9007199254740992.0);
}

constexpr int64_t kSampleChunk = 2048;  // CPU chunk (elements)

int sample_categorical_cpu(const SampleArgs& args);

// CUDA: `workspace` must hold sample_categorical_cuda_workspace(rows, vocab) bytes of device memory.
int64_t sample_categorical_cuda_workspace(int64_t rows, int64_t vocab);
int sample_categorical_cuda(const SampleArgs& args, void* workspace, void* stream);

}  // namespace pydiff
