"""Rectified-flow Euler sampler (SD3, FLUX, Wan, ...) on the fused solver step.

Flow matching (Lipman et al. 2023, arXiv:2210.02747; Liu et al. 2023, arXiv:2209.03003) with the SD3
schedule (Esser et al. 2024, arXiv:2403.03206): ``x_s = (1 - s) x0 + s eps``, the model predicts the
velocity ``v = eps - x0``, and the Euler step from ``s`` to ``s'`` is::

    x_{s'} = x_s + (s' - s) v                                   (ODE)
    x_{s'} = (1 - s') (x_s - s v) + s' z,  z ~ N(0, I)           (stochastic_sampling=True)

Sigmas are shifted (``shift s / (1 + (shift - 1) s)``, or the resolution-dependent
``exp(mu) / (exp(mu) + 1/s - 1)`` with ``use_dynamic_shifting`` and ``mu=``), optionally stretched to
``shift_terminal`` and re-spaced (Karras / exponential), exactly as diffusers'
``FlowMatchEulerDiscreteScheduler`` builds them.  Every step is one ``pydiff.ops.solver_step`` call;
tensors are ``[B, ...]``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.solvers.dpmpp import (ConfiguredSolver, exponential_sigmas, guidance_args, karras_sigmas,
                                  noise_like, stretch_to_terminal, time_shift, with_guidance)
from pydiff.solvers._common import Eval, check_num_inference_steps

__all__ = ["FlowEulerSolver"]


class FlowEulerSolver(ConfiguredSolver):
    """Flow-matching Euler sampler, matching diffusers' ``FlowMatchEulerDiscreteScheduler``.

    Config: num_train_timesteps, shift, use_dynamic_shifting (then ``set_timesteps(..., mu=)``),
    base_shift, max_shift, base_image_seq_len, max_image_seq_len, invert_sigmas, shift_terminal,
    use_karras_sigmas, use_exponential_sigmas, time_shift_type (exponential / linear),
    stochastic_sampling.  Not supported (NotImplementedError): use_beta_sigmas.

    ``set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None)``;
    ``step(model_output, x, model_uncond=, guidance_scale=, guidance_rescale=, noise=, generator=)``
    -> the next sample (``noise`` / ``generator`` only with stochastic_sampling).
    """

    _defaults = dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        time_shift_type="exponential", stochastic_sampling=False)

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c.use_beta_sigmas:
            self._unsupported("use_beta_sigmas")
        if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if c.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type={c.time_shift_type!r}: expected 'exponential' or 'linear'")
        N = c.num_train_timesteps
        # training sigmas in float32 as diffusers builds them; their ends bound the inference schedule
        s = torch.from_numpy(np.linspace(1, N, N, dtype=np.float32)[::-1].copy()) / N
        if not c.use_dynamic_shifting:
            s = c.shift * s / (1 + (c.shift - 1) * s)
        self.sigmas = s
        self.timesteps = s * N
        self.sigma_min, self.sigma_max = float(s[-1]), float(s[0])
        self._shift = c.shift
        self._coeffs: list = []

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        check_num_inference_steps(num_inference_steps)
        c = self.config
        N = c.num_train_timesteps
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu: must be passed when use_dynamic_shifting=True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas and timesteps: expected the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("sigmas / timesteps: expected num_inference_steps values")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        n = int(num_inference_steps)
        given_ts = timesteps is not None
        if given_ts:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self.sigma_max * N, self.sigma_min * N, n)
            sig = timesteps / N
        else:
            sig = np.array(sigmas).astype(np.float32)
            n = len(sig)
        if c.use_dynamic_shifting:
            sig = time_shift(c.time_shift_type, mu, sig)
        else:
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)
        if c.shift_terminal:
            sig = stretch_to_terminal(sig, c.shift_terminal)
        if c.use_karras_sigmas:
            sig = karras_sigmas(float(sig[-1]), float(sig[0]), n)
        elif c.use_exponential_sigmas:
            sig = exponential_sigmas(float(sig[-1]), float(sig[0]), n)
        sig = torch.from_numpy(np.asarray(sig)).to(dtype=torch.float32)
        ts = torch.from_numpy(timesteps).to(torch.float32) if given_ts else sig * N
        if c.invert_sigmas:
            sig = 1.0 - sig
            ts = sig * N
            sig = torch.cat([sig, torch.ones(1)])
        else:
            sig = torch.cat([sig, torch.zeros(1)])
        self.timesteps = ts.to(device=device)
        self.sigmas = sig
        self.num_inference_steps = n
        self._coeffs = self._build(sig.numpy())
        self._step_index = None
        self._begin_index = None

    def _build(self, sig32: np.ndarray) -> list:
        table = []
        for i in range(len(sig32) - 1):
            s, s_next = float(sig32[i]), float(sig32[i + 1])
            if self.config.stochastic_sampling:  # d = x0 = x - s v;  x' = (1 - s') x0 + s' z
                sc = StepCoeffs().set(px=1.0, pm=-s).out(0, d=1.0 - s_next, z=s_next)
            else:  # x' = x + dt v, dt rounded to float32 as diffusers computes it
                dt = float(np.float32(s_next) - np.float32(s))
                sc = StepCoeffs().set(px=1.0, pm=-s).out(0, x=1.0, m=dt)
            table.append(sc.tolist())  # no history output: the op then skips that write
        return table

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        ts = self.timesteps.tolist()
        sig = self.sigmas.tolist()
        return [Eval(t=float(ts[i]), in_div=1.0, x0=(1.0, -float(sig[i])), coeffs=list(self._coeffs[i]),
                     noise=bool(self.config.stochastic_sampling)) for i in range(len(ts))], 1.0

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0, noise: Optional[torch.Tensor] = None,
             generator=None, backend: Optional[str] = None) -> torch.Tensor:
        """One Euler step of the flow ODE (or the stochastic re-noising step).

        ``model_output``: the predicted velocity at ``x`` (the conditional branch under CFG; with
        ``model_uncond`` the op forms ``u + g (c - u)``).  No history output is written (one read of
        ``x`` and the model output(s), one write).
        """
        i = self._next_index()
        g, row_scale = guidance_args(model_output, model_uncond, guidance_scale, guidance_rescale, backend)
        z = None
        if self.config.stochastic_sampling:
            z = noise_like(x, generator) if noise is None else noise.to(device=x.device, dtype=x.dtype)
        x_next, _ = solver_step(x, model_output, model_uncond, [], z, coeffs=with_guidance(self._coeffs[i], g),
                                row_scale=row_scale, backend=backend)
        self._step_index = i + 1
        return x_next
