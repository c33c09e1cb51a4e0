"""A whole sampling loop, model included, captured in one CUDA graph and replayed.

Every model evaluation is followed by one fused :func:`pydiff.solver_step` that reads its
coefficients from a float64 device table at a device-side step counter (``coeff_table=``,
``step=``; the counter is zeroed at the start of the graph and advanced with ``step.add_(1)``
after each step).  So the captured graph holds no per-step host values other than tensor
addresses; the table can be rewritten in place between replays (:meth:`CudaGraphSampler.set_guidance_scale`)
without recapturing.  Timesteps handed to the model come from a device table too.

Requirements: the model must be capturable (no host synchronisation, no ``.item()``, no
data-dependent control flow, static shapes); stochastic samplers draw their noise inside the graph
from the default CUDA generator or from ``generator`` (a CUDA ``torch.Generator``, registered with
the graph), so each replay draws fresh noise.  ``cond`` / ``uncond`` are used in place: update
them with ``sampler.cond.copy_(...)`` between replays.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pydiff.samplers.loop import SamplingLoop, draw_noise, norm_device
from pydiff.samplers.plan import build_plan

__all__ = ["CudaGraphSampler", "capture_sampling_loop"]


class CudaGraphSampler:
    """Capture ``sampler`` over ``model`` for batches of ``shape`` in one CUDA graph.

    ``CudaGraphSampler(model, shape, sampler, steps, **options)(noise=None, generator=None)``
    returns the final sample (a fresh tensor; ``clone=False`` returns the graph's output buffer,
    overwritten by the next replay).  ``noise``: standard-normal starting noise (copied into the
    graph's input); otherwise it is drawn from ``generator`` (or the default generator) before the
    replay.  Options are those of :func:`pydiff.samplers.sample` (guidance, cond / uncond,
    prediction_type, timestep_spacing, sigmas, sampler config), plus ``warmup`` (eager runs on a
    side stream before capture, default 1: compiles Triton kernels, initialises cuBLAS).
    """

    def __init__(self, model: Callable, shape, sampler: str = "dpmpp_2m", steps: int = 25, *,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0, cond=None, uncond=None,
                 cfg_batched: bool = True, prediction_type: Optional[str] = None,
                 timestep_spacing: Optional[str] = None, karras: bool = False, sigmas: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, device="cuda", dtype=torch.float32,
                 timestep_dtype=torch.float32, backend: Optional[str] = None, return_x0_trajectory: bool = False,
                 warmup: int = 1, scheduler_config=None, **sampler_config):
        if torch.device(device).type != "cuda":
            raise ValueError(f"device: CUDA graphs need a CUDA device, got {device}")
        device = norm_device(device)
        if generator is not None and (isinstance(generator, (list, tuple)) or generator.device.type != "cuda"):
            raise ValueError("generator: a CUDA graph draws its step noise on the device; pass one CUDA "
                             "torch.Generator (or None for the default one)")
        if karras:
            sigmas = "karras"
        self.plan = build_plan(sampler, steps, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                               sigmas=sigmas, scheduler_config=scheduler_config, **sampler_config)
        self.device, self.dtype, self.shape = device, dtype, tuple(int(s) for s in shape)
        self.cond, self.uncond = cond, uncond
        self.generator = generator
        self.loop = SamplingLoop(self.plan, model, device=device, dtype=dtype, guidance_scale=guidance_scale,
                                 guidance_rescale=guidance_rescale, cond=cond, uncond=uncond,
                                 cfg_batched=cfg_batched, use_table=True, timestep_dtype=timestep_dtype,
                                 backend=backend, return_x0=return_x0_trajectory)
        self.noise = torch.zeros(self.shape, device=device, dtype=dtype)  # static input: standard normal
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self._capture(int(warmup))

    def _body(self):
        self.step.zero_()
        x = self.noise * self.plan.init_noise_sigma if self.plan.init_noise_sigma != 1.0 else self.noise.clone()
        return self.loop.run(x, generator=self.generator, step=self.step, progress=False)

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self.generator is not None:
            self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph):
            self.out = self._body()

    @property
    def num_evals(self) -> int:
        return len(self.plan.evals)

    def set_guidance_scale(self, guidance_scale: float) -> None:
        """Change the CFG scale for the next replays (rewrites the table's guidance column in place)."""
        g = float(guidance_scale)
        if not self.loop.cfg:
            raise ValueError("set_guidance_scale: the loop was captured without classifier-free guidance")
        if self.loop.phi != 0.0:
            raise ValueError("set_guidance_scale: guidance_rescale was captured with the old scale; recapture")
        self.loop.table[:, 0].fill_(g)
        if self.loop.x0_table is not None:
            self.loop.x0_table[:, 0].fill_(g)
        self.loop.g = g

    def replay(self) -> None:
        """Replay the captured loop on the current ``self.noise`` (no copies, no allocation)."""
        self.graph.replay()

    def __call__(self, noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 clone: bool = True):
        if noise is not None:
            if tuple(noise.shape) != self.shape:
                raise ValueError(f"noise: expected shape {self.shape}, got {tuple(noise.shape)}")
            self.noise.copy_(noise, non_blocking=True)
        else:
            self.noise.copy_(draw_noise(self.noise, generator if generator is not None else self.generator))
        self.graph.replay()
        if not clone:
            return self.out
        if isinstance(self.out, tuple):
            return self.out[0].clone(), [t.clone() for t in self.out[1]]
        return self.out.clone()


def capture_sampling_loop(model: Callable, shape, sampler: str = "dpmpp_2m", steps: int = 25,
                          **options) -> CudaGraphSampler:
    """Capture a complete sampling loop (model included) in one CUDA graph; see :class:`CudaGraphSampler`."""
    return CudaGraphSampler(model, shape, sampler, steps, **options)
