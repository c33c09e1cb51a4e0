"""The README's Python examples run as written: each ```python block is executed with small stand-ins
for the names it leaves to the reader (a model, latents, layers, logits), so the API tour cannot
drift from the library.  Lines whose arguments are elided with ``...`` are the one thing skipped."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn as nn

import pydiff

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _runnable(code: str) -> str:
    # a call whose arguments are elided, "f(..., backend=...)", is illustration, not code
    return "\n".join(line for line in code.splitlines() if "(...," not in line)


def _namespace() -> dict:
    """Stand-ins for what the examples take from the reader's program."""
    from diffusers import DPMSolverMultistepScheduler

    g = torch.Generator().manual_seed(0)
    lat = (1, 4, 64, 64)  # the shape the examples use

    def model(x, t, cond):  # an epsilon model: any function of (x, t, cond) of x's shape
        return 0.1 * x + (0.01 if cond is None else 0.02) * torch.ones_like(x)

    class Pipe:
        scheduler = DPMSolverMultistepScheduler()

    linear = nn.Linear(128, 64)
    fc1, fc2 = nn.Linear(128, 256), nn.Linear(256, 128)
    from pydiff.quant import W4A4Linear

    fc1, fc2 = W4A4Linear.from_linear(fc1, group_size=64, rank=16), W4A4Linear.from_linear(fc2, group_size=64, rank=16)
    unet = nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(64, 4, 3, padding=1))
    from pydiff.ops.quant import quantize

    w = torch.randn(64, 128, generator=g) / 128**0.5
    qw, sw, _ = quantize(w, "int4", 64)
    V = 97
    ns = dict(
        torch=torch, pydiff=pydiff, model=model, cond=torch.randn(lat, generator=g),
        diffusers_scheduler=DPMSolverMultistepScheduler(), a=0.8, s=0.6, ratio=0.9, w0=0.05, w1=-0.02,
        x=torch.randn(lat, generator=g), eps_c=torch.randn(lat, generator=g), eps_u=torch.randn(lat, generator=g),
        x0_prev=torch.randn(lat, generator=g), c=torch.randn(lat, generator=g), u=None, g=g, pipe=Pipe(),
        linear=linear, fc1=fc1, fc2=fc2, unet=unet, run_sampler=lambda m: m(torch.randn(2, 4, 8, 8, generator=g)),
        shift=0.1 * torch.randn(2, 128, generator=g), scale=0.1 * torch.randn(2, 128, generator=g), qw=qw, sw=sw,
        b=torch.randn(64, generator=g), logits=torch.randn(6, V, generator=g),
        seeds=torch.arange(6, dtype=torch.int64), step_idx=torch.zeros(6, dtype=torch.int64),
        is_masked=torch.tensor([True, False, True, True, False, True]),
    )
    return ns


BLOCKS = _blocks()


def test_readme_has_examples():
    assert len(BLOCKS) >= 4, "README: expected its API tour's python blocks"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    code = _runnable(BLOCKS[i])
    ns = _namespace()
    if "layer(x" in code or "quantize(x" in code:  # the quantization block: x is a [tokens, features] input
        ns["x"] = torch.randn(4, 128, generator=ns["g"])
    if "sample_categorical" in code:  # fill= takes the current tokens
        ns["x"] = torch.randint(0, 97, (6,), generator=ns["g"])
    before = pydiff.get_backend()
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), ns)  # noqa: S102
    finally:
        pydiff.set_backend(before)
