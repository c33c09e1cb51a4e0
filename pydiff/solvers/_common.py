"""Shared float64 schedule math for the per-sampler steppers (host side, numpy float64).

Every stepper computes its coefficients here in float64 and hands them to the fused kernel; none
of this touches a device tensor, so a step never synchronises with the host.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def check_num_inference_steps(n, required: bool = False) -> None:
    """``num_inference_steps``: an int >= 1 (or None where the caller passes timesteps or sigmas
    instead, unless ``required``); a float like 2.5 was floored or failed inside numpy."""
    if n is None and not required:
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {n!r}")


def betas_for(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
              trained_betas=None) -> np.ndarray:
    """Training betas as diffusers defines them, in float64."""
    n = num_train_timesteps
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise NotImplementedError(f"beta_schedule: {beta_schedule!r} is not supported "
                              "(expected linear, scaled_linear or squaredcos_cap_v2)")


def alphas_cumprod_for(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def x0_coeffs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(px, pm) with x0 = px * x + pm * m for a model output m, where x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * x0, alpha^2 + sigma^2 = 1
        return alpha, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "flow_prediction":  # x = (1 - s) x0 + s eps, v = eps - x0
        return 1.0, -sigma
    raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_coeffs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(ex, em) with eps = ex * x + em * m."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma, alpha
    if prediction_type == "sample":
        return 1.0 / sigma, -alpha / sigma
    if prediction_type == "flow_prediction":
        return 1.0, 1.0 - sigma
    raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


class SolverConfig(dict):
    """A stepper's configuration: a dict whose keys read as attributes, like a diffusers config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def randn_like_diffusers(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn as diffusers' ``randn_tensor`` draws it (a CPU generator draws on the CPU; a list
    of generators draws one sample each), so equal seeds give equal noise."""
    device = torch.device(device)
    rand_device = device
    if generator is not None:
        gdev = (generator[0] if isinstance(generator, (list, tuple)) else generator).device
        if gdev.type != device.type:
            if gdev.type != "cpu":
                raise ValueError(f"generator: a {gdev.type} generator cannot draw {device.type} noise")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        z = torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator])
    else:
        z = torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype)
    return z.to(device)


def guidance(model_output, model_uncond, guidance_scale: float, guidance_rescale: float, backend):
    """``(g, row_scale)`` for the fused step: CFG ``m = u + g (c - u)``, optionally rescaled
    (guidance rescale, Lin et al. 2023: ``row_scale`` from :func:`pydiff.cfg_rescale`).

    Every stepper uses this one rule: a guidance scale other than 1 (or a rescale other than 0)
    without ``model_uncond`` raises instead of being ignored.
    """
    g, phi = float(guidance_scale), float(guidance_rescale or 0.0)
    if model_uncond is None:
        if g != 1.0 or phi != 0.0:
            raise ValueError(f"guidance_scale={g}, guidance_rescale={phi}: classifier-free guidance needs "
                             "model_uncond (the unconditional output); pass it, or leave both at 1.0 / 0.0")
        return 1.0, None
    if phi == 0.0:
        return g, None
    from pydiff.ops.solver import cfg_rescale

    return g, cfg_rescale(model_output, model_uncond, g, phi, backend=backend)



# ------------------------------------------------------------------------------------------------
# Evaluation plans: each stepper describes its model evaluations (pydiff.samplers.plan stacks them)
# ------------------------------------------------------------------------------------------------
@dataclass
class Eval:
    """One model evaluation followed by one fused solver step (see :mod:`pydiff.samplers.plan`)."""

    t: float
    in_div: float
    x0: tuple
    coeffs: list
    src: str = "x"
    reads: tuple = ()
    write: Optional[str] = None
    save: tuple = ()
    noise: bool = False
    clip: Optional[tuple] = None

    @property
    def k(self) -> int:
        return len(self.reads)


def vp_x0(pred: str, abar: float):
    """``(px, pm)`` of the x0 estimate of a VP (alphas_cumprod) stepper at ``abar``."""
    return x0_coeffs(pred, math.sqrt(abar), math.sqrt(1.0 - abar)) if pred != "flow_prediction" else (1.0, 0.0)


def clip_range(config) -> Optional[tuple]:
    """``(lo, hi)`` of diffusers' ``clip_sample`` for a stepper config, or None."""
    return (-float(config.clip_sample_range), float(config.clip_sample_range)) if config.get("clip_sample") else None


def sigma_x0(config, sigma: float):
    """``(px, pm)`` of the x0 estimate at scheduler sigma ``sigma`` for the sigma-table steppers
    (DPM-Solver, UniPC)."""
    s = float(sigma)
    if config.prediction_type == "flow_prediction":
        return 1.0, -s
    if config.get("use_flow_sigmas"):
        a, sg = 1.0 - s, s
    else:
        a = 1.0 / math.sqrt(s * s + 1.0)
        sg = s * a
    return x0_coeffs(config.prediction_type, a, sg)
