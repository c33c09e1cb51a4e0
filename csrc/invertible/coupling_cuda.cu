// Coupling update, CUDA kernels: y = A x + B f (fp32 or float64 compute; y may alias x) and the
// fixed-point y = x + rint(f s). Includes only CUDA headers (no torch). Memory-bound: each thread
// handles VEC consecutive elements with one vector load per operand when every pointer is aligned
// to the vector size; a grid-stride loop covers the rest. Formulas: pydiff/invertible.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pydiff/cuda_sm_count.h"
#include "pydiff/invertible.h"

namespace pydiff {
namespace {

template <typename T> struct Conv;
template <> struct Conv<float> {
  static __device__ __forceinline__ float f32(float v) { return v; }
  static __device__ __forceinline__ double f64(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
  static __device__ __forceinline__ float from(double v) { return float(v); }
};
template <> struct Conv<double> {
  static __device__ __forceinline__ float f32(double v) { return float(v); }
  static __device__ __forceinline__ double f64(double v) { return v; }
  static __device__ __forceinline__ double from(float v) { return v; }
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float f32(__half v) { return __half2float(v); }
  static __device__ __forceinline__ double f64(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half from(double v) { return __double2half(v); }
};
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ double f64(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(double v) { return __double2bfloat16(v); }
};

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (sizeof(Acc) == 8)
    return Conv<T>::f64(v);
  else
    return Conv<T>::f32(v);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

template <typename Acc, typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, Acc* out) {
  const Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(p + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_acc<Acc>(r.v[j]);
}

template <typename TX, typename TF, typename Acc, int VEC>
__global__ void __launch_bounds__(256) coupling_kernel(const TX* x, const TF* f, TX* y, int64_t numel, double a,
                                                       double b, const void* coeffs, int coeffs_f64) {
  Acc A = Acc(a), B = Acc(b);
  if (coeffs) {
    if (coeffs_f64) {
      A = Acc(a * static_cast<const double*>(coeffs)[0]);
      B = Acc(b * static_cast<const double*>(coeffs)[1]);
    } else {
      A = Acc(a * double(static_cast<const float*>(coeffs)[0]));
      B = Acc(b * double(static_cast<const float*>(coeffs)[1]));
    }
  }
  const int64_t nvec = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    Acc X[VEC], F[VEC];
    load_vec<Acc, TX, VEC>(x, v * VEC, X);
    load_vec<Acc, TF, VEC>(f, v * VEC, F);
    Vec<TX, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = Conv<TX>::from(A * X[j] + B * F[j]);
    *reinterpret_cast<Vec<TX, VEC>*>(y + v * VEC) = o;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0)
    for (int64_t i = nvec * VEC; i < numel; ++i) y[i] = Conv<TX>::from(A * to_acc<Acc>(x[i]) + B * to_acc<Acc>(f[i]));
}

bool aligned(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes)) == 0; }

int grid_for(int64_t work) {
  int64_t blocks = (work + 255) / 256;
  const int64_t cap = int64_t(current_sm_count()) * 8;
  if (blocks > cap) blocks = cap;
  return int(blocks < 1 ? 1 : blocks);
}

template <typename TX, typename TF, typename Acc>
cudaError_t launch(const CouplingArgs& a, cudaStream_t s) {
  constexpr int VEC = sizeof(TX) >= 8 ? 2 : 16 / int(sizeof(TX));
  const bool ok = aligned(a.x, VEC * sizeof(TX)) && aligned(a.y, VEC * sizeof(TX)) && aligned(a.f, VEC * sizeof(TF));
  const auto* x = static_cast<const TX*>(a.x);
  const auto* f = static_cast<const TF*>(a.f);
  auto* y = static_cast<TX*>(a.y);
  const int f64 = a.coeffs_dtype == FloatType::kF64;
  if (ok)
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(coupling_kernel<TX, TF, Acc, VEC>, dim3(grid_for(a.numel / VEC)), dim3(256), 0, s, x, f, y,
                     a.numel, a.a, a.b, a.coeffs, f64);
#else
    coupling_kernel<TX, TF, Acc, VEC><<<grid_for(a.numel / VEC), 256, 0, s>>>(x, f, y, a.numel, a.a, a.b, a.coeffs, f64);
#endif
  else
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(coupling_kernel<TX, TF, Acc, 1>, dim3(grid_for(a.numel)), dim3(256), 0, s, x, f, y, a.numel, a.a,
                     a.b, a.coeffs, f64);
#else
    coupling_kernel<TX, TF, Acc, 1><<<grid_for(a.numel), 256, 0, s>>>(x, f, y, a.numel, a.a, a.b, a.coeffs, f64);
#endif
  return cudaGetLastError();
}

template <typename TX, typename TF>
cudaError_t launch_acc(const CouplingArgs& a, cudaStream_t s) {
  if constexpr (sizeof(TX) == 8 || sizeof(TF) == 8)
    return launch<TX, TF, double>(a, s);
  else
    return launch<TX, TF, float>(a, s);
}

template <typename TX>
cudaError_t dispatch_f(const CouplingArgs& a, cudaStream_t s) {
  switch (a.f_dtype) {
    case FloatType::kF32: return launch_acc<TX, float>(a, s);
    case FloatType::kF16: return launch_acc<TX, __half>(a, s);
    case FloatType::kBF16: return launch_acc<TX, __nv_bfloat16>(a, s);
    case FloatType::kF64: return launch_acc<TX, double>(a, s);
  }
  return cudaErrorInvalidValue;
}

// ---- fixed point ----
template <typename TF>
__device__ __forceinline__ int64_t fixed_add(int64_t x, TF f, double s) {
  constexpr double kLim = 4611686018427387904.0;  // 2^62
  double v = rint(Conv<TF>::f64(f) * s);
  v = v != v ? 0.0 : fmin(fmax(v, -kLim), kLim);
  return int64_t(uint64_t(x) + uint64_t(__double2ll_rn(v)));
}

template <typename TF, int VEC>
__global__ void __launch_bounds__(256) fixed_kernel(const int64_t* x, const TF* f, int64_t* y, int64_t numel,
                                                    double s) {
  const int64_t nvec = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const Vec<int64_t, VEC> X = *reinterpret_cast<const Vec<int64_t, VEC>*>(x + v * VEC);
    const Vec<TF, VEC> F = *reinterpret_cast<const Vec<TF, VEC>*>(f + v * VEC);
    Vec<int64_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = fixed_add(X.v[j], F.v[j], s);
    *reinterpret_cast<Vec<int64_t, VEC>*>(y + v * VEC) = o;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0)
    for (int64_t i = nvec * VEC; i < numel; ++i) y[i] = fixed_add(x[i], f[i], s);
}

template <typename TF>
cudaError_t launch_fixed(const CouplingFixedArgs& a, cudaStream_t s) {
  constexpr int VEC = 2;
  const auto* f = static_cast<const TF*>(a.f);
  if (aligned(a.x, 16) && aligned(a.y, 16) && aligned(a.f, VEC * sizeof(TF)))
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(fixed_kernel<TF, VEC>, dim3(grid_for(a.numel / VEC)), dim3(256), 0, s, a.x, f, a.y, a.numel,
                     a.scale);
#else
    fixed_kernel<TF, VEC><<<grid_for(a.numel / VEC), 256, 0, s>>>(a.x, f, a.y, a.numel, a.scale);
#endif
  else
#ifdef PYDIFF_CUDA_EMU
    cuda_emu::launch(fixed_kernel<TF, 1>, dim3(grid_for(a.numel)), dim3(256), 0, s, a.x, f, a.y, a.numel, a.scale);
#else
    fixed_kernel<TF, 1><<<grid_for(a.numel), 256, 0, s>>>(a.x, f, a.y, a.numel, a.scale);
#endif
  return cudaGetLastError();
}

}  // namespace

int coupling_update_cuda(const CouplingArgs& a, void* stream) {
  if (a.numel < 0 || !a.x || !a.f || !a.y) return int(cudaErrorInvalidValue);
  if (a.coeffs && a.coeffs_dtype != FloatType::kF32 && a.coeffs_dtype != FloatType::kF64)
    return int(cudaErrorInvalidValue);
  if (a.numel == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.x_dtype) {
    case FloatType::kF32: return int(dispatch_f<float>(a, s));
    case FloatType::kF16: return int(dispatch_f<__half>(a, s));
    case FloatType::kBF16: return int(dispatch_f<__nv_bfloat16>(a, s));
    case FloatType::kF64: return int(dispatch_f<double>(a, s));
  }
  return int(cudaErrorInvalidValue);
}

int coupling_fixed_cuda(const CouplingFixedArgs& a, void* stream) {
  if (a.numel < 0 || !isfinite(a.scale)) return int(cudaErrorInvalidValue);
  if (a.numel == 0) return 0;
  if (!a.x || !a.f || !a.y) return int(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.f_dtype) {
    case FloatType::kF32: return int(launch_fixed<float>(a, s));
    case FloatType::kF16: return int(launch_fixed<__half>(a, s));
    case FloatType::kBF16: return int(launch_fixed<__nv_bfloat16>(a, s));
    case FloatType::kF64: return int(launch_fixed<double>(a, s));
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace pydiff
