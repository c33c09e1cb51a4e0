"""Drop-in replacements for diffusers' schedulers whose ``step`` is one fused pydiff kernel.

    from pydiff.integrations.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Classes (same names as diffusers'): ``DDIMScheduler``, ``DDPMScheduler``,
``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``,
``PNDMScheduler``, ``UniPCMultistepScheduler``, ``FlowMatchEulerDiscreteScheduler``.

What is the same as diffusers
    * Each class is a diffusers ``SchedulerMixin`` + ``ConfigMixin``: ``from_config``,
      ``from_pretrained``, ``save_pretrained``/``save_config``, ``config`` (a diffusers ``FrozenDict``),
      ``compatibles``.  Its constructor signature *is* the installed diffusers class's (copied from it
      with ``inspect.signature`` at import), so every config key diffusers accepts is accepted, with
      diffusers' defaults; the few options pydiff does not implement raise ``NotImplementedError``
      naming the option (listed below).
    * ``set_timesteps`` (same arguments, incl. ``device``, ``timesteps``, ``sigmas``, ``mu`` where
      diffusers has them), ``timesteps``, ``sigmas``, ``num_inference_steps``, ``init_noise_sigma``,
      ``order``, ``scale_model_input``, ``add_noise`` (``scale_noise`` for flow matching),
      ``step_index`` / ``begin_index`` / ``set_begin_index`` / ``index_for_timestep`` where diffusers
      has them, ``alphas_cumprod`` / ``final_alpha_cumprod`` / ``alpha_t`` / ``sigma_t`` / ``lambda_t``,
      and ``step(model_output, timestep, sample, <the same extra arguments>, return_dict=True)``
      returning diffusers' own output classes (``.prev_sample``, and ``.pred_original_sample`` where
      diffusers returns it).  Schedules are the pydiff steppers' (``pydiff.solvers``), built to equal
      diffusers' tables bit for bit; a pipeline gives the same images with either (tests/
      test_integrations_diffusers.py: max relative difference <= 1e-5 in fp32).

What is different
    * ``step`` is one call of :func:`pydiff.solver_step` (guidance, prediction conversion, the
      multistep update and the history write in one pass over the tensors) with float64
      coefficients computed on the host at ``set_timesteps``; diffusers runs 5-30 small torch ops
      per step.  Optional keyword-only extras fuse classifier-free guidance into the same kernel:
      ``step(cond, t, x, model_uncond=uncond, guidance_scale=g, guidance_rescale=phi)`` equals
      ``step(uncond + g * (cond - uncond), t, x)`` (with ``rescale_noise_cfg`` when ``phi > 0``).
    * No host synchronisation inside ``step`` in a pipeline loop: the position of ``timestep`` in
      the schedule is read from the tensor's storage offset when it is an element of
      ``scheduler.timesteps`` (``for t in scheduler.timesteps`` / a slice of it), and from its
      value otherwise (a Python number or a CPU tensor costs nothing; a GPU tensor from elsewhere
      is read once, as diffusers does).  Stateless schedulers (DDIM, DDPM, PNDM) look the index up
      on every call, as diffusers' do by value.
    * Internal state of diffusers' classes that pipelines do not use (``model_outputs``,
      ``lower_order_nums``, ``last_sample``, ...) is not kept: code that reaches into it (LEDITS++)
      needs diffusers' own scheduler.
    * ``DDPMScheduler`` with ``variance_type`` learned / learned_range and
      ``FlowMatchEulerDiscreteScheduler.step(per_token_timesteps=...)`` run partly in eager torch
      (per-element variance / per-token sigmas); everything else is the fused kernel.

Numerics (fp32): the steppers compute every coefficient in float64 from diffusers' float32 tables,
so where diffusers' own fp32 arithmetic loses digits the two differ by diffusers' error, e.g.
``1 - alphas_cumprod[t]`` near ``t = 0`` (DDPM), or a large x0 estimate; and where diffusers gives NaN
(UniPC ``bh1`` onto sigma = 0) this gives the finite limit.  With ``clip_sample=True`` at high noise
(DDIM/DDPM defaults: ``sqrt(alphas_cumprod) = 0.006..0.01`` at the first timestep) x0 is formed
explicitly before the clamp and fp32 rounding is amplified ~100x there; any two fp32
implementations then differ by ~1e-5..1e-4 (both are that far from a float64 run; the tests check
that ours is as close to it as diffusers').

Not supported (``NotImplementedError`` naming the option): ``thresholding=True`` (all; dynamic
thresholding needs a per-sample quantile of x0 inside the step), ``use_beta_sigmas=True`` (needs
scipy, which diffusers also requires), ``DDPMScheduler(variance_type="fixed_large_log")``,
``UniPCMultistepScheduler(solver_p=...)``, ``EulerDiscreteScheduler`` log-linear interpolation
combined with custom ``timesteps``.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import numpy as np
import torch

try:
    import diffusers as _d
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME, SchedulerMixin, SchedulerOutput
    from diffusers.utils import logging as _dlogging
except ImportError as exc:  # pragma: no cover
    raise ImportError("pydiff.integrations.diffusers needs the diffusers package (pip install diffusers)") from exc

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.solvers import (DDIMSolver, DDPMSolver, DPMSolverPPSolver, EulerSolver, FlowEulerSolver, HeunSolver,
                            UniPCSolver)
from pydiff.solvers._common import check_num_inference_steps
from pydiff.solvers.ddim import guidance as _guidance
from pydiff.solvers.ddim import randn_like_diffusers, run_step, spaced_timesteps, train_alphas_cumprod
from pydiff.solvers._common import SolverConfig
from pydiff.solvers.dpmpp import exponential_sigmas, karras_sigmas
from pydiff.solvers.euler import _sigma_schedule, _sigma_to_t

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
           "FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler"]

logger = _dlogging.get_logger("diffusers.schedulers.pydiff")  # obeys diffusers.utils.logging verbosity


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _mirror(theirs):
    """Give the decorated ``__init__(self, *args, **kwargs)`` the signature of ``theirs.__init__``:
    ``register_to_config`` and ``ConfigMixin.from_config`` read config keys and defaults from it."""
    sig = inspect.signature(theirs.__init__)

    def deco(fn):
        fn.__signature__ = sig
        return fn

    return deco


def _view_index(t, ts: Optional[torch.Tensor]) -> Optional[int]:
    """Position of ``t`` in ``ts`` when ``t`` is a one-element view of ``ts``'s storage (``for t in
    ts`` / slices), read from tensor metadata: no host synchronisation.  None otherwise."""
    if not isinstance(t, torch.Tensor) or ts is None or t.numel() != 1 or ts.dim() != 1 or ts.shape[0] == 0:
        return None
    if t.device != ts.device or t.dtype != ts.dtype:
        return None
    # an address inside ts's elements (ts is alive, so the memory can only be ts's): a view of it
    off, st = t.data_ptr() - ts.data_ptr(), ts.stride(0) * ts.element_size()
    if st <= 0 or off < 0 or off % st:
        return None
    i = off // st
    return i if i < ts.shape[0] else None


def _host_value(t):
    """A timestep as a Python number (a GPU tensor is read: a synchronisation)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"timestep: expected one timestep, got a tensor of shape {tuple(t.shape)}")
        return t.reshape(()).item()
    if isinstance(t, np.ndarray):
        return t.reshape(()).item()
    return t.item() if hasattr(t, "item") else t


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = v.flatten()
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


def _alpha_bar_betas(n: int, kind: str) -> np.ndarray:
    """Betas of diffusers' ``betas_for_alpha_bar`` for the ``exp`` (``alpha_bar(t) = e^{-12 t}``) and
    ``laplace`` (log-SNR ``-0.5 sign(0.5 - t) log(1 - 2|0.5 - t| + 1e-6)``) transforms, beta capped at
    0.999; handed to the steppers as ``trained_betas`` (rounded to float32 there, as diffusers)."""
    if kind == "exp":
        ab = lambda t: math.exp(t * -12.0)  # noqa: E731
    else:
        def ab(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    return np.array([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)], dtype=np.float64)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no call when it already is: the step's hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


class _FusedScheduler(SchedulerMixin, ConfigMixin):
    """Shared plumbing: config checks, timestep lookup, output packing."""

    config_name = SCHEDULER_CONFIG_NAME
    _theirs: type = None            # the diffusers class this one replaces
    _missing_index = "raise"        # index_for_timestep of a timestep not in the schedule: "raise" or "last"
    _result_dtype = "promote"       # dtype of prev_sample: "promote" (torch promotion), "model" or "sample"

    # -------------------------------------------------------------- construction
    def _setup(self, args, kwargs) -> None:
        # register_to_config has stored the config already; this only rejects what diffusers rejects
        inspect.signature(self._theirs.__init__).bind(self, *args, **kwargs)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._ts_host = None
        self._dev_cache = {}

    def _reject(self, key: str, why: str) -> None:
        v = self.config[key]
        v = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else f"<{type(v).__name__}>"
        raise NotImplementedError(f"pydiff {type(self).__name__}: {key}={v} is not supported ({why}); "
                                  f"use diffusers.{type(self).__name__} for it")

    def _common_checks(self) -> None:
        c = self.config
        if c.get("thresholding"):
            self._reject("thresholding", "dynamic thresholding needs a per-sample quantile of the x0 estimate inside "
                                         "the step, which the fused kernel does not compute")
        if c.get("use_beta_sigmas"):
            self._reject("use_beta_sigmas", "beta-distributed sigmas need scipy's beta quantiles; use "
                                            "use_karras_sigmas or use_exponential_sigmas")

    @classmethod
    def _get_compatibles(cls):
        names = sorted(set([cls.__name__] + list(cls._compatibles)))
        return [_OURS.get(n) or getattr(_d, n) for n in names if n in _OURS or hasattr(_d, n)]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def stepper(self):
        """The :mod:`pydiff.solvers` stepper that runs the fused steps."""
        return self._solver

    # -------------------------------------------------------------- timesteps
    def _publish(self, ts: torch.Tensor, device) -> None:
        """Keep a host copy of the schedule (for lookups) and expose it on ``device``."""
        ts = ts.detach()
        self._dev_cache = {}
        self._ts_host = ts.cpu().numpy().copy()
        self.timesteps = ts.to(device) if device is not None else ts

    def _index_by_value(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule (the second match if it occurs twice, as diffusers)."""
        if schedule_timesteps is None and self._ts_host is not None:
            hits = np.flatnonzero(self._ts_host == _host_value(timestep))
        else:
            sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(sched.device)
            hits = (sched == timestep).nonzero().flatten().cpu().numpy()
        if len(hits) == 0:
            if self._missing_index == "last":
                return len(self.timesteps) - 1
            raise IndexError(f"{type(self).__name__}: timestep {_host_value(timestep)} is not one of the scheduler's "
                             "timesteps (pass an element of scheduler.timesteps)")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _index_of(self, timestep) -> int:
        """Index of ``timestep`` with diffusers' by-value rule (the second match when the value occurs
        twice).  When ``timestep`` is an element of ``self.timesteps`` its value is read from the host
        copy of the schedule (found through the tensor's storage offset): no device read."""
        i = _view_index(timestep, self.timesteps)
        if i is None or self._ts_host is None:
            return self._index_by_value(timestep)
        hits = np.flatnonzero(self._ts_host == self._ts_host[i])
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _need_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")

    # -------------------------------------------------------------- tensors
    def _inputs(self, model_output, sample, model_uncond):
        """Cast the model output(s) to the sample's dtype for the fused op; the dtype to return."""
        rule = self._result_dtype
        out_dtype = (model_output.dtype if rule == "model" else sample.dtype if rule == "sample"
                     else torch.promote_types(model_output.dtype, sample.dtype))
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        if model_uncond is not None and model_uncond.dtype != sample.dtype:
            model_uncond = model_uncond.to(sample.dtype)
        return model_output, model_uncond, out_dtype

    def _on(self, name: str, t: torch.Tensor, device, dtype) -> torch.Tensor:
        """``t`` on ``device``/``dtype``, cached (tables used by add_noise)."""
        key = (name, device, dtype)
        if key not in self._dev_cache:
            self._dev_cache[key] = t.to(device=device, dtype=dtype)
        return self._dev_cache[key]

    def _vp_add_noise(self, original_samples, noise, timesteps):
        """``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]`` (training timesteps)."""
        ac = self._on("ac", self.alphas_cumprod, original_samples.device, original_samples.dtype)
        a = ac[timesteps.to(original_samples.device)]
        return _bcast(a ** 0.5, original_samples) * original_samples + _bcast((1 - a) ** 0.5, original_samples) * noise

    def _vp_velocity(self, sample, noise, timesteps):
        ac = self._on("ac", self.alphas_cumprod, sample.device, sample.dtype)
        a = ac[timesteps.to(sample.device)]
        return _bcast(a ** 0.5, sample) * noise - _bcast((1 - a) ** 0.5, sample) * sample

    def _noise_indices(self, timesteps) -> list:
        """Schedule positions for add_noise: by value without a begin index, else the current position."""
        n = timesteps.reshape(-1).shape[0]
        if self.begin_index is None:
            vals = timesteps.detach().reshape(-1).cpu()
            return [self._index_by_value(v) for v in vals]
        if self.step_index is not None:
            return [self.step_index] * n
        return [self.begin_index] * n


class _Indexed:
    """``step_index`` / ``begin_index`` of diffusers' stateful schedulers."""

    @property
    def step_index(self):
        """Index of the current timestep; None before the first step, +1 after each step."""
        return self._step_index

    @property
    def begin_index(self):
        """Index of the first timestep, set by pipelines with :meth:`set_begin_index` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule (the second match if it occurs twice, as diffusers)."""
        return self._index_by_value(timestep, schedule_timesteps)

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self._index_of(timestep)


# ------------------------------------------------------------------------------------------------
# DDIM
# ------------------------------------------------------------------------------------------------
class DDIMScheduler(_FusedScheduler):
    """DDIM (Song et al. 2021, eq. 12) as one fused kernel per step; drop-in for
    ``diffusers.DDIMScheduler``.  With ``a = alphas_cumprod[t]`` and ``a'`` at ``t - T // n``::

        x0 = clamp((x - sqrt(1 - a) eps) / sqrt(a)),   s = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
        x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z

    ``step(model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
    variance_noise=None, return_dict=True)`` -> ``DDIMSchedulerOutput(prev_sample,
    pred_original_sample)``, tensors ``[B, ...]``.  The step is a function of ``timestep`` (looked up
    in ``timesteps``), as diffusers'.  Not supported: ``thresholding=True``.
    """

    _theirs = _d.DDIMScheduler
    _compatibles = list(_d.DDIMScheduler._compatibles)
    order = 1

    @register_to_config
    @_mirror(_d.DDIMScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        self._solver = DDIMSolver.from_config(self.config)
        self.alphas_cumprod = torch.from_numpy(self._solver.alphas_cumprod).float()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.arange(0, self.config.num_train_timesteps)[::-1].copy().astype(np.int64))

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        check_num_inference_steps(num_inference_steps, required=True)
        if num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                             f"`self.config.train_timesteps`: {self.config.num_train_timesteps}")
        self._solver.set_timesteps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self._publish(self._solver.timesteps, device)

    def _get_variance(self, timestep, prev_timestep):
        a = self.alphas_cumprod[timestep]
        ap = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - ap) / (1 - a) * (1 - a / ap)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True, *, model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        self._need_timesteps()
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either `generator` "
                             "or `variance_noise` stays `None`.")
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        s = self._solver
        s.step_index = self._index_of(timestep)
        prev = s.step(m, sample, model_uncond=u, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                      eta=eta, use_clipped_model_output=use_clipped_model_output,
                      noise=variance_noise if eta > 0 else None, generator=generator)
        prev, x0 = _as(prev, out_dtype), s.pred_original_sample
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        return self._vp_add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        return self._vp_velocity(sample, noise, timesteps)


# ------------------------------------------------------------------------------------------------
# DDPM
# ------------------------------------------------------------------------------------------------
class DDPMScheduler(_FusedScheduler):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) as one fused kernel per step; drop-in for
    ``diffusers.DDPMScheduler``.  With ``a``, ``a'`` the alphas_cumprod of this and the next timestep,
    ``b = 1 - a / a'``::

        x0 = clamp(x0(x, m)),   x' = sqrt(a') b / (1 - a) x0 + sqrt(1 - b) (1 - a') / (1 - a) x + std z

    (``z`` only for ``t > 0``).  ``variance_type`` fixed_small / fixed_small_log / fixed_large are
    fused; learned / learned_range (model output with 2C channels: mean and variance) compute the
    per-element std in eager torch and fuse the rest.  ``step(model_output, timestep, sample,
    generator=None, return_dict=True)`` -> ``DDPMSchedulerOutput``.  Not supported:
    ``thresholding=True``, ``variance_type='fixed_large_log'`` (diffusers takes the square root of a
    log there, which is NaN).
    """

    _theirs = _d.DDPMScheduler
    _compatibles = list(_d.DDPMScheduler._compatibles)
    order = 1

    @register_to_config
    @_mirror(_d.DDPMScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        c = self.config
        if c.variance_type == "fixed_large_log":
            self._reject("variance_type", "diffusers' fixed_large_log step takes sqrt(log(beta)), NaN")
        if c.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
            raise ValueError(f"variance_type={c.variance_type!r}: expected fixed_small, fixed_small_log, fixed_large, "
                             "learned or learned_range")
        cfg = dict(c)
        if c.trained_betas is None and c.beta_schedule == "laplace":
            cfg["trained_betas"] = _alpha_bar_betas(c.num_train_timesteps, "laplace")
        if c.variance_type in ("learned", "learned_range"):
            cfg["variance_type"] = "fixed_small"  # the std is formed per element in step()
        self._solver = DDPMSolver.from_config(cfg)
        self.alphas_cumprod = torch.from_numpy(self._solver.alphas_cumprod).float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.variance_type = c.variance_type
        self.timesteps = torch.from_numpy(np.arange(0, c.num_train_timesteps)[::-1].copy())

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None):
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(ts[i] >= ts[i - 1] for i in range(1, len(ts))):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= self.config.num_train_timesteps:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: "
                                 f"{self.config.num_train_timesteps}.")
            self._solver.set_timesteps(timesteps=ts)
            self.custom_timesteps = True
        else:
            if num_inference_steps > self.config.num_train_timesteps:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                 f"`self.config.train_timesteps`: {self.config.num_train_timesteps}")
            self._solver.set_timesteps(num_inference_steps)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
        self._publish(self._solver.timesteps, device)

    def _ensure_schedule(self) -> None:
        """Without set_timesteps diffusers steps the full training chain (t -> t - 1): build it once."""
        if self._ts_host is None:
            T = self.config.num_train_timesteps
            self._solver.set_timesteps(timesteps=list(range(T - 1, -1, -1)))
            self._publish(self._solver.timesteps, None)

    def previous_timestep(self, timestep):
        if self.custom_timesteps or self.num_inference_steps:
            i = self._index_of(timestep)
            return torch.tensor(-1) if i == self.timesteps.shape[0] - 1 else self.timesteps[i + 1]
        return timestep - 1

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        prev_t = self.previous_timestep(t)
        a = self.alphas_cumprod[t]
        ap = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta = 1 - a / ap
        var = torch.clamp((1 - ap) / (1 - a) * beta, min=1e-20)
        vt = self.config.variance_type if variance_type is None else variance_type
        if vt == "fixed_small":
            return var
        if vt == "fixed_small_log":
            return torch.exp(0.5 * torch.log(var))
        if vt == "fixed_large":
            return beta
        if vt == "fixed_large_log":
            return torch.log(beta)
        if vt == "learned":
            return predicted_variance
        frac = (predicted_variance + 1) / 2
        return frac * torch.log(beta) + (1 - frac) * torch.log(var)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        self._ensure_schedule()
        learned = self.variance_type in ("learned", "learned_range")
        pv = None
        if learned and model_output.shape[1] == sample.shape[1] * 2:
            model_output, pv = torch.split(model_output, sample.shape[1], dim=1)
            if model_uncond is not None:
                model_uncond = model_uncond[:, :sample.shape[1]]
        elif learned:
            raise ValueError(f"variance_type={self.variance_type!r}: expected a model output with 2 x "
                             f"{sample.shape[1]} channels (mean and variance), got {model_output.shape[1]}")
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        s = self._solver
        i = self._index_of(timestep)
        s.step_index = i
        if not learned:
            prev = s.step(m, sample, model_uncond=u, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                          generator=generator)
            x0 = s.pred_original_sample
        else:
            prev, x0 = self._learned_step(i, m, sample, u, pv, guidance_scale, guidance_rescale, generator)
        prev = _as(prev, out_dtype)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _learned_step(self, i, m, x, u, pv, g, phi, generator):
        """Learned variance: ``std = sqrt(v)`` (learned) or ``exp((f log b + (1 - f) log var) / 2)`` with
        ``f = (v + 1) / 2`` (learned_range, Nichol & Dhariwal 2021 eq. 15); ``std * z`` goes in as the noise."""
        s = self._solver
        row = StepCoeffs(history=s.step_row(i).k)
        row.v = list(s.step_row(i).v)
        z = None
        if s._draws[i]:
            z = randn_like_diffusers(m.shape, generator, m.device, m.dtype)
            if self.variance_type == "learned":
                std = pv ** 0.5
            else:  # the fixed-small and fixed-large log-variances of this step, as diffusers forms them
                t = int(self._ts_host[i])
                prev = int(self._ts_host[i + 1]) if i + 1 < len(self._ts_host) else -1
                a = self.alphas_cumprod[t]
                ap = self.alphas_cumprod[prev] if prev >= 0 else self.one
                beta = 1 - a / ap
                small = torch.clamp((1 - ap) / (1 - a) * beta, min=1e-20)
                frac = (pv + 1) / 2
                std = torch.exp(0.5 * (frac * torch.log(beta) + (1 - frac) * torch.log(small)))
            z = std * z
            z = z.to(x.dtype)
            row.out(0, z=1.0)
        c = self.config
        clip = (-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else None
        return run_step(row, x, m, u, (), z, guidance_scale=g, guidance_rescale=phi, clip=clip)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        return self._vp_add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        return self._vp_velocity(sample, noise, timesteps)


# ------------------------------------------------------------------------------------------------
# PNDM (PRK warm-up + PLMS)
# ------------------------------------------------------------------------------------------------
_AB = {2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMScheduler(_FusedScheduler):
    """PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", eq. 9-13)
    as one fused kernel per model call; drop-in for ``diffusers.PNDMScheduler``.

    Every call applies the transfer from ``t`` to ``t'`` (``a``, ``a'`` their alphas_cumprod) to a
    linear combination ``E`` of model outputs::

        x' = sqrt(a' / a) s - (a' - a) E / (a sqrt(1 - a') + sqrt(a (1 - a) a'))

    PRK warm-up (``skip_prk_steps=False``, 12 calls = 3 steps): a pseudo 4th-order Runge-Kutta, all
    four calls of a step starting from its first sample ``s``, the fourth with
    ``E = (e1 + 2 e2 + 2 e3 + e4) / 6``; PLMS: Adams-Bashforth mixes of the last 1-4 outputs
    (``(55 e0 - 59 e1 + 37 e2 - 9 e3) / 24``), with diffusers' first-step repeat when PRK is skipped.
    ``v_prediction`` converts the mix: ``E = sqrt(a) V + sqrt(1 - a) s``.  Like diffusers' the step
    depends on the timestep passed and on a call counter; past outputs are kept by reference
    (``ets``).  ``step(model_output, timestep, sample, return_dict=True)`` -> ``SchedulerOutput``.
    """

    _theirs = _d.PNDMScheduler
    _compatibles = list(_d.PNDMScheduler._compatibles)
    order = 1

    @register_to_config
    @_mirror(_d.PNDMScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        c = self.config
        if c.trained_betas is None and c.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise NotImplementedError(f"{c.beta_schedule} is not implemented for {type(self)}")
        if c.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon` or `v_prediction`")
        self._ac64 = train_alphas_cumprod(SolverConfig(dict(c)))
        self.alphas_cumprod = torch.from_numpy(self._ac64).float()
        self._final64 = 1.0 if c.set_alpha_to_one else float(self._ac64[0])
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self._solver = None
        self._reset_state()
        self._timesteps = np.arange(0, c.num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None

    def _reset_state(self) -> None:
        self.counter = 0
        self.cur_sample = None
        self.ets = []
        self._prk_outputs = []

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        check_num_inference_steps(num_inference_steps, required=True)
        c = self.config
        if c.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"{c.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', "
                             "'leading' or 'trailing'.")
        self.num_inference_steps = num_inference_steps
        asc = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)[::-1]
        self._timesteps = asc.copy()
        if c.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].copy()
        else:
            if num_inference_steps < 4:  # (diffusers fails there too, with a numpy broadcasting error)
                raise ValueError(f"num_inference_steps: the PRK warm-up (skip_prk_steps=False) needs at least 4 "
                                 f"steps, got {num_inference_steps}")
            # the 4 lowest-noise steps, each with its midpoint (t + T // n // 2), as diffusers lays them out
            half = c.num_train_timesteps // num_inference_steps // 2
            pairs = np.stack([asc[-4:], asc[-4:] + half], axis=1).reshape(-1)
            self.prk_timesteps = pairs[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = asc[:-3][::-1].copy()
        ts = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._publish(torch.from_numpy(ts), device)
        self._reset_state()

    def _t(self, timestep) -> int:
        i = _view_index(timestep, self.timesteps)
        return int(self._ts_host[i]) if i is not None else int(_host_value(timestep))

    def _transfer(self, t: int, t_prev: int):
        """``(cs, ce, ve)``: ``x' = cs s + ce E`` for an eps mix; v_prediction adds ``ve`` to cs."""
        a = float(self._ac64[t])
        ap = float(self._ac64[t_prev]) if t_prev >= 0 else self._final64
        ce = -(ap - a) / (a * math.sqrt(1.0 - ap) + math.sqrt(a * (1.0 - a) * ap))
        cs = math.sqrt(ap / a)
        if self.config.prediction_type == "v_prediction":
            return cs + ce * math.sqrt(1.0 - a), ce * math.sqrt(a)
        return cs, ce

    def _fused(self, src, t, t_prev, w_now, hist, w_hist, m, u, g, phi, keep_m):
        cs, ce = self._transfer(t, t_prev)
        row = StepCoeffs(history=len(hist)).out(0, x=cs, m=ce * w_now, h=[ce * w for w in w_hist])
        if keep_m:
            row.out(1, m=1.0)  # the (guided) model output, kept as history
        gg, rs = _guidance(m, u, g, phi, None)
        row.v[0] = gg
        return solver_step(src, m, u, list(hist), None, coeffs=row, row_scale=rs)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        if self.counter < len(self.prk_timesteps if self.prk_timesteps is not None else []) and \
                not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict, model_uncond=model_uncond,
                                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        return self.step_plms(model_output, timestep, sample, return_dict, model_uncond=model_uncond,
                              guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
                 model_uncond=None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One of the 4 calls of a pseudo Runge-Kutta step (all from the step's first sample)."""
        self._need_timesteps()
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        t = self._t(timestep)
        k = self.counter % 4
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        t_prev = t - (0 if self.counter % 2 else half)
        t_base = int(self.prk_timesteps[self.counter // 4 * 4])
        keep = u is not None
        if k == 0:
            self.cur_sample = sample
            self._prk_outputs = []
        src = self.cur_sample
        if k < 3:
            out, mm = self._fused(src, t_base, t_prev, 1.0, [], [], m, u, guidance_scale, guidance_rescale, keep)
            mm = mm if keep else m
            self._prk_outputs.append(mm)
            if k == 0:
                self.ets.append(mm)
        else:
            e1, e2, e3 = self._prk_outputs
            out, _ = self._fused(src, t_base, t_prev, 1 / 6, [e1, e2, e3], [1 / 6, 1 / 3, 1 / 3], m, u,
                                 guidance_scale, guidance_rescale, False)
            self._prk_outputs = []
        self.counter += 1
        out = _as(out, out_dtype)
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
                  model_uncond=None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        """One linear multistep call (Adams-Bashforth mix of the latest model outputs)."""
        self._need_timesteps()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(f"{type(self)} can only be run AFTER scheduler has been run in 'prk' mode for at least 12 "
                             "iterations")
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        r = self.config.num_train_timesteps // self.num_inference_steps
        t = self._t(timestep)
        t_cur, t_prev = (t + r, t) if self.counter == 1 else (t, t - r)
        appended = self.counter != 1
        if appended:
            self.ets = self.ets[-3:]
        held = len(self.ets) + (1 if appended else 0)  # outputs held once this one is appended
        src, older, w = sample, [], (1.0,)
        if held == 1 and self.counter == 0:
            self.cur_sample = sample
        elif held == 1 and self.counter == 1:
            src, older, w = self.cur_sample, [self.ets[-1]], (0.5, 0.5)
            self.cur_sample = None
        else:
            w = _AB[min(held, 4)]
            older = self.ets[::-1][: len(w) - 1]  # newest first
        keep = appended and u is not None
        out, mm = self._fused(src, t_cur, t_prev, w[0], older, w[1:], m, u, guidance_scale, guidance_rescale, keep)
        if appended:
            self.ets.append(mm if keep else m)
        self.counter += 1
        out = _as(out, out_dtype)
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        return self._vp_add_noise(original_samples, noise, timesteps)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ and UniPC (multistep, VP or flow sigmas)
# ------------------------------------------------------------------------------------------------
class _MultistepVP(_Indexed, _FusedScheduler):
    _missing_index = "last"

    def _vp_tables(self) -> None:
        ac = torch.from_numpy(np.asarray(self._solver.alphas_cumprod, dtype=np.float32))
        self.alphas_cumprod = ac
        self.alpha_t = torch.sqrt(ac)
        self.sigma_t = torch.sqrt(1 - ac)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.init_noise_sigma = 1.0
        T = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())

    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor):
        """``(alpha_t, sigma_t)`` of a scheduler sigma: flow ``(1 - s, s)``, VP ``(1, s) / sqrt(1 + s^2)``."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def _publish_solver(self, device) -> None:
        s = self._solver
        self.sigmas = s.sigmas.to("cpu")
        self.num_inference_steps = s.num_inference_steps
        self._publish(s.timesteps, device)
        self._step_index = None
        self._begin_index = None
        self.lower_order_nums = 0

    def _first_step(self, timestep) -> None:
        self._need_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
            self._solver._step_index = None
            self._solver._begin_index = self._step_index  # the multistep warm-up restarts there

    def _finish(self, prev: torch.Tensor, out_dtype, return_dict: bool):
        """Step bookkeeping as diffusers' multistep schedulers keep it, then the step's output."""
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev = _as(prev, out_dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        """``alpha_t x0 + sigma_t eps`` at the scheduler sigma of each timestep."""
        sig = self._on("sig", self.sigmas, original_samples.device, original_samples.dtype)
        sigma = _bcast(sig[self._noise_indices(timesteps)], original_samples)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise


class DPMSolverMultistepScheduler(_MultistepVP):
    """Multistep DPM-Solver++ / DPM-Solver (Lu et al. 2022, arXiv:2211.01095, 2206.00927), ODE and SDE,
    orders 1-3, as one fused kernel per step; drop-in for ``diffusers.DPMSolverMultistepScheduler``.

    2M step (``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s``, ``D`` the x0 predictions of
    this and the previous step, ``r = h_prev / h``)::

        x_t = sigma_t / sigma_s x - alpha_t (e^-h - 1) (D0 + (D0 - D1) / (2 r))

    ``step(model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True)`` ->
    ``SchedulerOutput``.  ``variance_type`` learned / learned_range with epsilon prediction use the
    first 3 channels of the model output, as diffusers.  Not supported: ``thresholding=True``,
    ``use_beta_sigmas=True``.
    """

    _theirs = _d.DPMSolverMultistepScheduler
    _compatibles = list(_d.DPMSolverMultistepScheduler._compatibles)
    _result_dtype = "model"
    order = 1

    @register_to_config
    @_mirror(_d.DPMSolverMultistepScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        c = self.config
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and c.final_sigmas_type == "zero":
            raise ValueError(f"`final_sigmas_type` {c.final_sigmas_type} is not supported for `algorithm_type` "
                             f"{c.algorithm_type}. Please choose `sigma_min` instead.")
        if c.algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        if c.solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        cfg = dict(self.config)
        self._slice3 = c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon"
        cfg["variance_type"] = None if self._slice3 else c.variance_type
        self._solver = DPMSolverPPSolver.from_config(cfg)
        self._vp_tables()
        self.lower_order_nums = 0
        self.sigmas = self.sigmas.to("cpu")

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps: Optional[list] = None):
        if mu is not None:
            assert self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"
            self.config.flow_shift = np.exp(mu)  # as diffusers: an attribute on the FrozenDict, not a config key
        self._solver.set_timesteps(num_inference_steps, mu=mu, timesteps=timesteps)
        self._publish_solver(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True, *,
             model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        self._first_step(timestep)
        if self._slice3:
            model_output = model_output[:, :3]
            model_uncond = None if model_uncond is None else model_uncond[:, :3]
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        prev = self._solver.step(m, sample, model_uncond=u, guidance_scale=guidance_scale,
                                 guidance_rescale=guidance_rescale, noise=variance_noise, generator=generator)
        return self._finish(prev, out_dtype, return_dict)


class UniPCMultistepScheduler(_MultistepVP):
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): the UniC corrector of the previous step and the
    UniP predictor of this one in one fused kernel per step; drop-in for
    ``diffusers.UniPCMultistepScheduler``.  Predictor (data prediction, ``B(h)`` = bh1 / bh2)::

        x_t = sigma_t / sigma_s x - alpha_t (e^-h - 1) M_s - alpha_t B(h) sum_k rho_k (M_k - M_s) / r_k

    ``step(model_output, timestep, sample, return_dict=True)`` -> ``SchedulerOutput``.  Not
    supported: ``thresholding=True``, ``use_beta_sigmas=True``, ``solver_p`` (a second scheduler as
    predictor cannot be fused).
    """

    _theirs = _d.UniPCMultistepScheduler
    _compatibles = list(_d.UniPCMultistepScheduler._compatibles)
    _result_dtype = "sample"
    order = 1

    @register_to_config
    @_mirror(_d.UniPCMultistepScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        c = self.config
        if c.solver_p is not None:
            self._reject("solver_p", "an external predictor scheduler cannot be fused into the step")
        if c.solver_type in ("midpoint", "heun", "logrho"):
            self.register_to_config(solver_type="bh2")
        self._solver = UniPCSolver.from_config(dict(self.config))
        self._vp_tables()
        self.predict_x0 = c.predict_x0
        self.disable_corrector = c.disable_corrector
        self.solver_p = None
        self.lower_order_nums = 0
        self.sigmas = self.sigmas.to("cpu")

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas: Optional[list] = None,
                      mu: Optional[float] = None):
        self._solver.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
        self._publish_solver(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        self._first_step(timestep)
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        prev = self._solver.step(m, sample, model_uncond=u, guidance_scale=guidance_scale,
                                 guidance_rescale=guidance_rescale)
        return self._finish(prev, out_dtype, return_dict)


# ------------------------------------------------------------------------------------------------
# Euler and Heun (sigma parameterisation)
# ------------------------------------------------------------------------------------------------
class _SigmaScheduler(_Indexed, _FusedScheduler):
    """Shared by Euler and Heun: ``x = x0 + sigma eps``; the model sees ``x / sqrt(sigma^2 + 1)``."""

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def _publish_solver(self, device) -> None:
        s = self._solver
        self.sigmas = s.sigmas.to("cpu")
        self._publish(s.timesteps, device)
        # 1 / sqrt(sigma^2 + 1) per position, computed as diffusers does (float32) and kept as Python
        # floats: dividing by a Python float equals dividing by diffusers' 0-d tensor, with no host work
        self._in_scale = ((self.sigmas ** 2 + 1) ** 0.5).tolist()
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)`` at the current step (initialising the step index)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._in_scale[self._step_index]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """``x0 + sigma eps`` at the sigma of each timestep."""
        sig = self._on("sig", self.sigmas, original_samples.device, original_samples.dtype)
        sigma = _bcast(sig[self._noise_indices(timesteps)], original_samples)
        return original_samples + noise * sigma

    def _first_step(self, timestep) -> None:
        if self._ts_host is None or self._solver.timesteps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self._step_index is None:
            self._init_step_index(timestep)


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler sampler (Karras et al. 2022, Algorithm 2 with churn) as one fused kernel per step;
    drop-in for ``diffusers.EulerDiscreteScheduler``.  With ``s^ = sigma (1 + gamma)``::

        x^ = x + s_noise sqrt(s^2 - sigma^2) z  (gamma > 0 only),  D = x0(x^, m)
        x' = x^ + (sigma' - s^) (x^ - D) / s^

    ``step(model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0,
    generator=None, return_dict=True)`` -> ``EulerDiscreteSchedulerOutput``.  ``set_timesteps``
    takes custom ``timesteps`` or ``sigmas``.  Not supported: ``use_beta_sigmas=True``, custom
    ``timesteps`` with ``interpolation_type='log_linear'``.
    """

    _theirs = _d.EulerDiscreteScheduler
    _compatibles = list(_d.EulerDiscreteScheduler._compatibles)
    _result_dtype = "model"
    order = 1

    @register_to_config
    @_mirror(_d.EulerDiscreteScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        c = self.config
        if sum(bool(v) for v in (c.use_beta_sigmas, c.use_exponential_sigmas, c.use_karras_sigmas)) > 1:
            raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                             "`config.use_karras_sigmas` can be used.")
        if c.interpolation_type not in ("linear", "log_linear"):
            raise ValueError(f"{c.interpolation_type} is not implemented. Please specify interpolation_type to either "
                             "'linear' or 'log_linear'")
        self._solver = EulerSolver.from_config(dict(c), interpolation_type="linear")  # log_linear: set_timesteps
        ac = torch.from_numpy(self._solver.alphas_cumprod.astype(np.float32))
        self.alphas_cumprod = ac
        sig = (((1 - ac) / ac) ** 0.5).flip(0)
        T = c.num_train_timesteps
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sig])
        else:
            self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).to(torch.float32)
        self.sigmas = torch.cat([sig, torch.zeros(1)])
        self.is_scale_input_called = False
        self.use_karras_sigmas = c.use_karras_sigmas
        self.use_exponential_sigmas = c.use_exponential_sigmas
        self.use_beta_sigmas = c.use_beta_sigmas

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps: Optional[list] = None,
                      sigmas: Optional[list] = None):
        c = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and c[key]:
                raise ValueError(f"Cannot set `timesteps` with `config.{key} = True`.")
        continuous = c.timestep_type == "continuous" and c.prediction_type == "v_prediction"
        if timesteps is not None and continuous:
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        s = self._solver
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        log_sigmas = np.log(s._train_sigmas)
        if sigmas is not None:
            sig = np.array(sigmas).astype(np.float32)
            ts = np.array([_sigma_to_t(x, log_sigmas) for x in sig[:-1]])
            s.set_schedule(sig, ts, num_inference_steps=num_inference_steps)
        elif timesteps is not None or c.interpolation_type == "log_linear":
            if timesteps is not None and c.interpolation_type == "log_linear":
                self._reject("interpolation_type", "log-linear sigmas with custom timesteps")
            n = num_inference_steps
            if timesteps is not None:
                ts = np.array(timesteps).astype(np.float32)
                sig = np.interp(ts, np.arange(0, len(s._train_sigmas)), s._train_sigmas)
            else:
                _, ts = _sigma_schedule(s, n)  # the spacing; the sigmas are log-linear over the training range
                tr = s._train_sigmas
                sig = torch.linspace(np.log(tr[-1]), np.log(tr[0]), n + 1).exp().numpy()
                if c.use_karras_sigmas or c.use_exponential_sigmas:
                    lo = c.sigma_min if c.sigma_min is not None else float(sig[-1])
                    hi = c.sigma_max if c.sigma_max is not None else float(sig[0])
                    sig = karras_sigmas(lo, hi, n) if c.use_karras_sigmas else exponential_sigmas(lo, hi, n)
                    ts = np.array([_sigma_to_t(x, log_sigmas) for x in sig])
            s.set_schedule(np.concatenate([sig, [s.final_sigma()]]), ts, num_inference_steps=n)
        else:
            s.set_timesteps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self._publish_solver(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, *, model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        self._first_step(timestep)
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        s = self._solver
        s.step_index = self._step_index
        prev = s.step(m, sample, model_uncond=u, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                      s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, generator=generator)
        self._step_index += 1
        prev, x0 = _as(prev, out_dtype), s.pred_original_sample
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        if isinstance(timesteps, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`EulerDiscreteScheduler.get_velocity()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        idx = [self._index_by_value(t) for t in timesteps.detach().reshape(-1).cpu()]
        a = self.alphas_cumprod.to(sample)[idx]
        return _bcast(a ** 0.5, sample) * noise - _bcast((1 - a) ** 0.5, sample) * sample


class _HeunX0Solver(HeunSolver):
    """:class:`HeunSolver` whose first-order calls write the x0 estimate as their history output (not
    ``d1 = (x - x0) / sigma``), so that every call returns ``pred_original_sample`` at no extra pass;
    the second-order call forms ``d1`` inside the kernel::

        x' = (1 + dt / (2 sigma)) x - dt / (2 sigma) x0_1 + dt / (2 sigma') (x~ - D(x~, sigma'))
    """

    def _build_rows(self, s) -> list:
        rows = []
        for i in range(len(s) - 1):
            if i % 2 == 0:  # x~ = x + dt (x - D) / sigma, history D
                sigma, nxt = float(s[i]), float(s[i + 1])
                dt = nxt - sigma
                p, q = self._x0(sigma)
                rows.append(StepCoeffs().set(px=p, pm=q).out(0, x=1.0 + dt / sigma, d=-dt / sigma).out(1, d=1.0))
            else:           # history (x, x0_1); x~ and its model output in x, m
                sigma, nxt = float(s[i - 1]), float(s[i])
                dt = nxt - sigma
                p, q = self._x0(nxt)
                h, k = 0.5 * dt / nxt, 0.5 * dt / sigma
                rows.append(StepCoeffs(history=2).set(px=p, pm=q)
                            .out(0, x=h, d=-h, h=[1.0 + k, -k]).out(1, d=1.0))
        return rows


class HeunDiscreteScheduler(_SigmaScheduler):
    """Heun's 2nd-order sampler (Karras et al. 2022, Algorithm 1) as one fused kernel per model call;
    drop-in for ``diffusers.HeunDiscreteScheduler`` (``order = 2``: ``timesteps`` repeats each
    timestep after the first, and ``step`` is called once per entry)::

        d1 = (x - D(x, sigma)) / sigma;  x~ = x + (sigma' - sigma) d1             (first call)
        x' = x + (sigma' - sigma) (d1 + (x~ - D(x~, sigma')) / sigma') / 2        (second call)

    ``step(model_output, timestep, sample, return_dict=True)`` -> ``HeunDiscreteSchedulerOutput``
    (``pred_original_sample`` on every call: the first-order call keeps the x0 estimate as its history
    entry, see :class:`_HeunX0Solver`).  Not supported: ``use_beta_sigmas=True``.
    """

    _theirs = _d.HeunDiscreteScheduler
    _compatibles = list(_d.HeunDiscreteScheduler._compatibles)
    order = 2

    @register_to_config
    @_mirror(_d.HeunDiscreteScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        c = self.config
        if sum(bool(v) for v in (c.use_beta_sigmas, c.use_exponential_sigmas, c.use_karras_sigmas)) > 1:
            raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                             "`config.use_karras_sigmas` can be used.")
        cfg = dict(c)
        if c.trained_betas is None and c.beta_schedule == "exp":
            cfg["trained_betas"] = _alpha_bar_betas(c.num_train_timesteps, "exp")
        elif c.trained_betas is None and c.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise NotImplementedError(f"{c.beta_schedule} is not implemented for {type(self)}")
        self._solver = _HeunX0Solver.from_config(cfg)
        self.alphas_cumprod = torch.from_numpy(self._solver.alphas_cumprod.astype(np.float32))
        self.use_karras_sigmas = c.use_karras_sigmas
        self.set_timesteps(c.num_train_timesteps, None, c.num_train_timesteps)  # as diffusers' __init__

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None, timesteps: Optional[list] = None):
        c = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and c[key]:
                raise ValueError(f"Cannot set `timesteps` with `config.{key} = True`.")
        n = num_inference_steps or len(timesteps)
        s = self._solver
        T = num_train_timesteps or c.num_train_timesteps
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.float32)
            s.set_schedule(np.interp(ts, np.arange(0, len(s._train_sigmas)), s._train_sigmas), ts,
                           num_inference_steps=n)
        elif T != c.num_train_timesteps:  # spacing over another training length, same sigma table
            proxy = type("_Proxy", (), {})()
            proxy.config = SolverConfig({**c, "num_train_timesteps": T})
            proxy._train_sigmas = s._train_sigmas
            sig, ts = _sigma_schedule(proxy, n)
            s.set_schedule(sig, ts, num_inference_steps=n)
        else:
            s.set_timesteps(n)
        self.num_inference_steps = n
        self._publish_solver(device)
        self.prev_derivative = None
        self.dt = None

    @property
    def state_in_first_order(self) -> bool:
        return self._solver.state_in_first_order

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        self._first_step(timestep)
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        s = self._solver
        s.step_index = self._step_index
        first = s.state_in_first_order
        prev = s.step(m, sample, model_uncond=u, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        x0 = s._hist[1] if first else s.pred_original_sample  # first-order calls keep x0 as history
        self._step_index += 1
        prev = _as(prev, out_dtype)
        if not return_dict:
            return prev, x0
        return HeunDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ------------------------------------------------------------------------------------------------
# Flow matching
# ------------------------------------------------------------------------------------------------
class FlowMatchEulerDiscreteScheduler(_Indexed, _FusedScheduler):
    """Rectified-flow Euler (SD3 / FLUX schedule, Esser et al. 2024) as one fused kernel per step;
    drop-in for ``diffusers.FlowMatchEulerDiscreteScheduler``.  ``x_s = (1 - s) x0 + s eps``, the model
    predicts ``v = eps - x0``::

        x' = x + (s' - s) v                                  (ODE)
        x' = (1 - s') (x - s v) + s' z                       (stochastic_sampling=True)

    ``step(model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0,
    generator=None, per_token_timesteps=None, return_dict=True)`` -> ``FlowMatchEulerDiscreteSchedulerOutput``
    (the ``s_*`` arguments are accepted and unused, as in diffusers; ``per_token_timesteps`` runs in
    eager torch).  ``scale_noise`` is the forward process.  Not supported: ``use_beta_sigmas=True``.
    """

    _theirs = _d.FlowMatchEulerDiscreteScheduler
    _compatibles = list(_d.FlowMatchEulerDiscreteScheduler._compatibles)
    _result_dtype = "model"
    order = 1

    @register_to_config
    @_mirror(_d.FlowMatchEulerDiscreteScheduler)
    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)
        self._common_checks()
        self._solver = FlowEulerSolver.from_config(dict(self.config))
        del self.num_inference_steps  # diffusers sets it in set_timesteps only
        s = self._solver
        self.timesteps = s.timesteps
        self.sigmas = s.sigmas.to("cpu")
        self.sigma_min, self.sigma_max = s.sigma_min, s.sigma_max

    @property
    def shift(self) -> float:
        return self._solver.shift

    def set_shift(self, shift: float) -> None:
        self._solver.set_shift(shift)

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas: Optional[list] = None,
                      mu: Optional[float] = None, timesteps: Optional[list] = None):
        if timesteps is not None and sigmas is None:
            logger.warning("`timesteps` were passed without `sigmas`. The timesteps are used as given, while the "
                           "sigmas derived from them go through the scheduler's shifting, so the two may not be "
                           "consistent.")
        s = self._solver
        s.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.num_inference_steps = s.num_inference_steps
        self._publish(s.timesteps, device)
        self.sigmas = s.sigmas.to(device) if device is not None else s.sigmas
        self._step_index = None
        self._begin_index = None

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward process ``s eps + (1 - s) x0`` at the sigma of each timestep."""
        sig = self._on("sig", self.sigmas, sample.device, sample.dtype)
        sigma = _bcast(sig[self._noise_indices(timestep)], sample)
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: Optional[torch.Tensor] = None, return_dict: bool = True, *,
             model_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        if getattr(self, "num_inference_steps", None) is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self._step_index is None:
            self._init_step_index(timestep)
        if per_token_timesteps is not None:
            prev = self._per_token_step(model_output, sample, per_token_timesteps, generator, model_uncond,
                                        guidance_scale)
            self._step_index += 1
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)
        m, u, out_dtype = self._inputs(model_output, sample, model_uncond)
        s = self._solver
        s._begin_index, s._step_index = self._step_index, self._step_index  # single-step: no warm-up to replay
        prev = s.step(m, sample, model_uncond=u, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                      generator=generator)
        self._step_index += 1
        prev = _as(prev, out_dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _per_token_step(self, model_output, sample, per_token_timesteps, generator, model_uncond, g):
        """Per-token sigmas (eager torch): each token steps from its own sigma to the largest schedule
        sigma below it (0 if none); ``x' = x + (s_tok - s_next) v`` as diffusers writes it."""
        if model_uncond is not None:
            model_output = model_uncond + g * (model_output - model_uncond)
        x = sample.to(torch.float32)
        cur = per_token_timesteps / self.config.num_train_timesteps
        sched = self.sigmas.to(cur.device)[:, None, None]
        below = (sched < cur[None] - 1e-6) * sched
        nxt = below.max(dim=0)[0][..., None]
        cur = cur[..., None]
        if self.config.stochastic_sampling:
            x0 = x - cur * model_output
            z = randn_like_diffusers(x.shape, generator, x.device, x.dtype)
            return (1.0 - nxt) * x0 + nxt * z
        return x + (cur - nxt) * model_output


_OURS = {c.__name__: c for c in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                 HeunDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler,
                                 FlowMatchEulerDiscreteScheduler)}
