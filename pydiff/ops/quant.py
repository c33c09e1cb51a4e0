"""Quantized-matmul kernels: activation quantization and the W4A4 / W8A8 GEMM (``torch.ops.pydiff.*``).

Ops (schemas in :mod:`pydiff.ops._library`, definitions in :mod:`pydiff.reference.quant`):

* ``quantize(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps) -> (q, scales,
  lora_act)``: one pass over ``x [M, K]``: optional prologue (tanh-GELU, or LayerNorm with adaLN
  ``(1 + scale) * . + shift``), optional per-channel smoothing ``/ smooth``, the low-rank branch's
  down-projection ``lora_act = y @ lora_down`` (SVDQuant), and per-token, per-group symmetric
  quantization to int4 (packed two a byte), int8 or fp8 e4m3 with fp32 scales ``[M, K/G]``.  The
  same op quantizes a weight ``[N, K]`` offline (rows = output channels).
* ``quant_gemm(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype) -> out``:
  ``out = sum_g sa sw (qa qw^T)_g + lora_act @ lora_up + bias``; exact integer group sums (int4,
  int8), fp32 epilogue, output fp32/fp16/bf16.
* ``quant_gemm_quant(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
  epilogue, out_fmt, out_group_size) -> (q, scales, lora_act2)``: the same GEMM (fp32 result), then
  ``gelu_tanh`` (or nothing), ``/ smooth[n]``, the next layer's low-rank down-projection
  ``lora_act2 = y @ lora_down`` (``[N, R2]``, fp32 ``[M, R2]``) and per-token, per-group
  quantization of the output for the next layer (a DiT MLP's fc1 writes fc2's int4 input and its
  SVDQuant branch's activations directly; the 16-bit hidden activations never exist).

Backends: ``cuda`` (csrc/quant/*_cuda.cu: Hopper computes 4-bit data on the INT8 / FP8 tensor
cores, since sm_90 has no 4-bit MMA), ``triton`` (triton_kernels/quant.py: int8 ``tl.dot``, any
GPU), ``cpu`` (csrc/quant/*_cpu.cpp: exact in integers) and ``torch`` (the reference).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from pydiff import _ext, backend as _backend
from pydiff.ops._library import lib
from pydiff.reference.quant import (
    fast_operands_ref,
    FORMATS,
    GROUP_MULTIPLE,
    EPILOGUES,
    PROLOGUES,
    q_cols,
    q_dtype,
    quant_gemm_quant_ref,
    quant_gemm_ref,
    quantize_ref,
)

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
__all__ = ["quantize", "quant_gemm", "quant_gemm_quant", "check_quantize_args", "check_quant_gemm_args",
           "check_quant_gemm_quant_args"]


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_float(name: str, t, device, dtypes=ACT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


_COMPILED = _backend.COMPILED

#: Largest GEMM group sizes whose exact int32 group sums cannot overflow (the GPU kernels sum a group's
#: integer products in int32): G * 128 * 128 < 2**31 for int8, G * 8 * 8 < 2**31 for int4, rounded down
#: to multiples of 32 (csrc/bindings/quant_args.h has the same limits).
MAX_GROUP = {"int8": 131040, "int4": 33554400}


def _check_group(K: int, group_size) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % GROUP_MULTIPLE or K % group_size:
        raise ValueError(f"group_size: expected a positive multiple of {GROUP_MULTIPLE} that divides K = {K}, "
                         f"got {group_size!r}")


def check_quantize_args(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps) -> None:
    """Raise a clear exception for bad input; shared by every backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K] (flatten leading dimensions), got shape {tuple(x.shape)}")
    _check_float("x", x, x.device)
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue: expected one of {PROLOGUES}, got {prologue!r}")
    M, K = x.shape
    _check_group(K, group_size)
    if smooth is not None:
        _check_float("smooth", smooth, x.device)
        if tuple(smooth.shape) != (K,):
            raise ValueError(f"smooth: expected shape ({K},) (the channels of x), got {tuple(smooth.shape)}")
    if lora_down is not None:
        _check_float("lora_down", lora_down, x.device)
        if lora_down.dim() != 2 or lora_down.shape[0] != K:
            raise ValueError(f"lora_down: expected shape [K, R] with K = {K}, got {tuple(lora_down.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        if t is None:
            continue
        if prologue != "layernorm":
            raise ValueError(f"{name}: only used with prologue='layernorm' (adaLN modulation), got prologue={prologue!r}")
        _check_float(name, t, x.device)
        if t.dim() != 2 or t.shape[1] != K or (M % t.shape[0] if t.shape[0] >= 1 else M != 0):  # (M = B = 0: empty)
            raise ValueError(f"{name}: expected shape [B, K] with K = {K} and B dividing M = {M}, got {tuple(t.shape)}")
    if shift is not None and scale is not None and (shift.shape != scale.shape or shift.dtype != scale.dtype):
        raise ValueError(f"scale: expected the shape and dtype of shift {tuple(shift.shape)} {shift.dtype}, got "
                         f"{tuple(scale.shape)} {scale.dtype}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")


def check_quant_gemm_args(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    for name, t in (("qa", qa), ("qw", qw)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype != q_dtype(fmt):
            raise TypeError(f"{name}: expected dtype {q_dtype(fmt)} for fmt={fmt!r}, got {t.dtype}")
    dev = qa.device
    if qw.device != dev:
        raise ValueError(f"qw: expected device {dev} (the device of qa), got {qw.device}")
    if qw.shape[1] != qa.shape[1]:
        raise ValueError(f"qw: expected {qa.shape[1]} columns (those of qa), got shape {tuple(qw.shape)}")
    M, N = qa.shape[0], qw.shape[0]
    K = qa.shape[1] * (2 if fmt == "int4" else 1)
    _check_group(K, group_size)
    if fmt != "fp8" and group_size > MAX_GROUP[fmt]:
        raise ValueError(f"group_size: at most {MAX_GROUP[fmt]} for fmt={fmt!r} (a group's products are summed "
                         f"exactly in int32), got {group_size}")
    Gn = K // group_size
    for name, t, rows in (("sa", sa, M), ("sw", sw, N)):
        _check_float(name, t, dev, (torch.float32,))
        if tuple(t.shape) != (rows, Gn):
            raise ValueError(f"{name}: expected shape ({rows}, {Gn}) (rows x groups), got {tuple(t.shape)}")
    if bias is not None:
        _check_float("bias", bias, dev)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
    if (lora_act is None) != (lora_up is None):
        raise ValueError("lora_act, lora_up: expected both or neither (the low-rank branch's activations and "
                         "up-projection)")
    if lora_act is not None:
        _check_float("lora_act", lora_act, dev)
        _check_float("lora_up", lora_up, dev)
        if lora_act.dim() != 2 or lora_act.shape[0] != M:
            raise ValueError(f"lora_act: expected shape [{M}, R], got {tuple(lora_act.shape)}")
        R = lora_act.shape[1]
        if tuple(lora_up.shape) != (R, N):
            raise ValueError(f"lora_up: expected shape ({R}, {N}) ([R, N]), got {tuple(lora_up.shape)}")
    if out_dtype not in ACT_DTYPES:
        raise TypeError(f"out_dtype: expected {_names(ACT_DTYPES)}, got {out_dtype}")


def check_quant_gemm_quant_args(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
                                 epilogue, out_fmt, out_group_size) -> None:
    check_quant_gemm_args(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, torch.float32)
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {EPILOGUES}, got {epilogue!r}")
    if out_fmt not in FORMATS:
        raise ValueError(f"out_fmt: expected one of {FORMATS}, got {out_fmt!r}")
    N = qw.shape[0]
    if isinstance(out_group_size, bool) or not isinstance(out_group_size, int) or out_group_size <= 0 \
            or out_group_size % GROUP_MULTIPLE or N % out_group_size:
        raise ValueError(f"out_group_size: expected a positive multiple of {GROUP_MULTIPLE} that divides the "
                         f"N = {N} output channels, got {out_group_size!r}")
    if smooth is not None:
        _check_float("smooth", smooth, qa.device)
        if tuple(smooth.shape) != (N,):
            raise ValueError(f"smooth: expected shape ({N},) (the output channels, the consumer's smoothing "
                             f"factors), got {tuple(smooth.shape)}")
    if lora_down is not None:
        _check_float("lora_down", lora_down, qa.device)
        if lora_down.dim() != 2 or lora_down.shape[0] != N:
            raise ValueError(f"lora_down: expected shape [N, R2] with N = {N} (the output channels; the consumer's "
                             f"low-rank down-projection), got {tuple(lora_down.shape)}")


# ---------------------------------------------------------------- torch and Triton implementations
def _quantize_torch(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps):
    q, s, la = quantize_ref(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps)
    return q.contiguous(), s.contiguous(), la.contiguous()


def _gemm_torch(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype):
    return quant_gemm_ref(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype).contiguous()


def _gemm_quant_torch(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue,
                      out_fmt, out_group_size):
    q, s, la = quant_gemm_quant_ref(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
                                    epilogue, out_fmt, out_group_size)
    return q.contiguous(), s.contiguous(), la.contiguous()


PRECISIONS = ("exact", "fast")


def _check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")


def _fast_on_triton(backend: Optional[str], dev: torch.device) -> bool:
    """precision="fast" runs the Triton kernel for backend triton, and for auto / cuda on a GPU; not
    while torch.compile traces (the launcher is plain Python: the torch form keeps the graph whole)."""
    if _backend._compiling():
        return False
    name = _backend.resolve(backend, dev, auto_triton=True)
    return name == "triton" or (name == "cuda" and _backend.triton_usable(dev))


def _gemm_fast_torch(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype):
    """precision="fast" on torch: the reference's fp16 operands, an fp32 matmul, the fp32 epilogue."""
    a16, ra = fast_operands_ref(qa, sa, fmt, group_size)
    w16, rw = fast_operands_ref(qw, sw, fmt, group_size)
    out = (a16.float() @ w16.float().T) * ra[:, None] * rw[None, :]
    if lora_act is not None and lora_up is not None:
        out = out + lora_act.float() @ lora_up.float()
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def _tk():
    from pydiff.triton_kernels import quant

    return quant


def _quantize_triton(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps):
    return _tk().quantize_triton(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps)


def _gemm_triton(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype):
    return _tk().quant_gemm_triton(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype)


def _gemm_quant_triton(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue,
                       out_fmt, out_group_size):
    return _tk().quant_gemm_quant_triton(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
                                         epilogue, out_fmt, out_group_size)


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("pydiff::quantize", lib=lib)
def _quantize_fake(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps):
    M, K = x.shape
    R = 0 if lora_down is None else lora_down.shape[1]
    return (x.new_empty((M, q_cols(fmt, K)), dtype=q_dtype(fmt)), x.new_empty((M, K // group_size), dtype=torch.float32),
            x.new_empty((M, R), dtype=torch.float32))


@torch.library.register_fake("pydiff::quant_gemm", lib=lib)
def _gemm_fake(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype):
    return qa.new_empty((qa.shape[0], qw.shape[0]), dtype=out_dtype)


@torch.library.register_fake("pydiff::quant_gemm_quant", lib=lib)
def _gemm_quant_fake(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue, out_fmt,
                     out_group_size):
    M, N = qa.shape[0], qw.shape[0]
    R2 = 0 if lora_down is None else lora_down.shape[1]
    return (qa.new_empty((M, q_cols(out_fmt, N)), dtype=q_dtype(out_fmt)),
            qa.new_empty((M, N // out_group_size), dtype=torch.float32),
            qa.new_empty((M, R2), dtype=torch.float32))


if not _ext.has_cpu_kernels():
    # No compiled extension: the ops still exist, backed by the reference (CPU) and Triton (CUDA).
    def _pick(torch_impl, triton_impl):
        return lambda *a: (triton_impl if _backend.triton_available() else torch_impl)(*a)

    for _name, _t, _tr in (("quantize", _quantize_torch, _quantize_triton), ("quant_gemm", _gemm_torch, _gemm_triton),
                           ("quant_gemm_quant", _gemm_quant_torch, _gemm_quant_triton)):
        lib.impl(_name, _t, "CPU")
        lib.impl(_name, _pick(_t, _tr), "CUDA")


# ---------------------------------------------------------------- user entry points
def quantize(x: torch.Tensor, fmt: str = "int4", group_size: int = 64, *, smooth: Optional[torch.Tensor] = None,
             lora_down: Optional[torch.Tensor] = None, prologue: str = "none", shift: Optional[torch.Tensor] = None,
             scale: Optional[torch.Tensor] = None, eps: float = 1e-6, backend: Optional[str] = None,
             check: bool = True):
    """Per-token, per-group symmetric quantization: ``(q, scales, lora_act)``.

    Args:
        x: ``[M, K]`` float32/float16/bfloat16 activations (or a weight ``[N, K]``).
        fmt: ``"int4"`` (q: uint8 ``[M, K/2]``, two values a byte, even channel in the low nibble),
            ``"int8"`` (int8 ``[M, K]``) or ``"fp8"`` (float8_e4m3fn ``[M, K]``).
        group_size: channels per scale, a multiple of 32 dividing K (use K for per-token scales).
        smooth: optional ``[K]`` per-channel divisor (SmoothQuant; fold it into the weight).
        lora_down: optional ``[K, R]``: also return ``lora_act = y @ lora_down`` (fp32 ``[M, R]``),
            the down-projection of an SVDQuant low-rank branch, from the same pass.
        prologue: ``"none"``, ``"gelu_tanh"`` or ``"layernorm"`` (no affine; with ``scale``/``shift``
            ``[B, K]`` it is adaLN: ``LN(x) * (1 + scale[b]) + shift[b]``, row m in batch
            ``m // (M / B)``), applied before smoothing, so a DiT block's norm or MLP activation
            writes quantized data directly.
        backend: ``cuda``, ``triton``, ``cpu``, ``torch`` or ``auto``.

    Returns:
        ``q``, ``scales`` (fp32 ``[M, K/G]``; ``amax / QMAX``, NaN for a group holding NaN/inf) and
        ``lora_act``; see :mod:`pydiff.reference.quant` for the exact rounding.
    """
    eps = float(eps)
    if check:
        check_quantize_args(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps)
    dev = x.device
    name = _backend.resolve(backend, dev, auto_triton=dev.type == "cuda" and _is_hopper(_index(dev)))
    if not check and name not in _COMPILED:  # check=False skips only what the compiled ops check again
        check_quantize_args(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps)
    args = (x, smooth, lora_down, shift, scale, fmt, int(group_size), prologue, eps)
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.quantize(*args)
    if name == "triton":
        return _quantize_triton(*args)
    return _quantize_torch(*args)


def _index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _is_hopper(index: int) -> bool:
    """``auto`` runs quant_gemm and quantize on Triton on Hopper (sm_90), as measured on an H100
    (bench/): at 4096 x 3072 x 3072 and x 12288 the Triton GEMM on wgmma ran int8 at 3.2x, fp8 at 5x
    and int4 (e4m3 tensor cores) at 1.1x the CUDA kernel (mma.sync); quantizing bf16 [4096, K] to int4
    groups of 64 took 24.5 us (Triton kernel) vs 51.4 us (CUDA op) at K = 3072 and 66.5 vs 214 us at
    K = 12288."""
    return torch.cuda.get_device_capability(index)[0] == 9


def quant_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, *, fmt: str = "int4",
               group_size: int = 64, bias: Optional[torch.Tensor] = None, lora_act: Optional[torch.Tensor] = None,
               lora_up: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
               backend: Optional[str] = None, check: bool = True, precision: str = "exact") -> torch.Tensor:
    """``out [M, N] = sum_g sa[:, g] sw[:, g]^T * (qa_g @ qw_g^T) + lora_act @ lora_up + bias``.

    ``qa, sa`` come from :func:`quantize` of the activations ``[M, K]``, ``qw, sw`` from
    :func:`quantize` of the weight ``[N, K]`` with the same ``fmt`` and ``group_size``.  The group
    sums are exact integers (int4, int8); the epilogue is fp32; ``out_dtype`` fp32/fp16/bf16.
    ``lora_up`` is ``[R, N]`` (any float dtype), ``bias`` ``[N]``.

    ``precision="fast"`` trades the exact group sums for one accumulation over K: each operand
    element becomes ``fp16(q * fp16(scale / row_max_scale))`` (relative error <= 2^-10, no overflow or
    underflow whatever the activations' range) and the fp16 products are summed in fp32 over all
    of K, ``out = ref_a ref_w^T * sum_k op_a op_w + ...`` (definition:
    :func:`pydiff.reference.quant.quant_gemm_fast_ref`).  On Hopper the exact form must finish and
    fold each group's sum (every 64 channels) before the next, which stalls the tensor cores; the
    fast form is a plain pipelined GEMM.  It runs on Triton (GPU, or the interpreter); without
    Triton, on the ``cpu`` / ``torch`` backends and under ``torch.compile``, on torch (fp32 matmul of
    the fp16 operands).
    """
    if check:
        check_quant_gemm_args(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype)
    dev = qa.device
    if lora_act is not None and lora_act.shape[1] == 0:
        lora_act = lora_up = None
    args = (qa, sa, qw, sw, bias, lora_act, lora_up, fmt, int(group_size), out_dtype)
    if precision != "exact":
        _check_precision(precision)  # (even with check=False: a typo must not fall back to the exact form)
        if not check:  # (the fast form runs on Triton or torch, which have no checks of their own)
            check_quant_gemm_args(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype)
        if _fast_on_triton(backend, dev):
            return _tk().quant_gemm_triton(*args, precision="fast")
        return _gemm_fast_torch(*args)
    name = _backend.resolve(backend, dev, auto_triton=dev.type == "cuda" and _is_hopper(_index(dev)))
    if not check and name not in _COMPILED:
        check_quant_gemm_args(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype)
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.quant_gemm(*args)
    if name == "triton":
        return _gemm_triton(*args)
    return _gemm_torch(*args)


def quant_gemm_quant(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, *, fmt: str = "int4",
                     group_size: int = 64, bias: Optional[torch.Tensor] = None,
                     lora_act: Optional[torch.Tensor] = None, lora_up: Optional[torch.Tensor] = None,
                     epilogue: str = "none", smooth: Optional[torch.Tensor] = None,
                     lora_down: Optional[torch.Tensor] = None, out_fmt: Optional[str] = None,
                     out_group_size: Optional[int] = None, backend: Optional[str] = None, check: bool = True,
                     precision: str = "exact"):
    """The quantized GEMM with its output quantized for the next layer: ``(q, scales, lora_act2)`` of::

        y = quant_gemm(qa, sa, qw, sw, bias=bias, lora_act=lora_act, lora_up=lora_up)  # fp32 [M, N]
        y = gelu_tanh(y) if epilogue == "gelu_tanh" else y
        y = y / smooth                                   # [N], the consumer layer's smoothing factors
        lora_act2 = y @ lora_down                        # [N, R2], the consumer's low-rank down-projection
        q, scales = per-token, per-group (out_group_size) quantization of y to out_fmt

    so a DiT MLP runs ``fc1 -> GELU -> fc2`` as ``quant_gemm_quant(..., epilogue="gelu_tanh",
    lora_down=fc2's)`` followed by ``quant_gemm(q, scales, fc2 weight, lora_act=lora_act2,
    lora_up=fc2's)`` without writing the 16-bit hidden activations.  ``out_fmt`` defaults to ``fmt``
    and ``out_group_size`` (a multiple of 32 dividing N) to ``group_size``.  ``q``: uint8 ``[M, N/2]``
    (int4), int8 / float8_e4m3fn ``[M, N]``; ``scales`` fp32 ``[M, N / out_group_size]``;
    ``lora_act2`` fp32 ``[M, R2]`` (``[M, 0]`` without ``lora_down``), the same value as
    :func:`quantize`'s ``lora_act`` of ``y`` (definition:
    :func:`pydiff.reference.quant.quant_gemm_quant_ref`).

    Backends: ``triton`` is one fused kernel (the GEMM tile's fp32 accumulator goes through the GELU,
    the smoothing and the group quantization in registers, and each tile adds its ``y_tile @
    lora_down[tile rows]`` into ``lora_act2`` with fp32 atomics, so the summation order of
    ``lora_act2`` varies from run to run; groups wider than 256 channels, 128 with ``lora_down``,
    fall back to the GEMM + quantize kernels); ``cpu`` and ``cuda`` compose their GEMM (fp32 result) and quantize kernels
    (deterministic); ``torch`` is the reference.  For CUDA tensors the default (``auto``) picks the
    fused Triton kernel when triton is installed: the CUDA composition writes and re-reads an fp32
    intermediate, which is what the fusion exists to avoid.  ``precision="fast"``: the GEMM of
    :func:`quant_gemm`'s fast form (fused on Triton; elsewhere its torch form, then :func:`quantize`).
    """
    out_fmt = fmt if out_fmt is None else out_fmt
    out_group_size = group_size if out_group_size is None else out_group_size
    if check:
        check_quant_gemm_quant_args(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
                                    epilogue, out_fmt, out_group_size)
    if lora_act is not None and lora_act.shape[1] == 0:
        lora_act = lora_up = None
    if precision != "exact":
        _check_precision(precision)
        if not check:
            check_quant_gemm_quant_args(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
                                        epilogue, out_fmt, out_group_size)
        if _fast_on_triton(backend, qa.device):
            return _tk().quant_gemm_quant_triton(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt,
                                                 int(group_size), epilogue, out_fmt, int(out_group_size),
                                                 precision="fast")
        y = _gemm_fast_torch(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, int(group_size), torch.float32)
        return quantize(y, out_fmt, int(out_group_size), smooth=smooth, lora_down=lora_down,
                        prologue="gelu_tanh" if epilogue == "gelu_tanh" else "none", backend=backend, check=False)
    # auto on CUDA tensors: the fused Triton kernel (the CUDA registration is a GEMM + quantize composition)
    name = _backend.resolve(backend, qa.device, auto_triton=True)
    if not check and name not in _COMPILED:
        check_quant_gemm_quant_args(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size,
                                    epilogue, out_fmt, out_group_size)
    args = (qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, int(group_size), epilogue, out_fmt,
            int(out_group_size))
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.quant_gemm_quant(*args)
    if name == "triton":
        return _gemm_quant_triton(*args)
    return _gemm_quant_torch(*args)
