// Invertible-block kernels: declarations (raw pointers, sizes, stream). No torch headers here.
// Definitions of what each kernel computes: pydiff/reference/invertible.py.
//
// 1. Coupling update (additive coupling y1 = x1 + F(x2), its inverse x1 = y1 - F(x2), IDM's scaled
//    coupling y1 = (1 - v) F(x1) + v x2 and its inverse), per element i:
//        y_i = A x_i + B f_i,   A = a * c[0], B = b * c[1]   (c: optional 2-element device vector)
//    computed in float64 when x or f is float64 (a float64 coupling state), else in fp32; y has x's
//    dtype. y may alias x (in place): every element is read before it is written, by the same thread.
// 2. Fixed-point coupling update (bit-exact inverse), x int64, f float:
//        y_i = x_i + q(f_i),  q(f) = rint(double(f) * s), clamped to [-2^62, 2^62], NaN -> 0
//    with s = scale * 2^frac_bits (float64) and int64 arithmetic modulo 2^64. rint rounds half to
//    even, so q(-s) == -q(s) and coupling_fixed(coupling_fixed(x, f, s), f, -s) == x exactly.
// 3. GroupNorm + SiLU, x [N, C, HW] contiguous (HW = product of the trailing dims), G groups of
//    Cg = C / G channels, M = Cg * HW elements per (n, g):
//        mean = E[x], var = E[(x - mean)^2] (biased), rstd = 1 / sqrt(var + eps)   (float64 sums)
//        z = (x - mean) rstd w[c] + b[c],  y = silu(z) = z / (1 + exp(-z))
//    Backward, with s = sigmoid(z), dz = dy s (1 + z (1 - s)), xhat = (x - mean) rstd:
//        grad_b[c] = sum_{n,hw} dz,  grad_w[c] = sum_{n,hw} dz xhat
//        dx = rstd (w[c] dz - mean_g(w dz) - xhat mean_g(w dz xhat))
#pragma once
#include <cstdint>

#include "pydiff/float_type.h"

namespace pydiff {

// Storage types of the invertible kernels: FloatType (float_type.h; solver.h's DType plus float64).

struct CouplingArgs {
  FloatType x_dtype;    // dtype of x and y
  FloatType f_dtype;    // dtype of f
  int64_t numel;
  const void* x;
  const void* f;
  void* y;              // may equal x (in place)
  double a, b;
  const void* coeffs;   // may be null; else 2 values [c0, c1] on the kernel's device
  FloatType coeffs_dtype;  // kF32 or kF64
};

// CPU kernel (OpenMP, vectorised). Returns 0 on success, nonzero on bad arguments.
int coupling_update_cpu(const CouplingArgs& args);
// CUDA kernel on `stream` (a cudaStream_t). Returns a cudaError_t value (0 = success).
int coupling_update_cuda(const CouplingArgs& args, void* stream);

struct CouplingFixedArgs {
  FloatType f_dtype;
  int64_t numel;
  const int64_t* x;
  const void* f;
  int64_t* y;           // may equal x (in place)
  double scale;         // scale * 2^frac_bits, finite
};

int coupling_fixed_cpu(const CouplingFixedArgs& args);
int coupling_fixed_cuda(const CouplingFixedArgs& args, void* stream);

// weight, bias, mean, rstd, grad_weight, grad_bias: float32 (float64 when dtype is kF64).
struct GroupNormSiluArgs {
  FloatType dtype;      // x, y (forward); grad_y, x, grad_x (backward)
  int64_t N, C, HW;
  int64_t groups;
  double eps;
  const void* x;
  const void* weight;   // [C], may be null (1)
  const void* bias;     // [C], may be null (0)
  // forward
  void* y;              // [N, C, HW]
  void* mean;           // [N, G]
  void* rstd;           // [N, G]
  // backward (mean and rstd are read from the pointers above)
  const void* grad_y;   // [N, C, HW]
  void* grad_x;         // [N, C, HW], may be null (not needed)
  void* grad_weight;    // [C], may be null (not needed)
  void* grad_bias;      // [C], may be null (not needed)
};

int groupnorm_silu_cpu(const GroupNormSiluArgs& args);
int groupnorm_silu_backward_cpu(const GroupNormSiluArgs& args);

// CUDA: `workspace` must hold groupnorm_silu_cuda_workspace(args) (forward) or
// groupnorm_silu_backward_cuda_workspace(args) bytes of device memory.
int64_t groupnorm_silu_cuda_workspace(const GroupNormSiluArgs& args);
int groupnorm_silu_cuda(const GroupNormSiluArgs& args, void* workspace, void* stream);
int64_t groupnorm_silu_backward_cuda_workspace(const GroupNormSiluArgs& args);
int groupnorm_silu_backward_cuda(const GroupNormSiluArgs& args, void* workspace, void* stream);

}  // namespace pydiff
