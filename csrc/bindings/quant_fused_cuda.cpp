// CUDA registration of quant_gemm_quant (schema: pydiff/ops/_library.py; meaning: pydiff/reference/quant.py,
// quant_gemm_quant_ref): quant_gemm_cuda into an fp32 buffer, then quantize_cuda of it with the epilogue
// (none | gelu_tanh) as the prologue and the consumer's smoothing, on the current stream (quant_fused.h).
// A composition of two kernels: the fp32 GEMM output round-trips through memory; the Triton backend is
// the fused kernel. Same C++ signature as the CPU registration (quant_ops.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <tuple>

#include "quant_args.h"
#include "quant_fused.h"

namespace pydiff {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_gemm_quant_cuda_op(
    const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qw, const at::Tensor& sw,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_act,
    const std::optional<at::Tensor>& lora_up, const std::optional<at::Tensor>& smooth,
    const std::optional<at::Tensor>& lora_down, const std::string& fmt, int64_t group_size,
    const std::string& epilogue, const std::string& out_fmt, int64_t out_group_size) {
  TORCH_CHECK_VALUE(qa.is_cuda(), "qa: expected a CUDA tensor, got ", qa.device());
  c10::cuda::CUDAGuard guard(qa.device());
  void* stream = c10::cuda::getCurrentCUDAStream(qa.device().index()).stream();
  const int dev = qa.device().index();
  return run_quant_gemm_quant(
      qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue, out_fmt, out_group_size,
      [&](const QuantGemmArgs& a) {
        if (a.fmt == QuantFormat::kFp8E4M3) {
          int major = 0, minor = 0;
          cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
          cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
          TORCH_CHECK(major * 10 + minor >= 89, "fmt: 'fp8' needs the e4m3 tensor-core MMA of compute capability "
                      "8.9+ (Ada, Hopper); this GPU is ", major, ".", minor, " (use int8 or int4)");
        }
        const int err = quant_gemm_cuda(a, stream);
        TORCH_CHECK(err != int(cudaErrorNotSupported),
                    "fmt: 'fp8' needs a pydiff build with CUDA kernels for sm_89+ (PYDIFF_CUDA_ARCHS, e.g. "
                    "'8.9;9.0a'); this build's kernel image for the GPU has no e4m3 MMA");
        TORCH_CHECK(err == 0, "pydiff.quant_gemm_quant: CUDA GEMM launch failed: ",
                    cudaGetErrorString(cudaError_t(err)));
      },
      [&](const QuantizeArgs& a) {
        const int err = quantize_cuda(a, stream);
        TORCH_CHECK(err != int(cudaErrorNotSupported),
                    "out_group_size: the CUDA quantize kernel needs 16 * (N / out_group_size) * 4 bytes of shared "
                    "memory (plus about 64 * max(R2, 256) bytes with lora_down), more than this GPU offers per "
                    "block; got N = ", a.K, ", out_group_size = ", a.group_size, ", R2 = ", a.rank,
                    " (use a larger out_group_size, or backend='triton' / 'torch')");
        TORCH_CHECK(err == 0, "pydiff.quant_gemm_quant: CUDA quantize launch failed: ",
                    cudaGetErrorString(cudaError_t(err)));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CUDA, m) { m.impl("quant_gemm_quant", &quant_gemm_quant_cuda_op); }

}  // namespace pydiff
