"""Tile sweep of the Triton quantized GEMM (``pydiff.triton_kernels.quant.quant_gemm_triton``).

The Triton launcher picks its tile shape from a small table (``_gemm_config``: no autotuning, so a
call never pays a tuning pass).  This script measures a list of candidate tiles on the GPU at the
issue's shapes (M = 4096; (K, N) in (3072, 3072), (3072, 12288), (12288, 3072)) for int4 (G = 64),
int8 and fp8 (per token), and reports per shape the default tile, the best one, and TFLOP/s:
what a session with a GPU reads to update that table.  Every candidate's output is compared with
the default tile's, bit for bit (the integer group sums are exact and the epilogue runs in the same
order whatever the tile, so any difference is a bug, reported as ``equal=False``).  For int4 it
also tries the fp16 and fp8 (e4m3) tensor cores (``i4dot``) against the default int8 ones.

    python bench/tune_quant.py [--budget 50] [--out tune_quant.json]   # GPU
    TRITON_INTERPRET=1 python bench/tune_quant.py --quick                # CPU smoke run (interpreter)

Candidates that do not fit (shared memory, registers) are skipped with the reason.  The sweep
stops when ``--budget`` seconds are spent, writing what it has.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _timing import bench, device_name  # noqa: E402

SHAPES = [(4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072)]  # (M, K, N)
GROUP = {"int4": 64, "int8": None, "fp8": None}  # None: one group per row (per-token scales)
# (BM, BN, BK or None = the launcher's choice, num_warps, num_stages, GROUP_M)
CANDIDATES = [
    (128, 128, None, 8, 3, 8), (128, 128, None, 8, 4, 8), (64, 256, None, 8, 3, 8), (64, 256, None, 8, 4, 8),
    (128, 256, None, 8, 3, 8), (256, 128, None, 8, 3, 8), (128, 128, None, 4, 4, 8), (64, 128, None, 4, 4, 8),
    (128, 64, None, 4, 4, 8), (128, 128, 64, 8, 4, 8), (128, 256, 64, 8, 4, 8), (128, 128, None, 8, 3, 16),
]
# int4 only, tried first: the tensor-core type (``i4dot``: 1 fp16, 2 fp8 e4m3, 3 fp8 e4m3 from SWAR-unpacked
# codes; 0, int8, is the default off Hopper)
INT4_CANDIDATES = [
    dict(i4dot=2), dict(i4dot=1), dict(i4dot=3), dict(i4dot=2, BM=128, BN=128, num_warps=8, num_stages=3),
    dict(i4dot=3, BM=128, BN=128, num_warps=8, num_stages=3),
    dict(i4dot=2, BM=128, BN=128, num_warps=8, num_stages=4), dict(i4dot=2, BM=64, BN=256, num_warps=8, num_stages=4),
    dict(i4dot=3, BM=64, BN=256, num_warps=8, num_stages=4),
    # two CTAs per SM (~210 registers a thread at 4 warps; the 8-warp tiles above fit one)
    dict(i4dot=3, BM=64, BN=128, num_warps=4, num_stages=3), dict(i4dot=2, BM=64, BN=128, num_warps=4, num_stages=3),
    dict(i4dot=3, BM=64, BN=128, num_warps=4, num_stages=4), dict(i4dot=3, BM=128, BN=64, num_warps=4, num_stages=3),
]
# --fast: precision="fast" (fp16 operands, one accumulation over K); the default is triton_kernels.quant.FAST_TILE.
# Outputs (fp32) are compared with the default's within 2^-12 of the output's largest value (the summation
# order depends on the tile), not bit for bit.
FAST_CANDIDATES = [
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4), dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=4),
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3), dict(BM=128, BN=256, BK=128, num_warps=8, num_stages=3),
    dict(BM=64, BN=256, BK=128, num_warps=8, num_stages=3), dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=4),
    dict(BM=128, BN=64, BK=128, num_warps=4, num_stages=4), dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4),
    dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, unroll=2), dict(BM=256, BN=128, BK=64, num_warps=8,
                                                                            num_stages=3),
    dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, GROUP_M=16),
]
QUICK_FAST = [dict(BM=16, BN=32, BK=128, num_warps=4, num_stages=1, unroll=2)]
QUICK_SHAPES = [(33, 128, 64)]
QUICK_CANDIDATES = [(16, 32, None, 4, 1, 8), (32, 64, 32, 4, 1, 4)]
QUICK_INT4 = [dict(i4dot=1)]


def _cfg(c):
    bm, bn, bk, warps, stages, gm = c
    d = dict(BM=bm, BN=bn, num_warps=warps, num_stages=stages, GROUP_M=gm)
    if bk:
        d["BK"] = bk
    return d


def sweep(device, shapes, candidates, fmts, budget, int4_candidates=(), fast=False, groups=None):
    from pydiff.ops import quant as Q
    from pydiff.triton_kernels.quant import _cap, _gemm_config, quant_gemm_triton

    t_end = time.time() + budget
    rows = []
    for M, K, N in shapes:
        for fmt in fmts:
            g = (groups or GROUP)[fmt] or K
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5
            ref_backend = "torch" if device.type == "cpu" else None
            qa, sa, _ = Q.quantize(x, fmt, g, backend=ref_backend)
            qw, sw, _ = Q.quantize(w, fmt, g, backend=ref_backend)
            flops = 2.0 * M * N * K
            default = _gemm_config(M, N, K, g, 0, fmt, None if device.type == "cpu" else _cap(device), fast=fast)

            def run(cfg, out_dtype=torch.bfloat16):
                return quant_gemm_triton(qa, sa, qw, sw, None, None, None, fmt, g, out_dtype, _config=cfg,
                                         precision="fast" if fast else "exact")

            def same(out, ref):
                if not fast:
                    return bool(torch.equal(out, ref))
                return bool(((out - ref).abs().max() <= 2.0**-12 * ref.abs().max()).item())

            # fast: compared in fp32 (two fp32 sums in different orders may round to neighbouring bf16 values)
            ref = run(None, torch.float32 if fast else torch.bfloat16)
            shape = f"{M}x{K}x{N}"
            t = bench(lambda: run(None), device)
            rows.append(dict(shape=shape, fmt=fmt, config="default " + _short(default), time_us=t * 1e6,
                             tflops=flops / t / 1e12, equal=True))
            extra = list(int4_candidates) if fmt == "int4" else []
            for c in extra + list(candidates):
                if time.time() > t_end:
                    print(f"budget spent: stopped before {fmt} {shape} {c}")
                    return rows
                cfg = dict(c) if isinstance(c, dict) else _cfg(c)
                if "BK" in cfg and g % cfg["BK"] and not (fast and cfg["BK"] % g == 0):
                    continue  # (the fast GEMM's k-step may span whole groups)
                try:
                    out = run(dict(cfg), torch.float32 if fast else torch.bfloat16)
                    equal = same(out, ref)
                    t = bench(lambda: run(dict(cfg)), device)
                except Exception as exc:  # noqa: BLE001  (a tile that does not fit: report, go on)
                    rows.append(dict(shape=shape, fmt=fmt, config=_short(cfg), error=type(exc).__name__))
                    continue
                rows.append(dict(shape=shape, fmt=fmt, config=_short(cfg), time_us=t * 1e6,
                                 tflops=flops / t / 1e12, equal=equal))
    return rows


def _short(cfg) -> str:
    keys = ("BM", "BN", "BK", "num_warps", "num_stages", "GROUP_M", "i4dot", "unroll")
    names = ("BM", "BN", "BK", "w", "s", "GM", "i4dot", "unroll")
    return " ".join(f"{n}={cfg[k]}" for k, n in zip(keys, names) if k in cfg)


def best_per_shape(rows):
    best = {}
    for r in rows:
        if "time_us" not in r or not r["equal"]:
            continue
        key = (r["shape"], r["fmt"])
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=50.0, help="seconds for the whole sweep")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--fmts", default="int4,int8,fp8")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and two tiles (the CPU smoke run)")
    ap.add_argument("--fast", action="store_true", help='the precision="fast" GEMM\'s tiles (int4, int8 at G = 64)')
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("tune_quant: no GPU; only --quick runs on the CPU (Triton interpreter)")
        return 0
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("tune_quant --quick on the CPU needs TRITON_INTERPRET=1")
        return 2
    fmts = [f for f in args.fmts.split(",") if f]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        fmts = [f for f in fmts if f != "fp8"]
    shapes, cands, i4 = (QUICK_SHAPES, QUICK_CANDIDATES, QUICK_INT4) if args.quick else (SHAPES, CANDIDATES,
                                                                                          INT4_CANDIDATES)
    import triton

    groups = dict(GROUP)
    if args.fast:  # int4 / int8 in groups of 64 (per-token int8 has no group fold to save)
        groups["int8"] = 64
        fmts = [f for f in fmts if f != "fp8"]
        cands, i4 = (QUICK_FAST if args.quick else FAST_CANDIDATES), ()
    print(f"# quant GEMM tile sweep on {device_name(device)}, torch {torch.__version__}, triton {triton.__version__}"
          f"{' (precision fast)' if args.fast else ''}")
    rows = sweep(device, shapes, cands, fmts, args.budget, i4, fast=args.fast, groups=groups)
    cols = ["shape", "fmt", "config", "time_us", "tflops", "equal", "error"]
    for r in rows:
        print("  ".join(f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    best = best_per_shape(rows)
    print("\n## best tile per shape")
    for (shape, fmt), r in best.items():
        default = next(d for d in rows if d["shape"] == shape and d["fmt"] == fmt and d["config"].startswith("default"))
        print(f"{shape} {fmt}: {r['config']}  {r['tflops']:.1f} TFLOP/s  ({default['time_us'] / r['time_us']:.2f}x the "
              f"default tile)")
    bad = [r for r in rows if r.get("equal") is False]
    for r in bad:
        print(f"MISMATCH: {r['shape']} {r['fmt']} {r['config']} differs from the default tile's output")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device_name(device), torch=torch.__version__, triton=triton.__version__, rows=rows),
                      f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
