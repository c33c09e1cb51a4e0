"""``pydiff demo``: sampler accuracy against ground truth, on the CPU in well under a minute.

Pretrained weights cannot be downloaded, so the model is analytic: a Gaussian mixture whose exact
denoiser is closed-form (:mod:`pydiff.testing.gmm`).  Every sampler of :mod:`pydiff.samplers` runs
on it with 5, 10, 20 and 50 steps, and the error is measured

1. as the sliced 2-Wasserstein distance of the samples to the *exact* distribution (2-D mixture and
   an image-sized ``3 x 8 x 8`` one), next to the floor that exact samples of the same size reach;
2. for the deterministic samplers, as the distance to the exact solution of the probability-flow
   ODE from the same starting noise (a 999-step DPM-Solver++(3M) solve), which has no Monte-Carlo
   noise and shows each method's convergence.

All VP samplers use ``timestep_spacing='trailing'`` (every schedule starts at t = 999, where the
starting noise is the right distribution; diffusers' default "leading" spacing for DDIM / DDPM /
PLMS starts lower) and the model's beta schedule.  Prints the tables and writes a PNG: error vs
steps per sampler, sample scatter plots and image grids.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pydiff.samplers import build_plan, sample
from pydiff.testing.gmm import GaussianMixture

SAMPLERS = ["ddim", "ddpm", "plms", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "flow_euler"]
KARRAS = ["euler", "dpmpp_2m", "unipc"]          # extra rows: the same samplers on Karras sigmas
ODE_SAMPLERS = ["ddim", "plms", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]
KARRAS_ODE = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]
STEPS = (5, 10, 20, 50)


def _threads(v: str) -> int:
    """argparse type of ``--threads``: an int in 1..1024 (torch crashes on absurd thread counts)."""
    import argparse

    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int in 1..1024, got {v!r}") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"expected an int in 1..1024, got {n}")
    return n


def _split(label: str):
    name, _, opt = label.partition("+")
    return name, ({"sigmas": opt} if opt else {})


def _run(gm: GaussianMixture, label: str, noise: torch.Tensor, steps: int, seed: int):
    """``label``: a sampler name, optionally ``+karras``.  VP samplers use trailing timesteps and the
    model's beta schedule; flow_euler the flow-matching model."""
    name, extra = _split(label)
    if name == "flow_euler":
        model, kw = gm.model("flow_prediction"), {}
    else:
        model = gm.model("epsilon")
        kw = dict(timestep_spacing="trailing", scheduler_config=model.scheduler_config, **extra)
    g = torch.Generator().manual_seed(seed)
    return sample(model, noise, name, steps, generator=g, progress=False, **kw)


def _nfe(label: str, steps: int) -> int:
    name, extra = _split(label)
    return len(build_plan(name, steps, **extra).evals)


def _table(title: str, rows: dict, steps, fmt: str = "{:.4f}", note: str = "") -> str:
    head = f"{'sampler':<18}" + "".join(f"{f'{s} steps':>11}" for s in steps) + "   model calls"
    lines = [title, head, "-" * len(head)]
    for label, vals in rows.items():
        nfe = ",".join(str(_nfe(label, s)) for s in steps)
        lines.append(f"{label:<18}" + "".join(f"{fmt.format(v):>11}" for v in vals) + f"   {nfe}")
    if note:
        lines.append(note)
    return "\n".join(lines)


def run(out: str = "pydiff_demo.png", n2d: int = 16384, nimg: int = 512, node: int = 1024, steps=STEPS,
        samplers=SAMPLERS, seed: int = 0, plot: bool = True, ode: bool = True, verbose: bool = True) -> dict:
    """Run the demo; returns ``{"sw_2d", "sw_img", "ode_2d", "ode_2d_karras": {label: [errors per
    steps]}, "floor_2d", "floor_img": (mean, std), "steps", "plot", "seconds"}``."""
    t0 = time.time()
    say = print if verbose else (lambda *a, **k: None)
    gm2, gmi = GaussianMixture.toy_2d(), GaussianMixture.toy_image()
    res = {"steps": list(steps)}
    samples = {}
    labels = list(samplers) + [f"{k}+karras" for k in KARRAS if k in samplers]
    for key, gm, n in (("2d", gm2, n2d), ("img", gmi, nimg)):
        noise = torch.randn((n,) + gm.event_shape, generator=torch.Generator().manual_seed(seed))
        floor = gm.sw_floor(n)
        rows = {}
        for label in labels:
            rows[label] = []
            for s in steps:
                x = _run(gm, label, noise, s, seed + 1)
                rows[label].append(gm.sliced_wasserstein(x))
                if s in (10, 20):
                    samples[(key, label, s)] = x
        samples[(key, "exact", 0)] = gm.sample(n, torch.Generator().manual_seed(seed + 2))
        res[f"sw_{key}"], res[f"floor_{key}"] = rows, floor
        what = "2-D mixture (8 anisotropic components)" if key == "2d" else "3x8x8 image mixture (6 components)"
        say(_table(f"\n{what}, {n} samples: sliced W2 distance to the exact distribution", rows, steps,
                   note=f"floor (exact samples, same size): {floor[0]:.4f} +- {floor[1]:.4f}"))
    if ode:
        noise = torch.randn((node, 2), generator=torch.Generator().manual_seed(seed + 3))
        ref = _run(gm2, "dpmpp_3m", noise, 999, seed)
        for key, group, suffix in (("ode_2d", ODE_SAMPLERS, ""), ("ode_2d_karras", KARRAS_ODE, "+karras")):
            rows = {}
            for name in [s for s in group if s in samplers]:
                rows[name + suffix] = [float((_run(gm2, name + suffix, noise, s, seed) - ref).norm(dim=1).mean())
                                       for s in steps]
            res[key] = rows
        say(_table(f"\n2-D mixture, {node} trajectories: mean |x - x_ODE| against a 999-step DPM-Solver++(3M) "
                   "solution from the same noise", {**res["ode_2d"], **res["ode_2d_karras"]}, steps, fmt="{:.2e}",
                   note="(euler+karras is the first-order update DDIM makes, on Karras sigmas; the higher-order "
                        "methods pull away once the steps resolve the schedule: order = slope on the log-log plot)"))
    if plot:
        res["plot"] = _plot(out, res, samples, steps, gmi)
        if res["plot"]:
            say(f"\nplot: {res['plot']}")
    res["seconds"] = time.time() - t0
    say(f"demo took {res['seconds']:.1f} s")
    return res


def _plot(path, res, samples, steps, gmi):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    from matplotlib.ticker import NullFormatter

    fig = plt.figure(figsize=(18, 10))
    gs = fig.add_gridspec(2, 4, height_ratios=[1, 1.1])
    panels = [("sw_2d", "2-D: sliced W2 to the exact distribution", "floor_2d"),
              ("sw_img", "3x8x8 images: sliced W2 to the exact distribution", "floor_img"),
              ("ode_2d", "2-D: |x - exact ODE solution|, trailing steps", None),
              ("ode_2d_karras", "2-D: |x - exact ODE solution|, Karras sigmas", None)]
    for j, (key, title, fkey) in enumerate(panels):
        if key not in res:
            continue
        ax = fig.add_subplot(gs[0, j])
        for name, vals in res[key].items():
            base = _split(name)[0]
            ax.plot(steps, vals, marker="s" if "+" in name else "o", ms=3, label=name,
                    color=f"C{SAMPLERS.index(base)}" if base in SAMPLERS else None,
                    ls=":" if "+" in name else ("--" if base in ("ddim", "euler") else "-"))
        if fkey:
            m, s = res[fkey]
            ax.axhspan(max(m - s, 1e-6), m + s, color="0.85", zorder=0)
            ax.axhline(m, color="0.5", lw=0.8, label="exact-sample floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(steps))
        ax.set_xticklabels([str(s) for s in steps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sampler steps")
        ax.set_title(title, fontsize=10)
        if j in (0, 3):
            ax.legend(fontsize=6, ncol=2, loc="upper right" if j == 0 else "lower left")
    # scatter panels at 20 steps: exact, DDIM, and Euler / DPM-Solver++(2M) on Karras sigmas
    sub = gs[1, 0].subgridspec(2, 2)
    for k, name in enumerate(["exact", "ddim", "euler+karras", "dpmpp_2m+karras"]):
        ax = fig.add_subplot(sub[k // 2, k % 2])
        pts = samples.get(("2d", name, 0 if name == "exact" else 20))
        if pts is None:
            continue
        p = pts[:3000].double()
        ax.scatter(p[:, 0], p[:, 1], s=0.3, alpha=0.5, color="k" if name == "exact" else "C0")
        ax.set_xlim(-1.4, 1.4)
        ax.set_ylim(-1.4, 1.4)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name + ("" if name == "exact" else " (20 steps)"), fontsize=8)
    # image grids: rows = exact, a few samplers at 10 steps
    ax = fig.add_subplot(gs[1, 1:])
    names = ["exact", "ddim", "ddpm", "heun", "dpmpp_2m", "unipc", "flow_euler", "dpmpp_2m+karras"]
    rows = []
    for name in names:
        imgs = samples.get(("img", name, 0 if name == "exact" else 10))
        if imgs is None:
            continue
        r = imgs[:12].double().clamp(-1, 1).add(1).div(2)  # [12, 3, 8, 8] in [0, 1]
        r = torch.nn.functional.pad(r, (1, 1, 1, 1), value=1.0)
        rows.append(torch.cat(list(r), dim=2))         # [3, 10, 120]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([5 + 10 * i for i in range(len(rows))], [n if n == "exact" else f"{n} (10 steps)"
                                                           for n in names
                                                           if ("img", n, 0 if n == "exact" else 10) in samples])
    ax.set_xticks([])
    ax.set_title("3x8x8 Gaussian-mixture images: exact samples and samplers at 10 steps", fontsize=10)
    fig.suptitle("pydiff samplers on an analytic Gaussian mixture (exact denoiser): error vs steps", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pydiff demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="pydiff_demo.png", help="PNG path (default: ./pydiff_demo.png)")
    ap.add_argument("--quick", action="store_true", help="fewer samples and steps (a few seconds)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--threads", type=_threads, default=1,
                    help="torch CPU threads (default 1: the tensors are small, threads only add overhead)")
    args = ap.parse_args(argv)
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.quick:
            run(args.out, n2d=1024, nimg=128, node=256, steps=(5, 10, 20), plot=not args.no_plot)
        else:
            run(args.out, plot=not args.no_plot)
    finally:
        torch.set_num_threads(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
