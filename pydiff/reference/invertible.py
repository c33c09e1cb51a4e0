"""Pure-torch references of the invertible-block kernels: this file defines what the ops mean.

**Coupling update** (RevNet, Gomez et al. 2017; IDM, Chen et al. 2024)::

    y = A * x + B * f,     A = a * c[0],  B = b * c[1]     (c = coeffs, default [1, 1])

covers the additive coupling ``y1 = x1 + F(x2)`` (``a = b = 1``) and its inverse
``x1 = y1 - F(x2)`` (``b = -1``), and IDM's scaled coupling ``y1 = v x2 + (1 - v) F(x1)``
(``coeffs = [v, 1 - v]``, a device tensor, so a learnable ``v`` never leaves the GPU) and its inverse
``x2 = (y1 - (1 - v) F(x1)) / v`` (``coeffs = [1 / v, -(1 - v) / v]``).  The arithmetic is float64
when ``x`` or ``f`` is float64 (a float64 coupling state carried next to fp32/bf16 blocks), else
fp32; ``y`` has x's dtype and shape.

**Fixed-point coupling update** (MacKay et al. 2018)::

    y = x + q(f),   q(f) = rint(float64(f) * scale * 2**frac_bits)   (int64, wrapping modulo 2**64)

``rint`` rounds half to even, NaN maps to 0 and the result is clamped to ``[-2**62, 2**62]``.
Because ``q`` is odd (``q`` with ``-scale`` is ``-q``), ``update(update(x, f, s), f, -s) == x``
bit for bit, for any ``f`` that the block recomputes identically.  :func:`to_fixed` /
:func:`from_fixed` convert a float state to and from ``frac_bits`` fractional bits.

**GroupNorm + SiLU** (Wu & He 2018; the UNet's most common pair), ``x`` of shape ``[N, C, *]``,
``G`` groups of ``C / G`` channels::

    mean, var = per (n, g) mean and biased variance (float64)
    rstd = 1 / sqrt(var + eps)
    z = (x - mean) * rstd * w[c] + b[c],      y = silu(z) = z * sigmoid(z)

returning ``(y, mean, rstd)`` with ``mean``/``rstd`` of shape ``[N, G]`` in float32 (float64 for a
float64 ``x``).  The backward, with ``s = sigmoid(z)``, ``dz = dy * s * (1 + z * (1 - s))`` and
``xhat = (x - mean) * rstd``::

    grad_b[c] = sum_{n, *} dz,     grad_w[c] = sum_{n, *} dz * xhat
    grad_x = rstd * (w dz - mean_g(w dz) - xhat * mean_g(w dz xhat))
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FIXED_LIMIT = 2 ** 62


# ---------------------------------------------------------------- coupling
def coupling_update_ref(x: torch.Tensor, f: torch.Tensor, a: float = 1.0, b: float = 1.0,
                        coeffs: Optional[torch.Tensor] = None,
                        compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``y = (a c0) x + (b c1) f`` in ``compute_dtype`` (default: float64 if x or f is float64,
    else float32), returned in x's dtype."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if torch.float64 in (x.dtype, f.dtype) else torch.float32
    A = torch.tensor(float(a), dtype=torch.float64, device=x.device)
    B = torch.tensor(float(b), dtype=torch.float64, device=x.device)
    if coeffs is not None:
        c = coeffs.reshape(2).to(torch.float64)
        A, B = A * c[0], B * c[1]
    y = A.to(compute_dtype) * x.to(compute_dtype) + B.to(compute_dtype) * f.to(compute_dtype)
    return y.to(x.dtype)


def fixed_quantize(f: torch.Tensor, scale: float, frac_bits: int) -> torch.Tensor:
    """``q(f) = rint(float64(f) * scale * 2**frac_bits)`` as int64 (NaN -> 0, clamped to +-2**62)."""
    s = float(scale) * 2.0 ** int(frac_bits)
    v = torch.round(f.to(torch.float64) * s)  # torch.round: half to even
    v = torch.nan_to_num(v, nan=0.0).clamp(-float(FIXED_LIMIT), float(FIXED_LIMIT))
    return v.to(torch.int64)


def coupling_update_fixed_ref(x: torch.Tensor, f: torch.Tensor, scale: float, frac_bits: int) -> torch.Tensor:
    """``y = x + q(f)`` in int64 (wrapping)."""
    return x + fixed_quantize(f, scale, frac_bits)


def to_fixed(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """A float tensor as int64 with ``frac_bits`` fractional bits (``rint(x * 2**frac_bits)``)."""
    return fixed_quantize(x, 1.0, frac_bits)


def from_fixed(q: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value ``q * 2**-frac_bits`` of an int64 fixed-point tensor, in ``dtype``."""
    return (q.to(torch.float64) * 2.0 ** -int(frac_bits)).to(dtype)


# ---------------------------------------------------------------- GroupNorm + SiLU
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(p: Optional[torch.Tensor], C: int, ndim: int, dtype, device, default: float) -> torch.Tensor:
    if p is None:
        return torch.full((C,), default, dtype=dtype, device=device).reshape((1, C) + (1,) * (ndim - 2))
    return p.to(dtype).reshape((1, C) + (1,) * (ndim - 2))


def groupnorm_stats_ref(x: torch.Tensor, groups: int, eps: float):
    """Per (n, g) mean and rstd, float64, shape ``[N, G]`` (biased variance)."""
    N, C = x.shape[0], x.shape[1]
    xg = x.to(torch.float64).reshape(N, groups, (C // groups) * math.prod(x.shape[2:]))
    mean = xg.mean(-1)
    var = (xg - mean.unsqueeze(-1)).square().mean(-1)
    return mean, (var + eps).rsqrt()


def groupnorm_silu_ref(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
                       eps: float = 1e-5, compute_dtype: torch.dtype = torch.float64):
    """``(silu(group_norm(x)), mean, rstd)``: statistics in float64, the rest in ``compute_dtype``;
    y in x's dtype, mean/rstd ``[N, G]`` in float32 (float64 for float64 x)."""
    N, C = x.shape[0], x.shape[1]
    mean, rstd = groupnorm_stats_ref(x, groups, eps)
    cd = compute_dtype
    shape = (N, groups, C // groups, math.prod(x.shape[2:]))
    xg = x.to(cd).reshape(shape)
    # the float64 mean as a sum of two compute_dtype numbers keeps x - mean exact-ish in fp32
    m_hi = mean.to(cd)
    m_lo = (mean - m_hi.to(torch.float64)).to(cd)
    xhat = ((xg - m_hi[:, :, None, None]) - m_lo[:, :, None, None]) * rstd.to(cd)[:, :, None, None]
    w = _per_channel(weight, C, 3, cd, x.device, 1.0).reshape(1, groups, C // groups, 1)
    b = _per_channel(bias, C, 3, cd, x.device, 0.0).reshape(1, groups, C // groups, 1)
    z = xhat * w + b
    y = (z * torch.sigmoid(z)).reshape(x.shape).to(x.dtype)
    acc = _acc_dtype(x)
    return y, mean.to(acc), rstd.to(acc)


def groupnorm_silu_backward_ref(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, groups: int,
                                output_mask: Sequence[bool] = (True, True, True),
                                compute_dtype: torch.dtype = torch.float64):
    """``(grad_x, grad_weight, grad_bias)`` from the formulas in the module docstring, in
    ``compute_dtype``; grad_x in x's dtype, the parameter gradients in the parameters' dtypes.
    Outputs not asked for by ``output_mask`` (or without a parameter) are empty tensors."""
    N, C = x.shape[0], x.shape[1]
    cd = compute_dtype
    Cg = C // groups
    shape = (N, groups, Cg, math.prod(x.shape[2:]))
    xg = x.to(cd).reshape(shape)
    dy = grad_y.to(cd).reshape(shape)
    m = mean.to(cd).reshape(N, groups)[:, :, None, None]
    r = rstd.to(cd).reshape(N, groups)[:, :, None, None]
    w = _per_channel(weight, C, 3, cd, x.device, 1.0).reshape(1, groups, Cg, 1)
    b = _per_channel(bias, C, 3, cd, x.device, 0.0).reshape(1, groups, Cg, 1)
    xhat = (xg - m) * r
    z = xhat * w + b
    s = torch.sigmoid(z)
    dz = dy * s * (1 + z * (1 - s))
    gx, gw, gb = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))  # distinct: outputs must not alias
    if output_mask[0]:
        wdz = w * dz
        M = Cg * xg.shape[-1]
        m1 = wdz.sum((2, 3), keepdim=True) / M
        m2 = (wdz * xhat).sum((2, 3), keepdim=True) / M
        gx = (r * (wdz - m1 - xhat * m2)).reshape(x.shape).to(x.dtype)
    if output_mask[1] and weight is not None:
        gw = (dz * xhat).sum((0, 3)).reshape(C).to(weight.dtype)
    if output_mask[2] and bias is not None:
        gb = dz.sum((0, 3)).reshape(C).to(bias.dtype)
    return gx, gw, gb
