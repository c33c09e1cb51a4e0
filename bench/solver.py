"""Fused solver-step benchmarks.

Part 1 (kernel): one step with CFG per configuration, each backend against the same math in eager
torch and under torch.compile, with the byte floor (bytes that must move / measured copy bandwidth).
Part 2 (loop): per-step time of a 25-step sampling loop, our steppers against diffusers' schedulers
(the model is a stand-in: a fixed output tensor, so the numbers are the scheduler's own cost).
"""
from __future__ import annotations

import importlib
import math

import torch

import pydiff
from pydiff.ops.solver import StepCoeffs

from _timing import bench, call_time, sync

# name -> (history entries, noise, outputs that a sampler needs written)
CONFIGS = {  # the target (DPM-Solver++ 2M) first: a run stopped at its time limit keeps it
    "dpmpp2m_cfg": (1, False, 2),
    "ddim_cfg": (0, False, 1),
    "dpmpp3m_cfg": (2, False, 2),
    "sde_dpmpp2m_cfg": (1, True, 2),
    "plms_cfg": (3, False, 2),
}


def _coeffs(k: int, noise: bool, outs: int = 2) -> StepCoeffs:
    """The step's coefficients; with ``outs`` 2 it also writes the x0 estimate d as the history entry
    (multistep solvers), with 1 only x_next (DDIM: its history row stays zero, so the op skips that
    write, as the byte floor of ``bytes_needed`` assumes)."""
    c = StepCoeffs(k).set(g=7.5, px=1 / 0.8, pm=-0.6 / 0.8)
    c.out(0, x=0.9, d=0.05, z=0.1 if noise else 0.0, h=[-0.02 * (i + 1) for i in range(k)])
    if outs == 2:
        c.out(1, d=1.0)
    return c


def eager_step(x, u, c, hist, z, co: list, k: int, outs: int = 2):
    """The same step written as a user writes it in eager torch (zero terms skipped); returns
    ``(x_next, d)``, or ``x_next`` alone when ``outs`` is 1."""
    g, px, pm = co[0], co[1], co[2]
    r0 = co[6:6 + 5 + k]
    m = u + g * (c - u)
    d = px * x + pm * m
    out = r0[0] * x + r0[2] * d
    if z is not None:
        out = out + r0[4] * z
    for i in range(k):
        out = out + r0[5 + i] * hist[i]
    return (out, d) if outs == 2 else out


def bytes_needed(numel: int, elem: int, k: int, noise: bool, outs: int) -> int:
    reads = 3 + k + (1 if noise else 0)  # x, u, c, history, noise
    return (reads + outs) * numel * elem


def kernel_rows(device: torch.device, shapes, dtype=torch.float32, compile_baseline=True, bw=None, out=None):
    """Rows per (shape, config, implementation); appended to ``out`` as they are measured (so a run
    stopped at its time limit keeps what it has)."""
    rows = out if out is not None else []
    for shape in shapes:
        numel = math.prod(shape)
        gen = torch.Generator(device=device).manual_seed(0)
        mk = lambda: torch.randn(shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        x, u, c = mk(), mk(), mk()
        hist_all = [mk() for _ in range(3)]
        z = mk()
        for name, (k, noise, outs) in CONFIGS.items():
            co = _coeffs(k, noise, outs)
            hist = hist_all[:k]
            zz = z if noise else None
            nbytes = bytes_needed(numel, x.element_size(), k, noise, outs)
            floor_s = nbytes / bw
            variants = {}
            for b in pydiff.available_backends(device):
                if b == "torch":
                    continue
                if b == "triton" and device.type == "cpu":
                    continue  # the interpreter is a correctness tool, not a backend to time
                variants[f"pydiff[{b}]"] = (lambda b=b: pydiff.solver_step(x, c, u, hist, zz, coeffs=co, backend=b,
                                                                            check=False))
            variants["eager torch"] = lambda: eager_step(x, u, c, hist, zz, co.v, k, outs)
            if compile_baseline:
                torch._dynamo.reset()  # one compile per configuration, no recompile-limit surprises
                cfn = torch.compile(eager_step, fullgraph=True)
                try:
                    cfn(x, u, c, hist, zz, co.v, k, outs)
                    sync(device)
                    variants["torch.compile"] = lambda: cfn(x, u, c, hist, zz, co.v, k, outs)
                except Exception as exc:  # no compiler toolchain: report, don't fail the run
                    print(f"  torch.compile unavailable: {type(exc).__name__}: {str(exc)[:120]}")
            for vname, fn in variants.items():
                t = bench(fn, device)
                rows.append(dict(part="kernel", shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                                 config=name, impl=vname, time_us=t * 1e6, gbps=nbytes / t / 1e9,
                                 floor_us=floor_s * 1e6, x_floor=t / floor_s,
                                 call_us=call_time(fn, device, calls=max(5, min(200, int(0.1 / t)))) * 1e6))
    return rows


# ---------------------------------------------------------------- 25-step loops
LOOP_CASES = [
    # (label, diffusers class, config overrides, our module, our class)
    ("DDIM", "DDIMScheduler", {}, "pydiff.solvers.ddim", "DDIMSolver"),
    ("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {}, "pydiff.solvers.dpmpp", "DPMSolverPPSolver"),
    ("Euler", "EulerDiscreteScheduler", {}, "pydiff.solvers.euler", "EulerSolver"),
    ("PNDM/PLMS", "PNDMScheduler", {"skip_prk_steps": True}, "pydiff.solvers.plms", "PLMSSolver"),
    ("UniPC", "UniPCMultistepScheduler", {}, "pydiff.solvers.unipc", "UniPCSolver"),
    ("FlowMatch Euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "pydiff.solvers.flow", "FlowEulerSolver"),
]


def loop_rows(device: torch.device, shapes, steps: int = 25):
    try:
        import diffusers
    except ImportError:
        print("  diffusers not installed: loop benchmark skipped")
        return []
    rows = []
    for shape in shapes:
        gen = torch.Generator(device=device).manual_seed(1)
        x0 = torch.randn(shape, device=device, generator=gen)
        eps_u = torch.randn(shape, device=device, generator=gen)
        eps_c = torch.randn(shape, device=device, generator=gen)
        for label, dname, over, mod, cls in LOOP_CASES:
            dcls = getattr(diffusers, dname)
            sched = dcls(**over)

            def run_theirs():
                sched.set_timesteps(steps, device=device)
                x = x0
                for t in sched.timesteps:
                    if hasattr(sched, "scale_model_input"):  # a pipeline calls it (Euler needs it)
                        sched.scale_model_input(x, t)
                    m = eps_u + 7.5 * (eps_c - eps_u)  # CFG as a diffusers pipeline does it
                    x = sched.step(m, t, x).prev_sample
                return x

            impls = {"diffusers": run_theirs}
            try:
                ours_cls = getattr(importlib.import_module(mod), cls)
                ours = ours_cls.from_config(sched.config)

                def run_ours():
                    ours.set_timesteps(steps, device=device)
                    x = x0
                    for t in ours.timesteps:
                        if hasattr(ours, "scale_model_input"):
                            ours.scale_model_input(x, t)
                        x = ours.step(eps_c, x, model_uncond=eps_u, guidance_scale=7.5)
                    return x

                impls["pydiff"] = run_ours
            except (ImportError, AttributeError) as exc:
                print(f"  {label}: pydiff stepper unavailable ({exc})")
            for iname, fn in impls.items():
                t = bench(fn, device, warmup=1, reps=3, min_time=0.0)
                rows.append(dict(part="loop", shape="x".join(map(str, shape)), config=label, impl=iname,
                                 time_us=t / steps * 1e6, steps=steps))
    return rows
