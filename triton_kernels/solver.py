"""Triton kernels of the fused solver step and the guidance-rescale reduction.

Formula: :mod:`pydiff.reference.solver`.  The coefficients travel as a small float64 tensor on the
device (a row of the device table at a device-side step index, or the host values copied once
without blocking), so a launch never synchronises with the host.
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
    HAS_C: tl.constexpr, HAS_U: tl.constexpr, HAS_Z: tl.constexpr, HAS_RS: tl.constexpr, K: tl.constexpr,
    CLIP: tl.constexpr, WRITE_H: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    NC: tl.constexpr = 6 + 2 * (5 + K)
    row = tl.load(step_ptr)
    row = tl.minimum(tl.maximum(row, 0), table_rows - 1)
    cp = table_ptr + row * NC
    R0: tl.constexpr = 6
    R1: tl.constexpr = 6 + 5 + K
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        m = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_U:
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = u + _coef(cp, 0) * (m - u)
        if HAS_RS:
            m = m * tl.load(rs_ptr + offs // inner, mask=mask, other=1.0)
    else:
        m = tl.zeros_like(x)
    d = _coef(cp, 1) * x + _coef(cp, 2) * m
    if CLIP:
        d = tl.where(d < clip_lo, clip_lo, tl.where(d > clip_hi, clip_hi, d))
    if STATS:  # x0 statistics in float64, in place: stats[0] += d, stats[1] += d^2
        dd = d.to(tl.float64)
        s1 = tl.load(stats_ptr + offs, mask=mask, other=0.0)
        tl.store(stats_ptr + offs, s1 + dd, mask=mask)
        s2 = tl.load(stats_ptr + numel + offs, mask=mask, other=0.0)
        tl.store(stats_ptr + numel + offs, s2 + dd * dd, mask=mask)
    e = _coef(cp, 3) * x + _coef(cp, 4) * m + _coef(cp, 5) * d
    o0 = _coef(cp, R0) * x + _coef(cp, R0 + 1) * m + _coef(cp, R0 + 2) * d + _coef(cp, R0 + 3) * e
    o1 = _coef(cp, R1) * x + _coef(cp, R1 + 1) * m + _coef(cp, R1 + 2) * d + _coef(cp, R1 + 3) * e
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 4) * z
        o1 += _coef(cp, R1 + 4) * z
    if K > 0:
        h = tl.load(h0 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 5) * h
        o1 += _coef(cp, R1 + 5) * h
    if K > 1:
        h = tl.load(h1 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 6) * h
        o1 += _coef(cp, R1 + 6) * h
    if K > 2:
        h = tl.load(h2 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 7) * h
        o1 += _coef(cp, R1 + 7) * h
    if K > 3:
        h = tl.load(h3 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 8) * h
        o1 += _coef(cp, R1 + 8) * h
    if K > 4:
        h = tl.load(h4 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 9) * h
        o1 += _coef(cp, R1 + 9) * h
    if K > 5:
        h = tl.load(h5 + offs, mask=mask, other=0.0).to(tl.float32)
        o0 += _coef(cp, R0 + 10) * h
        o1 += _coef(cp, R1 + 10) * h
    tl.store(out_x + offs, o0.to(out_x.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(out_h + offs, o1.to(out_h.dtype.element_ty), mask=mask)


_ZERO_STEP = {}


def _zero_step(device):
    t = _ZERO_STEP.get(device)
    if t is None:
        t = _ZERO_STEP[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


def solver_step_triton(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                       clip_lo, clip_hi, write_history: bool = True, block: int = 1024, x0_stats=None):
    """Launch the Triton solver step; arguments as ``torch.ops.pydiff.solver_step`` (with
    ``x0_stats``: ``torch.ops.pydiff.solver_step_track``, a contiguous float64 ``[2, *x.shape]``
    updated in place)."""
    k = len(history)
    if k > MAX_HISTORY:
        raise ValueError(f"history: expected at most {MAX_HISTORY} entries, got {k}")
    if coeff_table is None:
        host = torch.tensor(list(coeffs), dtype=torch.float64)
        if len(coeffs) != num_coeffs(k):
            raise ValueError(f"coeffs: expected {num_coeffs(k)} values for {k} history entries, got {len(coeffs)}")
        if x.device.type == "cuda":
            host = host.pin_memory()
        coeff_table = host.to(x.device, non_blocking=True).reshape(1, -1)
        step = _zero_step(x.device)
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
        row_scale if row_scale is not None else coeff_table, out_x, out_h if write_history else out_x,
        coeff_table, step.reshape(1), coeff_table.shape[0], n, inner,
        float(clip_lo) if clip else 0.0, float(clip_hi) if clip else 0.0,
        x0_stats if x0_stats is not None else coeff_table,
        HAS_C=cc is not None, HAS_U=uu is not None, HAS_Z=zz is not None, HAS_RS=row_scale is not None, K=k,
        CLIP=clip, WRITE_H=bool(write_history), STATS=x0_stats is not None, BLOCK=block,
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
