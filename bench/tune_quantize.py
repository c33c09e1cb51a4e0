"""Launch-shape sweep of the Triton activation quantizer (``pydiff.triton_kernels.quant.quantize_triton``).

The launcher picks rows per program (BM), groups per tile (GPC), warps and the split of a row's
tiles over programs (SPLITS) from a small table (``_quantize_config`` / ``_quantize_launch``; no
autotuning).  This script times candidates at the issue's activation shapes (bf16 [4096, 3072] and
[4096, 12288] -> int4, groups of 64; the first also with a rank-32 SVDQuant down-projection) and
reports time, GB/s and the fraction of the byte floor (bytes read and written / measured copy
bandwidth), with the default first.  Every candidate's q / scales / lora_act are compared with the
default's, bit for bit (q and scales do not depend on the tiling; lora_act is a fixed-order sum per
tile width, so only q and scales are required equal across tile widths).

    python bench/tune_quantize.py [--budget 40] [--out tune_quantize.json]   # GPU
    TRITON_INTERPRET=1 python bench/tune_quantize.py --quick                   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _timing import bench, copy_bandwidth, device_name  # noqa: E402

SHAPES = [(4096, 3072, 0), (4096, 12288, 0), (4096, 3072, 32)]  # (M, K, lora rank)
G = 64
# BM (rows per program), GPC (groups of 64 per tile), num_warps, SPLITS (programs per row block)
CANDIDATES = [
    (4, 8, 4, 1), (4, 8, 4, 2), (4, 8, 4, 3), (4, 8, 4, 6), (2, 8, 4, 2), (2, 8, 4, 6), (8, 8, 4, 2), (8, 8, 8, 3),
    (4, 16, 8, 1), (4, 16, 8, 3), (8, 16, 8, 3), (1, 8, 2, 6), (2, 4, 2, 6), (4, 4, 4, 6), (16, 4, 4, 6),
    (8, 4, 4, 4), (16, 8, 8, 2), (4, 8, 4, 4),
]
# with lora, SPLITS > 1 sums the programs' partial down-projections after the kernel (11-27; untimed)
LORA_CANDIDATES = [(16, 1, 4, 1), (16, 2, 4, 1), (8, 1, 4, 1), (8, 2, 4, 1), (32, 1, 8, 1), (16, 1, 8, 1),
                   (8, 2, 4, 4), (8, 2, 4, 8), (8, 1, 4, 12), (16, 2, 4, 6), (16, 1, 4, 12), (8, 2, 4, 12)]
QUICK_SHAPES = [(5, 256, 0), (5, 256, 5)]
QUICK_CANDIDATES = [(2, 2, 4, 2), (4, 4, 4, 1)]


def _cfg(c):
    bm, gpc, warps, splits = c
    return dict(BM=bm, GPC=gpc, GB=G, NSUB=1, num_warps=warps, SPLITS=splits)


def sweep(device, shapes, candidates, lora_candidates, budget):
    from pydiff.triton_kernels.quant import _cap, _quantize_config, quantize_triton

    t_end = time.time() + budget
    bw = copy_bandwidth(device) if device.type == "cuda" else 1e10
    rows = []
    for M, K, R in shapes:
        g = torch.Generator(device=device).manual_seed(M + K + R)
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=g)
        ld = (torch.randn(K, R, device=device, generator=g) / K**0.5) if R else None
        nbytes = M * K * 2 + M * K // 2 + M * (K // G) * 4 + (M * R * 4 + K * R * 4 if R else 0)
        floor_us = nbytes / bw * 1e6
        shape = f"{M}x{K} bf16 -> int4 g{G}" + (f" rank {R}" if R else "")

        def run(cfg):
            return quantize_triton(x, None, ld, None, None, "int4", G, "none", 1e-6, _config=cfg)

        default = _quantize_config(M, K, R, G, "none", R > 0, None if device.type == "cpu" else _cap(device))
        ref = run(None)
        t = bench(lambda: run(None), device)
        rows.append(dict(shape=shape, config="default " + _short(default), time_us=t * 1e6, gbps=nbytes / t / 1e9,
                         floor_us=floor_us, x_floor=t * 1e6 / floor_us, equal=True))
        for c in (lora_candidates if R else candidates):
            if time.time() > t_end:
                print(f"budget spent: stopped before {shape} {c}")
                return rows
            cfg = _cfg(c)
            try:
                out = run(dict(cfg))
                equal = bool(torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]))
                t = bench(lambda: run(dict(cfg)), device)
            except Exception as exc:  # noqa: BLE001  (a shape that does not fit: report, go on)
                rows.append(dict(shape=shape, config=_short(cfg), error=f"{type(exc).__name__}: {str(exc)[:80]}"))
                continue
            rows.append(dict(shape=shape, config=_short(cfg), time_us=t * 1e6, gbps=nbytes / t / 1e9,
                             floor_us=floor_us, x_floor=t * 1e6 / floor_us, equal=equal))
    return rows


def _short(cfg) -> str:
    keys = ("BM", "GPC", "GB", "num_warps", "SPLITS")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=40.0, help="seconds for the whole sweep")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and two candidates (the CPU smoke run)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    rows = sweep(device, QUICK_SHAPES if quick else SHAPES, QUICK_CANDIDATES if quick else CANDIDATES,
                 QUICK_CANDIDATES[:1] if quick else LORA_CANDIDATES, args.budget)
    print(f"# quantize launch shapes on {device_name(device)}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<34} {r['config']:<44} {r['error']}")
        else:
            print(f"{r['shape']:<34} {r['config']:<44} {r['time_us']:8.1f} us {r['gbps']:7.0f} GB/s "
                  f"{r['x_floor']:5.2f}x floor{'' if r['equal'] else '  MISMATCH'}")
    print("## best per shape")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = [r for r in rows if r["shape"] == shape and "time_us" in r and r["equal"]]
        best = min(ok, key=lambda r: r["time_us"])
        print(f"{shape}: {best['config']}  {best['time_us']:.1f} us, {best['x_floor']:.2f}x floor "
              f"({ok[0]['time_us'] / best['time_us']:.2f}x the default)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device_name(device), rows=rows), f, indent=1)
    return 0 if all(r.get("equal", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
