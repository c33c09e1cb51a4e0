// Tensor -> SampleArgs conversion shared by the CPU and CUDA registrations of sample_categorical.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "pydiff/sampling.h"
#include "solver_args.h"  // to_dtype

namespace pydiff {

struct SampleCall {
  SampleArgs args{};
  at::Tensor logits, threshold, row_mask, seeds, offsets;
  at::Tensor tokens, prob, stats;
};

inline SampleCall make_sample_call(const at::Tensor& logits, const std::optional<at::Tensor>& threshold,
                                   const std::optional<at::Tensor>& row_mask, const at::Tensor& seeds,
                                   const at::Tensor& offsets, double temperature) {
  SampleCall c;
  SampleArgs& a = c.args;
  a.dtype = to_dtype(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D tensor [rows, vocab], got ", logits.dim(), "-D");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits: expected vocab >= 1, got ", logits.size(1));
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, "temperature: expected a finite number >= 0, got ",
                    temperature);
  const int64_t R = logits.size(0);
  c.logits = (logits.stride(1) == 1 && logits.stride(0) >= 0) ? logits : logits.contiguous();
  auto vec = [&](const at::Tensor& t, at::ScalarType st, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == st, name, ": expected dtype ", st, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == R, name, ": expected shape [", R, "], got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": expected device ", logits.device(), ", got ", t.device());
    return t.contiguous();
  };
  c.seeds = vec(seeds, at::kLong, "seeds");
  c.offsets = vec(offsets, at::kLong, "offsets");
  if (threshold.has_value()) c.threshold = vec(*threshold, at::kFloat, "threshold");
  if (row_mask.has_value()) c.row_mask = vec(*row_mask, at::kBool, "row_mask");
  a.rows = R;
  a.vocab = logits.size(1);
  a.row_stride = R > 1 ? c.logits.stride(0) : a.vocab;
  a.logits = c.logits.data_ptr();
  a.threshold = c.threshold.defined() ? c.threshold.data_ptr<float>() : nullptr;
  a.row_mask = c.row_mask.defined() ? c.row_mask.data_ptr<bool>() : nullptr;
  a.seeds = c.seeds.data_ptr<int64_t>();
  a.offsets = c.offsets.data_ptr<int64_t>();
  a.temperature = temperature;
  c.tokens = at::empty({R}, logits.options().dtype(at::kLong));
  c.prob = at::empty({R}, logits.options().dtype(at::kDouble));
  c.stats = at::empty({R, 3}, logits.options().dtype(at::kDouble));
  a.tokens = c.tokens.data_ptr<int64_t>();
  a.prob = c.prob.data_ptr<double>();
  a.stats = c.stats.data_ptr<double>();
  return c;
}

}  // namespace pydiff
