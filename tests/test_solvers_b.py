"""Parity of the DPM-Solver++, UniPC and flow-matching Euler steppers with diffusers' schedulers.

Each case runs a whole trajectory with a small fixed random "model" through the diffusers scheduler
(fed the CFG-combined output computed in torch) and through the pydiff stepper (fed cond and uncond
separately, CFG fused in the op), from the same start and with the same noise, and checks every step:
max |ours - theirs| / max |theirs| <= 1e-5.  Run this file as a script to print the measured errors.
"""
from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pydiff

diffusers = pytest.importorskip("diffusers")
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       UniPCMultistepScheduler)

from pydiff.solvers.dpmpp import DPMSolverPPSolver  # noqa: E402
from pydiff.solvers.flow import FlowEulerSolver  # noqa: E402
from pydiff.solvers.unipc import UniPCSolver  # noqa: E402

# diffusers' own deprecation notices (dpmsolver / sde-dpmsolver, numpy copy=) are not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (2, 4, 8, 8)
RTOL = 1e-5
BACKENDS = pydiff.available_backends(torch.device("cpu"))
PAIRS = {"dpm": (DPMSolverMultistepScheduler, DPMSolverPPSolver), "unipc": (UniPCMultistepScheduler, UniPCSolver),
         "flow": (FlowMatchEulerDiscreteScheduler, FlowEulerSolver)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _model(seed: int):
    w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 0.3
    return lambda x, t: torch.tanh(F.conv2d(x, w, padding=1) * 0.5 + 0.1 * math.sin(float(t) / 100))


COND, UNCOND = _model(1), _model(2)


def _rescale_noise_cfg(cfg, cond, phi):
    """diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, eq. 15-16), written out."""
    dims = list(range(1, cond.ndim))
    return phi * cfg * (cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)) + (1 - phi) * cfg


def _skip_if_unbuilt(backend: str) -> None:
    if backend == "triton" and importlib.util.find_spec("pydiff.triton_kernels.solver") is None:
        pytest.skip("pydiff.triton_kernels.solver does not exist yet")


def trajectory(kind, config, backend="torch", *, steps=25, g=3.0, rescale=0.0, set_kw=None, noise=None,
               blend=False, dtype=torch.float32, begin=0):
    """Run both trajectories; returns the per-step relative errors (and the two final samples)."""
    sched_cls, solver_cls = PAIRS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = sched_cls(**config)
    solver = solver_cls.from_config(sched.config)
    set_kw = dict(set_kw or {})
    sched.set_timesteps(steps, **set_kw)
    solver.set_timesteps(steps, **set_kw)
    assert solver.timesteps.dtype == sched.timesteps.dtype
    assert torch.equal(solver.timesteps, sched.timesteps), (solver.timesteps, sched.timesteps)
    assert torch.equal(solver.sigmas, sched.sigmas.float())
    if begin:  # start mid-schedule, as img2img pipelines do
        sched.set_begin_index(begin)
        solver.set_begin_index(begin)
    xa = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xb = xa.to(dtype)
    ga, gb, gz = (torch.Generator().manual_seed(7) for _ in range(3))
    other = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    errs = []
    for j, t in enumerate(sched.timesteps[begin:]):
        c, u = COND(xa, t), UNCOND(xa, t)
        m = u + g * (c - u)
        if rescale:
            m = _rescale_noise_cfg(m, c, rescale)
        kw_a, kw_b = {}, {}
        if noise == "generator":
            kw_a["generator"], kw_b["generator"] = ga, gb
        elif noise == "explicit":
            z = torch.randn(SHAPE, generator=gz)
            kw_a["variance_noise"], kw_b["noise"] = z, z.to(dtype)
        xa = sched.step(m, t, xa, **kw_a).prev_sample
        c, u = COND(xb.float(), t).to(dtype), UNCOND(xb.float(), t).to(dtype)
        xb = solver.step(c, xb, model_uncond=u, guidance_scale=g, guidance_rescale=rescale, backend=backend, **kw_b)
        assert xb.dtype == dtype and xb.shape == xa.shape
        if blend and j % 3 == 1:  # the caller replaces the sample between steps (e.g. inpainting)
            xa, xb = 0.8 * xa + 0.2 * other, 0.8 * xb + 0.2 * other.to(dtype)
        errs.append(((xb.double() - xa.double()).abs().max() / xa.double().abs().max()).item())
    return errs, xa, xb


# (id, kind, scheduler config, trajectory kwargs, core): core cases also run on the (slow) Triton interpreter
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOWCFG = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
CASES = [
    # DPM-Solver++
    ("dpm-2m", "dpm", {}, {}, True),
    ("dpm-2m-10steps", "dpm", {}, dict(steps=10), False),
    ("dpm-3m", "dpm", dict(solver_order=3), {}, True),
    ("dpm-3m-10steps", "dpm", dict(solver_order=3), dict(steps=10), False),
    ("dpm-2m-heun", "dpm", dict(solver_type="heun"), {}, False),
    ("dpm-vpred", "dpm", dict(prediction_type="v_prediction"), {}, False),
    ("dpm-sample", "dpm", dict(prediction_type="sample"), {}, False),
    ("dpm-karras-sd", "dpm", dict(use_karras_sigmas=True, **SD), {}, False),
    ("dpm-sigma-min", "dpm", dict(final_sigmas_type="sigma_min"), {}, False),
    ("dpm-3m-karras-sigma-min-10", "dpm", dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
     dict(steps=10), False),
    ("dpm-trailing", "dpm", dict(timestep_spacing="trailing", **SD), {}, False),
    ("dpm-leading", "dpm", dict(timestep_spacing="leading", steps_offset=1, **SD), {}, False),
    ("dpm-cosine-clipped", "dpm", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), {}, False),
    ("dpm-flow", "dpm", dict(flow_shift=3.0, **FLOWCFG), {}, True),
    ("dpm-flow-mu", "dpm", dict(use_dynamic_shifting=True, **FLOWCFG), dict(set_kw=dict(mu=0.8)), False),
    ("dpm-sde-2m", "dpm", dict(algorithm_type="sde-dpmsolver++"), dict(noise="generator"), True),
    ("dpm-sde-2m-noise", "dpm", dict(algorithm_type="sde-dpmsolver++"), dict(noise="explicit"), False),
    ("dpm-sde-3m-karras", "dpm", dict(algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True),
     dict(noise="explicit"), False),
    ("dpm-sde-heun", "dpm", dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), dict(noise="explicit"), False),
    ("dpm-rescale", "dpm", dict(prediction_type="v_prediction", **SD), dict(rescale=0.7), True),
    ("dpm-zero-snr", "dpm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 timestep_spacing="trailing", **SD), {}, False),
    ("dpm-lu-lambdas", "dpm", dict(use_lu_lambdas=True), {}, False),
    ("dpm-exp-sigmas", "dpm", dict(use_exponential_sigmas=True), {}, False),
    ("dpm-euler-at-final", "dpm", dict(euler_at_final=True, final_sigmas_type="sigma_min"), {}, False),
    ("dpm-dpmsolver", "dpm", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), {}, False),
    ("dpm-dpmsolver-3", "dpm", dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"), {},
     False),
    ("dpm-sde-dpmsolver", "dpm", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
     dict(noise="generator"), False),
    ("dpm-3m-img2img", "dpm", dict(solver_order=3), dict(begin=9), False),
    # UniPC
    ("unipc-2", "unipc", {}, {}, False),
    ("unipc-2-10steps", "unipc", {}, dict(steps=10), False),
    ("unipc-3", "unipc", dict(solver_order=3), {}, True),
    ("unipc-3-10steps", "unipc", dict(solver_order=3), dict(steps=10), False),
    ("unipc-bh1", "unipc", dict(solver_type="bh1"), {}, False),
    ("unipc-3-bh1", "unipc", dict(solver_order=3, solver_type="bh1"), {}, False),
    ("unipc-vpred", "unipc", dict(prediction_type="v_prediction", **SD), {}, False),
    ("unipc-sample", "unipc", dict(prediction_type="sample"), {}, False),
    ("unipc-karras", "unipc", dict(use_karras_sigmas=True, **SD), {}, False),
    ("unipc-3-karras", "unipc", dict(solver_order=3, use_karras_sigmas=True), {}, False),
    ("unipc-sigma-min-no-lof", "unipc", dict(final_sigmas_type="sigma_min", lower_order_final=False), {}, False),
    ("unipc-trailing", "unipc", dict(timestep_spacing="trailing", **SD), {}, False),
    ("unipc-disable-corrector", "unipc", dict(disable_corrector=[0, 3, 5], solver_order=3), {}, False),
    ("unipc-1", "unipc", dict(solver_order=1), {}, False),
    ("unipc-flow", "unipc", dict(flow_shift=3.0, **FLOWCFG), {}, False),
    ("unipc-3-flow", "unipc", dict(flow_shift=5.0, solver_order=3, **FLOWCFG), {}, False),
    ("unipc-flow-mu-sigmas", "unipc", dict(use_dynamic_shifting=True, **FLOWCFG),
     dict(set_kw=dict(mu=0.8, sigmas=np.linspace(1.0, 1 / 25, 25))), False),
    ("unipc-eps-model", "unipc", dict(predict_x0=False, final_sigmas_type="sigma_min"), {}, False),
    ("unipc-3-eps-model", "unipc", dict(predict_x0=False, solver_order=3, final_sigmas_type="sigma_min"), {}, False),
    ("unipc-rescale", "unipc", dict(prediction_type="v_prediction", **SD), dict(rescale=0.7), False),
    ("unipc-blend", "unipc", dict(solver_order=3), dict(blend=True), True),
    ("unipc-3-img2img", "unipc", dict(solver_order=3), dict(begin=9), False),
    ("unipc-zero-snr", "unipc", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing", **SD), {}, False),
    # flow-matching Euler
    ("flow-euler", "flow", {}, {}, False),
    ("flow-euler-sd3", "flow", dict(shift=3.0), {}, False),
    ("flow-euler-flux", "flow", dict(use_dynamic_shifting=True, shift=3.0),
     dict(set_kw=dict(sigmas=np.linspace(1.0, 1 / 25, 25), mu=1.15)), True),
    ("flow-euler-mu-linear", "flow", dict(use_dynamic_shifting=True, time_shift_type="linear"),
     dict(set_kw=dict(mu=1.3)), False),
    ("flow-euler-terminal", "flow", dict(shift=3.0, shift_terminal=0.1), {}, False),
    ("flow-euler-karras", "flow", dict(shift=3.0, use_karras_sigmas=True), {}, False),
    ("flow-euler-exp", "flow", dict(shift=3.0, use_exponential_sigmas=True), {}, False),
    ("flow-euler-invert", "flow", dict(shift=3.0, invert_sigmas=True), {}, False),
    ("flow-euler-timesteps", "flow", dict(shift=3.0), dict(set_kw=dict(timesteps=np.linspace(1000, 40, 25))), False),
    ("flow-euler-stochastic", "flow", dict(shift=3.0, stochastic_sampling=True), dict(noise="generator"), True),
    ("flow-euler-img2img", "flow", dict(shift=3.0), dict(begin=9), False),
    ("flow-euler-rescale", "flow", dict(shift=3.0), dict(rescale=0.5), False),
]


def _params():
    out = []
    for case in CASES:
        for b in BACKENDS:
            if b == "triton" and not case[4]:
                continue
            out.append(pytest.param(case[1], case[2], case[3], b, id=f"{case[0]}-{b}"))
    return out


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kind,config,kw,backend", _params())
def test_parity_with_diffusers(kind, config, kw, backend):
    _skip_if_unbuilt(backend)
    errs, _, xb = trajectory(kind, config, backend, **kw)
    assert torch.isfinite(xb).all()
    worst = max(range(len(errs)), key=lambda j: errs[j])
    assert errs[worst] <= RTOL, f"step {worst}: relative difference {errs[worst]:.3e} > {RTOL} (all: {errs})"


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("kind,config", [("dpm", {}), ("unipc", dict(solver_order=3)), ("flow", dict(shift=3.0))])
def test_low_precision_samples_track_fp32(kind, config, dtype, tol):
    errs, _, xb = trajectory(kind, config, "torch", dtype=dtype)
    assert xb.dtype == dtype and errs[-1] <= tol, errs


def test_dpm_repeated_final_sigma_is_finite():
    """Karras + sigma_min ends on the same sigma twice (h = 0): diffusers' 3M/heun give NaN there; the
    stepper takes the limit (the last step returns x) and matches diffusers before it."""
    cfg = dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    solver = DPMSolverPPSolver(**cfg)
    solver.set_timesteps(25)
    assert solver.sigmas[-1] == solver.sigmas[-2]
    errs, xa, xb = trajectory("dpm", cfg)
    assert max(errs[:-1]) <= RTOL and torch.isfinite(xb).all()
    x = torch.randn(SHAPE)
    solver.set_begin_index(24)
    assert torch.equal(solver.step(COND(x, 0), x), x)


def test_unipc_eps_model_onto_sigma_zero_is_finite():
    """predict_x0=False with final sigma 0: diffusers computes 0 * inf (NaN); the stepper uses the
    finite limit, which is the x0 estimate (x - sigma_s eps) / alpha_s."""
    solver = UniPCSolver(predict_x0=False)
    solver.set_timesteps(10)
    x = torch.randn(SHAPE)
    for t in solver.timesteps:
        x = solver.step(COND(x, t), x)
    assert torch.isfinite(x).all()


def test_sde_noise_from_generator_matches_explicit_noise():
    a, b = DPMSolverPPSolver(algorithm_type="sde-dpmsolver++"), DPMSolverPPSolver(algorithm_type="sde-dpmsolver++")
    a.set_timesteps(5)
    b.set_timesteps(5)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xa = xb = torch.randn(SHAPE)
    for t in a.timesteps:
        xa = a.step(COND(xa, t), xa, generator=ga)
        xb = b.step(COND(xb, t), xb, noise=torch.randn(SHAPE, generator=gb))
    assert torch.equal(xa, xb)


def test_set_timesteps_resets_state():
    solver = UniPCSolver(solver_order=3)
    runs = []
    for _ in range(2):
        solver.set_timesteps(8)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in solver.timesteps:
            x = solver.step(COND(x, t), x)
        runs.append(x)
    assert torch.equal(runs[0], runs[1])
    assert solver.step_index == 8
    with pytest.raises(IndexError, match="past the last"):
        solver.step(COND(x, 0), x)


@pytest.mark.parametrize("cls,config,exc,match", [
    (DPMSolverPPSolver, dict(thresholding=True), NotImplementedError, "thresholding"),
    (DPMSolverPPSolver, dict(variance_type="learned_range"), NotImplementedError, "variance_type"),
    (DPMSolverPPSolver, dict(use_beta_sigmas=True), NotImplementedError, "use_beta_sigmas"),
    (DPMSolverPPSolver, dict(algorithm_type="heun"), NotImplementedError, "algorithm_type"),
    (DPMSolverPPSolver, dict(solver_type="euler"), NotImplementedError, "solver_type"),
    (DPMSolverPPSolver, dict(solver_order=4), NotImplementedError, "solver_order"),
    (DPMSolverPPSolver, dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
     NotImplementedError, "solver_order"),
    (DPMSolverPPSolver, dict(algorithm_type="dpmsolver"), ValueError, "final_sigmas_type"),
    (DPMSolverPPSolver, dict(algorithm_type="dpmsolver", prediction_type="flow_prediction",
                             final_sigmas_type="sigma_min"), ValueError, "flow_prediction"),
    (DPMSolverPPSolver, dict(prediction_type="x0"), ValueError, "prediction_type"),
    (DPMSolverPPSolver, dict(use_karras_sigmas=True, use_exponential_sigmas=True), ValueError, "only one"),
    (DPMSolverPPSolver, dict(beta_schedule="cosine"), NotImplementedError, "beta_schedule"),
    (DPMSolverPPSolver, dict(clip_sample=True), TypeError, "clip_sample"),
    (UniPCSolver, dict(thresholding=True), NotImplementedError, "thresholding"),
    (UniPCSolver, dict(solver_p=object()), NotImplementedError, "solver_p"),
    (UniPCSolver, dict(use_beta_sigmas=True), NotImplementedError, "use_beta_sigmas"),
    (UniPCSolver, dict(solver_order=5), NotImplementedError, "solver_order"),
    (UniPCSolver, dict(solver_type="bh3"), NotImplementedError, "solver_type"),
    (UniPCSolver, dict(shift_terminal=0.1), ValueError, "shift_terminal"),
    (UniPCSolver, dict(prediction_type="flow_prediction", predict_x0=False), ValueError, "predict_x0"),
    (UniPCSolver, dict(final_sigmas_type="max"), ValueError, "final_sigmas_type"),
    (FlowEulerSolver, dict(use_beta_sigmas=True), NotImplementedError, "use_beta_sigmas"),
    (FlowEulerSolver, dict(time_shift_type="cubic"), ValueError, "time_shift_type"),
    (FlowEulerSolver, dict(use_karras_sigmas=True, use_exponential_sigmas=True), ValueError, "only one"),
    (FlowEulerSolver, dict(prediction_type="epsilon"), TypeError, "prediction_type"),
])
def test_bad_config_raises(cls, config, exc, match):
    with pytest.raises(exc, match=match):
        cls(**config)


def test_bad_set_timesteps_and_step_raise():
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        DPMSolverPPSolver().step(x, x)
    with pytest.raises(ValueError, match="mu"):
        DPMSolverPPSolver(use_flow_sigmas=True).set_timesteps(10, mu=0.5)
    with pytest.raises(ValueError, match="timesteps"):
        DPMSolverPPSolver(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500, 10])
    with pytest.raises(ValueError, match="mu"):
        UniPCSolver(use_flow_sigmas=True, use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError, match="sigmas"):
        UniPCSolver().set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="non-finite"):  # a 2nd-order step onto sigma = 0 diverges (NaN in diffusers)
        UniPCSolver(lower_order_final=False).set_timesteps(10)
    with pytest.raises(ValueError, match="mu"):
        FlowEulerSolver(use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError, match="same length"):
        FlowEulerSolver().set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    solver = FlowEulerSolver()
    solver.set_timesteps(4)
    with pytest.raises(ValueError, match="guidance_rescale"):
        solver.step(x, x, guidance_rescale=0.5)


@pytest.mark.parametrize("cls", [DPMSolverPPSolver, UniPCSolver, FlowEulerSolver])
def test_guidance_scale_without_uncond_raises(cls):
    # one CFG rule for every stepper: a scale that would be silently ignored raises instead
    x = torch.randn(SHAPE)
    solver = cls()
    solver.set_timesteps(4)
    with pytest.raises(ValueError, match="model_uncond"):
        solver.step(x, x, guidance_scale=7.5)
    solver.step(x, x, guidance_scale=1.0)  # no guidance: fine


def test_explicit_timesteps_dpm():
    ts = [999, 700, 500, 300, 100, 20]
    errs, _, _ = trajectory("dpm", {}, set_kw=dict(timesteps=ts), steps=None)
    assert max(errs) <= RTOL


if __name__ == "__main__":  # print the measured worst relative differences
    for cid, kind, cfg, kw, _ in CASES:
        e, _, _ = trajectory(kind, cfg, **kw)
        print(f"{cid:32s} {max(e):.2e}")
