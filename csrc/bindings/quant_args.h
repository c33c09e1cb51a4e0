// Tensor -> kernel-argument conversion shared by the CPU and CUDA registrations of the quantization
// ops (quantize, quant_gemm). With the other bindings/ files, the only place that includes torch
// headers. Schemas: pydiff/ops/_library.py; meaning: pydiff/reference/quant.py.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "pydiff/quant.h"

namespace pydiff {
namespace quant_detail {

inline FloatType float_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kF32;
    case at::kHalf: return FloatType::kF16;
    case at::kBFloat16: return FloatType::kBF16;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return FloatType::kF32;
}

inline QuantFormat parse_format(const std::string& fmt) {
  if (fmt == "int4") return QuantFormat::kInt4;
  if (fmt == "int8") return QuantFormat::kInt8;
  if (fmt == "fp8") return QuantFormat::kFp8E4M3;
  TORCH_CHECK_VALUE(false, "fmt: expected 'int4', 'int8' or 'fp8', got '", fmt, "'");
  return QuantFormat::kInt4;
}

inline at::ScalarType q_scalar_type(QuantFormat f) {
  return f == QuantFormat::kInt4 ? at::kByte : (f == QuantFormat::kInt8 ? at::kChar : at::kFloat8_e4m3fn);
}

inline int64_t q_cols(QuantFormat f, int64_t K) { return f == QuantFormat::kInt4 ? K / 2 : K; }

inline void same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ",
                    ref_name, "), got ", t.device());
}

// Largest group sizes whose int32 group sums cannot overflow: G * 128 * 128 < 2^31 (int8) and
// G * 8 * 8 < 2^31 (int4), rounded down to multiples of 32 (pydiff/ops/quant.py has the same limits).
constexpr int64_t kMaxGroupInt8 = 131040, kMaxGroupInt4 = 33554400;

inline void check_group(int64_t K, int64_t G) {
  TORCH_CHECK_VALUE(G > 0 && G % 32 == 0 && K % G == 0, "group_size: expected a positive multiple of 32 that divides K = ",
                    K, ", got ", G);
}

}  // namespace quant_detail

struct QuantizeCall {
  QuantizeArgs args{};
  at::Tensor x, smooth, lora_down, shift, scale;  // contiguous inputs (kept alive)
  at::Tensor q, scales, lora_act;                 // outputs
};

inline QuantizeCall make_quantize_call(const at::Tensor& x, const std::optional<at::Tensor>& smooth,
                                       const std::optional<at::Tensor>& lora_down,
                                       const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
                                       const std::string& fmt, int64_t group_size, const std::string& prologue,
                                       double eps) {
  using namespace quant_detail;
  QuantizeCall c;
  QuantizeArgs& a = c.args;
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [M, K], got shape ", x.sizes());
  a.x_dtype = float_tag(x, "x");
  a.fmt = parse_format(fmt);
  if (prologue == "none") a.prologue = QuantPrologue::kNone;
  else if (prologue == "gelu_tanh") a.prologue = QuantPrologue::kGeluTanh;
  else if (prologue == "layernorm") a.prologue = QuantPrologue::kLayerNorm;
  else TORCH_CHECK_VALUE(false, "prologue: expected 'none', 'gelu_tanh' or 'layernorm', got '", prologue, "'");
  const int64_t M = x.size(0), K = x.size(1);
  check_group(K, group_size);
  a.M = M;
  a.K = K;
  a.group_size = group_size;
  c.x = x.contiguous();
  a.x = c.x.data_ptr();
  if (smooth.has_value()) {
    a.smooth_dtype = float_tag(*smooth, "smooth");
    TORCH_CHECK_VALUE(smooth->numel() == K && smooth->dim() == 1, "smooth: expected shape [", K, "], got ",
                      smooth->sizes());
    same_device(*smooth, x, "smooth", "x");
    c.smooth = smooth->contiguous();
    a.smooth = c.smooth.data_ptr();
  }
  a.rank = 0;
  if (lora_down.has_value()) {
    a.lora_dtype = float_tag(*lora_down, "lora_down");
    TORCH_CHECK_VALUE(lora_down->dim() == 2 && lora_down->size(0) == K,
                      "lora_down: expected shape [K, R] with K = ", K, ", got ", lora_down->sizes());
    same_device(*lora_down, x, "lora_down", "x");
    c.lora_down = lora_down->contiguous();
    a.lora_down = c.lora_down.data_ptr();
    a.rank = lora_down->size(1);
  }
  a.rows_per_batch = M > 0 ? M : 1;
  const at::Tensor* mod_ref = nullptr;
  for (int i = 0; i < 2; ++i) {
    const std::optional<at::Tensor>& t = i == 0 ? shift : scale;
    const char* name = i == 0 ? "shift" : "scale";
    if (!t.has_value()) continue;
    TORCH_CHECK_VALUE(a.prologue == QuantPrologue::kLayerNorm, name, ": only used with prologue='layernorm'");
    // (an empty batch: M = 0 rows with B = 0 modulation rows)
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) == K &&
                          ((t->size(0) >= 1 && M % t->size(0) == 0) || (t->size(0) == 0 && M == 0)), name,
                      ": expected shape [B, K] with K = ", K, " and B dividing M = ", M, ", got ", t->sizes());
    if (mod_ref != nullptr) {
      TORCH_CHECK_VALUE(t->sizes() == mod_ref->sizes() && t->scalar_type() == mod_ref->scalar_type(),
                        "scale: expected the shape and dtype of shift, got ", t->sizes(), " ", t->scalar_type());
    }
    mod_ref = &*t;
    a.mod_dtype = float_tag(*t, name);
    same_device(*t, x, name, "x");
    a.rows_per_batch = t->size(0) > 0 ? M / t->size(0) : 1;  // (B = 0 only with M = 0: nothing runs)
  }
  if (shift.has_value()) {
    c.shift = shift->contiguous();
    a.shift = c.shift.data_ptr();
  }
  if (scale.has_value()) {
    c.scale = scale->contiguous();
    a.scale = c.scale.data_ptr();
  }
  TORCH_CHECK_VALUE(eps >= 0.0, "eps: expected a number >= 0, got ", eps);
  a.eps = eps;
  c.q = at::empty({M, q_cols(a.fmt, K)}, x.options().dtype(q_scalar_type(a.fmt)));
  c.scales = at::empty({M, K / group_size}, x.options().dtype(at::kFloat));
  c.lora_act = at::empty({M, a.rank}, x.options().dtype(at::kFloat));
  a.q = c.q.data_ptr();
  a.scales = c.scales.data_ptr<float>();
  a.lora_act = a.rank > 0 ? c.lora_act.data_ptr<float>() : nullptr;
  return c;
}

struct QuantGemmCall {
  QuantGemmArgs args{};
  at::Tensor qa, sa, qw, sw, bias, lora_act, lora_up;
  at::Tensor out;
};

inline QuantGemmCall make_quant_gemm_call(const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qw,
                                          const at::Tensor& sw, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& lora_act,
                                          const std::optional<at::Tensor>& lora_up, const std::string& fmt,
                                          int64_t group_size, at::ScalarType out_dtype) {
  using namespace quant_detail;
  QuantGemmCall c;
  QuantGemmArgs& a = c.args;
  a.fmt = parse_format(fmt);
  const at::ScalarType qt = q_scalar_type(a.fmt);
  TORCH_CHECK_VALUE(qa.dim() == 2, "qa: expected a 2-D tensor [M, K'], got shape ", qa.sizes());
  TORCH_CHECK_VALUE(qw.dim() == 2, "qw: expected a 2-D tensor [N, K'], got shape ", qw.sizes());
  TORCH_CHECK_TYPE(qa.scalar_type() == qt, "qa: expected dtype ", qt, " for fmt '", fmt, "', got ", qa.scalar_type());
  TORCH_CHECK_TYPE(qw.scalar_type() == qt, "qw: expected dtype ", qt, " for fmt '", fmt, "', got ", qw.scalar_type());
  TORCH_CHECK_VALUE(qa.size(1) == qw.size(1), "qw: expected ", qa.size(1), " columns (those of qa), got ", qw.size(1));
  const int64_t M = qa.size(0), N = qw.size(0);
  const int64_t K = a.fmt == QuantFormat::kInt4 ? 2 * qa.size(1) : qa.size(1);
  check_group(K, group_size);
  // a group's integer products are summed exactly in int32 by the GPU kernels (|q| <= 128 for int8, 8 for int4)
  const int64_t max_group = a.fmt == QuantFormat::kInt8 ? kMaxGroupInt8 : kMaxGroupInt4;
  TORCH_CHECK_VALUE(a.fmt == QuantFormat::kFp8E4M3 || group_size <= max_group, "group_size: at most ", max_group,
                    " for fmt '", fmt, "' (a group's products are summed exactly in int32), got ", group_size);
  const int64_t Gn = K / group_size;
  same_device(qw, qa, "qw", "qa");
  same_device(sa, qa, "sa", "qa");
  same_device(sw, qa, "sw", "qa");
  TORCH_CHECK_TYPE(sa.scalar_type() == at::kFloat, "sa: expected dtype float32, got ", sa.scalar_type());
  TORCH_CHECK_TYPE(sw.scalar_type() == at::kFloat, "sw: expected dtype float32, got ", sw.scalar_type());
  TORCH_CHECK_VALUE(sa.dim() == 2 && sa.size(0) == M && sa.size(1) == Gn, "sa: expected shape [", M, ", ", Gn,
                    "], got ", sa.sizes());
  TORCH_CHECK_VALUE(sw.dim() == 2 && sw.size(0) == N && sw.size(1) == Gn, "sw: expected shape [", N, ", ", Gn,
                    "], got ", sw.sizes());
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                   "out_dtype: expected float32, float16 or bfloat16, got ", out_dtype);
  a.M = M;
  a.N = N;
  a.K = K;
  a.group_size = group_size;
  c.qa = qa.contiguous();
  c.qw = qw.contiguous();
  c.sa = sa.contiguous();
  c.sw = sw.contiguous();
  a.qa = c.qa.data_ptr();
  a.qw = c.qw.data_ptr();
  a.sa = c.sa.data_ptr<float>();
  a.sw = c.sw.data_ptr<float>();
  if (bias.has_value()) {
    a.bias_dtype = float_tag(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape [", N, "], got ", bias->sizes());
    same_device(*bias, qa, "bias", "qa");
    c.bias = bias->contiguous();
    a.bias = c.bias.data_ptr();
  }
  TORCH_CHECK_VALUE(lora_act.has_value() == lora_up.has_value(),
                    "lora_act, lora_up: expected both or neither (the low-rank branch's activations and up-projection)");
  a.rank = 0;
  if (lora_act.has_value()) {
    a.lora_act_dtype = float_tag(*lora_act, "lora_act");
    a.lora_up_dtype = float_tag(*lora_up, "lora_up");
    TORCH_CHECK_VALUE(lora_act->dim() == 2 && lora_act->size(0) == M, "lora_act: expected shape [", M,
                      ", R], got ", lora_act->sizes());
    const int64_t R = lora_act->size(1);
    TORCH_CHECK_VALUE(lora_up->dim() == 2 && lora_up->size(0) == R && lora_up->size(1) == N,
                      "lora_up: expected shape [", R, ", ", N, "] ([R, N]), got ", lora_up->sizes());
    same_device(*lora_act, qa, "lora_act", "qa");
    same_device(*lora_up, qa, "lora_up", "qa");
    if (R > 0) {
      c.lora_act = lora_act->contiguous();
      c.lora_up = lora_up->contiguous();
      a.lora_act = c.lora_act.data_ptr();
      a.lora_up = c.lora_up.data_ptr();
      a.rank = R;
    }
  }
  c.out = at::empty({M, N}, qa.options().dtype(out_dtype));
  a.out = c.out.data_ptr();
  a.out_dtype = float_tag(c.out, "out_dtype");
  return c;
}

}  // namespace pydiff
