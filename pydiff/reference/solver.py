"""Pure-torch reference of the fused solver step: this file defines what the op means.

Every solver step pydiff ships (DDIM, DDPM, DPM-Solver++ 2M/3M/2M-SDE, PLMS, Euler, Heun, UniPC,
EDICT, DDIM inversion, flow matching) is, per element, the same small linear program with scalar
coefficients that depend only on the schedule and the step index.  With ``u`` and ``c`` the
unconditional and conditional model outputs, ``x`` the current sample, ``h_k`` the history
entries and ``z`` the noise::

    m   = (u + g * (c - u)) * r[b]        # classifier-free guidance (m = c * r[b] without u)
    d   = clamp(px * x + pm * m, lo, hi)  # prediction conversion, e.g. the x0 estimate
    e   = ex * x + em * m + ed * d        # second conversion, e.g. the eps estimate
    out_j = a_j.x * x + a_j.m * m + a_j.d * d + a_j.e * e + a_j.z * z + sum_k a_j.h[k] * h_k

for the two outputs ``j = 0`` (the next sample) and ``j = 1`` (the new history entry).  ``r[b]``
is an optional per-sample scale (guidance rescale, Lin et al. 2023); ``b`` is the index along the
first dimension.  The clamp is skipped when ``lo >= hi`` (use -inf / inf for none).

Coefficients come as one flat float64 vector (see :data:`COEFF_NAMES`, length ``16 + 2K`` for ``K``
history entries); :class:`pydiff.ops.solver.StepCoeffs` builds it by name.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

#: Positions of the scalar coefficients in the flat vector, before the two output rows.
HEAD = ("g", "px", "pm", "ex", "em", "ed")
#: Terms of each output row, followed by one coefficient per history entry.
ROW = ("x", "m", "d", "e", "z")


def num_coeffs(k: int) -> int:
    """Length of the flat coefficient vector for ``k`` history entries."""
    return len(HEAD) + 2 * (len(ROW) + k)


def solver_step_ref(
    x: torch.Tensor,
    model_cond: Optional[torch.Tensor],
    model_uncond: Optional[torch.Tensor],
    history: Sequence[torch.Tensor],
    noise: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    coeffs: Sequence[float] | torch.Tensor,
    clip_lo: float = float("-inf"),
    clip_hi: float = float("inf"),
    compute_dtype: torch.dtype = torch.float64,
    write_history: bool = True,
    x0_stats: Optional[torch.Tensor] = None,
):
    """Evaluate the step in ``compute_dtype`` (float64 by default); outputs are cast to x's dtype.

    Shapes: x, model_cond, model_uncond, noise and every history entry share x's shape
    ``[B, ...]``; row_scale is ``[B]``.  Returns ``(x_next, history_entry)``; with
    ``write_history=False`` the second output is an empty tensor (the kernels skip that write).

    ``x0_stats`` (float64 ``[2, *x.shape]``, optional) is updated in place with the running sums of
    ``d`` and ``d**2`` (the x0 estimate of the step): the per-element variance of x0 over tracked
    steps is ``S2 / n - (S1 / n)**2``, the hallucination score of Aithal et al. 2024 without storing
    the trajectory.
    """
    k = len(history)
    c = torch.as_tensor(coeffs, dtype=torch.float64).tolist() if isinstance(coeffs, torch.Tensor) else list(coeffs)
    if len(c) != num_coeffs(k):
        raise ValueError(f"coeffs: expected {num_coeffs(k)} values for {k} history entries, got {len(c)}")
    g, px, pm, ex, em, ed = c[:6]
    rows = [c[6:6 + 5 + k], c[6 + 5 + k:]]
    f = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
    xx, cc, uu, zz = f(x), f(model_cond), f(model_uncond), f(noise)
    hh = [f(h) for h in history]
    if cc is None:
        m = torch.zeros_like(xx)
    elif uu is None:
        m = cc
    else:
        m = uu + g * (cc - uu)
    if row_scale is not None:
        m = m * row_scale.to(compute_dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    d = px * xx + pm * m
    if clip_lo < clip_hi:
        d = d.clamp(clip_lo, clip_hi)
    if x0_stats is not None:
        d64 = d.to(torch.float64)
        x0_stats[0] += d64
        x0_stats[1] += d64 * d64
    e = ex * xx + em * m + ed * d
    outs = []
    for r in (rows if write_history else rows[:1]):
        o = r[0] * xx + r[1] * m + r[2] * d + r[3] * e
        if zz is not None:
            o = o + r[4] * zz
        for kk in range(k):
            o = o + r[5 + kk] * hh[kk]
        outs.append(o.to(x.dtype))
    return outs[0], (outs[1] if write_history else x.new_empty((0,)))


def cfg_rescale_ref(model_cond: torch.Tensor, model_uncond: torch.Tensor, guidance: float, phi: float) -> torch.Tensor:
    """Per-sample factor of guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", eq. 15-16), as diffusers' ``rescale_noise_cfg`` computes it::

        cfg = u + g (c - u);  r[b] = phi * std(c[b]) / std(cfg[b]) + (1 - phi)

    std is the unbiased standard deviation over all dims but the first.  Returns float32 ``[B]``.
    """
    c = model_cond.double().flatten(1)
    u = model_uncond.double().flatten(1)
    cfg = u + guidance * (c - u)
    r = phi * c.std(dim=1) / cfg.std(dim=1) + (1.0 - phi)
    return r.float()
