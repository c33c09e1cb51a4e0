// fp16 / bf16 / fp64 -> fp32 loads shared by the CUDA kernels (CUDA headers only; the device twin
// of cpu_types.h). Compiled by nvcc, and by the host compiler in the CPU emulator tests.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pydiff/float_type.h"

namespace pydiff {

__device__ __forceinline__ float tof(float v) { return v; }
__device__ __forceinline__ float tof(__half v) { return __half2float(v); }
__device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double tof(double v) { return v; }

// Element i of a tensor whose storage type is known only at run time (bias, scales, modulation), as fp32.
__device__ __forceinline__ float load_f(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case FloatType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case FloatType::kF64: return float(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace pydiff
