// CPU registrations of torch.ops.pydiff.solver_step and cfg_rescale (schemas: pydiff/ops/_library.py).
#include <ATen/EmptyTensor.h>

#include "solver_args.h"

namespace pydiff {

std::tuple<at::Tensor, at::Tensor> solver_step_cpu_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, const std::optional<at::Tensor>& x0_stats) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  SolverStepCall call = make_solver_step_call(
      x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo, clip_hi,
      write_history, x0_stats, [](at::IntArrayRef sizes, const at::Tensor& like) {
        return at::Tensor(at::detail::empty_cpu(sizes, like.scalar_type(), false, at::MemoryFormat::Contiguous));
      });
  TORCH_CHECK(solver_step_cpu(call.args) == 0, x0_stats.has_value() ? "pydiff.solver_step_track" : "pydiff.solver_step",
              ": the CPU kernel rejected its arguments");
  return {std::move(call.out_x), std::move(call.out_h)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> solver_step_cpu_op(const at::Tensor& x, const std::optional<at::Tensor>& model_cond,
                                                      const std::optional<at::Tensor>& model_uncond,
                                                      at::TensorList history, const std::optional<at::Tensor>& noise,
                                                      const std::optional<at::Tensor>& row_scale,
                                                      c10::ArrayRef<double> coeffs,
                                                      const std::optional<at::Tensor>& coeff_table,
                                                      const std::optional<at::Tensor>& step, double clip_lo,
                                                      double clip_hi, bool write_history) {
  return solver_step_cpu_impl(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo,
                              clip_hi, write_history, std::nullopt);
}

// solver_step plus in-place x0 statistics (x0_stats [2, *x.shape] float64: += d, += d^2).
std::tuple<at::Tensor, at::Tensor> solver_step_track_cpu_op(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, at::Tensor& x0_stats) {
  return solver_step_cpu_impl(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo,
                              clip_hi, write_history, x0_stats);
}

at::Tensor cfg_rescale_cpu_op(const at::Tensor& c, const at::Tensor& u, double guidance, double phi) {
  check_rescale_args(c, u, guidance, phi);
  at::Tensor cc = c.contiguous(), uu = u.contiguous();
  at::Tensor out = at::empty({c.size(0)}, c.options().dtype(at::kFloat));
  TORCH_CHECK(cfg_rescale_cpu(to_dtype(c, "model_cond"), c.size(0), c.numel() / c.size(0), cc.data_ptr(), uu.data_ptr(),
                              guidance, phi, out.data_ptr<float>()) == 0,
              "pydiff.cfg_rescale: the CPU kernel rejected its arguments");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CPU, m) {
  m.impl("solver_step", &solver_step_cpu_op);
  m.impl("solver_step_track", &solver_step_track_cpu_op);
  m.impl("cfg_rescale", &cfg_rescale_cpu_op);
}

}  // namespace pydiff
