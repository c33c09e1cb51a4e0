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
#include "pydiff/cuda_sm_count.h"
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

// Coefficients as fp32: host values travel as a kernel argument (read from the constant bank at
// compile-time offsets: no registers, no shared memory, no barrier); a device table row is staged
// in shared memory once per block.
struct CoeffsF {
  float v[kMaxStepCoeffs];
};

// The loaded inputs of VEC consecutive elements, kept in their storage type until used (half the
// registers of fp32 copies for fp16 / bf16). K (the history length) is a template parameter, so
// every index below is a compile-time constant and the arrays live in registers.
template <typename T, int VEC, int K>
struct StepIn {
  Vec<T, VEC> X, M, B, Z, H[K > 0 ? K : 1];
};

// Elements [i, i + n): n == VEC (FULL: one 16-byte access per tensor) or n < VEC at the tail.
template <typename T, int VEC, int K, bool FULL>
__device__ __forceinline__ void step_load(const SolverStepArgs& a, int64_t i, int n, StepIn<T, VEC, K>& in) {
  auto ld = [&](const void* p, Vec<T, VEC>& dst) {
    const T* q = static_cast<const T*>(p) + i;
    if (FULL) {
      dst = *reinterpret_cast<const Vec<T, VEC>*>(q);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst.v[j] = j < n ? q[j] : fromf<T>(0.f);
    }
  };
  // every load back to back, before any store: one memory round trip per element
  ld(a.x, in.X);
  if (a.model_cond) ld(a.model_cond, in.M);
  if (a.model_cond && a.model_uncond) ld(a.model_uncond, in.B);
#pragma unroll
  for (int h = 0; h < K; ++h) ld(a.history[h], in.H[h]);
  if (a.noise) ld(a.noise, in.Z);
}

template <bool TABLE>
__device__ __forceinline__ float coef(const float* sc, const CoeffsF& hc, int q) {
  return TABLE ? sc[q] : hc.v[q];
}

template <typename T, int VEC, int K, bool TABLE, bool FULL>
__device__ __forceinline__ void step_compute(const SolverStepArgs& a, const float* sc, const CoeffsF& hc, int64_t i,
                                             int n, StepIn<T, VEC, K>& in) {
  constexpr int R0 = kHeadCoeffs, R1 = kHeadCoeffs + kRowTerms + K;
  auto c = [&](int q) { return coef<TABLE>(sc, hc, q); };
  float M[VEC];
  if (a.model_cond) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) M[j] = tof(in.M.v[j]);
    if (a.model_uncond) {
      const float g = c(0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float u = tof(in.B.v[j]);
        M[j] = u + g * (M[j] - u);
      }
    }
    if (a.row_scale) {
      // one 64-bit division per vector: elements past the row boundary (inner >= VEC) are in the next row
      const int64_t r = i / a.inner, next = (r + 1) * a.inner;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t e = (FULL || j < n) ? i + j : i;
        const int64_t row = a.inner >= VEC ? (e < next ? r : r + 1) : e / a.inner;
        M[j] *= a.row_scale[row];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) M[j] = 0.f;
  }
  const bool clip = a.clip_lo < a.clip_hi;
  float O0[VEC], O1[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float X = tof(in.X.v[j]);
    float d = c(1) * X + c(2) * M[j];
    if (clip) d = d < a.clip_lo ? a.clip_lo : (d > a.clip_hi ? a.clip_hi : d);
    const float e = c(3) * X + c(4) * M[j] + c(5) * d;
    O0[j] = c(R0) * X + c(R0 + 1) * M[j] + c(R0 + 2) * d + c(R0 + 3) * e;
    O1[j] = c(R1) * X + c(R1 + 1) * M[j] + c(R1 + 2) * d + c(R1 + 3) * e;
    if (a.x0_stats && (FULL || j < n)) {  // x0 statistics in float64: S1 += d, S2 += d^2
      const double dd = double(d);
      a.x0_stats[i + j] += dd;
      a.x0_stats[a.numel + i + j] += dd * dd;
    }
  }
  if (a.noise) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float z = tof(in.Z.v[j]);
      O0[j] += c(R0 + 4) * z;
      O1[j] += c(R1 + 4) * z;
    }
  }
#pragma unroll
  for (int h = 0; h < K; ++h) {
    const float w0 = c(R0 + kRowTerms + h), w1 = c(R1 + kRowTerms + h);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float hv = tof(in.H[h].v[j]);
      O0[j] += w0 * hv;
      O1[j] += w1 * hv;
    }
  }
  if (FULL) {
    store_vec<T, VEC>(a.out_x, i, O0);
    if (a.out_h) store_vec<T, VEC>(a.out_h, i, O1);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < n) {
        static_cast<T*>(a.out_x)[i + j] = fromf<T>(O0[j]);
        if (a.out_h) static_cast<T*>(a.out_h)[i + j] = fromf<T>(O1[j]);
      }
    }
  }
}

// One vector of VEC elements per thread and loop trip (grid-stride when the grid is capped). The
// first vector's loads are issued before the table row is staged and the block synchronises, so
// the coefficient fetch and the barrier overlap the memory round trip; with host coefficients
// there is no barrier at all (each warp runs on its own).
template <typename T, int VEC, int K, bool TABLE>
__global__ void __launch_bounds__(256) solver_step_kernel(const SolverStepArgs a, const CoeffsF hc) {
#ifdef PYDIFF_CUDA_EMU
  float* sc = reinterpret_cast<float*>(cuda_emu::dynamic_smem());  // static shared memory: not emulated
#else
  __shared__ float sc[TABLE ? kMaxStepCoeffs : 1];
#endif
  const int64_t nvec = a.numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  StepIn<T, VEC, K> in;
  if (v < nvec) step_load<T, VEC, K, true>(a, v * VEC, VEC, in);
  if (TABLE) {
    constexpr int nc = kHeadCoeffs + 2 * (kRowTerms + K);
    if (threadIdx.x < nc) {
      int64_t row = *a.step;
      row = row < 0 ? 0 : (row >= a.table_rows ? a.table_rows - 1 : row);
      sc[threadIdx.x] = float(a.coeff_table[row * nc + threadIdx.x]);
    }
    __syncthreads();
  }
  for (; v < nvec; v += stride) {
    if (v >= nvec) break;
    step_compute<T, VEC, K, TABLE, true>(a, sc, hc, v * VEC, VEC, in);
    if (v + stride < nvec) step_load<T, VEC, K, true>(a, (v + stride) * VEC, VEC, in);
  }
  const int64_t tail = a.numel - nvec * VEC;
  if (tail > 0 && blockIdx.x == 0 && threadIdx.x == 0) {
    step_load<T, VEC, K, false>(a, nvec * VEC, int(tail), in);
    step_compute<T, VEC, K, TABLE, false>(a, sc, hc, nvec * VEC, int(tail), in);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

using StepKernel = void (*)(const SolverStepArgs, const CoeffsF);

template <typename T, int VEC, bool TABLE>
StepKernel pick_k(int k) {
  switch (k) {
    case 0: return solver_step_kernel<T, VEC, 0, TABLE>;
    case 1: return solver_step_kernel<T, VEC, 1, TABLE>;
    case 2: return solver_step_kernel<T, VEC, 2, TABLE>;
    case 3: return solver_step_kernel<T, VEC, 3, TABLE>;
    case 4: return solver_step_kernel<T, VEC, 4, TABLE>;
    case 5: return solver_step_kernel<T, VEC, 5, TABLE>;
    default: return solver_step_kernel<T, VEC, 6, TABLE>;
  }
}
static_assert(kMaxHistory == 6, "pick_k instantiates history lengths 0..6");

template <typename T, int VEC>
StepKernel pick(int k, bool table) {
  return table ? pick_k<T, VEC, true>(k) : pick_k<T, VEC, false>(k);
}

// The kernel a call with these arguments runs (vector: all pointers 16-byte aligned), exposed for
// the emulator test; null for an unknown dtype.
StepKernel solver_step_kernel_for(const SolverStepArgs& a, bool vec) {
  const int k = a.num_history;
  const bool table = a.coeff_table != nullptr;
  switch (a.dtype) {
    case DType::kF32: return vec ? pick<float, 4>(k, table) : pick<float, 1>(k, table);
    case DType::kF16: return vec ? pick<__half, 8>(k, table) : pick<__half, 1>(k, table);
    case DType::kBF16: return vec ? pick<__nv_bfloat16, 8>(k, table) : pick<__nv_bfloat16, 1>(k, table);
  }
  return nullptr;
}

bool all_aligned(const SolverStepArgs& a) {
  bool ok = aligned16(a.x) && aligned16(a.out_x) && (!a.out_h || aligned16(a.out_h)) &&
            (!a.model_cond || aligned16(a.model_cond)) && (!a.model_uncond || aligned16(a.model_uncond)) &&
            (!a.noise || aligned16(a.noise));
  for (int h = 0; h < a.num_history; ++h) ok = ok && aligned16(a.history[h]);
  return ok;
}

// Launch shape (solver_step_cuda_set_launch): threads per block and the grid cap in blocks per SM
// (beyond the cap, each thread loops over vectors grid-stride). 0 = the defaults below.
int g_threads = 0, g_blocks_per_sm = 0;

cudaError_t launch(const SolverStepArgs& a, cudaStream_t s) {
  const int vec_width = a.dtype == DType::kF32 ? 4 : 8;
  const bool vec = all_aligned(a);
  const int VEC = vec ? vec_width : 1;
  StepKernel kern = solver_step_kernel_for(a, vec);
  if (!kern) return cudaErrorInvalidValue;
  CoeffsF hc{};
  if (!a.coeff_table) {
    const int nc = num_step_coeffs(a.num_history);
    for (int q = 0; q < nc; ++q) hc.v[q] = float(a.coeffs[q]);
  }
  const int threads = g_threads > 0 ? g_threads : 256;
  const int64_t work = (a.numel / VEC) > 0 ? a.numel / VEC : 1;
  int64_t blocks = (work + threads - 1) / threads;
  // one vector per thread up to ~8.6M vectors (vector path); the scalar path loops more
  const int64_t cap = int64_t(current_sm_count()) * (g_blocks_per_sm > 0 ? g_blocks_per_sm : (vec ? 64 : 8));
  if (blocks > cap) blocks = cap;
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(kern, dim3(int(blocks)), dim3(threads), kMaxStepCoeffs * sizeof(float), s, a, hc);
#else
  kern<<<int(blocks), threads, 0, s>>>(a, hc);
#endif
  return cudaGetLastError();
}

}  // namespace

int solver_step_cuda_set_launch(int threads, int blocks_per_sm) {
  if (threads != 0 && threads != 64 && threads != 128 && threads != 256) return 1;  // __launch_bounds__(256)
  if (blocks_per_sm < 0 || blocks_per_sm > 1024) return 1;
  g_threads = threads;
  g_blocks_per_sm = blocks_per_sm;
  return 0;
}

int solver_step_cuda(const SolverStepArgs& a, void* stream) {
  if (a.num_history < 0 || a.num_history > kMaxHistory || a.inner <= 0) return int(cudaErrorInvalidValue);
  if (a.numel == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return int(launch(a, s));
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
