"""The ``torch.ops.pydiff`` namespace: every op's schema is defined here, once.

The compiled extension ``pydiff._C`` registers the C++ CPU and CUDA kernels for these schemas
(``TORCH_LIBRARY_IMPL`` in csrc/bindings/); the fake (meta) kernels that let
``torch.compile(fullgraph=True)`` trace the ops live next to each op's Python wrapper.  Without the
extension, the wrappers register the Triton launcher (CUDA) and the torch reference (CPU) as the
kernels, so ``torch.ops.pydiff.*`` always exists.
"""
import torch

lib = torch.library.Library("pydiff", "DEF")

SCHEMAS = {
    "solver_step": (
        "solver_step(Tensor x, Tensor? model_cond, Tensor? model_uncond, Tensor[] history, "
        "Tensor? noise, Tensor? row_scale, float[] coeffs, Tensor? coeff_table, Tensor? step, "
        "float clip_lo, float clip_hi, bool write_history=True) -> (Tensor, Tensor)"
    ),
    # the same step, also accumulating x0 statistics in place (x0_stats [2, *x.shape] float64: += d, += d^2)
    "solver_step_track": (
        "solver_step_track(Tensor x, Tensor? model_cond, Tensor? model_uncond, Tensor[] history, "
        "Tensor? noise, Tensor? row_scale, float[] coeffs, Tensor? coeff_table, Tensor? step, "
        "float clip_lo, float clip_hi, bool write_history, Tensor(a!) x0_stats) -> (Tensor, Tensor)"
    ),
    "cfg_rescale": "cfg_rescale(Tensor model_cond, Tensor model_uncond, float guidance, float phi) -> Tensor",
    "sample_categorical": (
        "sample_categorical(Tensor logits, Tensor? threshold, Tensor? row_mask, Tensor seeds, Tensor offsets, "
        "float temperature, bool want_stats=True) -> (Tensor, Tensor, Tensor)"
    ),
    # invertible blocks (pydiff/ops/invertible.py, pydiff/reference/invertible.py)
    "coupling_update": "coupling_update(Tensor x, Tensor f, float a, float b, Tensor? coeffs=None) -> Tensor",
    "coupling_update_": "coupling_update_(Tensor(a!) x, Tensor f, float a, float b, Tensor? coeffs=None) -> ()",
    "coupling_update_fixed": "coupling_update_fixed(Tensor x, Tensor f, float scale, int frac_bits) -> Tensor",
    "coupling_update_fixed_": "coupling_update_fixed_(Tensor(a!) x, Tensor f, float scale, int frac_bits) -> ()",
    "groupnorm_silu": (
        "groupnorm_silu(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps) -> (Tensor, Tensor, Tensor)"
    ),
    "groupnorm_silu_backward": (
        "groupnorm_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
    ),
    # quantized matmuls (pydiff/ops/quant.py, pydiff/reference/quant.py)
    "quantize": (
        "quantize(Tensor x, Tensor? smooth, Tensor? lora_down, Tensor? shift, Tensor? scale, str fmt, "
        "int group_size, str prologue, float eps) -> (Tensor, Tensor, Tensor)"
    ),
    "quant_gemm": (
        "quant_gemm(Tensor qa, Tensor sa, Tensor qw, Tensor sw, Tensor? bias, Tensor? lora_act, Tensor? lora_up, "
        "str fmt, int group_size, ScalarType out_dtype) -> Tensor"
    ),
    # quant_gemm with a GELU / smoothing / quantize epilogue: writes the next layer's (q, scales, lora_act)
    "quant_gemm_quant": (
        "quant_gemm_quant(Tensor qa, Tensor sa, Tensor qw, Tensor sw, Tensor? bias, Tensor? lora_act, "
        "Tensor? lora_up, Tensor? smooth, Tensor? lora_down, str fmt, int group_size, str epilogue, str out_fmt, "
        "int out_group_size) -> (Tensor, Tensor, Tensor)"
    ),
}
for _name, _schema in SCHEMAS.items():
    lib.define(_schema)

# Load the compiled kernels after the schemas exist.
from pydiff import _ext  # noqa: E402,F401
