"""Invertible blocks benchmark: training time and activation memory of a 16-block residual stack.

    python bench/invertible.py                 # the device present (CUDA if available)
    python bench/invertible.py --quick         # small sizes, few repetitions
    python bench/invertible.py --out DIR       # also writes invertible_<cpu|gpu>.json and .png there

The stack (../shared/ANCHORS.md, "Invertible stack"): 16 blocks of GroupNorm-SiLU-conv3x3 x2 on a
``[B, C, H, W]`` fp32 activation (GPU: C=256, 64x64, batch 8; CPU: C=64, 32x32, batch 2; at C=32,
16x16 the CPU time was mostly per-op host overhead, not the network), loss ``sum(y * w)``, one
forward + backward per timing.  Methods, same input shape:

* ``plain``: ``x <- x + R(x)`` with plain autograd (R = the block at width C).
* ``checkpoint``: the same, each block under ``torch.utils.checkpoint`` (non-reentrant).
* ``coupling-plain``: 16 additive couplings ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` on the two C/2
  halves (F, G = the block at width C/2), plain autograd: the same network as ours without the
  rebuild.  (A coupling block at state width C does half the conv FLOPs of a residual block at C.)
* ``reversible`` / ``reversible-f64`` / ``reversible-fixed``: those couplings in
  :class:`pydiff.nn.ReversibleSequential`, coupling state in fp32 / float64 / int64 fixed point.
* ``plain+fused`` / ``reversible+fused``: ``plain`` and ``reversible`` with every GroupNorm -> SiLU
  pair replaced by pydiff's fused kernel (:func:`pydiff.nn.fuse_groupnorm_silu`).
* CUDA only: ``plain (CUDA graph)`` and ``reversible (CUDA graph)``, the forward and backward
  captured by ``torch.cuda.make_graphed_callables`` (no per-kernel host launches).

Memory: ``peak_mib`` is, on CUDA, the allocator's peak during forward + backward above what was
allocated before; elsewhere the peak of the tensors created during the step, tracked op by op
(:func:`pydiff.testing.memory.peak_bytes`).  ``saved_mib``: the bytes of distinct storages saved for
backward (saved-tensor hooks: what the forward keeps alive for the backward).  Part 2 sweeps the
depth (4..32 blocks on the CPU, 4..64 on CUDA): ours stays flat.  ``part="invertible_host"``: the
host's cost per step, at a size where the kernels cost nothing (:func:`host_rows`).  Part 3 (off CUDA,
``part="invertible_model"``): the GPU-size stack on the ``meta`` device, where the same op-by-op
count gives the GPU's peak without a GPU (H100, 11-27: plain 3212 MiB measured, 3138 modelled).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from pydiff.nn import AdditiveCoupling, ReversibleSequential, fuse_groupnorm_silu  # noqa: E402

from _timing import bench, device_name, sync  # noqa: E402
from pydiff.testing.memory import peak_bytes as _peak_bytes, saved_bytes as _saved_bytes  # noqa: E402

GPU_CFG = dict(C=256, H=64, B=8)
CPU_CFG = dict(C=64, H=32, B=2)
QUICK_CFG = dict(C=16, H=8, B=2)
METHODS = ("plain", "checkpoint", "coupling-plain", "reversible", "reversible-f64", "reversible-fixed",
           "plain+fused", "reversible+fused")


def _block(c: int, groups: int = 32) -> nn.Module:
    g = min(groups, c)
    while c % g:
        g -= 1
    return nn.Sequential(nn.GroupNorm(g, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                         nn.GroupNorm(g, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))


class _Residual(nn.Module):
    def __init__(self, c: int, depth: int, ckpt: bool):
        super().__init__()
        self.blocks = nn.ModuleList([_block(c) for _ in range(depth)])
        self.ckpt = ckpt

    def forward(self, x):
        for b in self.blocks:
            x = x + (checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x))
        return x


def build(method: str, c: int, depth: int, device) -> nn.Module:
    """The ``depth``-block network of ``method`` (see the module docstring), on ``device``."""
    if method.endswith("+fused"):  # the same network with pydiff's fused GroupNorm+SiLU swapped in
        net = build(method[:-len("+fused")], c, depth, device)
        fuse_groupnorm_silu(net)
        return net
    torch.manual_seed(0)
    if method in ("plain", "checkpoint"):
        return _Residual(c, depth, method == "checkpoint").to(device)
    state = {"reversible-f64": torch.float64, "reversible-fixed": torch.int64}.get(method)
    blocks = [AdditiveCoupling(_block(c // 2), _block(c // 2)) for _ in range(depth)]
    return ReversibleSequential(blocks, state_dtype=state, reversible=method != "coupling-plain").to(device)




def _measure(net, x, w, device, time_it: bool, reps: int):
    def step():
        y = net(x)
        (y * w).sum().backward()

    net.zero_grad(set_to_none=True)
    y, saved = _saved_bytes(lambda: net(x))
    (y * w).sum().backward()
    del y
    net.zero_grad(set_to_none=False)  # grads allocated: the peak counts activations, not grads
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:  # the tensors created during the step, tracked op by op (pydiff.testing.memory.peak_bytes)
        peak = _peak_bytes(step)[1] / 2**20
    t = bench(step, device, warmup=1, reps=reps, min_time=0.1) if time_it else None
    return t, saved / 2**20, peak


def rows(device, cfg: dict | None = None, depths=None, reps: int = 10, model: bool | None = None,
         out: list | None = None) -> list:
    """Part 1 (``part="invertible"``): the 16-block stack, every method: ``time_ms``, ``x_plain``
    (time / plain's), ``saved_mib``, ``peak_mib`` and ``mem_frac`` (peak / plain's peak).  Part 2
    (``part="invertible_depth"``): saved and peak memory against depth for plain, checkpoint and
    reversible-f64.  ``model`` (default: off CUDA): also the
    GPU-size memory model on the meta device (:func:`model_rows`)."""
    device = torch.device(device)
    cfg = cfg or (GPU_CFG if device.type == "cuda" else CPU_CFG)
    depths = depths or ((4, 8, 16, 32, 64) if device.type == "cuda" else (4, 8, 16, 32))
    C, H, B = cfg["C"], cfg["H"], cfg["B"]
    shape = f"{B}x{C}x{H}x{H}"
    torch.manual_seed(1)
    x = torch.randn(B, C, H, H, device=device, requires_grad=True)
    w = torch.randn(B, C, H, H, device=device)
    out = [] if out is None else out  # (bench/run.py passes a list: rows so far survive its time limit)
    for m in METHODS:
        net = build(m, C, 16, device)
        t, saved, peak = _measure(net, x, w, device, True, reps)
        out.append(dict(part="invertible", shape=shape, depth=16, method=m, time_ms=t * 1e3, saved_mib=saved,
                        peak_mib=peak))
        del net
    if device.type == "cuda":
        # the whole forward + backward as CUDA graphs (torch.cuda.make_graphed_callables): what a
        # training loop that is host-bound on its launches can do; the reversible stack issues ~3x the
        # kernels of plain autograd (its backward rebuilds the activations), so it gains more
        for m in ("plain", "reversible"):
            net = build(m, C, 16, device)
            if m == "reversible":  # no random ops in these blocks; RNG states cannot be read under capture
                net.preserve_rng_state = False
            try:
                g = torch.cuda.make_graphed_callables(net, (x,))
                t, saved, peak = _measure(g, x, w, device, True, reps)
            except Exception as exc:  # noqa: BLE001  (report, go on)
                print(f"invertible {m} CUDA graph: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            out.append(dict(part="invertible", shape=shape, depth=16, method=m + " (CUDA graph)", time_ms=t * 1e3,
                            saved_mib=saved, peak_mib=peak))
            del net, g
    base = out[0]
    for r in out:
        r["x_plain"] = r["time_ms"] / base["time_ms"]
        r["mem_frac"] = r["peak_mib"] / base["peak_mib"]
    for d in depths:
        for m in ("plain", "checkpoint", "reversible-f64"):
            net = build(m, C, d, device)
            _, saved, peak = _measure(net, x, w, device, False, 1)
            out.append(dict(part="invertible_depth", shape=shape, depth=d, method=m, saved_mib=saved, peak_mib=peak))
            del net
    out += host_rows(device, reps=max(5, reps), runs=3 if device.type == "cuda" else 5)
    if model is None:
        model = device.type != "cuda"
    if model:
        out += model_rows((4, 16, 64))
    return out


HOST_CFG = dict(C=8, H=4, B=1)
HOST_METHODS = ("plain", "coupling-plain", "reversible", "reversible+fused")


def host_rows(device, reps: int = 10, runs: int = 5) -> list:
    """``part="invertible_host"``: the 16-block stack at a tiny size (``HOST_CFG``, 1x8x4x4), where
    a forward + backward costs what the host spends issuing it (Python, autograd, dispatch and, on a
    GPU, kernel launches), not the kernels: ``host_ms`` per step (wall clock of ``reps`` steps in a
    row, one synchronisation at the end; best of ``runs`` such runs) and ``ops``, the ATen ops one step
    dispatches (each a kernel launch on a GPU, views and detaches aside).  The GPU-size stack is
    launch-bound on a slow host (H100, 11-27: 2479 kernels and ops against plain's 869), so these
    rows say how much of its time is the host's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    device = torch.device(device)
    C, H, B = HOST_CFG["C"], HOST_CFG["H"], HOST_CFG["B"]
    torch.manual_seed(1)
    x = torch.randn(B, C, H, H, device=device, requires_grad=True)
    w = torch.randn(B, C, H, H, device=device)
    out = []
    for m in HOST_METHODS:
        net = build(m, C, 16, device)

        def step():
            (net(x) * w).sum().backward()

        for _ in range(3):
            step()
        with _Count() as cnt:
            step()
        best = float("inf")
        for _ in range(runs):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
        out.append(dict(part="invertible_host", shape=f"{B}x{C}x{H}x{H}", depth=16, method=m, host_ms=best * 1e3,
                        ops=cnt.n))
    for r in out:
        r["x_plain"] = r["host_ms"] / out[0]["host_ms"]
    return out


def model_rows(depths=(4, 8, 16, 32, 64)) -> list:
    """The GPU-size stack (``GPU_CFG``) on the ``meta`` device: nothing is computed or allocated,
    and :func:`pydiff.testing.memory.peak_bytes` adds up the tensors alive op by op, so a CPU
    reads in about a second what a GPU's allocator would show as the peak (without cuDNN
    workspaces and allocator rounding; on the H100 run of 11-27 plain measured 3212 MiB against
    3138 here).  ``part="invertible_model"``: ``peak_mib`` and ``mem_frac`` per method at 16 blocks,
    and ``peak_mib`` against depth for plain and reversible."""
    device = torch.device("meta")
    C, H, B = GPU_CFG["C"], GPU_CFG["H"], GPU_CFG["B"]
    shape = f"{B}x{C}x{H}x{H}"
    x = torch.empty(B, C, H, H, device=device, requires_grad=True)
    w = torch.empty(B, C, H, H, device=device)
    out = []
    for d in sorted(set(depths) | {16}):
        for m in METHODS if d == 16 else ("plain", "reversible", "reversible-f64"):
            _, saved, peak = _measure(build(m, C, d, device), x, w, device, False, 1)
            out.append(dict(part="invertible_model", shape=shape, depth=d, method=m, saved_mib=saved, peak_mib=peak))
    plain = {r["depth"]: r["peak_mib"] for r in out if r["method"] == "plain"}
    for r in out:
        r["mem_frac"] = r["peak_mib"] / plain[r["depth"]]
    return out


def plot(rows, path: str) -> None:
    """Left: memory against depth (log-log); right: time and memory of the 16-block stack vs plain."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    dep = [r for r in rows if r["part"] == "invertible_depth"]
    for m in dict.fromkeys(r["method"] for r in dep):
        sub = sorted((r for r in dep if r["method"] == m), key=lambda r: r["depth"])
        a1.plot([r["depth"] for r in sub], [r["peak_mib"] for r in sub], "o-", label=m)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("blocks")
    a1.set_ylabel("peak MiB during forward + backward")
    a1.set_title(f"activation memory vs depth ({dep[0]['shape'] if dep else ''})")
    a1.legend(fontsize=8)
    main = [r for r in rows if r["part"] == "invertible"]
    names = [r["method"] for r in main]
    xs = range(len(names))
    a2.bar([i - 0.2 for i in xs], [r["x_plain"] for r in main], 0.4, label="time / plain")
    a2.bar([i + 0.2 for i in xs], [r["mem_frac"] for r in main], 0.4, label="memory / plain")
    a2.axhline(1.0, color="k", lw=0.8, ls="--")
    a2.set_xticks(list(xs), names, rotation=25, fontsize=8)
    a2.set_title("16 blocks: fwd+bwd time and memory / plain autograd")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _table(rows, cols) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(cols, widths))]
    lines += ["  ".join(v.rjust(wd) for v, wd in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    ap.add_argument("--out", default=None, help="folder for invertible_<cpu|gpu>.json and .png")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = QUICK_CFG if args.quick else None
    depths = (4, 8, 16) if args.quick else None
    r = rows(device, cfg, depths, reps=3 if args.quick else 10)
    print(f"# invertible blocks on {device_name(device)}, torch {torch.__version__}")
    print(_table([x for x in r if x["part"] == "invertible"],
                 ["shape", "method", "time_ms", "x_plain", "saved_mib", "peak_mib", "mem_frac"]))
    print()
    print(_table([x for x in r if x["part"] == "invertible_depth"],
                 ["shape", "depth", "method", "saved_mib", "peak_mib"]))
    print("\n# host cost: the same stack at 1x8x4x4, where a step costs what the host spends issuing it")
    print(_table([x for x in r if x["part"] == "invertible_host"], ["shape", "method", "host_ms", "x_plain", "ops"]))
    mr = [x for x in r if x["part"] == "invertible_model"]
    if mr:
        print("\n# the GPU-size stack on the meta device (live tensors op by op; no cuDNN workspaces)")
        print(_table(mr, ["shape", "depth", "method", "saved_mib", "peak_mib", "mem_frac"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "gpu" if device.type == "cuda" else "cpu"
        with open(os.path.join(args.out, f"invertible_{tag}.json"), "w") as f:
            json.dump(dict(device=device_name(device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                           rows=r), f, indent=1)
        plot(r, os.path.join(args.out, f"invertible_{tag}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
