"""Sampling plans: every sampler as a fixed program of fused solver steps, one per model evaluation.

A plan is built once, on the host, from a stepper of :mod:`pydiff.solvers` (which owns the float64
coefficient math and its diffusers parity).  It lists, for each model evaluation ``i``:

* ``t``: the timestep the model is called with, ``in_div``: the model sees ``x / in_div``
  (Euler / Heun feed ``x / sqrt(sigma^2 + 1)`` as diffusers' ``scale_model_input``, the VP samplers ``x``);
* ``coeffs``: the flat float64 coefficient vector of :func:`pydiff.solver_step` (the guidance scale,
  slot 0, is filled in by the loop);
* the registers the step reads and writes: ``src`` (the op's ``x``), ``reads`` (its history
  entries, in the op's order), ``write`` (where its history output goes), ``save`` (aliases taken
  before the step, e.g. Heun keeps the step's start, PLMS its first sample);
* ``noise`` (the step draws standard normal noise), ``clip`` (clamp of the x0 estimate);
* ``x0``: ``(px, pm)`` with the x0 estimate ``px * x + pm * m`` for the unscaled model input ``x``
  and the (guided) model output ``m`` (only used for the optional x0 trajectory).

Because the structure (which registers, which noise) is fixed per evaluation and only the numbers
change, the plan can also be stacked into one float64 coefficient table ``[evals, 16 + 2 K]``
(:meth:`Plan.table`): steps that read fewer than ``K`` history entries get zero-coefficient
entries in front (they read a zero tensor), so a device-side step counter can index it from a
CUDA graph.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pydiff.reference.solver import HEAD, ROW, num_coeffs
from pydiff.solvers._common import Eval

__all__ = ["Eval", "Plan", "SAMPLERS", "build_plan", "pad_coeffs", "resolve_sampler"]

ZERO = "0"  # register name of the zero tensor that pads history reads in table mode


def pad_coeffs(v, k: int, K: int) -> list:
    """The coefficient vector of a ``k``-entry step as a ``K``-entry one (``K >= k``): zero
    coefficients for ``K - k`` extra history entries placed *before* the existing ones."""
    if len(v) != num_coeffs(k):
        raise ValueError(f"coeffs: expected {num_coeffs(k)} values for {k} history entries, got {len(v)}")
    if K < k:
        raise ValueError(f"K={K} < k={k}")
    h, r = len(HEAD), len(ROW)
    pad = [0.0] * (K - k)
    row0 = list(v[h:h + r + k])
    row1 = list(v[h + r + k:])
    return list(v[:h]) + row0[:r] + pad + row0[r:] + row1[:r] + pad + row1[r:]


@dataclass
class Plan:
    """A sampler's evaluation program (see the module docstring)."""

    sampler: str
    steps: int
    evals: list
    init_noise_sigma: float
    stepper: object = None
    last_use: dict = field(default_factory=dict)

    def __post_init__(self):
        last = {}
        for i, e in enumerate(self.evals):
            for name in (e.src, *e.reads, *(s for _, s in e.save)):
                if name != "x":
                    last[name] = i
        self.last_use = last

    @property
    def max_history(self) -> int:
        return max((e.k for e in self.evals), default=0)

    def padded_reads(self, i: int, K: Optional[int] = None) -> tuple:
        e = self.evals[i]
        K = self.max_history if K is None else K
        return (ZERO,) * (K - e.k) + tuple(e.reads)

    def table(self, guidance_scale: float = 1.0) -> np.ndarray:
        """float64 ``[evals, 16 + 2 K]`` coefficient table (guidance scale in column 0)."""
        K = self.max_history
        rows = []
        for e in self.evals:
            v = pad_coeffs(e.coeffs, e.k, K)
            v[0] = float(guidance_scale)
            rows.append(v)
        return np.asarray(rows, dtype=np.float64).reshape(len(self.evals), num_coeffs(K))

    def x0_table(self, guidance_scale: float = 1.0) -> np.ndarray:
        """float64 ``[evals, 16]``: coefficients of a history-free step whose output is the x0 estimate."""
        return np.asarray([x0_step_coeffs(e.x0, guidance_scale) for e in self.evals], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.evals)


def x0_step_coeffs(pq, guidance_scale: float = 1.0) -> list:
    """Coefficients of ``d = px x + pm m`` as output 0 (no history, nothing else)."""
    v = [0.0] * num_coeffs(0)
    v[0], v[1], v[2] = float(guidance_scale), float(pq[0]), float(pq[1])
    v[len(HEAD) + ROW.index("d")] = 1.0
    return v


# ------------------------------------------------------------------------------------------------
# Samplers: name -> (stepper class, config forced by the name, step options the stepper takes)
# ------------------------------------------------------------------------------------------------
SAMPLERS = {
    "ddim": ("DDIMSolver", {}, ("eta", "use_clipped_model_output")),
    "ddpm": ("DDPMSolver", {}, ()),
    "dpmpp_2m": ("DPMSolverPPSolver", {"solver_order": 2, "algorithm_type": "dpmsolver++"}, ()),
    "dpmpp_3m": ("DPMSolverPPSolver", {"solver_order": 3, "algorithm_type": "dpmsolver++"}, ()),
    "dpmpp_2m_sde": ("DPMSolverPPSolver", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, ()),
    "plms": ("PLMSSolver", {}, ()),
    "euler": ("EulerSolver", {}, ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "heun": ("HeunSolver", {}, ()),
    "unipc": ("UniPCSolver", {}, ()),
    "flow_euler": ("FlowEulerSolver", {}, ()),
}
_ALIASES = {"dpm++2m": "dpmpp_2m", "dpmpp2m": "dpmpp_2m", "dpm++3m": "dpmpp_3m", "dpmpp3m": "dpmpp_3m",
            "dpm++2m_sde": "dpmpp_2m_sde", "dpmpp_sde": "dpmpp_2m_sde", "pndm": "plms", "flow": "flow_euler",
            "flow_match_euler": "flow_euler", "uni_pc": "unipc"}
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas")


def resolve_sampler(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"sampler: unknown {name!r}; expected one of {sorted(SAMPLERS)}")
    return key


def make_stepper(sampler: str, *, prediction_type=None, timestep_spacing=None, sigmas=None, scheduler_config=None,
                 **config):
    """Build the stepper of ``sampler`` with diffusers-style config keys; returns ``(stepper, step_options)``."""
    import pydiff.solvers as solvers

    name = resolve_sampler(sampler)
    cls_name, forced, step_keys = SAMPLERS[name]
    cls = getattr(solvers, cls_name)
    step_opts = {k: config.pop(k) for k in list(config) if k in step_keys}
    cfg = {}
    if scheduler_config is not None:
        cfg.update({k: v for k, v in dict(scheduler_config).items() if k in cls._defaults})
    cfg.update(config)
    cfg.update(forced)
    if "clip_sample" in cls._defaults and "clip_sample" not in config:
        cfg["clip_sample"] = False  # see sample(): latents are not in [-1, 1]
    if prediction_type is not None:
        if name == "flow_euler":
            if prediction_type not in ("flow_prediction", "flow", "velocity"):
                raise ValueError(f"prediction_type={prediction_type!r}: flow_euler needs a velocity model "
                                 "(prediction_type='flow_prediction')")
        else:
            cfg["prediction_type"] = prediction_type
    if timestep_spacing is not None:
        if name == "flow_euler":
            raise ValueError("timestep_spacing: flow_euler has no timestep spacing (its sigmas are linear in t)")
        cfg["timestep_spacing"] = timestep_spacing
    if sigmas is not None:
        key = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}.get(sigmas)
        if key is None:
            raise ValueError(f"sigmas: expected 'karras', 'exponential' or None, got {sigmas!r}")
        if key not in cls._defaults:
            raise ValueError(f"sigmas={sigmas!r}: sampler {name!r} has no sigma schedule option "
                             "(supported by dpmpp_*, euler, heun, unipc and flow_euler)")
        for k in _SIGMA_KEYS:
            if k in cls._defaults:
                cfg[k] = False
        cfg[key] = True
    unknown = sorted(set(cfg) - set(cls._defaults))
    if unknown:
        raise TypeError(f"sampler {name!r}: unknown option(s) {unknown}; stepper options are "
                        f"{sorted(cls._defaults)}, step options {list(step_keys)}")
    return cls(**cfg), step_opts


def build_plan(sampler: str, steps: int, **options) -> Plan:
    """The evaluation program of ``sampler`` with ``steps`` sampler steps.

    ``options``: ``prediction_type``, ``timestep_spacing``, ``sigmas`` ('karras' / 'exponential'),
    ``scheduler_config`` (a diffusers scheduler config to start from), any config key of the
    stepper (diffusers' names) and the stepper's step options (DDIM ``eta``,
    ``use_clipped_model_output``; Euler ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).
    """
    name = resolve_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    steps = int(steps)
    st, opts = make_stepper(name, **options)
    evals, init_sigma = st.eval_plan(steps, opts)
    return Plan(sampler=name, steps=steps, evals=evals, init_noise_sigma=float(init_sigma), stepper=st)


