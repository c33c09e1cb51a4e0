// Tensor -> kernel-argument conversion shared by the CPU and CUDA registrations of the invertible
// ops (coupling_update[_], coupling_update_fixed[_], groupnorm_silu[_backward]). With the other
// bindings/ files, the only place that includes torch headers. Schemas: pydiff/ops/_library.py.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "pydiff/invertible.h"

namespace pydiff {

inline FloatType float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kF32;
    case at::kHalf: return FloatType::kF16;
    case at::kBFloat16: return FloatType::kBF16;
    case at::kDouble: return FloatType::kF64;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
  return FloatType::kF32;
}

inline void check_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " (the device of x), got ",
                    t.device());
}

// ---------------------------------------------------------------- coupling
struct CouplingCall {
  CouplingArgs args{};
  at::Tensor x, f, coeffs, y;
};

// y = a x + b f (y = x when in_place and x is contiguous; else a new contiguous tensor).
inline CouplingCall make_coupling_call(const at::Tensor& x, const at::Tensor& f, double a, double b,
                                       const std::optional<at::Tensor>& coeffs, bool in_place) {
  CouplingCall c;
  CouplingArgs& g = c.args;
  g.x_dtype = float_type(x, "x");
  g.f_dtype = float_type(f, "f");
  TORCH_CHECK_VALUE(f.sizes() == x.sizes(), "f: expected shape ", x.sizes(), " (the shape of x), got ", f.sizes());
  check_device(f, x, "f");
  TORCH_CHECK_VALUE(std::isfinite(a) && std::isfinite(b), "a, b: expected finite coefficients, got ", a, ", ", b);
  if (coeffs.has_value()) {
    const at::Tensor& t = *coeffs;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "coeffs: expected a float32 or float64 tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == 2, "coeffs: expected 2 elements [c0, c1], got shape ", t.sizes());
    check_device(t, x, "coeffs");
    c.coeffs = t.contiguous();
    g.coeffs = c.coeffs.data_ptr();
    g.coeffs_dtype = t.scalar_type() == at::kDouble ? FloatType::kF64 : FloatType::kF32;
  }
  if (in_place) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes,
                      "x: expected a tensor without internal overlap (not an expanded view) for an in-place update");
  }
  // f may share memory with x: read a copy unless the two are the same elements in the same order
  const bool same = f.is_same(x) ||
                    (f.data_ptr() == x.data_ptr() && f.strides() == x.strides() && f.scalar_type() == x.scalar_type());
  c.f = (in_place && !same && at::get_overlap_status(x, f) != at::MemOverlapStatus::No) ? f.clone(at::MemoryFormat::Contiguous)
                                                                                  : f.contiguous();
  c.x = x.contiguous();
  if (in_place && x.is_contiguous())
    c.y = x;
  else
    c.y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  g.numel = x.numel();
  g.x = c.x.data_ptr();
  g.f = c.f.data_ptr();
  g.y = c.y.data_ptr();
  g.a = a;
  g.b = b;
  return c;
}

struct CouplingFixedCall {
  CouplingFixedArgs args{};
  at::Tensor x, f, y;
};

inline CouplingFixedCall make_coupling_fixed_call(const at::Tensor& x, const at::Tensor& f, double scale,
                                                  int64_t frac_bits, bool in_place) {
  CouplingFixedCall c;
  CouplingFixedArgs& g = c.args;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, "x: expected dtype int64 (a fixed-point state), got ",
                   x.scalar_type());
  g.f_dtype = float_type(f, "f");
  TORCH_CHECK_VALUE(f.sizes() == x.sizes(), "f: expected shape ", x.sizes(), " (the shape of x), got ", f.sizes());
  check_device(f, x, "f");
  TORCH_CHECK_VALUE(frac_bits >= 0 && frac_bits <= 62, "frac_bits: expected 0..62, got ", frac_bits);
  const double s = std::ldexp(scale, int(frac_bits));
  TORCH_CHECK_VALUE(std::isfinite(s), "scale: expected a finite number (scale * 2^frac_bits finite), got ", scale);
  if (in_place) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes,
                      "x: expected a tensor without internal overlap (not an expanded view) for an in-place update");
  }
  c.x = x.contiguous();
  c.f = f.contiguous();
  c.y = (in_place && x.is_contiguous()) ? x : at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  g.numel = x.numel();
  g.x = c.x.data_ptr<int64_t>();
  g.f = c.f.data_ptr();
  g.y = c.y.data_ptr<int64_t>();
  g.scale = s;
  return c;
}

// ---------------------------------------------------------------- GroupNorm + SiLU
struct GroupNormSiluCall {
  GroupNormSiluArgs args{};
  at::Tensor x, weight, bias, grad_y, mean, rstd;
  at::Tensor y, grad_x, grad_weight, grad_bias;
  at::ScalarType acc;
};

inline at::Tensor gn_param(const std::optional<at::Tensor>& p, const at::Tensor& x, at::ScalarType acc,
                           const char* name) {
  if (!p.has_value()) return at::Tensor();
  float_type(*p, name);
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1), name, ": expected shape [", x.size(1),
                    "] (the channels of x), got ", p->sizes());
  check_device(*p, x, name);
  return p->to(acc).contiguous();
}

inline GroupNormSiluCall make_gn_call(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
  GroupNormSiluCall c;
  GroupNormSiluArgs& g = c.args;
  g.dtype = float_type(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected shape [N, C, *] (at least 2 dimensions), got ", x.sizes());
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0 && groups <= x.size(1), "groups: expected a divisor of the ", x.size(1),
                    " channels of x, got ", groups);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite number >= 0, got ", eps);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && (x.size(0) == 0 || x.numel() > 0),
                    "x: expected at least one channel and one element per channel, got shape ", x.sizes());
  c.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c.x = x.contiguous();
  c.weight = gn_param(weight, x, c.acc, "weight");
  c.bias = gn_param(bias, x, c.acc, "bias");
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = g.C > 0 && g.N > 0 ? x.numel() / (g.N * g.C) : 1;
  if (g.HW == 0) g.HW = 1;
  g.groups = groups;
  g.eps = eps;
  g.x = c.x.data_ptr();
  g.weight = c.weight.defined() ? c.weight.data_ptr() : nullptr;
  g.bias = c.bias.defined() ? c.bias.data_ptr() : nullptr;
  return c;
}

inline void gn_forward_outputs(GroupNormSiluCall& c) {
  const at::Tensor& x = c.x;
  c.y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  c.mean = at::empty({x.size(0), c.args.groups}, x.options().dtype(c.acc));
  c.rstd = at::empty({x.size(0), c.args.groups}, x.options().dtype(c.acc));
  c.args.y = c.y.data_ptr();
  c.args.mean = c.mean.data_ptr();
  c.args.rstd = c.rstd.data_ptr();
}

inline void gn_backward_inputs(GroupNormSiluCall& c, const at::Tensor& grad_y, const at::Tensor& mean,
                               const at::Tensor& rstd, const std::array<bool, 3>& mask) {
  const at::Tensor& x = c.x;
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y: expected shape ", x.sizes(), " (the shape of x), got ",
                    grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "grad_y: expected dtype ", x.scalar_type(),
                   " (the dtype of x), got ", grad_y.scalar_type());
  check_device(grad_y, x, "grad_y");
  const int64_t N = x.size(0), G = c.args.groups;
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    float_type(t, name);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == G, name, ": expected shape (", N, ", ", G,
                      ") [N, groups] (as the forward returns it), got ", t.sizes());
    check_device(t, x, name);
  }
  c.grad_y = grad_y.contiguous();
  c.mean = mean.to(c.acc).contiguous();
  c.rstd = rstd.to(c.acc).contiguous();
  c.args.grad_y = c.grad_y.data_ptr();
  c.args.mean = c.mean.data_ptr();
  c.args.rstd = c.rstd.data_ptr();
  // outputs not asked for are distinct empty tensors (outputs must not alias)
  auto empty = [&]() { return at::empty({0}, x.options()); };
  c.grad_x = mask[0] ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)) : empty();
  const bool gw = mask[1] && c.weight.defined(), gb = mask[2] && c.bias.defined();
  c.grad_weight = gw ? at::empty({x.size(1)}, x.options().dtype(c.acc)) : empty();
  c.grad_bias = gb ? at::empty({x.size(1)}, x.options().dtype(c.acc)) : empty();
  c.args.grad_x = mask[0] ? c.grad_x.data_ptr() : nullptr;
  c.args.grad_weight = gw ? c.grad_weight.data_ptr() : nullptr;
  c.args.grad_bias = gb ? c.grad_bias.data_ptr() : nullptr;
}

// Parameter gradients in the parameters' own dtypes.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_backward_results(const GroupNormSiluCall& c,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias) {
  at::Tensor gw = c.grad_weight, gb = c.grad_bias;
  if (gw.numel() > 0 && weight.has_value()) gw = gw.to(weight->scalar_type());
  if (gb.numel() > 0 && bias.has_value()) gb = gb.to(bias->scalar_type());
  return {c.grad_x, gw, gb};
}

}  // namespace pydiff
