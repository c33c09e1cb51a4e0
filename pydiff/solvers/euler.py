"""Euler and Heun samplers on the sigma (variance-exploding) parameterisation, one fused solver step
per model call (Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithms 1 and 2).

The sample is ``x = x0 + sigma eps`` and the model sees ``x / sqrt(sigma^2 + 1)``
(:meth:`scale_model_input`).  With ``D = x0(x, m)`` the denoised estimate (epsilon:
``x - sigma m``; v_prediction: ``x / (sigma^2 + 1) - sigma m / sqrt(sigma^2 + 1)``; sample: ``m``)::

    Euler:  x' = x + (sigma' - sigma) (x - D) / sigma          (optionally with churn noise, below)
    Heun:   d1 = (x - D(x, sigma)) / sigma;  x~ = x + (sigma' - sigma) d1            # 1st call
            d2 = (x~ - D(x~, sigma')) / sigma';  x' = x + (sigma' - sigma) (d1 + d2) / 2  # 2nd call

Heun's history holds ``x`` (the step's start) and ``d1``; its last step is Euler (sigma' = 0).
Euler's churn (``s_churn > 0``): ``x^ = x + s_noise sqrt(s^2 - sigma^2) z`` with
``s = sigma (1 + gamma)`` before the step, as diffusers' ``EulerDiscreteScheduler`` does.
Schedules (sigmas, Karras / exponential sigmas, timesteps) reproduce diffusers bit for bit.
Tensors share one shape ``[B, ...]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pydiff.ops.solver import StepCoeffs
from pydiff.solvers.ddim import (_BETA_KEYS, _SolverBase, fold, randn_like_diffusers, run_step,
                                 train_alphas_cumprod)
from pydiff.solvers._common import Eval, clip_range, check_num_inference_steps

__all__ = ["EulerSolver", "HeunSolver"]


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep whose log-sigma (linearly interpolated) equals log(sigma)."""
    log_sigma = np.log(np.maximum(np.float64(sigma), 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    lo = int(np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)[0])
    low, high = log_sigmas[lo], log_sigmas[lo + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * lo + w * (lo + 1)


def _sigma_schedule(solver, n: int):
    """(sigmas float64 [n], timesteps float array [n]) as diffusers' Euler / Heun ``set_timesteps``."""
    c = solver.config
    T = c.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps: expected 1..{T} (num_train_timesteps), got {n}")
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif c.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + np.float32(c.steps_offset)
    else:  # trailing
        ts = np.arange(T, 0, -T / n).round().copy().astype(np.float32) - np.float32(1)
    train_sigmas = solver._train_sigmas  # float32, like diffusers' table
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    if c.use_karras_sigmas or c.use_exponential_sigmas:
        s_min = c.sigma_min if c.get("sigma_min") is not None else float(sigmas[-1])
        s_max = c.sigma_max if c.get("sigma_max") is not None else float(sigmas[0])
        if c.use_karras_sigmas:  # Karras et al. 2022, eq. 5, rho = 7
            ramp = np.linspace(0, 1, n)
            lo, hi = s_min ** (1 / 7.0), s_max ** (1 / 7.0)
            sigmas = (hi + ramp * (lo - hi)) ** 7.0
        else:
            sigmas = np.exp(np.linspace(math.log(s_max), math.log(s_min), n))
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    return sigmas, ts


class _SigmaSolver(_SolverBase):
    _defaults = dict(_BETA_KEYS, prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False,
                     use_beta_sigmas=False, timestep_spacing="linspace", steps_offset=0)

    def _check_config(self):
        c = self.config
        if c.use_beta_sigmas:
            self._unsupported("use_beta_sigmas", "needs scipy's beta quantiles; use Karras or exponential sigmas")
        if sum(bool(v) for v in (c.use_karras_sigmas, c.use_exponential_sigmas)) > 1:
            raise ValueError("use only one of use_karras_sigmas and use_exponential_sigmas")
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check_choice("timestep_spacing", ("linspace", "leading", "trailing"))
        ac = torch.from_numpy(self._alphas_cumprod_f32())
        self.alphas_cumprod = ac.double().numpy()
        self._train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()

    def _alphas_cumprod_f32(self) -> np.ndarray:
        return train_alphas_cumprod(self.config).astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: ``max sigma`` (or ``sqrt(max^2 + 1)``, leading)."""
        s = float(np.max(self._sigmas)) if self.timesteps is not None else float(self._train_sigmas.max())
        return s if self.config.timestep_spacing in ("linspace", "trailing") else math.sqrt(s * s + 1.0)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)`` for the current step's sigma (plain torch)."""
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before scale_model_input()")
        s = float(self._sigmas[min(self.step_index, len(self._sigmas) - 1)])
        return sample / math.sqrt(s * s + 1.0)

    def _x0(self, sigma: float):
        """(P, Q) with the denoised estimate D = P x + Q m at noise level sigma."""
        p = self.config.prediction_type
        if p == "epsilon":
            return 1.0, -sigma
        if p == "v_prediction":
            return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        return 0.0, 1.0


class EulerSolver(_SigmaSolver):
    """Euler sampler (diffusers ``EulerDiscreteScheduler``), one fused kernel per step.

    ``step(model_output, x, *, model_uncond=None, guidance_scale=1.0, guidance_rescale=0.0,
    s_churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0, noise=None, generator=None, backend=None)``.
    Supported: ``use_karras_sigmas``, ``use_exponential_sigmas``, ``sigma_min`` / ``sigma_max``,
    ``final_sigmas_type`` zero / sigma_min, ``timestep_type`` continuous (v_prediction),
    ``rescale_betas_zero_snr``.  Unsupported: ``use_beta_sigmas``,
    ``interpolation_type='log_linear'``, custom ``timesteps`` / ``sigmas``.
    """

    _defaults = dict(_SigmaSolver._defaults, interpolation_type="linear", sigma_min=None, sigma_max=None,
                     timestep_type="discrete", rescale_betas_zero_snr=False, final_sigmas_type="zero")

    def _check_config(self):
        if self.config.interpolation_type != "linear":
            if self.config.interpolation_type == "log_linear":
                self._unsupported("interpolation_type", "use 'linear'")
            self._check_choice("interpolation_type", ("linear",))
        self._check_choice("timestep_type", ("discrete", "continuous"))
        self._check_choice("final_sigmas_type", ("zero", "sigma_min"))
        super()._check_config()

    def _alphas_cumprod_f32(self) -> np.ndarray:
        ac = super()._alphas_cumprod_f32()
        if self.config.rescale_betas_zero_snr:
            ac[-1] = 2.0 ** -24  # as diffusers: keeps sigma finite at the last training step
        return ac

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None, sigmas=None) -> None:
        check_num_inference_steps(num_inference_steps)
        if timesteps is not None or sigmas is not None:
            raise NotImplementedError("EulerSolver.set_timesteps: custom timesteps / sigmas are not supported")
        sig, ts = _sigma_schedule(self, num_inference_steps)
        self.set_schedule(np.concatenate([sig, [self.final_sigma()]]), ts, device=device,
                          num_inference_steps=num_inference_steps)

    def final_sigma(self) -> float:
        """The sigma appended after the last step: 0, or the smallest training sigma (``sigma_min``)."""
        if self.config.final_sigmas_type == "sigma_min":
            a0 = torch.tensor(self.alphas_cumprod[0], dtype=torch.float32)
            return float(((1 - a0) / a0) ** 0.5)
        return 0.0

    def set_schedule(self, sigmas, timesteps, device=None, num_inference_steps=None) -> None:
        """Use an explicit schedule: ``sigmas`` (every step's sigma followed by the final one, rounded
        to float32 as diffusers stores them) and ``timesteps`` (one per step, the model's input).
        ``set_timesteps`` builds these from the config; the diffusers drop-in scheduler also passes
        custom ones (diffusers' ``set_timesteps(timesteps=...)`` / ``sigmas=...``)."""
        c = self.config
        self._sigmas = np.asarray(sigmas, dtype=np.float64).astype(np.float32).astype(np.float64)
        n = len(timesteps)
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            self.timesteps = (0.25 * torch.from_numpy(self._sigmas[:n].astype(np.float32)).log()).to(device)
        else:
            self.timesteps = torch.from_numpy(np.asarray(timesteps).astype(np.float32)).to(device)
        self.sigmas = torch.from_numpy(self._sigmas.astype(np.float32))
        self.num_inference_steps = n if num_inference_steps is None else num_inference_steps
        self._tables = {}
        self.step_index = 0
        self.pred_original_sample = None

    def _coeffs(self, i: int, churn):
        key = (i,) + churn
        if key not in self._tables:
            s_churn, s_tmin, s_tmax, s_noise = churn
            sigma, nxt = float(self._sigmas[i]), float(self._sigmas[i + 1])
            gamma = min(s_churn / (len(self._sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sh = sigma * (gamma + 1)
            cz = s_noise * math.sqrt(max(sh * sh - sigma * sigma, 0.0)) if gamma > 0 else 0.0
            p, q = self._x0(sigma)
            if self.config.prediction_type == "epsilon":
                q = -sh
            dt = nxt - sh
            k = 1.0 + (1.0 - p) * dt / sh    # x' = k x^ - q dt / sh m,  x^ = x + cz z
            self._tables[key] = (StepCoeffs().out(0, x=k, z=k * cz, m=-q * dt / sh)
                                 .out(1, x=p, z=p * cz, m=q), gamma > 0)
        return self._tables[key]

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        churn = (float(opts.get("s_churn", 0.0)), float(opts.get("s_tmin", 0.0)),
                 float(opts.get("s_tmax", float("inf"))), float(opts.get("s_noise", 1.0)))
        ts = self.timesteps.tolist()
        evals = []
        for i in range(n):
            coeffs, draws = self._coeffs(i, churn)
            s = float(self._sigmas[i])
            evals.append(Eval(t=float(ts[i]), in_div=math.sqrt(s * s + 1.0), x0=self._x0(s), coeffs=list(coeffs.v),
                              noise=bool(draws)))
        return evals, self.init_noise_sigma

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond=None, guidance_scale=1.0,
             guidance_rescale=0.0, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
             s_noise: float = 1.0, noise=None, generator=None, backend=None) -> torch.Tensor:
        i = self._need_steps()
        coeffs, draws = self._coeffs(i, (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)))
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        z = None
        if draws:
            z = noise if noise is not None else randn_like_diffusers(
                model_output.shape, generator, model_output.device, model_output.dtype)
        out, x0 = run_step(coeffs, x, model_output, model_uncond, (), z, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, backend=backend)
        self.pred_original_sample = x0
        self.step_index += 1
        return out


class HeunSolver(_SigmaSolver):
    """Heun sampler (diffusers ``HeunDiscreteScheduler``): two model calls per step.

    ``timesteps`` repeats each timestep after the first (``2 n - 1`` entries); call ``step`` once
    per entry.  First-order calls (``state_in_first_order``) return the Euler predictor and store
    ``(x, d1)`` as history; second-order calls return the corrected sample.  Supported:
    ``use_karras_sigmas``, ``use_exponential_sigmas``, ``clip_sample``.  Unsupported:
    ``use_beta_sigmas``, ``beta_schedule='exp'``.
    """

    _defaults = dict(_SigmaSolver._defaults, beta_start=0.00085, beta_end=0.012, clip_sample=False,
                     clip_sample_range=1.0)
    order = 2

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        check_num_inference_steps(num_inference_steps, required=True)
        sig, ts = _sigma_schedule(self, num_inference_steps)
        self.set_schedule(sig, ts, device=device, num_inference_steps=num_inference_steps)

    def set_schedule(self, sigmas, timesteps, device=None, num_inference_steps=None) -> None:
        """Use an explicit schedule: one sigma and one timestep per step (the final sigma 0 is
        appended here, and both are repeated for the second-order calls as diffusers does).
        ``set_timesteps`` builds them from the config; the diffusers drop-in scheduler passes
        custom ones (diffusers' ``set_timesteps(timesteps=...)``)."""
        sig, ts = np.asarray(sigmas), timesteps
        num_inference_steps = len(sig) if num_inference_steps is None else num_inference_steps
        s = np.concatenate([sig, [0.0]]).astype(np.float32)
        s = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
        ts = torch.from_numpy(np.asarray(ts))
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(device=device, dtype=torch.float32)
        self._sigmas = s.astype(np.float64)
        self.sigmas = torch.from_numpy(s)
        self.num_inference_steps = num_inference_steps
        rows = self._build_rows(s)
        self._rows = rows if self.config.clip_sample else [fold(r) for r in rows]
        self._hist = None
        self.step_index = 0
        self.pred_original_sample = None

    def _build_rows(self, s) -> list:
        """Coefficient rows of every call for the (repeated) float32 sigmas ``s``."""
        rows = []
        for i in range(len(s) - 1):
            first = i % 2 == 0
            sigma, nxt = (float(s[i]), float(s[i + 1])) if first else (float(s[i - 1]), float(s[i]))
            dt = nxt - sigma
            if first:  # d = D(x, sigma); x~ = x + dt (x - d) / sigma; history entry d1 = (x - d) / sigma
                p, q = self._x0(sigma)
                rows.append(StepCoeffs().set(px=p, pm=q)
                            .out(0, x=1.0 + dt / sigma, d=-dt / sigma).out(1, x=1.0 / sigma, d=-1.0 / sigma))
            else:      # d = D(x~, sigma'); x' = x + dt / 2 d1 + dt / 2 (x~ - d) / sigma'
                p, q = self._x0(nxt)
                h = 0.5 * dt / nxt
                rows.append(StepCoeffs(history=2).set(px=p, pm=q)
                            .out(0, x=h, d=-h, h=[1.0, 0.5 * dt]).out(1, d=1.0))
        return rows

    @property
    def state_in_first_order(self) -> bool:
        return self._hist is None

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        ts = self.timesteps.tolist()
        clip = clip_range(self.config)
        evals = []
        for i in range(len(ts)):
            s = float(self._sigmas[i])
            common = dict(t=float(ts[i]), in_div=math.sqrt(s * s + 1.0), x0=self._x0(s), coeffs=list(self._rows[i].v),
                          clip=clip)
            if i % 2 == 0:  # first order: remember the start, history output = d1
                evals.append(Eval(save=((f"xs{i}", "x"),), write=f"d{i}", **common))
            else:           # second order: reads (start, d1)
                evals.append(Eval(reads=(f"xs{i - 1}", f"d{i - 1}"), **common))
        return evals, self.init_noise_sigma

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond=None, guidance_scale=1.0,
             guidance_rescale=0.0, backend=None) -> torch.Tensor:
        i = self._need_steps()
        clip = (-self.config.clip_sample_range, self.config.clip_sample_range) if self.config.clip_sample else None
        hist = () if self._hist is None else self._hist
        out, aux = run_step(self._rows[i], x, model_output, model_uncond, hist, guidance_scale=guidance_scale,
                            guidance_rescale=guidance_rescale, clip=clip, backend=backend)
        first = self._hist is None
        self._hist = (x, aux) if first else None
        # second-order calls write the x0 estimate as their history output; first-order ones write d1
        self.pred_original_sample = None if first else aux
        self.step_index += 1
        return out
