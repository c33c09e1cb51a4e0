// Fused solver step, CPU kernel: one pass over the inputs in L1-sized chunks, two threads with
// OpenMP. Each chunk is converted to fp32 buffers, combined with simple loops the compiler
// vectorises, and written once. Formula: csrc/include/pydiff/solver.h.
#include <algorithm>
#include <cmath>

#include "pydiff/cpu_types.h"
#include "pydiff/solver.h"

namespace pydiff {
namespace {

constexpr int64_t kChunk = 512;

template <typename T>
inline void load(const void* p, int64_t off, int64_t n, float* __restrict__ dst) {
  const T* src = static_cast<const T*>(p) + off;
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename T>
inline void store(void* p, int64_t off, int64_t n, const float* __restrict__ src) {
  T* dst = static_cast<T*>(p) + off;
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

template <typename T>
void run(const SolverStepArgs& a, const float* c) {
  const int k = a.num_history;
  const float g = c[0], px = c[1], pm = c[2], ex = c[3], em = c[4], ed = c[5];
  const float* r0 = c + kHeadCoeffs;
  const float* r1 = r0 + kRowTerms + k;
  const bool clip = a.clip_lo < a.clip_hi;
  const int64_t inner = a.inner;
  const int64_t batch = a.numel / inner;
  const int64_t per_row = (inner + kChunk - 1) / kChunk;
  const int64_t total = batch * per_row;

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    alignas(64) float X[kChunk], M[kChunk], D[kChunk], O0[kChunk], O1[kChunk], B[kChunk];
    const int64_t b = t / per_row;
    const int64_t lo = b * inner + (t % per_row) * kChunk;
    const int64_t n = std::min(kChunk, b * inner + inner - lo);
    load<T>(a.x, lo, n, X);
    if (a.model_cond) {
      load<T>(a.model_cond, lo, n, M);
      if (a.model_uncond) {
        load<T>(a.model_uncond, lo, n, B);
        for (int64_t i = 0; i < n; ++i) M[i] = B[i] + g * (M[i] - B[i]);
      }
      if (a.row_scale) {
        const float r = a.row_scale[b];
        for (int64_t i = 0; i < n; ++i) M[i] *= r;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) M[i] = 0.f;
    }
    for (int64_t i = 0; i < n; ++i) D[i] = px * X[i] + pm * M[i];
    if (clip) {
      const float cl = a.clip_lo, ch = a.clip_hi;
      for (int64_t i = 0; i < n; ++i) D[i] = D[i] < cl ? cl : (D[i] > ch ? ch : D[i]);
    }
    for (int64_t i = 0; i < n; ++i) {
      const float e = ex * X[i] + em * M[i] + ed * D[i];
      O0[i] = r0[0] * X[i] + r0[1] * M[i] + r0[2] * D[i] + r0[3] * e;
      O1[i] = r1[0] * X[i] + r1[1] * M[i] + r1[2] * D[i] + r1[3] * e;
    }
    if (a.noise) {
      load<T>(a.noise, lo, n, B);
      for (int64_t i = 0; i < n; ++i) { O0[i] += r0[4] * B[i]; O1[i] += r1[4] * B[i]; }
    }
    for (int j = 0; j < k; ++j) {
      load<T>(a.history[j], lo, n, B);
      const float w0 = r0[kRowTerms + j], w1 = r1[kRowTerms + j];
      for (int64_t i = 0; i < n; ++i) { O0[i] += w0 * B[i]; O1[i] += w1 * B[i]; }
    }
    store<T>(a.out_x, lo, n, O0);
    if (a.out_h) store<T>(a.out_h, lo, n, O1);
  }
}

}  // namespace

int solver_step_cpu(const SolverStepArgs& a) {
  if (a.numel == 0 && a.num_history >= 0 && a.num_history <= kMaxHistory) return 0;
  if (a.num_history < 0 || a.num_history > kMaxHistory || a.numel < 0 || a.inner <= 0 ||
      (a.numel > 0 && a.numel % a.inner != 0) || !a.x || !a.out_x)
    return 1;
  for (int j = 0; j < a.num_history; ++j)
    if (!a.history[j]) return 1;
  const int nc = num_step_coeffs(a.num_history);
  float c[kMaxStepCoeffs];
  if (a.coeff_table) {
    if (!a.step || a.table_rows < 1) return 1;
    const int64_t row = std::min(std::max<int64_t>(*a.step, 0), a.table_rows - 1);
    for (int i = 0; i < nc; ++i) c[i] = float(a.coeff_table[row * nc + i]);
  } else {
    for (int i = 0; i < nc; ++i) c[i] = float(a.coeffs[i]);
  }
  switch (a.dtype) {
    case DType::kF32: run<float>(a, c); break;
    case DType::kF16: run<half_t>(a, c); break;
    case DType::kBF16: run<bf16_t>(a, c); break;
    default: return 1;
  }
  return 0;
}

namespace {
template <typename T>
void rescale(int64_t batch, int64_t inner, const void* cond, const void* uncond, double g, double phi, float* out) {
  const T* c = static_cast<const T*>(cond);
  const T* u = static_cast<const T*>(uncond);
  for (int64_t b = 0; b < batch; ++b) {
    double sc = 0, sc2 = 0, sf = 0, sf2 = 0;
#pragma omp parallel for reduction(+ : sc, sc2, sf, sf2) schedule(static)
    for (int64_t i = 0; i < inner; ++i) {
      const double cv = to_float(c[b * inner + i]);
      const double uv = to_float(u[b * inner + i]);
      const double fv = uv + g * (cv - uv);
      sc += cv; sc2 += cv * cv; sf += fv; sf2 += fv * fv;
    }
    const double n = double(inner);
    const double var_c = std::max(0.0, (sc2 - sc * sc / n) / (n - 1));
    const double var_f = std::max(0.0, (sf2 - sf * sf / n) / (n - 1));
    out[b] = float(phi * std::sqrt(var_c) / std::sqrt(var_f) + (1.0 - phi));
  }
}
}  // namespace

int cfg_rescale_cpu(DType dtype, int64_t batch, int64_t inner, const void* cond, const void* uncond, double guidance,
                    double phi, float* out) {
  if (batch < 0 || inner < 2 || !cond || !uncond || !out) return 1;
  switch (dtype) {
    case DType::kF32: rescale<float>(batch, inner, cond, uncond, guidance, phi, out); break;
    case DType::kF16: rescale<half_t>(batch, inner, cond, uncond, guidance, phi, out); break;
    case DType::kBF16: rescale<bf16_t>(batch, inner, cond, uncond, guidance, phi, out); break;
    default: return 1;
  }
  return 0;
}

}  // namespace pydiff
