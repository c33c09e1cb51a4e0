"""Exact categorical sampling: every backend against the float64 reference, statistical exactness
(chi-square, and a tail test that fp32 Gumbel-max provably fails), truncations, edge cases."""
import math

import pytest
import torch

import pydiff
from pydiff.reference.sampling import sample_categorical_ref, uniform53
from pydiff.sampling import sample_categorical

from _util import CPU, DTYPES, poison_allocator

BACKENDS = pydiff.available_backends(CPU)
FAST = [b for b in BACKENDS if b != "triton"]  # the interpreter is slow: big statistical runs skip it


def _ref(logits, seeds, offsets, temperature=1.0, threshold=None, row_mask=None):
    return sample_categorical_ref(logits.reshape(-1, logits.shape[-1]), seeds, offsets, temperature, threshold,
                                  row_mask)


def _seeds(r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2 ** 62, 2 ** 62, (r,), generator=g), torch.randint(0, 2 ** 40, (r,), generator=g)


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 7), (2, 2049), (3, 4097), (2, 3, 1031), (1, 10007)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_matches_float64_reference(backend, dtype, shape, temperature):
    if backend == "triton" and shape[-1] > 5000 and dtype != torch.float32:
        pytest.skip("keep interpreter runs small")
    g = torch.Generator().manual_seed(shape[-1] * 7 + len(shape))
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    R = logits.numel() // shape[-1]
    seeds, offsets = _seeds(R, seed=shape[-1])
    ref_tok, ref_p, ref_st = _ref(logits, seeds, offsets, temperature)
    poison_allocator(R * 4, torch.float64)
    res = sample_categorical(logits, temperature=temperature, seeds=seeds.reshape(shape[:-1]),
                             offsets=offsets.reshape(shape[:-1]), return_probs=True, return_confidence=True,
                             backend=backend)
    assert res.tokens.shape == shape[:-1] and res.tokens.dtype == torch.int64
    assert torch.equal(res.tokens.reshape(-1), ref_tok), (res.tokens, ref_tok)
    # kernels form (l - m) / T in fp32 and evaluate exp to ~2e-7 relative; sums are float64
    rtol = 1e-10 if backend == "torch" else 1e-6
    for got, want in ((res.probs, ref_p), (res.top1, ref_st[:, 0]), (res.margin, ref_st[:, 1]),
                      (res.entropy, ref_st[:, 2])):
        assert got.dtype == torch.float64
        assert torch.allclose(got.reshape(-1), want, rtol=rtol, atol=1e-12), (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities_are_the_float64_softmax(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 300, generator=g) * 4
    res = sample_categorical(logits, temperature=0.8, seed=3, return_probs=True, return_confidence=True,
                             backend=backend)
    p = torch.softmax(logits.double() / 0.8, -1)
    assert torch.allclose(res.probs, p.gather(1, res.tokens[:, None])[:, 0], rtol=1e-6)
    top2 = p.topk(2, dim=1).values
    assert torch.allclose(res.top1, top2[:, 0], rtol=1e-6)
    assert torch.allclose(res.margin, top2[:, 0] - top2[:, 1], rtol=1e-5, atol=1e-12)
    ent = -(p * p.log()).sum(1)
    assert torch.allclose(res.entropy, ent, rtol=1e-6)


# ---------------------------------------------------------------- statistics
def _chi2_crit(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at ~z sigma."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, p: torch.Tensor, n: int) -> float:
    exp = p * n
    return float(((counts.double() - exp) ** 2 / exp).sum())


def _counts(tokens, V):
    return torch.bincount(tokens.reshape(-1), minlength=V)[:V]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_small_vocab(backend):
    V, n = 6, 60_000 if backend != "triton" else 300
    logits = torch.tensor([2.0, 0.0, -1.0, 1.5, -3.0, 0.5])
    T = 0.9
    p = torch.softmax(logits.double() / T, 0)
    tok = sample_categorical(logits.expand(n, V), temperature=T, seed=11, backend=backend)
    stat = _chi2(_counts(tok, V), p, n)
    assert stat < _chi2_crit(V - 1), stat
    if backend == "triton":
        return  # too few interpreter draws for the power check below
    # the same test rejects a sampler at the wrong temperature (so it can fail)
    wrong = sample_categorical(logits.expand(n, V), temperature=T * 0.8, seed=11, backend=backend)
    assert _chi2(_counts(wrong, V), p, n) > _chi2_crit(V - 1)


def _tail_test(tail_hits: int, rows: int, p_tail: float, z: float = 4.0) -> bool:
    """Poisson test: observed tail hits consistent with rows * p_tail (z sigma, both sides)."""
    lam = rows * p_tail
    return abs(tail_hits - lam) <= z * math.sqrt(lam) + 1


def _fp32_gumbel_tail_hits(rows: int, n_tail: int, gap: float, generator) -> int:
    """fp32 Gumbel-max on rows [0, -gap, ..., -gap] (1 + n_tail tokens), drawn exactly but cheaply:
    the tail's best noise is -log(-log(max of n_tail fp32 uniforms)), and torch.rand's fp32
    uniforms live on the grid k * 2^-24, so that max is floor(2^24 * U^(1/n_tail)) * 2^-24."""
    u_top = torch.rand(rows, generator=generator, dtype=torch.float32)
    umax = torch.floor(torch.rand(rows, generator=generator, dtype=torch.float64) ** (1.0 / n_tail) * 2 ** 24)
    umax = (umax.clamp(max=2 ** 24 - 1) * 2.0 ** -24).float()
    g_top = -torch.log(-torch.log(u_top))
    g_tail = -torch.log(-torch.log(umax))
    return int(((-gap + g_tail) > g_top).sum())


def test_fp32_gumbel_cap_is_provable():
    """With 24-bit uniforms the fp32 Gumbel noise lies in [-log(-log(2^-24)), -log(-log(1-2^-24))],
    so a token more than their difference (19.45 nats) below the best can never win."""
    lo = -math.log(-math.log(2.0 ** -24))
    hi = -math.log(-math.log(torch.tensor(1 - 2.0 ** -24, dtype=torch.float32).item()))
    assert 19.4 < hi - lo < 19.5


@pytest.mark.parametrize("backend", [b for b in FAST if b == "cpu"] or ["torch"])
def test_tail_beyond_the_fp32_gumbel_cap_is_drawn_at_the_right_rate(backend):
    """Tokens 19.6 nats below the best: fp32 Gumbel-max provably never draws them; the exact
    sampler draws them at rate N e^-19.6 / (1 + N e^-19.6)."""
    gap, V = 19.6, 1 << 20
    rows = 8_000 if backend == "cpu" else 64
    logits = torch.full((V,), -gap)
    logits[0] = 0.0
    n = V - 1
    p_tail = n * math.exp(-gap) / (1 + n * math.exp(-gap))
    hits = 0
    for part in range(4):
        tok = sample_categorical(logits.expand(rows // 4, V), seed=100 + part, backend=backend)
        hits += int((tok != 0).sum())
    if backend == "cpu":
        assert hits > 0 and _tail_test(hits, rows, p_tail), (hits, rows * p_tail)
    g = torch.Generator().manual_seed(0)
    assert _fp32_gumbel_tail_hits(100_000, n, gap, g) == 0


@pytest.mark.parametrize("backend", [b for b in FAST if b == "cpu"] or ["torch"])
def test_tail_test_rejects_fp32_gumbel_where_it_truncates(backend):
    """At 18 nats below the best, fp32 Gumbel-max draws the tail at ~2% of its probability: the
    same Poisson test accepts the exact sampler and rejects fp32 Gumbel-max."""
    gap, V = 18.0, 1 << 16
    n = V - 1
    p_tail = n * math.exp(-gap) / (1 + n * math.exp(-gap))
    rows = 24_000 if backend == "cpu" else 256
    logits = torch.full((V,), -gap)
    logits[0] = 0.0
    if backend == "cpu":
        tok = sample_categorical(logits.expand(rows, V), seed=7, backend=backend)
        hits = int((tok != 0).sum())
        assert _tail_test(hits, rows, p_tail), (hits, rows * p_tail)
    g = torch.Generator().manual_seed(1)
    gumbel_hits = _fp32_gumbel_tail_hits(rows, n, gap, g)
    assert not _tail_test(gumbel_hits, rows, p_tail), (gumbel_hits, rows * p_tail)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tail_token_beside_the_maximum_is_drawn_in_its_interval(backend, dtype):
    """A token 17 nats below the maximum (p = 4.1e-8) in the same partial sum as the maximum: the
    Triton and CUDA partial kernels sum their exponentials in fp32 by eights (Triton: 8 consecutive
    logits; CUDA below a full 16-byte-loaded chunk: a thread's logits 128 apart), where 1 + 4.1e-8
    rounds to 1, so their chunk sum misses it.  The rescan places the target at its share of the
    rescan's own float64 total, so a uniform in the token's interval (the top 4.1e-8 of [0, 1))
    still draws it, and other uniforms draw the maximum."""
    p = math.exp(-17.0)
    V = 1000
    logits = torch.full((2, V), float("-inf"))
    logits[:, 0] = 0.0
    logits[0, 7] = -17.0    # Triton's group of eight with the maximum
    logits[1, 256] = -17.0  # the CUDA kernel's (thread 0's logits 0, 128, 256, ...)
    logits = logits.to(dtype)
    seeds = torch.full((2,), 12345)
    offsets = torch.full((2,), 96735269)  # u = 1 - 5.9e-10: in the tail token's interval
    u = uniform53(seeds, offsets)
    assert bool((u * (1 + p) > 1).all())
    res = sample_categorical(logits, seeds=seeds, offsets=offsets, return_probs=True, backend=backend)
    assert res.tokens.tolist() == [7, 256]
    assert torch.allclose(res.probs, torch.full((2,), p / (1 + p), dtype=torch.float64), rtol=1e-6)
    other = sample_categorical(logits, seeds=seeds, offsets=torch.tensor([0, 1]), backend=backend)
    assert other.tolist() == [0, 0]


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("backend", BACKENDS)
def test_truncations_draw_only_kept_tokens_at_renormalised_rates(backend):
    V, n = 8, 20_000 if backend != "triton" else 150
    logits = torch.tensor([3.0, 2.5, 2.5, 1.0, 0.0, -1.0, -2.0, -5.0])
    p = torch.softmax(logits.double(), 0)
    cases = {
        "top_k=3": dict(top_k=3),                  # keeps 3.0, 2.5, 2.5
        "top_k=2 (ties kept)": dict(top_k=2),      # the 2nd value ties: 3 kept, as HF
        "min_p=0.2": dict(min_p=0.2),              # p >= 0.2 p_max
        "top_p=0.8": dict(top_p=0.8),
    }
    for name, kw in cases.items():
        if "top_k" in kw:
            keep = logits >= logits.topk(kw["top_k"]).values[-1]
        elif "min_p" in kw:
            keep = p >= kw["min_p"] * p.max()
        else:
            srt, idx = p.sort(descending=True)
            j = int((srt.cumsum(0) >= kw["top_p"]).nonzero()[0])
            keep = p >= srt[j]
        q = torch.where(keep, p, torch.zeros_like(p))
        q = q / q.sum()
        tok = sample_categorical(logits.expand(n, V), seed=5, backend=backend, **kw)
        c = _counts(tok, V)
        assert int(c[~keep].sum()) == 0, name
        k = int(keep.sum())
        if k > 1:
            assert _chi2(c[keep], q[keep], n) < _chi2_crit(k - 1), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_banned_tokens_never_drawn_and_invalid_rows(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64 if backend != "triton" else 12, 50, generator=g)
    logits[:, ::3] = float("-inf")
    tok = sample_categorical(logits, seed=1, temperature=2.0, backend=backend)
    assert (tok % 3 != 0).all()
    bad = logits.clone()
    bad[5] = float("-inf")
    with pytest.raises(ValueError, match=r"logits: row\(s\) \[5\]"):
        sample_categorical(bad, seed=1, backend=backend)
    nan = logits.clone()
    nan[7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample_categorical(nan, seed=1, backend=backend)
    flagged = sample_categorical(nan, seed=1, on_invalid="flag", backend=backend)
    assert flagged[7] == -2 and (flagged[:7] >= 0).all()
    pinf = logits.clone()
    pinf[9, 4] = float("inf")
    assert sample_categorical(pinf, seed=1, on_invalid="flag", backend=backend)[9] == -2


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_one_and_near_zero_temperature(backend):
    assert sample_categorical(torch.randn(4, 1), seed=0, backend=backend).tolist() == [0, 0, 0, 0]
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 100, generator=g)
    am = logits.argmax(-1)
    assert torch.equal(sample_categorical(logits, temperature=1e-6, seed=3, backend=backend), am)
    # 1 / T beyond fp32's range (T < 2.9e-38): still the argmax with probability 1, no NaN (the
    # kernels clamp the fp32 inverse temperature; found by the CUDA emulator test)
    for t in (1e-40, 1e-44):
        res = sample_categorical(logits, temperature=t, seed=3, return_probs=True, backend=backend)
        assert torch.equal(res.tokens, am) and torch.equal(res.probs, torch.ones_like(res.probs)), t
    res = sample_categorical(logits, temperature=0.0, return_confidence=True, backend=backend)
    assert torch.equal(res.tokens, am)
    # temperature 0: confidences are those of softmax(logits) (T = 1), as LLaDA reads them
    assert torch.allclose(res.top1, torch.softmax(logits.double(), -1).max(-1).values, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_temperatures_keep_banned_tokens_out_and_statistics_finite(backend):
    """1 / T below fp32's smallest normal (T > ~8.5e37) underflowed to 0 in the kernels: a banned (-inf)
    token then gave -inf * 0 = NaN (entropy NaN on the CPU); far below (T = 1e-310) the reference's
    entropy took 0 * -inf.  Now T is capped at 2**100, T = 1e50 is uniform over the kept tokens
    (entropy log V_kept) and T = 1e-310 is one-hot (entropy 0), banned tokens never drawn, on every
    backend."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[:, ::7] = float("-inf")  # 8 banned tokens a row (V not a multiple of 8)
    kept = 50 - 8
    seeds, offsets = _seeds(6, seed=4)
    for t, ent in ((1e50, math.log(kept)), (1e-310, 0.0)):
        res = sample_categorical(logits, temperature=t, seeds=seeds, offsets=offsets, return_probs=True,
                                 return_confidence=True, backend=backend)
        ref_tok, _, ref_st = _ref(logits, seeds, offsets, t)
        assert torch.equal(res.tokens, ref_tok), t
        assert torch.isfinite(logits.gather(1, res.tokens[:, None])).all(), t
        assert torch.allclose(res.entropy, torch.full_like(res.entropy, ent), atol=1e-6), (t, res.entropy)
        assert torch.allclose(ref_st[:, 2], torch.full_like(res.entropy, ent), atol=1e-6), (t, ref_st[:, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_argmax_first_of_tied_maxima_and_margin(backend, dtype):
    """Temperature 0 returns the first maximal index wherever the ties sit (same SIMD lane, other
    lanes, later lanes first, other chunks of the C++ kernel's 2048 and the GPU kernels' 4096), and
    the top-2 margin counts a tied maximum twice (margin 0)."""
    V = 3 * 4096 + 37
    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, V, generator=g)
    ties = [[8, 16], [10, 3], [15, 16], [5000, 100], [4100, 2050, 9000], [V - 1, V - 2], [0, V - 1], [4095, 4096]]
    for r, pos in enumerate(ties):
        x[r, pos] = 9.0
    x = x.to(dtype)
    want = x.float().argmax(-1)
    assert want.tolist() == [min(p) for p in ties]
    res = sample_categorical(x, temperature=0.0, return_confidence=True, backend=backend)
    assert torch.equal(res.tokens, want)
    assert torch.equal(res.margin, torch.zeros_like(res.margin))
    # a single maximum: margin = p1 - p2 of softmax(x) (T = 1 for the confidences at T = 0)
    y = x.clone()
    for r, pos in enumerate(ties):
        y[r, pos[1:]] = 8.0
    p = torch.softmax(y.double(), -1).topk(2, -1).values
    res = sample_categorical(y, temperature=0.0, return_confidence=True, backend=backend)
    assert torch.equal(res.tokens, y.float().argmax(-1))
    assert torch.allclose(res.margin, p[:, 0] - p[:, 1], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("backend", FAST)
def test_large_vocab(backend):
    g = torch.Generator().manual_seed(5)
    V = 262_147
    logits = torch.randn(3, V, generator=g).bfloat16()
    seeds, offsets = _seeds(3, seed=9)
    res = sample_categorical(logits, seeds=seeds, offsets=offsets, return_probs=True, backend=backend)
    ref = _ref(logits, seeds, offsets)
    assert torch.equal(res.tokens, ref[0])
    assert torch.allclose(res.probs, ref[1], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_fill_and_reproducibility(backend):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 6, 40, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.4
    fill = torch.full((4, 6), 99, dtype=torch.int64)
    a = sample_categorical(logits, mask=mask, fill=fill, seed=12, backend=backend)
    b = sample_categorical(logits, mask=mask, fill=fill, seed=12, backend=backend)
    assert torch.equal(a, b)
    assert (a[~mask] == 99).all() and (a[mask] < 40).all()
    assert (sample_categorical(logits, mask=mask, seed=12, backend=backend)[~mask] == -1).all()
    # generator: reproducible from its seed, and a new draw each call
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1 = sample_categorical(logits, generator=g1, backend=backend)
    x2 = sample_categorical(logits, generator=g2, backend=backend)
    assert torch.equal(x1, x2)
    x3 = sample_categorical(logits, generator=g1, backend=backend)
    assert not torch.equal(x1, x3)
    # seeds/offsets broadcast: a seed per sequence and an offset per position
    bs = sample_categorical(logits, seeds=torch.tensor([[1], [2], [3], [4]]), offsets=torch.arange(6), backend=backend)
    full_s = torch.tensor([[1], [2], [3], [4]]).expand(4, 6).contiguous()
    assert torch.equal(bs, sample_categorical(logits, seeds=full_s, offsets=torch.arange(6).expand(4, 6).contiguous(),
                                              backend=backend))
    # per-row seeds/offsets: a row's token depends only on its own (seed, offset)
    s, o = _seeds(24, seed=1)
    full = sample_categorical(logits.reshape(24, 40), seeds=s, offsets=o, backend=backend)
    part = sample_categorical(logits.reshape(24, 40)[5:9], seeds=s[5:9], offsets=o[5:9], backend=backend)
    assert torch.equal(full[5:9], part)


def test_uniform53_matches_the_c_definition():
    # splitmix64-based: values computed once with Python integers
    def mix(z):
        z = (z + 0x9E3779B97F4A7C15) & (2 ** 64 - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
        return z ^ (z >> 31)

    for s, o in [(0, 0), (1, 2), (-5, 7), (2 ** 62, 3)]:
        want = (mix((s & (2 ** 64 - 1)) ^ mix(o)) >> 11) * 2.0 ** -53
        got = uniform53(torch.tensor([s]), torch.tensor([o])).item()
        assert got == want


# ---------------------------------------------------------------- registration, errors
@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_opcheck_sample_categorical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=g)
    s, o = _seeds(5)
    thr = torch.full((5,), -1.0)
    msk = torch.tensor([True, True, True, True, True])  # rows switched off give NaN, which opcheck can't compare
    torch.library.opcheck(torch.ops.pydiff.sample_categorical.default, (logits, thr, msk, s, o, 0.9))
    torch.library.opcheck(torch.ops.pydiff.sample_categorical.default, (logits, None, None, s, o, 0.0))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=g)
    s, o = _seeds(5)

    def f(lg):
        tok, prob, st = torch.ops.pydiff.sample_categorical(lg * 2.0, None, None, s, o, 1.0)
        return tok, prob * st[:, 0]

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(logits)
    ref = f(logits)
    assert torch.equal(out[0], ref[0]) and torch.allclose(out[1], ref[1])


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(temperature=-1.0), ValueError, "temperature: expected a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k: expected an int >= 1"),
    (dict(top_p=1.5), ValueError, "top_p: expected a number in (0, 1]"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask: expected shape (4,)"),
    (dict(mask=torch.ones(4)), TypeError, "mask: expected dtype torch.bool"),
    (dict(seeds=torch.zeros(3, dtype=torch.int64), offsets=torch.zeros(4, dtype=torch.int64)), ValueError,
     "seeds: expected a shape that broadcasts to (4,)"),
    (dict(seeds=torch.zeros(4, dtype=torch.int64)), ValueError, "seeds, offsets: pass both"),
    (dict(on_invalid="ignore"), ValueError, "on_invalid"),
])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc) as ei:
        sample_categorical(torch.randn(4, 10), **kw)
    assert msg in str(ei.value)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits: expected dtype float32, float16 or bfloat16"):
        sample_categorical(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits: expected shape"):
        sample_categorical(torch.ones(3, 0))


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_raw_op_checks_its_arguments():
    x = torch.randn(3, 5)
    s, o = _seeds(3)
    with pytest.raises(ValueError, match="logits: expected a 2-D"):
        torch.ops.pydiff.sample_categorical(x[0], None, None, s, o, 1.0)
    with pytest.raises(ValueError, match="seeds: expected shape"):
        torch.ops.pydiff.sample_categorical(x, None, None, s[:2], o, 1.0)
    with pytest.raises(TypeError, match="threshold: expected dtype"):
        torch.ops.pydiff.sample_categorical(x, torch.zeros(3, dtype=torch.float64), None, s, o, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.pydiff.sample_categorical(x, None, None, s, o, -2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_logit_range_keeps_float64_range(backend):
    """Chunks spanning more than fp32's exponent range (here 300 nats) take the float64-range path;
    probabilities down to 1e-130 relative to the best stay exact."""
    g = torch.Generator().manual_seed(8)
    logits = torch.rand(6, 3000, generator=g) * -300.0
    logits[:, 7] = 0.0
    seeds, offsets = _seeds(6, seed=2)
    res = sample_categorical(logits, seeds=seeds, offsets=offsets, return_probs=True, return_confidence=True,
                             backend=backend)
    ref = _ref(logits, seeds, offsets)
    assert torch.equal(res.tokens, ref[0])
    assert torch.allclose(res.entropy, ref[2][:, 2], rtol=1e-6, atol=1e-12)
    # a token 299 nats below the best keeps its float64 probability
    one = torch.tensor([[0.0, -299.0]])
    r1 = sample_categorical(one, temperature=1.0, seed=1, return_confidence=True, backend=backend)
    assert math.isclose(r1.margin.item(), (1 - math.exp(-299)) / (1 + math.exp(-299)), rel_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_with_every_exponential_flushed_in_fp32(backend):
    """The GPU kernels keep each chunk's sums by segment of 1024 logits and rescan only the segment
    holding the target. A segment whose kept tokens all sit more than ~87 nats below their chunk's
    maximum has an fp32 sum of 0 (flushed) and is flagged, and the select then chooses the segment
    from float64 totals: tokens equal the float64 reference's on rows with such a segment
    (indices 1024-2047, 100-150 nats down) beside ordinary ones, and the flagged rows' ordinary
    segments are still drawn from."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(16, 8192, generator=g) * 2.0
    logits[:, 1024:2048] = -100.0 - 50.0 * torch.rand(16, 1024, generator=g)
    logits[::2, 5000:5100] += 3.0  # (the second chunk heavier on some rows)
    seeds, offsets = _seeds(16, seed=5)
    res = sample_categorical(logits, seeds=seeds, offsets=offsets, return_probs=True, backend=backend)
    ref = _ref(logits, seeds, offsets)
    assert torch.equal(res.tokens, ref[0])
    assert torch.allclose(res.probs, ref[1], rtol=1e-6)
    assert ((res.tokens < 1024) | (res.tokens >= 2048)).all()
    assert (res.tokens >= 2048).any() and (res.tokens < 1024).any()


_TDEV = torch.device("cuda") if torch.cuda.is_available() else CPU


@pytest.mark.skipif("triton" not in pydiff.available_backends(_TDEV),
                    reason="needs the Triton backend (a GPU or TRITON_INTERPRET=1)")
def test_triton_tokens_and_probs_without_statistics_are_bit_identical():
    """The Triton kernels' tokens + probability path (``want_stats=False``: no second maximum,
    argmax or entropy sum per logit) gives the same tokens and probabilities bit for bit as the full
    path, across dtypes, thresholds, masks, invalid rows, chunk boundaries and temperatures; its
    statistics come back NaN, and temperature 0 computes them regardless."""
    from pydiff.triton_kernels.sampling import sample_categorical_triton

    dev = _TDEV
    g = torch.Generator().manual_seed(11)
    cases = ((5, 1, torch.float32), (7, 4099, torch.bfloat16), (3, 9000, torch.float16), (9, 97, torch.float32))
    for R, V, dtype in cases:
        x = (torch.randn(R, V, generator=g) * 4).to(dtype)
        if V > 2:
            x[0, 1] = float("-inf")
            x[-1, 2] = float("nan")  # an invalid row: token -2 on both paths
        x = x.to(dev)
        seeds = torch.arange(R, device=dev) * 7 + 3
        offs = torch.arange(R, device=dev)
        tau = (x.float().amax(1) - 3.0).contiguous()
        mask = torch.arange(R, device=dev) % 3 != 1
        for T in (1.0, 0.7, 1e-3):
            for thr, rm in ((None, None), (tau, None), (None, mask), (tau, mask)):
                full = sample_categorical_triton(x, thr, rm, seeds, offs, T)
                lean = sample_categorical_triton(x, thr, rm, seeds, offs, T, want_stats=False)
                assert torch.equal(full[0], lean[0]), (R, V, dtype, T)
                assert torch.equal(full[1].nan_to_num(-1.0), lean[1].nan_to_num(-1.0)), (R, V, dtype, T)
                assert lean[2].isnan().all()
        full = sample_categorical_triton(x, None, None, seeds, offs, 0.0)
        lean = sample_categorical_triton(x, None, None, seeds, offs, 0.0, want_stats=False)
        assert torch.equal(full[0], lean[0]) and torch.equal(full[2].nan_to_num(-1.0), lean[2].nan_to_num(-1.0))
    # the public entry takes the lean path unless confidences are asked for, with the same tokens
    y = torch.randn(4, 300, generator=g).to(dev)
    a = sample_categorical(y, seed=5, return_probs=True, backend="triton")
    b = sample_categorical(y, seed=5, return_probs=True, return_confidence=True, backend="triton")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs) and not b.top1.isnan().any()


@pytest.mark.skipif("triton" not in pydiff.available_backends(_TDEV),
                    reason="needs the Triton backend (a GPU or TRITON_INTERPRET=1)")
def test_triton_fused_select_is_bit_identical(monkeypatch):
    """``fused=True`` (or PYDIFF_SAMPLING_FUSED=1): one launch, the row's last partial program picks
    the token; the same bits as the two-kernel path for tokens, probabilities and statistics, with
    thresholds, row masks, invalid rows, several chunks, temperature 0 and the tokens-only path.
    (The interpreter runs programs in order, so the last to finish is always the row's last chunk;
    the GPU test of the same name runs them concurrently.)"""
    from pydiff.triton_kernels.sampling import sample_categorical_triton

    dev = _TDEV
    g = torch.Generator().manual_seed(12)
    for R, V, dtype in ((3, 1, torch.float32), (3, 4099, torch.bfloat16), (6, 97, torch.float16)):
        x = (torch.randn(R, V, generator=g) * 4).to(dtype)
        if V > 2:
            x[-1, 2] = float("nan")
            x[1] = float("-inf")
        x = x.to(dev)
        seeds = torch.arange(R, device=dev) * 5 + 1
        offs = torch.arange(R, device=dev)
        tau = (x.float().amax(1) - 3.0).contiguous()
        mask = torch.arange(R, device=dev) % 3 != 2
        combos = [(T, thr, rm, stats) for T in (1.0, 0.0) for thr, rm in ((None, None), (tau, mask))
                  for stats in (True, False)]
        if V > 4096:  # (two chunks; the interpreter is slow at this width: the combinations that matter)
            combos = [(1.0, tau, mask, True), (1.0, None, None, False), (0.0, None, None, True)]
        for T, thr, rm, stats in combos:
            two = sample_categorical_triton(x, thr, rm, seeds, offs, T, want_stats=stats, fused=False)
            one = sample_categorical_triton(x, thr, rm, seeds, offs, T, want_stats=stats, fused=True)
            for a, b in zip(two, one):
                assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)), (R, V, dtype, T, stats)
    monkeypatch.setenv("PYDIFF_SAMPLING_FUSED", "1")
    env = sample_categorical_triton(x, None, None, seeds, offs, 1.0)
    assert torch.equal(env[0], sample_categorical_triton(x, None, None, seeds, offs, 1.0, fused=False)[0])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_op_without_statistics_same_tokens_and_probs(dtype):
    """The C++ kernel with ``want_stats=False``: no second maximum or entropy sum, the same tokens
    and probabilities bit for bit (chunk edges, thresholds, masks, invalid rows), NaN statistics;
    temperature 0 computes them regardless."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(11, 9000, generator=g) * 4).to(dtype)
    x[2, 7] = float("nan")
    x[5] = float("-inf")
    x[6, :100] = 40.0  # ties at the maximum
    s, o = torch.arange(11) * 5 + 1, torch.arange(11)
    tau = (x.float().amax(1) - 3.0).contiguous()
    mask = torch.arange(11) % 4 != 3
    for T in (1.0, 0.5, 0.0):
        for thr, rm in ((None, None), (tau, mask)):
            full = torch.ops.pydiff.sample_categorical(x, thr, rm, s, o, T, True)
            lean = torch.ops.pydiff.sample_categorical(x, thr, rm, s, o, T, False)
            assert torch.equal(full[0], lean[0]), T
            assert torch.equal(full[1].nan_to_num(-1.0), lean[1].nan_to_num(-1.0)), T
            if T > 0:
                assert lean[2].isnan().all()
            else:
                assert torch.equal(full[2].nan_to_num(-1.0), lean[2].nan_to_num(-1.0))


# ---------------------------------------------------------------- top-p threshold without a full sort
def _topp_threshold_by_sort(lg, tau, temperature, top_p):
    """The definition: sort each row, cumulative softmax mass, value at the first index >= top_p."""
    blk = lg.double()
    if tau is not None:
        blk = torch.where(blk >= tau.double().unsqueeze(1), blk, torch.full_like(blk, float("-inf")))
    srt = torch.sort(blk, dim=1, descending=True).values
    c = torch.cumsum(torch.softmax(srt / (temperature if temperature > 0 else 1.0), dim=1), dim=1)
    j = torch.searchsorted(c, torch.full((c.shape[0], 1), top_p, dtype=c.dtype)).clamp(max=lg.shape[1] - 1)
    return srt.gather(1, j).squeeze(1).float()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU kernels")
def test_top_p_traces_fullgraph():
    """sample_categorical(top_p=..., on_invalid="flag") under torch.compile(fullgraph=True): the
    threshold's k escalation (a host-side check) is off while tracing, with the same tokens."""
    x = torch.randn(8, 300, generator=torch.Generator().manual_seed(4))
    f = torch.compile(lambda lg: sample_categorical(lg, seed=1, top_p=0.9, on_invalid="flag", backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), sample_categorical(x, seed=1, top_p=0.9, on_invalid="flag", backend="cpu"))


@pytest.mark.parametrize("V", [1, 7, 100, 5003])
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "banned", "top_k"])
def test_topp_threshold_matches_the_full_sort(V, kind):
    from pydiff.ops.sampling import _topp_threshold
    g = torch.Generator().manual_seed(V + len(kind))
    R = 37
    scale = {"peaked": 6.0, "flat": 0.05}.get(kind, 2.0)
    lg = torch.randn(R, V, generator=g) * scale
    if kind == "ties":
        lg = torch.round(lg)
    if kind == "banned":
        lg[:, ::3] = float("-inf")
        lg[:, -1] = 0.5  # every row keeps a token
    tau = None
    if kind == "top_k" and V > 1:
        tau = torch.topk(lg, min(V, 9), dim=1).values[:, -1].contiguous()
    for top_p in (0.05, 0.5, 0.9, 0.999):
        for T in (1.0, 0.7):
            # k0 = 2 forces the k escalation (2, 16, 128, ...) on most rows
            for k0 in (2, 64):
                got = _topp_threshold(lg, tau, T, top_p, rows_per_block=16, k0=k0)
                want = _topp_threshold_by_sort(lg, tau, T, top_p)
                assert torch.equal(got, want), (kind, V, top_p, T, k0, (got != want).nonzero()[:4].tolist())
