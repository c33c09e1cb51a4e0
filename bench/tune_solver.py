"""Launch-shape sweep of the CUDA solver-step kernel (``csrc/solver/solver_step_cuda.cu``).

The kernel runs one 16-byte vector per thread (256 threads a block, grid uncapped at the benchmark
sizes) and measured 1.17-1.21x of its byte floor on an H200 (DDIM 1.46x), a fixed ~6 us over the
floor; issue 2 asks for 1.15x.  This script times other launch shapes through the tuning hook
``pydiff._C.solver_cuda_launch(threads, blocks_per_sm)``: 64 / 128 / 256 threads and a grid capped at
1-64 blocks per multiprocessor (past the cap each thread loops grid-stride, prefetching its next
vector), for the steps of ``bench/solver.py`` at 1x16x21x90x160 fp32, with time and the fraction of
the floor (bytes moved / measured copy bandwidth), the default first.  Outputs are checked equal to
the default's (bit for bit: the launch shape does not change any element's arithmetic).

    python bench/tune_solver.py [--out tune_solver.json]     # on a GPU; on the CPU it says so and exits 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import pydiff  # noqa: E402
from _timing import bench, copy_bandwidth, device_name  # noqa: E402
from solver import CONFIGS, _coeffs, bytes_needed  # noqa: E402

SHAPE = (1, 16, 21, 90, 160)
STEPS = ("dpmpp2m_cfg", "ddim_cfg", "dpmpp3m_cfg")
LAUNCHES = [(0, 0)] + [(t, b) for t in (256, 128) for b in (1, 2, 4, 8, 16, 32)] + [(128, 0), (64, 0), (64, 8)]


def sweep(device, shape=SHAPE, steps=STEPS, launches=LAUNCHES, backend="cuda"):
    from pydiff import _ext

    set_launch = _ext._C.solver_cuda_launch
    bw = copy_bandwidth(device) if device.type == "cuda" else 1e10  # (CPU: the smoke test's nominal value)
    numel = math.prod(shape)
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(shape, device=device, generator=g)  # noqa: E731
    x, u, c, z = mk(), mk(), mk(), mk()
    hist_all = [mk() for _ in range(3)]
    rows = []
    try:
        for name in steps:
            k, noise, outs = CONFIGS[name]
            co = _coeffs(k, noise, outs)
            hist, zz = hist_all[:k], (z if noise else None)
            floor = bytes_needed(numel, 4, k, noise, outs) / bw
            run = lambda: pydiff.solver_step(x, c, u, hist, zz, coeffs=co, backend=backend, check=False)  # noqa: E731
            set_launch(0, 0)
            ref = run()
            t_default = None
            for threads, per_sm in launches:
                set_launch(threads, per_sm)
                out = run()
                same = all(torch.equal(a, b) for a, b in zip(out, ref))
                t = bench(run, device)
                t_default = t_default or t
                rows.append(dict(step=name, threads=threads or 256, blocks_per_sm=per_sm or 64, time_us=t * 1e6,
                                 x_floor=t / floor, vs_default=t / t_default, bit_equal=same))
                print(f"{name:12s} threads {threads or 256:3d} blocks/SM {per_sm or 64:3d}  {t * 1e6:7.1f} us  "
                      f"{t / floor:5.3f}x floor  {t / t_default:5.3f}x default{'' if same else '  MISMATCH'}",
                      flush=True)
    finally:
        set_launch(0, 0)
    return dict(device=device_name(device), bandwidth_gbps=bw / 1e9, shape=list(shape), rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or "cuda" not in pydiff.available_backends(torch.device("cuda")):
        print("tune_solver: needs a GPU and the compiled CUDA kernels; nothing to do here")
        return 0
    res = sweep(torch.device("cuda"))
    best = {}
    for r in res["rows"]:
        if r["bit_equal"] and (r["step"] not in best or r["time_us"] < best[r["step"]]["time_us"]):
            best[r["step"]] = r
    print("## best launch per step")
    for step, r in best.items():
        print(f"{step:12s} threads {r['threads']} blocks/SM {r['blocks_per_sm']}: {r['time_us']:.1f} us, "
              f"{r['x_floor']:.3f}x floor ({r['vs_default']:.3f}x the default)")
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
