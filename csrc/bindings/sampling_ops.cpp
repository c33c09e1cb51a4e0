// CPU registration of torch.ops.pydiff.sample_categorical (schema: pydiff/ops/_library.py).
#include "sampling_args.h"

namespace pydiff {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_categorical_cpu_op(const at::Tensor& logits,
                                                                         const std::optional<at::Tensor>& threshold,
                                                                         const std::optional<at::Tensor>& row_mask,
                                                                         const at::Tensor& seeds,
                                                                         const at::Tensor& offsets,
                                                                         double temperature, bool want_stats) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits: expected a CPU tensor, got ", logits.device());
  SampleCall c = make_sample_call(logits, threshold, row_mask, seeds, offsets, temperature);
  c.args.want_stats = want_stats;
  TORCH_CHECK(sample_categorical_cpu(c.args) == 0, "pydiff.sample_categorical: the CPU kernel rejected its arguments");
  return {c.tokens, c.prob, c.stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CPU, m) { m.impl("sample_categorical", &sample_categorical_cpu_op); }

}  // namespace pydiff
