// Fused solver step, CPU kernel: one pass over the inputs in L1-sized chunks, two threads with
// OpenMP. Each chunk is converted to fp32 buffers, combined with simple loops the compiler
// vectorises, and written once. Formula: csrc/include/pydiff/solver.h.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "pydiff/cpu_types.h"
#include "pydiff/solver.h"

namespace pydiff {
namespace {

constexpr int64_t kChunk = 512;
constexpr int64_t kParallelMin = int64_t(1) << 16;  // below this, a parallel region costs more than it saves

template <typename T>
inline void load(const void* p, int64_t off, int64_t n, float* __restrict__ dst) {
  const T* src = static_cast<const T*>(p) + off;
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
// fp32: a pointer into the tensor itself; fp16/bf16: converted into buf.
template <typename T>
inline const float* view(const void* p, int64_t off, int64_t n, float* buf) {
  if (std::is_same<T, float>::value) return static_cast<const float*>(p) + off;
  load<T>(p, off, n, buf);
  return buf;
}
template <typename T>
inline float* out_view(void* p, int64_t off, float* buf) {
  if (std::is_same<T, float>::value) return static_cast<float*>(p) + off;
  return buf;
}
template <typename T>
inline void store(void* p, int64_t off, int64_t n, const float* __restrict__ src) {
  T* dst = static_cast<T*>(p) + off;
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

struct Coef {
  float g, px, pm, ex, em, ed;
  float a0[4], a1[4];  // x m d e terms of the two outputs
  float lo, hi;
  bool clip;
};

// m = (u + g (c - u)) * r (M holds c on entry; U may be null), then d, e and the x/m/d/e terms of
// both outputs. Coefficients arrive by value, so the loops keep them in registers and vectorise.
// O1 == nullptr: the history output is not written, and not computed.
PYDIFF_CLONES_AVX2 void chunk_math(const Coef k, int64_t n, const float* __restrict__ X, const float* __restrict__ C,
                              const float* __restrict__ U, float r, float* __restrict__ M, float* __restrict__ O0,
                              float* __restrict__ O1) {
  if (!C) {
    for (int64_t i = 0; i < n; ++i) M[i] = 0.f;
  } else if (U) {
    for (int64_t i = 0; i < n; ++i) M[i] = (U[i] + k.g * (C[i] - U[i])) * r;
  } else {
    for (int64_t i = 0; i < n; ++i) M[i] = C[i] * r;
  }
  if (k.clip) {
    for (int64_t i = 0; i < n; ++i) {
      float d = k.px * X[i] + k.pm * M[i];
      d = d < k.lo ? k.lo : (d > k.hi ? k.hi : d);
      const float e = k.ex * X[i] + k.em * M[i] + k.ed * d;
      O0[i] = k.a0[0] * X[i] + k.a0[1] * M[i] + k.a0[2] * d + k.a0[3] * e;
      if (O1) O1[i] = k.a1[0] * X[i] + k.a1[1] * M[i] + k.a1[2] * d + k.a1[3] * e;
    }
  } else if (!O1) {
    for (int64_t i = 0; i < n; ++i) {
      const float d = k.px * X[i] + k.pm * M[i];
      const float e = k.ex * X[i] + k.em * M[i] + k.ed * d;
      O0[i] = k.a0[0] * X[i] + k.a0[1] * M[i] + k.a0[2] * d + k.a0[3] * e;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float d = k.px * X[i] + k.pm * M[i];
      const float e = k.ex * X[i] + k.em * M[i] + k.ed * d;
      O0[i] = k.a0[0] * X[i] + k.a0[1] * M[i] + k.a0[2] * d + k.a0[3] * e;
      O1[i] = k.a1[0] * X[i] + k.a1[1] * M[i] + k.a1[2] * d + k.a1[3] * e;
    }
  }
}

PYDIFF_CLONES_AVX2 void chunk_axpy2(int64_t n, const float* __restrict__ B, float w0, float w1, float* __restrict__ O0,
                               float* __restrict__ O1) {
  if (!O1) {
    for (int64_t i = 0; i < n; ++i) O0[i] += w0 * B[i];
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    O0[i] += w0 * B[i];
    O1[i] += w1 * B[i];
  }
}

// x0 statistics: S1 += d, S2 += d^2 (float64), d recomputed from X and M exactly as chunk_math does.
void chunk_x0_stats(const Coef& k, int64_t n, const float* __restrict__ X, const float* __restrict__ M,
                    double* __restrict__ S1, double* __restrict__ S2) {
  for (int64_t i = 0; i < n; ++i) {
    float d = k.px * X[i] + k.pm * M[i];
    if (k.clip) d = d < k.lo ? k.lo : (d > k.hi ? k.hi : d);
    S1[i] += double(d);
    S2[i] += double(d) * double(d);
  }
}

template <typename T>
void run(const SolverStepArgs& a, const float* c) {
  const int k = a.num_history;
  const float* r0 = c + kHeadCoeffs;
  const float* r1 = r0 + kRowTerms + k;
  Coef co;
  co.g = c[0]; co.px = c[1]; co.pm = c[2]; co.ex = c[3]; co.em = c[4]; co.ed = c[5];
  for (int j = 0; j < 4; ++j) { co.a0[j] = r0[j]; co.a1[j] = r1[j]; }
  co.clip = a.clip_lo < a.clip_hi;
  co.lo = a.clip_lo;
  co.hi = a.clip_hi;
  const float z0 = r0[4], z1 = r1[4];
  float w0[kMaxHistory], w1[kMaxHistory];
  for (int j = 0; j < k; ++j) { w0[j] = r0[kRowTerms + j]; w1[j] = r1[kRowTerms + j]; }
  // Rows matter only for the per-sample guidance-rescale factor; without it the tensor is one flat
  // row, so small rows (1-D inputs, [N, 2] point clouds) still run in whole chunks of kChunk.
  const bool per_row = a.model_cond && a.row_scale;
  const int64_t inner = per_row ? a.inner : a.numel;
  const int64_t batch = a.numel / inner;
  const int64_t chunks_per_row = (inner + kChunk - 1) / kChunk;
  const int64_t total = batch * chunks_per_row;

  auto body = [&](int64_t t) {
    // fp32 tensors are read and written in place; fp16/bf16 go through fp32 buffers in L1
    alignas(64) float Xb[kChunk], Cb[kChunk], Ub[kChunk], M[kChunk], O0b[kChunk], O1b[kChunk], B[kChunk];
    const int64_t b = t / chunks_per_row;
    const int64_t lo = b * inner + (t % chunks_per_row) * kChunk;
    const int64_t n = std::min(kChunk, b * inner + inner - lo);
    const float* X = view<T>(a.x, lo, n, Xb);
    const float* C = a.model_cond ? view<T>(a.model_cond, lo, n, Cb) : nullptr;
    const float* U = (a.model_cond && a.model_uncond) ? view<T>(a.model_uncond, lo, n, Ub) : nullptr;
    float* O0 = out_view<T>(a.out_x, lo, O0b);
    float* O1 = a.out_h ? out_view<T>(a.out_h, lo, O1b) : nullptr;
    const float r = per_row ? a.row_scale[b] : 1.f;
    chunk_math(co, n, X, C, U, r, M, O0, O1);
    if (a.x0_stats) chunk_x0_stats(co, n, X, M, a.x0_stats + lo, a.x0_stats + a.numel + lo);
    if (a.noise) chunk_axpy2(n, view<T>(a.noise, lo, n, B), z0, z1, O0, O1);
    for (int j = 0; j < k; ++j) chunk_axpy2(n, view<T>(a.history[j], lo, n, B), w0[j], w1[j], O0, O1);
    if (!std::is_same<T, float>::value) {
      store<T>(a.out_x, lo, n, O0);
      if (a.out_h) store<T>(a.out_h, lo, n, O1);
    }
  };
  if (a.numel >= kParallelMin) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < total; ++t) body(t);
  } else {  // no region at all: a disabled one (`if (false)`) still sets up a team, ~0.27 us a call here
    for (int64_t t = 0; t < total; ++t) body(t);
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
#pragma omp parallel for reduction(+ : sc, sc2, sf, sf2) schedule(static) if (inner >= kParallelMin)
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
