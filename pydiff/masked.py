"""Masked-diffusion samplers on top of exact categorical sampling.

* :func:`generate_llada`: LLaDA's generation (Nie et al. 2025): semi-autoregressive blocks; in each
  block a fixed number of tokens per step (LLaDA's ``get_num_transfer_tokens``), chosen by
  low-confidence remasking (keep the ``k`` most confident predictions of each row), random
  remasking, or Dream's margin / entropy confidences; classifier-free guidance as LLaDA does it.
* :func:`sample_fhs`: the first-hitting sampler of Zheng et al. 2024: one token per step, the next
  hitting time drawn analytically, the position uniform among the masked ones.
* :func:`generate_maskgit`: MaskGIT's confidence schedule (Chang et al. 2022) with Dream-style
  confidences (top-1 probability, top-1 minus top-2 margin, negative entropy).

Every token is drawn by :func:`pydiff.sampling.sample_categorical` (exact, float64, no
``[rows, V]`` noise), with ``mask=`` so only masked positions are sampled.  All per-row choices
(how many and which positions to unmask) run on the device: no Python loop over rows and no host
synchronisation per step (:func:`generate_llada` and :func:`generate_maskgit` read one flag back
at the very end to raise on invalid logits; :func:`sample_fhs` also reads the step count once at
the start).

Randomness is counter-based: row ``r`` uses its own 64-bit seed (``seeds=``, or drawn once from
``generator``) and every draw an offset made of the step, a stream and the position, so a row's
output depends only on its seed, its input and the model, not on the batch it ran in or on the
backend's scheduling.

``model(x)`` takes int64 tokens ``[B, L]`` and returns logits ``[B, L, V]``, a tensor or an
object with ``.logits`` (HF masked-LM outputs), a dict with ``"logits"`` or a tuple whose first
item is the logits.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from pydiff.sampling import sample_categorical, uniform53

__all__ = ["generate_llada", "sample_fhs", "generate_maskgit", "select_top_k", "num_transfer_tokens",
           "MASKGIT_SCHEDULES"]

# random streams: offset = (step * _NSTREAMS + stream) * L + position
_TOKEN, _CHOICE, _POSITION, _TIME = 0, 1, 2, 3
_NSTREAMS = 4
_SAMPLER_KEYS = ("top_k", "top_p", "min_p", "backend")


# ------------------------------------------------------------------------------- helpers
def _offsets(step: int, stream: int, L: int, pos: torch.Tensor) -> torch.Tensor:
    return pos + (step * _NSTREAMS + stream) * L


def _row_seeds(B: int, device: torch.device, generator, seeds) -> torch.Tensor:
    """One int64 seed per row: ``seeds`` as given (a tensor ``[B]``, or an int ``s`` meaning row
    ``r`` uses ``s + r``), else drawn once from ``generator`` on the device (no sync)."""
    if seeds is not None and generator is not None:
        raise ValueError("generator, seeds: pass one of them, not both")
    if seeds is None:
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator: expected a generator on {device.type}, got one on {generator.device}")
        return torch.randint(-(2 ** 63), 2 ** 63 - 1, (B,), dtype=torch.int64, device=device, generator=generator)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, torch.Tensor)):
        raise TypeError(f"seeds: expected an int or an int64 tensor [B], got {type(seeds).__name__}")
    if isinstance(seeds, int):
        return torch.arange(B, dtype=torch.int64, device=device) + seeds
    if seeds.dtype != torch.int64 or seeds.shape != (B,):
        raise ValueError(f"seeds: expected an int64 tensor of shape ({B},), got {seeds.dtype} {tuple(seeds.shape)}")
    if seeds.device != device:
        raise ValueError(f"seeds: expected device {device}, got {seeds.device}")
    return seeds


def _sampler_kwargs(kw: dict) -> dict:
    bad = sorted(set(kw) - set(_SAMPLER_KEYS))
    if bad:
        raise TypeError(f"unexpected keyword argument(s) {bad}; sampler options are {list(_SAMPLER_KEYS)}")
    return kw


def _check_tokens(name: str, x, mask_id) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype torch.int64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, L], got {tuple(x.shape)}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
        raise ValueError(f"mask_id: expected an int >= 0, got {mask_id!r}")
    return x


def _check_temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature: expected a finite number >= 0, got {t!r}")
    return float(t)


def _call_model(model, x: torch.Tensor, *args) -> torch.Tensor:
    out = model(x, *args)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected logits [B, L, V] (a tensor, or an output with .logits), got {type(out).__name__}")
    if out.dim() != 3 or out.shape[:2] != x.shape:
        raise ValueError(f"model: expected logits of shape [{x.shape[0]}, {x.shape[1]}, V] for input "
                         f"{tuple(x.shape)}, got {tuple(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"model: expected floating-point logits, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"model: expected logits on {x.device}, got {out.device}")
    return out


def _ban_token(lg: torch.Tensor, token: int, fresh: bool) -> torch.Tensor:
    """Logits with ``token`` set to -inf (a copy unless ``fresh``), when it is in the vocabulary."""
    if token >= lg.shape[-1]:
        return lg
    if not fresh:
        lg = lg.clone()
    lg[..., token] = float("-inf")
    return lg


def _raise_if_invalid(bad: torch.Tensor, on_invalid: str) -> None:
    if on_invalid == "raise" and bool(bad):   # the one host sync of a whole generation
        raise ValueError("model: logits of a sampled position were all -inf or contained NaN/+inf "
                         "(pass on_invalid='flag' to get token -2 there instead)")


def _check_on_invalid(on_invalid) -> None:
    if on_invalid not in ("raise", "flag"):
        raise ValueError(f"on_invalid: expected 'raise' or 'flag', got {on_invalid!r}")


def select_top_k(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, N]``: in row ``r`` the ``k[r]`` positions of largest ``confidence`` (ties to the
    lower index; ``-inf`` is never chosen, so a row gets ``min(k[r], #finite)``), on the device:
    one sort over positions and a comparison of each rank with the row's ``k``; no loop over rows."""
    if confidence.dim() != 2:
        raise ValueError(f"confidence: expected shape [B, N], got {tuple(confidence.shape)}")
    if k.shape != confidence.shape[:1]:
        raise ValueError(f"k: expected shape ({confidence.shape[0]},), got {tuple(k.shape)}")
    order = torch.argsort(confidence, dim=1, descending=True, stable=True)
    rank_ok = torch.arange(confidence.shape[1], device=confidence.device).unsqueeze(0) < k.unsqueeze(1)
    sel = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device).scatter_(1, order, rank_ok)
    return sel & (confidence > float("-inf"))


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: ``[B, steps]`` int64, row ``r``'s masked count split as
    evenly as possible over ``steps`` (the first ``n % steps`` steps take one more)."""
    n = mask_index.sum(1, keepdim=True)
    base, rem = n // steps, n % steps
    return base + (torch.arange(steps, device=mask_index.device).unsqueeze(0) < rem).long()


# ------------------------------------------------------------------------------- LLaDA
_LLADA_REMASKING = ("low_confidence", "random", "margin", "entropy")


def generate_llada(
    model,
    prompt: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    generator: Optional[torch.Generator] = None,
    seeds: Union[None, int, torch.Tensor] = None,
    ban_mask_token: bool = True,
    on_invalid: str = "raise",
    **sampler_kwargs,
) -> torch.Tensor:
    """LLaDA-style generation: returns ``[B, P + gen_length]`` int64 (the prompt, then the answer).

    The answer starts fully masked and is generated in ``gen_length / block_length`` blocks from
    left to right, ``steps / num_blocks`` steps each.  At the start of a block, each row's count of
    masked positions in it is split over its steps (:func:`num_transfer_tokens`).  At each step the
    model is called on the whole sequence, every masked position of the current block gets a token
    drawn from ``softmax(logits / temperature)`` (exactly; ``temperature=0`` is the argmax) and a
    confidence, and the ``k`` most confident ones per row are kept (:func:`select_top_k`).

    Args:
        model: ``model(x [B, L]) -> logits [B, L, V]`` (or an output with ``.logits``).
        prompt: int64 ``[B, P]``.
        mask_id: the mask token.
        gen_length, block_length, steps: as LLaDA; ``gen_length`` must be a multiple of
            ``block_length`` and ``steps`` a multiple of the number of blocks.
        temperature: sampling temperature (0 = greedy, LLaDA's default).
        cfg_scale: > 0 adds LLaDA's classifier-free guidance: the model also runs on a copy with the
            prompt masked, and ``logits = un + (cfg_scale + 1) (cond - un)`` (float32).
        remasking: ``"low_confidence"`` (LLaDA: the probability of the drawn token under
            ``softmax(logits)``, i.e. temperature 1 whatever ``temperature`` is),
            ``"random"`` (uniform confidences), ``"margin"`` (top-1 minus top-2 probability) or
            ``"entropy"`` (negative entropy), the last two of ``softmax(logits / T)`` (T = 1 when
            ``temperature`` is 0) as Dream computes them.
        generator / seeds: the randomness: a ``torch.Generator`` on the prompt's device (one draw
            of per-row seeds), or per-row int64 seeds ``[B]`` (or one int ``s``: row ``r`` uses
            ``s + r``).  The same seeds, prompt and model give the same output.
        ban_mask_token: never draw ``mask_id`` when it is inside the model's vocabulary (costs a
            copy of the block's logits; LLaDA itself does not ban it).
        on_invalid: ``"raise"`` (after the loop, one host sync) or ``"flag"`` (invalid draws are
            written as token -2).
        **sampler_kwargs: ``top_k``, ``top_p``, ``min_p`` (and ``backend``) for
            :func:`~pydiff.sampling.sample_categorical`.
    """
    kw = _sampler_kwargs(sampler_kwargs)
    prompt = _check_tokens("prompt", prompt, mask_id)
    T = _check_temperature(temperature)
    _check_on_invalid(on_invalid)
    for name, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"(gen_length / block_length = {num_blocks})")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale: expected a finite number >= 0, got {cfg_scale!r}")
    if remasking not in _LLADA_REMASKING:
        raise ValueError(f"remasking: expected one of {_LLADA_REMASKING}, got {remasking!r}")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    L = P + gen_length
    dev = prompt.device
    x = torch.full((B, L), mask_id, dtype=torch.int64, device=dev)
    x[:, :P] = prompt
    prompt_index = x != mask_id
    seeds_r = _row_seeds(B, dev, generator, seeds)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    step = 0
    for nb in range(num_blocks):
        s, e = P + nb * block_length, P + (nb + 1) * block_length
        ntt = num_transfer_tokens(x[:, s:e] == mask_id, steps_per_block)
        pos = torch.arange(s, e, device=dev)
        row_seeds = seeds_r.unsqueeze(1).expand(B, block_length)
        for i in range(steps_per_block):
            xb = x[:, s:e]
            masked = xb == mask_id
            if cfg_scale > 0:
                un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
                out = _call_model(model, torch.cat([x, un_x], 0))
                c, u = out[:B, s:e].float(), out[B:, s:e].float()
                lg, fresh = u + (cfg_scale + 1.0) * (c - u), True
            else:
                lg, fresh = _call_model(model, x)[:, s:e], False
            if ban_mask_token:
                lg = _ban_token(lg, mask_id, fresh)
            res = sample_categorical(
                lg, temperature=T, mask=masked, seeds=row_seeds,
                offsets=_offsets(step, _TOKEN, L, pos).unsqueeze(0).expand(B, block_length),
                return_probs=remasking == "low_confidence", return_confidence=remasking in ("margin", "entropy"),
                on_invalid="flag", **kw)
            tok = res if isinstance(res, torch.Tensor) else res.tokens
            bad = bad | (masked & (tok == -2)).any()
            if remasking == "low_confidence":
                if T == 0.0 or T == 1.0:
                    conf = res.probs   # at T = 0 the statistics are those of softmax(logits)
                else:                  # LLaDA reads softmax(logits) at T = 1: one more pass over the block
                    lse = torch.logsumexp(lg.float(), dim=-1)
                    lt = lg.gather(-1, tok.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
                    conf = torch.exp((lt - lse).double())
            elif remasking == "random":
                conf = uniform53(row_seeds, _offsets(step, _CHOICE, L, pos).unsqueeze(0).expand(B, block_length))
            elif remasking == "margin":
                conf = res.margin
            else:
                conf = -res.entropy
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            # an invalid draw (-2, its confidence NaN: never selected) is written at once ("flag")
            sel = select_top_k(conf, ntt[:, i]) | (masked & (tok == -2))
            x[:, s:e] = torch.where(sel, tok, xb)
            step += 1
    _raise_if_invalid(bad, on_invalid)
    return x


# ------------------------------------------------------------------------------- FHS
def _fhs_schedule(schedule):
    """(m, m_inv): the masking probability m(t) of a token at time t in [0, 1] (m(0)=0, m(1)=1)."""
    if schedule == "linear":
        return (lambda t: t), (lambda m: m)
    if schedule == "cosine":   # m(t) = 1 - cos(pi t / 2)
        return (lambda t: 1.0 - torch.cos(0.5 * math.pi * t)), (lambda m: torch.acos(1.0 - m) * (2.0 / math.pi))
    if isinstance(schedule, (tuple, list)) and len(schedule) == 2 and all(callable(f) for f in schedule):
        return schedule[0], schedule[1]
    raise ValueError(f"schedule: expected 'linear', 'cosine' or a pair (m, m_inv) of callables, got {schedule!r}")


def sample_fhs(
    model,
    x: torch.Tensor,
    *,
    mask_id: int,
    temperature: float = 1.0,
    schedule="linear",
    generator: Optional[torch.Generator] = None,
    seeds: Union[None, int, torch.Tensor] = None,
    time_conditioned: bool = False,
    return_times: bool = False,
    ban_mask_token: bool = True,
    on_invalid: str = "raise",
    **sampler_kwargs,
):
    """First-hitting sampler (Zheng et al. 2024) for masked diffusion: fills every ``mask_id`` of
    ``x [B, L]`` (not modified), one token per row and step.

    With ``n`` tokens still masked at time ``t``, each one's unmasking time is independent with
    ``P(still masked at s) = m(s) / m(t)``; the next one to unmask (the first hit going backwards) is
    at ``t' = m^{-1}(m(t) u^{1/n})`` with ``u`` uniform (``t' = t u^{1/n}`` for the linear
    schedule), its position is uniform among the ``n`` masked ones, and its token is drawn from the
    model's categorical there.  Rows with fewer masked positions finish earlier (they are carried
    along unchanged).  The loop runs ``max_r n_r`` steps, read once from the device at the start.

    Args:
        model: ``model(x) -> logits [B, L, V]``, or ``model(x, t)`` with ``t`` float32 ``[B]`` (the
            hitting time) when ``time_conditioned``; a time-agnostic model gives the same
            conditionals at any time, which is why FHS needs only one model call per token.
        temperature, **sampler_kwargs: for :func:`~pydiff.sampling.sample_categorical`.
        schedule: ``"linear"`` (``m(t) = t``), ``"cosine"`` (``m(t) = 1 - cos(pi t / 2)``), or a
            pair ``(m, m_inv)`` of callables on float64 tensors.
        generator / seeds: as :func:`generate_llada`.
        return_times: also return the hitting times, float64 ``[B, steps]`` (NaN after a row's end).

    Returns:
        ``x`` filled, or ``(x, times)``.
    """
    kw = _sampler_kwargs(sampler_kwargs)
    x = _check_tokens("x", x, mask_id).clone()
    T = _check_temperature(temperature)
    _check_on_invalid(on_invalid)
    m_fn, m_inv = _fhs_schedule(schedule)
    B, L = x.shape
    dev = x.device
    seeds_r = _row_seeds(B, dev, generator, seeds)
    n_steps = int((x == mask_id).sum(1).max()) if B > 0 else 0   # the one sync at the start
    t = torch.ones(B, dtype=torch.float64, device=dev)
    arange_l = torch.arange(L, device=dev)
    rows = torch.arange(B, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    times = []
    for step in range(n_steps):
        masked = x == mask_id
        n = masked.sum(1)
        active = n > 0
        # position: uniform among the masked ones (argmax of per-position uniforms)
        keys = uniform53(seeds_r.unsqueeze(1).expand(B, L), _offsets(step, _POSITION, L, arange_l).unsqueeze(0).expand(B, L))
        pos = torch.where(masked, keys, torch.full_like(keys, -1.0)).argmax(1)
        # time of the first hit: max of n i.i.d. reveal times
        u = uniform53(seeds_r, _offsets(step, _TIME, L, torch.zeros_like(seeds_r)))
        t_hit = m_inv(m_fn(t) * u ** (1.0 / n.clamp(min=1).double()))
        t = torch.where(active, t_hit, t)
        times.append(torch.where(active, t, torch.full_like(t, float("nan"))))
        logits = _call_model(model, x, t.float()) if time_conditioned else _call_model(model, x)
        lg = logits[rows, pos]                                   # [B, V], a copy
        if ban_mask_token:
            lg = _ban_token(lg, mask_id, True)
        tok = sample_categorical(lg, temperature=T, mask=active, seeds=seeds_r,
                                 offsets=_offsets(step, _TOKEN, L, pos), on_invalid="flag", **kw)
        bad = bad | (active & (tok == -2)).any()
        hit = (arange_l.unsqueeze(0) == pos.unsqueeze(1)) & active.unsqueeze(1)
        x = torch.where(hit, tok.unsqueeze(1), x)
    _raise_if_invalid(bad, on_invalid)
    if return_times:
        tt = torch.stack(times, 1) if times else torch.empty((B, 0), dtype=torch.float64, device=dev)
        return x, tt
    return x


# ------------------------------------------------------------------------------- MaskGIT
MASKGIT_SCHEDULES: dict = {
    "cosine": lambda r: math.cos(0.5 * math.pi * r),
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r * r,
    "cubic": lambda r: 1.0 - r ** 3,
    "sqrt": lambda r: 1.0 - math.sqrt(r),
}
_MASKGIT_CONF = ("prob", "top1", "margin", "entropy", "random")


def generate_maskgit(
    model,
    x: torch.Tensor,
    *,
    mask_id: int,
    steps: int,
    schedule: Union[str, Callable[[float], float]] = "cosine",
    temperature: float = 1.0,
    confidence: str = "prob",
    choice_temperature: float = 0.0,
    generator: Optional[torch.Generator] = None,
    seeds: Union[None, int, torch.Tensor] = None,
    ban_mask_token: bool = True,
    on_invalid: str = "raise",
    **sampler_kwargs,
) -> torch.Tensor:
    """MaskGIT-style iterative decoding of every ``mask_id`` in ``x [B, L]`` (not modified) in
    ``steps`` model calls.

    With ``N`` masked positions at the start (per row), after step ``s`` (1-based) ``floor(N
    gamma(s / steps))`` stay masked (at least one is unmasked per step and at least one stays masked
    until the last step, as MaskGIT clamps); all masked positions are sampled at each step and the
    most confident predictions are kept (:func:`select_top_k`).

    Args:
        schedule: the mask ratio ``gamma(r)``, ``gamma(0) = 1``, ``gamma(1) = 0``: ``"cosine"``
            (MaskGIT's), ``"linear"``, ``"square"``, ``"cubic"``, ``"sqrt"`` or a callable.
        temperature, **sampler_kwargs: for :func:`~pydiff.sampling.sample_categorical`.
        confidence: ``"prob"`` (the drawn token's probability, MaskGIT / Dream ``maskgit_plus``),
            ``"top1"`` (the most likely token's probability), ``"margin"`` (top-1 minus top-2,
            Dream ``topk_margin``), ``"entropy"`` (negative entropy, Dream ``entropy``) or
            ``"random"`` (uniform, Dream ``origin``).  Statistics are those of
            ``softmax(logits / T)`` (T = 1 when ``temperature`` is 0).
        choice_temperature: MaskGIT's randomised selection: adds ``choice_temperature (1 - s /
            steps)`` times Gumbel noise to the confidence (its log for ``prob`` / ``top1``).
        generator / seeds / ban_mask_token / on_invalid: as :func:`generate_llada`.
    """
    kw = _sampler_kwargs(sampler_kwargs)
    x = _check_tokens("x", x, mask_id).clone()
    T = _check_temperature(temperature)
    _check_on_invalid(on_invalid)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if isinstance(schedule, str):
        if schedule not in MASKGIT_SCHEDULES:
            raise ValueError(f"schedule: expected one of {list(MASKGIT_SCHEDULES)} or a callable, got {schedule!r}")
        gamma = MASKGIT_SCHEDULES[schedule]
    elif callable(schedule):
        gamma = schedule
    else:
        raise ValueError(f"schedule: expected a name or a callable, got {schedule!r}")
    if confidence not in _MASKGIT_CONF:
        raise ValueError(f"confidence: expected one of {_MASKGIT_CONF}, got {confidence!r}")
    if not (isinstance(choice_temperature, (int, float)) and math.isfinite(choice_temperature) and choice_temperature >= 0):
        raise ValueError(f"choice_temperature: expected a finite number >= 0, got {choice_temperature!r}")
    ratios = [float(gamma((s + 1) / steps)) for s in range(steps)]
    if any(not (0.0 <= g <= 1.0) for g in ratios):
        raise ValueError(f"schedule: gamma(r) must lie in [0, 1], got {ratios}")
    B, L = x.shape
    dev = x.device
    seeds_r = _row_seeds(B, dev, generator, seeds)
    row_seeds = seeds_r.unsqueeze(1).expand(B, L)
    pos = torch.arange(L, device=dev)
    n0 = (x == mask_id).sum(1)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    for s in range(steps):
        masked = x == mask_id
        n = masked.sum(1)
        lg = _call_model(model, x)
        if ban_mask_token:
            lg = _ban_token(lg, mask_id, False)
        res = sample_categorical(lg, temperature=T, mask=masked, seeds=row_seeds,
                                 offsets=_offsets(s, _TOKEN, L, pos).unsqueeze(0).expand(B, L),
                                 return_probs=confidence == "prob",
                                 return_confidence=confidence in ("top1", "margin", "entropy"),
                                 on_invalid="flag", **kw)
        tok = res if isinstance(res, torch.Tensor) else res.tokens
        bad = bad | (masked & (tok == -2)).any()
        if confidence == "random":
            conf = uniform53(row_seeds, _offsets(s, _CHOICE, L, pos).unsqueeze(0).expand(B, L))
        else:
            conf = {"prob": res.probs, "top1": res.top1, "margin": res.margin,
                    "entropy": None if res.entropy is None else -res.entropy}[confidence]
            if choice_temperature > 0:
                if confidence in ("prob", "top1"):
                    conf = torch.log(conf)
                uc = uniform53(row_seeds, _offsets(s, _CHOICE, L, pos).unsqueeze(0).expand(B, L))
                g = -torch.log(-torch.log(uc.clamp(min=2.0 ** -53)))
                conf = conf + choice_temperature * (1.0 - (s + 1) / steps) * g
        conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
        if s == steps - 1:
            keep_masked = torch.zeros_like(n)
        else:
            keep_masked = torch.floor(n0.double() * ratios[s]).long()
            keep_masked = torch.minimum(keep_masked.clamp(min=1), n - 1).clamp(min=0)
        sel = select_top_k(conf, n - keep_masked) | (masked & (tok == -2))  # invalid draws: written ("flag")
        x = torch.where(sel, tok, x)
    _raise_if_invalid(bad, on_invalid)
    return x
