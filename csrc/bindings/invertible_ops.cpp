// CPU registrations of the invertible-block ops (schemas: pydiff/ops/_library.py; kernels:
// csrc/invertible/*_cpu.cpp).
#include "invertible_args.h"

namespace pydiff {
namespace {

void require_cpu(const at::Tensor& x) { TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device()); }

at::Tensor coupling_update_cpu_op(const at::Tensor& x, const at::Tensor& f, double a, double b,
                                  const std::optional<at::Tensor>& coeffs) {
  require_cpu(x);
  CouplingCall c = make_coupling_call(x, f, a, b, coeffs, false);
  TORCH_CHECK(coupling_update_cpu(c.args) == 0, "pydiff.coupling_update: the CPU kernel rejected its arguments");
  return c.y;
}

void coupling_update_inplace_cpu_op(at::Tensor& x, const at::Tensor& f, double a, double b,
                                    const std::optional<at::Tensor>& coeffs) {
  require_cpu(x);
  CouplingCall c = make_coupling_call(x, f, a, b, coeffs, true);
  TORCH_CHECK(coupling_update_cpu(c.args) == 0, "pydiff.coupling_update_: the CPU kernel rejected its arguments");
  if (!c.y.is_same(x)) x.copy_(c.y);
}

at::Tensor coupling_fixed_cpu_op(const at::Tensor& x, const at::Tensor& f, double scale, int64_t frac_bits) {
  require_cpu(x);
  CouplingFixedCall c = make_coupling_fixed_call(x, f, scale, frac_bits, false);
  TORCH_CHECK(coupling_fixed_cpu(c.args) == 0, "pydiff.coupling_update_fixed: the CPU kernel rejected its arguments");
  return c.y;
}

void coupling_fixed_inplace_cpu_op(at::Tensor& x, const at::Tensor& f, double scale, int64_t frac_bits) {
  require_cpu(x);
  CouplingFixedCall c = make_coupling_fixed_call(x, f, scale, frac_bits, true);
  TORCH_CHECK(coupling_fixed_cpu(c.args) == 0, "pydiff.coupling_update_fixed_: the CPU kernel rejected its arguments");
  if (!c.y.is_same(x)) x.copy_(c.y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_cpu_op(const at::Tensor& x,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     int64_t groups, double eps) {
  require_cpu(x);
  GroupNormSiluCall c = make_gn_call(x, weight, bias, groups, eps);
  gn_forward_outputs(c);
  TORCH_CHECK(groupnorm_silu_cpu(c.args) == 0, "pydiff.groupnorm_silu: the CPU kernel rejected its arguments");
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_backward_cpu_op(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    std::array<bool, 3> output_mask) {
  require_cpu(x);
  GroupNormSiluCall c = make_gn_call(x, weight, bias, groups, 0.0);
  gn_backward_inputs(c, grad_y, mean, rstd, output_mask);
  TORCH_CHECK(groupnorm_silu_backward_cpu(c.args) == 0,
              "pydiff.groupnorm_silu_backward: the CPU kernel rejected its arguments");
  return gn_backward_results(c, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(pydiff, CPU, m) {
  m.impl("coupling_update", &coupling_update_cpu_op);
  m.impl("coupling_update_", &coupling_update_inplace_cpu_op);
  m.impl("coupling_update_fixed", &coupling_fixed_cpu_op);
  m.impl("coupling_update_fixed_", &coupling_fixed_inplace_cpu_op);
  m.impl("groupnorm_silu", &groupnorm_silu_cpu_op);
  m.impl("groupnorm_silu_backward", &groupnorm_silu_backward_cpu_op);
}

}  // namespace pydiff
