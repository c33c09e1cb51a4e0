"""Inversion and editing loops: time per step spent outside the model, pydiff.inversion against the
plain eager torch a user would write (diffusers' DDIMInverseScheduler for DDIM inversion; the papers'
equations in torch for EDICT, edit-friendly DDPM inversion and Direct Inversion), same run, same
device.  The model is a stand-in that returns a precomputed tensor, so the numbers are the loop's
own cost (steps, CFG combine, history traffic), which is what the fused kernels change.

    python bench/inversion.py [--steps 25] [--shape 4 4 128 128] [--guidance 7.5]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _timing import bench, device_name  # noqa: E402
from pydiff import inversion as I  # noqa: E402
from pydiff.solvers.edict import EDICTSolver  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def _schedule(n):
    s = EDICTSolver.from_config(SD)
    s.set_timesteps(n)
    A = lambda t: float(s.alphas_cumprod[t]) if t >= 0 else 1.0  # noqa: E731
    return s.timesteps.tolist(), A


def eager_edict(model, x, n, g, cond, uncond, p=0.93):
    """Wallace et al. 2022 eq. 8-13 in eager torch: generate then invert."""
    ts, A = _schedule(n)
    eps = lambda v, t: (lambda u, c: u + g * (c - u))(model(v, t, uncond), model(v, t, cond))  # noqa: E731
    y = x.clone()
    coef = []
    for t in ts:
        a = (A(t - 1000 // n) / A(t)) ** 0.5
        coef.append((t, a, (1 - A(t - 1000 // n)) ** 0.5 - a * (1 - A(t)) ** 0.5))
    for t, a, b in coef:
        xi = a * x + b * eps(y, t)
        yi = a * y + b * eps(xi, t)
        x = p * xi + (1 - p) * yi
        y = p * yi + (1 - p) * x
    for t, a, b in reversed(coef):
        yi = (y - (1 - p) * x) / p
        xi = (x - (1 - p) * yi) / p
        y = (yi - b * eps(xi, t)) / a
        x = (xi - b * eps(y, t)) / a
    return x, y


def eager_ddpm_invert(model, x0, n, g, cond, uncond):
    ts, A = _schedule(n)
    eps = lambda v, t: (lambda u, c: u + g * (c - u))(model(v, t, uncond), model(v, t, cond))  # noqa: E731
    cur = A(ts[0]) ** 0.5 * x0 + (1 - A(ts[0])) ** 0.5 * torch.randn_like(x0)
    zs = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < n else -1
        a, ap = A(t), A(prev)
        nxt = ap ** 0.5 * x0 + (1 - ap) ** 0.5 * torch.randn_like(x0) if prev >= 0 else x0
        e = eps(cur, t)
        x0p = (cur - (1 - a) ** 0.5 * e) / a ** 0.5
        beta = 1 - a / ap
        mu = ap ** 0.5 * beta / (1 - a) * x0p + (a / ap) ** 0.5 * (1 - ap) / (1 - a) * cur
        w = ((1 - ap) / (1 - a) * beta) ** 0.5 if prev >= 0 else 1.0
        z = (nxt - mu) / w
        zs.append(z)
        cur = mu + w * z
    return zs


def eager_direct_inversion(model, lat, n, g, cond, tgt, uncond):
    ts, A = _schedule(n)
    eps = lambda v, t, c: (lambda u, cc: u + g * (cc - u))(model(v, t, uncond), model(v, t, c))  # noqa: E731
    src = tg = lat[-1]
    for i, t in enumerate(ts):
        a, ap = A(t), A(t - 1000 // n)
        step = lambda v, e: ap ** 0.5 * (v - (1 - a) ** 0.5 * e) / a ** 0.5 + (1 - ap) ** 0.5 * e  # noqa: E731
        s_next = step(src, eps(src, t, cond))
        src = s_next + (lat[n - 1 - i] - s_next)
        tg = step(tg, eps(tg, t, tgt))
    return src, tg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 4, 128, 128])
    ap.add_argument("--guidance", type=float, default=7.5)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, n, g = tuple(args.shape), args.steps, args.guidance
    x0 = torch.randn(shape, device=dev)
    out_c, out_u = torch.randn(shape, device=dev) * 0.1, torch.randn(shape, device=dev) * 0.1
    cond, uncond, tgt = "c", "u", "t"
    model = lambda x, t, c: out_u if c == "u" else out_c  # noqa: E731  (a stand-in: the loop's cost only)
    kw = dict(cond=cond, uncond=uncond, guidance_scale=g, config=SD)
    inv = I.ddim_invert(model, x0, n, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import DDIMInverseScheduler
        sched = DDIMInverseScheduler(**SD)

    def diffusers_ddim_invert():
        sched.set_timesteps(n, device=dev)
        x = x0
        for t in sched.timesteps:
            u, c = model(x, t, uncond), model(x, t, cond)
            x = sched.step(u + g * (c - u), t, x).prev_sample
        return x

    cases = [
        ("DDIM inversion", n, lambda: I.ddim_invert(model, x0, n, **kw), "diffusers DDIMInverseScheduler",
         diffusers_ddim_invert),
        ("EDICT generate + invert", 2 * n,
         lambda: I.edict_invert(model, I.edict_generate(model, x0, n, **kw), n, **kw),
         "eager torch (paper eq. 8-13)", lambda: eager_edict(model, x0, n, g, cond, uncond)),
        ("edit-friendly DDPM inversion", n, lambda: I.ddpm_invert(model, x0, n, **kw), "eager torch (paper eq. 4-5)",
         lambda: eager_ddpm_invert(model, x0, n, g, cond, uncond)),
        ("Direct Inversion edit", n, lambda: I.direct_inversion_edit(model, inv, tgt),
         "eager torch (source + offset, target)", lambda: eager_direct_inversion(model, inv.latents, n, g, cond, tgt,
                                                                                 uncond)),
    ]
    print(f"device: {device_name(dev)}; shape {shape}, {n} steps, guidance {g}; model = stand-in (returns a "
          "stored tensor): time is the loop's own cost")
    print(f"{'loop':32s} {'pydiff us/step':>15s} {'baseline us/step':>17s} {'speedup':>8s}  baseline")
    for name, nsteps, ours, base_name, base in cases:
        t_ours = bench(ours, dev, warmup=1, reps=5) / nsteps * 1e6
        t_base = bench(base, dev, warmup=1, reps=5) / nsteps * 1e6
        print(f"{name:32s} {t_ours:15.1f} {t_base:17.1f} {t_base / t_ours:8.2f}  {base_name}")


if __name__ == "__main__":
    main()
