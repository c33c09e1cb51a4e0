"""Masked-diffusion benchmarks and demo tables (the analytic model of pydiff.testing.discrete).

    python bench/masked.py                 # all three tables, sizes for the device present
    python bench/masked.py --quick         # small sizes (a smoke run)
    python bench/masked.py --out DIR       # also writes masked_<cpu|gpu>.json and .png there

Part 1 (masked_loop): a whole LLaDA-style generation loop on the analytic model, per step:
``pydiff.masked.generate_llada`` (exact float64 sampling of the current block's masked positions,
device-side top-k per row) against a plain-torch reimplementation of LLaDA's published loop
(``pydiff.testing.discrete.llada_reference_generate``: float64 Gumbel noise over the whole
``[B, L, V]``, float64 softmax, gather, ``topk`` per row in a Python loop), same sizes, same model;
the model's own time per step is measured separately, so ``sampler_ms`` is what the loop adds.

Part 2 (masked_parallel): the error of parallel decoding.  LLaDA-style generation of the analytic
model (4 templates) at temperature 1, with 1, 2, 4 or 8 tokens per step, random or low-confidence
remasking: total-variation distance between the distribution of "which templates appear, and how
many positions match none" and its exact law, the TV that exact samples of the same size reach
(noise floor), and the rate of sequences that mix templates (exact: ``mixed_exact``).

Part 3 (masked_entropy): the entropy that fp32 Gumbel-max loses.  The model's per-token
conditional where the template is already known (what almost every token of a generation sees):
the template token, and ``V - 1`` noise tokens 16 nats below it at T = 1 (16 / T at T).
Per temperature, the exact entropy of ``softmax(logits / T)`` against the entropy estimated from
tokens drawn by ``sample_categorical`` (exact) and by fp32 Gumbel-max (``mean -log p_T(token)``),
and the rate of noise tokens: fp32 Gumbel noise is capped near 16.6, so tokens that far below
the best are drawn less often than they should be, or never.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import pydiff  # noqa: E402
from pydiff import backend as _backend  # noqa: E402
from pydiff.masked import generate_llada, sample_fhs  # noqa: E402
from pydiff.sampling import gumbel_max_fp32, sample_categorical  # noqa: E402
from pydiff.testing.discrete import (TemplateMixture, chi2_gof, llada_reference_generate, tv_distance,  # noqa: E402
                                     tv_noise_bound)

from _timing import device_name, sync  # noqa: E402


def _timed(fn, device, reps: int = 1):
    """(best seconds of ``reps`` runs after one warm-up run, peak extra CUDA bytes or None).  The best,
    not the median: on shared 2-core machines other work inflates single runs."""
    fn()
    sync(device)
    times, peak = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
    return min(times), peak


# ------------------------------------------------------------------------------- part 1
def loop_rows(device: torch.device, quick: bool = False):
    if quick:
        B, P, gen, block, V, dtype, reps = 2, 8, 8, 8, 4096, torch.float32, 1
    elif device.type == "cuda":
        B, P, gen, block, V, dtype, reps = 8, 64, 256, 32, 126464, torch.bfloat16, 3
    else:
        B, P, gen, block, V, dtype, reps = 2, 16, 32, 32, 32000, torch.float32, 3
    steps = gen   # one token per step, as LLaDA's best-quality setting
    model = TemplateMixture(V, P + gen, num_templates=8, eps=0.05, dtype=dtype, device=device, seed=0)
    prompt = model.sample(B, torch.Generator(device=device).manual_seed(0))[:, :P].contiguous()
    x_mid = torch.cat([prompt, torch.full((B, gen), model.mask_id, dtype=torch.int64, device=device)], 1)
    rows = []
    shape = f"B={B} L={P + gen} V={V} {str(dtype).replace('torch.', '')}"
    def model_only():
        for _ in range(steps):
            model(x_mid)

    t_model, _ = _timed(model_only, device, reps)
    rows.append(dict(part="masked_loop", shape=shape, temperature="-", impl="model only",
                     ms_per_step=t_model / steps * 1e3, sampler_ms=0.0, peak_mb=None))
    ours_backend = _backend.resolve(None, device)
    for T in (0.0, 1.0):
        impls = {
            f"pydiff generate_llada ({ours_backend})": lambda: generate_llada(
                model, prompt, mask_id=model.mask_id, gen_length=gen, block_length=block, steps=steps,
                temperature=T, remasking="low_confidence", seeds=0),
            "LLaDA loop (float64 Gumbel, per-row topk)": lambda: llada_reference_generate(
                model, prompt, mask_id=model.mask_id, gen_length=gen, block_length=block, steps=steps,
                temperature=T, remasking="low_confidence", generator=torch.Generator(device=device).manual_seed(0)),
        }
        for name, fn in impls.items():
            t, peak = _timed(fn, device, reps)
            rows.append(dict(part="masked_loop", shape=shape, temperature=T, impl=name, ms_per_step=t / steps * 1e3,
                             sampler_ms=(t - t_model) / steps * 1e3,
                             peak_mb=None if peak is None else peak / 2 ** 20))
    return rows


# ------------------------------------------------------------------------------- part 2
def parallel_rows(device: torch.device, quick: bool = False):
    n = 1000 if quick else (20000 if device.type == "cuda" else 2000)
    V, L, K = 100, 8, 4
    model = TemplateMixture(V, L, num_templates=K, eps=0.2, device=device, seed=3)
    pos = list(range(L))
    probs = model.template_stats_probs(pos)
    cells = torch.arange(probs.numel())
    mixed = torch.tensor([bin(int(c) // (L + 1)).count("1") > 1 for c in cells])
    mixed_exact = float(probs[mixed].sum())
    floor = tv_noise_bound(probs, n)
    prompt = torch.zeros((n, 0), dtype=torch.int64, device=device)
    rows = []

    def add(sampler, per_step, out):
        c = model.template_stats(out, pos).cpu()
        _, _, p = chi2_gof(c, probs)
        rows.append(dict(part="masked_parallel", sampler=sampler, tokens_per_step=per_step, n=n,
                         tv=tv_distance(c, probs), tv_floor=floor, chi2_p=p,
                         mixed=float(mixed[c].double().mean()), mixed_exact=mixed_exact))

    add("FHS", 1, sample_fhs(model, model.masked(n), mask_id=model.mask_id, seeds=1))
    for remasking in ("random", "low_confidence"):
        for per_step in (1, 2, 4, 8):
            out = generate_llada(model, prompt, mask_id=model.mask_id, gen_length=L, block_length=L,
                                 steps=L // per_step, temperature=1.0, remasking=remasking, seeds=2)
            add(f"LLaDA {remasking}", per_step, out)
    return rows


# ------------------------------------------------------------------------------- part 3
def entropy_rows(device: torch.device, quick: bool = False):
    if quick:
        V, n = 32768, 512
    elif device.type == "cuda":
        V, n = 131072, 65536
    else:
        V, n = 131072, 4096
    gap = 16.0   # nats between the template token and each noise token at T = 1
    eps = V / (V + math.exp(gap))   # (1 - eps) V / eps = e^gap
    model = TemplateMixture(V, 4, num_templates=4, eps=eps, device=device, seed=4)
    ctx = model.masked(1)
    ctx[0, :3] = model.templates[0, :3]   # three observed tokens of template 0: its posterior is ~1
    row = model(ctx)[0, 3].float()        # [V]
    top = int(model.templates[0, 3])
    chunk = 1024 if device.type == "cuda" else 256
    rows = []
    gen = torch.Generator(device=device).manual_seed(5)
    for T in (1.25, 1.0, 0.9):
        lp = torch.log_softmax(row.double() / T, 0)
        h_exact = float(-(lp.exp() * lp).sum())
        tail_exact = float(1.0 - lp[top].exp())
        for name in ("exact (sample_categorical)", "fp32 Gumbel-max"):
            toks = []
            for i in range(0, n, chunk):
                m = min(chunk, n - i)
                lg = row.expand(m, V)
                if name.startswith("exact"):   # one seed per temperature, row counter as the offset
                    seeds = torch.full((m,), 1234 + round(T * 1000), dtype=torch.int64, device=device)
                    offs = torch.arange(i, i + m, dtype=torch.int64, device=device)
                    toks.append(sample_categorical(lg, temperature=T, seeds=seeds, offsets=offs))
                else:
                    toks.append(gumbel_max_fp32(lg, T, generator=gen))
            tok = torch.cat(toks)
            nll = -lp[tok]
            rows.append(dict(part="masked_entropy", V=V, temperature=T, sampler=name, n=n,
                             entropy=float(nll.mean()), entropy_se=float(nll.std() / math.sqrt(n)),
                             entropy_exact=h_exact, tail_rate=float((tok != top).double().mean()),
                             tail_exact=tail_exact))
    return rows


def rows(device, quick: bool = False, out=None):
    """All three tables as a list of dicts (``part`` says which), appended to ``out`` table by table."""
    device = torch.device(device)
    out = [] if out is None else out
    out += loop_rows(device, quick)
    out += parallel_rows(device, quick)
    out += entropy_rows(device, quick)
    return out


# ------------------------------------------------------------------------------- output
def _table(rs, cols):
    def f(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    vals = [[f(r.get(c)) for c in cols] for r in rs]
    widths = [max(len(c), *(len(v[i]) for v in vals)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(f"{x:>{w}}" for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols)] + [line(v) for v in vals])


def print_tables(rs):
    loop = [r for r in rs if r["part"] == "masked_loop"]
    if loop:
        print(f"\n## LLaDA-style generation loop on the analytic model ({loop[0]['shape']}), per step")
        print(_table(loop, ["temperature", "impl", "ms_per_step", "sampler_ms", "peak_mb"]))
    par = [r for r in rs if r["part"] == "masked_parallel"]
    if par:
        print(f"\n## Parallel decoding error (analytic model, 4 templates, L=8, T=1, n={par[0]['n']})")
        print(_table(par, ["sampler", "tokens_per_step", "tv", "tv_floor", "chi2_p", "mixed", "mixed_exact"]))
    ent = [r for r in rs if r["part"] == "masked_entropy"]
    if ent:
        print(f"\n## Entropy per token, exact vs fp32 Gumbel-max (template known, V={ent[0]['V']}, n={ent[0]['n']})")
        print(_table(ent, ["temperature", "sampler", "entropy", "entropy_se", "entropy_exact", "tail_rate", "tail_exact"]))


def plot(rs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    loop = [r for r in rs if r["part"] == "masked_loop"]
    ax = axes[0]
    if loop:
        labels = [f"{r['impl']}\nT={r['temperature']}" for r in loop]
        ax.barh(range(len(loop)), [r["ms_per_step"] for r in loop], color=(["0.6"] + ["C0", "C3"] * len(loop))[:len(loop)])
        ax.set_yticks(range(len(loop)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (lower is better)")
        ax.set_title(f"LLaDA loop, {loop[0]['shape']}", fontsize=9)
    par = [r for r in rs if r["part"] == "masked_parallel"]
    ax = axes[1]
    for sampler in dict.fromkeys(r["sampler"] for r in par):
        sub = [r for r in par if r["sampler"] == sampler]
        ax.plot([r["tokens_per_step"] for r in sub], [r["tv"] for r in sub], "o-", label=sampler)
    if par:
        ax.axhline(par[0]["tv_floor"], color="k", ls="--", lw=0.8, label="exact-sampling noise bound")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step")
        ax.set_ylabel("TV distance to the exact law")
        ax.set_title("parallel decoding error (analytic model)", fontsize=9)
        ax.legend(fontsize=7)
    ent = [r for r in rs if r["part"] == "masked_entropy"]
    ax = axes[2]
    if ent:
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="exact")
        for sampler, c in (("exact (sample_categorical)", "C0"), ("fp32 Gumbel-max", "C3")):
            sub = [r for r in ent if r["sampler"] == sampler]
            ax.errorbar([r["temperature"] for r in sub], [r["entropy"] / r["entropy_exact"] for r in sub],
                        yerr=[2 * r["entropy_se"] / r["entropy_exact"] for r in sub], fmt="o-", color=c,
                        label=sampler, capsize=3)
        ax.set_xlabel("temperature")
        ax.set_ylabel("entropy drawn / exact entropy (2 s.e. bars)")
        ax.set_title(f"per-token entropy, template known, V={ent[0]['V']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--out", default=None, help="folder for masked_<cpu|gpu>.json and .png")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"# pydiff masked-diffusion bench on {device_name(device)}, torch {torch.__version__}, "
          f"sampling backend {_backend.resolve(None, device)}")
    rs = rows(device, args.quick)
    print_tables(rs)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "gpu" if device.type == "cuda" else "cpu"
        info = dict(device=device_name(device), torch=torch.__version__, pydiff=pydiff.build_info(),
                    date=time.strftime("%Y-%m-%d"))
        with open(os.path.join(args.out, f"masked_{tag}.json"), "w") as f:
            json.dump(dict(info=info, rows=rs), f, indent=1)
        plot(rs, os.path.join(args.out, f"masked_{tag}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
