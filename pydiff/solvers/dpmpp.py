"""DPM-Solver++ (multistep, 1st-3rd order, ODE and SDE) on the fused solver step.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (2022,
arXiv:2211.01095) and "DPM-Solver" (2022, arXiv:2206.00927).  With ``x_t = alpha_t x0 + sigma_t eps``,
``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s0`` and the data predictions ``D0 = x0(s0)``,
``x0(s1)``, ``x0(s2)`` of the current and the two previous steps, the 2M (midpoint) step is::

    x_t = sigma_t / sigma_s0 * x - alpha_t (e^-h - 1) (D0 + (D0 - x0(s1)) / (2 r0)),  r0 = h_0 / h

and 3M / SDE / heun variants are the same linear form with other coefficients.  Every step is one
``pydiff.ops.solver_step`` call: ``d`` is the converted model output (x0, or eps for the
``dpmsolver`` algorithms), the history entries are the previous ``d`` (oldest first), ``out[1] = d``.

This module also holds the schedule helpers the UniPC and flow steppers share: they reproduce the
float32 schedule tables diffusers builds (so the timesteps are identical), and every coefficient is
then computed from those values in float64 on the host.  Shapes: every tensor is ``[B, ...]``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.solvers._common import (SolverConfig, check_num_inference_steps, eps_coeffs, randn_like_diffusers,
                                    x0_coeffs)
from pydiff.solvers._common import guidance as _common_guidance
from pydiff.solvers._common import Eval, sigma_x0

__all__ = ["DPMSolverPPSolver"]


# --------------------------------------------------------------------------------------------------
# Configuration handling shared by the steppers of this family
# --------------------------------------------------------------------------------------------------
class ConfiguredSolver:
    """Base: ``__init__(**config)`` with the diffusers scheduler's keys and ``from_config``."""

    _defaults: dict = {}
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self._defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown config key(s) {unknown}; expected keys of "
                            f"{sorted(self._defaults)}")
        self.config = SolverConfig({**self._defaults, **config})
        self.num_inference_steps = None
        self.timesteps = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a diffusers scheduler ``.config`` (keys the stepper does not know are ignored)."""
        if hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        kw = {k: v for k, v in dict(config).items() if k in cls._defaults}
        kw.update(overrides)
        return cls(**kw)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.get("num_train_timesteps", 1000)

    def _rebuild(self, begin: int) -> None:
        """Re-plan the steps for a trajectory that starts at step ``begin`` (single-step solvers: no-op)."""

    def _unsupported(self, key: str, why: str = "") -> None:
        raise NotImplementedError(f"{type(self).__name__}: {key}={self.config[key]!r} is not supported"
                                  + (f" ({why})" if why else ""))

    def _next_index(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before step()")
        if self._step_index is None:
            self._step_index = self._begin_index or 0
            if self._step_index:  # starting mid-schedule (img2img): multistep warm-up restarts there
                self._rebuild(self._step_index)
        if self._step_index >= self.num_inference_steps:
            raise IndexError(f"{type(self).__name__}: step {self._step_index} past the last of "
                             f"{self.num_inference_steps} steps; call set_timesteps() again")
        return self._step_index

    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``pydiff.solvers.ddim._SolverBase.eval_plan``)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation plan (not a sampler of pydiff.samplers)")


guidance_args = _common_guidance  # one CFG rule for every stepper (pydiff.solvers._common.guidance)


def with_guidance(coeffs: Sequence[float], g: float) -> list:
    v = list(coeffs)
    v[0] = g
    return v


def noise_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Noise drawn like diffusers' ``randn_tensor(x.shape, generator, x.device, float32)`` (what its
    SDE solvers draw), cast to x's dtype for the fused op."""
    return randn_like_diffusers(x.shape, generator, x.device, torch.float32).to(dtype=x.dtype)


# --------------------------------------------------------------------------------------------------
# Schedules, reproducing the tables diffusers builds (float32 where diffusers uses float32)
# --------------------------------------------------------------------------------------------------
def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alphas_cumprod) so the last one is 0."""
    sq = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sq[0].clone(), sq[-1].clone()
    sq = (sq - last) * (first / (first - last))
    ab = sq ** 2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def vp_alphas_cumprod(cfg) -> np.ndarray:
    """alphas_cumprod exactly as diffusers builds it (float32 betas, float32 cumprod), as float32."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise NotImplementedError(f"beta_schedule={cfg.beta_schedule!r} is not supported "
                                  "(expected linear, scaled_linear or squaredcos_cap_v2)")
    if cfg.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if cfg.get("rescale_betas_zero_snr", False):
        ac[-1] = 2 ** -24
    return ac.numpy()


def vp_sigmas(ac32: np.ndarray) -> np.ndarray:
    """Training sigmas ``sqrt((1 - a) / a)`` in float32, like diffusers."""
    a = torch.from_numpy(ac32)
    return (((1 - a) / a) ** 0.5).numpy()


def spaced_timesteps(spacing: str, n: int, last: int, num_train: int, steps_offset: int) -> np.ndarray:
    """Integer timesteps (descending) for "linspace" / "leading" / "trailing" (Lin et al. 2023, Table 2)."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -num_train / n).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r}: expected 'linspace', 'leading' or 'trailing'")


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating in log sigma (as diffusers does)."""
    ls = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = ls[None, :] - log_sigmas[:, None]
    lo = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[lo], log_sigmas[lo + 1]
    w = np.clip((low - ls) / (low - high), 0, 1)
    return (1 - w) * lo + w * (lo + 1)


def karras_sigmas(smin: float, smax: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``."""
    ramp = np.linspace(0, 1, n)
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def exponential_sigmas(smin: float, smax: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(smax), math.log(smin), n))


def time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift of flow sigmas (SD3 / FLUX): exponential or linear in mu."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if kind == "linear":
        return mu / (mu + (1 / t - 1))
    raise ValueError(f"time_shift_type={kind!r}: expected 'exponential' or 'linear'")


def stretch_to_terminal(t: np.ndarray, terminal: float) -> np.ndarray:
    one_minus = 1 - t
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def alpha_sigma(sig: np.ndarray, flow: bool) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) in float64 from the scheduler sigmas: flow ``(1 - s, s)``, VP ``(1, s) / sqrt(1 + s^2)``."""
    s = np.asarray(sig, dtype=np.float64)
    if flow:
        return 1.0 - s, s
    a = 1.0 / np.sqrt(s * s + 1.0)
    return a, s * a


def log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma = 0 -> inf; bad schedules are caught later
        return np.log(alpha) - np.log(sigma)


def check_finite(name: str, coeffs: StepCoeffs, i: int) -> None:
    if not all(math.isfinite(c) for c in coeffs.v):
        raise ValueError(f"{name}: step {i} has non-finite coefficients {coeffs.v} (degenerate schedule; "
                         "e.g. a higher-order step onto sigma = 0 needs lower_order_final=True)")


# --------------------------------------------------------------------------------------------------
# DPM-Solver++
# --------------------------------------------------------------------------------------------------
_ALGOS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


class DPMSolverPPSolver(ConfiguredSolver):
    """Multistep DPM-Solver++ (2M, 3M, 2M-SDE, ...), matching diffusers' ``DPMSolverMultistepScheduler``.

    Config: the keys of ``DPMSolverMultistepScheduler`` (num_train_timesteps, beta_*, trained_betas,
    solver_order 1-3, prediction_type epsilon / v_prediction / sample / flow_prediction,
    algorithm_type dpmsolver++ / sde-dpmsolver++ (and the deprecated dpmsolver / sde-dpmsolver),
    solver_type midpoint / heun, lower_order_final, euler_at_final, use_karras_sigmas,
    use_exponential_sigmas, use_lu_lambdas, use_flow_sigmas, flow_shift, final_sigmas_type,
    lambda_min_clipped, timestep_spacing, steps_offset, rescale_betas_zero_snr,
    use_dynamic_shifting).  Not supported (NotImplementedError): thresholding, use_beta_sigmas,
    variance_type learned / learned_range (slice the model output to the sample's channels).

    ``step(model_output, x, model_uncond=, guidance_scale=, guidance_rescale=, noise=, generator=)``
    returns the next sample; SDE variants draw noise like diffusers (``generator=``) or take
    ``noise=`` (diffusers' ``variance_noise=``).
    """

    _defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential")

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c.algorithm_type not in _ALGOS + ("deis",):
            raise NotImplementedError(f"algorithm_type={c.algorithm_type!r} is not supported "
                                      f"(expected one of {_ALGOS})")
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and c.final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' is not supported for algorithm_type={c.algorithm_type!r}; "
                             "use 'sigma_min'")
        if c.algorithm_type == "deis":  # diffusers maps these names onto its own solvers
            c["algorithm_type"] = "dpmsolver++"
        if c.solver_type in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        if c.solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"solver_type={c.solver_type!r} is not supported (expected midpoint or heun)")
        if c.thresholding:
            self._unsupported("thresholding", "dynamic thresholding needs a per-sample quantile of x0")
        if c.use_beta_sigmas:
            self._unsupported("use_beta_sigmas")
        if c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon":
            self._unsupported("variance_type", "pass only the predicted-mean channels as the model output")
        if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if not 1 <= int(c.solver_order) <= 3:
            raise NotImplementedError(f"solver_order={c.solver_order!r} is not supported (expected 1, 2 or 3)")
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            self._unsupported("solver_order", "sde-dpmsolver has no third-order update")
        if c.prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise ValueError(f"prediction_type={c.prediction_type!r}: expected epsilon, v_prediction, sample "
                             "or flow_prediction")
        if c.prediction_type == "flow_prediction" and not c.algorithm_type.endswith("++"):
            raise ValueError(f"prediction_type='flow_prediction' needs algorithm_type dpmsolver++ or "
                             f"sde-dpmsolver++, got {c.algorithm_type!r}")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={c.final_sigmas_type!r}: expected 'zero' or 'sigma_min'")
        if c.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"timestep_spacing={c.timestep_spacing!r}: expected linspace, leading or trailing")
        self.alphas_cumprod = vp_alphas_cumprod(c)  # float32, as diffusers
        self._train_sigmas = vp_sigmas(self.alphas_cumprod)
        a = torch.from_numpy(self.alphas_cumprod)
        self._lambda_t = (torch.log(torch.sqrt(a)) - torch.log(torch.sqrt(1 - a))).numpy()
        self._sde = c.algorithm_type.startswith("sde")
        self._coeffs: list = []
        self._hist: list = []

    # ---------------------------------------------------------------- schedule
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        check_num_inference_steps(num_inference_steps)
        c = self.config
        if mu is not None:
            if not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
                raise ValueError("mu: needs use_dynamic_shifting=True and time_shift_type='exponential'")
            c["flow_shift"] = float(np.exp(mu))
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            for k in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas"):
                if c[k]:
                    raise ValueError(f"timesteps: cannot be passed with {k}=True")
            ts = np.array(timesteps).astype(np.int64)
        else:
            idx = int(np.searchsorted(np.flip(self._lambda_t), c.lambda_min_clipped, side="left"))
            ts = spaced_timesteps(c.timestep_spacing, int(num_inference_steps), c.num_train_timesteps - idx,
                                  c.num_train_timesteps, c.steps_offset)
        sig = self._train_sigmas
        log_sig = np.log(sig)
        n = num_inference_steps
        if c.use_karras_sigmas:
            fs = np.flip(sig)
            sig = karras_sigmas(float(fs[-1]), float(fs[0]), n)
            ts = sigma_to_t(sig, log_sig)
            ts = ts if c.beta_schedule == "squaredcos_cap_v2" else ts.round()
        elif c.use_lu_lambdas:
            lam = np.flip(log_sig)
            sig = np.exp(float(lam[0]) + np.linspace(0, 1, n) * (float(lam[-1]) - float(lam[0])))
            ts = sigma_to_t(sig, log_sig)
            ts = ts if c.beta_schedule == "squaredcos_cap_v2" else ts.round()
        elif c.use_exponential_sigmas:
            fs = np.flip(sig)
            sig = exponential_sigmas(float(fs[-1]), float(fs[0]), n)
            ts = sigma_to_t(sig, log_sig)
        elif c.use_flow_sigmas:
            s = 1.0 - np.linspace(1, 1 / c.num_train_timesteps, n + 1)
            sig = np.flip(c.flow_shift * s / (1 + (c.flow_shift - 1) * s))[:-1].copy()
            ts = sig * c.num_train_timesteps
        else:
            sig = np.interp(ts, np.arange(0, len(sig)), sig)
        if c.final_sigmas_type == "sigma_min":
            a0 = torch.from_numpy(self.alphas_cumprod[:1])
            last = float((((1 - a0) / a0) ** 0.5)[0])
        else:
            last = 0.0
        sig32 = np.concatenate([sig, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sig32)
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(self.timesteps)
        self._sig64 = sig32.astype(np.float64)
        self._coeffs = self._build(self._sig64)
        self._hist = []
        self._step_index = None
        self._begin_index = None

    def _rebuild(self, begin: int) -> None:
        self._coeffs = self._build(self._sig64, begin)

    def _orders(self, n: int, begin: int = 0) -> list:
        c, out = self.config, []
        for i in range(n):
            lof = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
            los = i == n - 2 and c.lower_order_final and n < 15
            done = min(max(i - begin, 0), c.solver_order)  # steps taken so far (warm-up of the multistep method)
            if c.solver_order == 1 or done < 1 or lof:
                out.append(1)
            elif c.solver_order == 2 or done < 2 or los:
                out.append(2)
            else:
                out.append(3)
        return out

    def _build(self, sig: np.ndarray, begin: int = 0) -> list:
        c = self.config
        n = len(sig) - 1
        al, sg = alpha_sigma(sig, c.use_flow_sigmas)
        lam = log_snr(al, sg)
        pp = c.algorithm_type.endswith("++")
        table = []
        for i, order in enumerate(self._orders(n, begin)):
            table.append(self._step_coeffs(i, order, sig, al, sg, lam, pp))
        return table

    def _step_coeffs(self, i, order, sig, al, sg, lam, pp):
        c = self.config
        with np.errstate(all="ignore"):  # h = inf on a first-order step onto sigma = 0 (unused terms)
            s0, t = i, i + 1
            at, st, as0, ss0 = al[t], sg[t], al[s0], sg[s0]
            h = lam[t] - lam[s0]
            em1 = np.expm1(-h)              # e^{-h} - 1
            e2 = np.expm1(-2.0 * h)         # e^{-2h} - 1
            ep1 = np.expm1(h)               # e^{h} - 1
            cz = 0.0
            # x_t = A x + c0 D0 + c1 D1 + c2 D2 (+ cz z)
            if c.algorithm_type == "dpmsolver++":
                A, c0 = st / ss0, -at * em1
                c1 = -0.5 * at * em1 if c.solver_type == "midpoint" and order == 2 else at * (em1 / h + 1.0)
                c2 = -at * ((em1 + h) / h ** 2 - 0.5)
            elif c.algorithm_type == "sde-dpmsolver++":
                A, c0 = st / ss0 * np.exp(-h), -at * e2
                c1 = -0.5 * at * e2 if c.solver_type == "midpoint" and order == 2 else at * (e2 / (2.0 * h) + 1.0)
                c2 = at * ((-e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
                cz = st * math.sqrt(max(-e2, 0.0))
            elif c.algorithm_type == "dpmsolver":
                A, c0 = at / as0, -st * ep1
                c1 = -0.5 * st * ep1 if c.solver_type == "midpoint" and order == 2 else -st * (ep1 / h - 1.0)
                c2 = -st * ((ep1 - h) / h ** 2 - 0.5)
            else:  # sde-dpmsolver
                A, c0 = at / as0, -2.0 * st * ep1
                c1 = -st * ep1 if c.solver_type == "midpoint" else -2.0 * st * (ep1 / h - 1.0)
                c2 = 0.0
                cz = st * math.sqrt(max(np.expm1(2.0 * h), 0.0))
            # coefficients of the data/noise predictions m0 (current), m1, m2 (previous)
            w = np.zeros(3)
            w[0] = c0
            if h == 0.0:  # repeated sigma (e.g. Karras + sigma_min ends on sigma_min twice): the limit is x
                A, w[0], cz = 1.0, 0.0, 0.0  # (diffusers gives NaN here for heun / third order)
            elif order >= 2:
                r0 = (lam[s0] - lam[s0 - 1]) / h
                d10 = np.array([1.0, -1.0, 0.0]) / r0
                if order == 2:
                    w += c1 * d10
                else:
                    r1 = (lam[s0 - 1] - lam[s0 - 2]) / h
                    d11 = np.array([0.0, 1.0, -1.0]) / r1
                    w += c1 * (d10 + r0 / (r0 + r1) * (d10 - d11)) + c2 * (d10 - d11) / (r0 + r1)
            if pp:
                if c.prediction_type == "flow_prediction":
                    px, pm = 1.0, -float(sig[s0])
                else:
                    px, pm = x0_coeffs(c.prediction_type, as0, ss0)
            else:
                px, pm = eps_coeffs(c.prediction_type, as0, ss0)
            k = order - 1
            sc = StepCoeffs(history=k).set(px=px, pm=pm)
            sc.out(0, x=A, d=w[0], z=cz, h=[w[j] for j in range(k, 0, -1)]).out(1, d=1.0)
        check_finite(type(self).__name__, sc, i)
        return k, sc.tolist()

    # ---------------------------------------------------------------- step
    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        keep = int(self.config.solver_order) - 1
        ts = self.timesteps.tolist()
        evals = []
        for i in range(len(ts)):
            k, v = self._coeffs[i]
            evals.append(Eval(t=float(ts[i]), in_div=1.0, x0=sigma_x0(self.config, self._sig64[i]), coeffs=list(v),
                              reads=tuple(f"h{j}" for j in range(i - k, i)), write=f"h{i}" if keep else None,
                              noise=bool(self._sde)))
        return evals, 1.0

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0, noise: Optional[torch.Tensor] = None,
             generator=None, backend: Optional[str] = None) -> torch.Tensor:
        """One DPM-Solver step: ``x`` at ``timesteps[i]`` -> the sample at ``timesteps[i + 1]``.

        ``model_output`` is the model's prediction at x (the conditional branch under CFG); with
        ``model_uncond`` the fused op forms ``u + g (c - u)`` (and guidance rescale with
        ``guidance_rescale > 0``).  SDE variants take ``noise`` or draw it from ``generator``.
        """
        i = self._next_index()
        k, coeffs = self._coeffs[i]
        g, row_scale = guidance_args(model_output, model_uncond, guidance_scale, guidance_rescale, backend)
        z = None
        if self._sde:
            z = noise_like(x, generator) if noise is None else noise.to(device=x.device, dtype=x.dtype)
        hist = self._hist[len(self._hist) - k:] if k else []
        x_next, entry = solver_step(x, model_output, model_uncond, hist, z, coeffs=with_guidance(coeffs, g),
                                    row_scale=row_scale, backend=backend)
        keep = self.config.solver_order - 1
        self._hist = (self._hist + [entry])[-keep:] if keep else []
        self._step_index = i + 1
        return x_next
