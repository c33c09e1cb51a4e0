"""The sampling loop: a :class:`~pydiff.samplers.plan.Plan` run over a user's model.

Model-call convention
---------------------
``model(x, t, cond) -> prediction``, the way a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``
wrapper is usually written:

* ``x``: the model input ``[B, ...]`` (already scaled for Euler / Heun, like diffusers'
  ``scale_model_input``), in the sampling dtype;
* ``t``: a 1-D tensor ``[B]`` on x's device holding the scheduler's timestep (diffusers' training
  timestep, 0..999 for the VP samplers, possibly fractional for Euler / Heun, ``sigma * 1000`` for
  flow matching), dtype ``timestep_dtype`` (float32 by default);
* ``cond``: whatever the caller passed as ``cond`` / ``uncond`` (a tensor, a dict / list / tuple of
  tensors, or None).  With classifier-free guidance and ``cfg_batched=True`` the model is called
  once on ``cat([x, x])`` with ``t`` repeated and ``cat([uncond, cond])`` (each tensor leaf
  concatenated along dim 0), and the output's halves are (uncond, cond); with ``cfg_batched=False``
  (or when either is None) it is called twice.
* the prediction has x's shape: epsilon, v, x0 (``prediction_type='sample'``) or the flow velocity.

Each model evaluation is followed by exactly one :func:`pydiff.solver_step` (CFG combine,
prediction conversion, multistep update and history write in one kernel).  Nothing in the loop
reads a device value on the host: coefficients are host floats (or a float64 device table indexed
by a device-side step counter), timesteps come from a device table built once, and noise is drawn
on the device.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import numpy as np
import torch

from pydiff.ops.solver import cfg_rescale, solver_step, x0_stats_like, x0_variance
from pydiff.reference.solver import HEAD, ROW
from pydiff.samplers.plan import ZERO, Plan, build_plan, x0_step_coeffs

__all__ = ["SamplingLoop", "draw_noise", "norm_device", "sample", "to_device"]


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def norm_device(device) -> torch.device:
    """``torch.device`` with the current CUDA index filled in (so ``"cuda"`` equals ``"cuda:0"``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def to_device(a, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor without a synchronising copy (pinned memory, non_blocking)."""
    t = torch.as_tensor(np.asarray(a), dtype=dtype)
    device = norm_device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _cat_tree(a, b):
    """cat([a, b]) along dim 0 for tensors, dicts, lists or tuples of tensors."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        if set(a) != set(b):
            raise ValueError(f"cond / uncond: dicts with different keys {sorted(a)} and {sorted(b)}")
        return {k: _cat_tree(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError("cond / uncond: sequences of different lengths")
        return type(a)(_cat_tree(x, y) for x, y in zip(a, b))
    if a is None and b is None:
        return None
    raise TypeError(f"cond / uncond: cannot batch {type(a).__name__} (pass tensors, dicts or lists of tensors, "
                    "or cfg_batched=False)")


class _Bar:
    """A tiny text progress bar on stderr (used when tqdm is not installed)."""

    def __init__(self, total: int, desc: str = ""):
        self.total, self.n, self.desc = total, 0, desc
        self._draw()

    def _draw(self):
        w = 30
        f = int(w * self.n / max(1, self.total))
        sys.stderr.write(f"\r{self.desc} [{'#' * f}{'.' * (w - f)}] {self.n}/{self.total}")
        sys.stderr.flush()

    def update(self, k: int = 1):
        self.n += k
        self._draw()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(total: int, enabled: Optional[bool], desc: str = ""):
    """A progress bar object with update()/close(), or None.  ``enabled=None``: on when stderr is a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        return _Bar(total, desc)


def draw_noise(like: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn in float32 as diffusers' ``randn_tensor``
    draws it (a CPU generator draws on the CPU; a list of generators one sample each), then cast."""
    shape, dev = tuple(like.shape), like.device
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if len(gens) == 1:
        g = gens[0]
        rdev = g.device if g is not None else dev
        z = torch.randn(shape, generator=g, device=rdev, dtype=torch.float32)
    else:
        if len(gens) != shape[0]:
            raise ValueError(f"generator: a list of {len(gens)} generators for a batch of {shape[0]}")
        z = torch.cat([torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in gens])
    return z.to(device=dev, dtype=like.dtype)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
class SamplingLoop:
    """A plan bound to a model, guidance settings and a device: :meth:`run` is the sampling loop.

    Building it does the host work once (coefficients, device tables of timesteps and, with
    ``use_table=True``, of coefficients); :meth:`run` then never synchronises with the host.

    Args:
        plan: from :func:`pydiff.samplers.build_plan`.
        model: ``model(x, t, cond) -> prediction`` (see the module docstring).
        guidance_scale: CFG scale ``g``: ``m = u + g (c - u)`` (1.0 and no ``uncond``: one call).
        guidance_rescale: Lin et al. 2023 guidance rescale ``phi`` (0 = off).
        cond, uncond: conditioning handed to the model.
        cfg_batched: one model call on the concatenated batch (True) or two calls.
        use_table: read coefficients from a float64 device table at a device step counter (what a
            CUDA graph needs) instead of passing them as host floats.
        timestep_dtype: dtype of the ``t`` tensor handed to the model.
        return_x0: also compute the x0 estimate at every evaluation (one extra fused kernel each).
        track_x0_last: accumulate the running sum of x0 and x0^2 over the last ``track_x0_last``
            model evaluations inside the step kernels (``solver_step(..., x0_stats=)``) and return
            the per-sample variance of x0 over them (the hallucination score of Aithal et al.
            2024), without storing the trajectory.  Where a step's output does not use its x0
            slot, the slot is set to the x0 conversion (free); where the step reads another
            register than x (Heun's second stage) or its slot holds something else, one extra
            history-free fused kernel computes and accumulates x0.
    """

    def __init__(self, plan: Plan, model: Callable, *, device, dtype=torch.float32, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0, cond=None, uncond=None, cfg_batched: bool = True,
                 use_table: bool = False, timestep_dtype=torch.float32, backend: Optional[str] = None,
                 return_x0: bool = False, track_x0_last: int = 0):
        self.plan, self.model = plan, model
        self.device, self.dtype = norm_device(device), dtype
        self.g, self.phi = float(guidance_scale), float(guidance_rescale)
        if not (math.isfinite(self.g) and math.isfinite(self.phi)):
            raise ValueError(f"guidance_scale, guidance_rescale: expected finite numbers, got {self.g}, {self.phi}")
        self.cond, self.uncond = cond, uncond
        self.cfg = self.g != 1.0 or uncond is not None
        if self.phi != 0.0 and not self.cfg:
            raise ValueError("guidance_rescale: needs classifier-free guidance (guidance_scale != 1 or uncond)")
        self.cfg_batched = bool(cfg_batched) and cond is not None and uncond is not None
        self.use_table, self.backend, self.return_x0 = bool(use_table), backend, bool(return_x0)
        self.t_table = to_device([e.t for e in plan.evals], timestep_dtype, self.device)
        self.K = plan.max_history
        n = len(plan.evals)
        if not isinstance(track_x0_last, int) or not 0 <= track_x0_last <= n:
            raise ValueError(f"track_x0_last: expected an int in 0..{n} (the plan's model evaluations), got "
                             f"{track_x0_last!r}")
        self.track_last = track_x0_last
        self.host = [self._with_g(e.coeffs) for e in plan.evals]
        self.host_x0 = [x0_step_coeffs(e.x0, self.g) for e in plan.evals]
        # how each tracked evaluation accumulates x0: "main" (its step's d is x0), "override" (the
        # step's outputs ignore d and e, so its d slot can hold x0) or "extra" (one more kernel)
        self.track_mode = [None] * n
        for i in range(n - self.track_last, n):
            self.track_mode[i] = _track_mode(plan.evals[i], self.host[i])
            if self.track_mode[i] == "override":
                p, q = plan.evals[i].x0
                self.host[i][1], self.host[i][2] = float(p), float(q)
        if self.use_table:
            table = plan.table(self.g)
            for i, mode in enumerate(self.track_mode):
                if mode == "override":
                    table[i, 1], table[i, 2] = plan.evals[i].x0
            self.table = to_device(table, torch.float64, self.device)
            need_x0 = self.return_x0 or "extra" in self.track_mode
            self.x0_table = to_device(plan.x0_table(self.g), torch.float64, self.device) if need_x0 else None

    def _with_g(self, v):
        v = list(v)
        v[0] = self.g
        return v

    # -------------------------------------------------------------- model
    def _model(self, xin: torch.Tensor, i: int):
        t = self.t_table[i]
        B = xin.shape[0]
        if not self.cfg:
            return self._as(self.model(xin, t.expand(B), self.cond), xin), None
        if self.cfg_batched:
            out = self._as(self.model(torch.cat([xin, xin]), t.expand(2 * B), self._cond2), None)
            if out.shape[0] != 2 * B:
                raise ValueError(f"model: expected an output batch of {2 * B} for the CFG batch, got {out.shape[0]}")
            u, c = out.chunk(2)
            return self._as(c, xin), self._as(u, xin)
        c = self.model(xin, t.expand(B), self.cond)
        u = self.model(xin, t.expand(B), self.uncond)
        return self._as(c, xin), self._as(u, xin)

    @staticmethod
    def _as(out, like):
        if not isinstance(out, torch.Tensor):
            if hasattr(out, "sample"):  # diffusers model outputs
                out = out.sample
            elif isinstance(out, (tuple, list)):
                out = out[0]
            else:
                raise TypeError(f"model: expected a tensor output, got {type(out).__name__}")
        if like is not None and (out.dtype != like.dtype or not out.is_contiguous()):
            out = out.to(dtype=like.dtype).contiguous()
        return out

    # -------------------------------------------------------------- run
    def run(self, x: torch.Tensor, *, generator=None, step: Optional[torch.Tensor] = None, progress=False,
            callback: Optional[Callable] = None):
        """Run the loop from ``x`` (already scaled by ``init_noise_sigma``).

        ``step``: in table mode, the int64 one-element device step counter (zeroed by the caller;
        advanced here once per evaluation).  ``callback(dict(i=, t=, x=, x0=))`` after each step.
        Returns ``x`` or, with ``return_x0``, ``(x, [x0 per evaluation])``.
        """
        plan = self.plan
        if x.device != self.device or x.dtype != self.dtype:
            raise ValueError(f"x: expected {self.dtype} on {self.device}, got {x.dtype} on {x.device}")
        if self.use_table and step is None:
            step = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._cond2 = _cat_tree(self.uncond, self.cond) if self.cfg_batched else None
        regs = {"x": x}
        if self.use_table and self.K and any(e.k < self.K for e in plan.evals):
            regs[ZERO] = torch.zeros_like(x)
        x0s = [] if self.return_x0 else None
        stats = x0_stats_like(x) if self.track_last else None
        bar = progress_bar(len(plan.evals), progress, desc=plan.sampler)
        try:
            for i, e in enumerate(plan.evals):
                for dst, src in e.save:
                    regs[dst] = regs[src]
                xcur = regs["x"]
                xin = xcur if e.in_div == 1.0 else xcur / e.in_div
                c, u = self._model(xin, i)
                row_scale = cfg_rescale(c, u, self.g, self.phi, backend=self.backend) if self.phi != 0.0 else None
                z = draw_noise(xcur, generator) if e.noise else None
                mode = self.track_mode[i]
                main_stats = stats if mode in ("main", "override") else None
                x0_stats = stats if mode == "extra" else None
                if self.use_table:
                    hist = [regs[r] for r in plan.padded_reads(i, self.K)]
                    out, h = solver_step(regs[e.src], c, u, hist, z, coeff_table=self.table, step=step,
                                         row_scale=row_scale, clip=e.clip, backend=self.backend, x0_stats=main_stats)
                    if self.return_x0 or x0_stats is not None:
                        x0 = solver_step(xcur, c, u, coeff_table=self.x0_table, step=step, row_scale=row_scale,
                                         clip=e.clip if x0_stats is not None else None, backend=self.backend,
                                         write_history=False, x0_stats=x0_stats)[0]
                    step.add_(1)
                else:
                    hist = [regs[r] for r in e.reads]
                    out, h = solver_step(regs[e.src], c, u, hist, z, coeffs=self.host[i], row_scale=row_scale,
                                         clip=e.clip, backend=self.backend, x0_stats=main_stats)
                    if self.return_x0 or x0_stats is not None:
                        x0 = solver_step(xcur, c, u, coeffs=self.host_x0[i], row_scale=row_scale,
                                         clip=e.clip if x0_stats is not None else None, backend=self.backend,
                                         x0_stats=x0_stats)[0]
                if self.return_x0:
                    x0s.append(x0)
                regs["x"] = out
                if e.write is not None:
                    regs[e.write] = h
                for name in [n for n in regs if n not in ("x", ZERO) and plan.last_use.get(n, -1) <= i]:
                    del regs[name]
                if callback is not None:
                    callback(dict(i=i, t=e.t, x=out, x0=x0s[-1] if x0s else None))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        res = (regs["x"],) + ((x0s,) if self.return_x0 else ()) + \
            ((x0_variance(stats, self.track_last),) if self.track_last else ())
        return res if len(res) > 1 else res[0]


def _track_mode(e, v) -> str:
    """How evaluation ``e`` (host coefficients ``v``) accumulates its x0 estimate (see SamplingLoop)."""
    if e.src != "x":
        return "extra"
    k = e.k
    rows = (v[len(HEAD):len(HEAD) + len(ROW) + k], v[len(HEAD) + len(ROW) + k:])
    d, ei = ROW.index("d"), ROW.index("e")
    if all(r[d] == 0.0 and r[ei] == 0.0 for r in rows):
        return "override"
    p, q = e.x0
    close = lambda a, b: abs(a - b) <= 1e-12 * max(1.0, abs(b))  # noqa: E731
    return "main" if close(v[1], p) and close(v[2], q) else "extra"


# ------------------------------------------------------------------------------------------------
# sample()
# ------------------------------------------------------------------------------------------------
def _initial_noise(shape_or_x, generator, device, dtype):
    if isinstance(shape_or_x, torch.Tensor):
        x = shape_or_x
        device = norm_device(device) if device is not None else x.device
        dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
        return x.to(device=device, dtype=dtype), device, dtype
    try:
        shape = tuple(int(s) for s in shape_or_x)
    except TypeError:
        shape = None
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"shape_or_x: expected an initial sample (tensor) or a batch shape (batch, ...) of sizes "
                         f">= 0, got {shape_or_x!r}")
    if device is None:
        g0 = generator[0] if isinstance(generator, (list, tuple)) else generator
        device = g0.device if g0 is not None else torch.device("cpu")
    device, dtype = norm_device(device), dtype or torch.float32
    return draw_noise(torch.empty(shape, device=device, dtype=dtype), generator), device, dtype


@torch.no_grad()
def sample(model: Callable, shape_or_x, sampler: str = "dpmpp_2m", steps: int = 25, *, guidance_scale: float = 1.0,
           guidance_rescale: float = 0.0, cond=None, uncond=None, cfg_batched: bool = True,
           prediction_type: Optional[str] = None, timestep_spacing: Optional[str] = None, karras: bool = False,
           sigmas: Optional[str] = None, generator=None, progress: Optional[bool] = None,
           return_x0_trajectory: bool = False, device=None, dtype=None, timestep_dtype=torch.float32,
           backend: Optional[str] = None, callback: Optional[Callable] = None, scheduler_config=None,
           use_table: bool = False, hallucination_window: int = 0, **sampler_config):
    """Sample with ``sampler`` for ``steps`` steps over ``model(x, t, cond) -> prediction``.

    Samplers: ``ddim``, ``ddpm``, ``dpmpp_2m``, ``dpmpp_3m``, ``dpmpp_2m_sde``, ``plms``, ``euler``,
    ``heun`` (``2 steps - 1`` model calls), ``unipc``, ``flow_euler``.  Each step is one fused
    :func:`pydiff.solver_step` per model evaluation; the coefficients are those of the matching
    diffusers scheduler (same timesteps, same update, to ~1e-6 in fp32).

    Args:
        model: see :mod:`pydiff.samplers.loop` for the call convention.
        shape_or_x: the batch shape (initial noise is drawn with ``generator``), or a standard-normal
            noise tensor (like diffusers' ``latents=``); either is scaled by the sampler's
            ``init_noise_sigma``.
        guidance_scale, guidance_rescale, cond, uncond, cfg_batched: classifier-free guidance
            ``m = u + g (c - u)`` (with ``uncond=None`` and ``g != 1`` the unconditional call gets
            ``cond=None``); the combination happens inside the fused step.
        prediction_type: ``epsilon`` (default), ``v_prediction``, ``sample`` (x0), or
            ``flow_prediction`` (velocity; the default and only choice of ``flow_euler``).
        timestep_spacing: ``leading`` / ``trailing`` / ``linspace``; default: the diffusers
            scheduler's default (DDIM, DDPM, PLMS: leading; the others: linspace).
        karras / sigmas: ``sigmas='karras'`` (or ``karras=True``) or ``'exponential'`` noise levels
            (DPM-Solver++, Euler, Heun, UniPC).
        generator: ``torch.Generator`` (or a list, one per sample) for the initial noise and the
            noise of stochastic samplers (ddpm, dpmpp_2m_sde, ddim with eta > 0, Euler churn).  A CPU
            generator with CUDA tensors copies each draw to the device.
        progress: progress bar (tqdm when installed); None: only when stderr is a terminal.
        return_x0_trajectory: also return the list of x0 estimates, one per model evaluation.
        device, dtype: of the sample (default: the given tensor's, else the generator's device, fp32).
        timestep_dtype: dtype of ``t`` handed to the model (e.g. ``torch.long`` for integer-indexed
            embeddings; only exact for samplers with integer timesteps).
        backend: backend of the fused op (``cuda``, ``triton``, ``cpu``, ``torch``).
        callback: ``callback(dict(i=, t=, x=, x0=))`` after every evaluation.
        scheduler_config: a diffusers scheduler ``config`` to start from (its keys that the stepper
            knows are used; explicit keyword options win).
        use_table: read the coefficients from a float64 device table (the CUDA-graph path) instead of
            kernel arguments.  Same results.
        hallucination_window: track the x0 estimate over the last this many model evaluations inside
            the step kernels and also return the per-sample hallucination score: the variance of x0
            over them, averaged over the sample's elements (Aithal et al. 2024, float64 ``[B]``).
        **sampler_config: stepper config keys with diffusers' names (``beta_schedule``,
            ``solver_order``, ``steps_offset``, ``shift``, ...) and step options (DDIM ``eta``,
            ``use_clipped_model_output``; Euler ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).
            ``clip_sample`` defaults to False here (diffusers' DDIM / DDPM default is True, which
            clamps x0 to [-1, 1]: right for pixel models, wrong for latents).

    Returns:
        the final sample; with ``return_x0_trajectory``, ``(sample, [x0 per model evaluation])``;
        with ``hallucination_window``, the score is appended: ``(sample, score)`` or ``(sample,
        x0s, score)``.
    """
    if karras:
        if sigmas not in (None, "karras"):
            raise ValueError(f"karras=True conflicts with sigmas={sigmas!r}")
        sigmas = "karras"
    plan = build_plan(sampler, steps, prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                      sigmas=sigmas, scheduler_config=scheduler_config, **sampler_config)
    x, device, dtype = _initial_noise(shape_or_x, generator, device, dtype)
    loop = SamplingLoop(plan, model, device=device, dtype=dtype, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, cond=cond, uncond=uncond, cfg_batched=cfg_batched,
                        use_table=use_table, timestep_dtype=timestep_dtype, backend=backend,
                        return_x0=return_x0_trajectory, track_x0_last=hallucination_window)
    if plan.init_noise_sigma != 1.0:
        x = x * plan.init_noise_sigma
    return loop.run(x, generator=generator, progress=progress, callback=callback)
