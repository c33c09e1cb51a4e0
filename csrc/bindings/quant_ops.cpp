// CPU registrations of the quantization ops (schemas: pydiff/ops/_library.py; meaning:
// pydiff/reference/quant.py; kernels: csrc/quant/*_cpu.cpp). The kernel functions' C++ signatures must
// equal those of the CUDA registrations (quant_ops_cuda.cpp): `str` arguments as const std::string&.
#include "quant_args.h"
#include "quant_fused.h"

namespace pydiff {
namespace {

void require_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu_op(
    const at::Tensor& x, const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& lora_down,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale, const std::string& fmt,
    int64_t group_size, const std::string& prologue, double eps) {
  require_cpu(x, "x");
  QuantizeCall c = make_quantize_call(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps);
  TORCH_CHECK(quantize_cpu(c.args) == 0, "pydiff.quantize: the CPU kernel rejected its arguments");
  return {c.q, c.scales, c.lora_act};
}

at::Tensor quant_gemm_cpu_op(const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qw, const at::Tensor& sw,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_act,
                             const std::optional<at::Tensor>& lora_up, const std::string& fmt, int64_t group_size,
                             at::ScalarType out_dtype) {
  require_cpu(qa, "qa");
  QuantGemmCall c = make_quant_gemm_call(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype);
  TORCH_CHECK(quant_gemm_cpu(c.args) == 0, "pydiff.quant_gemm: the CPU kernel rejected its arguments");
  return c.out;
}

// quant_gemm_cpu into an fp32 buffer, then quantize_cpu of it with the epilogue as prologue, the consumer's
// smoothing and its low-rank down-projection lora_down [N, R2] (quant_fused.h). Deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_gemm_quant_cpu_op(
    const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qw, const at::Tensor& sw,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_act,
    const std::optional<at::Tensor>& lora_up, const std::optional<at::Tensor>& smooth,
    const std::optional<at::Tensor>& lora_down, const std::string& fmt, int64_t group_size,
    const std::string& epilogue, const std::string& out_fmt, int64_t out_group_size) {
  require_cpu(qa, "qa");
  return run_quant_gemm_quant(
      qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue, out_fmt, out_group_size,
      [](const QuantGemmArgs& a) {
        TORCH_CHECK(quant_gemm_cpu(a) == 0, "pydiff.quant_gemm_quant: the CPU GEMM kernel rejected its arguments");
      },
      [](const QuantizeArgs& a) {
        TORCH_CHECK(quantize_cpu(a) == 0, "pydiff.quant_gemm_quant: the CPU quantize kernel rejected its arguments");
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CPU, m) {
  m.impl("quantize", &quantize_cpu_op);
  m.impl("quant_gemm", &quant_gemm_cpu_op);
  m.impl("quant_gemm_quant", &quant_gemm_quant_cpu_op);
}

}  // namespace pydiff
