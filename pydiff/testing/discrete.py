"""Ground truth for masked (discrete) diffusion samplers, without weights.

:class:`TemplateMixture` is a discrete model over sequences of length ``L`` and a vocabulary of
``V`` tokens whose conditionals are exact and closed-form, so a sampler's output can be compared
with the true distribution:

* pick a template ``k ~ Categorical(w)`` out of ``K`` fixed token sequences ``t_k`` (``K`` distinct
  tokens at every position);
* each position independently equals ``t_k[i]`` with probability ``1 - eps``, otherwise it is
  uniform over all ``V`` tokens, so ``q_k(v) = (1 - eps) [v = t_k[i]] + eps / V``.

Given a partially masked ``x``, the posterior over the template is
``post_k ∝ w_k prod_{i observed} q_k(x_i)`` and the exact conditional of a masked position is
``p(x_i = v | observed) = eps / V + (1 - eps) sum_k post_k [t_k[i] = v]``.  ``model(x)`` returns
its log, ``[B, L, V]``, so the model is a drop-in masked-diffusion denoiser.  Positions are
independent given the template, so one-token-at-a-time sampling from these conditionals (any
order chosen independently of the drawn values) reproduces the joint exactly, while decoding
several positions from the same conditionals at once draws them independently and mixes templates.

For tests, :meth:`TemplateMixture.template_stats` reduces a sample to a small statistic (which
templates appear among some positions, and how many of them match none) whose exact distribution
:meth:`TemplateMixture.template_stats_probs` gives in closed form (Möbius inversion over subsets of
templates), and :func:`chi2_gof` / :func:`tv_noise_bound` turn counts into a test.

Also here: :func:`llada_reference_generate`, a plain-torch reimplementation of the published LLaDA
generation loop (float64 Gumbel noise over the whole ``[B, L, V]``, softmax, gather, a per-row
``topk`` loop), the baseline the benchmarks and the parity tests compare against.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

__all__ = ["TemplateMixture", "chi2_gof", "tv_distance", "tv_noise_bound", "llada_reference_generate"]


class TemplateMixture:
    """A mixture of ``K`` noisy token templates with exact closed-form conditionals.

    Args:
        vocab_size: ``V``, the number of real tokens (logits have ``V`` columns).
        length: ``L``, the sequence length.
        num_templates: ``K`` (at most ``V``; the templates differ at every position).
        eps: the noise probability, ``0 < eps <= 1``.
        weights: template probabilities ``[K]`` (default uniform); normalised here.
        mask_id: the mask token, outside the vocabulary (default ``V``): never a template token and
            never predicted.
        seed: seeds the templates.
        dtype: dtype of the logits that ``model(x)`` returns.
        device: where the templates (and the logits) live.
    """

    def __init__(self, vocab_size: int, length: int, num_templates: int, eps: float = 0.1,
                 weights: Optional[Sequence[float]] = None, mask_id: Optional[int] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        V, L, K = int(vocab_size), int(length), int(num_templates)
        if V < 1 or L < 1 or K < 1:
            raise ValueError(f"vocab_size, length, num_templates: expected >= 1, got {V}, {L}, {K}")
        if K > V:
            raise ValueError(f"num_templates: expected <= vocab_size ({V}) so templates differ at every position, got {K}")
        if not (0.0 < float(eps) <= 1.0):
            raise ValueError(f"eps: expected a number in (0, 1], got {eps!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        self.V, self.L, self.K, self.eps = V, L, K, float(eps)
        self.mask_id = V if mask_id is None else int(mask_id)
        if 0 <= self.mask_id < V:
            raise ValueError(f"mask_id: expected a token outside the vocabulary [0, {V}) (e.g. {V}), got {mask_id}")
        self.device = torch.device(device)
        self.dtype = dtype
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ValueError(f"weights: expected {K} positive finite numbers, got {weights!r}")
        self.weights = (w / w.sum()).to(self.device)
        self.log_weights = self.weights.log()
        rng = random.Random(seed)
        tpl = [rng.sample(range(V), K) for _ in range(L)]  # K distinct tokens per position
        self.templates = torch.tensor(tpl, dtype=torch.int64).T.contiguous().to(self.device)  # [K, L]
        self.log_hit = math.log(1.0 - self.eps + self.eps / V)   # log q_k(t_k[i])
        self.log_miss = math.log(self.eps / V)                   # log q_k(v) for any other v
        self.calls = 0

    # ---------------------------------------------------------------- exact quantities
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise TypeError(f"x: expected an int64 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[1] != self.L:
            raise ValueError(f"x: expected shape [B, {self.L}], got {tuple(x.shape)}")
        return x.to(self.device)

    def _loglik_per_template(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: log w_k + sum over observed positions of log q_k(x_i) (float64)."""
        obs = x != self.mask_id
        match = x.unsqueeze(1) == self.templates.unsqueeze(0)                    # [B, K, L]
        ll = torch.where(match, self.log_hit, self.log_miss) * obs.unsqueeze(1)  # masked: 0
        return self.log_weights + ll.sum(-1)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """Exact posterior over the template given the unmasked positions of ``x``: ``[B, K]`` float64."""
        return torch.softmax(self._loglik_per_template(self._check(x)), dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` (float64 ``[B]``) of complete sequences; masked positions are marginalised,
        so a partly masked ``x`` gives the log-probability of its observed part."""
        return torch.logsumexp(self._loglik_per_template(self._check(x)), dim=-1)

    def conditional_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_i = v | observed)`` for every position, float64 ``[B, L, V]`` (observed
        positions included: what the model would predict were they masked)."""
        x = self._check(x)
        post = self.posterior(x)                                                # [B, K]
        B = x.shape[0]
        p = torch.full((B, self.L, self.V), self.eps / self.V, dtype=torch.float64, device=self.device)
        vals = (self.eps / self.V + (1.0 - self.eps) * post).unsqueeze(1).expand(B, self.L, self.K)
        p.scatter_(2, self.templates.T.unsqueeze(0).expand(B, self.L, self.K), vals)
        return p.log()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]`` (``self.dtype``): the log of the exact conditionals at masked
        positions; at an observed position, 0 at its token and ``-inf`` elsewhere.  Computed in
        float64 and rounded once; extra memory one ``[B, L, V]`` tensor of the output dtype."""
        x = self._check(x)
        self.calls += 1
        B = x.shape[0]
        post = self.posterior(x)
        out = torch.full((B, self.L, self.V), self.log_miss, dtype=self.dtype, device=self.device)
        vals = torch.log(self.eps / self.V + (1.0 - self.eps) * post).to(self.dtype)
        out.scatter_(2, self.templates.T.unsqueeze(0).expand(B, self.L, self.K),
                     vals.unsqueeze(1).expand(B, self.L, self.K))
        obs = x != self.mask_id
        out.masked_fill_(obs.unsqueeze(-1), float("-inf"))
        idx = torch.where(obs, x, torch.zeros_like(x)).unsqueeze(-1)
        out.scatter_(2, idx, torch.where(obs.unsqueeze(-1), torch.zeros((), dtype=self.dtype, device=self.device),
                                         out.gather(2, idx)))
        return out

    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_templates: bool = False):
        """``n`` exact samples ``[n, L]`` (and their templates ``[n]`` on request)."""
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.rand((n, self.L), generator=generator, device=self.device) < self.eps
        uni = torch.randint(0, self.V, (n, self.L), generator=generator, device=self.device)
        x = torch.where(noise, uni, self.templates[k])
        return (x, k) if return_templates else x

    def masked(self, n: int = 1) -> torch.Tensor:
        """``n`` fully masked sequences."""
        return torch.full((n, self.L), self.mask_id, dtype=torch.int64, device=self.device)

    def marginal_entropy(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Exact entropy (nats, float64 ``[B, L]``) of ``softmax(log p(x_i | observed) / T)``."""
        lp = self.conditional_log_probs(x) / temperature
        lq = torch.log_softmax(lp, dim=-1)
        return -(lq.exp() * lq).sum(-1)

    # ---------------------------------------------------------------- test statistic
    def num_stat_cells(self, n_positions: int) -> int:
        return (1 << self.K) * (n_positions + 1)

    def template_stats(self, x: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Cell index ``[B]`` of each sample's statistic over ``positions``: ``used * (n + 1) +
        n_other`` where ``used`` is the bit set of templates ``k`` with ``x_i = t_k[i]`` for some
        ``i`` in ``positions``, ``n_other`` how many of the ``n`` positions match no template."""
        x = self._check(x)
        if self.K > 20:
            raise ValueError("template_stats: at most 20 templates (2^K cells)")
        pos = torch.as_tensor(list(positions), dtype=torch.int64, device=self.device)
        n = pos.numel()
        xs = x[:, pos]                                                   # [B, n]
        match = xs.unsqueeze(1) == self.templates[:, pos].unsqueeze(0)   # [B, K, n]
        used = match.any(-1)                                             # [B, K]
        bits = (used.long() << torch.arange(self.K, device=self.device)).sum(-1)
        n_other = (~match.any(1)).sum(-1)
        return bits * (n + 1) + n_other

    def template_stats_probs(self, positions: Sequence[int], context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact distribution (float64 ``[2^K (n + 1)]``) of :meth:`template_stats` over
        ``positions`` for sequences drawn from the model given the observed positions of
        ``context`` (a 1-D partially masked sequence; default: nothing observed).  ``positions``
        are treated as masked."""
        pos = list(positions)
        n, K, V, eps = len(pos), self.K, self.V, self.eps
        if K > 20:
            raise ValueError("template_stats_probs: at most 20 templates (2^K cells)")
        ctx = self.masked(1) if context is None else self._check(context).clone()
        ctx[:, pos] = self.mask_id
        post = self.posterior(ctx)[0].cpu()                          # [K]
        p_other = eps * (V - K) / V
        A = torch.arange(1 << K)
        in_A = ((A.unsqueeze(1) >> torch.arange(K)) & 1).double()   # [2^K, K]: k in A
        size = in_A.sum(1, keepdim=True)                            # |A|
        a = (1.0 - eps) * in_A + eps * size / V                     # P(c_i in A | k)   [2^K, K]
        m = torch.arange(n + 1, dtype=torch.float64)
        binom = torch.tensor([math.comb(n, int(j)) for j in range(n + 1)], dtype=torch.float64)
        # F[A, m, k] = P(used subset of A, n_other = m | k)
        F = binom[None, :, None] * (p_other ** m)[None, :, None] * a[:, None, :] ** (n - m)[None, :, None]
        # Möbius inversion over subsets: G[A] = sum_{B subset of A} (-1)^{|A \ B|} F[B]
        G = F.clone()
        for bit in range(K):
            has = (A >> bit) & 1 == 1
            G[has] = G[has] - G[A[has] ^ (1 << bit)]
        probs = (G * post[None, None, :]).sum(-1).clamp(min=0.0).reshape(-1)
        return probs / probs.sum()


# -------------------------------------------------------------------- statistics
def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` as float64 on the CPU; a distribution: finite, >= 0, summing to 1 (within 1e-6)."""
    p = probs.double().cpu()
    if p.dim() != 1 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(f"probs: expected a 1-D distribution (finite, >= 0, summing to 1), got shape "
                         f"{tuple(p.shape)} summing to {float(p.sum()) if p.numel() else 0.0}")
    return p


def chi2_gof(samples_or_counts: torch.Tensor, probs: torch.Tensor, *, counts: bool = False, min_expected: float = 5.0):
    """Pearson chi-square goodness of fit of observed cells against ``probs``.

    Cells whose expected count is below ``min_expected`` are pooled into one (so the chi-square
    approximation holds).  Returns ``(statistic, dof, p_value)``; the p-value is the regularised
    upper incomplete gamma ``Q(dof / 2, statistic / 2)``.
    """
    probs = _check_probs(probs)
    if counts:
        obs = samples_or_counts.double().cpu()
    else:
        obs = torch.bincount(samples_or_counts.cpu(), minlength=probs.numel()).double()
    if obs.numel() != probs.numel():
        raise ValueError(f"counts: expected {probs.numel()} cells, got {obs.numel()}")
    n = obs.sum()
    exp = probs * n
    big = exp >= min_expected
    o = torch.cat([obs[big], obs[~big].sum().reshape(1)])
    e = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    if e[-1] < min_expected:   # the pooled cell is too small: merge it into the smallest big cell
        if big.any():
            j = int(e[:-1].argmin())
            o[j] += o[-1]
            e[j] += e[-1]
        o, e = o[:-1], e[:-1]
    keep = e > 0
    if bool((o[~keep] > 0).any()):
        return float("inf"), int(keep.sum()) - 1, 0.0
    o, e = o[keep], e[keep]
    stat = float(((o - e) ** 2 / e).sum())
    dof = max(int(o.numel()) - 1, 1)
    pval = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))
    return stat, dof, pval


def tv_distance(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Total-variation distance between the empirical distribution of cell indices and ``probs``."""
    probs = _check_probs(probs)
    if samples.numel() == 0:
        raise ValueError("samples: expected at least one sample, got none")
    emp = torch.bincount(samples.cpu(), minlength=probs.numel()).double() / samples.numel()
    return 0.5 * float((emp - probs).abs().sum())


def tv_noise_bound(probs: torch.Tensor, n: int, fail_prob: float = 1e-4) -> float:
    """A bound the empirical TV distance of ``n`` exact samples exceeds with probability at most
    ``fail_prob``: ``E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n)`` (Jensen), plus the McDiarmid
    deviation ``sqrt(log(1 / fail_prob) / (2 n))`` (one sample moves TV by at most ``1 / n``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected the number of samples (an int >= 1), got {n!r}")
    p = _check_probs(probs)
    mean = 0.5 * float(torch.sqrt(p * (1 - p) / n).sum())
    return mean + math.sqrt(math.log(1.0 / fail_prob) / (2 * n))


# -------------------------------------------------------------------- LLaDA's loop (baseline)
def _logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def llada_reference_generate(model, prompt: torch.Tensor, *, mask_id: int, steps: int = 128, gen_length: int = 128,
                             block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
                             remasking: str = "low_confidence", noise_dtype: torch.dtype = torch.float64,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LLaDA's published generation loop (Nie et al. 2025, ``generate.py``), reimplemented in plain
    torch as a baseline: every step draws Gumbel noise of the whole ``[B, L, V]`` in
    ``noise_dtype`` (float64 in LLaDA; float32 gives the truncated fp32 Gumbel-max), takes the
    argmax, reads the confidence from a float64 softmax of all logits, and picks each row's
    ``k`` most confident masked positions of the current block with ``topk`` in a Python loop
    over rows (one host sync per row and step)."""
    B, P = prompt.shape
    dev = prompt.device
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=dev)
    x[:, :P] = prompt
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        s, e = P + nb * block_length, P + (nb + 1) * block_length
        n_masked = (x[:, s:e] == mask_id).sum(1, keepdim=True)
        base, rem = n_masked // steps_per_block, n_masked % steps_per_block
        ntt = base + (torch.arange(steps_per_block, device=dev).unsqueeze(0) < rem).long()
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = _logits_of(model(torch.cat([x, un_x], 0)))
                logits, un_logits = torch.chunk(both, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = _logits_of(model(x))
            if temperature == 0:
                noisy = logits
            else:
                lg = logits.to(noise_dtype)
                u = torch.rand(lg.shape, dtype=noise_dtype, device=dev, generator=generator)
                noisy = lg.exp() / (-torch.log(u)) ** temperature
            x0 = torch.argmax(noisy, dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, dtype=torch.float64, device=dev, generator=generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, e:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, float("-inf")))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, sel = torch.topk(confidence[j], k=int(ntt[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x
