// Quantization kernels (W4A4, W8A8 int8 / fp8): declarations (raw pointers, sizes, stream). No torch
// headers here. Definitions of what each kernel computes: pydiff/reference/quant.py.
//
// 1. quantize: x [M, K] (row-major, contiguous) -> per row and group of G channels
//        y = prologue(x)  (none | gelu_tanh | layernorm with optional adaLN (1 + scale[b]) and + shift[b],
//                          b = m / rows_per_batch)
//        y = y / smooth[k]                        (optional)
//        lora_act[m, :] = y[m, :] @ lora_down     (optional, [K, R], fp32 accumulation)
//        amax = max |y| over the group (NaN if any NaN); scale = amax / QMAX (fp32)
//        q = 0 and scale := NaN when scale is not finite; q = 0 when scale == 0;
//        else int: clamp(rintf(y / scale), -QMAX-1, QMAX); fp8: e4m3_rne(clamp(y / scale, -448, 448))
//    QMAX = 7 (int4), 127 (int8), 448 (fp8). Storage of q: int4 -> uint8 [M, K/2] (channel 2j in the
//    low nibble of byte j, two's complement); int8 -> int8 [M, K]; fp8 -> e4m3fn bytes [M, K].
//    scales: fp32 [M, K/G]. lora_act: fp32 [M, R].
// 2. quant_gemm: out [M, N] =
//        sum_g sa[m, g] * sw[n, g] * D[m, n, g]  +  sum_r lora_act[m, r] lora_up[r, n]  +  bias[n]
//    D[m, n, g] = sum_{k in group g} qa[m, k] qw[n, k]: int32, exact, for int4/int8 (fp32 for fp8).
//    Epilogue in fp32: acc += float(D) * (sa * sw), group by group; out rounded to out_dtype.
//    qa/sa: quantize() of the activations; qw/sw: quantize() of the weight [N, K] (nn.Linear layout).
//
// Constraints checked by the bindings: G % 32 == 0, K % G == 0, all pointers contiguous, int64 sizes.
#pragma once
#include <cstdint>

#include "pydiff/float_type.h"

namespace pydiff {

enum class QuantFormat : int { kInt4 = 0, kInt8 = 1, kFp8E4M3 = 2 };
enum class QuantPrologue : int { kNone = 0, kGeluTanh = 1, kLayerNorm = 2 };

struct QuantizeArgs {
  QuantFormat fmt;
  QuantPrologue prologue;
  int64_t M, K, group_size;
  FloatType x_dtype;             // kF32, kF16 or kBF16
  const void* x;                 // [M, K]
  const void* smooth;            // [K] or null
  FloatType smooth_dtype;
  const void* lora_down;         // [K, R] or null (then R == 0)
  FloatType lora_dtype;
  int64_t rank;                  // R
  const void* shift;             // [M / rows_per_batch, K] or null (layernorm only)
  const void* scale;             // same shape, or null (layernorm only)
  FloatType mod_dtype;           // dtype of shift and scale
  int64_t rows_per_batch;        // rows that share one shift/scale row (>= 1)
  double eps;                    // layernorm epsilon
  void* q;                       // output, see above
  float* scales;                 // output [M, K / G]
  float* lora_act;               // output [M, R] (null when R == 0)
};

// CPU kernel (OpenMP). Returns 0 on success, nonzero on bad arguments.
int quantize_cpu(const QuantizeArgs& args);
// CUDA kernel on `stream` (a cudaStream_t). Returns a cudaError_t value (0 = success).
int quantize_cuda(const QuantizeArgs& args, void* stream);

struct QuantGemmArgs {
  QuantFormat fmt;
  int64_t M, N, K, group_size;
  const void* qa;                // [M, K/2] uint8 (int4) or [M, K] int8 / e4m3
  const float* sa;               // [M, K / G]
  const void* qw;                // [N, K/2] or [N, K]
  const float* sw;               // [N, K / G]
  const void* bias;              // [N] or null
  FloatType bias_dtype;
  const void* lora_act;          // [M, R] or null (then R == 0)
  FloatType lora_act_dtype;
  const void* lora_up;           // [R, N] or null
  FloatType lora_up_dtype;
  int64_t rank;                  // R
  void* out;                     // [M, N]
  FloatType out_dtype;           // kF32, kF16 or kBF16
};

int quant_gemm_cpu(const QuantGemmArgs& args);
int quant_gemm_cuda(const QuantGemmArgs& args, void* stream);

}  // namespace pydiff
