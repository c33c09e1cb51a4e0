"""EDICT: exact diffusion inversion via coupled transformations (Wallace, Gokul, Naik 2022,
arXiv:2211.12446, eq. 8-13), as fused solver steps.

Two coupled sequences ``(x, y)`` (both start as the same latent).  With ``A = alphas_cumprod``,
``t`` the current timestep, ``t' = t - T // n`` the next (``A[t'] = `` final alpha when ``t' < 0``),
``a_t = sqrt(A[t'] / A[t])`` and ``b_t = sqrt(1 - A[t']) - a_t sqrt(1 - A[t])`` (the DDIM step
``x' = a_t x + b_t eps``), a denoising step is::

    x_i = a_t x + b_t eps(y, t)                  # denoise_first   (one op call)
    y_i = a_t y + b_t eps(x_i, t)                # denoise_second  (one op call: y_i and the mixing)
    x'  = p x_i + (1 - p) y_i
    y'  = p y_i + (1 - p) x'

and its exact inverse (from ``(x', y')`` at ``t'`` back to ``(x, y)`` at ``t``)::

    y_i = (y' - (1 - p) x') / p;   x_i = (x' - (1 - p) y_i) / p     # invert_start (x_i only)
    y   = (y_i - b_t eps(x_i, t)) / a_t                             # invert_first
    x   = (x_i - b_t eps(y, t)) / a_t                               # invert_second (+ next x_i)

Only epsilon prediction.  The paper's equations are implemented as written (no "leapfrog"
alternation of the two sequences; ``leapfrog_steps=True`` raises).  ``mixing_coeff`` is ``p``
(default 0.93).  Tensors share one shape ``[B, ...]``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from pydiff.solvers._common import check_num_inference_steps

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.solvers.ddim import _BETA_KEYS, _SolverBase, run_step, spaced_timesteps, train_alphas_cumprod

__all__ = ["EDICTSolver"]


class EDICTSolver(_SolverBase):
    """EDICT sampler and inverter over a DDIM schedule (the config keys of ``DDIMScheduler``).

    Generation (``timesteps``, descending)::

        x, y = latents, latents.clone()
        for t in solver.timesteps:
            x_i = solver.denoise_first(eps(y, t), x)
            x, y = solver.denoise_second(eps(x_i, t), y, x_i)

    Inversion (``inverse_timesteps``, ascending)::

        x_i = solver.invert_start(x, y)
        for t in solver.inverse_timesteps:
            y = solver.invert_first(eps(x_i, t), x, y)
            x, x_i = solver.invert_second(eps(y, t), x_i, y)

    Every method takes ``model_uncond=``, ``guidance_scale=``, ``guidance_rescale=`` and
    ``backend=`` like the other steppers.  :meth:`generate` and :meth:`invert` run these loops with a
    callable ``model(sample, t)`` returning eps or ``(eps_cond, eps_uncond)``.  ``clip_sample``
    is ignored (EDICT forms no x0 estimate); ``thresholding=True`` raises.
    """

    _defaults = dict(_BETA_KEYS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                     thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                     timestep_spacing="leading", rescale_betas_zero_snr=False, mixing_coeff=0.93,
                     leapfrog_steps=False)
    init_noise_sigma = 1.0

    def _check_config(self):
        c = self.config
        if c.prediction_type != "epsilon":
            self._unsupported("prediction_type", "EDICT's coupled DDIM steps take epsilon predictions")
        if c.thresholding:
            self._unsupported("thresholding")
        if c.leapfrog_steps:
            self._unsupported("leapfrog_steps", "the paper's equations, without alternation, are implemented")
        if not 0.0 < float(c.mixing_coeff) <= 1.0:
            raise ValueError(f"mixing_coeff: expected 0 < p <= 1, got {c.mixing_coeff}")
        self._check_choice("timestep_spacing", ("linspace", "leading", "trailing"))
        self.alphas_cumprod = train_alphas_cumprod(c)
        self.final_alpha_cumprod = 1.0 if c.set_alpha_to_one else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        check_num_inference_steps(num_inference_steps, required=True)
        c = self.config
        ts = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device)
        self.inverse_timesteps = self.timesteps.flip(0)
        p = float(c.mixing_coeff)
        q = 1.0 - p
        # Unmixing: x_i = ux * x' + uy * y'  (y_i = (y' - q x') / p, x_i = (x' - q y_i) / p).
        ux, uy = 1.0 / p + q * q / (p * p), -q / (p * p)
        self._unmix = StepCoeffs(history=1).out(0, x=ux, h=[uy])
        gen, inv = [], []
        for t in ts.tolist():
            prev = t - c.num_train_timesteps // num_inference_steps
            A = float(self.alphas_cumprod[t])
            Ap = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
            a = math.sqrt(Ap / A)
            b = math.sqrt(1.0 - Ap) - a * math.sqrt(1.0 - A)
            first = StepCoeffs().out(0, x=a, m=b)
            # x: y, m: eps(x_i), h0: x_i.  y_i = a y + b m;  x' = p x_i + q y_i;  y' = (p + q^2) y_i + p q x_i
            second = (StepCoeffs(history=1).out(0, x=q * a, m=q * b, h=[p])
                      .out(1, x=(p + q * q) * a, m=(p + q * q) * b, h=[p * q]))
            # x: y', h0: x', m: eps(x_i).  y = (y' - q x') / (p a) - b / a m
            ifirst = StepCoeffs(history=1).out(0, x=1.0 / (p * a), m=-b / a, h=[-q / (p * a)])
            # x: x_i, h0: y, m: eps(y).  x = (x_i - b m) / a;  next x_i = ux x + uy y
            isecond = (StepCoeffs(history=1).out(0, x=1.0 / a, m=-b / a)
                       .out(1, x=ux / a, m=-ux * b / a, h=[uy]))
            gen.append((first, second))
            inv.append((ifirst, isecond))
        self._gen, self._inv = gen, inv[::-1]
        self.step_index = 0
        self.invert_index = 0

    # ---- generation ----------------------------------------------------------------------------
    def _gen_row(self):
        if self.timesteps is None:
            raise RuntimeError("EDICTSolver: call set_timesteps() first")
        if self.step_index >= len(self._gen):
            raise IndexError(f"EDICTSolver: generation step {self.step_index} is past the schedule "
                             f"({len(self._gen)} steps); call set_timesteps() again")
        return self._gen[self.step_index]

    def denoise_first(self, model_output, x, *, model_uncond=None, guidance_scale=1.0, guidance_rescale=0.0,
                      backend=None) -> torch.Tensor:
        """``x_i = a_t x + b_t eps(y, t)``; ``model_output`` is eps evaluated on ``y``."""
        out, _ = run_step(self._gen_row()[0], x, model_output, model_uncond, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, backend=backend)
        return out

    def denoise_second(self, model_output, y, x_inter, *, model_uncond=None, guidance_scale=1.0,
                       guidance_rescale=0.0, backend=None):
        """``(x', y')`` from ``y``, ``x_i`` and eps evaluated on ``x_i`` (y's DDIM step and the mixing)."""
        out = run_step(self._gen_row()[1], y, model_output, model_uncond, [x_inter], guidance_scale=guidance_scale,
                       guidance_rescale=guidance_rescale, backend=backend)
        self.step_index += 1
        return out

    # ---- inversion -----------------------------------------------------------------------------
    def _inv_row(self):
        if self.timesteps is None:
            raise RuntimeError("EDICTSolver: call set_timesteps() first")
        if self.invert_index >= len(self._inv):
            raise IndexError(f"EDICTSolver: inversion step {self.invert_index} is past the schedule "
                             f"({len(self._inv)} steps); call invert_start() or set_timesteps() again")
        return self._inv[self.invert_index]

    def invert_start(self, x, y, *, backend=None) -> torch.Tensor:
        """Start an inversion: resets ``invert_index`` and returns the first ``x_i`` (the unmixing)."""
        if self.timesteps is None:
            raise RuntimeError("EDICTSolver: call set_timesteps() first")
        self.invert_index = 0
        out, _ = solver_step(x, None, None, [y], None, coeffs=self._unmix, backend=backend)
        return out

    def invert_first(self, model_output, x, y, *, model_uncond=None, guidance_scale=1.0, guidance_rescale=0.0,
                     backend=None) -> torch.Tensor:
        """``y`` one step noisier, from ``(x', y')`` and eps evaluated on ``x_i``."""
        out, _ = run_step(self._inv_row()[0], y, model_output, model_uncond, [x], guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, backend=backend)
        return out

    def invert_second(self, model_output, x_inter, y, *, model_uncond=None, guidance_scale=1.0,
                      guidance_rescale=0.0, backend=None):
        """``(x, next x_i)``: x one step noisier from ``x_i`` and eps evaluated on the new ``y``."""
        out = run_step(self._inv_row()[1], x_inter, model_output, model_uncond, [y], guidance_scale=guidance_scale,
                       guidance_rescale=guidance_rescale, backend=backend)
        self.invert_index += 1
        return out

    # ---- whole loops -----------------------------------------------------------------------------
    @staticmethod
    def _call(model: Callable, sample, t):
        r = model(sample, t)
        return (r[0], r[1]) if isinstance(r, (tuple, list)) else (r, None)

    def generate(self, model: Callable, x: torch.Tensor, y: torch.Tensor = None, **kw):
        """Run the remaining generation steps; ``model(sample, t)`` returns eps or ``(cond, uncond)``."""
        y = x.clone() if y is None else y
        while self.step_index < len(self._gen):
            t = self.timesteps[self.step_index]
            c, u = self._call(model, y, t)
            xi = self.denoise_first(c, x, model_uncond=u, **kw)
            c, u = self._call(model, xi, t)
            x, y = self.denoise_second(c, y, xi, model_uncond=u, **kw)
        return x, y

    def invert(self, model: Callable, x: torch.Tensor, y: torch.Tensor = None, **kw):
        """Invert ``(x, y)`` (default ``y = x``) from the least noisy level to the noisiest."""
        y = x.clone() if y is None else y
        xi = self.invert_start(x, y, backend=kw.get("backend"))
        for t in self.inverse_timesteps:
            c, u = self._call(model, xi, t)
            y = self.invert_first(c, x, y, model_uncond=u, **kw)
            c, u = self._call(model, y, t)
            x, xi = self.invert_second(c, xi, y, model_uncond=u, **kw)
        return x, y
