"""Pure-torch references of the quantization kernels: this file defines what the ops mean.

Two ops, shared by W4A4 (int4), W8A8 int8 and W8A8 fp8 (e4m3):

**quantize** (one pass over the activations; also used offline on a weight ``[N, K]``)::

    y = prologue(x)                       # "none": y = x
                                          # "gelu_tanh": y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                                          # "layernorm": y = (x - mean) / sqrt(var + eps) * (1 + scale[b]) + shift[b]
                                          #   (mean, biased var over the row's K channels; scale/shift [B, K]
                                          #    optional, row m belongs to batch b = m // (M / B): adaLN modulation)
    y = y / smooth[k]                     # optional per-channel smoothing (SmoothQuant / SVDQuant)
    lora_act = y @ lora_down              # optional [K, R] down-projection of a 16-bit low-rank branch (SVDQuant)
    per row m and group g of ``group_size`` consecutive channels:
        amax  = max_k |y[m, k]|           (NaN if any element is NaN)
        scale = amax / QMAX               QMAX = 7 (int4), 127 (int8), 448 (fp8 e4m3)
        q     = 0 where scale == 0 or scale is not finite (then scale is stored as NaN),
                else clamp(rint(y / scale), -QMAX-1, QMAX) for int4/int8 (rint: half to even),
                     e4m3(clamp(y / scale, -448, 448)) for fp8 (round to nearest even)

All arithmetic is fp32 (the LayerNorm statistics float64 here; kernels may use fp32, so prologue
outputs can differ in the last bit and a quantized value by one step at a rounding tie).  Outputs:
``q`` (int4: uint8 ``[M, K/2]``, two values a byte, even channel in the low nibble, two's
complement; int8: int8 ``[M, K]``; fp8: float8_e4m3fn ``[M, K]``), ``scales`` fp32 ``[M, K/G]``,
``lora_act`` fp32 ``[M, R]`` (``[M, 0]`` without ``lora_down``).

**quant_gemm** (the W4A4 / W8A8 matmul with its epilogue)::

    D[m, n, g] = sum_{k in group g} qa[m, k] qw[n, k]      exact integers for int4/int8
    out[m, n]  = sum_g sa[m, g] sw[n, g] D[m, n, g]  +  sum_r lora_act[m, r] lora_up[r, n]  +  bias[n]

with ``qa``/``sa`` from ``quantize`` of the activations ``[M, K]`` and ``qw``/``sw`` from
``quantize`` of the weight ``[N, K]`` (rows = output channels, like ``nn.Linear.weight``).  The
integer products are exact; kernels accumulate the group sums in int32 (``|D| <= G * 128 * 128``)
and the epilogue in fp32, so they agree with this float64 reference to fp32 rounding of the
epilogue.  ``out`` has ``out_dtype`` (fp32, fp16 or bf16).

Papers: Q-Diffusion (Li et al. 2023), QuEST (Wang et al. 2024), SmoothQuant (Xiao et al. 2023),
SVDQuant (Li et al. 2025).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

FORMATS = ("int4", "int8", "fp8")
PROLOGUES = ("none", "gelu_tanh", "layernorm")
QMAX = {"int4": 7.0, "int8": 127.0, "fp8": 448.0}
GROUP_MULTIPLE = 32  # every backend: group_size is a multiple of this and divides K


def q_dtype(fmt: str) -> torch.dtype:
    return {"int4": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]


def q_cols(fmt: str, K: int) -> int:
    """Columns of the stored ``q`` for K channels (int4 packs two a byte)."""
    return K // 2 if fmt == "int4" else K


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integer tensor ``[..., K]`` with values in [-8, 7] -> uint8 ``[..., K/2]`` (even index in the low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"q: expected an even last dimension to pack two int4 values a byte, got {tuple(q.shape)}")
    q = q.to(torch.int16)
    lo, hi = q[..., 0::2] & 0xF, q[..., 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> int8 ``[..., K]`` in [-8, 7]."""
    p = p.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).flatten(-2).to(torch.int8)


def q_values(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """The stored ``q`` as float64 values ``[..., K]`` (exact: every int4/int8/e4m3 value is)."""
    if fmt == "int4":
        return unpack_int4(q).to(torch.float64)
    return q.to(torch.float64)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * x * x * x)))


def prologue_ref(x: torch.Tensor, prologue: str = "none", shift: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """``prologue(x)`` in fp32 (LayerNorm statistics in float64), ``x [M, K]``."""
    y = x.to(torch.float32)
    if prologue == "gelu_tanh":
        return gelu_tanh(y)
    if prologue == "layernorm":
        x64 = x.to(torch.float64)
        mean = x64.mean(dim=1, keepdim=True)
        var = (x64 - mean).square().mean(dim=1, keepdim=True)
        y = ((x64 - mean) * torch.rsqrt(var + eps)).to(torch.float32)
        M = x.shape[0]
        for t, add in ((scale, False), (shift, True)):
            if t is None:
                continue
            rows = t.to(torch.float32).repeat_interleave(M // t.shape[0] if t.shape[0] else 0, dim=0)
            y = y + rows if add else y * (1.0 + rows)
        return y
    return y


def quantize_values(y: torch.Tensor, fmt: str, group_size: int):
    """Per-row, per-group symmetric quantization of fp32 ``y [M, K]`` -> (q in storage format, scales)."""
    M, K = y.shape
    qmax = QMAX[fmt]
    g = y.reshape(M, K // group_size, group_size)
    amax = g.abs().amax(dim=2)
    amax = torch.where(g.isnan().any(dim=2), torch.full_like(amax, float("nan")), amax)
    # a tensor divisor: torch turns division by a Python scalar into a multiply by its reciprocal on
    # CUDA (not correctly rounded); the kernels divide (IEEE), as this does on every device
    scales = amax / torch.full_like(amax, qmax)
    ok = torch.isfinite(scales) & (scales > 0)
    scales = torch.where(torch.isfinite(scales), scales, torch.full_like(scales, float("nan")))
    div = torch.where(ok, scales, torch.ones_like(scales))[:, :, None]
    v = g / div
    if fmt == "fp8":
        v = torch.where(ok[:, :, None], v.clamp(-qmax, qmax), torch.zeros_like(v))
        q = v.reshape(M, K).to(torch.float8_e4m3fn)
    else:
        v = torch.where(ok[:, :, None], torch.round(v).clamp(-qmax - 1, qmax), torch.zeros_like(v))
        q = v.reshape(M, K).to(torch.int8)
        if fmt == "int4":
            q = pack_int4(q)
    return q, scales


def quantize_ref(x: torch.Tensor, smooth: Optional[torch.Tensor] = None, lora_down: Optional[torch.Tensor] = None,
                 shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, fmt: str = "int4",
                 group_size: int = 64, prologue: str = "none", eps: float = 1e-6):
    """``(q, scales, lora_act)`` as the module docstring defines them."""
    return _smooth_down_quantize(prologue_ref(x, prologue, shift, scale, eps), smooth, lora_down, fmt, group_size)


def _smooth_down_quantize(y: torch.Tensor, smooth, lora_down, fmt: str, group_size: int):
    """The shared tail of both quantizing ops: ``y / smooth``, then ``(q, scales)`` of it and its
    low-rank down-projection ``lora_act = y @ lora_down`` (float64 matmul rounded to fp32; ``[M, 0]``
    without ``lora_down``)."""
    if smooth is not None:
        y = y / smooth.to(torch.float32)
    if lora_down is not None:
        lora_act = (y.to(torch.float64) @ lora_down.to(torch.float64)).to(torch.float32)
    else:
        lora_act = y.new_empty((y.shape[0], 0))
    q, scales = quantize_values(y, fmt, group_size)
    return q, scales, lora_act


def dequantize_ref(q: torch.Tensor, scales: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """``q * scale`` per group, float64 ``[M, K]``."""
    v = q_values(q, fmt)
    M, K = v.shape
    return (v.reshape(M, K // group_size, group_size) * scales.to(torch.float64)[:, :, None]).reshape(M, K)


def group_dots_ref(qa: torch.Tensor, qw: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """``D[m, n, g]`` in float64 (exact for int4/int8: every partial sum is an integer below 2^53)."""
    a, w = q_values(qa, fmt), q_values(qw, fmt)
    M, K = a.shape
    N = w.shape[0]
    Gn = K // group_size
    return torch.einsum("mgk,ngk->mng", a.reshape(M, Gn, group_size), w.reshape(N, Gn, group_size))


def quant_gemm_ref(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, lora_act: Optional[torch.Tensor] = None,
                   lora_up: Optional[torch.Tensor] = None, fmt: str = "int4", group_size: int = 64,
                   out_dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
    """``out [M, N]`` in float64 arithmetic, cast to ``out_dtype`` (None: float64).

    Loops over groups (one ``[M, G] x [G, N]`` float64 matmul each) so memory stays ``O(M N)``.
    """
    a, w = q_values(qa, fmt), q_values(qw, fmt)
    M, K = a.shape
    N = w.shape[0]
    sa64, sw64 = sa.to(torch.float64), sw.to(torch.float64)
    out = torch.zeros((M, N), dtype=torch.float64, device=qa.device)
    for g in range(K // group_size):
        sl = slice(g * group_size, (g + 1) * group_size)
        out += (a[:, sl] @ w[:, sl].T) * (sa64[:, g:g + 1] * sw64[:, g][None, :])
    if lora_act is not None and lora_up is not None and lora_act.shape[1] > 0:
        out += lora_act.to(torch.float64) @ lora_up.to(torch.float64)
    if bias is not None:
        out += bias.to(torch.float64)[None, :]
    return out if out_dtype is None else out.to(out_dtype)


def fast_operands_ref(q: torch.Tensor, scales: torch.Tensor, fmt: str, group_size: int):
    """The fp16 operand and fp32 row factor of ``quant_gemm(..., precision="fast")``::

        ref[r]     = max_g |scales[r, g]|              (fp32; 1 where it is 0, so zero rows stay 0)
        ratio[r,g] = fp16(scales[r, g] / ref[r])       (fp32 IEEE division, rounded to fp16; |ratio| <= 1)
        op[r, k]   = fp16(q[r, k] * ratio[r, k // G])  (one correctly rounded fp16 multiply)

    ``op`` is within 2^-10 (relative: two roundings) of the dequantized value / ``ref``; normalizing
    by the row's largest scale keeps every element within fp16's range whatever the activations'
    magnitude (only groups below 2^-14 of their row's largest reach fp16's subnormals: absolute error
    < 2^-24 ref there).  Returns ``(op [R, K] float16, ref [R] float32)``."""
    v = q_values(q, fmt).to(torch.float32)
    s = scales.to(torch.float32)
    ref = s.abs().amax(dim=1) if s.shape[1] else torch.ones(s.shape[0], device=s.device)
    ref = torch.where(s.isnan().any(dim=1), torch.full_like(ref, float("nan")), ref)  # (amax may skip NaN)
    ref = torch.where(ref == 0, torch.ones_like(ref), ref)
    ratio = (s / ref[:, None]).to(torch.float16).to(torch.float32).repeat_interleave(group_size, dim=1)
    return (v * ratio).to(torch.float16), ref  # the fp32 product of an fp16 and a small integer is exact


def quant_gemm_fast_ref(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, lora_act: Optional[torch.Tensor] = None,
                        lora_up: Optional[torch.Tensor] = None, fmt: str = "int4", group_size: int = 64,
                        out_dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
    """``quant_gemm(..., precision="fast")`` in float64 arithmetic: one fp16 operand per side
    (:func:`fast_operands_ref`), summed over all K at once instead of exact per-group integer sums::

        out[m, n] = ref_a[m] ref_w[n] sum_k op_a[m, k] op_w[n, k] + lora_act @ lora_up + bias

    It differs from :func:`quant_gemm_ref` by the fp16 roundings of each operand (<= 2^-10 relative
    per operand); in exchange the GEMM is one accumulation over K, which the tensor cores pipeline
    without the per-group wait-and-fold of the exact form."""
    a16, ra = fast_operands_ref(qa, sa, fmt, group_size)
    w16, rw = fast_operands_ref(qw, sw, fmt, group_size)
    out = (a16.to(torch.float64) @ w16.to(torch.float64).T) * (ra.to(torch.float64)[:, None] * rw.to(torch.float64)[None, :])
    if lora_act is not None and lora_up is not None and lora_act.shape[1] > 0:
        out += lora_act.to(torch.float64) @ lora_up.to(torch.float64)
    if bias is not None:
        out += bias.to(torch.float64)[None, :]
    return out if out_dtype is None else out.to(out_dtype)


EPILOGUES = ("none", "gelu_tanh")


def quant_gemm_quant_ref(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, lora_act: Optional[torch.Tensor] = None,
                         lora_up: Optional[torch.Tensor] = None, smooth: Optional[torch.Tensor] = None,
                         lora_down: Optional[torch.Tensor] = None, fmt: str = "int4", group_size: int = 64,
                         epilogue: str = "none", out_fmt: str = "int4", out_group_size: int = 64):
    """**quant_gemm_quant**: a quantized GEMM whose output is written quantized for the next layer::

        y = quant_gemm(qa, sa, qw, sw, bias, lora_act, lora_up)   # [M, N], float64 rounded to fp32
        y = gelu_tanh(y)                                           # epilogue "gelu_tanh" (fp32); "none": y
        y = y / smooth[n]                                          # optional [N]: the consumer's smoothing
        lora_act2 = y @ lora_down                                  # optional [N, R2]: the consumer's
                                                                   #   low-rank down-projection (SVDQuant)
        (q, scales) = quantize_values(y, out_fmt, out_group_size)  # per row, per group of out_group_size

    (DiT MLP: fc1 -> GELU -> int4 + scales + lora_act2 consumed by fc2's ``quant_gemm``; the 16-bit
    fc1 output never exists.)  ``lora_act2`` is exactly ``quantize_ref``'s ``lora_act`` of ``y``:
    the unquantized fp32 ``y`` (after the division by ``smooth``) times ``lora_down``, a float64
    matmul rounded to fp32.  ``N % out_group_size == 0``.  Returns ``q`` (``out_fmt`` storage,
    ``[M, N/2]`` for int4), fp32 ``scales [M, N / out_group_size]`` and fp32 ``lora_act2 [M, R2]``
    (``[M, 0]`` without ``lora_down``).  Kernels compute ``y`` with an fp32 epilogue, so ``y`` may
    differ in the last bits, a quantized value by one step at a tie, and ``lora_act2`` by the fp32
    rounding of its N-term sums.
    """
    y = quant_gemm_ref(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, torch.float32)
    if epilogue == "gelu_tanh":
        y = gelu_tanh(y)
    return _smooth_down_quantize(y, smooth, lora_down, out_fmt, out_group_size)
