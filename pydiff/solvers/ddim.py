"""DDIM sampling and DDIM inversion as fused solver steps, plus the helpers the "A" steppers share.

DDIM (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12), with
``a_t = alphas_cumprod[t]`` and ``t' = t - num_train_timesteps // num_inference_steps``::

    x0    = clamp((x - sqrt(1 - a_t) eps) / sqrt(a_t))          # or from v / sample predictions
    s_t   = eta * sqrt((1 - a_t') / (1 - a_t) * (1 - a_t / a_t'))
    x_t'  = sqrt(a_t') x0 + sqrt(1 - a_t' - s_t^2) eps + s_t z

DDIM inversion runs the same deterministic update from the less noisy level to the noisier one.
Every step is one :func:`pydiff.ops.solver_step` call: ``d`` is the (clipped) x0 estimate, ``e``
the eps estimate, output 0 the next sample and output 1 the x0 estimate (``pred_original_sample``).

Schedules mirror diffusers exactly: betas and ``alphas_cumprod`` are built in float32 torch as the
diffusers schedulers build them (so timesteps and tables are bit-identical), then promoted to
float64; every coefficient is computed from them in float64 on the host.  Tensors: ``x`` and the
model outputs share one shape ``[B, ...]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.solvers import _common
from pydiff.solvers._common import SolverConfig, randn_like_diffusers, check_num_inference_steps
from pydiff.solvers._common import Eval, clip_range, vp_x0

__all__ = ["DDIMSolver", "DDIMInverseSolver"]


# ----------------------------------------------------------------------------------------------
# Shared helpers (used by ddim, ddpm, plms, euler and edict).
# ----------------------------------------------------------------------------------------------
class _SolverBase:
    """Config handling shared by the steppers: diffusers keys, defaults, ``from_config``."""

    #: diffusers config keys this stepper understands, with diffusers' defaults.
    _defaults: dict = {}
    order = 1

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self._defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown config key(s) {unknown}; "
                            f"expected some of {sorted(self._defaults)}")
        self.config = SolverConfig({**self._defaults, **config})
        self._check_config()
        self.num_inference_steps = None
        self.timesteps = None
        self.step_index = None

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a diffusers scheduler's ``.config`` (keys other schedulers use are ignored)."""
        cfg = {k: v for k, v in dict(config).items() if k in cls._defaults}
        cfg.update(overrides)
        return cls(**cfg)

    def _check_config(self) -> None:  # overridden
        pass

    def _unsupported(self, key: str, why: str = "") -> None:
        raise NotImplementedError(f"{type(self).__name__}: {key}={self.config[key]!r} is not supported"
                                  + (f" ({why})" if why else ""))

    def _check_choice(self, key: str, allowed) -> None:
        if self.config[key] not in allowed:
            raise ValueError(f"{type(self).__name__}: {key}={self.config[key]!r}; expected one of {tuple(allowed)}")

    def _need_steps(self) -> int:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before step()")
        i = self.step_index
        if i >= self._num_evals():
            raise IndexError(f"{type(self).__name__}: step {i} is past the schedule "
                             f"({self._num_evals()} steps); call set_timesteps() again")
        return i

    def _num_evals(self) -> int:
        return len(self.timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (the variance-preserving samplers feed the sample to the model unscaled)."""
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.config)})"

    def step_row(self, i: int) -> StepCoeffs:
        """The float64 coefficients of step ``i`` (after ``set_timesteps``) as the fused op takes them
        (steppers whose coefficients depend on step options have their own accessor, e.g.
        :meth:`DDIMSolver.coefficient_rows`)."""
        return self._rows[i]

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """``set_timesteps(n)``, then the sampler's model evaluations as a list of
        :class:`pydiff.solvers._common.Eval` (the float64 coefficients of each fused step, the
        registers it reads and writes) and the initial noise scale: what
        :func:`pydiff.samplers.build_plan` stacks into a plan.  ``opts``: the step options
        (DDIM ``eta``, Euler ``s_churn`` ...)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation plan (not a sampler of pydiff.samplers)")


def train_alphas_cumprod(cfg) -> np.ndarray:
    """``alphas_cumprod`` exactly as diffusers builds it (float32 torch), returned as float64 numpy.

    Supports linear, scaled_linear, squaredcos_cap_v2 and sigmoid betas, ``trained_betas`` and
    ``rescale_betas_zero_snr`` (Lin et al. 2023, Algorithm 1).
    """
    n, b0, b1, sched = cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule
    f32 = torch.float32
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(np.asarray(cfg.trained_betas, dtype=np.float64), dtype=f32)
    elif sched == "linear":
        betas = torch.linspace(b0, b1, n, dtype=f32)
    elif sched == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=f32) ** 2
    elif sched == "squaredcos_cap_v2":
        betas = torch.tensor(_common.betas_for(n, b0, b1, sched), dtype=f32)
    elif sched == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (b1 - b0) + b0
    else:
        raise NotImplementedError(f"beta_schedule={sched!r} is not supported "
                                  "(expected linear, scaled_linear, squaredcos_cap_v2 or sigmoid)")
    if cfg.get("rescale_betas_zero_snr", False):
        # Shift sqrt(alphas_cumprod) so the last is 0, scale so the first is unchanged, undo cumprod.
        s = torch.cumprod(1.0 - betas, dim=0).sqrt()
        s_first, s_last = s[0].clone(), s[-1].clone()
        s -= s_last
        s *= s_first / (s_first - s_last)
        abar = s ** 2
        betas = 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


def spaced_timesteps(num_train: int, n: int, spacing: str, offset: int = 0) -> np.ndarray:
    """Descending int64 inference timesteps of diffusers' DDIM / DDPM / PNDM ``set_timesteps``."""
    if not 1 <= n <= num_train:
        raise ValueError(f"num_inference_steps: expected 1..{num_train} (num_train_timesteps), got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (num_train // n))[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / n)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r}; expected 'linspace', 'leading' or 'trailing'")
    return ts.astype(np.int64).copy()


def prediction_coeffs(prediction_type: str, alpha: float, sigma: float, where: str = ""):
    """``(px, pm, ex, em)``: x0 = px x + pm m and eps = ex x + em m for x = alpha x0 + sigma eps."""
    if alpha == 0.0 and prediction_type == "epsilon":
        raise ValueError(f"prediction_type='epsilon' cannot recover x0 where alphas_cumprod = 0{where} "
                         "(zero terminal SNR); use prediction_type='v_prediction'")
    if sigma == 0.0 and prediction_type == "sample":
        raise ValueError(f"prediction_type='sample' cannot recover eps where alphas_cumprod = 1{where}")
    px, pm = _common.x0_coeffs(prediction_type, alpha, sigma)
    ex, em = _common.eps_coeffs(prediction_type, alpha, sigma)
    return px, pm, ex, em


guidance = _common.guidance


def fold(c: StepCoeffs) -> StepCoeffs:
    """The same step with ``d`` and ``e`` substituted into the output rows (valid without a clamp).

    Without clipping, ``x' = A x + M m (+ noise, history)`` directly: no large intermediate x0 (it
    is ~1/sqrt(alphas_cumprod) times the sample at high noise) and no cancellation in ``x - x0``,
    so the fp32 result is closer to the exact one.
    """
    v, k = c.v, c.k
    _, px, pm, ex, em, ed = v[:6]
    ex, em = ex + ed * px, em + ed * pm          # e in terms of x and m
    out = StepCoeffs(history=k)
    for row in (0, 1):
        b = 6 + row * (5 + k)
        rx, rm, rd, re = v[b:b + 4]
        out.v[b] = rx + rd * px + re * ex
        out.v[b + 1] = rm + rd * pm + re * em
        out.v[b + 4:b + 5 + k] = v[b + 4:b + 5 + k]  # z and history terms unchanged
    return out


def run_step(coeffs: StepCoeffs, x, model_output, model_uncond=None, history=(), noise=None, *,
             guidance_scale=1.0, guidance_rescale=0.0, clip=None, backend=None):
    """One fused step with precomputed coefficients and this call's guidance scale."""
    g, row_scale = guidance(model_output, model_uncond, guidance_scale, guidance_rescale, backend)
    v = list(coeffs.v)
    v[0] = g
    return solver_step(x, model_output, model_uncond, list(history), noise, coeffs=v, row_scale=row_scale,
                       clip=clip, backend=backend)


_BETA_KEYS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  trained_betas=None)


# ----------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------
class DDIMSolver(_SolverBase):
    """DDIM sampler (diffusers ``DDIMScheduler``), one fused kernel per step.

    Per step (``a = alphas_cumprod[t]``, ``a' = alphas_cumprod[t - T // n]`` or the final alpha)::

        d  = clamp(x0(x, m))                   # x0 estimate from epsilon / v_prediction / sample
        e  = eps(x, m)  or  (x - sqrt(a) d) / sqrt(1 - a)   with use_clipped_model_output
        s  = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
        x' = sqrt(a') d + sqrt(1 - a' - s^2) e + s z

    ``step(model_output, x, ..., eta=0.0, use_clipped_model_output=False, noise=None,
    generator=None)`` returns ``x'``; with ``eta > 0`` the noise ``z`` is ``noise`` (diffusers'
    ``variance_noise``) or drawn from ``generator`` as diffusers draws it.  After each step
    ``pred_original_sample`` holds ``d``.  Unsupported: ``thresholding=True``.
    """

    _defaults = dict(_BETA_KEYS, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                     clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                     rescale_betas_zero_snr=False)
    init_noise_sigma = 1.0

    def _check_config(self):
        if self.config.thresholding:
            self._unsupported("thresholding", "dynamic thresholding needs a per-sample quantile")
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check_choice("timestep_spacing", ("linspace", "leading", "trailing"))
        self.alphas_cumprod = train_alphas_cumprod(self.config)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        check_num_inference_steps(num_inference_steps, required=True)
        c = self.config
        ts = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        self.num_inference_steps = num_inference_steps
        self._ts = ts
        self.timesteps = torch.from_numpy(ts).to(device)
        self._tables = {}
        self.coefficient_rows(0.0, False)  # the deterministic coefficients now; others on first use
        self.step_index = 0
        self.pred_original_sample = None

    def _alphas(self, i: int):
        t = int(self._ts[i])
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        return t, float(self.alphas_cumprod[t]), (float(self.alphas_cumprod[prev]) if prev >= 0
                                                   else self.final_alpha_cumprod)

    def coefficient_rows(self, eta: float = 0.0, clipped: bool = False) -> list:
        """The float64 :class:`StepCoeffs` of every step (after ``set_timesteps``) for ``eta`` and
        ``use_clipped_model_output`` (``clipped``), as the fused op takes them; cached."""
        key = (float(eta), bool(clipped))
        if key not in self._tables:
            rows = []
            for i in range(len(self._ts)):
                t, a, ap = self._alphas(i)
                sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
                px, pm, ex, em = prediction_coeffs(self.config.prediction_type, sa, sb, f" (timestep {t})")
                ed = 0.0
                if clipped:  # eps re-derived from the clipped x0
                    ex, em, ed = 1.0 / sb, 0.0, -sa / sb
                std = eta * math.sqrt((1.0 - ap) / (1.0 - a) * (1.0 - a / ap))
                dir2 = 1.0 - ap - std * std
                if dir2 < 0:
                    raise ValueError(f"eta={eta}: 1 - alpha_prev - std^2 < 0 at timestep {t} (use eta <= 1)")
                c = (StepCoeffs().set(px=px, pm=pm, ex=ex, em=em, ed=ed)
                     .out(0, d=math.sqrt(ap), e=math.sqrt(dir2), z=std).out(1, d=1.0))
                rows.append(c if self.config.clip_sample else fold(c))
            self._tables[key] = rows
        return self._tables[key]

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        eta = float(opts.get("eta", 0.0))
        if eta < 0:
            raise ValueError(f"eta: expected >= 0, got {eta}")
        rows = self.coefficient_rows(eta, bool(opts.get("use_clipped_model_output", False)))
        pred, clip = self.config.prediction_type, clip_range(self.config)
        evals = []
        for i in range(n):
            t, a, _ = self._alphas(i)
            evals.append(Eval(t=float(t), in_div=1.0, x0=vp_x0(pred, a), coeffs=list(rows[i].v), noise=eta > 0,
                              clip=clip))
        return evals, 1.0

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond=None, guidance_scale=1.0,
             guidance_rescale=0.0, eta: float = 0.0, use_clipped_model_output: bool = False, noise=None,
             generator=None, backend=None) -> torch.Tensor:
        i = self._need_steps()
        if eta < 0:
            raise ValueError(f"eta: expected >= 0, got {eta}")
        coeffs = self.coefficient_rows(eta, use_clipped_model_output)[i]
        z = None
        if eta > 0:
            if noise is not None and generator is not None:
                raise ValueError("pass either noise or generator, not both")
            z = noise if noise is not None else randn_like_diffusers(
                model_output.shape, generator, model_output.device, model_output.dtype)
        clip = (-self.config.clip_sample_range, self.config.clip_sample_range) if self.config.clip_sample else None
        out, x0 = run_step(coeffs, x, model_output, model_uncond, (), z, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, clip=clip, backend=backend)
        self.pred_original_sample = x0
        self.step_index += 1
        return out


class DDIMInverseSolver(_SolverBase):
    """DDIM inversion (diffusers ``DDIMInverseScheduler``): deterministic DDIM run toward noise.

    Timesteps ascend; at step ``i`` with ``t' = timesteps[i]`` and ``t = min(t' - T // n, T - 1)``
    (``a = alphas_cumprod[t]``, or the initial alpha when ``t < 0``; ``a' = alphas_cumprod[t']``)::

        d  = clamp(x0(x, m; a)),   e = eps(x, m; a)
        x' = sqrt(a') d + sqrt(1 - a') e

    ``set_alpha_to_zero`` (deprecated in diffusers) is read as ``set_alpha_to_one``.
    """

    _defaults = dict(_BETA_KEYS, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                     rescale_betas_zero_snr=False, set_alpha_to_zero=None)
    init_noise_sigma = 1.0

    def _check_config(self):
        if self.config.set_alpha_to_zero is not None:
            self.config["set_alpha_to_one"] = self.config.set_alpha_to_zero
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check_choice("timestep_spacing", ("leading", "trailing"))
        self.alphas_cumprod = train_alphas_cumprod(self.config)
        self.initial_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        check_num_inference_steps(num_inference_steps, required=True)
        c = self.config
        ts = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)[::-1]
        ts = ts.copy()
        T = c.num_train_timesteps
        rows = []
        for tp in ts:
            t = min(int(tp) - T // num_inference_steps, T - 1)
            a = float(self.alphas_cumprod[t]) if t >= 0 else self.initial_alpha_cumprod
            ap = float(self.alphas_cumprod[tp])
            px, pm, ex, em = prediction_coeffs(c.prediction_type, math.sqrt(a), math.sqrt(1.0 - a),
                                               f" (timestep {t})")
            c_ = (StepCoeffs().set(px=px, pm=pm, ex=ex, em=em)
                  .out(0, d=math.sqrt(ap), e=math.sqrt(1.0 - ap)).out(1, d=1.0))
            rows.append(c_ if c.clip_sample else fold(c_))
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device)
        self._rows = rows
        self.step_index = 0
        self.pred_original_sample = None

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond=None, guidance_scale=1.0,
             guidance_rescale=0.0, backend=None) -> torch.Tensor:
        i = self._need_steps()
        clip = (-self.config.clip_sample_range, self.config.clip_sample_range) if self.config.clip_sample else None
        out, x0 = run_step(self._rows[i], x, model_output, model_uncond, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, clip=clip, backend=backend)
        self.pred_original_sample = x0
        self.step_index += 1
        return out
