// CUDA registrations of the quantization ops (quantize, quant_gemm). Compiled by the host compiler
// (the kernels in csrc/quant/*_cuda.cu go through nvcc). Argument checks and output allocation:
// quant_args.h (shared with the CPU registrations); meaning: pydiff/reference/quant.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <tuple>

#include "quant_args.h"

namespace pydiff {
namespace {

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void require_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda_op(
    const at::Tensor& x, const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& lora_down,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale, const std::string& fmt,
    int64_t group_size, const std::string& prologue, double eps) {
  require_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  QuantizeCall c = make_quantize_call(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps);
  const int err = quantize_cuda(c.args, stream_of(x));
  TORCH_CHECK(err != int(cudaErrorNotSupported),
              "pydiff.quantize: the CUDA kernel needs 16 * (K / group_size) * 4 bytes of shared memory (plus "
              "about 64 * max(R, 256) bytes with lora_down), more than this GPU offers per block; got K = ",
              c.args.K, ", group_size = ", group_size, ", R = ", c.args.rank,
              " (use a larger group_size, or backend='triton' / 'torch')");
  TORCH_CHECK(err == 0, "pydiff.quantize: CUDA kernel launch failed: ", cudaGetErrorString(cudaError_t(err)));
  return {c.q, c.scales, c.lora_act};
}

at::Tensor quant_gemm_cuda_op(const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qw, const at::Tensor& sw,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_act,
                              const std::optional<at::Tensor>& lora_up, const std::string& fmt, int64_t group_size,
                              at::ScalarType out_dtype) {
  require_cuda(qa, "qa");
  c10::cuda::CUDAGuard guard(qa.device());
  QuantGemmCall c = make_quant_gemm_call(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype);
  if (c.args.fmt == QuantFormat::kFp8E4M3) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, qa.device().index());
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, qa.device().index());
    TORCH_CHECK(major * 10 + minor >= 89, "fmt: 'fp8' needs the e4m3 tensor-core MMA of compute capability 8.9+ "
                "(Ada, Hopper); this GPU is ", major, ".", minor, " (use int8 or int4)");
  }
  const int err = quant_gemm_cuda(c.args, stream_of(qa));
  TORCH_CHECK(err != int(cudaErrorNotSupported),
              "fmt: 'fp8' needs a pydiff build with CUDA kernels for sm_89+ (PYDIFF_CUDA_ARCHS, e.g. '8.9;9.0a'); "
              "this build's kernel image for the GPU has no e4m3 MMA");
  TORCH_CHECK(err == 0, "pydiff.quant_gemm: CUDA kernel launch failed: ", cudaGetErrorString(cudaError_t(err)));
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CUDA, m) {
  m.impl("quantize", &quantize_cuda_op);
  m.impl("quant_gemm", &quant_gemm_cuda_op);
}

}  // namespace pydiff
