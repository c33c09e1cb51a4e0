"""Float64-safe categorical sampling (the public entry point).

``sample_categorical(logits, temperature=..., top_k=..., top_p=..., min_p=..., mask=...,
generator=...)`` draws exactly from ``softmax(logits / T)`` in float64 with one read of the logits;
see :mod:`pydiff.ops.sampling` for the options and :mod:`pydiff.reference.sampling` for the
definition.  ``gumbel_max_fp32`` is the common inexact baseline, kept for comparisons.
"""
from __future__ import annotations

import torch

from pydiff.ops.sampling import SampleResult, sample_categorical
from pydiff.reference.sampling import uniform53

__all__ = ["SampleResult", "gumbel_max_fp32", "sample_categorical", "uniform53"]


def gumbel_max_fp32(logits: torch.Tensor, temperature: float = 1.0, generator=None) -> torch.Tensor:
    """The usual fp32 Gumbel-max sampler, ``argmax(l / T - log(-log(u)))`` with 24-bit uniforms.
    Its noise is capped near 16.6, so tokens ~19.4 nats below the best are never drawn (Zheng et
    al. 2024).  Baseline only."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    g = -torch.log(-torch.log(u))
    return (logits.float() / temperature + g).argmax(-1)
