// CUDA registration of torch.ops.pydiff.sample_categorical (host compiler; kernels in csrc/sampling/*.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sampling_args.h"

namespace pydiff {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_categorical_cuda_op(const at::Tensor& logits,
                                                                          const std::optional<at::Tensor>& threshold,
                                                                          const std::optional<at::Tensor>& row_mask,
                                                                          const at::Tensor& seeds,
                                                                          const at::Tensor& offsets,
                                                                          double temperature, bool want_stats) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits: expected a CUDA tensor, got ", logits.device());
  c10::cuda::CUDAGuard guard(logits.device());
  SampleCall c = make_sample_call(logits, threshold, row_mask, seeds, offsets, temperature);
  c.args.want_stats = want_stats;
  at::Tensor ws = at::empty({std::max<int64_t>(1, sample_categorical_cuda_workspace(c.args.rows, c.args.vocab))},
                            logits.options().dtype(at::kByte));
  const int err = sample_categorical_cuda(c.args, ws.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  TORCH_CHECK(err == 0, "pydiff.sample_categorical: CUDA kernel launch failed with cudaError ", err);
  return {c.tokens, c.prob, c.stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CUDA, m) { m.impl("sample_categorical", &sample_categorical_cuda_op); }

}  // namespace pydiff
