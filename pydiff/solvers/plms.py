"""PLMS: the pseudo linear multistep sampler of PNDM (Liu, Ren, Lin, Zhao 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds", eq. 9 and 12) as one fused solver step per model call.

The transfer from ``t`` to ``t'`` (``a = alphas_cumprod[t]``, ``a'`` likewise) applied to a
combined eps ``E``::

    x' = sqrt(a' / a) x - (a' - a) E / (a sqrt(1 - a') + sqrt(a (1 - a) a'))

with ``E`` the 4th-order Adams-Bashforth mix of the newest model outputs ``e_k``
(``(55 e0 - 59 e1 + 37 e2 - 9 e3) / 24``) after a warm-up exactly like diffusers'
``PNDMScheduler(skip_prk_steps=True)``: the first timestep is evaluated twice; the second call
averages both outputs and restarts from the stored first sample, then 2nd and 3rd order
Adams-Bashforth steps follow.  For ``v_prediction`` the mix is of raw outputs and
``E = sqrt(a) V + sqrt(1 - a) x``.  History entries are the past (guided) model outputs.
Tensors share one shape ``[B, ...]``.
"""
from __future__ import annotations

import math

import torch

from pydiff.ops.solver import StepCoeffs
from pydiff.solvers.ddim import _BETA_KEYS, _SolverBase, run_step, spaced_timesteps, train_alphas_cumprod
from pydiff.solvers._common import Eval, vp_x0, check_num_inference_steps

__all__ = ["PLMSSolver"]

# Adams-Bashforth weights on (newest output, e[-1], e[-2], e[-3]) by the number of outputs held.
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PLMSSolver(_SolverBase):
    """PLMS sampler (diffusers ``PNDMScheduler`` with ``skip_prk_steps=True``).

    ``timesteps`` has ``n + 1`` entries (the first repeated) and ``step`` is called once per
    entry: ``step(model_output, x, *, model_uncond=None, guidance_scale=1.0,
    guidance_rescale=0.0, backend=None)``.  ``skip_prk_steps`` defaults to True here (diffusers:
    False); ``skip_prk_steps=False`` (the Runge-Kutta warm-up) raises NotImplementedError.
    """

    _defaults = dict(_BETA_KEYS, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon",
                     timestep_spacing="leading", steps_offset=0)
    init_noise_sigma = 1.0

    def _check_config(self):
        if not self.config.skip_prk_steps:
            self._unsupported("skip_prk_steps", "the pseudo Runge-Kutta warm-up is not implemented; use True")
        self._check_choice("prediction_type", ("epsilon", "v_prediction"))
        self._check_choice("timestep_spacing", ("linspace", "leading", "trailing"))
        self.alphas_cumprod = train_alphas_cumprod(self.config)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        check_num_inference_steps(num_inference_steps, required=True)
        c = self.config
        asc = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)[::-1]
        # PLMS timesteps: the second-to-last training-order entry repeated (the warm-up), descending.
        ts = torch.from_numpy(asc.copy())
        ts = torch.cat([ts[:-1], ts[-2:-1], ts[-1:]]).flip(0)
        self.num_inference_steps = num_inference_steps
        self.timesteps = ts.to(device)
        r = c.num_train_timesteps // num_inference_steps
        rows = []
        for k, t in enumerate(ts.tolist()):
            t_cur, t_prev = (t + r, t) if k == 1 else (t, t - r)
            held = 1 if k <= 1 else min(k, 4)  # model outputs held after this call (diffusers' len(ets))
            w = (0.5, 0.5) if k == 1 else _AB[held]
            a = float(self.alphas_cumprod[t_cur])
            ap = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else self.final_alpha_cumprod
            kk = (ap - a) / (a * math.sqrt(1.0 - ap) + math.sqrt(a * (1.0 - a) * ap))
            cx = math.sqrt(ap / a)
            if c.prediction_type == "v_prediction":  # E = sqrt(a) V + sqrt(1 - a) x
                cx -= kk * math.sqrt(1.0 - a)
                kk *= math.sqrt(a)
            rows.append(StepCoeffs(history=len(w) - 1)
                        .out(0, x=cx, m=-kk * w[0], h=[-kk * wi for wi in w[1:]]).out(1, m=1.0))
        self._rows = rows
        self.ets = []
        self.cur_sample = None
        self.step_index = 0

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        pred = self.config.prediction_type
        ets: list = []  # register names of the stored model outputs, oldest first (the stepper's ets)
        evals = []
        for k, t in enumerate(self.timesteps.tolist()):
            row = self._rows[k]
            reads = tuple(ets[::-1][:row.k])  # newest first, as the stepper reads them
            write = None if k == 1 else f"e{k}"
            evals.append(Eval(t=float(t), in_div=1.0, x0=vp_x0(pred, float(self.alphas_cumprod[t])),
                              coeffs=list(row.v), src="cur" if k == 1 else "x", reads=reads, write=write,
                              save=(("cur", "x"),) if k == 0 else ()))
            if k != 1:
                ets = (ets + [write])[-3:]
        return evals, 1.0

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond=None, guidance_scale=1.0,
             guidance_rescale=0.0, backend=None) -> torch.Tensor:
        k = self._need_steps()
        hist = self.ets[::-1][: self._rows[k].k]  # newest first
        src = self.cur_sample if k == 1 else x    # the warm-up restarts from the first sample
        out, m = run_step(self._rows[k], src, model_output, model_uncond, hist, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, backend=backend)
        if k == 0:
            self.cur_sample = x
        if k == 1:
            self.cur_sample = None
        else:
            self.ets = self.ets[-2:] + [m] if len(self.ets) >= 3 else self.ets + [m]
        self.step_index += 1
        return out
