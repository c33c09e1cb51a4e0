"""DDPM ancestral sampling (Ho, Jain, Abbeel 2020, eq. 6-7) as one fused solver step per model call.

With ``a = alphas_cumprod[t]``, ``a' = alphas_cumprod[t']`` for the next timestep ``t'`` of the
schedule (1 after the last), ``alpha_t = a / a'`` and ``beta_t = 1 - alpha_t``::

    x0 = clamp(x0(x, m))                                   # epsilon / v_prediction / sample
    x' = sqrt(a') beta_t / (1 - a) x0 + sqrt(alpha_t) (1 - a') / (1 - a) x + std z     (z only if t > 0)

``std`` is ``sqrt(max((1 - a') / (1 - a) beta_t, 1e-20))`` (fixed_small), the same through
exp/log (fixed_small_log), or ``sqrt(beta_t)`` (fixed_large).  The noise ``z`` is ``noise=`` or is
drawn from ``generator`` exactly as diffusers' ``DDPMScheduler.step`` draws it (one draw per step
with ``t > 0``, on the model output's device and dtype).  Tensors share one shape ``[B, ...]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pydiff.ops.solver import StepCoeffs
from pydiff.solvers.ddim import (_BETA_KEYS, _SolverBase, fold, prediction_coeffs, randn_like_diffusers,
                                 run_step, spaced_timesteps, train_alphas_cumprod)
from pydiff.solvers._common import Eval, clip_range, vp_x0, check_num_inference_steps

__all__ = ["DDPMSolver"]


class DDPMSolver(_SolverBase):
    """DDPM sampler (diffusers ``DDPMScheduler``), one fused kernel per step.

    ``step(model_output, x, *, model_uncond=None, guidance_scale=1.0, guidance_rescale=0.0,
    noise=None, generator=None, backend=None)`` returns the next sample; ``pred_original_sample``
    holds the (clipped) x0 estimate afterwards.  ``set_timesteps`` also takes custom descending
    ``timesteps=``.  Unsupported: ``thresholding=True``, ``variance_type`` learned /
    learned_range (they need the model's variance channels) and fixed_large_log.
    """

    _defaults = dict(_BETA_KEYS, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                     thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                     sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
                     rescale_betas_zero_snr=False)
    init_noise_sigma = 1.0

    def _check_config(self):
        if self.config.thresholding:
            self._unsupported("thresholding", "dynamic thresholding needs a per-sample quantile")
        if self.config.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            if self.config.variance_type in ("fixed_large_log", "learned", "learned_range"):
                self._unsupported("variance_type", "supported: fixed_small, fixed_small_log, fixed_large")
            self._check_choice("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"))
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check_choice("timestep_spacing", ("linspace", "leading", "trailing"))
        self.alphas_cumprod = train_alphas_cumprod(self.config)

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None) -> None:
        check_num_inference_steps(num_inference_steps)
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.int64)
            if np.any(ts[1:] >= ts[:-1]) or ts[0] >= c.num_train_timesteps:
                raise ValueError(f"timesteps: expected strictly descending values below {c.num_train_timesteps}")
        else:
            ts = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        rows, draws = [], []
        for i, t in enumerate(ts.tolist()):
            prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
            a = float(self.alphas_cumprod[t])
            ap = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
            alpha_t = a / ap
            beta_t = 1.0 - alpha_t
            px, pm, _, _ = prediction_coeffs(c.prediction_type, math.sqrt(a), math.sqrt(1.0 - a), f" (timestep {t})")
            var = max((1.0 - ap) / (1.0 - a) * beta_t, 1e-20)
            std = {"fixed_small": math.sqrt(var), "fixed_small_log": math.exp(0.5 * math.log(var)),
                   "fixed_large": math.sqrt(beta_t)}[c.variance_type] if t > 0 else 0.0
            row = (StepCoeffs().set(px=px, pm=pm)
                   .out(0, d=math.sqrt(ap) * beta_t / (1.0 - a), x=math.sqrt(alpha_t) * (1.0 - ap) / (1.0 - a), z=std)
                   .out(1, d=1.0))
            rows.append(row if c.clip_sample else fold(row))
            draws.append(t > 0)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._rows, self._draws = rows, draws
        self.step_index = 0
        self.pred_original_sample = None

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        pred, clip = self.config.prediction_type, clip_range(self.config)
        evals = []
        for i, t in enumerate(self.timesteps.tolist()):
            evals.append(Eval(t=float(t), in_div=1.0, x0=vp_x0(pred, float(self.alphas_cumprod[t])),
                              coeffs=list(self._rows[i].v), noise=bool(self._draws[i]), clip=clip))
        return evals, 1.0

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond=None, guidance_scale=1.0,
             guidance_rescale=0.0, noise=None, generator=None, backend=None) -> torch.Tensor:
        i = self._need_steps()
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        z = None
        if self._draws[i]:
            z = noise if noise is not None else randn_like_diffusers(
                model_output.shape, generator, model_output.device, model_output.dtype)
        clip = (-self.config.clip_sample_range, self.config.clip_sample_range) if self.config.clip_sample else None
        out, x0 = run_step(self._rows[i], x, model_output, model_uncond, (), z, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, clip=clip, backend=backend)
        self.pred_original_sample = x0
        self.step_index += 1
        return out
