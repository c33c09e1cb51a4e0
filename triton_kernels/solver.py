"""Triton kernels of the fused solver step and the guidance-rescale reduction.

Formula: :mod:`pydiff.reference.solver`.  Host coefficients travel as fp32 scalar kernel arguments
(nothing is allocated or copied per call); a device table is read at a device-side step index.
Either way a launch never synchronises with the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pydiff.reference.solver import num_coeffs

MAX_HISTORY = 6


@triton.jit
def _coef(cptr, i):
    return tl.load(cptr + i).to(tl.float32)


@triton.jit
def _solver_step_kernel(
    x_ptr, c_ptr, u_ptr, z_ptr, h0, h1, h2, h3, h4, h5, rs_ptr, out_x, out_h,
    table_ptr, step_ptr, table_rows, numel, inner, clip_lo, clip_hi, stats_ptr,
    g, px, pm, ex, em, ed,                                            # head coefficients
    ax, am, ad, ae, az, ah0, ah1, ah2, ah3, ah4, ah5,                 # row 0: the next sample
    bx, bm, bd, be, bz, bh0, bh1, bh2, bh3, bh4, bh5,                 # row 1: the history entry
    HAS_C: tl.constexpr, HAS_U: tl.constexpr, HAS_Z: tl.constexpr, HAS_RS: tl.constexpr, K: tl.constexpr,
    CLIP: tl.constexpr, WRITE_H: tl.constexpr, STATS: tl.constexpr, TABLE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Host coefficients (TABLE = False) arrive as fp32 scalar arguments (no device copy per call);
    with TABLE they are row ``clamp(*step_ptr)`` of the float64 table and the scalars are ignored."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if TABLE:
        NC: tl.constexpr = 6 + 2 * (5 + K)
        row = tl.load(step_ptr)
        row = tl.minimum(tl.maximum(row, 0), table_rows - 1)
        cp = table_ptr + row * NC
        R0: tl.constexpr = 6
        R1: tl.constexpr = 6 + 5 + K
        g, px, pm, ex, em, ed = (_coef(cp, 0), _coef(cp, 1), _coef(cp, 2), _coef(cp, 3), _coef(cp, 4),
                                 _coef(cp, 5))
        ax, am, ad, ae, az = _coef(cp, R0), _coef(cp, R0 + 1), _coef(cp, R0 + 2), _coef(cp, R0 + 3), _coef(cp, R0 + 4)
        bx, bm, bd, be, bz = _coef(cp, R1), _coef(cp, R1 + 1), _coef(cp, R1 + 2), _coef(cp, R1 + 3), _coef(cp, R1 + 4)
        if K > 0:
            ah0, bh0 = _coef(cp, R0 + 5), _coef(cp, R1 + 5)
        if K > 1:
            ah1, bh1 = _coef(cp, R0 + 6), _coef(cp, R1 + 6)
        if K > 2:
            ah2, bh2 = _coef(cp, R0 + 7), _coef(cp, R1 + 7)
        if K > 3:
            ah3, bh3 = _coef(cp, R0 + 8), _coef(cp, R1 + 8)
        if K > 4:
            ah4, bh4 = _coef(cp, R0 + 9), _coef(cp, R1 + 9)
        if K > 5:
            ah5, bh5 = _coef(cp, R0 + 10), _coef(cp, R1 + 10)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        m = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_U:
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = u + g * (m - u)
        if HAS_RS:
            m = m * tl.load(rs_ptr + offs // inner, mask=mask, other=1.0)
    else:
        m = tl.zeros_like(x)
    d = px * x + pm * m
    if CLIP:
        d = tl.where(d < clip_lo, clip_lo, tl.where(d > clip_hi, clip_hi, d))
    if STATS:  # x0 statistics in float64, in place: stats[0] += d, stats[1] += d^2
        dd = d.to(tl.float64)
        s1 = tl.load(stats_ptr + offs, mask=mask, other=0.0)
        tl.store(stats_ptr + offs, s1 + dd, mask=mask)
        s2 = tl.load(stats_ptr + numel + offs, mask=mask, other=0.0)
        tl.store(stats_ptr + numel + offs, s2 + dd * dd, mask=mask)
    e = ex * x + em * m + ed * d
    o0 = ax * x + am * m + ad * d + ae * e
    o1 = bx * x + bm * m + bd * d + be * e
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += az * z
        o1 += bz * z
    if K > 0:
        h = tl.load(h0 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += ah0 * h
        o1 += bh0 * h
    if K > 1:
        h = tl.load(h1 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += ah1 * h
        o1 += bh1 * h
    if K > 2:
        h = tl.load(h2 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += ah2 * h
        o1 += bh2 * h
    if K > 3:
        h = tl.load(h3 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += ah3 * h
        o1 += bh3 * h
    if K > 4:
        h = tl.load(h4 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += ah4 * h
        o1 += bh4 * h
    if K > 5:
        h = tl.load(h5 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += ah5 * h
        o1 += bh5 * h
    tl.store(out_x + offs, o0.to(out_x.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(out_h + offs, o1.to(out_h.dtype.element_ty), mask=mask)


def solver_step_triton(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                       clip_lo, clip_hi, write_history: bool = True, block: int = 1024, x0_stats=None):
    """Launch the Triton solver step; arguments as ``torch.ops.pydiff.solver_step`` (with
    ``x0_stats``: ``torch.ops.pydiff.solver_step_track``, a contiguous float64 ``[2, *x.shape]``
    updated in place)."""
    k = len(history)
    if k > MAX_HISTORY:
        raise ValueError(f"history: expected at most {MAX_HISTORY} entries, got {k}")
    table = coeff_table is not None
    if table:
        scalars = [0.0] * (6 + 2 * (5 + MAX_HISTORY))
    else:
        if len(coeffs) != num_coeffs(k):
            raise ValueError(f"coeffs: expected {num_coeffs(k)} values for {k} history entries, got {len(coeffs)}")
        cf = [float(v) for v in coeffs]
        pad = [0.0] * (MAX_HISTORY - k)
        r0, r1 = cf[6:11 + k], cf[11 + k:]
        scalars = cf[:6] + r0 + pad + r1 + pad  # 6 head + 2 x (5 terms + 6 history weights)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    xx, cc, uu, zz = c(x), c(model_cond), c(model_uncond), c(noise)
    hh = [c(h) for h in history] + [xx] * (MAX_HISTORY - k)
    out_x = torch.empty_like(xx)
    out_h = torch.empty_like(xx) if write_history else xx.new_empty((0,))
    n = xx.numel()
    if n == 0:
        return out_x, out_h
    inner = max(1, n // max(1, x.shape[0]))
    clip = clip_lo < clip_hi
    grid = (triton.cdiv(n, block),)
    _solver_step_kernel[grid](
        xx, cc if cc is not None else xx, uu if uu is not None else xx, zz if zz is not None else xx, *hh,
        row_scale.contiguous() if row_scale is not None else xx, out_x, out_h if write_history else out_x,
        coeff_table.contiguous() if table else xx, step.reshape(1) if table else xx,
        coeff_table.shape[0] if table else 1, n,
        inner, float(clip_lo) if clip else 0.0, float(clip_hi) if clip else 0.0,
        x0_stats if x0_stats is not None else xx, *scalars,
        HAS_C=cc is not None, HAS_U=uu is not None, HAS_Z=zz is not None, HAS_RS=row_scale is not None, K=k,
        CLIP=clip, WRITE_H=bool(write_history), STATS=x0_stats is not None, TABLE=table, BLOCK=block,
    )
    return out_x, out_h


@triton.jit
def _rescale_partial_kernel(c_ptr, u_ptr, part_ptr, inner, g, NBLK: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    s0 = tl.zeros([BLOCK], dtype=tl.float64)
    s1 = tl.zeros([BLOCK], dtype=tl.float64)
    s2 = tl.zeros([BLOCK], dtype=tl.float64)
    s3 = tl.zeros([BLOCK], dtype=tl.float64)
    base = b * inner
    for start in range(j * BLOCK, inner, NBLK * BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < inner
        cv = tl.load(c_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
        uv = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
        fv = uv + g * (cv - uv)
        s0 += cv
        s1 += cv * cv
        s2 += fv
        s3 += fv * fv
    p = part_ptr + (b * NBLK + j) * 4
    tl.store(p, tl.sum(s0, 0))
    tl.store(p + 1, tl.sum(s1, 0))
    tl.store(p + 2, tl.sum(s2, 0))
    tl.store(p + 3, tl.sum(s3, 0))


def cfg_rescale_triton(model_cond, model_uncond, guidance: float, phi: float, nblk: int = 16, block: int = 1024):
    """Per-sample guidance-rescale factor (float32 [B]); partial float64 sums in Triton, the tiny
    [B, nblk, 4] finish in torch (device ops only, no host sync)."""
    c, u = model_cond.contiguous(), model_uncond.contiguous()
    bsz = c.shape[0]
    inner = c.numel() // bsz
    part = torch.empty((bsz, nblk, 4), dtype=torch.float64, device=c.device)
    _rescale_partial_kernel[(bsz, nblk)](c, u, part, inner, float(guidance), NBLK=nblk, BLOCK=block)
    s = part.sum(1)
    n = float(inner)
    var_c = ((s[:, 1] - s[:, 0] * s[:, 0] / n) / (n - 1)).clamp_min(0)
    var_f = ((s[:, 3] - s[:, 2] * s[:, 2] / n) / (n - 1)).clamp_min(0)
    return (phi * var_c.sqrt() / var_f.sqrt() + (1.0 - phi)).float()
