"""Timing and bandwidth helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, min_time: float = 0.2) -> float:
    """Median seconds per call of ``fn()``.  CUDA: triton.testing.do_bench when available (it flushes
    the L2 cache between calls), else CUDA events; CPU: perf_counter."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < reps or (time.perf_counter() < t_end and len(times) < 10 * reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def call_time(fn, device: torch.device, calls: int = 200, warmup: int = 10) -> float:
    """Seconds per call of ``fn()`` issued back to back, synchronised once at the end: what an
    eager loop pays per call (host overhead and launch included; the larger of host and device
    time).  ``bench`` measures the device time of one call instead."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured bytes/s of a device copy (bytes read + written): the floor's denominator."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / t


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"
