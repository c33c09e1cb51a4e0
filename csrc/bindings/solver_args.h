// Tensor -> SolverStepArgs conversion shared by the CPU and CUDA registrations (the only place,
// with the other bindings/ files, that includes torch headers).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "pydiff/solver.h"

namespace pydiff {

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kF32;
}

// `index` >= 0 names a list entry ("history[2]"); the name string is only built on failure.
inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, int index = -1) {
  if (C10_LIKELY(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device())) return;
  const std::string n = index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), n, ": expected shape ", x.sizes(), " (the shape of x), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), n, ": expected dtype ", x.scalar_type(), " (the dtype of x), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), n, ": expected device ", x.device(), ", got ", t.device());
}

inline void check_like(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (t.has_value()) check_like(*t, x, name);
}

// Holds contiguous copies (where needed) alive while the kernel runs.
struct SolverStepCall {
  SolverStepArgs args{};
  std::vector<at::Tensor> keep;  // only non-contiguous inputs' copies (usually empty: no allocation)
  at::Tensor out_x, out_h;
};

// The data pointer of t, or of a contiguous copy kept in `call` (t.contiguous() for a contiguous
// tensor would return t itself; checking first saves the handle copy and the vector push).
inline const void* contig_ptr(SolverStepCall& call, const at::Tensor& t) {
  if (t.is_contiguous()) return t.data_ptr();
  call.keep.push_back(t.contiguous());
  return call.keep.back().data_ptr();
}

inline const void* contig_ptr(SolverStepCall& call, const std::optional<at::Tensor>& t) {
  return t.has_value() ? contig_ptr(call, *t) : nullptr;
}

// The outputs on x's device without the dispatcher (at::empty would go through it: ~0.3 us per tensor
// on the CPU box, on every eager call): `alloc(sizes, x)` returns a new contiguous tensor of x's dtype
// and device (at::detail::empty_cpu / empty_cuda; every element is written by the kernel).
template <typename Alloc>
SolverStepCall make_solver_step_call(const at::Tensor& x, const std::optional<at::Tensor>& model_cond,
                                     const std::optional<at::Tensor>& model_uncond, at::TensorList history,
                                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
                                     c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table,
                                     const std::optional<at::Tensor>& step, double clip_lo, double clip_hi,
                                     bool write_history, const std::optional<at::Tensor>& x0_stats, Alloc alloc) {
  SolverStepCall call;
  SolverStepArgs& a = call.args;
  a.dtype = to_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected at least 1 dimension (batch first), got a 0-d tensor");
  check_like(model_cond, x, "model_cond");
  check_like(model_uncond, x, "model_uncond");
  check_like(noise, x, "noise");
  TORCH_CHECK_VALUE(!(model_uncond.has_value() && !model_cond.has_value()),
                    "model_uncond: given without model_cond (pass the conditional output as model_cond)");
  const int k = int(history.size());
  TORCH_CHECK_VALUE(k <= kMaxHistory, "history: expected at most ", kMaxHistory, " entries, got ", k);
  for (int i = 0; i < k; ++i) check_like(history[i], x, "history", i);
  const int nc = num_step_coeffs(k);
  a.numel = x.numel();
  a.inner = x.size(0) > 0 ? x.numel() / x.size(0) : 1;
  if (a.inner == 0) a.inner = 1;
  a.x = contig_ptr(call, x);
  a.model_cond = contig_ptr(call, model_cond);
  a.model_uncond = contig_ptr(call, model_uncond);
  a.noise = contig_ptr(call, noise);
  a.num_history = k;
  for (int i = 0; i < k; ++i) a.history[i] = contig_ptr(call, history[i]);
  if (coeff_table.has_value()) {
    TORCH_CHECK_VALUE(coeffs.empty(), "coeffs: pass either coeffs or coeff_table, not both");
    const at::Tensor& t = *coeff_table;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble && t.dim() == 2, "coeff_table: expected a 2-D float64 tensor");
    TORCH_CHECK_VALUE(t.size(1) == nc && t.size(0) >= 1, "coeff_table: expected shape [steps >= 1, ", nc, "], got ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), "coeff_table: expected device ", x.device(), ", got ", t.device());
    TORCH_CHECK_TYPE(step.has_value(), "step: expected a one-element int64 tensor (the device-side step counter) "
                     "with coeff_table");
    TORCH_CHECK_TYPE(step->scalar_type() == at::kLong && step->numel() == 1, "step: expected a one-element int64 tensor");
    TORCH_CHECK_VALUE(step->device() == x.device(), "step: expected device ", x.device(), ", got ", step->device());
    a.coeff_table = static_cast<const double*>(contig_ptr(call, t));
    a.step = static_cast<const int64_t*>(contig_ptr(call, *step));
    a.table_rows = t.size(0);
  } else {
    TORCH_CHECK_VALUE(int(coeffs.size()) == nc, "coeffs: expected ", nc, " values for ", k, " history entries, got ",
                      coeffs.size());
    TORCH_CHECK_VALUE(!step.has_value(), "step: only used with coeff_table");
    for (int i = 0; i < nc; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(coeffs[i]), "coeffs[", i, "]: expected a finite coefficient, got ", coeffs[i]);
      a.coeffs[i] = coeffs[i];
    }
  }
  if (row_scale.has_value()) {
    TORCH_CHECK_TYPE(row_scale->scalar_type() == at::kFloat, "row_scale: expected float32, got ", row_scale->scalar_type());
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == x.size(0), "row_scale: expected shape [", x.size(0),
                      "], got ", row_scale->sizes());
    TORCH_CHECK_VALUE(row_scale->device() == x.device(), "row_scale: expected device ", x.device(), ", got ",
                      row_scale->device());
    a.row_scale = static_cast<const float*>(contig_ptr(call, *row_scale));
  }
  TORCH_CHECK_VALUE(!std::isnan(clip_lo) && !std::isnan(clip_hi), "clip: expected numbers, got (", clip_lo, ", ",
                    clip_hi, ")");
  a.clip_lo = float(clip_lo);
  a.clip_hi = float(clip_hi);
  call.out_x = alloc(x.sizes(), x);
  call.out_h = alloc(write_history ? x.sizes() : at::IntArrayRef({0}), x);
  a.out_x = call.out_x.data_ptr();
  a.out_h = write_history ? call.out_h.data_ptr() : nullptr;
  if (x0_stats.has_value()) {
    const at::Tensor& t = *x0_stats;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, "x0_stats: expected dtype float64, got ", t.scalar_type());
    if (!(t.dim() == x.dim() + 1 && t.size(0) == 2 && t.sizes().slice(1) == x.sizes())) {
      std::vector<int64_t> want{2};
      for (int64_t d : x.sizes()) want.push_back(d);
      TORCH_CHECK_VALUE(false, "x0_stats: expected shape ", at::IntArrayRef(want),
                        " ([2, *x.shape]: running sums of x0 and x0^2), got ", t.sizes());
    }
    TORCH_CHECK_VALUE(t.is_contiguous(), "x0_stats: expected a contiguous tensor (it is updated in place)");
    TORCH_CHECK_VALUE(t.device() == x.device(), "x0_stats: expected device ", x.device(), ", got ", t.device());
    a.x0_stats = t.data_ptr<double>();
  }
  return call;
}

// The bodies of torch.ops.pydiff.solver_step (x0_stats absent) and solver_step_track (x0_stats
// given, updated in place) for CPU tensors (solver_ops.cpp) and CUDA tensors (solver_ops_cuda.cpp,
// only with PYDIFF_WITH_CUDA). The TORCH_LIBRARY_IMPL registrations call them, and so does the
// direct Python binding pydiff._C.solver_step_direct (module.cpp), which skips the dispatcher.
std::tuple<at::Tensor, at::Tensor> solver_step_cpu_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, const std::optional<at::Tensor>& x0_stats);
#ifdef PYDIFF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> solver_step_cuda_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, const std::optional<at::Tensor>& x0_stats);
#endif

inline void check_rescale_args(const at::Tensor& c, const at::Tensor& u, double guidance, double phi) {
  to_dtype(c, "model_cond");
  check_like(u, c, "model_uncond");
  TORCH_CHECK_VALUE(c.dim() >= 2 && c.size(0) > 0 && c.numel() / c.size(0) >= 2,
                    "model_cond: expected [B, ...] with at least 2 elements per sample, got ", c.sizes());
  TORCH_CHECK_VALUE(std::isfinite(guidance) && std::isfinite(phi), "guidance, phi: expected finite numbers");
}

}  // namespace pydiff
