"""Pure-torch reference of exact categorical sampling: this file defines what the op means.

For each row r of logits ``[R, V]`` with temperature ``T > 0`` and an optional per-row logit
threshold ``tau[r]`` (top-k / min-p / top-p truncation all reduce to one; ``-inf`` keeps all)::

    M     = max_i l_i                         (over the kept tokens)
    e_i   = exp((l_i - M) / T)  if l_i >= tau[r]  else 0
    Z     = sum_i e_i                         (float64)
    u     = uniform53(seed[r], offset[r])     (counter-based: see :func:`uniform53`)
    token = min { i : e_0 + ... + e_i > u * Z }

so ``P(token = i) = e_i / Z = softmax(l / T)_i`` over the kept tokens, evaluated in float64: no
per-element random numbers, no Gumbel truncation.  With it, per row (float64):
``prob = e_token / Z``, ``top1 = 1 / Z`` (the most likely token's probability), ``margin =
top1 - top2`` (``top2`` from the second-largest kept logit, counted with multiplicity), and
``entropy = log Z - sum_i (e_i / Z) (l_i - M) / T``.  ``T = 0`` means argmax (the first maximal
index); its statistics are those of ``softmax(l)`` (``T = 1``), which is what LLaDA's
low-confidence remasking reads.

Rows whose kept logits are all ``-inf`` or contain NaN / +inf are invalid: token ``-2``.  Rows
switched off by ``row_mask`` are not read: token ``-1`` and NaN statistics.

Reference: Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic Masked Models
and Exploit Inaccurate Categorical Sampling" (why fp32 Gumbel-max is not exact).
"""
from __future__ import annotations

from typing import Optional

import torch

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
#: Temperatures above this sample as this one: the kernels form ``(l - M) / T`` in fp32, where ``1 / T``
#: must stay a normal number and an ``l - M`` that overflows fp32 must still weigh ``exp(< -2.6e8) = 0``
#: (C++: ``kMaxTemperature``).  The draw at it is uniform over the kept tokens for logits within 1e22.
MAX_TEMPERATURE = 2.0 ** 100
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _s64(v: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return v - (1 << 64) if v >= (1 << 63) else v


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic, bit-identical to uint64)."""
    z = z + _s64(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _s64(_C1)
    z = (z ^ _srl(z, 27)) * _s64(_C2)
    return z ^ _srl(z, 31)


def uniform53(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Counter-based float64 uniforms in [0, 1) with 53 random bits:
    ``u = (mix64(seed ^ mix64(offset)) >> 11) * 2^-53``.  Every backend computes the same bits."""
    h = mix64(seeds.long() ^ mix64(offsets.long()))
    return _srl(h, 11).double() * (2.0 ** -53)


def sample_categorical_ref(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    temperature: float = 1.0,
    threshold: Optional[torch.Tensor] = None,
    row_mask: Optional[torch.Tensor] = None,
    rows_per_block: int = 64,
):
    """Reference for ``logits [R, V]``; returns ``(tokens int64 [R], prob f64 [R], stats f64 [R, 3])``
    with stats = (top1, margin, entropy).  Works on blocks of rows, so extra memory is
    ``rows_per_block x V`` float64, not ``R x V``."""
    R, V = logits.shape
    dev = logits.device
    tokens = torch.full((R,), -1, dtype=torch.int64, device=dev)
    prob = torch.full((R,), float("nan"), dtype=torch.float64, device=dev)
    stats = torch.full((R, 3), float("nan"), dtype=torch.float64, device=dev)
    u_all = uniform53(seeds, offsets)
    t_samp = float(temperature)
    t_stat = min(t_samp, MAX_TEMPERATURE) if t_samp > 0 else 1.0
    for r0 in range(0, R, rows_per_block):
        r1 = min(R, r0 + rows_per_block)
        lg = logits[r0:r1].double()
        keep = torch.ones_like(lg, dtype=torch.bool)
        if threshold is not None:
            keep = lg >= threshold[r0:r1].double().unsqueeze(1)
        lk = torch.where(keep, lg, torch.full_like(lg, float("-inf")))
        bad = torch.isnan(lg).any(1) | torch.isposinf(lg).any(1) | torch.isneginf(lk).all(1)
        M = lk.amax(1, keepdim=True)
        Msafe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
        s = (lk - Msafe) / t_stat
        e = torch.where(keep, torch.exp(s), torch.zeros_like(s))
        Z = e.sum(1)
        top2 = torch.topk(lk, min(2, V), dim=1).values
        l2 = top2[:, 1] if V > 1 else torch.full_like(Z, float("-inf"))
        top1 = 1.0 / Z
        p2 = torch.exp((l2 - Msafe[:, 0]) / t_stat) / Z
        # (e * s -> 0 as s -> -inf: where e underflowed to 0 the term is 0, not 0 * -inf)
        ent = torch.log(Z) - torch.where(keep & (e > 0), e * s, torch.zeros_like(s)).sum(1) / Z
        if t_samp > 0:
            target = u_all[r0:r1] * Z
            csum = torch.cumsum(e, 1)
            tok = torch.searchsorted(csum, target.unsqueeze(1), right=True).squeeze(1)
            # rounding can leave target past the last cumulative value: take the last kept token
            last_kept = (V - 1) - torch.flip(keep & (e > 0), [1]).int().argmax(1)
            tok = torch.minimum(tok, last_kept)
            p = e.gather(1, tok.unsqueeze(1)).squeeze(1) / Z
        else:
            tok = lk.argmax(1)
            p = torch.exp((lk.gather(1, tok.unsqueeze(1)).squeeze(1) - Msafe[:, 0]) / t_stat) / Z
        tok = torch.where(bad, torch.full_like(tok, -2), tok)
        st = torch.stack([top1, top1 - p2, ent], 1)
        if row_mask is not None:
            on = row_mask[r0:r1]
            tok = torch.where(on, tok, torch.full_like(tok, -1))
            p = torch.where(on, p, torch.full_like(p, float("nan")))
            st = torch.where(on.unsqueeze(1), st, torch.full_like(st, float("nan")))
        tokens[r0:r1] = tok
        prob[r0:r1] = p
        stats[r0:r1] = st
    return tokens, prob, stats
