"""Exact categorical sampling: ``torch.ops.pydiff.sample_categorical`` and its Python wrapper.

One read of the logits per row (plus a re-read of one chunk): per-chunk maxima and sums of
exponentials, one float64 uniform per row from a counter-based generator, then the inverse CDF over
chunks and within the chosen chunk (float64-range exponentials and a float64 prefix sum there; the
GPU kernels' first pass uses the hardware ``exp2`` and fp32 sums of eight, which only choose the
chunk).  No per-element random numbers, no ``R x V`` buffer.  The definition is
:mod:`pydiff.reference.sampling`.

Backends: ``cuda`` (csrc/sampling/sample_categorical_cuda.cu), ``triton``
(triton_kernels/sampling.py), ``cpu`` (csrc/sampling/sample_categorical_cpu.cpp), ``torch`` (the
reference).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from pydiff import _ext, backend as _backend
from pydiff.ops._library import lib
from pydiff.ops.solver import FLOAT_DTYPES
from pydiff.reference.sampling import sample_categorical_ref


@torch.library.register_fake("pydiff::sample_categorical", lib=lib)
def _fake(logits, threshold, row_mask, seeds, offsets, temperature, want_stats=True):
    r = logits.shape[0]
    return (logits.new_empty((r,), dtype=torch.int64), logits.new_empty((r,), dtype=torch.float64),
            logits.new_empty((r, 3), dtype=torch.float64))


def _torch_impl(logits, threshold, row_mask, seeds, offsets, temperature, want_stats=True):
    return sample_categorical_ref(logits, seeds, offsets, temperature, threshold, row_mask)  # statistics always


def _triton_impl(logits, threshold, row_mask, seeds, offsets, temperature, want_stats=True):
    from pydiff.triton_kernels.sampling import sample_categorical_triton

    return sample_categorical_triton(logits, threshold, row_mask, seeds, offsets, temperature, want_stats=want_stats)


if not _ext.has_cpu_kernels():
    lib.impl("sample_categorical", _torch_impl, "CPU")
    lib.impl("sample_categorical",
             lambda *a: (_triton_impl if _backend.triton_available() else _torch_impl)(*a), "CUDA")


class SampleResult(NamedTuple):
    """Tokens plus, on request, the chosen token's probability and remasking confidences."""
    tokens: torch.Tensor
    probs: Optional[torch.Tensor] = None      # float64, probability of the chosen token
    top1: Optional[torch.Tensor] = None       # float64, probability of the most likely token
    margin: Optional[torch.Tensor] = None     # float64, top-1 minus top-2 probability
    entropy: Optional[torch.Tensor] = None    # float64, entropy in nats


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_sample_args(logits, temperature, top_k, top_p, min_p, mask, fill, seeds, offsets, seed=None,
                      generator=None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: expected dtype float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (_is_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if min_p is not None and not (_is_number(min_p) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p: expected a number in [0, 1], got {min_p!r}")
    if seed is not None:
        if not _is_int(seed) or not -2 ** 63 <= seed < 2 ** 63:
            raise ValueError(f"seed: expected an int in [-2**63, 2**63), got {seed!r}")
        if seeds is not None or generator is not None:
            raise ValueError("seed: pass one of seed, seeds/offsets or generator, not several")
    if seeds is not None and generator is not None:
        raise ValueError("generator: pass one of seed, seeds/offsets or generator, not several")
    if fill is not None and mask is None:
        raise ValueError("fill: only used with mask (the values of the rows mask switches off)")
    batch = logits.shape[:-1]
    for name, t, dt in (("mask", mask, torch.bool), ("fill", fill, torch.int64), ("seeds", seeds, torch.int64),
                        ("offsets", offsets, torch.int64)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dt:
            raise TypeError(f"{name}: expected dtype {dt}, got {t.dtype}")
        if name in ("seeds", "offsets"):
            try:
                ok = torch.broadcast_shapes(t.shape, batch) == batch
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"{name}: expected a shape that broadcasts to {tuple(batch)} (logits.shape[:-1]), "
                                 f"got {tuple(t.shape)}")
        elif t.shape != batch:
            raise ValueError(f"{name}: expected shape {tuple(batch)} (logits.shape[:-1]), got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name}: expected device {logits.device}, got {t.device}")
    if (seeds is None) != (offsets is None):
        raise ValueError("seeds, offsets: pass both (per-row seeds and offsets) or neither")


def _topp_threshold(lg: torch.Tensor, tau: Optional[torch.Tensor], temperature: float, top_p: float,
                    rows_per_block: int = 64, k0: int = 64) -> torch.Tensor:
    """Per-row logit threshold keeping the smallest top set of mass >= top_p (ties at the edge
    kept), computed in float64 on blocks of rows: extra memory rows_per_block x V, not R x V.

    With p = softmax(l / T) over the row (float64, after the ``tau`` truncation), the threshold is
    the value l_(j) of the sorted-descending logits at the first j whose cumulative p reaches
    ``top_p`` (the last kept value when rounding leaves the total just short).  Only the top k logits
    are sorted (``torch.topk``), k = ``k0`` first and 8x larger until every row of the block reaches
    ``top_p`` inside them (at most V): a full sort of each row cost 170-250 ms at 64 x 32000 on the
    2-core CPU, the top 64 cost well under 1 % of that where the mass concentrates, as it does in
    language models; a flat row costs about a sort.  On other devices (and while torch.compile
    traces) k = V from the start: checking the mass would synchronise with the host."""
    R, V = lg.shape
    out = torch.empty(R, dtype=torch.float32, device=lg.device)
    t = temperature if temperature > 0 else 1.0
    for r0 in range(0, R, rows_per_block):
        blk = lg[r0:r0 + rows_per_block].double()
        if tau is not None:
            blk = torch.where(blk >= tau[r0:r0 + rows_per_block].double().unsqueeze(1), blk,
                              torch.full_like(blk, float("-inf")))
        xs = blk / t
        m = xs.amax(1, keepdim=True)
        Z = torch.exp(xs - m).sum(1, keepdim=True)  # softmax's own form: equal logits give exact shares
        target = torch.full((blk.shape[0], 1), top_p, dtype=blk.dtype, device=blk.device)
        # the escalation tests the mass on the host: on the CPU only (free there); a GPU call keeps no
        # host synchronisation, and a torch.compile trace no data-dependent branch, by taking k = V
        k = min(V, k0) if lg.device.type == "cpu" and not torch.compiler.is_compiling() else V
        while True:
            top = torch.topk(blk, k, dim=1).values  # sorted, descending
            c = torch.cumsum(torch.exp(top / t - m) / Z, dim=1)
            if k == V or bool((c[:, -1] >= top_p).all()):
                break
            k = min(V, 8 * k)
        # first index whose cumulative mass reaches top_p (guard rounding with the last index)
        j = torch.searchsorted(c, target).clamp(max=k - 1)
        out[r0:r0 + rows_per_block] = top.gather(1, j).squeeze(1).float()
    return out


def sample_categorical(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    fill: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    seeds: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    return_probs: bool = False,
    return_confidence: bool = False,
    on_invalid: str = "raise",
    backend: Optional[str] = None,
):
    """Draw one token per row from ``softmax(logits / temperature)``, exactly (float64).

    Args:
        logits: ``[..., V]`` float32 / float16 / bfloat16 (the last dim contiguous is fastest).
        temperature: ``T > 0`` samples; ``0`` takes the argmax.  ``T`` above ``2**100`` (1.3e30) samples
            as ``2**100`` (the kernels form ``(l - max) / T`` in fp32; either way the draw is uniform
            over the kept tokens for logits within 1e22 of each other).
        top_k: keep the ``top_k`` largest logits (ties with the k-th are kept, as in HF).
        top_p: then keep the smallest most-likely set of mass >= top_p (nucleus; computed on
            blocks of 64 rows, so its extra memory is ``64 x V``, never ``R x V``).
        min_p: then keep tokens with ``p >= min_p * p_max``.
        mask: bool ``[...]``: rows to sample; the others are not read and get ``fill`` (or -1).
        fill: int64 ``[...]``: values for the rows that ``mask`` switches off.
        generator: a ``torch.Generator`` (one 64-bit draw per call, on the logits' device: no sync).
        seed: an int; with it, row ``r`` uses ``(seed, r)``.
        seeds, offsets: int64 per-row seed and offset, broadcastable to ``[...]`` (e.g. a seed per
            sequence ``[B, 1]`` and the position ``[L]``, or the step index): the same values give
            the same tokens on every run of a backend.
        return_probs: also return the chosen token's probability (float64).
        return_confidence: also return top-1 probability, top-1 minus top-2 margin, entropy.
        on_invalid: ``"raise"`` (a row of all ``-inf`` or with NaN / +inf raises ``ValueError``;
            this reads one flag back from the device) or ``"flag"`` (such rows get token -2, no sync).
        backend: ``cuda``, ``triton``, ``cpu``, ``torch`` or ``auto``.

    Returns:
        int64 tokens ``[...]``, or a :class:`SampleResult` when ``return_probs`` /
        ``return_confidence`` is set.
    """
    check_sample_args(logits, temperature, top_k, top_p, min_p, mask, fill, seeds, offsets, seed, generator)
    if on_invalid not in ("raise", "flag"):
        raise ValueError(f"on_invalid: expected 'raise' or 'flag', got {on_invalid!r}")
    batch = logits.shape[:-1]
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)
    if lg.stride(-1) != 1:
        lg = lg.contiguous()
    R = lg.shape[0]
    dev = logits.device
    if seeds is None:
        if seed is not None:
            base = torch.full((1,), int(seed), dtype=torch.int64, device=dev)
        else:
            base = torch.randint(-(2 ** 63), 2 ** 63 - 1, (1,), dtype=torch.int64, device=dev, generator=generator)
        seeds_r = base.expand(R)
        offsets_r = torch.arange(R, dtype=torch.int64, device=dev)
    else:
        seeds_r, offsets_r = seeds.broadcast_to(batch).reshape(R), offsets.broadcast_to(batch).reshape(R)
    T = float(temperature)
    tau = None
    if top_k is not None and top_k < V:
        tau = torch.topk(lg, top_k, dim=1).values[:, -1].float().contiguous()
    if top_p is not None and top_p < 1.0 and R > 0:
        tp = _topp_threshold(lg, tau, T, float(top_p))
        tau = tp if tau is None else torch.maximum(tau, tp)
    if min_p is not None and min_p > 0 and T > 0 and R > 0:
        mx = lg.amax(dim=1).double()
        tm = (mx + T * math.log(min_p)).float() if min_p < 1 else mx.float()
        tau = tm if tau is None else torch.maximum(tau, tm)
    row_mask = None if mask is None else mask.reshape(R)
    name = _backend.resolve(backend, dev)
    # without return_confidence the CUDA and Triton kernels skip the per-logit statistics work
    args = (lg, tau, row_mask, seeds_r.contiguous(), offsets_r.contiguous(), T, bool(return_confidence))
    if name in ("cuda", "cpu"):
        tokens, prob, stats = torch.ops.pydiff.sample_categorical(*args)
    elif name == "triton":
        tokens, prob, stats = _triton_impl(*args)
    else:
        tokens, prob, stats = _torch_impl(*args)
    if on_invalid == "raise" and R > 0 and bool((tokens == -2).any()):
        bad = (tokens == -2).nonzero()[:4, 0].tolist()
        raise ValueError(f"logits: row(s) {bad} have no finite kept logit or contain NaN/+inf "
                         "(pass on_invalid='flag' to get token -2 for them instead)")
    if fill is not None and row_mask is not None:
        tokens = torch.where(row_mask, tokens, fill.reshape(R))
    tokens = tokens.reshape(batch)
    if not (return_probs or return_confidence):
        return tokens
    res = SampleResult(tokens=tokens)
    if return_probs:
        res = res._replace(probs=prob.reshape(batch))
    if return_confidence:
        res = res._replace(top1=stats[:, 0].reshape(batch), margin=stats[:, 1].reshape(batch),
                           entropy=stats[:, 2].reshape(batch))
    return res
