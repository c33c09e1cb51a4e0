"""Triton kernels of exact categorical sampling (definition: :mod:`pydiff.reference.sampling`).

Kernel 1, one program per (row, chunk): one read of each chunk of logits; the chunk's max, NaN/+inf
flag and the sum of ``e = exp((l - m_c)/T)``: ``e`` by the hardware ``exp2`` in fp32 (MUFU.EX2 on an
NVIDIA GPU, ~2 ulp; one instruction per logit instead of the ~12 of a polynomial, and the kernel is
then bound by its read of the logits, not by arithmetic), summed in fp32 by eights and then in
float64, kept by segment of ``CHUNK / 4`` logits.  These sums only choose the chunk and its segment
(their probabilities to ~5e-7 relative, like the exponentials themselves); with the statistics (``STATS``) also the second max (with multiplicity),
the sum of ``e * (l - m_c)/T`` and the sum split as (count of maxima) + (the rest), which the
entropy needs; at temperature 0 (``ARG``) the first argmax.  Kernel 2, one program per row
(:func:`_select_row`; fused, the row's last kernel-1 program runs it instead): combines the chunk
partials, draws the counter-based float64 uniform, picks the chunk by the cumulative weighted sums
and the segment by the chunk's segment sums, and rescans that segment with float64-range
exponentials (:func:`_exp_neg`, as the CUDA rescan and the C++ kernel compute them) and a float64
prefix sum to pick the token, at the target's share of the rescan's own total: within the segment,
token ``i`` is drawn with probability ``e_i / sum(e)`` in float64, tails included.  A segment whose
kept tokens' fp32 exponentials all flushed to 0 (more than ~87 nats below the chunk maximum) is
flagged by kernel 1; the select then chooses among the chunk's segments by their float64 totals, so
no kept token loses its weight.  Extra memory: ``rows x chunks`` partials.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CHUNK = 4096
MAX_TEMPERATURE = 2.0 ** 100  # as pydiff.reference.sampling.MAX_TEMPERATURE (this module imports no pydiff)
_BIG = 2 ** 62


@triton.jit
def _mix64(z):
    z = z + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _exp_neg(x):
    """``exp(x)`` in float64 for fp32 ``x <= 0``, as the CUDA and C++ kernels compute it: an fp32
    degree-7 polynomial on the Cody-Waite reduced argument ``r = x - k ln2`` (``|r| <= ln2 / 2``,
    relative error ~2e-7), times ``2^k`` formed in float64 (values down to 1e-308 survive; below
    that, 0).  Much cheaper on a GPU than a float64 ``exp`` per logit, which would cost more than
    the read of the logits itself."""
    x = tl.maximum(x, -1000.0)
    t = x * 1.44269504088896341 + 12582912.0  # 1.5 * 2^23 + k: rounds x / ln2 to the nearest integer k
    kf = t - 12582912.0
    r = x - kf * 0.693359375
    r = r + kf * 2.12194440e-4
    p = r * (1.0 / 5040.0) + (1.0 / 720.0)
    p = p * r + (1.0 / 120.0)
    p = p * r + (1.0 / 24.0)
    p = p * r + (1.0 / 6.0)
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # the biased exponent k + 1023 = int(kf) + 1023 straight from t's bits (t = 1.5 * 2^23 + kf), clamped
    # at 0 (2^k underflows to 0.0 below 2^-1022), then placed in bits 52-62: 2^k as a float64
    kb = tl.maximum(t.to(tl.int32, bitcast=True) - (0x4B400000 - 1023), 0)
    two_k = (kb.to(tl.uint32).to(tl.uint64) << 52).to(tl.float64, bitcast=True)
    return p.to(tl.float64) * two_k


@triton.jit
def _group_sum(v, CHUNK: tl.constexpr):
    """Sum of a ``[CHUNK]`` fp32 vector: fp32 sums of 8 consecutive values (<= 4.2e-7 relative error
    each: nonnegative terms), added up in float64."""
    G: tl.constexpr = 8 if CHUNK >= 8 else CHUNK
    g = tl.sum(tl.reshape(v, [CHUNK // G, G]), 1)
    return tl.sum(g.to(tl.float64), 0)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _partial_kernel(logits_ptr, thr_ptr, mask_ptr, pm1, pm2, ps, pt, pz, parg, pbad, pseg, pflush, V, row_stride,
                    nchunks, inv_t, seeds_ptr, offsets_ptr, tok_ptr, prob_ptr, stats_ptr, cnt_ptr, t_stat,
                    HAS_T: tl.constexpr, HAS_M: tl.constexpr, CHUNK: tl.constexpr, STATS: tl.constexpr,
                    UNIT_T: tl.constexpr, ARG: tl.constexpr, FUSED: tl.constexpr, NCP: tl.constexpr,
                    NSEG: tl.constexpr):
    pid = tl.program_id(0)  # one grid dimension (y and z stop at 65535 rows)
    c = pid % nchunks
    r = (pid // nchunks).to(tl.int64)
    offs = c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
    valid = offs < V
    if HAS_M:
        valid = valid & (tl.load(mask_ptr + r).to(tl.int32) != 0)
    x = tl.load(logits_ptr + r * row_stride + offs, mask=valid, other=float("-inf")).to(tl.float32)
    # NaN or +inf anywhere in the chunk: one NaN-propagating max (the row is then invalid, and its
    # outputs do not depend on the sums below, so x needs no NaN scrubbing for them)
    mx = tl.reduce(x, 0, _max_nan)
    bad = ((mx != mx) | (mx == float("inf"))).to(tl.int32)
    if HAS_T:
        tau = tl.load(thr_ptr + r)
        kv = tl.where(x >= tau, x, float("-inf"))
        m1 = tl.max(kv, 0)
    else:
        kv = x
        m1 = mx  # = max(x) unless the chunk is bad (NaN / +inf: the row's outputs are NaN / -2 whatever m1 is)
    m1s = tl.where(m1 > float("-inf"), m1, 0.0)
    if UNIT_T:
        xs = kv - m1s  # (x * 1.0 is x: the same values as with the multiply)
    else:
        xs = (kv - m1s) * inv_t
    # fp32 exponentials by the hardware exp2 (MUFU.EX2 on NVIDIA GPUs, ~2 ulp; exactly 0 where kv = -inf),
    # summed in fp32 by eights, then in float64
    e = tl.exp2(xs * 1.4426950408889634)
    i = r * nchunks + c
    if NSEG > 1:
        # the sums by segment of CHUNK // NSEG logits (the select rescans only the one holding the
        # target), s their sum; a segment with a kept token whose exponentials all flushed to 0 in fp32
        # is flagged (bit k of pflush): the select then chooses the segment from float64 totals
        SEG: tl.constexpr = CHUNK // NSEG
        g8 = tl.sum(tl.reshape(e, [CHUNK // 8, 8]), 1)
        seg = tl.sum(tl.reshape(g8.to(tl.float64), [NSEG, SEG // 8]), 1)
        s = tl.sum(seg, 0)
        kept = tl.max(tl.reshape((kv > float("-inf")).to(tl.int32), [NSEG, SEG]), 1)
        sk = tl.arange(0, NSEG)
        flushed = tl.sum(tl.where((kept != 0) & (seg <= 0.0), tl.full([NSEG], 1, tl.int32) << sk, 0), 0)
        tl.store(pseg + i * NSEG + sk, seg)
        tl.store(pflush + i, flushed)
    else:
        s = _group_sum(e, CHUNK)
    tl.store(pm1 + i, m1)
    tl.store(ps + i, s)
    tl.store(pbad + i, bad)
    if STATS:  # second max (with multiplicity), entropy sum, split sum: the statistics (and T = 0)
        lo = kv < m1  # with m1 the max of a NaN-free chunk, the others are the maxima
        cnt = CHUNK - tl.sum(lo.to(tl.int32), 0)
        below = tl.max(tl.where(lo, kv, float("-inf")), 0)
        m2 = tl.where((cnt > 1) & (m1 > float("-inf")), m1, below)
        t = _group_sum(e * tl.maximum(xs, -3.0e38), CHUNK)  # (e = 0 where xs = -inf: no 0 * -inf)
        # the sum again as (count of maxima) + (fp32 sums of the others, which carry their own
        # rounding, not that of the 1s): entropy = log Z - ..., so for a peaked row log Z needs Z - 1
        # to ~1e-7 of itself, which the plain fp32 sums (1 + small, rounded to 2^-24) do not give
        rest = _group_sum(tl.where(lo, e, 0.0), CHUNK)
        tl.store(pz + i, tl.where(m1 > float("-inf"), cnt.to(tl.float64) + rest, 0.0))
        tl.store(pm2 + i, m2)
        tl.store(pt + i, t)
    if ARG:  # the first argmax (T = 0 only)
        arg = tl.min(tl.where((kv == m1) & (kv > float("-inf")), offs, 2 ** 62), 0)
        tl.store(parg + i, arg)
    if FUSED:
        # the row's last program to finish runs its select: every store above before this program's
        # count (a barrier, then a release at GPU scope); the count's acquire before the select's loads
        # (which read the partials from L2, never a stale L1 line: .cg)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
        if done == nchunks - 1:
            _select_row(r, logits_ptr, thr_ptr, mask_ptr, seeds_ptr, offsets_ptr, pm1, pm2, ps, pt, pz, parg, pbad,
                        pseg, pflush, tok_ptr, prob_ptr, stats_ptr, V, row_stride, nchunks, t_stat, inv_t, ARG, HAS_T,
                        HAS_M, NCP, CHUNK, STATS, UNIT_T, True, NSEG)


@triton.jit
def _rescan_e(row_ptr, offs, valid, tau, m_sel, inv_t, HAS_T: tl.constexpr, UNIT_T: tl.constexpr):
    """``e = exp((l - m_c) / T)`` of the logits at ``offs`` in float64 range (:func:`_exp_neg`; 0 where
    not kept or not ``valid``)."""
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_T:
        kv = tl.where(x >= tau, x, float("-inf"))
    else:
        kv = x  # (a valid row has no NaN)
    if UNIT_T:
        return _exp_neg(kv - m_sel)  # 0 where kv = -inf
    return _exp_neg((kv - m_sel) * inv_t)


@triton.jit
def _pick_part(sums, target, idx, N: tl.constexpr):
    """The part (of ``N``, ``idx = arange(N)``) holding ``target`` in the running sum of ``sums``, among
    the positive ones, and the target's share of that part (``inf`` past the total, by rounding or for
    an infinite target: then the last positive part)."""
    cum = tl.cumsum(sums, 0)
    k = tl.min(tl.where((cum > target) & (sums > 0), idx, N), 0)
    past = k == N
    k = tl.where(past, tl.max(tl.where(sums > 0, idx, 0), 0), k)
    run = tl.sum(tl.where(idx == k, cum - sums, 0.0), 0)
    den = tl.sum(tl.where(idx == k, sums, 0.0), 0)
    return k, tl.where(past, float("inf"), (target - run) / tl.where(den > 0, den, 1.0))


@triton.jit
def _rescan_window(row_ptr, start, V, live, tau, m_sel, inv_t, frac, W: tl.constexpr, HAS_T: tl.constexpr,
                   UNIT_T: tl.constexpr):
    """The token at share ``frac`` of the float64 total of the ``W`` logits from ``start`` (a segment or
    the chunk; ``frac`` inf: its last kept token) and its ``e``.  The partial kernel's fp32 sums differ
    from the rescan's by ~1e-7 relative, so the target is placed at the same share of the rescan's own
    total: within the window each token is drawn with probability ``e_i / sum(e)`` in float64, tails
    included.  Pass 1 reads the window in one go (one memory round trip) for its SUB-wide pieces'
    sums; the piece holding the target is read again for its prefix sum (a W-wide float64 prefix sum
    would hold every value in registers)."""
    SUB: tl.constexpr = 512 if W > 512 else W
    NP: tl.constexpr = W // SUB
    pi = tl.arange(0, NP)
    offs = start + tl.arange(0, W).to(tl.int64)
    e = _rescan_e(row_ptr, offs, (offs < V) & live, tau, m_sel, inv_t, HAS_T, UNIT_T)
    psum = tl.sum(tl.reshape(e, [NP, SUB]), 1)
    last = tl.max(tl.where(e > 0, offs, -1), 0)
    rem = frac * tl.sum(psum, 0)
    pcum = tl.cumsum(psum, 0)
    found = tl.min(tl.where((pcum > rem) & (psum > 0), pi, NP), 0)
    before = tl.sum(tl.where(pi == found, pcum - psum, 0.0), 0)
    fb = tl.minimum(found, NP - 1)
    offs = start + fb * SUB + tl.arange(0, SUB).to(tl.int64)
    e = _rescan_e(row_ptr, offs, (offs < V) & live & (found < NP), tau, m_sel, inv_t, HAS_T, UNIT_T)
    ce = before + tl.cumsum(e, 0)
    tok = tl.min(tl.where((ce > rem) & (e > 0), offs, 2 ** 62), 0)
    # not reached (rounding: the piece's prefix ends a hair below the sum that chose it): its last
    # kept token; no piece chosen (beyond the last cumulative sum): the window's last kept token
    last_b = tl.max(tl.where(e > 0, offs, -1), 0)
    tok = tl.where(tok == 2 ** 62, tl.where(found < NP, last_b, last), tok)
    te = _rescan_e(row_ptr, tok + tl.zeros([2], dtype=tl.int64), (tok >= 0) & live, tau, m_sel, inv_t, HAS_T, UNIT_T)
    return tok, tl.max(te, 0)


@triton.jit
def _select_kernel(logits_ptr, thr_ptr, mask_ptr, seeds_ptr, offsets_ptr, pm1, pm2, ps, pt, pz, parg, pbad, pseg,
                   pflush, tok_ptr, prob_ptr, stats_ptr, V, row_stride, nchunks, t_stat, inv_t,
                   ARGMAX: tl.constexpr, HAS_T: tl.constexpr, HAS_M: tl.constexpr, NCP: tl.constexpr,
                   CHUNK: tl.constexpr, STATS: tl.constexpr, UNIT_T: tl.constexpr, NSEG: tl.constexpr):
    _select_row(tl.program_id(0).to(tl.int64), logits_ptr, thr_ptr, mask_ptr, seeds_ptr, offsets_ptr, pm1, pm2, ps,
                pt, pz, parg, pbad, pseg, pflush, tok_ptr, prob_ptr, stats_ptr, V, row_stride, nchunks, t_stat, inv_t,
                ARGMAX, HAS_T, HAS_M, NCP, CHUNK, STATS, UNIT_T, False, NSEG)


@triton.jit
def _ldp(ptr, mask, other, CG: tl.constexpr):
    """A load of the chunk partials: ``.cg`` (L2, not L1) when another program of this launch wrote them."""
    if CG:
        return tl.load(ptr, mask=mask, other=other, cache_modifier=".cg")
    return tl.load(ptr, mask=mask, other=other)


@triton.jit
def _select_row(r, logits_ptr, thr_ptr, mask_ptr, seeds_ptr, offsets_ptr, pm1, pm2, ps, pt, pz, parg, pbad, pseg,
                pflush, tok_ptr, prob_ptr, stats_ptr, V, row_stride, nchunks, t_stat, inv_t,
                ARGMAX: tl.constexpr, HAS_T: tl.constexpr, HAS_M: tl.constexpr, NCP: tl.constexpr,
                CHUNK: tl.constexpr, STATS: tl.constexpr, UNIT_T: tl.constexpr, CG: tl.constexpr, NSEG: tl.constexpr):
    """Row ``r``'s second pass (see the module docstring): reads the row's chunk partials, writes its
    token, probability and statistics.  Run by :func:`_select_kernel` (a program per row) or, fused, by
    the row's last partial program to finish."""
    on = 1
    if HAS_M:
        on = tl.load(mask_ptr + r).to(tl.int32)
    ci = tl.arange(0, NCP)
    cv = ci < nchunks
    base = r * nchunks
    m1 = _ldp(pm1 + base + ci, cv, float("-inf"), CG)
    s = _ldp(ps + base + ci, cv, 0.0, CG)
    bad = tl.max(_ldp(pbad + base + ci, cv, 0, CG), 0)
    tau = tl.full([], float("-inf"), tl.float32)
    if HAS_T:
        tau = tl.load(thr_ptr + r)
        bad = bad | (tau != tau).to(tl.int32)
    M = tl.max(m1, 0)
    Md = tl.where(M > float("-inf"), M, 0.0).to(tl.float64)
    off = (m1.to(tl.float64) - Md) / t_stat
    w = tl.where(s > 0, tl.exp(off), 0.0)
    inc = s * w
    Z = tl.sum(inc, 0)
    top1 = 1.0 / Z
    if STATS:
        m2 = _ldp(pm2 + base + ci, cv, float("-inf"), CG)
        t = _ldp(pt + base + ci, cv, 0.0, CG)
        zc = _ldp(pz + base + ci, cv, 0.0, CG)
        # the statistics from the sums split as (count of maxima) + (the rest): see the partial kernel
        Zs = tl.sum(tl.where(s > 0, w * zc, 0.0), 0)
        top1 = 1.0 / Zs
        cnt = tl.sum((m1 == M).to(tl.int32), 0)
        M2 = tl.maximum(tl.max(tl.where(m1 < M, m1, float("-inf")), 0),
                        tl.max(tl.where(m1 == M, m2, float("-inf")), 0))
        M2 = tl.where(cnt > 1, M, M2)
        tsum = tl.sum(tl.where(s > 0, w * (t + zc * off), 0.0), 0)
        margin = (1.0 - tl.exp((M2.to(tl.float64) - Md) / t_stat)) / Zs
        ent = tl.log(Zs) - tsum / Zs
    invalid = (bad != 0) | (M == float("-inf"))
    if ARGMAX:
        arg = _ldp(parg + base + ci, cv, 2 ** 62, CG)
        tok = tl.min(tl.where(m1 == M, arg, 2 ** 62), 0)  # the first argmax
        prob = top1
    else:
        seed = tl.load(seeds_ptr + r).to(tl.uint64, bitcast=True)
        offv = tl.load(offsets_ptr + r).to(tl.uint64, bitcast=True)
        h = _mix64(seed ^ _mix64(offv))
        u = (h >> 11).to(tl.float64) * (1.0 / 9007199254740992.0)
        target = u * Z
        cum = tl.cumsum(inc, 0)
        sel = tl.min(tl.where((cum > target) & (s > 0), ci, NCP), 0)
        beyond = sel == NCP
        last_c = tl.max(tl.where(s > 0, ci, -1), 0)
        sel = tl.where(beyond, last_c, sel)
        sel = tl.maximum(sel, 0)
        acc = tl.sum(tl.where(ci == sel, cum - inc, 0.0), 0)
        w_sel = tl.sum(tl.where(ci == sel, w, 0.0), 0)
        m_sel = tl.sum(tl.where(ci == sel, m1, 0.0), 0)
        s_sel = tl.sum(tl.where(ci == sel, s, 0.0), 0)
        # the target's share of the chosen chunk's sum (beyond: past its last kept token)
        share = (target - acc) / tl.where(w_sel > 0, w_sel, 1.0)
        frac = tl.where(beyond, float("inf"), share / tl.where(s_sel > 0, s_sel, 1.0))
        row_ptr = logits_ptr + r * row_stride
        live = (on != 0) & (invalid == 0)
        cbase = sel.to(tl.int64) * CHUNK
        if NSEG > 1:
            # the segment holding the target, from the chunk's segment sums (beyond their last
            # cumulative sum by rounding: the last segment with a kept token, past its last one);
            # a chunk with a flushed segment chooses by the segments' float64 totals (see the partial kernel)
            SEG: tl.constexpr = CHUNK // NSEG
            sk = tl.arange(0, NSEG)
            sg = _ldp(pseg + (base + sel) * NSEG + sk, sk < NSEG, 0.0, CG)
            flushed = _ldp(pflush + base + sel, live, 0, CG)
            ks, fseg = _pick_part(sg, tl.where(beyond, float("inf"), share), sk, NSEG)
            if flushed != 0:
                # (rare) the same choice from the segments' float64 totals instead, one segment at a
                # time (a CHUNK-wide window would raise this kernel's registers for every row)
                tots = tl.zeros([NSEG], dtype=tl.float64)
                for k in tl.static_range(NSEG):
                    offs = cbase + k * SEG + tl.arange(0, SEG).to(tl.int64)
                    ek = _rescan_e(row_ptr, offs, (offs < V) & live, tau, m_sel, inv_t, HAS_T, UNIT_T)
                    tots = tl.where(sk == k, tl.sum(ek, 0), tots)
                ks, fseg = _pick_part(tots, frac * tl.sum(tots, 0), sk, NSEG)
            tok, etok = _rescan_window(row_ptr, cbase + ks * SEG, V, live, tau, m_sel, inv_t, fseg, SEG, HAS_T, UNIT_T)
        else:
            tok, etok = _rescan_window(row_ptr, cbase, V, live, tau, m_sel, inv_t, frac, CHUNK, HAS_T, UNIT_T)
        prob = etok * w_sel / Z
    nan = float("nan")
    tok = tl.where(invalid, -2, tok)
    prob = tl.where(invalid, nan, prob)
    tok = tl.where(on != 0, tok, -1)
    keep_stats = (on != 0) & (invalid == 0)
    tl.store(tok_ptr + r, tok)
    tl.store(prob_ptr + r, tl.where(on != 0, prob, nan))
    if STATS:
        tl.store(stats_ptr + 3 * r, tl.where(keep_stats, top1, nan))
        tl.store(stats_ptr + 3 * r + 1, tl.where(keep_stats, margin, nan))
        tl.store(stats_ptr + 3 * r + 2, tl.where(keep_stats, ent, nan))
    else:
        tl.store(stats_ptr + 3 * r, nan)
        tl.store(stats_ptr + 3 * r + 1, nan)
        tl.store(stats_ptr + 3 * r + 2, nan)


def sample_categorical_triton(logits, threshold, row_mask, seeds, offsets, temperature, chunk: int = CHUNK,
                              want_stats: bool = True, fused: bool | None = None):
    """Launch the two kernels; arguments and outputs as ``torch.ops.pydiff.sample_categorical``.

    ``want_stats=False`` (the tokens + probability path): the partial kernel skips what only the
    statistics need (second maximum and its count, first argmax, the entropy sum), about a third of
    its per-logit instructions; the tokens and probabilities are bit-identical and the statistics
    come back NaN.  Temperature 0 (argmax) always computes them.

    ``fused`` (default: ``PYDIFF_SAMPLING_FUSED=1`` in the environment; opt-in: slower on an H200):
    one launch, the row's last partial program to finish runs the select (a per-row counter,
    zeroed per call), reading the chosen chunk back while it is likely still in L2; the same bits."""
    if fused is None:
        fused = os.environ.get("PYDIFF_SAMPLING_FUSED", "") == "1"
    want_stats = bool(want_stats) or temperature == 0
    R, V = logits.shape
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk = min(chunk, triton.next_power_of_2(V))
    nchunks = triton.cdiv(V, chunk)
    tokens = torch.empty(R, dtype=torch.int64, device=dev)
    prob = torch.empty(R, dtype=torch.float64, device=dev)
    stats = torch.empty((R, 3), dtype=torch.float64, device=dev)
    if R == 0:
        return tokens, prob, stats
    pm1 = torch.empty((R, nchunks), dtype=torch.float32, device=dev)
    pm2 = torch.empty_like(pm1)
    ps = torch.empty((R, nchunks), dtype=torch.float64, device=dev)
    pt = torch.empty_like(ps)
    pz = torch.empty_like(ps)
    parg = torch.empty((R, nchunks), dtype=torch.int64, device=dev)
    pbad = torch.empty((R, nchunks), dtype=torch.int32, device=dev)
    nseg = 4 if chunk >= 64 else 1  # segments of chunk / 4 logits (the select rescans one of them)
    pseg = torch.empty((R, nchunks, nseg), dtype=torch.float64, device=dev)
    pflush = torch.empty((R, nchunks), dtype=torch.int32, device=dev)
    # T above 2**100 samples as 2**100 (1 / T would underflow to 0 in fp32: -inf * 0 = NaN at a banned token)
    t_stat = min(float(temperature), MAX_TEMPERATURE) if temperature > 0 else 1.0
    # 1 / T as an fp32 kernel scalar: clamp to FLT_MAX (T below ~2.9e-38 would give inf, and
    # (l - max) * inf = NaN at the maximum itself), as the C++ and CUDA kernels do
    inv_t = min(1.0 / t_stat, 3.4028234663852886e38)
    row_stride = logits.stride(0) if R > 1 else V
    thr = threshold.contiguous() if threshold is not None else pm1
    msk = row_mask.contiguous() if row_mask is not None else pbad
    seeds, offsets = seeds.contiguous(), offsets.contiguous()
    ncp = max(2, triton.next_power_of_2(nchunks))
    cnt = torch.zeros(R, dtype=torch.int32, device=dev) if fused else pbad
    _partial_kernel[(nchunks * R,)](logits, thr, msk, pm1, pm2, ps, pt, pz, parg, pbad, pseg, pflush, V, row_stride,
                                  nchunks, inv_t, seeds, offsets, tokens, prob, stats, cnt, t_stat,
                                  HAS_T=threshold is not None, HAS_M=row_mask is not None,
                                  CHUNK=chunk, STATS=want_stats, UNIT_T=inv_t == 1.0, ARG=temperature == 0,
                                  FUSED=bool(fused), NCP=ncp, NSEG=nseg)
    if fused:
        return tokens, prob, stats
    _select_kernel[(R,)](logits, thr, msk, seeds, offsets, pm1, pm2, ps, pt, pz, parg, pbad, pseg, pflush, tokens,
                         prob, stats, V, row_stride, nchunks, t_stat, inv_t, ARGMAX=temperature == 0,
                         HAS_T=threshold is not None, HAS_M=row_mask is not None,
                         NCP=ncp, CHUNK=chunk, STATS=want_stats,
                         UNIT_T=inv_t == 1.0, NSEG=nseg)
    return tokens, prob, stats
