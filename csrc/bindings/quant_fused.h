// quant_gemm_quant as a composition of the quant_gemm and quantize kernels, shared by the CPU and CUDA
// registrations (quant_ops.cpp, quant_fused_cuda.cpp). Meaning: pydiff/reference/quant.py
// (quant_gemm_quant_ref):
//     y = quant_gemm(qa, sa, qw, sw, bias, lora_act, lora_up)   -> fp32 [M, N] buffer
//     (q, scales, lora_act2) = quantize(y, smooth, lora_down, prologue = epilogue ("none" | "gelu_tanh"),
//                                       out_fmt, out_group_size)
// The quantize kernel applies gelu_tanh, then / smooth[n], then lora_act2 = y_s @ lora_down ([N, R2], the
// consumer's low-rank down-projection, of the unquantized y_s) and the per-row per-group quantization: exactly
// the op's order. (The Triton backend fuses all of it into the GEMM tile; this path writes the fp32 y.)
#pragma once
#include <tuple>

#include "quant_args.h"

namespace pydiff {

// gemm(const QuantGemmArgs&) and quantize(const QuantizeArgs&) run the kernels and check their status.
template <typename GemmFn, typename QuantizeFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_quant_gemm_quant(
    const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qw, const at::Tensor& sw,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_act,
    const std::optional<at::Tensor>& lora_up, const std::optional<at::Tensor>& smooth,
    const std::optional<at::Tensor>& lora_down, const std::string& fmt, int64_t group_size,
    const std::string& epilogue, const std::string& out_fmt, int64_t out_group_size, GemmFn&& gemm,
    QuantizeFn&& quantize) {
  TORCH_CHECK_VALUE(epilogue == "none" || epilogue == "gelu_tanh",
                    "epilogue: expected 'none' or 'gelu_tanh', got '", epilogue, "'");
  TORCH_CHECK_VALUE(out_fmt == "int4" || out_fmt == "int8" || out_fmt == "fp8",
                    "out_fmt: expected 'int4', 'int8' or 'fp8', got '", out_fmt, "'");
  QuantGemmCall g = make_quant_gemm_call(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, at::kFloat);
  const int64_t N = g.args.N;
  TORCH_CHECK_VALUE(out_group_size > 0 && out_group_size % 32 == 0 && N % out_group_size == 0,
                    "out_group_size: expected a positive multiple of 32 that divides the N = ", N,
                    " output channels, got ", out_group_size);
  if (smooth.has_value()) {
    TORCH_CHECK_VALUE(smooth->dim() == 1 && smooth->size(0) == N, "smooth: expected shape [", N,
                      "] (the output channels), got ", smooth->sizes());
    quant_detail::same_device(*smooth, qa, "smooth", "qa");
  }
  if (lora_down.has_value()) {
    quant_detail::float_tag(*lora_down, "lora_down");
    TORCH_CHECK_VALUE(lora_down->dim() == 2 && lora_down->size(0) == N, "lora_down: expected shape [N, R2] with N = ",
                      N, " (the output channels), got ", lora_down->sizes());
    quant_detail::same_device(*lora_down, qa, "lora_down", "qa");
  }
  gemm(g.args);
  QuantizeCall q = make_quantize_call(g.out, smooth, lora_down, std::nullopt, std::nullopt, out_fmt,
                                      out_group_size, epilogue, 0.0);
  quantize(q.args);
  return {q.q, q.scales, q.lora_act};
}

}  // namespace pydiff
