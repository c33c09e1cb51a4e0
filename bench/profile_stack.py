"""Where the time of the invertible-stack benchmark goes: one forward + backward per method under
torch.profiler, kernels grouped by name.

    python bench/profile_stack.py                  # GPU size on CUDA, the CPU size otherwise
    python bench/profile_stack.py --methods plain,reversible --top 12

For each method: wall time of the step, the summed device time of its kernels (CUDA) or operator
self time (CPU), the number of launches, and the top kernels.  Device time well below the wall
time means the host (Python, autograd, launches) is the bottleneck; a kernel family that is
larger than in ``plain`` shows what the coupling network or the rebuild adds.  On the H100 the
16-block stack ran: plain 30.7 ms, coupling-plain 40.2 ms (half the conv FLOPs of plain, yet
slower), reversible 58.6 ms: this script is how the next GPU session finds out why.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from invertible import CPU_CFG, GPU_CFG, QUICK_CFG, build  # noqa: E402
from _timing import sync  # noqa: E402


def _kernel_table(prof, cuda: bool):
    """(name -> [total us, calls]) over device kernels (CUDA) or operators' self time (CPU)."""
    agg = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if cuda:
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        else:
            if ev.device_type != torch.autograd.DeviceType.CPU or not ev.name.startswith("aten::"):
                continue
            t = ev.self_cpu_time_total
        agg[ev.name][0] += t
        agg[ev.name][1] += 1
    return agg


def profile_method(method: str, cfg: dict, device: torch.device, depth: int, top: int) -> dict:
    C, H, B = cfg["C"], cfg["H"], cfg["B"]
    torch.manual_seed(1)
    x = torch.randn(B, C, H, H, device=device, requires_grad=True)
    w = torch.randn(B, C, H, H, device=device)
    net = build(method, C, depth, device)

    def step():
        (net(x) * w).sum().backward()
        net.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(2):
        step()
    sync(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t0
    agg = _kernel_table(prof, cuda)
    total = sum(v[0] for v in agg.values())
    launches = sum(v[1] for v in agg.values())
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(method=method, wall_ms=wall * 1e3, device_ms=total / 1e3, launches=launches,
                top=[(name, us / 1e3, n) for name, (us, n) in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="plain,checkpoint,coupling-plain,reversible")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="the tiny size (a smoke run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = QUICK_CFG if args.quick else (GPU_CFG if device.type == "cuda" else CPU_CFG)
    kind = "kernel time" if device.type == "cuda" else "operator self time"
    print(f"# invertible stack profile: {args.depth} blocks, B={cfg['B']} C={cfg['C']} {cfg['H']}x{cfg['H']} "
          f"fp32 on {device}; {kind}")
    for m in args.methods.split(","):
        r = profile_method(m.strip(), cfg, device, args.depth, args.top)
        print(f"\n## {r['method']}: wall {r['wall_ms']:.2f} ms (profiled), {kind} {r['device_ms']:.2f} ms, "
              f"{r['launches']} kernels/ops")
        for name, ms, n in r["top"]:
            print(f"  {ms:9.3f} ms  {n:5d}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
