// CPU registrations of torch.ops.pydiff.solver_step and cfg_rescale (schemas: pydiff/ops/_library.py).
#include "solver_args.h"

namespace pydiff {
namespace {

std::tuple<at::Tensor, at::Tensor> solver_step_cpu_op(const at::Tensor& x, const std::optional<at::Tensor>& model_cond,
                                                      const std::optional<at::Tensor>& model_uncond,
                                                      at::TensorList history, const std::optional<at::Tensor>& noise,
                                                      const std::optional<at::Tensor>& row_scale,
                                                      c10::ArrayRef<double> coeffs,
                                                      const std::optional<at::Tensor>& coeff_table,
                                                      const std::optional<at::Tensor>& step, double clip_lo,
                                                      double clip_hi, bool write_history) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  SolverStepCall call = make_solver_step_call(x, model_cond, model_uncond, history.vec(), noise, row_scale, coeffs.vec(),
                                              coeff_table, step, clip_lo, clip_hi, write_history);
  TORCH_CHECK(solver_step_cpu(call.args) == 0, "pydiff.solver_step: the CPU kernel rejected its arguments");
  return {call.out_x, call.out_h};
}

// solver_step plus in-place x0 statistics (x0_stats [2, *x.shape] float64: += d, += d^2).
std::tuple<at::Tensor, at::Tensor> solver_step_track_cpu_op(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, at::Tensor& x0_stats) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  SolverStepCall call = make_solver_step_call(x, model_cond, model_uncond, history.vec(), noise, row_scale, coeffs.vec(),
                                              coeff_table, step, clip_lo, clip_hi, write_history, x0_stats);
  TORCH_CHECK(solver_step_cpu(call.args) == 0, "pydiff.solver_step_track: the CPU kernel rejected its arguments");
  return {call.out_x, call.out_h};
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
