// Fused solver step: kernel declarations (raw pointers, sizes, stream). No torch headers here.
//
// Per element i of a sample of shape [B, inner] (see pydiff/reference/solver.py, which defines it):
//   m   = (u + g (c - u)) r[b]          (m = c r[b] without u; m = 0 without c)
//   d   = clamp(px x + pm m, lo, hi)    (skipped when lo >= hi)
//   e   = ex x + em m + ed d
//   out_j = a_j.x x + a_j.m m + a_j.d d + a_j.e e + a_j.z z + sum_k a_j.h[k] h_k     (j = 0, 1)
// Coefficients are float64 on the host (or a float64 device table row), computed in fp32 per element.
// Optional x0 statistics (hallucination score, Aithal et al. 2024), float64 [2, numel], in place:
//   x0_stats[0][i] += d_i,   x0_stats[1][i] += d_i^2
// so the variance of the x0 estimate d over the tracked steps needs no stored trajectory.
#pragma once
#include <cstdint>

namespace pydiff {

constexpr int kMaxHistory = 6;
constexpr int kHeadCoeffs = 6;  // g px pm ex em ed
constexpr int kRowTerms = 5;    // x m d e z
inline constexpr int num_step_coeffs(int k) { return kHeadCoeffs + 2 * (kRowTerms + k); }
constexpr int kMaxStepCoeffs = num_step_coeffs(kMaxHistory);

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct SolverStepArgs {
  DType dtype;
  int64_t numel;        // elements of x
  int64_t inner;        // elements per sample (numel / batch), used for row_scale
  const void* x;
  const void* model_cond;    // may be null: m = 0
  const void* model_uncond;  // may be null: no CFG
  const void* history[kMaxHistory];
  int num_history;
  const void* noise;         // may be null
  const float* row_scale;    // may be null; [batch]
  void* out_x;
  void* out_h;               // may be null: the history entry is not written
  // Coefficients: either host values (coeffs, used when coeff_table is null) or a device table
  // [table_rows, num_step_coeffs(num_history)] of float64 read at row clamp(*step, 0, table_rows-1).
  double coeffs[kMaxStepCoeffs];
  const double* coeff_table;
  const int64_t* step;
  int64_t table_rows;
  float clip_lo, clip_hi;
  double* x0_stats;          // may be null; else float64 [2, numel], accumulated in place
};

// CPU kernel (OpenMP-parallel, vectorised). Returns 0 on success, nonzero on bad arguments.
int solver_step_cpu(const SolverStepArgs& args);

// CUDA kernel, launched on `stream` (a cudaStream_t). Returns a cudaError_t value (0 = success).
int solver_step_cuda(const SolverStepArgs& args, void* stream);
// Tuning hook for bench/tune_solver.py: the step kernel's threads per block (64, 128 or 256) and grid
// cap in blocks per multiprocessor (past it, threads loop grid-stride); 0, 0 restores the defaults
// (256 threads, 64 blocks per SM: one 16-byte vector per thread at the benchmark sizes). Process-wide
// and not synchronised with launches in flight on other threads. Returns nonzero for a bad value.
int solver_step_cuda_set_launch(int threads, int blocks_per_sm);

// Guidance-rescale factor per sample: r[b] = phi std(c_b) / std(u_b + g (c_b - u_b)) + (1 - phi)
// (unbiased std over `inner` elements, sums in float64). out: float32 [batch].
int cfg_rescale_cpu(DType dtype, int64_t batch, int64_t inner, const void* cond, const void* uncond,
                    double guidance, double phi, float* out);
// `workspace` must hold cfg_rescale_cuda_workspace(batch) bytes of device memory.
int64_t cfg_rescale_cuda_workspace(int64_t batch);
int cfg_rescale_cuda(DType dtype, int64_t batch, int64_t inner, const void* cond, const void* uncond,
                     double guidance, double phi, float* out, void* workspace, void* stream);

}  // namespace pydiff
