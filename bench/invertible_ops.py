"""Invertible-block kernel benchmarks: coupling updates and fused GroupNorm + SiLU.

Each op (every backend that can time on the device) next to the eager torch code a user would
write instead, in the same run:

* ``coupling fp32``:           ``x + f``                      (bytes: read x, f; write y)
* ``coupling f64 state``:      ``x64 + f32`` (float64 state with an fp32 block output)
* ``coupling in place``:       ``x.add_(f)``
* ``coupling fixed``:          ``x + torch.round(f.double() * 2**32).long()``
* ``groupnorm_silu fwd``:      ``F.silu(F.group_norm(x, G, w, b))``  (floor: read x, write y)
* ``groupnorm_silu fwd+bwd``:  the same under autograd, forward and backward (floor: read x,
  write y; read dy and x, write dx), plus the activation bytes autograd saves for backward.

Columns: time, achieved GB/s over the floor's bytes, the floor (bytes / measured copy bandwidth)
and time as a multiple of it (``x_floor``; 1.0 is the floor).

    python bench/invertible_ops.py [--device cuda|cpu] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pydiff  # noqa: E402
from pydiff.ops import invertible as inv  # noqa: E402

from _timing import bench, copy_bandwidth, device_name  # noqa: E402

# the 16-block stack of ANCHORS.md: C = 256, 64x64, batch 8, 32 groups
GPU_SHAPE = (8, 256, 64, 64)
CPU_SHAPE = (4, 128, 64, 64)
QUICK_SHAPE = (2, 32, 16, 16)
GROUPS = 32


def _backends(device):
    out = []
    for b in pydiff.available_backends(device):
        if b == "torch" or (b == "triton" and device.type == "cpu"):
            continue  # the interpreter is a correctness tool, not a backend to time
        out.append(b)
    return out


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (distinct storages)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _row(op, shape, dtype, impl, t, nbytes, bw, **extra):
    floor = nbytes / bw
    return dict(part="invertible", op=op, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                impl=impl, time_us=t * 1e6, gbps=nbytes / t / 1e9, floor_us=floor * 1e6, x_floor=t / floor, **extra)


def coupling_rows(device, shape, bw):
    rows = []
    n = math.prod(shape)
    g = torch.Generator(device=device).manual_seed(0)
    x32 = torch.randn(shape, device=device, generator=g)
    f32 = torch.randn(shape, device=device, generator=g)
    x64 = x32.double()
    q = torch.randint(-2 ** 40, 2 ** 40, shape, device=device, generator=g)
    cases = [
        ("coupling fp32", torch.float32, 12 * n,
         {b: (lambda b=b: inv.coupling_update(x32, f32, 1.0, 1.0, backend=b, check=False)) for b in _backends(device)},
         lambda: x32 + f32),
        ("coupling f64 state", torch.float64, 20 * n,
         {b: (lambda b=b: inv.coupling_update(x64, f32, 1.0, -1.0, backend=b, check=False)) for b in _backends(device)},
         lambda: x64 - f32),
        ("coupling in place", torch.float32, 12 * n,
         {b: (lambda b=b: inv.coupling_update(x32, f32, 1.0, 0.0, inplace=True, backend=b, check=False))
          for b in _backends(device)},
         lambda: x32.add_(f32, alpha=0.0)),
        ("coupling fixed", torch.int64, 20 * n,
         {b: (lambda b=b: inv.coupling_update_fixed(q, f32, 1.0, 32, backend=b, check=False)) for b in _backends(device)},
         lambda: q + torch.round(f32.double() * 2.0 ** 32).long()),
    ]
    with torch.no_grad():
        for op, dt, nbytes, ours, eager in cases:
            for name, fn in ours.items():
                rows.append(_row(op, shape, dt, f"pydiff[{name}]", bench(fn, device), nbytes, bw))
            rows.append(_row(op, shape, dt, "eager torch", bench(eager, device), nbytes, bw))
    return rows


def groupnorm_rows(device, shape, bw, dtypes):
    rows = []
    C = shape[1]
    for dtype in dtypes:
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(shape, device=device, generator=g).to(dtype)
        dy = torch.randn(shape, device=device, generator=g).to(dtype)
        w = (torch.rand(C, device=device, generator=g) + 0.5).to(dtype)
        b = torch.randn(C, device=device, generator=g).to(dtype)
        unit = x.numel() * x.element_size()
        eager = lambda: F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))  # noqa: E731
        with torch.no_grad():
            for name in _backends(device):
                fn = lambda name=name: inv.groupnorm_silu(x, GROUPS, w, b, 1e-5, backend=name, check=False)  # noqa
                rows.append(_row("groupnorm_silu fwd", shape, dtype, f"pydiff[{name}]", bench(fn, device), 2 * unit, bw))
            rows.append(_row("groupnorm_silu fwd", shape, dtype, "eager torch", bench(eager, device), 2 * unit, bw))
        xg = x.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        bg = b.clone().requires_grad_()

        def train(fwd):
            def step():
                y = fwd()
                y.backward(dy)
                xg.grad = wg.grad = bg.grad = None
            return step

        impls = {f"pydiff[{n}]": (lambda n=n: inv.groupnorm_silu(xg, GROUPS, wg, bg, 1e-5, backend=n, check=False))
                 for n in _backends(device)}
        impls["eager torch"] = lambda: F.silu(F.group_norm(xg, GROUPS, wg, bg, 1e-5))
        for name, fwd in impls.items():
            saved = _saved_bytes(fwd)
            rows.append(_row("groupnorm_silu fwd+bwd", shape, dtype, name, bench(train(fwd), device), 5 * unit, bw,
                             saved_mib=saved / 2 ** 20))
    return rows


def rows(device: torch.device, shape=None, dtypes=None, bw=None):
    """All rows for ``device`` (the runner's entry point)."""
    device = torch.device(device)
    if shape is None:
        shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    if dtypes is None:
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    if bw is None:
        bw = copy_bandwidth(device, (64 << 20) if device.type == "cpu" else (512 << 20))
    return coupling_rows(device, shape, bw) + groupnorm_rows(device, shape, bw, dtypes)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small shape (a smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth(device, (64 << 20) if device.type == "cpu" else (512 << 20))
    print(f"# invertible ops on {device_name(device)}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.1f} GB/s")
    out = rows(device, QUICK_SHAPE if args.quick else None, bw=bw)
    cols = ["op", "shape", "dtype", "impl", "time_us", "gbps", "floor_us", "x_floor", "saved_mib"]
    table = [[_fmt(r.get(c, "")) for c in cols] for r in out]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
