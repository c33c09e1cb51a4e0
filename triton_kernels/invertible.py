"""Triton kernels of the invertible-block ops (definitions: :mod:`pydiff.reference.invertible`).

* ``coupling_update``: ``y = A x + B f`` elementwise, fp32 or float64 arithmetic; coefficients exact
  in fp32 (the +-1 of every coupling) are scalar kernel arguments, others and those times a device
  ``coeffs`` travel as a float64 device tensor (host values copied without blocking), so a learnable
  IDM ``v`` needs no host synchronisation.
* ``coupling_update_fixed``: ``y = x + rint(f s)`` in int64, rounded half to even with integer
  logic (truncate, then compare the remainder with 1/2), so every backend rounds alike.
* ``groupnorm_silu``: kernel 1, grid (group x split), float64 partial sums of ``x - x0`` and its
  square (fp32 within a block of elements); the ``[N*G, S, 2]`` partials are folded into mean/rstd
  by a few tiny torch ops (device only, no host sync); kernel 2 applies ``silu(xhat w + b)``.
* ``groupnorm_silu_backward``: kernel 1, one program per (n, c) row, float64 sums of ``dz`` and
  ``dz xhat``; per-channel and per-group folds in torch; kernel 2 writes ``dx``.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

_BLOCK = 1024


def _f32_exact(*vals) -> bool:
    """Every value survives a round trip through fp32 (then it can travel as an fp32 scalar argument
    and be widened exactly in the kernel, with no device tensor made per call)."""
    return all(struct.unpack("f", struct.pack("f", float(v)))[0] == float(v) for v in vals)


def _coef_tensor(vals, device, coeffs=None):
    host = torch.tensor([float(v) for v in vals], dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()
    t = host.to(device, non_blocking=True)
    if coeffs is not None:
        t = t * coeffs.reshape(2).to(torch.float64)
    return t


# ---------------------------------------------------------------- coupling
@triton.jit
def _coupling_kernel(x_ptr, f_ptr, y_ptr, ab_ptr, a_s, b_s, numel, F64: tl.constexpr, SCALAR: tl.constexpr,
                     BLOCK: tl.constexpr):
    """SCALAR: the coefficients are the fp32 arguments a_s, b_s (exact: the launcher checks); else
    the two float64 values at ab_ptr."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if F64:
        if SCALAR:
            A = tl.cast(a_s, tl.float64)
            B = tl.cast(b_s, tl.float64)
        else:
            A = tl.load(ab_ptr)
            B = tl.load(ab_ptr + 1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        if SCALAR:
            A = a_s
            B = b_s
        else:
            A = tl.load(ab_ptr).to(tl.float32)
            B = tl.load(ab_ptr + 1).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (A * x + B * f).to(y_ptr.dtype.element_ty), mask=mask)


def coupling_update_triton(x, f, a: float, b: float, coeffs=None, out=None, block: int = _BLOCK):
    """``y = (a c0) x + (b c1) f`` (arguments as ``torch.ops.pydiff.coupling_update``); with
    ``out`` given (a contiguous tensor like x, possibly x itself) the result is written there."""
    xx = x.contiguous()
    ff = f.contiguous()
    y = torch.empty_like(xx) if out is None else out
    n = xx.numel()
    if n == 0:
        return y
    f64 = torch.float64 in (x.dtype, f.dtype)
    # a, b exact in fp32 (the +-1 of every coupling): scalar arguments, no device tensor per call
    scalar = coeffs is None and _f32_exact(a, b)
    ab = xx if scalar else _coef_tensor((a, b), x.device, coeffs)
    _coupling_kernel[(triton.cdiv(n, block),)](xx, ff, y, ab, float(a) if scalar else 0.0,
                                               float(b) if scalar else 0.0, n, F64=f64, SCALAR=scalar, BLOCK=block)
    return y


@triton.jit
def _fixed_kernel(x_ptr, f_ptr, y_ptr, s_ptr, s_s, numel, SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if SCALAR:  # the fp32 argument holds the scale exactly (a power of two times an fp32 value)
        s = tl.cast(s_s, tl.float64)
    else:
        s = tl.load(s_ptr)
    v = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float64) * s
    lim = 4611686018427387904.0  # 2^62
    v = tl.where(v != v, 0.0, v)
    v = tl.minimum(tl.maximum(v, -lim), lim)
    t = v.to(tl.int64)  # toward zero; exact for |v| <= 2^62
    fr = v - t.to(tl.float64)  # exact
    odd = (t & 1) != 0
    up = (fr > 0.5) | ((fr == 0.5) & odd)
    dn = (fr < -0.5) | ((fr == -0.5) & odd)
    q = t + up.to(tl.int64) - dn.to(tl.int64)
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    tl.store(y_ptr + offs, x + q, mask=mask)


def coupling_update_fixed_triton(x, f, scale: float, frac_bits: int, out=None, block: int = _BLOCK):
    """``y = x + rint(f * scale * 2**frac_bits)`` in int64 (arguments as the op)."""
    xx = x.contiguous()
    ff = f.contiguous()
    y = torch.empty_like(xx) if out is None else out
    n = xx.numel()
    if n == 0:
        return y
    sv = float(scale) * 2.0 ** int(frac_bits)
    scalar = _f32_exact(sv)
    s = xx if scalar else _coef_tensor((sv,), x.device)
    _fixed_kernel[(triton.cdiv(n, block),)](xx, ff, y, s, sv if scalar else 0.0, n, SCALAR=scalar, BLOCK=block)
    return y


# ---------------------------------------------------------------- GroupNorm + SiLU
@triton.jit
def _channel(start, offs, g, Cg, HW, CH_BLOCK: tl.constexpr):
    """Channel of the elements at ``offs`` of group ``g``: one per block (a scalar) when every block
    lies inside one channel (``CH_BLOCK``: BLOCK divides HW and the chunk), else per element (a
    64-bit division each)."""
    if CH_BLOCK:
        c = g * Cg + start // HW
    else:
        c = g * Cg + offs // HW
    return c


@triton.jit
def _param(p_ptr, c, m, other, CH_BLOCK: tl.constexpr):
    if CH_BLOCK:
        v = tl.load(p_ptr + c)
    else:
        v = tl.load(p_ptr + c, mask=m, other=other)
    return v


@triton.jit
def _gn_stats_kernel(x_ptr, part_ptr, M, S, CHUNK, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    gi = pid // S
    j = pid % S
    base = x_ptr + gi * M
    if F64:
        shift = tl.load(base).to(tl.float64)
    else:
        shift = tl.load(base).to(tl.float32)
    # float64 accumulators per lane, one reduction at the end (a reduction per block made the loop
    # latency-bound: 331 us on an H100 for 8x256x64x64 fp32, against 48 us for the CUDA kernel)
    a1 = tl.zeros([BLOCK], dtype=tl.float64)
    a2 = tl.zeros([BLOCK], dtype=tl.float64)
    lo = j * CHUNK
    hi = tl.minimum(lo + CHUNK, M)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < hi
        if F64:
            d = tl.where(m, tl.load(base + offs, mask=m, other=0.0).to(tl.float64) - shift, 0.0)
        else:
            d = tl.where(m, tl.load(base + offs, mask=m, other=0.0).to(tl.float32) - shift, 0.0)
        a1 += d.to(tl.float64)
        a2 += (d * d).to(tl.float64)
    tl.store(part_ptr + 2 * pid, tl.sum(a1, 0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(a2, 0))


@triton.jit
def _gn_apply_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, HW, Cg, G, S, CHUNK,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
                     CH_BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    gi = pid // S
    j = pid % S
    g = gi % G
    mean = tl.load(mean_ptr + gi)  # float64
    rstd = tl.load(rstd_ptr + gi)
    if F64:
        mh = mean
        ml = mean * 0.0
        r = rstd
    else:
        mh = mean.to(tl.float32)
        ml = (mean - mh.to(tl.float64)).to(tl.float32)
        r = rstd.to(tl.float32)
    lo = j * CHUNK
    hi = tl.minimum(lo + CHUNK, M)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < hi
        c = _channel(start, offs, g, Cg, HW, CH_BLOCK)
        x = tl.load(x_ptr + gi * M + offs, mask=m, other=0.0)
        x = x.to(tl.float64) if F64 else x.to(tl.float32)
        xh = ((x - mh) - ml) * r
        if HAS_W:
            w = _param(w_ptr, c, m, 1.0, CH_BLOCK)
            xh = xh * w
        if HAS_B:
            xh = xh + _param(b_ptr, c, m, 0.0, CH_BLOCK)
        y = xh / (1.0 + tl.exp(-xh))
        tl.store(y_ptr + gi * M + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def _split(NG: int, M: int, HW: int, block: int, target: int = 1056):
    """``(S, chunk, ch_block)``: splits per group (enough programs to fill a GPU, at least one block of
    work each), their width, and whether every block lies inside one channel (``CH_BLOCK``)."""
    S = max(1, min(-(-target // max(NG, 1)), -(-M // block), 256))
    chunk = -(-M // S)
    chunk = -(-chunk // block) * block
    return -(-M // chunk), chunk, HW % block == 0 and chunk % block == 0


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gn_param(p, acc):
    return None if p is None else p.to(acc).contiguous()


def groupnorm_silu_triton(x, weight, bias, groups: int, eps: float, block: int = _BLOCK):
    """``(y, mean, rstd)`` of fused GroupNorm + SiLU (arguments as ``torch.ops.pydiff.groupnorm_silu``)."""
    xx = x.contiguous()
    N, C = x.shape[0], x.shape[1]
    acc = _acc(x)
    y = torch.empty_like(xx)
    if N == 0:
        e = x.new_empty((0, groups), dtype=acc)
        return y, e, e.clone()
    NG, M = N * groups, xx.numel() // (N * groups)
    HW = M // (C // groups)
    S, chunk, ch_block = _split(NG, M, HW, block)
    part = torch.empty((NG, S, 2), dtype=torch.float64, device=x.device)
    f64 = x.dtype == torch.float64
    _gn_stats_kernel[(NG * S,)](xx, part, M, S, chunk, F64=f64, BLOCK=block)
    s = part.sum(1)
    m = s[:, 0] / M
    var = (s[:, 1] / M - m * m).clamp_min(0.0)
    mean = xx.reshape(NG, M)[:, 0].to(torch.float64) + m
    rstd = (var + float(eps)).rsqrt()
    w, b = _gn_param(weight, acc), _gn_param(bias, acc)
    _gn_apply_kernel[(NG * S,)](xx, w if w is not None else mean, b if b is not None else mean, y, mean, rstd,
                                M, HW, C // groups, groups, S, chunk, HAS_W=w is not None, HAS_B=b is not None,
                                F64=f64, BLOCK=block, CH_BLOCK=ch_block)
    return y, mean.to(acc).reshape(N, groups), rstd.to(acc).reshape(N, groups)


@triton.jit
def _dz_xhat(x, dy, mh, ml, r, w, b):
    xh = ((x - mh) - ml) * r
    z = xh * w + b
    s = 1.0 / (1.0 + tl.exp(-z))
    dz = dy * s * (1.0 + z * (1.0 - s))
    return dz, xh


@triton.jit
def _gn_bwd_reduce_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, A_ptr, B_ptr, C, Cg, HW,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    nc = tl.program_id(0).to(tl.int64)
    n = nc // C
    c = nc % C
    gi = n * (C // Cg) + c // Cg
    mean = tl.load(mean_ptr + gi)
    if F64:
        mh = mean
        ml = mean * 0.0
        r = tl.load(rstd_ptr + gi)
    else:
        mh = mean.to(tl.float32)
        ml = (mean - mh.to(tl.float64)).to(tl.float32)
        r = tl.load(rstd_ptr + gi).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c)
    else:
        w = 1.0
    if HAS_B:
        b = tl.load(b_ptr + c)
    else:
        b = 0.0
    sa = tl.zeros([BLOCK], dtype=tl.float64)  # per lane, reduced once at the end
    sb = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < HW
        x = tl.load(x_ptr + nc * HW + offs, mask=m, other=0.0)
        dy = tl.load(dy_ptr + nc * HW + offs, mask=m, other=0.0)
        if F64:
            x = x.to(tl.float64)
            dy = dy.to(tl.float64)
        else:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        dz, xh = _dz_xhat(x, dy, mh, ml, r, w, b)
        dz = tl.where(m, dz, 0.0)
        sa += dz.to(tl.float64)
        sb += (dz * xh).to(tl.float64)
    tl.store(A_ptr + nc, tl.sum(sa, 0))
    tl.store(B_ptr + nc, tl.sum(sb, 0))


@triton.jit
def _gn_bwd_dx_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, dx_ptr, M, HW, Cg, G, S,
                      CHUNK, HAS_W: tl.constexpr, HAS_B: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
                      CH_BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    gi = pid // S
    j = pid % S
    g = gi % G
    mean = tl.load(mean_ptr + gi)
    rd = tl.load(rstd_ptr + gi).to(tl.float64)
    if F64:
        mh = mean
        ml = mean * 0.0
        r = rd
        c1 = tl.load(c1_ptr + gi)
        c2 = tl.load(c2_ptr + gi)
    else:
        mh = mean.to(tl.float32)
        ml = (mean - mh.to(tl.float64)).to(tl.float32)
        r = rd.to(tl.float32)
        c1 = tl.load(c1_ptr + gi).to(tl.float32)
        c2 = tl.load(c2_ptr + gi).to(tl.float32)
    lo = j * CHUNK
    hi = tl.minimum(lo + CHUNK, M)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < hi
        c = _channel(start, offs, g, Cg, HW, CH_BLOCK)
        x = tl.load(x_ptr + gi * M + offs, mask=m, other=0.0)
        dy = tl.load(dy_ptr + gi * M + offs, mask=m, other=0.0)
        if F64:
            x = x.to(tl.float64)
            dy = dy.to(tl.float64)
        else:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        if HAS_W:
            w = _param(w_ptr, c, m, 1.0, CH_BLOCK)
        else:
            w = 1.0
        if HAS_B:
            b = _param(b_ptr, c, m, 0.0, CH_BLOCK)
        else:
            b = 0.0
        dz, xh = _dz_xhat(x, dy, mh, ml, r, w, b)
        dx = r * w * dz - c1 - c2 * xh
        tl.store(dx_ptr + gi * M + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def groupnorm_silu_backward_triton(grad_y, x, weight, bias, mean, rstd, groups: int, output_mask,
                                   block: int = _BLOCK):
    """``(grad_x, grad_weight, grad_bias)`` (arguments as ``torch.ops.pydiff.groupnorm_silu_backward``)."""
    xx, dy = x.contiguous(), grad_y.contiguous()
    N, C = x.shape[0], x.shape[1]
    acc = _acc(x)
    empty = lambda: x.new_empty((0,))  # noqa: E731  (distinct tensors: outputs must not alias)
    gx = torch.empty_like(xx) if output_mask[0] else empty()
    want_w, want_b = output_mask[1] and weight is not None, output_mask[2] and bias is not None
    if N == 0:
        return (gx, torch.zeros_like(weight) if want_w else empty(), torch.zeros_like(bias) if want_b else empty())
    G, Cg = groups, C // groups
    NG, M = N * G, xx.numel() // (N * G)
    HW = M // Cg
    w, b = _gn_param(weight, acc), _gn_param(bias, acc)
    m64 = mean.reshape(NG).to(torch.float64).contiguous()
    r64 = rstd.reshape(NG).to(torch.float64).contiguous()
    A = torch.empty(N * C, dtype=torch.float64, device=x.device)
    B = torch.empty_like(A)
    f64 = x.dtype == torch.float64
    rb = min(block, max(16, triton.next_power_of_2(HW)))
    _gn_bwd_reduce_kernel[(N * C,)](xx, dy, w if w is not None else m64, b if b is not None else m64, m64, r64, A, B,
                                    C, Cg, HW, HAS_W=w is not None, HAS_B=b is not None, F64=f64, BLOCK=rb)
    gw = B.reshape(N, C).sum(0).to(weight.dtype) if want_w else empty()
    gb = A.reshape(N, C).sum(0).to(bias.dtype) if want_b else empty()
    if output_mask[0]:
        w64 = weight.to(torch.float64) if weight is not None else torch.ones(C, dtype=torch.float64, device=x.device)
        c1 = (A.reshape(N, G, Cg) * w64.reshape(1, G, Cg)).sum(-1).reshape(NG) * r64 / M
        c2 = (B.reshape(N, G, Cg) * w64.reshape(1, G, Cg)).sum(-1).reshape(NG) * r64 / M
        S, chunk, ch_block = _split(NG, M, HW, block)
        _gn_bwd_dx_kernel[(NG * S,)](xx, dy, w if w is not None else m64, b if b is not None else m64, m64, r64, c1,
                                     c2, gx, M, HW, Cg, G, S, chunk, HAS_W=w is not None, HAS_B=b is not None,
                                     F64=f64, BLOCK=block, CH_BLOCK=ch_block)
    return gx, gw, gb
