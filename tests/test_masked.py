"""Masked-diffusion samplers (pydiff.masked) against the analytic model of pydiff.testing.discrete.

Exactness: sampling one token per step from the exact conditionals of the template mixture (FHS,
LLaDA with random remasking and steps == gen_length, MaskGIT with random confidences and one token
per step) must reproduce the model's distribution of a statistic with a closed-form law (which
templates appear among the generated positions, and how many positions match none).  Each run
draws N = 3000 sequences with fixed seeds; the checks are a chi-square goodness-of-fit p-value
>= 1e-4 and a total-variation distance below the bound that exact samples exceed with probability
<= 1e-4 (tv_noise_bound).  The same checks reject a sampler at temperature 0.5 and parallel
decoding (2 and 8 tokens per step), so they are known to be able to fail.

Mechanics: low-confidence remasking keeps exactly the k most confident positions per row (against a
Python loop, and end to end against a plain reimplementation of LLaDA's loop at temperature 0);
per-row seeds reproduce rows whatever the batch; no host sync per step; HF-style outputs; bad
arguments raise.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pydiff
from pydiff.masked import generate_llada, generate_maskgit, num_transfer_tokens, sample_fhs, select_top_k
from pydiff.testing.discrete import (TemplateMixture, chi2_gof, llada_reference_generate, tv_distance,
                                     tv_noise_bound)

BACKENDS = pydiff.available_backends(torch.device("cpu"))
N = 3000
P_MIN = 1e-4


@pytest.fixture(scope="module")
def mix():
    # 3 templates, length 8, V = 50, 25% noise: the component is uncertain after one token and the
    # "other" count is spread, so both the mixing and the noise rate are tested
    return TemplateMixture(vocab_size=50, length=8, num_templates=3, eps=0.25, weights=[0.5, 0.3, 0.2], seed=1)


def _uninformative_prompt(m: TemplateMixture, P: int, B: int) -> torch.Tensor:
    """A prompt whose tokens match no template (so the posterior stays the prior)."""
    toks = []
    for i in range(P):
        used = set(m.templates[:, i].tolist())
        toks.append(next(v for v in range(m.V) if v not in used))
    return torch.tensor(toks, dtype=torch.int64).expand(B, P).clone()


def _check_exact(m, out, positions, context=None):
    probs = m.template_stats_probs(positions, context)
    cells = m.template_stats(out, positions)
    stat, dof, p = chi2_gof(cells, probs)
    tv, bound = tv_distance(cells, probs), tv_noise_bound(probs, cells.numel())
    return p, tv, bound, f"chi2={stat:.1f} dof={dof} p={p:.2e}, TV={tv:.4f} (exact-sampler bound {bound:.4f})"


def _assert_exact(m, out, positions, context=None):
    p, tv, bound, msg = _check_exact(m, out, positions, context)
    print(msg)
    assert p >= P_MIN and tv <= bound, msg


def _assert_detected(m, out, positions, context=None):
    p, tv, bound, msg = _check_exact(m, out, positions, context)
    print(msg)
    assert p < 1e-6 and tv > bound, msg
    return tv


class TinyLM(torch.nn.Module):
    """A fixed random masked LM with continuous logits (no ties) that mixes the whole sequence."""

    def __init__(self, V=40, L=16, D=16, seed=0, mask_bias=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V + 1, D, generator=g)
        self.pos = torch.randn(L, D, generator=g)
        self.W = torch.randn(D, V, generator=g) * 2.0
        self.mask_bias = mask_bias   # (token, bias) added to the logits
        self.calls = []

    def forward(self, x):
        self.calls.append(x.clone())
        h = self.emb[x] + self.pos[: x.shape[1]]
        lg = torch.tanh(h + h.mean(1, keepdim=True)) @ self.W
        if self.mask_bias is not None:
            lg = lg.clone()
            lg[..., self.mask_bias[0]] += self.mask_bias[1]
        return lg


@dataclasses.dataclass
class MaskedLMOutput:   # what HF masked-LM models return (transformers.modeling_outputs.MaskedLMOutput)
    loss: object = None
    logits: torch.Tensor = None


class HFStyle(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return MaskedLMOutput(logits=self.inner(input_ids))


# ------------------------------------------------------------------------ exactness
def test_fhs_reproduces_the_model(mix):
    out, times = sample_fhs(mix, mix.masked(N), mask_id=mix.mask_id, seeds=11, return_times=True)
    assert (out != mix.mask_id).all() and (out < mix.V).all()
    _assert_exact(mix, out, range(mix.L))
    # linear schedule: t_{n-1} = t_n u^(1/n), so the first hit (n = L masked) has mean L / (L + 1)
    mean, se = times[:, 0].mean().item(), times[:, 0].std().item() / N ** 0.5
    assert abs(mean - mix.L / (mix.L + 1)) < 5 * se
    assert (times[:, 1:] < times[:, :-1]).all()


def test_fhs_with_context_and_cosine_times(mix):
    ctx = mix.masked(1)[0]
    ctx[0] = mix.templates[2, 0]   # observed: template 2's token at position 0 (posterior ~ template 2)
    ctx[5] = 7
    x = ctx.expand(N, mix.L).clone()
    out, times = sample_fhs(mix, x, mask_id=mix.mask_id, seeds=12, schedule="cosine", return_times=True)
    assert (out[:, 0] == ctx[0]).all() and (out[:, 5] == 7).all()
    gen = [i for i in range(mix.L) if i not in (0, 5)]
    _assert_exact(mix, out, gen, ctx)
    # hitting times decrease from 1 towards 0, one per masked token
    assert times.shape == (N, len(gen))
    assert (times[:, 1:] <= times[:, :-1]).all() and (times > 0).all() and (times <= 1).all()


def test_fhs_wrong_temperature_is_detected(mix):
    out = sample_fhs(mix, mix.masked(N), mask_id=mix.mask_id, seeds=11, temperature=0.5)
    _assert_detected(mix, out, range(mix.L))


def test_llada_one_token_per_step_reproduces_the_model(mix):
    P = 2
    prompt = _uninformative_prompt(mix, P, N)
    out = generate_llada(mix, prompt, mask_id=mix.mask_id, gen_length=mix.L - P, block_length=2, steps=mix.L - P,
                         temperature=1.0, remasking="random", seeds=21)
    assert torch.equal(out[:, :P], prompt)
    ctx = mix.masked(1)[0]
    ctx[:P] = prompt[0]
    _assert_exact(mix, out, range(P, mix.L), ctx)


def test_maskgit_one_token_per_step_reproduces_the_model():
    # MaskGIT samples every masked position at each step: a shorter model keeps the test fast
    m = TemplateMixture(vocab_size=50, length=4, num_templates=3, eps=0.25, weights=[0.5, 0.3, 0.2], seed=2)
    out = generate_maskgit(m, m.masked(N), mask_id=m.mask_id, steps=m.L, schedule="linear",
                           confidence="random", seeds=31)
    _assert_exact(m, out, range(m.L))


def test_parallel_decoding_has_larger_error(mix):
    # p tokens per step: blocks of p positions, each decoded in one step (so every run samples the
    # same number of rows); p = 1 is exact, p > 1 draws each block's positions independently
    prompt = torch.zeros((N, 0), dtype=torch.int64)
    tvs = {}
    for per_step in (1, 2, 8):
        out = generate_llada(mix, prompt, mask_id=mix.mask_id, gen_length=mix.L, block_length=per_step,
                             steps=mix.L // per_step, temperature=1.0, remasking="random", seeds=41)
        if per_step == 1:
            _assert_exact(mix, out, range(mix.L))
            tvs[1] = tv_distance(mix.template_stats(out, range(mix.L)), mix.template_stats_probs(range(mix.L)))
        else:
            tvs[per_step] = _assert_detected(mix, out, range(mix.L))
    assert tvs[1] < tvs[2] < tvs[8], tvs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # Triton's CPU interpreter on -inf lanes
def test_every_backend_draws_the_same_tokens(backend):
    # every backend computes the same function from the same counter-based uniforms, so the
    # samplers give the same tokens as on the torch reference (small: Triton runs interpreted here)
    V = 40
    model = TinyLM(V=V, L=6)
    x = torch.randint(0, V, (8, 6), generator=torch.Generator().manual_seed(2))
    x[:, 2:] = V
    prompt = x[:, :2].clone()
    for b in (backend, "torch"):
        outs = (sample_fhs(model, x, mask_id=V, seeds=4, backend=b),
                generate_llada(model, prompt, mask_id=V, gen_length=4, block_length=2, steps=2, temperature=1.0,
                               seeds=4, backend=b),
                generate_maskgit(model, x, mask_id=V, steps=2, confidence="margin", seeds=4, backend=b))
        if b == backend:
            first = outs
    for a, r in zip(first, outs):
        assert torch.equal(a, r)


# ------------------------------------------------------------------------ selection mechanics
def test_select_top_k_matches_python_loop():
    g = torch.Generator().manual_seed(0)
    B, Lb = 16, 12
    conf = torch.rand(B, Lb, generator=g, dtype=torch.float64)
    conf[torch.rand(B, Lb, generator=g) < 0.3] = float("-inf")
    k = torch.randint(0, Lb + 3, (B,), generator=g)
    k[0], k[1] = 0, Lb + 5
    sel = select_top_k(conf, k)
    for r in range(B):
        finite = int(torch.isfinite(conf[r]).sum())
        kk = min(int(k[r]), finite)
        ref = torch.zeros(Lb, dtype=torch.bool)
        ref[torch.topk(conf[r], kk).indices] = True
        assert torch.equal(sel[r], ref), r
        assert int(sel[r].sum()) == kk


def test_num_transfer_tokens_is_llada_split():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :7] = True
    out = num_transfer_tokens(mask, 4)
    assert out.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("blocks", [(12, 12, 6), (12, 4, 6), (12, 3, 12)])
def test_llada_low_confidence_matches_reference_loop(cfg_scale, blocks):
    gen, bl, steps = blocks
    V = 40
    model = TinyLM(V=V, L=16)
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(5))
    ours = generate_llada(model, prompt, mask_id=V, gen_length=gen, block_length=bl, steps=steps,
                          temperature=0.0, cfg_scale=cfg_scale, remasking="low_confidence")
    ref = llada_reference_generate(model, prompt, mask_id=V, gen_length=gen, block_length=bl, steps=steps,
                                   temperature=0.0, cfg_scale=cfg_scale, remasking="low_confidence")
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_llada_unmasks_k_most_confident_each_step(temperature):
    V, B, P, gen, bl, steps = 40, 4, 3, 12, 6, 6   # two blocks of 6 over 3 steps each: k = 2, 2, 2
    model = TinyLM(V=V, L=P + gen)
    prompt = torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(6))
    out = generate_llada(model, prompt, mask_id=V, gen_length=gen, block_length=bl, steps=steps,
                         temperature=temperature, remasking="low_confidence", seeds=3)
    xs = model.calls + [out]
    for i in range(steps):
        before, after = xs[i], xs[i + 1]
        s, e = P + (i // 3) * bl, P + (i // 3 + 1) * bl
        new = (before == V) & (after != V)
        assert new.sum(1).tolist() == [2] * B and not new[:, :s].any() and not new[:, e:].any()
        if temperature == 0.0:   # the draws are the argmax: check the choice against a Python loop
            p = torch.softmax(model(before)[:, s:e].double(), -1)
            conf, tok = p.max(-1)
            conf = torch.where(before[:, s:e] == V, conf, torch.full_like(conf, float("-inf")))
            for r in range(B):
                ref = torch.zeros(bl, dtype=torch.bool)
                ref[torch.topk(conf[r], 2).indices] = True
                assert torch.equal(new[r, s:e], ref)
                assert torch.equal(after[r, s:e][ref], tok[r][ref])
    assert (out != V).all()


def test_maskgit_follows_schedule_with_per_row_counts():
    V, L, steps = 30, 20, 4
    model = TinyLM(V=V, L=L)
    x = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(7))
    x[0, :] = V           # 20 masked
    x[1, :10] = V         # 10 masked
    x[2, 5:8] = V         # 3 masked
    out = generate_maskgit(model, x, mask_id=V, steps=steps, schedule="cosine", confidence="margin", seeds=1)
    xs = model.calls + [out]
    import math
    n0 = (x == V).sum(1)
    for s in range(steps):
        n_after = (xs[s + 1] == V).sum(1)
        n_before = (xs[s] == V).sum(1)
        for r in range(3):
            want = 0 if s == steps - 1 else max(0, min(n_before[r].item() - 1,
                                                     max(1, math.floor(n0[r].item() * math.cos(math.pi / 2 * (s + 1) / steps)))))
            assert n_after[r].item() == want, (s, r)
    assert torch.equal(out[x != V], x[x != V]) and (out != V).all()


# ------------------------------------------------------------------------ reproducibility, syncs, HF
def test_per_row_seeds_reproduce_rows_whatever_the_batch(mix):
    prompt = _uninformative_prompt(mix, 2, 6)
    kw = dict(mask_id=mix.mask_id, gen_length=6, block_length=3, steps=4, temperature=1.0)
    seeds = torch.arange(100, 106, dtype=torch.int64)
    a = generate_llada(mix, prompt, seeds=seeds, remasking="random", **kw)
    b = generate_llada(mix, prompt, seeds=seeds, remasking="random", **kw)
    c = generate_llada(mix, prompt[[4, 1]], seeds=seeds[[4, 1]], remasking="random", **kw)
    assert torch.equal(a, b) and torch.equal(c, a[[4, 1]])
    d = generate_llada(mix, prompt, seeds=seeds + 1000, remasking="random", **kw)
    assert not torch.equal(a, d)
    g1 = generate_llada(mix, prompt, generator=torch.Generator().manual_seed(9), **kw)
    g2 = generate_llada(mix, prompt, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(g1, g2)
    f1 = sample_fhs(mix, mix.masked(6), mask_id=mix.mask_id, seeds=seeds)
    f2 = sample_fhs(mix, mix.masked(2), mask_id=mix.mask_id, seeds=seeds[[4, 1]])
    assert torch.equal(f1[[4, 1]], f2)
    m1 = generate_maskgit(mix, mix.masked(6), mask_id=mix.mask_id, steps=3, seeds=seeds, choice_temperature=2.0)
    m2 = generate_maskgit(mix, mix.masked(2), mask_id=mix.mask_id, steps=3, seeds=seeds[[4, 1]], choice_temperature=2.0)
    assert torch.equal(m1[[4, 1]], m2)


class _SyncCounter(TorchDispatchMode):
    """Counts ops that read a device value back to the host (.item(), bool(), nonzero, masked_select)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func is torch.ops.aten._local_scalar_dense.default or "nonzero" in name or "masked_select" in name:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["low_conf_T0", "low_conf_T07_cfg", "random_T1", "entropy"])
def test_no_host_sync_per_step(mix, case):
    prompt = _uninformative_prompt(mix, 2, 4)
    kw = dict(mask_id=mix.mask_id, gen_length=6, block_length=3, steps=6, seeds=1)
    kw.update({"low_conf_T0": dict(temperature=0.0), "low_conf_T07_cfg": dict(temperature=0.7, cfg_scale=1.0),
               "random_T1": dict(temperature=1.0, remasking="random"),
               "entropy": dict(temperature=1.0, remasking="entropy")}[case])
    with _SyncCounter() as sc:
        generate_llada(mix, prompt, on_invalid="flag", **kw)
    assert sc.ops == []
    with _SyncCounter() as sc:
        generate_llada(mix, prompt, **kw)
    assert len(sc.ops) == 1   # on_invalid="raise": one check after the loop
    with _SyncCounter() as sc:
        generate_maskgit(mix, mix.masked(4), mask_id=mix.mask_id, steps=4, seeds=1, on_invalid="flag",
                         confidence="margin", choice_temperature=1.0)
    assert sc.ops == []
    with _SyncCounter() as sc:
        sample_fhs(mix, mix.masked(4), mask_id=mix.mask_id, seeds=1, on_invalid="flag")
    assert len(sc.ops) == 1   # the step count, read once before the loop


def test_hf_style_model_output():
    V = 40
    inner = TinyLM(V=V, L=12)
    hf = HFStyle(inner)
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(8))
    kw = dict(mask_id=V, gen_length=8, block_length=4, steps=4, temperature=1.0, seeds=5)
    assert torch.equal(generate_llada(hf, prompt, cfg_scale=0.5, **kw), generate_llada(inner, prompt, cfg_scale=0.5, **kw))
    x = torch.full((2, 12), V, dtype=torch.int64)
    assert torch.equal(sample_fhs(hf, x, mask_id=V, seeds=5), sample_fhs(inner, x, mask_id=V, seeds=5))
    assert torch.equal(generate_maskgit(hf, x, mask_id=V, steps=3, seeds=5, confidence="entropy"),
                       generate_maskgit(inner, x, mask_id=V, steps=3, seeds=5, confidence="entropy"))
    # tuple and dict outputs too
    assert torch.equal(sample_fhs(lambda t: (inner(t),), x, mask_id=V, seeds=5),
                       sample_fhs(lambda t: {"logits": inner(t)}, x, mask_id=V, seeds=5))


def test_mask_token_inside_vocabulary_is_never_drawn():
    V = 40
    mask_id = 7
    model = TinyLM(V=V, L=12, mask_bias=(mask_id, 8.0))   # the mask token would win most draws
    prompt = torch.randint(8, V, (4, 4), generator=torch.Generator().manual_seed(9))
    out = generate_llada(model, prompt, mask_id=mask_id, gen_length=8, block_length=8, steps=8, temperature=1.0, seeds=1)
    assert (out != mask_id).all()
    x = torch.full((4, 12), mask_id, dtype=torch.int64)
    assert (sample_fhs(model, x, mask_id=mask_id, seeds=1) != mask_id).all()
    assert (generate_maskgit(model, x, mask_id=mask_id, steps=3, seeds=1) != mask_id).all()


# ------------------------------------------------------------------------ bad arguments
def test_bad_arguments_raise(mix):
    pr = torch.zeros((2, 0), dtype=torch.int64)
    mid = mix.mask_id
    cases = [
        (dict(gen_length=8, block_length=3), ValueError, "multiple of block_length"),
        (dict(gen_length=8, block_length=4, steps=3), ValueError, "multiple of the number of blocks"),
        (dict(remasking="lowest"), ValueError, "remasking"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(cfg_scale=float("nan")), ValueError, "cfg_scale"),
        (dict(steps=0), ValueError, "steps"),
        (dict(seeds=torch.zeros(3, dtype=torch.int64)), ValueError, "seeds"),
        (dict(seeds=1, generator=torch.Generator()), ValueError, "not both"),
        (dict(tempreature=1.0), TypeError, "unexpected keyword"),
        (dict(on_invalid="ignore"), ValueError, "on_invalid"),
    ]
    for extra, exc, msg in cases:
        kw = dict(mask_id=mid, gen_length=8, block_length=8, steps=8)
        kw.update(extra)
        with pytest.raises(exc, match=msg):
            generate_llada(mix, pr, **kw)
    with pytest.raises(TypeError, match="int64"):
        generate_llada(mix, pr.int(), mask_id=mid, gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match="mask_id"):
        generate_llada(mix, pr, mask_id=-1, gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match="model: expected logits of shape"):
        generate_llada(lambda x: torch.zeros(x.shape[0], 3, 5), pr, mask_id=mid, gen_length=8, block_length=8, steps=8)
    with pytest.raises(TypeError, match="model: expected logits"):
        sample_fhs(lambda x: "nope", mix.masked(2), mask_id=mid)
    with pytest.raises(ValueError, match="schedule"):
        sample_fhs(mix, mix.masked(2), mask_id=mid, schedule="quadratic")
    with pytest.raises(ValueError, match="schedule"):
        generate_maskgit(mix, mix.masked(2), mask_id=mid, steps=4, schedule="exp")
    with pytest.raises(ValueError, match="confidence"):
        generate_maskgit(mix, mix.masked(2), mask_id=mid, steps=4, confidence="logit")
    with pytest.raises(ValueError, match="steps"):
        generate_maskgit(mix, mix.masked(2), mask_id=mid, steps=0)
    with pytest.raises(ValueError, match="all -inf or contained NaN"):
        sample_fhs(lambda x: torch.full((*x.shape, 5), float("nan")), mix.masked(2), mask_id=mid, seeds=0)
    with pytest.raises(ValueError, match="mask_id"):
        TemplateMixture(50, 8, 3, mask_id=3)


def test_analytic_model_is_exact(mix):
    # conditionals are normalised, logits at observed positions pin the token, and log_prob of
    # exact samples averages to minus the entropy estimate consistently with the chain rule
    x = mix.sample(4, torch.Generator().manual_seed(0))
    part = x.clone()
    part[:, 3:] = mix.mask_id
    lg = mix(part).double()
    assert torch.allclose(lg.exp().sum(-1), torch.ones(4, mix.L, dtype=torch.float64), atol=1e-6)
    assert (lg[:, :3].argmax(-1) == x[:, :3]).all()
    # chain rule: log p(x) = log p(x_0..2) + sum_i log p(x_i | x_<i)
    lp = mix.log_prob(part)
    for i in range(3, mix.L):
        cond = mix.conditional_log_probs(part)[torch.arange(4), i, x[:, i]]
        lp = lp + cond
        part[:, i] = x[:, i]
    assert torch.allclose(lp, mix.log_prob(x), atol=1e-10)
