"""Drop-in diffusers schedulers: per-step time of ``scheduler.step``, pydiff against diffusers.

For each of the 8 schedulers of ``pydiff.integrations.diffusers`` and the diffusers class it
replaces, built from the same config, in the same run: ``set_timesteps(steps)`` and then the
pipeline's loop ``x = scheduler.step(model_output, t, x).prev_sample`` over every timestep, with a
fixed stand-in model output (so the time is the scheduler's own).  Reported per ``step`` call
(Heun makes 2 calls per step, PNDM one more than the steps): the median and the best of the runs,
the two implementations alternating run by run, next to the floor: one read of the sample and the
model output and one write of the result at the measured copy bandwidth.

    python bench/schedulers.py                       # CPU or CUDA, 4x4x128x128, 25 steps
    python bench/schedulers.py --shape 1,16,21,90,160 --steps 25
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _timing import copy_bandwidth, device_name, sync  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# (label, class name, config): the configs of typical checkpoints
CASES = [
    ("DDIM", "DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("DDPM", "DDPMScheduler", dict()),
    ("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", dict(SD)),
    ("Euler", "EulerDiscreteScheduler", dict(SD)),
    ("Heun", "HeunDiscreteScheduler", dict(SD)),
    ("PNDM (PLMS)", "PNDMScheduler", dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    ("UniPC 2M", "UniPCMultistepScheduler", dict(SD)),
    ("FlowMatch Euler", "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
]


def _one_loop(sched, steps, x0, m, device, seed):
    """Seconds per step() call of one whole loop (set_timesteps excluded) and the number of calls."""
    sched.set_timesteps(steps, device=device)
    kw = {}
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator(device=device).manual_seed(seed)
    x = x0
    sync(device)
    t0 = time.perf_counter()
    for t in sched.timesteps:
        x = sched.step(m, t, x, **kw).prev_sample
    sync(device)
    calls = len(sched.timesteps)
    return (time.perf_counter() - t0) / calls, calls


def rows(device, shape=(4, 4, 128, 128), steps=25, reps=7, bw=None):
    """One row per (scheduler, implementation): time per ``step`` call in microseconds (median and best
    of ``reps`` loops; the two implementations alternate, so both see the same machine load)."""
    try:
        import diffusers

        import pydiff.integrations.diffusers as ours_mod
    except ImportError as exc:
        print(f"  diffusers not installed: scheduler benchmark skipped ({exc})")
        return []
    device = torch.device(device)
    diffusers.utils.logging.set_verbosity_error()  # Euler warns when step() runs without scale_model_input
    if bw is None:
        bw = copy_bandwidth(device, (64 << 20) if device.type == "cpu" else (512 << 20))
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, device=device, generator=g)
    m = torch.randn(shape, device=device, generator=g) * 0.5
    floor_s = 3 * x0.numel() * x0.element_size() / bw
    out = []
    for label, name, config in CASES:
        theirs = getattr(diffusers, name)(**config)
        scheds = {"diffusers": theirs, "pydiff": getattr(ours_mod, name).from_config(theirs.config)}
        times = {k: [] for k in scheds}
        calls = {}
        for r in range(reps + 1):  # run 0 warms up
            for impl, sched in scheds.items():
                t, calls[impl] = _one_loop(sched, steps, x0, m, device, r)
                if r:
                    times[impl].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for impl in scheds:
            out.append(dict(shape="x".join(map(str, shape)), scheduler=label, impl=impl, step_us=med[impl] * 1e6,
                            best_us=min(times[impl]) * 1e6, calls=calls[impl], speedup=med["diffusers"] / med[impl],
                            floor_us=floor_s * 1e6, x_floor=med[impl] / floor_s))
    return out


def _table(rs, cols):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}" if v < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rs]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="4,4,128,128")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: leave as is); set "
                    "OMP_NUM_THREADS too for pydiff's OpenMP kernels")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    print(f"# scheduler.step per call, {'x'.join(map(str, shape))} fp32, {args.steps} steps, on {device_name(device)}, "
          f"torch {torch.__version__}")
    rs = rows(device, shape, args.steps, args.reps)
    print(_table(rs, ["scheduler", "impl", "step_us", "best_us", "calls", "speedup", "floor_us", "x_floor"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
