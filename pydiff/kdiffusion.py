"""k-diffusion style functional samplers, each update one fused :func:`pydiff.solver_step`.

Drop-in for code written against k-diffusion (Crowson, ``k_diffusion.sampling``): the same names,
signatures and model convention.  ``model(x, sigma, **extra_args) -> denoised`` is a denoiser on the
variance-exploding parameterisation ``x = x0 + sigma eps`` returning the x0 estimate; ``sigma`` is a
``[B]`` tensor.  ``sigmas`` is the decreasing noise-level schedule ending in 0 (e.g.
:func:`get_sigmas_karras`).  Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithms 1-2) for Euler / Heun, Lu et al. 2022 (DPM-Solver++, arXiv:2211.01095)
for the DPM-Solver++ variants, written with ``t = -log sigma``, ``h = t_next - t``.

Each update below is one :func:`pydiff.solver_step` per model evaluation: the op's ``m`` is the
denoised output ``D`` (``model_cond``), its history entries are earlier ``D`` (or the step start),
and the coefficients are float64 numbers computed on the host from the sigmas, which are read to
the host once before the loop (``sigmas.tolist()``: one synchronisation if they live on a GPU; pass
them on the CPU to avoid it).  Nothing inside the loop reads device values.

Differences from k-diffusion: the SDE samplers default to independent Gaussian noise per step
(``torch.randn``; k-diffusion's default ``BrownianTreeNoiseSampler`` needs torchsde, and gives
increments with the same distribution); pass ``noise_sampler=`` (``f(sigma, sigma_next) -> noise``)
for any other noise, or ``generator=`` (extra keyword) for reproducible Gaussian noise.  Inputs must
be float32 / float16 / bfloat16 (the fused op's dtypes); the update is computed in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pydiff.ops.solver import FLOAT_DTYPES, StepCoeffs, solver_step
from pydiff.samplers.loop import progress_bar

__all__ = ["append_zero", "get_ancestral_step", "get_sigmas_exponential", "get_sigmas_karras", "to_d",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler",
           "sample_euler_ancestral", "sample_heun"]


# ------------------------------------------------------------------------------------------------
# schedules and helpers (k-diffusion's definitions)
# ------------------------------------------------------------------------------------------------
def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """``n`` sigmas evenly spaced in log sigma from ``sigma_max`` to ``sigma_min``, then 0."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative ``(x - D) / sigma``."""
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.dim() - sigma.dim()))


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """``(sigma_down, sigma_up)`` of an ancestral step: ``sigma_up = min(sigma_to, eta sqrt(sigma_to^2
    (sigma_from^2 - sigma_to^2) / sigma_from^2))``, ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


# ------------------------------------------------------------------------------------------------
# shared loop machinery
# ------------------------------------------------------------------------------------------------
class _Run:
    """Host copy of the sigmas, the device sigmas handed to the model, s_in, progress, noise."""

    def __init__(self, x, sigmas, extra_args, disable, generator=None, noise_sampler=None, name=""):
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError("x: expected a float32, float16 or bfloat16 tensor")
        sig = torch.as_tensor(sigmas)
        if sig.dim() != 1 or sig.numel() < 1:
            raise ValueError(f"sigmas: expected a 1-D schedule, got shape {tuple(sig.shape)}")
        self.s = [float(v) for v in sig.detach().to("cpu", torch.float64).tolist()]  # one host read
        if any(not math.isfinite(v) or v < 0 for v in self.s):
            raise ValueError("sigmas: expected finite non-negative noise levels")
        bad = next((i for i in range(len(self.s) - 1) if not self.s[i] > self.s[i + 1]), None)
        if bad is not None:
            raise ValueError(f"sigmas: expected a strictly decreasing schedule (positive except maybe the last "
                             f"entry), got sigmas[{bad}] = {self.s[bad]} then {self.s[bad + 1]}")
        # the model receives sigmas[i] * s_in exactly as k-diffusion passes it
        self.sig_dev = sig.to(x.device) if isinstance(sigmas, torch.Tensor) else torch.tensor(
            self.s, dtype=torch.float32, device=x.device)
        self.s_in = x.new_ones([x.shape[0]])
        self.extra = {} if extra_args is None else extra_args
        self.n = len(self.s) - 1
        self.bar = progress_bar(self.n, None if disable is None else not disable, name)
        self.gen = generator
        self.noise_sampler = noise_sampler

    def sigma(self, i):
        return self.sig_dev[i] * self.s_in

    def noise(self, x, i):
        if self.noise_sampler is not None:
            z = self.noise_sampler(self.sig_dev[i], self.sig_dev[i + 1])
            return z.to(dtype=x.dtype)
        gd = self.gen.device if self.gen is not None else x.device
        return torch.randn(x.shape, generator=self.gen, device=gd, dtype=torch.float32).to(x.device, x.dtype)

    def tick(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _denoise(model, x, sigma, extra):
    d = model(x, sigma, **extra)
    if d.dtype != x.dtype or not d.is_contiguous():
        d = d.to(x.dtype).contiguous()
    return d


def _lin(x, denoised, history=(), noise=None, *, x_c=1.0, d_c=0.0, h_c=(), z_c=0.0, backend=None):
    """``x_c x + d_c D + sum h_c[k] history[k] + z_c noise`` as one fused step (D = model_cond)."""
    c = StepCoeffs(history=len(history)).out(0, x=x_c, m=d_c, z=z_c, h=list(h_c))
    return solver_step(x, denoised, None, list(history), noise if z_c != 0.0 else None, coeffs=c,
                       backend=backend, write_history=False)[0]


def _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, backend):
    s = run.s[i]
    gamma = min(s_churn / run.n, 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
    sigma_hat = s * (gamma + 1)
    if gamma > 0:
        z = run.noise(x, i)
        x = _lin(x, None, noise=z, z_c=s_noise * (sigma_hat ** 2 - s ** 2) ** 0.5, backend=backend)
        sig_in = run.sig_dev[i] * (gamma + 1) * run.s_in
        sh_dev = run.sig_dev[i] * (gamma + 1)
    else:
        sig_in, sh_dev = run.sigma(i), run.sig_dev[i]
    return x, sigma_hat, sig_in, sh_dev


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, *,
                 generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 with Euler steps: optional churn ``x^ = x + s_noise sqrt(s^^2 -
    s^2) z`` with ``s^ = s (1 + gamma)``, then ``x' = x^ + (s' - s^) (x^ - D(x^, s^)) / s^``."""
    run = _Run(x, sigmas, extra_args, disable, generator, name="euler")
    try:
        for i in range(run.n):
            x, sh, sig_in, sh_dev = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, backend)
            den = _denoise(model, x, sig_in, run.extra)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": run.sig_dev[i], "sigma_hat": sh_dev, "denoised": den})
            dt = run.s[i + 1] - sh
            x = _lin(x, den, x_c=1.0 + dt / sh, d_c=-dt / sh, backend=backend)
            run.tick()
    finally:
        run.close()
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
                           eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, *,
                           generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Ancestral Euler: ``x' = x + (s_down - s) (x - D) / s + s_noise s_up z`` (noise only while
    ``s' > 0``), ``(s_down, s_up) = get_ancestral_step(s, s', eta)``."""
    run = _Run(x, sigmas, extra_args, disable, generator, noise_sampler, name="euler_ancestral")
    try:
        for i in range(run.n):
            s, sn = run.s[i], run.s[i + 1]
            den = _denoise(model, x, run.sigma(i), run.extra)
            down, up = get_ancestral_step(s, sn, eta)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": run.sig_dev[i], "sigma_hat": run.sig_dev[i], "denoised": den})
            dt = down - s
            zc = s_noise * up if sn > 0 else 0.0
            z = run.noise(x, i) if sn > 0 else None
            x = _lin(x, den, noise=z, x_c=1.0 + dt / s, d_c=-dt / s, z_c=zc, backend=backend)
            run.tick()
    finally:
        run.close()
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, *,
                generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 (Heun's 2nd-order method; Euler on the last step to 0)::

        d = (x - D(x, s^)) / s^;  x2 = x + dt d;  d2 = (x2 - D(x2, s')) / s';  x' = x + dt (d + d2) / 2

    The corrector reads ``x`` and ``D(x, s^)`` as history, so ``d`` is never written out.
    """
    run = _Run(x, sigmas, extra_args, disable, generator, name="heun")
    try:
        for i in range(run.n):
            x, sh, sig_in, sh_dev = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, backend)
            den = _denoise(model, x, sig_in, run.extra)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": run.sig_dev[i], "sigma_hat": sh_dev, "denoised": den})
            sn = run.s[i + 1]
            dt = sn - sh
            x2 = _lin(x, den, x_c=1.0 + dt / sh, d_c=-dt / sh, backend=backend)
            if sn != 0:
                den2 = _denoise(model, x2, run.sigma(i + 1), run.extra)
                a, b = 0.5 * dt / sh, 0.5 * dt / sn
                # x' = x + a (x - D) + b (x2 - D2)
                x2 = _lin(x2, den2, [x, den], x_c=b, d_c=-b, h_c=(1.0 + a, -a), backend=backend)
            x = x2
            run.tick()
    finally:
        run.close()
    return x


def _t(s: float) -> float:
    return -math.log(s)


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """DPM-Solver++(2M): ``x' = (s'/s) x - expm1(-h) [(1 + 1/(2r)) D - 1/(2r) D_prev]``, ``r = h_prev / h``
    (first order on the first step and onto sigma = 0)."""
    run = _Run(x, sigmas, extra_args, disable, name="dpmpp_2m")
    old = None
    try:
        for i in range(run.n):
            s, sn = run.s[i], run.s[i + 1]
            den = _denoise(model, x, run.sigma(i), run.extra)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": run.sig_dev[i], "sigma_hat": run.sig_dev[i], "denoised": den})
            if sn == 0:
                x = den  # (s'/s) x - expm1(-inf) D = D
            else:
                h = _t(sn) - _t(s)
                em = -math.expm1(-h)
                if old is None:
                    x = _lin(x, den, x_c=sn / s, d_c=em, backend=backend)
                else:
                    r = (_t(s) - _t(run.s[i - 1])) / h
                    x = _lin(x, den, [old], x_c=sn / s, d_c=em * (1 + 1 / (2 * r)), h_c=(-em / (2 * r),),
                             backend=backend)
            old = den
            run.tick()
    finally:
        run.close()
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Callable, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, solver_type: str = "midpoint", *,
                        generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's form): with ``h = t' - t``, ``eh = eta h``, ``c = -expm1(-h - eh)``::

        x' = (s'/s) e^-eh x + c D + k (D - D_prev) / r + s' sqrt(-expm1(-2 eh)) s_noise z

    with ``k = c / 2`` (midpoint) or ``k = c / (-h - eh) + 1`` (heun), ``r = h_prev / h``, and no
    ``D_prev`` term on the first step; the last step onto sigma = 0 returns ``D``.
    """
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    run = _Run(x, sigmas, extra_args, disable, generator, noise_sampler, name="dpmpp_2m_sde")
    old, h_last, h = None, None, None
    try:
        for i in range(run.n):
            s, sn = run.s[i], run.s[i + 1]
            den = _denoise(model, x, run.sigma(i), run.extra)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": run.sig_dev[i], "sigma_hat": run.sig_dev[i], "denoised": den})
            if sn == 0:
                x = den
            else:
                h = _t(sn) - _t(s)
                eh = eta * h
                c = -math.expm1(-h - eh)
                xc, dc, hist, hc = sn / s * math.exp(-eh), c, [], ()
                if old is not None:
                    r = h_last / h
                    k = 0.5 * c if solver_type == "midpoint" else (c / (-h - eh) + 1.0)
                    dc, hist, hc = c + k / r, [old], (-k / r,)
                zc = sn * math.sqrt(-math.expm1(-2 * eh)) * s_noise if eta else 0.0
                z = run.noise(x, i) if zc != 0.0 else None
                x = _lin(x, den, hist, z, x_c=xc, d_c=dc, h_c=hc, z_c=zc, backend=backend)
            old, h_last = den, h
            run.tick()
    finally:
        run.close()
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Callable, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, *,
                        generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's form): with ``he = h (eta + 1)``,
    ``phi2 = expm1(-he) / he + 1``, ``phi3 = phi2 / he - 1/2``::

        x' = e^-he x - expm1(-he) D + phi2 d1 - phi3 d2 + s' sqrt(-expm1(-2 h eta)) s_noise z

    with ``d1, d2`` the divided differences of the last three ``D`` (``r0 = h_1 / h``,
    ``r1 = h_2 / h``); second order (``phi2 (D - D_1) / r0``) with two, first order with one.
    """
    run = _Run(x, sigmas, extra_args, disable, generator, noise_sampler, name="dpmpp_3m_sde")
    d_1 = d_2 = None
    h_1 = h_2 = None
    h = None
    try:
        for i in range(run.n):
            s, sn = run.s[i], run.s[i + 1]
            den = _denoise(model, x, run.sigma(i), run.extra)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": run.sig_dev[i], "sigma_hat": run.sig_dev[i], "denoised": den})
            if sn == 0:
                x = den
            else:
                h = _t(sn) - _t(s)
                he = h * (eta + 1)
                w = [-math.expm1(-he), 0.0, 0.0]  # on D, D_1, D_2
                phi2 = math.expm1(-he) / he + 1
                if h_2 is not None:
                    r0, r1 = h_1 / h, h_2 / h
                    d10 = (1 / r0, -1 / r0, 0.0)
                    d11 = (0.0, 1 / r1, -1 / r1)
                    diff = [a - b for a, b in zip(d10, d11)]
                    d1 = [a + b * r0 / (r0 + r1) for a, b in zip(d10, diff)]
                    d2 = [b / (r0 + r1) for b in diff]
                    phi3 = phi2 / he - 0.5
                    w = [w[j] + phi2 * d1[j] - phi3 * d2[j] for j in range(3)]
                    hist, hc = [d_2, d_1], (w[2], w[1])
                elif h_1 is not None:
                    r = h_1 / h
                    w = [w[0] + phi2 / r, -phi2 / r, 0.0]
                    hist, hc = [d_1], (w[1],)
                else:
                    hist, hc = [], ()
                zc = sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise if eta else 0.0
                z = run.noise(x, i) if zc != 0.0 else None
                x = _lin(x, den, hist, z, x_c=math.exp(-he), d_c=w[0], h_c=hc, z_c=zc, backend=backend)
            d_1, d_2 = den, d_1
            h_1, h_2 = h, h_1
            run.tick()
    finally:
        run.close()
    return x
