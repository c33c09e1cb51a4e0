"""pydiff benchmarks: the main job.  Runs on whatever device is present (CUDA if available).

    python bench/run.py                      # all families, default shapes
    python bench/run.py --quick              # small shapes, no torch.compile (a smoke run)
    python bench/run.py --out bench/results  # JSON + PNG plot written there

Prints a table per part: time, achieved GB/s, the byte floor (bytes / measured copy bandwidth) and
time as a multiple of it, next to the baselines a user would run instead, measured in the same run.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import pydiff  # noqa: E402
from _timing import copy_bandwidth, device_name  # noqa: E402

GPU_SHAPES = [(4, 4, 128, 128), (1, 16, 21, 90, 160)]
CPU_SHAPES = [(4, 4, 128, 128), (1, 16, 21, 90, 160)]
QUICK_SHAPES = [(2, 4, 32, 32)]


def _table(rows, cols):
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    line = lambda vals: "  ".join(f"{v:>{w}}" for v, w in zip(vals, widths))  # noqa: E731
    out = [line(cols)]
    for r in rows:
        out.append(line([r.get(c, "") for c in cols]))
    return "\n".join(out)


def _fmt(rows):
    res = []
    for r in rows:
        q = dict(r)
        for key in ("time_us", "floor_us", "call_us"):
            if key in q:
                q[key] = f"{q[key]:.1f}"
        if "gbps" in q:
            q["gbps"] = f"{q['gbps']:.1f}"
        if "x_floor" in q:
            q["x_floor"] = f"{q['x_floor']:.2f}"
        res.append(q)
    return res


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    kern = [r for r in rows if r["part"] == "kernel"]
    shapes = sorted({r["shape"] for r in kern})
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(7 * max(1, len(shapes)), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in kern if r["shape"] == shape]
        configs = list(dict.fromkeys(r["config"] for r in sub))
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        w = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = [next((r["x_floor"] for r in sub if r["config"] == c and r["impl"] == impl), 0) for c in configs]
            ax.bar([i + j * w for i in range(len(configs))], vals, w, label=impl)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(configs))], configs, rotation=20)
        ax.set_ylabel("time / byte floor (lower is better)")
        ax.set_yscale("log")
        ax.set_title(f"solver step {shape}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _fmt_row(r):
    q = {}
    for k, v in r.items():
        if isinstance(v, float):
            q[k] = f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        elif v is None:
            q[k] = "-"
        else:
            q[k] = v
    return q


PARTS = ("solver", "loop", "sampling", "schedulers", "loops", "masked", "invertible", "invertible_ops", "quant",
         "overhead")


class _Deadline(Exception):
    """SIGTERM (``timeout`` ran out): stop measuring, still write the rows measured so far."""


def _on_term(signum, frame):
    raise _Deadline()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, no torch.compile baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-loop", action="store_true", help="skip the 25-step loop comparison")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.no_loop:
        parts = [p for p in parts if p != "loop"]
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    bw = copy_bandwidth(device, (64 << 20) if device.type == "cpu" else (512 << 20))
    info = dict(device=device_name(device), torch=torch.__version__, pydiff=pydiff.build_info(),
                copy_gbps=bw / 1e9, date=time.strftime("%Y-%m-%d"))
    print(f"# pydiff bench on {info['device']}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    signal.signal(signal.SIGTERM, _on_term)
    try:
        _run_parts(args, parts, device, shapes, bw, rows)
    except _Deadline:
        print(f"\n# stopped by SIGTERM (time limit): writing the {len(rows)} rows measured so far")
        info["truncated"] = True
    os.makedirs(args.out, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    with open(os.path.join(args.out, f"bench_{tag}.json"), "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1, default=str)
    if any(r.get("part") == "kernel" for r in rows):
        plot(rows, os.path.join(args.out, f"solver_{tag}.png"))
    return 0


def _run_parts(args, parts, device, shapes, bw, rows):
    """Run the parts, appending to ``rows`` as each finishes (the solver and sampling parts row by row)."""
    import solver as solver_bench

    if "solver" in parts:
        kr = []
        try:
            solver_bench.kernel_rows(device, shapes, compile_baseline=not (args.quick or args.no_compile), bw=bw,
                                     out=kr)
        finally:
            rows += kr
        print("\n## Solver step with CFG (fp32): one call")
        print(_table(_fmt(kr), ["shape", "config", "impl", "time_us", "call_us", "gbps", "floor_us", "x_floor"]))
    if "loop" in parts:
        loop = solver_bench.loop_rows(device, shapes[:1] if device.type == "cpu" else shapes)
        if loop:
            print("\n## 25-step loop with CFG, per step (stand-in model output)")
            print(_table(_fmt(loop), ["shape", "config", "impl", "time_us"]))
        rows += loop
    if "sampling" in parts:
        import sampling as sampling_bench

        sr = []
        try:
            sampling_bench.rows(device, [(16, 4096)] if args.quick else None, bw=bw,
                                compile_baseline=not (args.quick or args.no_compile), out=sr)
        finally:
            rows += sr
        print("\n## Categorical sampling: logits -> tokens + chosen-token probability")
        print(_table([_fmt_row(r) for r in sr],
                     ["shape", "dtype", "impl", "time_us", "gbps", "x_amax", "x_hbm_floor", "peak_extra_mib"]))
    for part, title in (("schedulers", "Drop-in diffusers schedulers: scheduler.step per step"),
                        ("loops", "Sampling loops (25 steps)"), ("masked", "Masked-diffusion generation"),
                        ("invertible", "Invertible stack: fwd+bwd and memory"),
                        ("invertible_ops", "Coupling and GroupNorm+SiLU kernels"),
                        ("quant", "W4A4 / W8A8: GEMM, activation quantization, whole linear"),
                        ("overhead", "Per-call host overhead (tiny tensors, back-to-back calls)")):
        if part not in parts:
            continue
        pr = []
        try:
            mod = __import__(part)
            params = inspect.signature(mod.rows).parameters
            kw = dict(quick=args.quick) if "quick" in params else {}
            if "out" in params:
                kw["out"] = pr  # filled as it goes: a SIGTERM at the time limit keeps the rows so far
            res = mod.rows(device, **kw)
            pr = pr if "out" in params else res
        except (ImportError, AttributeError) as exc:
            print(f"\n## {title}: skipped ({exc})")
            continue
        finally:
            rows += [dict(r, part=part, **({"sub": r["part"]} if r.get("part", part) != part else {})) for r in pr]
        print(f"\n## {title}")
        cols = list(dict.fromkeys(k for r in pr for k in r if k != "part"))
        print(_table([_fmt_row(r) for r in pr], cols))


if __name__ == "__main__":
    sys.exit(main())
