"""25-step sampling loops on a stand-in model: pydiff against what a user runs instead.

The model is a cheap fixed linear map (``0.5 x + cond``, one elementwise kernel) called once per
step on the CFG batch ``cat([x, x])`` (guidance 7.5), so the numbers are the sampling machinery's
own cost.  Per sampler (DDIM, DPM-Solver++ 2M, Euler, UniPC) and shape:

* ``pydiff``: :func:`pydiff.samplers.sample` (plan build + loop, one fused kernel per step);
* ``pydiff graph`` (GPU): the whole loop, model included, replayed from one CUDA graph
  (:class:`pydiff.samplers.CudaGraphSampler`);
* ``diffusers``: the diffusers pipeline loop with the matching scheduler (``set_timesteps``,
  ``scale_model_input``, batched model call, CFG in torch, ``scheduler.step``);
* ``torch.compile``: a plain-torch loop (the same linear step written in torch: CFG combine,
  prediction conversion, multistep update) with the step compiled by ``torch.compile`` (one
  compiled graph for every sampler: coefficients enter as a tensor row), warmed up before timing.

``rows(device, shapes=None) -> list[dict]`` with total ms per 25-step loop, us per step and the
speed-up against diffusers; ``main()`` prints the table (``python bench/loops.py [--device cpu]``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import bench, device_name, sync  # noqa: E402

STEPS = 25
GUIDANCE = 7.5
CASES = [  # (label, pydiff sampler, diffusers scheduler, its config)
    ("DDIM", "ddim", "DDIMScheduler", {"clip_sample": False}),
    ("DPM-Solver++ 2M", "dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("Euler", "euler", "EulerDiscreteScheduler", {}),
    ("UniPC", "unipc", "UniPCMultistepScheduler", {}),
]
CPU_SHAPES = [(4, 4, 128, 128)]
GPU_SHAPES = [(4, 4, 128, 128), (1, 16, 21, 90, 160)]


def stand_in_model(x, t, cond):
    """A fixed linear map: ``0.5 x + cond`` (cond broadcast over the CFG batch)."""
    return 0.5 * x + cond


def _plain_step(x, c, u, h0, h1, co):
    """The step a user writes in plain torch (pydiff's formula, reference/solver.py), K = 2 history
    entries, coefficients as a float32 tensor row ``co`` (so one compiled graph serves all steps)."""
    m = u + co[0] * (c - u)
    d = co[1] * x + co[2] * m
    e = co[3] * x + co[4] * m + co[5] * d
    x_next = co[6] * x + co[7] * m + co[8] * d + co[9] * e + co[11] * h0 + co[12] * h1
    h_new = co[13] * x + co[14] * m + co[15] * d + co[16] * e + co[18] * h0 + co[19] * h1
    return x_next, h_new


def _plain_loop(step_fn, plan, table, x, cond2):
    """Run ``plan`` with ``step_fn`` (history as a rolling window of the last two entries)."""
    zeros = torch.zeros_like(x)
    h = [zeros, zeros]
    for i, e in enumerate(plan.evals):
        xin = x if e.in_div == 1.0 else x / e.in_div
        out = stand_in_model(torch.cat([xin, xin]), None, cond2)
        u, c = out.chunk(2)
        x, hn = step_fn(x, c, u, h[0], h[1], table[i])  # table: a list of separate [20] rows
        if e.write is not None:
            h = [h[1], hn]
    return x


def _plan_table(plan, device):
    """The plan's coefficients padded to K = 2, float32 rows on the device (for the plain loop)."""
    from pydiff.samplers import pad_coeffs

    rows = []
    for e in plan.evals:
        if e.src != "x" or e.k > 2 or e.save or e.noise or e.clip:
            raise ValueError(f"{plan.sampler}: the plain loop handles plain multistep plans only")
        v = pad_coeffs(e.coeffs, e.k, 2)
        v[0] = GUIDANCE
        rows.append(v)
    t = torch.tensor(rows, dtype=torch.float32, device=device)
    return [t[i].clone() for i in range(len(rows))]  # separate tensors: no view offsets to specialise on


def rows(device=None, shapes=None, compile_baseline: bool = True, steps: int = STEPS, out=None) -> list:
    import diffusers

    from pydiff.samplers import CudaGraphSampler, build_plan, sample

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    out = [] if out is None else out  # appended case by case (a run stopped at its limit keeps them)
    compiled = None
    if compile_baseline:
        torch._dynamo.reset()
        compiled = torch.compile(_plain_step, fullgraph=True, dynamic=False)
    for shape in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn(shape, device=device, generator=gen)
        cond = torch.randn(shape, device=device, generator=gen) * 0.1
        uncond = torch.zeros(shape, device=device)
        cond2 = torch.cat([uncond, cond])
        for label, name, dcls, cfg in CASES:
            sched = getattr(diffusers, dcls)(**cfg)

            def run_diffusers():
                sched.set_timesteps(steps, device=device)
                x = noise * sched.init_noise_sigma
                for t in sched.timesteps:
                    xin = sched.scale_model_input(x, t)
                    o = stand_in_model(torch.cat([xin, xin]), t, cond2)
                    u, c = o.chunk(2)
                    x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
                return x

            def run_ours():
                return sample(stand_in_model, noise, name, steps, guidance_scale=GUIDANCE, cond=cond,
                              uncond=uncond, progress=False, scheduler_config=sched.config)

            impls = {"diffusers": run_diffusers, "pydiff": run_ours}
            with torch.no_grad():
                ref, ours = run_diffusers(), run_ours()
            err = ((ours - ref).abs().max() / ref.abs().max()).item()
            if device.type == "cuda":
                g = CudaGraphSampler(stand_in_model, shape, name, steps, guidance_scale=GUIDANCE, cond=cond,
                                     uncond=uncond, scheduler_config=sched.config)
                g.noise.copy_(noise)
                impls["pydiff graph"] = g.replay
            if compiled is not None:
                plan = build_plan(name, steps, scheduler_config=sched.config)
                table = _plan_table(plan, device)
                x_init = noise * plan.init_noise_sigma
                try:
                    with torch.no_grad():
                        _plain_loop(compiled, plan, table, x_init, cond2)  # compile + warm-up
                    sync(device)
                    impls["torch.compile"] = lambda: _plain_loop(compiled, plan, table, x_init, cond2)
                except Exception as exc:  # no compiler toolchain: report, don't fail the run
                    print(f"  torch.compile unavailable: {type(exc).__name__}: {str(exc)[:120]}")
            times = {}
            for iname, fn in impls.items():
                with torch.no_grad():
                    times[iname] = bench(fn, device, warmup=1, reps=7, min_time=0.0)
            for iname, t in times.items():
                out.append(dict(shape="x".join(map(str, shape)), sampler=label, impl=iname, total_ms=t * 1e3,
                                us_per_step=t / steps * 1e6, vs_diffusers=times["diffusers"] / t,
                                max_rel_diff=err if iname == "pydiff" else None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--shape", default=None, help="e.g. 4x4x128x128")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in args.shape.split("x"))] if args.shape else None
    rs = rows(device, shapes, compile_baseline=not args.no_compile)
    print(f"# {STEPS}-step sampling loops, CFG {GUIDANCE}, stand-in model, on {device_name(device)}, "
          f"torch {torch.__version__}")
    cols = ["shape", "sampler", "impl", "total_ms", "us_per_step", "vs_diffusers", "max_rel_diff"]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) and abs(v) < 1e-2 else  # noqa: E731
                                           f"{v:.2f}" if isinstance(v, float) else str(v))
    table = [[fmt(r[c]) for c in cols] for r in rs]
    widths = [max(len(c), *(len(row[j]) for row in table)) for j, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
