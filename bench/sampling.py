"""Categorical sampling benchmarks: logits -> tokens plus the chosen token's probability.

Ours (each backend) against what users run today, in the same run: LLaDA's float64 Gumbel code
(``add_gumbel_noise`` + softmax/gather for the confidence), fp32 Gumbel-max in eager torch,
``torch.multinomial(softmax(logits))``, a one-pass fused fp32 Gumbel-max kernel (``torch.compile``
of the fp32 Gumbel code: random numbers, log-log, argmax and the softmax gather in fused kernels),
and the floor: one read of the logits (``amax(-1)``).
On CUDA the peak extra memory of each is measured with the caching allocator.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import pydiff
from pydiff.sampling import sample_categorical

from _timing import bench, sync


def llada_float64(logits: torch.Tensor, temperature: float = 1.0):
    """LLaDA's sampling step as published (float64 Gumbel via exp(l) / (-log u)^T, then the
    low-confidence remasking probability from softmax(logits)); written from its math."""
    lg = logits.to(torch.float64)
    noise = torch.rand_like(lg)
    gumbel = (-torch.log(noise)) ** temperature
    x0 = torch.argmax(lg.exp() / gumbel, dim=-1)
    p = F.softmax(logits, dim=-1)
    return x0, torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


def gumbel_fp32(logits: torch.Tensor, temperature: float = 1.0):
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
    x0 = (logits.float() / temperature - torch.log(-torch.log(u))).argmax(-1)
    p = F.softmax(logits.float(), dim=-1)
    return x0, torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


def multinomial(logits: torch.Tensor, temperature: float = 1.0):
    p = torch.softmax(logits.float() / temperature, -1)
    x0 = torch.multinomial(p, 1).squeeze(-1)
    return x0, torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


def _peak_extra(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _fused_gumbel():
    try:
        return torch.compile(gumbel_fp32, dynamic=False)
    except Exception:  # noqa: BLE001  (no compiler: leave the baseline out)
        return None


def _with_env(name: str, value: str, fn):
    """``fn()`` with the environment variable ``name`` set to ``value`` (restored after)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def rows(device: torch.device, shapes=None, dtype=None, bw=None, compile_baseline: bool = True, out=None):
    if shapes is None:
        shapes = [(4096, 126464)] if device.type == "cuda" else [(64, 32000)]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = out if out is not None else []  # appended as measured: a stopped run keeps its rows
    for R, V in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn((R, V), device=device, generator=g) * 3).to(dtype)
        nbytes = logits.numel() * logits.element_size()
        impls = {"amax (one read: the floor)": lambda: logits.amax(-1)}
        for b in pydiff.available_backends(device):
            if b == "torch" or (b == "triton" and device.type == "cpu"):
                continue  # the reference and the interpreter are correctness tools
            run = (lambda b=b: sample_categorical(logits, seed=1, return_probs=True, on_invalid="flag", backend=b))
            impls[f"pydiff[{b}]"] = run
            if device.type == "cuda":
                # the select fused into the partial kernel's last block per row (PYDIFF_SAMPLING_FUSED=1,
                # read on every call; opt-in: slower on an H200)
                impls[f"pydiff[{b}], fused select"] = lambda run=run: _with_env("PYDIFF_SAMPLING_FUSED", "1", run)
        impls["LLaDA float64 Gumbel"] = lambda: llada_float64(logits)
        impls["fp32 Gumbel-max (eager)"] = lambda: gumbel_fp32(logits)
        impls["torch.multinomial"] = lambda: multinomial(logits)
        fused = _fused_gumbel() if compile_baseline else None
        if fused is not None:
            impls["fp32 Gumbel-max (torch.compile, fused)"] = lambda: fused(logits)
        floor_t = None
        for name, fn in impls.items():
            t = bench(fn, device, reps=10 if device.type == "cpu" else 20)
            if floor_t is None:
                floor_t = t
            out.append(dict(part="sampling", shape=f"{R}x{V}", dtype=str(dtype).replace("torch.", ""), impl=name,
                            time_us=t * 1e6, gbps=nbytes / t / 1e9, x_amax=t / floor_t,
                            x_hbm_floor=(t / (nbytes / bw)) if bw else None, peak_extra_mib=_peak_extra(fn, device)))
    return out
