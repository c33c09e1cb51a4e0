// Fused GroupNorm + SiLU, CUDA kernels (forward and backward). Includes only CUDA headers.
// Formulas: pydiff/invertible.h; definition: pydiff/reference/invertible.py.
//
// Forward, two kernels over a grid of (group, split) blocks, S splits per group so that even a
// few groups fill the GPU:
//   1. gn_stats: per-block sums of (x - x0) and (x - x0)^2 (x0: the group's first element), fp32
//      within one vector, float64 across vectors and threads -> workspace [N*G, S, 2];
//   2. gn_apply: each block folds its group's S partials into mean/rstd (float64), writes them
//      (split 0), and computes y = silu(((x - mean_hi) - mean_lo) rstd w[c] + b[c]).
//   Traffic: x read twice, y written once; the byte floor is one read and one write.
// Backward, three kernels:
//   1. gn_bwd_reduce: per (n, c) float64 sums A = sum dz, B = sum dz xhat (dz recomputed from x);
//      one warp per (n, c) when HW is small, one block otherwise;
//   2. gn_bwd_params: grad_w[c] = sum_n B[n, c], grad_b[c] = sum_n A[n, c];
//   3. gn_bwd_dx: dx = rstd w dz - c1 - c2 xhat with the group's c1, c2 from A, B.
//   Traffic: x and dy read twice, dx written once.
// Vector loads (16 bytes) when HW is a multiple of the vector width and the pointers are aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pydiff/cuda_types.cuh"
#include "pydiff/cuda_sm_count.h"
#include "pydiff/invertible.h"

namespace pydiff {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSplits = 256;
#ifdef PYDIFF_CUDA_EMU
// The emulator has no static __shared__ arrays: they live at fixed offsets of its dynamic shared
// memory (block_sum2's sh[2][32], group_stats' st[2], gn_bwd_dx's cc[2]); every launch asks for it.
constexpr size_t kEmuShOff = 0, kEmuStOff = 2 * 32 * sizeof(double), kEmuCcOff = kEmuStOff + 2 * sizeof(double);
constexpr size_t kEmuSmem = kEmuCcOff + 2 * sizeof(double);
#endif

template <typename T> __device__ __forceinline__ T fromf(float v);
template <typename T> __device__ __forceinline__ T fromf(double v);
template <> __device__ __forceinline__ float fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __half fromf<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ double fromf<double>(double v) { return v; }

template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

template <typename Acc, typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, Acc* out) {
  const Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(p + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = Acc(tof(r.v[j]));
}
template <typename Acc, typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, int64_t i, const Acc* in) {
  Vec<T, VEC> r;
#pragma unroll
  for (int j = 0; j < VEC; ++j) r.v[j] = fromf<T>(in[j]);
  *reinterpret_cast<Vec<T, VEC>*>(p + i) = r;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of (a, b) over the block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
#ifdef PYDIFF_CUDA_EMU
  auto sh = reinterpret_cast<double(*)[32]>(cuda_emu::dynamic_smem() + kEmuShOff);
#else
  __shared__ double sh[2][32];
#endif
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sh may be in use by a previous call
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    a = lane < nw ? sh[0][lane] : 0.0;
    b = lane < nw ? sh[1][lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc param(const void* p, int64_t c, Acc dflt) {
  return p ? static_cast<const Acc*>(p)[c] : dflt;
}

struct Split {
  int64_t S;      // splits per group
  int64_t chunk;  // elements per split (a multiple of the vector width)
};

// ---------------------------------------------------------------- forward
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_stats(const T* __restrict__ x, int64_t M, Split sp,
                                                     double* __restrict__ part) {
  using Acc = typename AccOf<T>::type;
  const int64_t gi = blockIdx.x / sp.S, j = blockIdx.x % sp.S;
  const T* xg = x + gi * M;
  const Acc shift = Acc(tof(xg[0]));
  const int64_t lo = j * sp.chunk, hi = min(M, lo + sp.chunk);
  double s1 = 0, s2 = 0;
  for (int64_t e = lo + int64_t(threadIdx.x) * VEC; e < hi; e += int64_t(blockDim.x) * VEC) {
    Acc X[VEC];
    load_vec<Acc, T, VEC>(xg, e, X);
    Acc a = 0, b = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Acc d = X[k] - shift;
      a += d;
      b += d * d;
    }
    s1 += double(a);
    s2 += double(b);
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = s1;
    part[2 * blockIdx.x + 1] = s2;
  }
}

// mean and rstd of group gi from its S partials (float64), broadcast through shared memory.
template <typename T>
__device__ __forceinline__ void group_stats(const T* xg, const double* part, int64_t gi, int64_t S, int64_t M,
                                            double eps, double* mean, double* rstd) {
#ifdef PYDIFF_CUDA_EMU
  double* st = reinterpret_cast<double*>(cuda_emu::dynamic_smem() + kEmuStOff);
#else
  __shared__ double st[2];
#endif
  if (threadIdx.x < 32) {
    double a = 0, b = 0;
    for (int64_t k = threadIdx.x; k < S; k += 32) {
      a += part[2 * (gi * S + k)];
      b += part[2 * (gi * S + k) + 1];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (threadIdx.x == 0) {
      const double m = a / double(M);
      double var = b / double(M) - m * m;
      var = var > 0 ? var : 0.0;
      st[0] = double(tof(xg[0])) + m;
      st[1] = 1.0 / sqrt(var + eps);
    }
  }
  __syncthreads();
  *mean = st[0];
  *rstd = st[1];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_apply(const T* __restrict__ x, const void* weight, const void* bias,
                                                     T* __restrict__ y, void* mean_out, void* rstd_out, int64_t G,
                                                     int64_t Cg, int64_t HW, double eps, Split sp,
                                                     const double* __restrict__ part) {
  using Acc = typename AccOf<T>::type;
  const int64_t M = Cg * HW;
  const int64_t gi = blockIdx.x / sp.S, j = blockIdx.x % sp.S, g = gi % G;
  const T* xg = x + gi * M;
  T* yg = y + gi * M;
  double mean, rstd;
  group_stats(xg, part, gi, sp.S, M, eps, &mean, &rstd);
  if (j == 0 && threadIdx.x == 0) {
    static_cast<Acc*>(mean_out)[gi] = Acc(mean);
    static_cast<Acc*>(rstd_out)[gi] = Acc(rstd);
  }
  const Acc mh = Acc(mean), ml = Acc(mean - double(mh));
  const int64_t lo = j * sp.chunk, hi = min(M, lo + sp.chunk);
  int64_t last_c = -1;
  Acc sc = 0, bi = 0;
  for (int64_t e = lo + int64_t(threadIdx.x) * VEC; e < hi; e += int64_t(blockDim.x) * VEC) {
    const int64_t c = g * Cg + int64_t(uint32_t(e) / uint32_t(HW));  // M < 2^31 (checked at launch)
    if (c != last_c) {
      sc = Acc(rstd * double(param<Acc>(weight, c, Acc(1))));
      bi = param<Acc>(bias, c, Acc(0));
      last_c = c;
    }
    Acc X[VEC];
    load_vec<Acc, T, VEC>(xg, e, X);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Acc z = ((X[k] - mh) - ml) * sc + bi;
      X[k] = z / (Acc(1) + exp_acc(-z));
    }
    store_vec<Acc, T, VEC>(yg, e, X);
  }
}

// ---------------------------------------------------------------- backward
// dz and xhat from x, dy: xhat = ((x - mh) - ml) r, z = xhat w + b, s = sigmoid(z),
// dz = dy s (1 + z (1 - s)).
template <typename Acc>
__device__ __forceinline__ void dz_xhat(Acc x, Acc dy, Acc mh, Acc ml, Acc r, Acc w, Acc b, Acc* dz, Acc* xh) {
  *xh = ((x - mh) - ml) * r;
  const Acc z = *xh * w + b;
  const Acc s = Acc(1) / (Acc(1) + exp_acc(-z));
  *dz = dy * s * (Acc(1) + z * (Acc(1) - s));
}

// One team of TEAM threads per (n, c) row of HW elements; TEAM is 32 (a warp) or the block.
template <typename T, int VEC, int TEAM>
__global__ void __launch_bounds__(kThreads) gn_bwd_reduce(const T* __restrict__ x, const T* __restrict__ dy,
                                                          const void* weight, const void* bias, const void* mean_in,
                                                          const void* rstd_in, int64_t NC, int64_t C, int64_t Cg,
                                                          int64_t HW, double* __restrict__ A, double* __restrict__ B) {
  using Acc = typename AccOf<T>::type;
  constexpr int kTeams = kThreads / TEAM;
  const int team = threadIdx.x / TEAM, t = threadIdx.x % TEAM;
  const int64_t nc = int64_t(blockIdx.x) * kTeams + team;
  double sa = 0, sb = 0;
  if (nc < NC) {
    const int64_t n = nc / C, c = nc % C, gi = n * (C / Cg) + c / Cg;
    const double m = double(static_cast<const Acc*>(mean_in)[gi]);
    const Acc mh = Acc(m), ml = Acc(m - double(mh));
    const Acc r = static_cast<const Acc*>(rstd_in)[gi];
    const Acc w = param<Acc>(weight, c, Acc(1)), b = param<Acc>(bias, c, Acc(0));
    const T* xr = x + nc * HW;
    const T* dr = dy + nc * HW;
    for (int64_t e = int64_t(t) * VEC; e < HW; e += int64_t(TEAM) * VEC) {
      Acc X[VEC], D[VEC];
      load_vec<Acc, T, VEC>(xr, e, X);
      load_vec<Acc, T, VEC>(dr, e, D);
      Acc a = 0, bb = 0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        Acc dz, xh;
        dz_xhat(X[k], D[k], mh, ml, r, w, b, &dz, &xh);
        a += dz;
        bb += dz * xh;
      }
      sa += double(a);
      sb += double(bb);
    }
  }
  if (TEAM == 32) {
    sa = warp_sum(sa);
    sb = warp_sum(sb);
    if (t == 0 && nc < NC) {
      A[nc] = sa;
      B[nc] = sb;
    }
  } else {
    block_sum2(sa, sb);
    if (threadIdx.x == 0 && nc < NC) {
      A[nc] = sa;
      B[nc] = sb;
    }
  }
}

template <typename Acc>
__global__ void gn_bwd_params(const double* __restrict__ A, const double* __restrict__ B, int64_t N, int64_t C,
                              void* grad_w, void* grad_b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double gw = 0, gb = 0;
  for (int64_t n = 0; n < N; ++n) {
    gw += B[n * C + c];
    gb += A[n * C + c];
  }
  if (grad_w) static_cast<Acc*>(grad_w)[c] = Acc(gw);
  if (grad_b) static_cast<Acc*>(grad_b)[c] = Acc(gb);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_bwd_dx(const T* __restrict__ x, const T* __restrict__ dy,
                                                      const void* weight, const void* bias, const void* mean_in,
                                                      const void* rstd_in, int64_t G, int64_t Cg, int64_t HW,
                                                      Split sp, const double* __restrict__ A,
                                                      const double* __restrict__ B, T* __restrict__ dx) {
  using Acc = typename AccOf<T>::type;
  const int64_t M = Cg * HW, C = G * Cg;
  const int64_t gi = blockIdx.x / sp.S, j = blockIdx.x % sp.S, n = gi / G, g = gi % G;
  const double r = double(static_cast<const Acc*>(rstd_in)[gi]);
  // c1 = r mean_g(w A), c2 = r mean_g(w B)
#ifdef PYDIFF_CUDA_EMU
  double* cc = reinterpret_cast<double*>(cuda_emu::dynamic_smem() + kEmuCcOff);
#else
  __shared__ double cc[2];
#endif
  double s1 = 0, s2 = 0;
  for (int64_t cl = threadIdx.x; cl < Cg; cl += blockDim.x) {
    const int64_t c = g * Cg + cl;
    const double w = double(param<Acc>(weight, c, Acc(1)));
    s1 += w * A[n * C + c];
    s2 += w * B[n * C + c];
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    cc[0] = r * s1 / double(M);
    cc[1] = r * s2 / double(M);
  }
  __syncthreads();
  const Acc c1 = Acc(cc[0]), c2 = Acc(cc[1]);
  const double m = double(static_cast<const Acc*>(mean_in)[gi]);
  const Acc mh = Acc(m), ml = Acc(m - double(mh)), ra = Acc(r);
  const T* xg = x + gi * M;
  const T* dg = dy + gi * M;
  T* og = dx + gi * M;
  const int64_t lo = j * sp.chunk, hi = min(M, lo + sp.chunk);
  int64_t last_c = -1;
  Acc w = 1, b = 0, rw = 0;
  for (int64_t e = lo + int64_t(threadIdx.x) * VEC; e < hi; e += int64_t(blockDim.x) * VEC) {
    const int64_t c = g * Cg + int64_t(uint32_t(e) / uint32_t(HW));
    if (c != last_c) {
      w = param<Acc>(weight, c, Acc(1));
      b = param<Acc>(bias, c, Acc(0));
      rw = Acc(r * double(w));
      last_c = c;
    }
    Acc X[VEC], D[VEC];
    load_vec<Acc, T, VEC>(xg, e, X);
    load_vec<Acc, T, VEC>(dg, e, D);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      Acc dz, xh;
      dz_xhat(X[k], D[k], mh, ml, ra, w, b, &dz, &xh);
      X[k] = rw * dz - c1 - c2 * xh;
    }
    store_vec<Acc, T, VEC>(og, e, X);
  }
}

// ---------------------------------------------------------------- launch helpers
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
constexpr int vec_width() { return 16 / int(sizeof(T)); }


// Splits per group: enough blocks for ~4 per SM, at least 4 vectors per thread per split.
Split make_split(const GroupNormSiluArgs& a, int vec, int sms) {
  const int64_t NG = a.N * a.groups, M = (a.C / a.groups) * a.HW;
  int64_t S = (int64_t(4) * sms + NG - 1) / (NG > 0 ? NG : 1);
  const int64_t max_s = (M + int64_t(kThreads) * vec * 4 - 1) / (int64_t(kThreads) * vec * 4);
  if (S > max_s) S = max_s;
  if (S > kMaxSplits) S = kMaxSplits;
  if (S < 1) S = 1;
  int64_t chunk = (M + S - 1) / S;
  chunk = (chunk + vec - 1) / vec * vec;
  S = (M + chunk - 1) / chunk;
  return Split{S < 1 ? 1 : S, chunk};
}

bool can_vec(const GroupNormSiluArgs& a, int vec, bool backward) {
  if (a.HW % vec) return false;
  if (backward) return aligned16(a.x) && aligned16(a.grad_y) && (!a.grad_x || aligned16(a.grad_x));
  return aligned16(a.x) && aligned16(a.y);
}

bool valid(const GroupNormSiluArgs& a) {
  if (a.N < 0 || a.C < 1 || a.HW < 1 || a.groups < 1 || a.C % a.groups || !(a.eps >= 0) || !a.x) return false;
  const int64_t M = (a.C / a.groups) * a.HW;
  return M < (int64_t(1) << 31);
}

template <typename T, int VEC>
cudaError_t fwd(const GroupNormSiluArgs& a, void* ws, cudaStream_t s) {
  const Split sp = make_split(a, VEC, current_sm_count());
  const int64_t G = a.groups, Cg = a.C / G, M = Cg * a.HW, NG = a.N * G;
  double* part = static_cast<double*>(ws);
  const int64_t blocks = NG * sp.S;
#ifdef PYDIFF_CUDA_EMU
  cuda_emu::launch(gn_stats<T, VEC>, dim3(unsigned(blocks)), dim3(kThreads), kEmuSmem, s, static_cast<const T*>(a.x), M,
                   sp, part);
  cuda_emu::launch(gn_apply<T, VEC>, dim3(unsigned(blocks)), dim3(kThreads), kEmuSmem, s, static_cast<const T*>(a.x),
                   a.weight, a.bias, static_cast<T*>(a.y), a.mean, a.rstd, G, Cg, a.HW, a.eps, sp,
                   static_cast<const double*>(part));
#else
  gn_stats<T, VEC><<<unsigned(blocks), kThreads, 0, s>>>(static_cast<const T*>(a.x), M, sp, part);
  gn_apply<T, VEC><<<unsigned(blocks), kThreads, 0, s>>>(static_cast<const T*>(a.x), a.weight, a.bias,
                                                         static_cast<T*>(a.y), a.mean, a.rstd, G, Cg, a.HW, a.eps, sp,
                                                         part);
#endif
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_dispatch(const GroupNormSiluArgs& a, void* ws, cudaStream_t s) {
  constexpr int V = vec_width<T>();
  return can_vec(a, V, false) ? fwd<T, V>(a, ws, s) : fwd<T, 1>(a, ws, s);
}

template <typename T, int VEC>
cudaError_t bwd(const GroupNormSiluArgs& a, void* ws, cudaStream_t s) {
  using Acc = typename AccOf<T>::type;
  const int64_t G = a.groups, Cg = a.C / G, NC = a.N * a.C, NG = a.N * G;
  double* A = static_cast<double*>(ws);
  double* B = A + NC;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.grad_y);
  if (a.HW / VEC <= 4 * 32) {
    constexpr int kTeams = kThreads / 32;
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(gn_bwd_reduce<T, VEC, 32>, dim3(unsigned((NC + kTeams - 1) / kTeams)), dim3(kThreads), kEmuSmem, s,
                     x, dy, a.weight, a.bias, static_cast<const void*>(a.mean), static_cast<const void*>(a.rstd), NC,
                     a.C, Cg, a.HW, A, B);
#else
    gn_bwd_reduce<T, VEC, 32><<<unsigned((NC + kTeams - 1) / kTeams), kThreads, 0, s>>>(
        x, dy, a.weight, a.bias, a.mean, a.rstd, NC, a.C, Cg, a.HW, A, B);
#endif
  } else {
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(gn_bwd_reduce<T, VEC, kThreads>, dim3(unsigned(NC)), dim3(kThreads), kEmuSmem, s, x, dy, a.weight,
                     a.bias, static_cast<const void*>(a.mean), static_cast<const void*>(a.rstd), NC, a.C, Cg, a.HW, A,
                     B);
#else
    gn_bwd_reduce<T, VEC, kThreads><<<unsigned(NC), kThreads, 0, s>>>(x, dy, a.weight, a.bias, a.mean, a.rstd, NC,
                                                                      a.C, Cg, a.HW, A, B);
#endif
  }
  if (a.grad_weight || a.grad_bias)
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(gn_bwd_params<Acc>, dim3(unsigned((a.C + 255) / 256)), dim3(256), 0, s,
                     static_cast<const double*>(A), static_cast<const double*>(B), a.N, a.C, a.grad_weight,
                     a.grad_bias);
#else
    gn_bwd_params<Acc><<<unsigned((a.C + 255) / 256), 256, 0, s>>>(A, B, a.N, a.C, a.grad_weight, a.grad_bias);
#endif
  if (a.grad_x) {
    const Split sp = make_split(a, VEC, current_sm_count());
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(gn_bwd_dx<T, VEC>, dim3(unsigned(NG * sp.S)), dim3(kThreads), kEmuSmem, s, x, dy, a.weight, a.bias,
                     static_cast<const void*>(a.mean), static_cast<const void*>(a.rstd), G, Cg, a.HW, sp,
                     static_cast<const double*>(A), static_cast<const double*>(B), static_cast<T*>(a.grad_x));
#else
    gn_bwd_dx<T, VEC><<<unsigned(NG * sp.S), kThreads, 0, s>>>(x, dy, a.weight, a.bias, a.mean, a.rstd, G, Cg, a.HW,
                                                               sp, A, B, static_cast<T*>(a.grad_x));
#endif
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_dispatch(const GroupNormSiluArgs& a, void* ws, cudaStream_t s) {
  constexpr int V = vec_width<T>();
  return can_vec(a, V, true) ? bwd<T, V>(a, ws, s) : bwd<T, 1>(a, ws, s);
}

template <typename Acc>
__global__ void fill_zero(Acc* p, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = Acc(0);
}

}  // namespace

int64_t groupnorm_silu_cuda_workspace(const GroupNormSiluArgs& a) {
  if (!valid(a)) return 0;
  // the largest split count any vector width can pick (vec = 1)
  const Split sp = make_split(a, 1, current_sm_count());
  return a.N * a.groups * sp.S * 2 * int64_t(sizeof(double));
}

int groupnorm_silu_cuda(const GroupNormSiluArgs& a, void* workspace, void* stream) {
  if (a.N == 0 && a.C >= 1 && a.groups >= 1 && a.C % a.groups == 0) return 0;  // nothing to read or write
  if (!valid(a) || !a.y || !a.mean || !a.rstd) return int(cudaErrorInvalidValue);
  if (int64_t(a.N) * a.groups * kMaxSplits >= (int64_t(1) << 31)) return int(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case FloatType::kF32: return int(fwd_dispatch<float>(a, workspace, s));
    case FloatType::kF16: return int(fwd_dispatch<__half>(a, workspace, s));
    case FloatType::kBF16: return int(fwd_dispatch<__nv_bfloat16>(a, workspace, s));
    case FloatType::kF64: return int(fwd_dispatch<double>(a, workspace, s));
  }
  return int(cudaErrorInvalidValue);
}

int64_t groupnorm_silu_backward_cuda_workspace(const GroupNormSiluArgs& a) {
  if (!valid(a)) return 0;
  return 2 * a.N * a.C * int64_t(sizeof(double));
}

int groupnorm_silu_backward_cuda(const GroupNormSiluArgs& a, void* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.N == 0 && a.C >= 1 && a.groups >= 1 && a.C % a.groups == 0) {
    const unsigned blocks = unsigned((a.C + 255) / 256);
    const bool f64 = a.dtype == FloatType::kF64;
    for (void* p : {a.grad_weight, a.grad_bias}) {
      if (!p) continue;
#ifdef PYDIFF_CUDA_EMU
      if (f64)
        cuda_emu::launch(fill_zero<double>, dim3(blocks), dim3(256), 0, s, static_cast<double*>(p), a.C);
      else
        cuda_emu::launch(fill_zero<float>, dim3(blocks), dim3(256), 0, s, static_cast<float*>(p), a.C);
#else
      if (f64)
        fill_zero<double><<<blocks, 256, 0, s>>>(static_cast<double*>(p), a.C);
      else
        fill_zero<float><<<blocks, 256, 0, s>>>(static_cast<float*>(p), a.C);
#endif
    }
    return int(cudaGetLastError());
  }
  if (!valid(a) || !a.grad_y || !a.mean || !a.rstd) return int(cudaErrorInvalidValue);
  if (int64_t(a.N) * a.C >= (int64_t(1) << 31)) return int(cudaErrorInvalidValue);
  switch (a.dtype) {
    case FloatType::kF32: return int(bwd_dispatch<float>(a, workspace, s));
    case FloatType::kF16: return int(bwd_dispatch<__half>(a, workspace, s));
    case FloatType::kBF16: return int(bwd_dispatch<__nv_bfloat16>(a, workspace, s));
    case FloatType::kF64: return int(bwd_dispatch<double>(a, workspace, s));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace pydiff
