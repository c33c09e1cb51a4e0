"""Quantized layers (W4A4 / W8A8), model conversion and timestep-aware calibration for diffusion models.

    from pydiff.quant import QuantConfig, W4A4Linear, quantize_
    layer = W4A4Linear.from_linear(linear, group_size=64, rank=32)       # one layer
    report = quantize_(unet, QuantConfig(fmt="int4"), calibration=run)   # a whole model, in place
    print(report)                                                         # per-layer SQNR, output error

Layers (:mod:`pydiff.quant.layers`) run on the ops of :mod:`pydiff.ops.quant` (``quantize`` with
fused smoothing / low-rank down-projection / LayerNorm-adaLN or GELU prologue, ``quant_gemm`` with
fused dequantization, bias and low-rank up-projection); conversion and calibration are in
:mod:`pydiff.quant.convert` and :mod:`pydiff.quant.calibrate`.
"""
from pydiff.quant.calibrate import Calibrator, sqnr_db
from pydiff.quant.convert import DEFAULT_SKIP, LayerReport, QuantConfig, QuantReport, quantize_
from pydiff.quant.layers import (QuantizedConv2d, QuantizedLayer, QuantizedLinear, W4A4Conv2d, W4A4Linear,
                                 W8A8Conv2d, W8A8Linear, quantized_mlp, smoothing_factors)

__all__ = ["Calibrator", "DEFAULT_SKIP", "LayerReport", "QuantConfig", "QuantReport", "QuantizedConv2d",
           "QuantizedLayer", "QuantizedLinear", "W4A4Conv2d", "W4A4Linear", "W8A8Conv2d", "W8A8Linear",
           "quantize_", "quantized_mlp", "smoothing_factors", "sqnr_db"]
