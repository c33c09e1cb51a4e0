// CUDA registrations of torch.ops.pydiff.solver_step and cfg_rescale. Compiled by the host
// compiler (only the kernels in csrc/solver/*.cu go through nvcc).
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "solver_args.h"

namespace pydiff {

std::tuple<at::Tensor, at::Tensor> solver_step_cuda_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, const std::optional<at::Tensor>& x0_stats) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  SolverStepCall call = make_solver_step_call(
      x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo, clip_hi,
      write_history, x0_stats, [](at::IntArrayRef sizes, const at::Tensor& like) {
        return at::Tensor(at::detail::empty_cuda(sizes, like.scalar_type(), like.device(), at::MemoryFormat::Contiguous));
      });
  const int err = solver_step_cuda(call.args, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == 0, x0_stats.has_value() ? "pydiff.solver_step_track" : "pydiff.solver_step",
              ": CUDA kernel launch failed with cudaError ", err);
  return {std::move(call.out_x), std::move(call.out_h)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> solver_step_cuda_op(const at::Tensor& x, const std::optional<at::Tensor>& model_cond,
                                                       const std::optional<at::Tensor>& model_uncond,
                                                       at::TensorList history, const std::optional<at::Tensor>& noise,
                                                       const std::optional<at::Tensor>& row_scale,
                                                       c10::ArrayRef<double> coeffs,
                                                       const std::optional<at::Tensor>& coeff_table,
                                                       const std::optional<at::Tensor>& step, double clip_lo,
                                                       double clip_hi, bool write_history) {
  return solver_step_cuda_impl(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                               clip_lo, clip_hi, write_history, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> solver_step_track_cuda_op(
    const at::Tensor& x, const std::optional<at::Tensor>& model_cond, const std::optional<at::Tensor>& model_uncond,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_scale,
    c10::ArrayRef<double> coeffs, const std::optional<at::Tensor>& coeff_table, const std::optional<at::Tensor>& step,
    double clip_lo, double clip_hi, bool write_history, at::Tensor& x0_stats) {
  return solver_step_cuda_impl(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                               clip_lo, clip_hi, write_history, x0_stats);
}

at::Tensor cfg_rescale_cuda_op(const at::Tensor& c, const at::Tensor& u, double guidance, double phi) {
  check_rescale_args(c, u, guidance, phi);
  TORCH_CHECK_VALUE(c.is_cuda(), "model_cond: expected a CUDA tensor, got ", c.device());
  TORCH_CHECK_VALUE(c.size(0) <= 65535, "model_cond: at most 65535 samples, got ", c.size(0));
  c10::cuda::CUDAGuard guard(c.device());
  at::Tensor cc = c.contiguous(), uu = u.contiguous();
  at::Tensor out = at::empty({c.size(0)}, c.options().dtype(at::kFloat));
  at::Tensor ws = at::empty({cfg_rescale_cuda_workspace(c.size(0))}, c.options().dtype(at::kByte));
  const int err = cfg_rescale_cuda(to_dtype(c, "model_cond"), c.size(0), c.numel() / c.size(0), cc.data_ptr(),
                                   uu.data_ptr(), guidance, phi, out.data_ptr<float>(), ws.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream(c.device().index()).stream());
  TORCH_CHECK(err == 0, "pydiff.cfg_rescale: CUDA kernel launch failed with cudaError ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CUDA, m) {
  m.impl("solver_step", &solver_step_cuda_op);
  m.impl("solver_step_track", &solver_step_track_cuda_op);
  m.impl("cfg_rescale", &cfg_rescale_cuda_op);
}

}  // namespace pydiff
