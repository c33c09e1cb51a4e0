// Fused solver step, CUDA kernel. Includes only CUDA headers (no torch): compiles in about a second.
// Memory-bound: each thread handles VEC consecutive elements with 16-byte loads and stores when
// every pointer is 16-byte aligned; coefficients are staged in shared memory as fp32, read either
// from the kernel arguments or from a float64 device table at a device-side step index (so a
// whole sampling loop needs no host synchronisation and can be captured in one CUDA graph).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pydiff/cuda_types.cuh"
#include "pydiff/solver.h"

namespace pydiff {
namespace {

template <typename T> __device__ __forceinline__ T fromf(float v);
template <> __device__ __forceinline__ float fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __half fromf<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const void* p, int64_t i, float* out) {
  const Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(static_cast<const T*>(p) + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = tof(r.v[j]);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(void* p, int64_t i, const float* in) {
  Vec<T, VEC> r;
#pragma unroll
  for (int j = 0; j < VEC; ++j) r.v[j] = fromf<T>(in[j]);
  *reinterpret_cast<Vec<T, VEC>*>(static_cast<T*>(p) + i) = r;
}

// Elements [i, i + n) with n == VEC (vector path) or n < VEC at the tail (scalar path).
template <typename T, int VEC, bool FULL>
__device__ __forceinline__ void step_elems(const SolverStepArgs& a, const float* __restrict__ c, int64_t i, int n) {
  constexpr int kPre = kMaxHistory < 3 ? kMaxHistory : 3;  // history entries loaded up front
  float X[VEC], M[VEC], B[VEC], O0[VEC], O1[VEC], H[kPre][VEC], Z[VEC];
  auto ld = [&](const void* p, float* dst) {
    if (FULL) {
      load_vec<T, VEC>(p, i, dst);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[j] = j < n ? tof(static_cast<const T*>(p)[i + j]) : 0.f;
    }
  };
  const int k = a.num_history;
  const float* r0 = c + kHeadCoeffs;
  const float* r1 = r0 + kRowTerms + k;
  // Every load first, back to back (the x0-statistics stores below could alias them otherwise, which
  // keeps the compiler from hoisting later loads): one memory round trip per element, not two.
  ld(a.x, X);
  if (a.model_cond) ld(a.model_cond, M);
  if (a.model_cond && a.model_uncond) ld(a.model_uncond, B);
#pragma unroll
  for (int h = 0; h < kPre; ++h)
    if (h < k) ld(a.history[h], H[h]);
  if (a.noise) ld(a.noise, Z);
  if (a.model_cond) {
    if (a.model_uncond) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) M[j] = B[j] + c[0] * (M[j] - B[j]);
    }
    if (a.row_scale) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) M[j] *= a.row_scale[(i + j < a.numel ? i + j : i) / a.inner];
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) M[j] = 0.f;
  }
  const bool clip = a.clip_lo < a.clip_hi;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float d = c[1] * X[j] + c[2] * M[j];
    if (clip) d = d < a.clip_lo ? a.clip_lo : (d > a.clip_hi ? a.clip_hi : d);
    const float e = c[3] * X[j] + c[4] * M[j] + c[5] * d;
    O0[j] = r0[0] * X[j] + r0[1] * M[j] + r0[2] * d + r0[3] * e;
    O1[j] = r1[0] * X[j] + r1[1] * M[j] + r1[2] * d + r1[3] * e;
    if (a.x0_stats && (FULL || j < n)) {  // x0 statistics in float64: S1 += d, S2 += d^2
      const double dd = double(d);
      a.x0_stats[i + j] += dd;
      a.x0_stats[a.numel + i + j] += dd * dd;
    }
  }
  if (a.noise) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) { O0[j] += r0[4] * Z[j]; O1[j] += r1[4] * Z[j]; }
  }
#pragma unroll
  for (int h = 0; h < kMaxHistory; ++h) {
    if (h < k) {
      const float w0 = r0[kRowTerms + h], w1 = r1[kRowTerms + h];
      if (h < kPre) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) { O0[j] += w0 * H[h < kPre ? h : 0][j]; O1[j] += w1 * H[h < kPre ? h : 0][j]; }
      } else {  // longer histories (UniPC / PLMS orders > 3): the rest as before
        ld(a.history[h], B);
#pragma unroll
        for (int j = 0; j < VEC; ++j) { O0[j] += w0 * B[j]; O1[j] += w1 * B[j]; }
      }
    }
  }
  if (FULL) {
    store_vec<T, VEC>(a.out_x, i, O0);
    if (a.out_h) store_vec<T, VEC>(a.out_h, i, O1);
  } else {
    for (int j = 0; j < n; ++j) {
      static_cast<T*>(a.out_x)[i + j] = fromf<T>(O0[j]);
      if (a.out_h) static_cast<T*>(a.out_h)[i + j] = fromf<T>(O1[j]);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) solver_step_kernel(const SolverStepArgs a) {
#ifdef PYDIFF_CUDA_EMU
  float* c = reinterpret_cast<float*>(cuda_emu::dynamic_smem());  // static shared memory: not emulated
#else
  __shared__ float c[kMaxStepCoeffs];
#endif
  const int nc = kHeadCoeffs + 2 * (kRowTerms + a.num_history);
  if (threadIdx.x < nc) {
    if (a.coeff_table) {
      int64_t row = *a.step;
      row = row < 0 ? 0 : (row >= a.table_rows ? a.table_rows - 1 : row);
      c[threadIdx.x] = float(a.coeff_table[row * nc + threadIdx.x]);
    } else {
      c[threadIdx.x] = float(a.coeffs[threadIdx.x]);
    }
  }
  __syncthreads();
  const int64_t nvec = a.numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride)
    step_elems<T, VEC, true>(a, c, v * VEC, VEC);
  const int64_t tail = a.numel - nvec * VEC;
  if (tail > 0 && blockIdx.x == 0 && threadIdx.x == 0) step_elems<T, VEC, false>(a, c, nvec * VEC, int(tail));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t launch(const SolverStepArgs& a, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  bool ok = aligned16(a.x) && aligned16(a.out_x) && (!a.out_h || aligned16(a.out_h)) &&
            (!a.model_cond || aligned16(a.model_cond)) && (!a.model_uncond || aligned16(a.model_uncond)) &&
            (!a.noise || aligned16(a.noise));
  for (int h = 0; h < a.num_history; ++h) ok = ok && aligned16(a.history[h]);
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int threads = 256;
  if (ok) {
    const int64_t work = (a.numel / VEC) > 0 ? a.numel / VEC : 1;
    int64_t blocks = (work + threads - 1) / threads;
    const int64_t cap = int64_t(sms > 0 ? sms : 132) * 64;  // one vector per thread up to ~8.6M vectors
    if (blocks > cap) blocks = cap;
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(solver_step_kernel<T, VEC>, dim3(int(blocks)), dim3(threads), kMaxStepCoeffs * sizeof(float), s,
                     a);
#else
    solver_step_kernel<T, VEC><<<int(blocks), threads, 0, s>>>(a);
#endif
  } else {
    int64_t blocks = (a.numel + threads - 1) / threads;
    const int64_t cap = int64_t(sms > 0 ? sms : 132) * 8;
    if (blocks > cap) blocks = cap;
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(solver_step_kernel<T, 1>, dim3(int(blocks)), dim3(threads), kMaxStepCoeffs * sizeof(float), s, a);
#else
    solver_step_kernel<T, 1><<<int(blocks), threads, 0, s>>>(a);
#endif
  }
  return cudaGetLastError();
}

}  // namespace

int solver_step_cuda(const SolverStepArgs& a, void* stream) {
  if (a.num_history < 0 || a.num_history > kMaxHistory || a.inner <= 0) return int(cudaErrorInvalidValue);
  if (a.numel == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kF32: return int(launch<float>(a, s));
    case DType::kF16: return int(launch<__half>(a, s));
    case DType::kBF16: return int(launch<__nv_bfloat16>(a, s));
  }
  return int(cudaErrorInvalidValue);
}

// ---- guidance rescale: per-sample sums in float64, two kernels (partials, then finish) ----
namespace {
constexpr int kRescaleBlocks = 64;  // blocks per sample

template <typename T>
__global__ void __launch_bounds__(256) rescale_partial(int64_t inner, const T* __restrict__ c, const T* __restrict__ u,
                                                       double g, double* __restrict__ part) {
  const int64_t b = blockIdx.y;
  double s[4] = {0, 0, 0, 0};
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < inner; i += int64_t(gridDim.x) * blockDim.x) {
    const double cv = tof(c[b * inner + i]), uv = tof(u[b * inner + i]);
    const double fv = uv + g * (cv - uv);
    s[0] += cv; s[1] += cv * cv; s[2] += fv; s[3] += fv * fv;
  }
#ifdef PYDIFF_CUDA_EMU
  auto red = reinterpret_cast<double(*)[256]>(cuda_emu::dynamic_smem());  // static shared memory: not emulated
#else
  __shared__ double red[4][256];
#endif
#pragma unroll
  for (int q = 0; q < 4; ++q) red[q][threadIdx.x] = s[q];
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w)
#pragma unroll
      for (int q = 0; q < 4; ++q) red[q][threadIdx.x] += red[q][threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x < 4) part[(b * gridDim.x + blockIdx.x) * 4 + threadIdx.x] = red[threadIdx.x][0];
}

__global__ void rescale_finish(int64_t batch, int64_t inner, int nblk, const double* __restrict__ part, double phi,
                               float* __restrict__ out) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double s[4] = {0, 0, 0, 0};
  for (int j = 0; j < nblk; ++j)
    for (int q = 0; q < 4; ++q) s[q] += part[(b * nblk + j) * 4 + q];
  const double n = double(inner);
  double vc = (s[1] - s[0] * s[0] / n) / (n - 1), vf = (s[3] - s[2] * s[2] / n) / (n - 1);
  vc = vc > 0 ? vc : 0;
  vf = vf > 0 ? vf : 0;
  out[b] = float(phi * sqrt(vc) / sqrt(vf) + (1.0 - phi));
}

template <typename T>
cudaError_t rescale_launch(int64_t batch, int64_t inner, const void* c, const void* u, double g, double phi, float* out,
                           void* ws, cudaStream_t s) {
  dim3 grid(kRescaleBlocks, unsigned(batch));
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(rescale_partial<T>, grid, dim3(256), 4 * 256 * sizeof(double), s, inner, static_cast<const T*>(c),
                   static_cast<const T*>(u), g, static_cast<double*>(ws));
  cuda_emu::launch(rescale_finish, dim3(unsigned((batch + 127) / 128)), dim3(128), 0, s, batch, inner, kRescaleBlocks,
                   static_cast<const double*>(ws), phi, out);
#else
  rescale_partial<T><<<grid, 256, 0, s>>>(inner, static_cast<const T*>(c), static_cast<const T*>(u), g,
                                           static_cast<double*>(ws));
  rescale_finish<<<unsigned((batch + 127) / 128), 128, 0, s>>>(batch, inner, kRescaleBlocks,
                                                               static_cast<const double*>(ws), phi, out);
#endif
  return cudaGetLastError();
}
}  // namespace

int64_t cfg_rescale_cuda_workspace(int64_t batch) { return batch * kRescaleBlocks * 4 * int64_t(sizeof(double)); }

int cfg_rescale_cuda(DType dtype, int64_t batch, int64_t inner, const void* cond, const void* uncond, double guidance,
                     double phi, float* out, void* workspace, void* stream) {
  if (batch <= 0) return 0;
  if (inner < 2 || batch > 65535) return int(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return int(rescale_launch<float>(batch, inner, cond, uncond, guidance, phi, out, workspace, s));
    case DType::kF16: return int(rescale_launch<__half>(batch, inner, cond, uncond, guidance, phi, out, workspace, s));
    case DType::kBF16:
      return int(rescale_launch<__nv_bfloat16>(batch, inner, cond, uncond, guidance, phi, out, workspace, s));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace pydiff
