// CUDA registrations of the invertible-block ops. Compiled by the host compiler (only the kernels
// in csrc/invertible/*.cu go through nvcc).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "invertible_args.h"

namespace pydiff {
namespace {

void* stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
void require_cuda(const at::Tensor& x) { TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device()); }

#define PYDIFF_CUDA_OK(call, what) \
  do {                             \
    const int err_ = (call);       \
    TORCH_CHECK(err_ == 0, what ": CUDA kernel launch failed with cudaError ", err_); \
  } while (0)

at::Tensor coupling_update_cuda_op(const at::Tensor& x, const at::Tensor& f, double a, double b,
                                   const std::optional<at::Tensor>& coeffs) {
  require_cuda(x);
  c10::cuda::CUDAGuard guard(x.device());
  CouplingCall c = make_coupling_call(x, f, a, b, coeffs, false);
  PYDIFF_CUDA_OK(coupling_update_cuda(c.args, stream_of(x)), "pydiff.coupling_update");
  return c.y;
}

void coupling_update_inplace_cuda_op(at::Tensor& x, const at::Tensor& f, double a, double b,
                                     const std::optional<at::Tensor>& coeffs) {
  require_cuda(x);
  c10::cuda::CUDAGuard guard(x.device());
  CouplingCall c = make_coupling_call(x, f, a, b, coeffs, true);
  PYDIFF_CUDA_OK(coupling_update_cuda(c.args, stream_of(x)), "pydiff.coupling_update_");
  if (!c.y.is_same(x)) x.copy_(c.y);
}

at::Tensor coupling_fixed_cuda_op(const at::Tensor& x, const at::Tensor& f, double scale, int64_t frac_bits) {
  require_cuda(x);
  c10::cuda::CUDAGuard guard(x.device());
  CouplingFixedCall c = make_coupling_fixed_call(x, f, scale, frac_bits, false);
  PYDIFF_CUDA_OK(coupling_fixed_cuda(c.args, stream_of(x)), "pydiff.coupling_update_fixed");
  return c.y;
}

void coupling_fixed_inplace_cuda_op(at::Tensor& x, const at::Tensor& f, double scale, int64_t frac_bits) {
  require_cuda(x);
  c10::cuda::CUDAGuard guard(x.device());
  CouplingFixedCall c = make_coupling_fixed_call(x, f, scale, frac_bits, true);
  PYDIFF_CUDA_OK(coupling_fixed_cuda(c.args, stream_of(x)), "pydiff.coupling_update_fixed_");
  if (!c.y.is_same(x)) x.copy_(c.y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_cuda_op(const at::Tensor& x,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      int64_t groups, double eps) {
  require_cuda(x);
  c10::cuda::CUDAGuard guard(x.device());
  GroupNormSiluCall c = make_gn_call(x, weight, bias, groups, eps);
  TORCH_CHECK_VALUE((x.size(1) / groups) * c.args.HW < (int64_t(1) << 31),
                    "x: a group of more than 2^31 elements is not supported by the CUDA kernel");
  gn_forward_outputs(c);
  at::Tensor ws = at::empty({std::max<int64_t>(groupnorm_silu_cuda_workspace(c.args), 1)}, x.options().dtype(at::kByte));
  PYDIFF_CUDA_OK(groupnorm_silu_cuda(c.args, ws.data_ptr(), stream_of(x)), "pydiff.groupnorm_silu");
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_backward_cuda_op(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    std::array<bool, 3> output_mask) {
  require_cuda(x);
  c10::cuda::CUDAGuard guard(x.device());
  GroupNormSiluCall c = make_gn_call(x, weight, bias, groups, 0.0);
  TORCH_CHECK_VALUE((x.size(1) / groups) * c.args.HW < (int64_t(1) << 31),
                    "x: a group of more than 2^31 elements is not supported by the CUDA kernel");
  gn_backward_inputs(c, grad_y, mean, rstd, output_mask);
  at::Tensor ws =
      at::empty({std::max<int64_t>(groupnorm_silu_backward_cuda_workspace(c.args), 1)}, x.options().dtype(at::kByte));
  PYDIFF_CUDA_OK(groupnorm_silu_backward_cuda(c.args, ws.data_ptr(), stream_of(x)), "pydiff.groupnorm_silu_backward");
  return gn_backward_results(c, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CUDA, m) {
  m.impl("coupling_update", &coupling_update_cuda_op);
  m.impl("coupling_update_", &coupling_update_inplace_cuda_op);
  m.impl("coupling_update_fixed", &coupling_fixed_cuda_op);
  m.impl("coupling_update_fixed_", &coupling_fixed_inplace_cuda_op);
  m.impl("groupnorm_silu", &groupnorm_silu_cuda_op);
  m.impl("groupnorm_silu_backward", &groupnorm_silu_backward_cuda_op);
}

}  // namespace pydiff
