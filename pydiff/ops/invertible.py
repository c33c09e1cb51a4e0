"""Invertible-block kernels: coupling updates and fused GroupNorm + SiLU (``torch.ops.pydiff.*``).

Ops (schemas in :mod:`pydiff.ops._library`, definitions in :mod:`pydiff.reference.invertible`):

* ``coupling_update(x, f, a, b, coeffs=None) -> y``: ``y = (a c0) x + (b c1) f``, the additive
  coupling (``a = 1, b = +-1``), its inverse, and IDM's scaled coupling (``coeffs = [v, 1 - v]``, a
  device tensor). fp32 arithmetic, float64 when x or f is float64 (a float64 coupling state with
  fp32/bf16/fp16 block outputs). One read of x and f, one write of y: the byte floor.
  ``coupling_update_`` is the in-place form (``y`` written into x). Differentiable (registered
  autograd, also with respect to ``coeffs``); the in-place form is for no-grad code such as a
  reversible block's forward and its rebuild in backward.
* ``coupling_update_fixed(x, f, scale, frac_bits) -> y``: ``y = x + rint(f scale 2^frac_bits)`` on
  an int64 fixed-point state; ``scale = -1`` undoes ``scale = 1`` bit for bit. In place:
  ``coupling_update_fixed_``.
* ``groupnorm_silu(x, weight, bias, groups, eps) -> (y, mean, rstd)``: ``silu(group_norm(x))``
  with float64 statistics, one kernel pair (two reads of x, one write), and
  ``groupnorm_silu_backward`` (two reads of x and dy, one write of dx). Only x (and the tiny
  mean/rstd) is saved for backward, where eager ``F.silu(F.group_norm(x))`` saves x and the
  normalised activation. :func:`groupnorm_silu` is the differentiable entry point.

Backends: ``cuda`` (csrc/invertible/*_cuda.cu), ``triton`` (triton_kernels/invertible.py), ``cpu``
(csrc/invertible/*_cpu.cpp) and ``torch`` (the reference in the kernels' compute dtype).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pydiff import _ext, backend as _backend
from pydiff.ops._library import lib
from pydiff.reference import invertible as _ref
from pydiff.reference.invertible import (
    coupling_update_fixed_ref,
    coupling_update_ref,
    groupnorm_silu_backward_ref,
    groupnorm_silu_ref,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
__all__ = ["coupling_update", "coupling_update_fixed", "from_fixed", "groupnorm_silu", "groupnorm_silu_forward",
           "groupnorm_silu_backward", "to_fixed"]


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- argument checks
def _resolve(backend: Optional[str], x: torch.Tensor) -> str:
    """The backend of a call on ``x``; on the ``meta`` device the registered op (its fake kernel
    allocates what the compiled kernels do, with no temporaries: what peak-memory models count)."""
    name = _backend.resolve_tensor(backend, x)
    return "cpu" if x.is_meta else name


def _check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {t.dtype}")


def _check_like(name: str, t, x: torch.Tensor) -> None:
    _check_tensor(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (the shape of x), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def _check_inplace(x: torch.Tensor, f: torch.Tensor) -> None:
    if torch._debug_has_internal_overlap(x) == 1:
        raise ValueError("x: expected a tensor without internal overlap (not an expanded view) for an in-place update")
    if torch.is_grad_enabled() and (x.requires_grad or f.requires_grad):
        raise RuntimeError("x: the in-place coupling update is not differentiable; call it under torch.no_grad() "
                           "(a reversible block's forward or rebuild), or use inplace=False")


def check_coupling_args(x, f, a, b, coeffs) -> None:
    """Raise a clear exception for bad input; shared by every backend."""
    _check_tensor("x", x)
    _check_like("f", f, x)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"a, b: expected finite coefficients, got {a}, {b}")
    if coeffs is not None:
        _check_tensor("coeffs", coeffs, (torch.float32, torch.float64))
        if coeffs.numel() != 2:
            raise ValueError(f"coeffs: expected 2 elements [c0, c1], got shape {tuple(coeffs.shape)}")
        if coeffs.device != x.device:
            raise ValueError(f"coeffs: expected device {x.device} (the device of x), got {coeffs.device}")


def check_fixed_args(x, f, scale, frac_bits) -> None:
    _check_tensor("x", x, (torch.int64,))
    _check_like("f", f, x)
    if not isinstance(frac_bits, int) or not 0 <= frac_bits <= 62:
        raise ValueError(f"frac_bits: expected an int in 0..62, got {frac_bits!r}")
    if not math.isfinite(float(scale) * 2.0 ** frac_bits):
        raise ValueError(f"scale: expected a finite number (scale * 2**frac_bits finite), got {scale}")


def check_groupnorm_args(x, weight, bias, groups, eps) -> None:
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape [N, C, *] (at least 2 dimensions), got {tuple(x.shape)}")
    C = x.shape[1]
    if C < 1 or (x.shape[0] > 0 and x.numel() == 0):
        raise ValueError(f"x: expected at least one channel and one element per channel, got shape {tuple(x.shape)}")
    if not isinstance(groups, int) or groups < 1 or C % groups != 0:
        raise ValueError(f"groups: expected a divisor of the {C} channels of x, got {groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_tensor(name, p)
        if p.shape != (C,):
            raise ValueError(f"{name}: expected shape ({C},) (the channels of x), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {p.device}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")


def check_groupnorm_backward_args(grad_y, x, weight, bias, mean, rstd, groups, output_mask) -> None:
    check_groupnorm_args(x, weight, bias, groups, 0.0)
    _check_like("grad_y", grad_y, x)
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y: expected dtype {x.dtype} (the dtype of x), got {grad_y.dtype}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check_tensor(name, t)
        if tuple(t.shape) != (x.shape[0], groups):
            raise ValueError(f"{name}: expected shape ({x.shape[0]}, {groups}) [N, groups] (as the forward returns "
                             f"it), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    if not isinstance(output_mask, (list, tuple)) or len(output_mask) != 3:
        raise ValueError(f"output_mask: expected 3 booleans (grad_x, grad_weight, grad_bias), got {output_mask!r}")


_COMPILED = _backend.COMPILED


# ---------------------------------------------------------------- torch and Triton implementations
def _coupling_torch(x, f, a, b, coeffs=None):
    return coupling_update_ref(x, f, a, b, coeffs).contiguous()


def _coupling_inplace_torch(x, f, a, b, coeffs=None):
    x.copy_(coupling_update_ref(x, f, a, b, coeffs))


def _fixed_torch(x, f, scale, frac_bits):
    return coupling_update_fixed_ref(x, f, scale, frac_bits).contiguous()


def _fixed_inplace_torch(x, f, scale, frac_bits):
    x.copy_(coupling_update_fixed_ref(x, f, scale, frac_bits))


def _gn_torch(x, weight, bias, groups, eps):
    y, mean, rstd = groupnorm_silu_ref(x, weight, bias, groups, eps, compute_dtype=_acc(x))
    return y.contiguous(), mean, rstd


def _gn_backward_torch(grad_y, x, weight, bias, mean, rstd, groups, output_mask):
    gx, gw, gb = groupnorm_silu_backward_ref(grad_y, x, weight, bias, mean, rstd, groups, output_mask,
                                             compute_dtype=torch.float64)
    return gx.contiguous(), gw, gb


def _tk():
    from pydiff.triton_kernels import invertible

    return invertible


def _coupling_triton(x, f, a, b, coeffs=None):
    return _tk().coupling_update_triton(x, f, a, b, coeffs)


def _coupling_inplace_triton(x, f, a, b, coeffs=None):
    if x.is_contiguous():
        same = f.data_ptr() == x.data_ptr() and f.stride() == x.stride() and f.dtype == x.dtype
        shared = f.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        _tk().coupling_update_triton(x, f.clone() if (shared and not same) else f, a, b, coeffs, out=x)
    else:
        x.copy_(_tk().coupling_update_triton(x, f, a, b, coeffs))


def _fixed_triton(x, f, scale, frac_bits):
    return _tk().coupling_update_fixed_triton(x, f, scale, frac_bits)


def _fixed_inplace_triton(x, f, scale, frac_bits):
    if x.is_contiguous():
        _tk().coupling_update_fixed_triton(x, f, scale, frac_bits, out=x)
    else:
        x.copy_(_tk().coupling_update_fixed_triton(x, f, scale, frac_bits))


def _gn_triton(x, weight, bias, groups, eps):
    return _tk().groupnorm_silu_triton(x, weight, bias, groups, eps)


def _gn_backward_triton(grad_y, x, weight, bias, mean, rstd, groups, output_mask):
    return _tk().groupnorm_silu_backward_triton(grad_y, x, weight, bias, mean, rstd, groups, output_mask)


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("pydiff::coupling_update", lib=lib)
def _coupling_fake(x, f, a, b, coeffs=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pydiff::coupling_update_", lib=lib)
def _coupling_inplace_fake(x, f, a, b, coeffs=None):
    return None


@torch.library.register_fake("pydiff::coupling_update_fixed", lib=lib)
def _fixed_fake(x, f, scale, frac_bits):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pydiff::coupling_update_fixed_", lib=lib)
def _fixed_inplace_fake(x, f, scale, frac_bits):
    return None


@torch.library.register_fake("pydiff::groupnorm_silu", lib=lib)
def _gn_fake(x, weight, bias, groups, eps):
    acc = _acc(x)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((x.shape[0], groups), dtype=acc),
            x.new_empty((x.shape[0], groups), dtype=acc))


@torch.library.register_fake("pydiff::groupnorm_silu_backward", lib=lib)
def _gn_backward_fake(grad_y, x, weight, bias, mean, rstd, groups, output_mask):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty((0,))
    gw = torch.empty_like(weight) if (output_mask[1] and weight is not None) else x.new_empty((0,))
    gb = torch.empty_like(bias) if (output_mask[2] and bias is not None) else x.new_empty((0,))
    return gx, gw, gb


if not _ext.has_cpu_kernels():
    # No compiled extension: the ops still exist, backed by the reference (CPU) and Triton (CUDA).
    def _pick(torch_impl, triton_impl):
        return lambda *a: (triton_impl if _backend.triton_available() else torch_impl)(*a)

    for _name, _t, _tr in (("coupling_update", _coupling_torch, _coupling_triton),
                           ("coupling_update_", _coupling_inplace_torch, _coupling_inplace_triton),
                           ("coupling_update_fixed", _fixed_torch, _fixed_triton),
                           ("coupling_update_fixed_", _fixed_inplace_torch, _fixed_inplace_triton),
                           ("groupnorm_silu", _gn_torch, _gn_triton),
                           ("groupnorm_silu_backward", _gn_backward_torch, _gn_backward_triton)):
        lib.impl(_name, _t, "CPU")
        lib.impl(_name, _pick(_t, _tr), "CUDA")


# ---------------------------------------------------------------- autograd
def _coupling_setup(ctx, inputs, output):
    x, f, a, b, coeffs = inputs
    ctx.a, ctx.b = float(a), float(b)
    ctx.x_dtype, ctx.f_dtype = x.dtype, f.dtype
    ctx.cd = torch.float64 if torch.float64 in (x.dtype, f.dtype) else torch.float32
    need_c = coeffs is not None and ctx.needs_input_grad[4]
    ctx.save_for_backward(x if need_c else None, f if need_c else None, coeffs)


def _coupling_backward(ctx, g):
    x, f, coeffs = ctx.saved_tensors
    A = B = None
    if coeffs is not None:
        c = coeffs.reshape(2).to(torch.float64)
        A, B = (ctx.a * c[0]).to(ctx.cd), (ctx.b * c[1]).to(ctx.cd)
    gc = g.to(ctx.cd)
    gx = (gc * (ctx.a if A is None else A)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    gf = (gc * (ctx.b if B is None else B)).to(ctx.f_dtype) if ctx.needs_input_grad[1] else None
    gco = None
    if coeffs is not None and ctx.needs_input_grad[4]:
        g64 = g.to(torch.float64)
        gco = torch.stack([ctx.a * (g64 * x.to(torch.float64)).sum(), ctx.b * (g64 * f.to(torch.float64)).sum()])
        gco = gco.to(coeffs.dtype).reshape(coeffs.shape)
    return gx, gf, None, None, gco


if not _ext.has_cpu_kernels():  # the extension registers the same autograd in C++ (bindings/invertible_autograd.cpp)
    torch.library.register_autograd("pydiff::coupling_update", _coupling_backward, setup_context=_coupling_setup,
                                    lib=lib)


def _gn_setup(ctx, inputs, output):
    x, weight, bias, groups, eps = inputs
    _, mean, rstd = output
    ctx.groups = groups
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _gn_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]) and weight is not None, bool(need[2]) and bias is not None]
    if grad_y is None or not any(mask):
        return None, None, None, None, None
    gx, gw, gb = torch.ops.pydiff.groupnorm_silu_backward(grad_y, x, weight, bias, mean, rstd, ctx.groups, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None)


if not _ext.has_cpu_kernels():
    torch.library.register_autograd("pydiff::groupnorm_silu", _gn_backward, setup_context=_gn_setup, lib=lib)


class _GroupNormSiLU(torch.autograd.Function):
    """Autograd for the Triton and torch backends (the cpu/cuda ops carry registered autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, name):
        fwd = _gn_triton if name == "triton" else _gn_torch
        y, mean, rstd = fwd(x, weight, bias, groups, eps)
        ctx.groups, ctx.name = groups, name
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]) and weight is not None, bool(need[2]) and bias is not None]
        bwd = _gn_backward_triton if ctx.name == "triton" else _gn_backward_torch
        gx, gw, gb = bwd(grad_y, x, weight, bias, mean, rstd, ctx.groups, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None)


# ---------------------------------------------------------------- user entry points
def coupling_update(x: torch.Tensor, f: torch.Tensor, a: float = 1.0, b: float = 1.0, *,
                    coeffs: Optional[torch.Tensor] = None, inplace: bool = False, backend: Optional[str] = None,
                    check: bool = True) -> torch.Tensor:
    """``y = (a c0) x + (b c1) f``: one step of a coupling or of its inverse.

    Args:
        x: the coupling state (any shape), float32/float16/bfloat16/float64.
        f: the block output ``F(.)``, same shape and device; its dtype may differ from x's (a
            float64 state with an fp32 block, say).
        a, b: host coefficients; ``a = 1, b = 1`` is ``x + F``, ``b = -1`` its inverse.
        coeffs: optional 2-element float32/float64 device tensor ``[c0, c1]`` multiplying a and b
            (IDM's learnable ``v``: ``[v, 1 - v]`` forward, ``[1 / v, -(1 - v) / v]`` inverse).
        inplace: write y into x and return x (under ``torch.no_grad()`` only).
        backend: ``cuda``, ``triton``, ``cpu``, ``torch`` or ``auto``.

    Returns:
        y in x's dtype and shape; fp32 arithmetic, float64 when x or f is float64.
    """
    a, b = float(a), float(b)
    if check:
        check_coupling_args(x, f, a, b, coeffs)
        if inplace:
            _check_inplace(x, f)
    name = _resolve(backend, x)
    if not check and name not in _COMPILED:  # check=False skips only what the compiled ops check again
        check_coupling_args(x, f, a, b, coeffs)
        if inplace:
            _check_inplace(x, f)
    if inplace:
        if name in ("cuda", "cpu"):
            torch.ops.pydiff.coupling_update_(x, f, a, b, coeffs)
        elif name == "triton":
            _coupling_inplace_triton(x, f, a, b, coeffs)
        else:
            _coupling_inplace_torch(x, f, a, b, coeffs)
        return x
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.coupling_update(x, f, a, b, coeffs)
    if name == "triton":
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, f, coeffs)):
            return torch.ops.pydiff.coupling_update(x, f, a, b, coeffs)  # differentiable path
        return _coupling_triton(x, f, a, b, coeffs)
    return coupling_update_ref(x, f, a, b, coeffs)


def _check_frac_bits(frac_bits) -> None:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 62:
        raise ValueError(f"frac_bits: expected an int in 0..62, got {frac_bits!r}")


def to_fixed(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """A float tensor as an int64 fixed-point state: ``rint(x * 2**frac_bits)`` (half to even; NaN
    becomes 0 and values beyond ``+-2**62`` saturate, as :func:`coupling_update_fixed` rounds)."""
    _check_tensor("x", x)
    _check_frac_bits(frac_bits)
    return _ref.to_fixed(x, frac_bits)


def from_fixed(q: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value ``q * 2**-frac_bits`` of an int64 fixed-point tensor, in ``dtype`` (a float dtype)."""
    _check_tensor("q", q, (torch.int64,))
    _check_frac_bits(frac_bits)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of float32, float16, bfloat16, float64, got {dtype}")
    return _ref.from_fixed(q, frac_bits, dtype)


def coupling_update_fixed(x: torch.Tensor, f: torch.Tensor, scale: float = 1.0, frac_bits: int = 32, *,
                          inplace: bool = False, backend: Optional[str] = None, check: bool = True) -> torch.Tensor:
    """``y = x + rint(f * scale * 2**frac_bits)`` on an int64 fixed-point state ``x``.

    ``coupling_update_fixed(coupling_update_fixed(x, f, s, k), f, -s, k) == x`` exactly (int64
    arithmetic wraps modulo 2**64, rint rounds half to even, NaN counts as 0).  Convert a float
    state with :func:`to_fixed` / :func:`from_fixed`.  Not differentiable (an integer state).
    """
    def validate():
        check_fixed_args(x, f, scale, frac_bits)
        if inplace and torch._debug_has_internal_overlap(x) == 1:
            raise ValueError("x: expected a tensor without internal overlap (not an expanded view) for an in-place "
                             "update")

    if check:
        validate()
    name = _resolve(backend, x)
    if not check and name not in _COMPILED:  # check=False skips only what the compiled ops check again
        validate()
    scale, frac_bits = float(scale), int(frac_bits)
    if inplace:
        if name in ("cuda", "cpu"):
            torch.ops.pydiff.coupling_update_fixed_(x, f, scale, frac_bits)
        elif name == "triton":
            _fixed_inplace_triton(x, f, scale, frac_bits)
        else:
            _fixed_inplace_torch(x, f, scale, frac_bits)
        return x
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.coupling_update_fixed(x, f, scale, frac_bits)
    if name == "triton":
        return _fixed_triton(x, f, scale, frac_bits)
    return coupling_update_fixed_ref(x, f, scale, frac_bits)


def groupnorm_silu(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, backend: Optional[str] = None,
                   check: bool = True) -> torch.Tensor:
    """``F.silu(F.group_norm(x, groups, weight, bias, eps))``, fused and differentiable.

    x: ``[N, C, *]`` float32/float16/bfloat16/float64 (channels-last inputs are copied to
    contiguous); weight, bias: ``[C]`` or None, any float dtype (fp32 parameters with bf16
    activations are fine; the kernels read them in fp32).  Statistics in float64, the rest in fp32
    (float64 for float64 x); the result has x's dtype, also under autocast (where
    ``F.group_norm`` would return fp32).  Backward saves only x, mean and rstd.
    """
    eps = float(eps)
    if check:
        check_groupnorm_args(x, weight, bias, groups, eps)
    name = _resolve(backend, x)
    if not check and name not in _COMPILED:  # check=False skips only what the compiled ops check again
        check_groupnorm_args(x, weight, bias, groups, eps)
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.groupnorm_silu(x, weight, bias, int(groups), eps)[0]
    return _GroupNormSiLU.apply(x, weight, bias, int(groups), eps, name)


def groupnorm_silu_forward(x, groups: int, weight=None, bias=None, eps: float = 1e-5, *,
                           backend: Optional[str] = None, check: bool = True):
    """``(y, mean, rstd)`` without autograd: mean and rstd are ``[N, G]`` float32 (float64 for
    float64 x), for :func:`groupnorm_silu_backward`."""
    eps = float(eps)
    if check:
        check_groupnorm_args(x, weight, bias, groups, eps)
    name = _resolve(backend, x)
    if not check and name not in _COMPILED:
        check_groupnorm_args(x, weight, bias, groups, eps)
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.groupnorm_silu(x, weight, bias, int(groups), eps)
    return (_gn_triton if name == "triton" else _gn_torch)(x, weight, bias, int(groups), eps)


def groupnorm_silu_backward(grad_y, x, weight, bias, mean, rstd, groups: int, output_mask=(True, True, True), *,
                            backend: Optional[str] = None, check: bool = True):
    """``(grad_x, grad_weight, grad_bias)``; outputs off in ``output_mask`` (or for a None
    parameter) are empty tensors."""
    if check:
        check_groupnorm_backward_args(grad_y, x, weight, bias, mean, rstd, groups, output_mask)
    name = _resolve(backend, x)
    if not check and name not in _COMPILED:
        check_groupnorm_backward_args(grad_y, x, weight, bias, mean, rstd, groups, output_mask)
    mask = [bool(m) for m in output_mask]
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.groupnorm_silu_backward(grad_y, x, weight, bias, mean, rstd, int(groups), mask)
    impl = _gn_backward_triton if name == "triton" else _gn_backward_torch
    return impl(grad_y, x, weight, bias, mean, rstd, int(groups), mask)


def groupnorm_silu_module(norm: torch.nn.GroupNorm, x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(norm(x))`` for an ``nn.GroupNorm`` module (its groups, affine parameters and eps)."""
    return groupnorm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, backend=backend)
