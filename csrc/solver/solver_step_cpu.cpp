// Fused solver step, CPU kernel: one pass over the inputs in L1-sized chunks, two threads with
// OpenMP. fp32 chunks are used in place, fp16 / bf16 ones converted to fp32 buffers; one vectorised
// loop per chunk (chunk_fused) combines them and writes each output once. Formula:
// csrc/include/pydiff/solver.h.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "pydiff/cpu_convert.h"
#include "pydiff/cpu_types.h"
#include "pydiff/solver.h"

namespace pydiff {
namespace {

constexpr int64_t kChunk = 512;
constexpr int64_t kParallelMin = int64_t(1) << 16;  // below this, a parallel region costs more than it saves

template <typename T>
inline void load(const void* p, int64_t off, int64_t n, float* __restrict__ dst) {
  convert_to_float(static_cast<const T*>(p) + off, n, dst);
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
  convert_from_float(src, n, static_cast<T*>(p) + off);
}

struct Coef {
  float g, px, pm, ex, em, ed;
  float a0[4], a1[4];  // x m d e terms of the two outputs
  float lo, hi;  // the clip of d (-inf, +inf without one)
};

// Per element, in one loop (each input read once, each output written once):
//   m = (u + g (c - u)) r  (MODE 2; MODE 1: m = c r; MODE 0: m = 0)
//   d = clamp(px x + pm m, lo, hi)  (lo = -inf, hi = +inf without a clip: the identity, NaN included),
//       stored to D for the x0 statistics
//   e = ex x + em m + ed d
//   o0 = a0 . (x, m, d, e) + z0 noise + sum_j w0_j h_j, and o1 likewise with a1, z1, w1 when OUT_H.
// The terms are added in the order of the formula (noise, then h_0, h_1, ...); K (history length) and
// the options are template parameters, so the loop has no branches and vectorises. One loop over all
// streams runs at ~the speed of a torch.compile'd step from DRAM; the earlier pass per history
// entry (re-reading o0 / o1 from L1) was 1.3-1.8x slower there (1x16x21x90x160 fp32, one thread).
template <int K, int MODE, bool NOISE, bool OUT_H>
PYDIFF_CLONES_AVX2 void chunk_fused(const Coef k, int64_t n, const float* __restrict__ X, const float* __restrict__ C,
                                   const float* __restrict__ U, float r, const float* __restrict__ Z,
                                   const float* const* __restrict__ H, const float* __restrict__ w0,
                                   const float* __restrict__ w1, float z0, float z1, float* __restrict__ D,
                                   float* __restrict__ O0, float* __restrict__ O1) {
  const float* h[K > 0 ? K : 1];
  float v0[K > 0 ? K : 1], v1[K > 0 ? K : 1];
  for (int j = 0; j < K; ++j) { h[j] = H[j]; v0[j] = w0[j]; v1[j] = w1[j]; }
  for (int64_t i = 0; i < n; ++i) {
    const float x = X[i];
    float m = 0.f;
    if (MODE == 2) m = (U[i] + k.g * (C[i] - U[i])) * r;
    if (MODE == 1) m = C[i] * r;
    float d = k.px * x + k.pm * m;
    d = d < k.lo ? k.lo : (d > k.hi ? k.hi : d);
    D[i] = d;
    const float e = k.ex * x + k.em * m + k.ed * d;
    float o0 = k.a0[0] * x + k.a0[1] * m + k.a0[2] * d + k.a0[3] * e;
    float o1 = OUT_H ? k.a1[0] * x + k.a1[1] * m + k.a1[2] * d + k.a1[3] * e : 0.f;
    if (NOISE) {
      o0 += z0 * Z[i];
      if (OUT_H) o1 += z1 * Z[i];
    }
    for (int j = 0; j < K; ++j) {
      o0 += v0[j] * h[j][i];
      if (OUT_H) o1 += v1[j] * h[j][i];
    }
    O0[i] = o0;
    if (OUT_H) O1[i] = o1;
  }
}

using ChunkFn = void (*)(const Coef, int64_t, const float*, const float*, const float*, float, const float*,
                         const float* const*, const float*, const float*, float, float, float*, float*, float*);

template <int K>
ChunkFn pick_fused(int mode, bool noise, bool out_h) {
  const int sel = mode * 4 + (noise ? 2 : 0) + (out_h ? 1 : 0);
  switch (sel) {
    case 0: return &chunk_fused<K, 0, false, false>;
    case 1: return &chunk_fused<K, 0, false, true>;
    case 2: return &chunk_fused<K, 0, true, false>;
    case 3: return &chunk_fused<K, 0, true, true>;
    case 4: return &chunk_fused<K, 1, false, false>;
    case 5: return &chunk_fused<K, 1, false, true>;
    case 6: return &chunk_fused<K, 1, true, false>;
    case 7: return &chunk_fused<K, 1, true, true>;
    case 8: return &chunk_fused<K, 2, false, false>;
    case 9: return &chunk_fused<K, 2, false, true>;
    case 10: return &chunk_fused<K, 2, true, false>;
    default: return &chunk_fused<K, 2, true, true>;
  }
}

ChunkFn pick_chunk_fn(int k, int mode, bool noise, bool out_h) {
  static_assert(kMaxHistory == 6, "pick_chunk_fn covers K = 0..6");
  switch (k) {
    case 0: return pick_fused<0>(mode, noise, out_h);
    case 1: return pick_fused<1>(mode, noise, out_h);
    case 2: return pick_fused<2>(mode, noise, out_h);
    case 3: return pick_fused<3>(mode, noise, out_h);
    case 4: return pick_fused<4>(mode, noise, out_h);
    case 5: return pick_fused<5>(mode, noise, out_h);
    default: return pick_fused<6>(mode, noise, out_h);
  }
}

// x0 statistics: S1 += d, S2 += d^2 (float64), d the step's own x0 estimate (chunk_fused's D).
void chunk_x0_stats(int64_t n, const float* __restrict__ D, double* __restrict__ S1, double* __restrict__ S2) {
  for (int64_t i = 0; i < n; ++i) {
    S1[i] += double(D[i]);
    S2[i] += double(D[i]) * double(D[i]);
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
  const bool clip = a.clip_lo < a.clip_hi;
  co.lo = clip ? a.clip_lo : -std::numeric_limits<float>::infinity();
  co.hi = clip ? a.clip_hi : std::numeric_limits<float>::infinity();
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

  const int mode = !a.model_cond ? 0 : (a.model_uncond ? 2 : 1);
  const ChunkFn fn = pick_chunk_fn(k, mode, a.noise != nullptr, a.out_h != nullptr);

  auto body = [&](int64_t t) {
    // fp32 tensors are read and written in place; fp16/bf16 go through fp32 buffers in L1
    alignas(64) float Xb[kChunk], Cb[kChunk], Ub[kChunk], Zb[kChunk], D[kChunk], O0b[kChunk], O1b[kChunk];
    alignas(64) float Hb[std::is_same<T, float>::value ? 1 : kMaxHistory][kChunk];
    const int64_t b = t / chunks_per_row;
    const int64_t lo = b * inner + (t % chunks_per_row) * kChunk;
    const int64_t n = std::min(kChunk, b * inner + inner - lo);
    const float* X = view<T>(a.x, lo, n, Xb);
    const float* C = a.model_cond ? view<T>(a.model_cond, lo, n, Cb) : nullptr;
    const float* U = (a.model_cond && a.model_uncond) ? view<T>(a.model_uncond, lo, n, Ub) : nullptr;
    const float* Z = a.noise ? view<T>(a.noise, lo, n, Zb) : nullptr;
    const float* H[kMaxHistory];
    for (int j = 0; j < k; ++j) H[j] = view<T>(a.history[j], lo, n, Hb[std::is_same<T, float>::value ? 0 : j]);
    float* O0 = out_view<T>(a.out_x, lo, O0b);
    float* O1 = a.out_h ? out_view<T>(a.out_h, lo, O1b) : nullptr;
    const float r = per_row ? a.row_scale[b] : 1.f;
    fn(co, n, X, C, U, r, Z, H, w0, w1, z0, z1, D, O0, O1);
    if (a.x0_stats) chunk_x0_stats(n, D, a.x0_stats + lo, a.x0_stats + a.numel + lo);
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
