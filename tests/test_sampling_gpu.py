"""GPU tests of exact categorical sampling (CUDA and Triton backends): skipped without a GPU."""
import pytest
import torch

import pydiff
from pydiff.reference.sampling import sample_categorical_ref
from pydiff.sampling import sample_categorical

from _util import DTYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
GPU = torch.device("cuda")


def _backends():
    return [b for b in pydiff.available_backends(GPU) if b != "torch"] if torch.cuda.is_available() else []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 4097), (17, 32000), (2, 262147)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_gpu_matches_reference(dtype, shape, temperature):
    g = torch.Generator(device=GPU).manual_seed(shape[1])
    logits = (torch.randn(shape, device=GPU, generator=g) * 3).to(dtype)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (shape[0],), device=GPU, generator=g)
    offsets = torch.arange(shape[0], device=GPU)
    ref = sample_categorical_ref(logits, seeds, offsets, temperature)
    for b in _backends():
        res = sample_categorical(logits, temperature=temperature, seeds=seeds, offsets=offsets, return_probs=True,
                                 return_confidence=True, backend=b)
        agree = (res.tokens == ref[0]).double().mean().item()
        assert agree == 1.0, (b, agree)
        assert torch.allclose(res.probs, ref[1], rtol=2e-6, atol=1e-12), b
        assert torch.allclose(res.entropy, ref[2][:, 2], rtol=2e-6, atol=1e-9), b


def test_gpu_chi_square_and_threshold():
    V, n = 6, 200_000
    logits = torch.tensor([2.0, 0.0, -1.0, 1.5, -3.0, 0.5], device=GPU)
    p = torch.softmax(logits.double(), 0)
    for b in _backends():
        tok = sample_categorical(logits.expand(n, V), seed=3, backend=b)
        c = torch.bincount(tok, minlength=V).double()
        stat = float(((c - p * n) ** 2 / (p * n)).sum())
        assert stat < 40.0, (b, stat)
        tk = sample_categorical(logits.expand(n, V), seed=3, top_k=2, backend=b)
        assert set(tk.unique().tolist()) <= {0, 3}, b


def test_gpu_no_host_sync_with_flag():
    logits = torch.randn(64, 1000, device=GPU)
    mask = torch.rand(64, device=GPU) > 0.5
    seeds = torch.zeros(64, dtype=torch.int64, device=GPU)
    offsets = torch.arange(64, device=GPU)
    for b in _backends():
        sample_categorical(logits, seeds=seeds, offsets=offsets, mask=mask, on_invalid="flag", backend=b)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sample_categorical(logits, seeds=seeds, offsets=offsets, mask=mask, on_invalid="flag",
                               return_probs=True, backend=b)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_gpu_rows_times_vocab_beyond_int32():
    R, V = 17_000, 126_464  # 2.15e9 elements > 2^31
    logits = torch.randn((R, V), device=GPU, dtype=torch.bfloat16)
    logits[-1].fill_(-30.0)
    logits[-1, V - 1] = 5.0  # the last row's mass sits on its last token
    for b in _backends():
        tok = sample_categorical(logits, seed=1, on_invalid="flag", backend=b)
        assert tok[-1].item() == V - 1 and (tok >= 0).all(), b
    del logits


def _ops():
    """The compiled GPU ops taking ``(logits, threshold, row_mask, seeds, offsets, T, want_stats)``."""
    from pydiff.ops.sampling import _triton_impl

    ops = {"cuda": torch.ops.pydiff.sample_categorical, "triton": _triton_impl}
    return {b: f for b, f in ops.items() if b in pydiff.available_backends(GPU)}


def _special_rows(R, V, dtype, g):
    """``(x, seeds, offsets, tau, mask)``: random logits in ``dtype`` with (when R > 4) a NaN in row 3
    and row 4 all -inf, per-row seeds and offsets, a threshold 2 below each row's max and a row mask."""
    x = (torch.randn(R, V, device=GPU, generator=g) * 3).to(dtype)
    if R > 4:
        x[3, 0] = float("nan")
        x[4] = float("-inf")
    s = torch.randint(-2 ** 62, 2 ** 62, (R,), device=GPU, generator=g)
    o = torch.arange(R, device=GPU)
    tau = (x.float().amax(1) - 2.0).contiguous()
    mask = torch.arange(R, device=GPU) % 5 != 2
    return x, s, o, tau, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_tokens_and_probs_without_statistics_are_bit_identical(dtype):
    """``want_stats=False`` (what ``sample_categorical`` passes unless confidences are asked for):
    the CUDA and Triton kernels skip the per-logit statistics work and give the same tokens and
    probabilities bit for bit, NaN statistics; temperature 0 computes them regardless."""
    g = torch.Generator(device=GPU).manual_seed(4)
    x, _, o, tau, mask = _special_rows(37, 12289, dtype, g)
    s = torch.arange(37, device=GPU) * 11 + 1
    ops = _ops()
    for b in ops:
        for T in (1.0, 0.3, 0.0):
            for thr, rm in ((None, None), (tau, mask)):
                full = ops[b](x, thr, rm, s, o, T, True)
                lean = ops[b](x, thr, rm, s, o, T, False)
                assert torch.equal(full[0], lean[0]), (b, T)
                assert torch.equal(full[1].nan_to_num(-1.0), lean[1].nan_to_num(-1.0)), (b, T)
                if T > 0:
                    assert lean[2].isnan().all(), (b, T)
                else:
                    assert torch.equal(full[2].nan_to_num(-1.0), lean[2].nan_to_num(-1.0)), (b, T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fused_select_is_bit_identical(dtype, monkeypatch):
    """PYDIFF_SAMPLING_FUSED=1 (CUDA and Triton): the row's last partial block to finish picks the
    token (threadfence reduction over a per-row counter) instead of a second kernel; the same bits
    for every row, with thresholds, row masks, NaN and all -inf rows, at several temperatures, the
    statistics and the tokens-only kernels, and on a large batch where many rows finish at once (the
    memory ordering between the blocks' partials and the count is what this checks; the CPU
    emulator cannot)."""
    ops = _ops()
    g = torch.Generator(device=GPU).manual_seed(5)
    for R, V in [(37, 12289), (3, 1), (5, 4097), (2048, 126464)]:
        x, s, o, tau, mask = _special_rows(R, V, dtype, g)
        for T in (1.0, 0.3, 0.0):
            for thr, rm in ((None, None), (tau, mask)):
                for stats in (True, False):
                    for b in ops:
                        monkeypatch.delenv("PYDIFF_SAMPLING_FUSED", raising=False)
                        two = ops[b](x, thr, rm, s, o, T, stats)
                        monkeypatch.setenv("PYDIFF_SAMPLING_FUSED", "1")
                        fused = ops[b](x, thr, rm, s, o, T, stats)
                        for u, v in zip(two, fused):
                            assert torch.equal(u.nan_to_num(-7.0), v.nan_to_num(-7.0)), (b, R, V, T, stats, thr is None)
        del x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_tail_token_beside_the_maximum_is_drawn_in_its_interval(dtype):
    """As tests/test_sampling.py's test of the same name, on the GPU kernels (fp32 partial sums of
    eight that round 1 + 4.1e-8 to 1; the rescan's share of its own float64 total still draws the
    tail token for a uniform in its interval), for the layouts of both kernels: below a full chunk,
    and full 16-byte-loaded chunks (CUDA thread 0: logits 0..7 in bf16 / fp16, 0..3 and 512..515 in
    fp32)."""
    import math
    p = math.exp(-17.0)
    rows = [(1000, 7), (1000, 256), (4096, 5), (4096, 512)]
    logits = torch.full((len(rows), 4096), float("-inf"), device=GPU)
    for r, (V, tail) in enumerate(rows):
        logits[r, 0] = 0.0
        logits[r, tail] = -17.0
    seeds = torch.full((len(rows),), 12345, device=GPU)
    offsets = torch.full((len(rows),), 96735269, device=GPU)  # u = 1 - 5.9e-10
    for b in _backends():
        for r, (V, tail) in enumerate(rows):
            x = logits[r:r + 1, :V].to(dtype)
            res = sample_categorical(x, seeds=seeds[r:r + 1], offsets=offsets[r:r + 1], return_probs=True, backend=b)
            assert res.tokens.item() == tail, (b, V, tail, res.tokens.item())
            assert abs(res.probs.item() / (p / (1 + p)) - 1) < 1e-6, (b, V, res.probs.item())
