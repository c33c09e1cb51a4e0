"""GPU tests of the quantization ops (``quantize``, ``quant_gemm``; W4A4, W8A8 int8 / fp8) on the
'cuda' backend (csrc/quant/*_cuda.cu) and, when its module imports, the 'triton' backend: skipped
without a CUDA GPU.  References: the float64 definitions of pydiff/reference/quant.py and the C++
CPU backend.

* quantize: q and scales bit-equal to the reference for prologue "none" (every format and input
  dtype, M = 1 / primes, K up to 12288, G from 32 to K, smoothing, lora ranks up to 300,
  misaligned x); gelu_tanh / layernorm (adaLN) within one step at a handful of elements; the e4m3
  encoding bit-equal to torch's for every fp16 / bf16 value and every fp32 tie; NaN / inf / zero
  groups; the same bits as the CPU backend.
* quant_gemm: the int32 group sums equal (unit scales, out fp32 == the exact integer sum);
  adversarial all +7 x +7, -8 x -8 (int4), +127 / -128 (int8), +-448 (fp8) at K in {3072, 12288,
  16384} exact; random operands at M in {1, 7, 129, 4096}, N in {1, 67, 3072}, K in {32, 96, 1024,
  3072}, G in {32, 64, 96, 128, K}, bias / lora on and off, every out dtype, within the fp32 rounding
  of the epilogue (fp8: plus the tensor cores' fp32 accumulation inside a group); misaligned and
  non-contiguous operands; int64 indexing (M K and M N above 2^31).
* quant_gemm_quant with the consumer's low-rank down-projection (the W4A4 DiT MLP, fc2 rank 32):
  q / scales as the reference but for ties, lora_act2 within its fp32 bound (Triton: atomics), and
  quantized_mlp fused vs the unfused chain (the op-level sweep is test_quant_fused.py's GPU test).
* Outputs are freshly allocated by the ops: the caching allocator is filled with NaN first, so an
  element a kernel forgets to write shows up.  Bad device mixes raise, naming the argument; no host
  synchronisation; CUDA-graph capture.
"""
import pytest
import torch

import pydiff
from pydiff.ops.quant import quant_gemm, quant_gemm_quant, quantize
from pydiff.reference.quant import FORMATS, QMAX, q_dtype, q_values, quant_gemm_quant_ref, quant_gemm_ref, quantize_ref

from _quant_util import (check_fp8_encoding, check_gemm, check_lora_act2, check_special_groups, codes, fp8_mma_rel,
                         fp8_sweep_values, gemm_magnitude, special_groups_input, step_diff, triton_quant_ok)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
GPU = torch.device("cuda")
CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = (["cuda"] + (["triton"] if triton_quant_ok() else [])) if torch.cuda.is_available() else []
HAS_CPU = pydiff.build_info()["cpu_kernels"]


def _fp8_mma(backend: str) -> bool:
    """The CUDA kernel runs fp8 on the e4m3 tensor-core MMA (sm_89+); Triton decodes elsewhere."""
    return backend != "cuda" or torch.cuda.get_device_capability() >= (8, 9)


def _rand(shape, dtype, seed, std=1.0, mean=0.0, device=GPU):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std + mean).to(dtype)


def _poison(numel, dtype=torch.float32, count=4):
    """Fill freed GPU memory of the next outputs' size with NaN (0xFF bytes for integer outputs)."""
    bufs = [torch.full((max(int(numel), 1),), float("nan"), device=GPU, dtype=dtype) for _ in range(count)]
    del bufs


def _cases(backend, full, small):
    return small if backend == "triton" else full


def test_gpu_build_has_cuda_kernels():
    info = pydiff.build_info()
    assert info["cuda_kernels"], f"pydiff was built without its CUDA kernels on a GPU machine: {info}"
    assert "cuda" in pydiff.available_backends(GPU)


# ---------------------------------------------------------------- quantize
# (M, K, G, R, smooth): M = 1 / primes, K not a power of two, one group per row (G = K), G not a
# power of two (96), lora ranks 1 .. 300 (> 256: several rank passes), K up to 12288
Q_CASES = [(1, 32, 32, 0, False), (7, 96, 32, 1, True), (129, 1024, 64, 17, False), (33, 3072, 128, 64, True),
           (5, 192, 96, 0, True), (3, 4096, 4096, 300, False), (17, 12288, 64, 32, True), (130, 320, 320, 5, False)]
Q_CASES_SMALL = [(7, 96, 32, 1, True), (129, 1024, 64, 17, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_gpu_quantize_matches_reference_and_cpu(backend, fmt, dtype):
    cases = _cases(backend, Q_CASES, Q_CASES_SMALL if dtype == torch.bfloat16 else [])
    for i, (M, K, G, R, sm) in enumerate(cases):
        seed = 100 * i + FORMATS.index(fmt)
        x = _rand((M, K), dtype, seed, std=1.5, mean=0.25)
        smooth = _rand((K,), DTYPES[i % 3], seed + 1).abs().add(0.5) if sm else None
        lora_down = _rand((K, R), DTYPES[(i + 1) % 3], seed + 2, std=0.1) if R else None
        _poison(M * K)
        q, s, la = quantize(x, fmt, G, smooth=smooth, lora_down=lora_down, backend=backend)
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        qr, sr, lar = quantize_ref(cpu(x), cpu(smooth), cpu(lora_down), fmt=fmt, group_size=G)
        what = f"{backend} {fmt} {dtype} M={M} K={K} G={G} R={R} smooth={sm}"
        assert q.dtype == q_dtype(fmt) and q.shape == qr.shape and q.device == x.device, what
        assert s.dtype == torch.float32 and s.shape == (M, K // G), what
        assert la.dtype == torch.float32 and la.shape == (M, R), what
        assert torch.equal(codes(q.cpu(), fmt), codes(qr, fmt)), f"{what}: q differs from the reference"
        assert torch.equal(s.cpu(), sr), f"{what}: scales differ from the reference"
        if R:
            y = x.cpu().float() / smooth.cpu().float() if sm else x.cpu().float()
            bound = 4 * K * 2.0**-24 * (y.double().abs() @ lora_down.cpu().double().abs()) + 1e-30
            assert ((la.cpu().double() - lar.double()).abs() <= bound).all(), f"{what}: lora_act"
        if HAS_CPU and i % 2 == 0:
            qc, sc, _ = quantize(cpu(x), fmt, G, smooth=cpu(smooth), lora_down=cpu(lora_down), backend="cpu")
            assert torch.equal(codes(q.cpu(), fmt), codes(qc, fmt)) and torch.equal(s.cpu(), sc), \
                f"{what}: differs from the cpu backend"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_quantize_misaligned_and_noncontiguous_x(backend, fmt):
    M, K, G = 37, 320, 64
    base = _rand((M * K + 1,), torch.bfloat16, 3, std=2.0)
    x = base[1:].view(M, K)  # 2-byte offset: the kernels' scalar-load path
    xt = _rand((K, M), torch.float16, 4).T  # non-contiguous
    for xx in (x, xt):
        q, s, _ = quantize(xx, fmt, G, backend=backend)
        qr, sr, _ = quantize_ref(xx.cpu(), fmt=fmt, group_size=G)
        assert torch.equal(codes(q.cpu(), fmt), codes(qr, fmt)) and torch.equal(s.cpu(), sr), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_quantize_prologues_within_one_step(backend, fmt):
    """gelu_tanh (tanhf vs torch's tanh: an ulp of y) and layernorm (+ adaLN; float64 statistics in
    another summation order): q within one step of the reference, at a handful of elements."""
    M, K, G = 64, 3072, 64
    step_diffs, total = 0, 0
    for j, dtype in enumerate(DTYPES if backend == "cuda" else DTYPES[2:]):
        x = _rand((M, K), dtype, 7 + j, std=2.0, mean=0.3)
        sh = _rand((4, K), dtype, 8 + j, std=0.5)
        sc = _rand((4, K), dtype, 9 + j, std=0.2)
        cases = [("gelu_tanh", {}), ("layernorm", {}), ("layernorm", dict(shift=sh, scale=sc)),
                 ("layernorm", dict(shift=sh[:1])), ("layernorm", dict(scale=sc[:2]))]
        for pro, kw in cases:
            smooth = _rand((K,), torch.float32, 12).abs().add(0.5) if pro == "gelu_tanh" else None
            ld = _rand((K, 8), torch.bfloat16, 13, std=0.05) if pro == "layernorm" and not kw else None
            q, s, la = quantize(x, fmt, G, prologue=pro, smooth=smooth, lora_down=ld, backend=backend, **kw)
            kc = {k: v.cpu() for k, v in kw.items()}
            qr, sr, lar = quantize_ref(x.cpu(), None if smooth is None else smooth.cpu(),
                                       None if ld is None else ld.cpu(), kc.get("shift"), kc.get("scale"), fmt, G,
                                       pro)
            what = f"{backend} {fmt} {dtype} {pro} {sorted(kw)}"
            assert torch.isfinite(s).all(), what
            rel = ((s.cpu().double() - sr.double()).abs() / sr.double()).max().item()
            assert rel <= (2.0**-21 if backend == "cuda" else 2.0**-18), f"{what}: scales rel diff {rel:.3g}"
            d = step_diff(q.cpu(), qr, fmt)
            assert d.max().item() <= 1, f"{what}: q differs by {d.max().item()} steps"
            step_diffs += int((d > 0).sum())
            total += d.numel()
            if ld is not None:
                err = (la.cpu().double() - lar.double()).abs().max().item()
                assert err <= 1e-3 * max(1.0, lar.abs().max().item()), f"{what}: lora_act error {err:.3g}"
    limit = max(8, total // 20000) if backend == "cuda" else total // 100
    assert step_diffs <= limit, f"{backend} {fmt}: {step_diffs} of {total} q values one step off"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_fp8_encoding_matches_torch_bit_for_bit(backend):
    """Each group is [448, v0 .. v30]: scale exactly 1, so q = e4m3(v) for every swept v."""
    def run(x):
        q, s, _ = quantize(x.to(GPU), "fp8", 32, backend=backend)
        return q.cpu(), s.cpu()

    check_fp8_encoding(run, fp8_sweep_values(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_quantize_rounding_ties_and_special_groups(backend, fmt):
    x = special_groups_input(QMAX[fmt], lambda seed: _rand((32,), torch.float32, seed, device=CPU))
    q, s, _ = quantize(x.to(GPU), fmt, 32, backend=backend)
    qr, _, _ = quantize_ref(x, fmt=fmt, group_size=32)
    check_special_groups(q.cpu(), s.cpu(), qr, fmt, backend)


# ---------------------------------------------------------------- quant_gemm
def _operands(M, N, K, G, fmt, seed, dtype=torch.float32):
    x = _rand((M, K), dtype, seed, std=1.2, mean=0.1)
    w = _rand((N, K), dtype, seed + 1, std=0.05)
    qa, sa, _ = quantize_ref(x, fmt=fmt, group_size=G)  # on the GPU (torch ops; the same definition)
    qw, sw, _ = quantize_ref(w, fmt=fmt, group_size=G)
    return qa, sa, qw, sw


# (M, N, K, G, R, bias, out_dtype); rows_checked: the reference runs on these rows only (None: all)
GEMM_CASES = [
    (1, 1, 32, 32, 0, False, torch.float32),
    (7, 67, 96, 32, 3, True, torch.bfloat16),
    (129, 67, 1024, 64, 0, True, torch.float16),
    (129, 3072, 1024, 128, 17, False, torch.float32),
    (7, 3072, 3072, 3072, 0, True, torch.bfloat16),
    (129, 1, 96, 96, 64, True, torch.float32),
    (130, 131, 192, 96, 300, False, torch.float16),
    (4096, 67, 3072, 32, 0, False, torch.float32),
    (4096, 3072, 3072, 64, 32, True, torch.bfloat16),
]
GEMM_CASES_SMALL = [GEMM_CASES[1], GEMM_CASES[3], GEMM_CASES[6]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_quant_gemm_matches_reference(backend, fmt):
    if fmt == "fp8" and not _fp8_mma(backend):
        pytest.skip("fp8 GEMM needs compute capability 8.9+ on the CUDA backend")
    for i, (M, N, K, G, R, has_bias, out_dtype) in enumerate(_cases(backend, GEMM_CASES, GEMM_CASES_SMALL)):
        qa, sa, qw, sw = _operands(M, N, K, G, fmt, seed=10 * i + FORMATS.index(fmt), dtype=DTYPES[i % 3])
        bias = _rand((N,), DTYPES[(i + 1) % 3], i) if has_bias else None
        la = _rand((M, R), DTYPES[i % 3], i + 1) if R else None
        lu = _rand((R, N), DTYPES[(i + 2) % 3], i + 2, std=0.1) if R else None
        _poison(M * N, torch.float32)
        out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, bias=bias, lora_act=la, lora_up=lu,
                         out_dtype=out_dtype, backend=backend)
        rows = torch.arange(M, device=GPU)
        if M > 512:  # the float64 reference on 256 rows (first, last and spread)
            rows = torch.unique(torch.cat([rows[:64], rows[-64:], rows[torch.randperm(M, device=GPU)[:128]]]))
        sub = lambda t: None if t is None else t[rows]  # noqa: E731
        qa_r = qa.view(torch.uint8)[rows].view(qa.dtype)  # (byte view: fp8 has no CUDA gather everywhere)
        ref = quant_gemm_ref(qa_r, sa[rows], qw, sw, bias, sub(la), lu, fmt, G, out_dtype=None)
        mag = gemm_magnitude(qa_r, sa[rows], qw, sw, bias, sub(la), lu, fmt, G)
        n_terms = K // G + R + (G if fmt == "fp8" else 0)  # fp8: the MMA sums a group in fp32
        assert torch.isfinite(out).all(), f"{backend} {fmt} case {i}: non-finite output"
        check_gemm(out[rows], ref, mag, n_terms, out_dtype,
                    f"{backend} {fmt} M={M} N={N} K={K} G={G} R={R} bias={has_bias} {out_dtype}",
                    mma_rel=fp8_mma_rel(backend, fmt, GPU))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_gpu_quant_gemm_integer_accumulators_equal(backend, fmt):
    """Unit scales: out (fp32) is the exact integer dot product (every partial sum here is an integer
    below 2^24, so fp32 holds it exactly), per group and over groups."""
    g = torch.Generator(device=GPU).manual_seed(1)
    cases = [(1, 1, 32, 32), (7, 67, 96, 96), (129, 67, 1024, 1024), (129, 3072, 3072, 3072), (33, 131, 16384, 16384),
             (65, 130, 3072, 32), (65, 130, 3072, 64), (65, 130, 3072, 128), (65, 130, 3072, 96)]
    if backend == "triton":
        cases = [cases[2], cases[6]]
    for M, N, K, G in cases:
        if fmt == "int4":
            qa = torch.randint(0, 256, (M, K // 2), generator=g, device=GPU, dtype=torch.int32).to(torch.uint8)
            qw = torch.randint(0, 256, (N, K // 2), generator=g, device=GPU, dtype=torch.int32).to(torch.uint8)
        else:
            qa = torch.randint(-128, 128, (M, K), generator=g, device=GPU, dtype=torch.int32).to(torch.int8)
            qw = torch.randint(-128, 128, (N, K), generator=g, device=GPU, dtype=torch.int32).to(torch.int8)
        sa, sw = torch.ones(M, K // G, device=GPU), torch.ones(N, K // G, device=GPU)
        _poison(M * N)
        out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, out_dtype=torch.float32, backend=backend)
        exact = q_values(qa, fmt) @ q_values(qw, fmt).T  # float64, exact
        if G == K or exact.abs().max().item() < 2**23:
            assert torch.equal(out, exact.to(torch.float32)), f"{backend} {fmt} M={M} N={N} K={K} G={G}: " \
                f"max diff {(out.double() - exact).abs().max().item()}"


ADVERSARIAL = [("int4", 7, 7), ("int4", -8, -8), ("int4", 7, -8), ("int8", 127, 127), ("int8", -128, -128),
               ("int8", -128, 127), ("fp8", 448.0, 448.0), ("fp8", -448.0, 448.0), ("fp8", 2.0**-9, 448.0),
               ("fp8", -8.0, -8.0)]


def _filled(fmt, v, rows, K):
    if fmt == "fp8":
        return torch.full((rows, K), v, device=GPU).to(torch.float8_e4m3fn)
    if fmt == "int8":
        return torch.full((rows, K), v, dtype=torch.int8, device=GPU)
    nib = v & 0xF
    return torch.full((rows, K // 2), nib | (nib << 4), dtype=torch.uint8, device=GPU)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ADVERSARIAL, ids=lambda c: f"{c[0]}:{c[1]}x{c[2]}")
def test_gpu_quant_gemm_adversarial_extremes(backend, case):
    """Every product at the extreme of the format, K up to 16384: exact (every partial sum is
    representable in fp32 and the scales are powers of two), per group of 64 and as one group."""
    fmt, va, vw = case
    if fmt == "fp8" and not _fp8_mma(backend):
        pytest.skip("fp8 GEMM needs compute capability 8.9+ on the CUDA backend")
    Ks = (3072, 12288, 16384) if backend == "cuda" else (12288,)
    for K in Ks:
        for G in (64, K):
            M, N = 129, 67
            qa, qw = _filled(fmt, va, M, K), _filled(fmt, vw, N, K)
            sa = torch.full((M, K // G), 0.5, device=GPU)
            sw = torch.full((N, K // G), 2.0**-3, device=GPU)
            _poison(M * N)
            out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, out_dtype=torch.float32, backend=backend)
            exact = float(q_values(qa[:1, :2], fmt)[0, 0] * q_values(qw[:1, :2], fmt)[0, 0]) * K * 0.5 * 2.0**-3
            assert (out == exact).all(), f"{backend} {case} K={K} G={G}: " \
                f"{out.flatten()[(out != exact).flatten()][:4].tolist()} != {exact}"


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend on this GPU")
@pytest.mark.parametrize("i4dot,tile", [(1, ""), (2, ""), (3, ""), (3, "64x128")])
def test_gpu_int4_on_f16_and_e4m3_tensor_cores_bit_equal(i4dot, tile):
    """The Triton int4 GEMM on the f16 (1) or e4m3 (2, sm_89+) tensor cores gives the int8 path's
    output bit for bit at GPU tile shapes (random operands with bias and low-rank terms, and the
    fused quant_gemm_quant; groups of 64 and of 128, the widest the e4m3 path takes: Hopper's fp8
    accumulator keeps ~14 bits, and |D| <= 2^13 there), and the exact result for all -8 x -8 at
    K = 16384 (groups of 64, 128 and 4096, where the e4m3 request falls back to fp16).  ``tile``
    "64x128": the 4-warp 64x128 tile that fits two CTAs per SM (a bench row and tune candidate)."""
    from pydiff.triton_kernels import quant as tq

    cfg = {"i4dot": i4dot, **(dict(BM=64, BN=128, num_warps=4, num_stages=3) if tile else {})}

    M, N, K, R = 257, 384, 3072, 32
    b, la, lu = _rand((N,), torch.bfloat16, 3), _rand((M, R), torch.float32, 4), _rand((R, N), torch.bfloat16, 5)
    for G in (64, 128):
        qa, sa, _ = quantize(_rand((M, K), torch.bfloat16, 1), "int4", G, backend="triton")
        qw, sw, _ = quantize(_rand((N, K), torch.bfloat16, 2), "int4", G, backend="triton")
        for od in (torch.float32, torch.bfloat16):
            ref = tq.quant_gemm_triton(qa, sa, qw, sw, b, la, lu, "int4", G, od, _config={"i4dot": 0})
            out = tq.quant_gemm_triton(qa, sa, qw, sw, b, la, lu, "int4", G, od, _config=cfg)
            assert torch.equal(out, ref), (G, od, (out.float() - ref.float()).abs().max().item())
        args = (qa, sa, qw, sw, b, la, lu, None, None, "int4", G, "gelu_tanh", "int4", 64)
        ref = tq.quant_gemm_quant_triton(*args, _config={"i4dot": 0})
        out = tq.quant_gemm_quant_triton(*args, _config=cfg)
        assert all(torch.equal(x, y) for x, y in zip(out, ref)), G
    K = 16384
    q = _filled("int4", -8, 129, K)
    for G in (64, 128, 4096):
        ones = torch.ones(129, K // G, device=GPU)
        out = tq.quant_gemm_triton(q, ones, q[:67], ones[:67], None, None, None, "int4", G, torch.float32,
                                   _config=cfg)
        assert (out == 64.0 * K).all(), (G, out.flatten()[:4].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_quant_gemm_misaligned_and_noncontiguous(backend, fmt):
    """qa at an odd byte offset (the CUDA kernel's synchronous-load path), qw non-contiguous, lora_up
    transposed: the ops take contiguous copies or handle the offsets."""
    if fmt == "fp8" and not _fp8_mma(backend):
        pytest.skip("fp8 GEMM needs compute capability 8.9+ on the CUDA backend")
    M, N, K, G = 37, 67, 320, 64
    qa, sa, qw, sw = _operands(M, N, K, G, fmt, seed=5)
    buf = torch.empty(qa.numel() + 1, dtype=qa.dtype, device=GPU)
    qa_odd = buf[1:].view(qa.shape)
    qa_odd.copy_(qa)
    qw_nc = qw.T.contiguous().T  # same values, column-major
    la = _rand((M, 5), torch.float32, 6)
    lu_t = _rand((N, 5), torch.bfloat16, 7, std=0.1).T  # [5, N], non-contiguous
    bias = _rand((N,), torch.float16, 8)
    out = quant_gemm(qa_odd, sa, qw_nc, sw, fmt=fmt, group_size=G, bias=bias, lora_act=la, lora_up=lu_t,
                     out_dtype=torch.float32, backend=backend)
    ref = quant_gemm_ref(qa, sa, qw, sw, bias, la, lu_t, fmt, G, out_dtype=None)
    mag = gemm_magnitude(qa, sa, qw, sw, bias, la, lu_t, fmt, G)
    check_gemm(out, ref, mag, K // G + 5 + (G if fmt == "fp8" else 0), torch.float32, f"{backend} {fmt}",
               mma_rel=fp8_mma_rel(backend, fmt, GPU))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_quantize_then_gemm_end_to_end(backend):
    """A DiT-sized linear from float inputs: quantize (x and the weight) on the backend, then the GEMM
    with the low-rank branch; equal to the reference pipeline, and a good approximation of x W^T."""
    M, K, N, G, R = 512, 1152, 384, 64, 16
    x = _rand((M, K), torch.bfloat16, 1)
    w = _rand((N, K), torch.float32, 2, std=0.03)
    ld = _rand((K, R), torch.float32, 3, std=0.03)
    lu = _rand((R, N), torch.bfloat16, 4, std=0.1)
    for fmt in ("int4", "int8") + (("fp8",) if _fp8_mma(backend) else ()):
        qa, sa, la = quantize(x, fmt, G, lora_down=ld, backend=backend)
        qw, sw, _ = quantize(w, fmt, G, backend=backend)
        out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, lora_act=la, lora_up=lu, out_dtype=torch.float32,
                         backend=backend)
        ref = quant_gemm_ref(qa, sa, qw, sw, None, la, lu, fmt, G, out_dtype=None)
        mag = gemm_magnitude(qa, sa, qw, sw, None, la, lu, fmt, G)
        check_gemm(out, ref, mag, K // G + R + (G if fmt == "fp8" else 0), torch.float32, f"{backend} {fmt}",
                   mma_rel=fp8_mma_rel(backend, fmt, GPU))
        full = x.double() @ w.double().T + (x.double() @ ld.double()) @ lu.double()
        rel = ((out.double() - full).norm() / full.norm()).item()
        assert rel < {"int4": 0.2, "int8": 0.02, "fp8": 0.1}[fmt], f"{backend} {fmt}: relative error {rel:.3f}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_gpu_fused_mlp_low_rank(backend, dtype):
    """The W4A4 DiT MLP with the default rank-32 fc2 (M = 257 tokens, 384 -> 1536 -> 384): fc1's
    quant_gemm_quant writes fc2's int4 input and lora_act2 = (gelu(h) / smooth2) @ lora_down2 (each
    Triton tile adds its part with fp32 atomics); q within one step of the reference at ties, scales
    2e-6, lora_act2 within its fp32 bound; quantized_mlp (fused) vs the unfused chain."""
    from pydiff.quant import W4A4Linear, quantized_mlp, sqnr_db

    M, D, H, R = 257, 384, 1536, 32
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(D, H).to(GPU, dtype), torch.nn.Linear(H, D).to(GPU, dtype)
    fc1 = W4A4Linear.from_linear(lin1, rank=R, smooth=torch.rand(D, device=GPU) + 0.5)
    fc2 = W4A4Linear.from_linear(lin2, rank=R, smooth=torch.rand(H, device=GPU) + 0.5)
    assert fc1.can_feed(fc2)
    x = _rand((M, D), dtype, 5, std=1.5)
    qa, sa, la = quantize(x, "int4", 64, smooth=fc1.smooth, lora_down=fc1.lora_down, backend=backend)
    args = (qa, sa, fc1.qweight, fc1.wscales)
    kw = dict(bias=fc1.bias, lora_act=la, lora_up=fc1.lora_up, smooth=fc2.smooth, lora_down=fc2.lora_down)
    _poison(M * H)
    q, s, la2 = quant_gemm_quant(*args, fmt="int4", group_size=64, epilogue="gelu_tanh", backend=backend, **kw)
    qr, sr, lr = quant_gemm_quant_ref(*args, kw["bias"], la, fc1.lora_up, fc2.smooth, fc2.lora_down, "int4", 64,
                                      "gelu_tanh", "int4", 64)
    d = step_diff(q, qr, "int4")
    assert d.max().item() <= 1 and int((d > 0).sum()) <= max(8, d.numel() // 100000), f"{backend}: q"
    assert ((s.double() - sr.double()).abs() <= 2e-6 * sr.double().abs()).all(), f"{backend}: scales"
    check_lora_act2(la2, lr, *args, kw["bias"], la, fc1.lora_up, fc2.smooth, fc2.lora_down, "int4", 64, "gelu_tanh",
                    f"{backend} {dtype}")
    with pydiff.use_backend(backend):
        got = quantized_mlp(fc1, fc2, x)
        want = fc2(fc1(x), prologue="gelu_tanh")
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert sqnr_db(want.float(), got.float()) > (60 if dtype == torch.float32 else 30), backend


def test_gpu_int64_indexing():
    """M K > 2^31 (quantize and the GEMM's operand offsets) and M N > 2^31 (the GEMM's output): the
    last rows are right. CUDA backend only (the largest tensors are about 4 GiB)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip("needs about 14 GiB of free GPU memory")
    M, K = 65600, 32768  # M K = 2.15e9
    x = torch.randn((M, K), device=GPU, dtype=torch.bfloat16, generator=torch.Generator(device=GPU).manual_seed(1))
    q, s, _ = quantize(x, "int8", 64, backend="cuda")
    tail = slice(M - 3, M)
    qr, sr, _ = quantize_ref(x[tail].cpu(), fmt="int8", group_size=64)
    assert torch.equal(q[tail].cpu(), qr) and torch.equal(s[tail].cpu(), sr)
    del x
    qw, sw, _ = quantize_ref(_rand((16, K), torch.float32, 2), fmt="int8", group_size=64)
    out = quant_gemm(q, s, qw, sw, fmt="int8", group_size=64, out_dtype=torch.float32, backend="cuda")
    ref = quant_gemm_ref(q[tail], s[tail], qw, sw, fmt="int8", group_size=64, out_dtype=None)
    mag = gemm_magnitude(q[tail], s[tail], qw, sw, None, None, None, "int8", 64)
    check_gemm(out[tail], ref, mag, K // 64, torch.float32, "M K > 2^31")
    del q, s, out
    M2, N2, K2 = 70000, 32768, 32  # M N = 2.29e9
    qa, sa, _ = quantize_ref(_rand((M2, K2), torch.float32, 3), fmt="int4", group_size=32)
    qw, sw, _ = quantize_ref(_rand((N2, K2), torch.float32, 4), fmt="int4", group_size=32)
    out = quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=32, out_dtype=torch.float16, backend="cuda")
    ref = quant_gemm_ref(qa[-2:], sa[-2:], qw, sw, fmt="int4", group_size=32, out_dtype=None)
    mag = gemm_magnitude(qa[-2:], sa[-2:], qw, sw, None, None, None, "int4", 32)
    check_gemm(out[-2:], ref, mag, 1, torch.float16, "M N > 2^31")
    del out


# ---------------------------------------------------------------- errors, sync, graphs
def test_gpu_bad_device_mixes_raise():
    x = _rand((4, 64), torch.float32, 1)
    with pytest.raises(ValueError, match="smooth"):
        quantize(x, "int4", 32, smooth=torch.ones(64), backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match="smooth"):
        torch.ops.pydiff.quantize(x, torch.ones(64), None, None, None, "int4", 32, "none", 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="lora_down"):
        torch.ops.pydiff.quantize(x, None, torch.ones(64, 2), None, None, "int4", 32, "none", 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="x"):
        torch.ops.pydiff.quantize(x.cpu(), torch.ones(64, device=GPU), None, None, None, "int4", 32, "none", 1e-6)
    qa, sa, qw, sw = _operands(3, 5, 64, 32, "int4", 2)
    with pytest.raises(ValueError, match="sa"):
        quant_gemm(qa, sa.cpu(), qw, sw, fmt="int4", group_size=32, backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match="sw"):
        torch.ops.pydiff.quant_gemm(qa, sa, qw, sw.cpu(), None, None, None, "int4", 32, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="bias"):
        torch.ops.pydiff.quant_gemm(qa, sa, qw, sw, torch.ones(5), None, None, "int4", 32, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="qw"):
        torch.ops.pydiff.quant_gemm(qa, sa, qw.cpu(), sw, None, None, None, "int4", 32, torch.float32)
    qa, sa, qw, sw = _operands(3, 64, 64, 32, "int4", 3)
    with pytest.raises(ValueError, match="lora_down"):
        quant_gemm_quant(qa, sa, qw, sw, fmt="int4", group_size=32, lora_down=torch.ones(64, 2), backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match="lora_down"):
        torch.ops.pydiff.quant_gemm_quant(qa, sa, qw, sw, None, None, None, None, torch.ones(64, 2), "int4", 32,
                                          "none", "int4", 32)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 9),
                    reason="the fp8 refusal is for GPUs below compute capability 8.9")
def test_gpu_fp8_gemm_refused_below_sm89():
    qa, sa, qw, sw = _operands(3, 5, 64, 32, "fp8", 2)
    with pytest.raises(RuntimeError, match="fp8"):
        quant_gemm(qa, sa, qw, sw, fmt="fp8", group_size=32, backend="cuda")


def test_gpu_no_host_sync_and_cuda_graph():
    x = _rand((96, 320), torch.bfloat16, 1)
    ld = _rand((320, 8), torch.float32, 2, std=0.1)
    lu = _rand((8, 48), torch.float32, 3, std=0.1)
    qw, sw, _ = quantize_ref(_rand((48, 320), torch.float32, 4, std=0.05), fmt="int4", group_size=64)
    args_q = (x, None, ld, None, None, "int4", 64, "gelu_tanh", 1e-6)
    # the fused MLP's producer with a low-rank consumer (the CUDA composition): N = 64, lora_down [64, 4]
    qw2, sw2, _ = quantize_ref(_rand((64, 320), torch.float32, 5, std=0.05), fmt="int4", group_size=64)
    lu2 = _rand((8, 64), torch.float32, 6, std=0.1)
    ld2 = _rand((64, 4), torch.bfloat16, 7, std=0.1)

    def step():
        q, s, la = torch.ops.pydiff.quantize(*args_q)
        out = torch.ops.pydiff.quant_gemm(q, s, qw, sw, None, la, lu, "int4", 64, torch.bfloat16)
        qh, sh, la2 = torch.ops.pydiff.quant_gemm_quant(q, s, qw2, sw2, None, la, lu2, None, ld2, "int4", 64,
                                                        "gelu_tanh", "int4", 32)
        return out, qh, sh, la2

    want = step()  # warm-up (and the reference result)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            got = step()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_gpu_auto_backend_of_quant_gemm():
    """``auto`` (no backend named): the Triton kernel on Hopper (measured faster there), the CUDA
    kernel elsewhere; bit-identical to naming that backend."""
    M, N, K, G = 129, 384, 1024, 64
    hopper = torch.cuda.get_device_capability()[0] == 9 and "triton" in BACKENDS
    for fmt in FORMATS:
        if fmt == "fp8" and not _fp8_mma("cuda"):
            continue
        qa, sa, qw, sw = _operands(M, N, K, G, fmt, seed=11)
        out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, out_dtype=torch.float32)
        want = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, out_dtype=torch.float32,
                          backend="triton" if hopper else "cuda")
        assert torch.equal(out, want), (fmt, hopper)


def test_gpu_auto_backend_of_quantize():
    """``auto``: the Triton quantizer on Hopper (measured 2-3x faster there), the CUDA one elsewhere;
    q and scales bit-identical to naming that backend (and to each other)."""
    hopper = torch.cuda.get_device_capability()[0] == 9 and "triton" in BACKENDS
    x = torch.randn(37, 320, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)).bfloat16()
    for fmt in ("int4", "int8"):
        got = quantize(x, fmt, 64)
        want = quantize(x, fmt, 64, backend="triton" if hopper else "cuda")
        other = quantize(x, fmt, 64, backend="cuda")
        for a, b, c in zip(got[:2], want[:2], other[:2]):
            assert torch.equal(a, b) and torch.equal(a, c), (fmt, hopper)


def _epilogue_inputs(M, N, R, seed):
    """bias [N] and the low-rank factors lora_act [M, R], lora_up [R, N] (None at R = 0), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bias = torch.randn(N, device="cuda", generator=g)
    la = torch.randn(M, R, device="cuda", generator=g) if R else None
    lu = torch.randn(R, N, device="cuda", generator=g) if R else None
    return bias, la, lu


def _check_int4_vs_ref(out, qa, sa, qw, sw, G, bias, la, lu, tol=1e-5, rows=64):
    """The first ``rows`` rows of an int4 quant_gemm output against the float64 reference (CPU)."""
    rows = min(rows, out.shape[0])
    ref = quant_gemm_ref(qa[:rows].cpu(), sa[:rows].cpu(), qw.cpu(), sw.cpu(), fmt="int4", group_size=G,
                         bias=bias.cpu(), lora_act=None if la is None else la[:rows].cpu(),
                         lora_up=None if lu is None else lu.cpu(), out_dtype=None)
    assert torch.allclose(out[:rows].cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs the compiled CUDA kernels")
@pytest.mark.parametrize("M,N,K,G,R", [(130, 131, 320, 64, 5), (7, 3072, 3072, 3072, 0), (257, 129, 12288, 128, 32)])
def test_gpu_native_int4_mma_equals_int8_path(monkeypatch, M, N, K, G, R):
    """The CUDA kernel's native 4-bit MMA (mma.sync m16n8k64 .s4: the default on sm_8x; forced here
    with PYDIFF_CUDA_INT4_MMA=1, on Hopper it runs emulated and slow) against the unpacked int8 path
    (PYDIFF_CUDA_INT4_MMA=0): the same exact group sums, so the outputs are equal bit for bit; and
    both against the reference.  This is how the fragment layout of the .s4 path is checked on
    hardware (the CPU emulator checks it against the PTX ISA's description in CI)."""
    qa, sa, qw, sw = _operands(M, N, K, G, "int4", seed=31)
    bias, la, lu = _epilogue_inputs(M, N, R, seed=32)
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("PYDIFF_CUDA_INT4_MMA", mode)
        outs[mode] = quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=G, bias=bias, lora_act=la, lora_up=lu,
                                out_dtype=torch.float32, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(outs["1"], outs["0"])
    _check_int4_vs_ref(outs["1"], qa, sa, qw, sw, G, bias, la, lu)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs the compiled CUDA kernels")
def test_gpu_w4a4_linear_torch_compile_fullgraph():
    """A W4A4 linear with its adaLN prologue and rank-32 branch compiles in one graph on the GPU
    (on Hopper ``auto`` runs Triton in eager mode and the registered CUDA ops under compile), and
    the compiled output matches eager to the fp32 epilogue's rounding (the two backends order the
    per-group scale products differently) rounded to bf16."""
    from pydiff.quant import W4A4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192).cuda()
    layer = W4A4Linear.from_linear(lin, group_size=64, rank=32)
    x = torch.randn(3, 37, 256, device="cuda").bfloat16()
    shift, scale = torch.randn(3, 256, device="cuda"), torch.randn(3, 256, device="cuda") * 0.1

    def fn(x, shift, scale):
        return layer(x, prologue="layernorm", shift=shift, scale=scale)

    ref = fn(x, shift, scale)
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(x, shift, scale)
    torch.cuda.synchronize()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def _ran_kernel(fn, name: str) -> bool:
    """Whether a CUDA kernel whose name contains ``name`` ran during ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any(name in e.name for e in prof.events())


@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs the compiled CUDA kernels")
@pytest.mark.parametrize("M,N,K,G,R,out_dtype,extreme", [
    (1, 1, 64, 64, 0, torch.float32, False),
    (130, 131, 320, 64, 5, torch.float32, False),
    (257, 129, 16384, 64, 32, torch.bfloat16, False),
    (67, 257, 1024, 64, 0, torch.float16, False),
    (4096, 3072, 3072, 64, 32, torch.bfloat16, False),
    (130, 70, 384, 128, 3, torch.float32, False),
    (3, 5, 16384, 64, 0, torch.float32, True),  # every product -8 x -8: each group sum 4096
    (3, 5, 16384, 16384, 0, torch.float32, True),  # one group: |D| = 2^20 in the fp32 accumulators
])
def test_gpu_wgmma_kernel_equals_mma_sync_kernel(monkeypatch, M, N, K, G, R, out_dtype, extreme):
    """The Hopper warpgroup-MMA W4A4 kernel (opt-in, PYDIFF_CUDA_WGMMA=1; int4, groups of 64k up to
    16384, f16 wgmma with fp32 accumulators) against the mma.sync int8 kernel: the same exact group sums and the
    same fp32 epilogue operations, so equal bit for bit; and against the reference.  The profiler
    confirms which kernel ran.  This is the hardware check of the descriptors and the fragment layout
    (the CPU emulator checks them against the PTX ISA's description in CI)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warpgroup-MMA kernel runs on compute capability 9.0 (Hopper) only")
    if "9.0a" not in pydiff._ext.cuda_archs():
        pytest.skip(f"pydiff was built without an sm_90a image (archs {pydiff._ext.cuda_archs()!r})")
    if extreme:
        qa = torch.full((M, K // 2), 0x88, dtype=torch.uint8, device="cuda")
        qw = torch.full((N, K // 2), 0x88, dtype=torch.uint8, device="cuda")
        sa = torch.ones(M, K // G, device="cuda")
        sw = torch.ones(N, K // G, device="cuda")
    else:
        qa, sa, qw, sw = _operands(M, N, K, G, "int4", seed=41)
    bias, la, lu = _epilogue_inputs(M, N, R, seed=42)
    outs = {}
    for mode in ("1", "2", "0"):  # the two tile layouts (no swizzle, 128-byte swizzle), then mma.sync
        monkeypatch.setenv("PYDIFF_CUDA_WGMMA", mode)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=out_dtype)

        def run():
            out.copy_(quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=G, bias=bias, lora_act=la, lora_up=lu,
                                 out_dtype=out_dtype, backend="cuda"))

        assert _ran_kernel(run, "quant_gemm_wgmma_kernel") == (mode != "0"), mode
        outs[mode] = out.clone()
    for mode in ("1", "2"):
        if not torch.equal(outs[mode], outs["0"]):
            bad = (outs[mode] != outs["0"]).nonzero()[:8].tolist()
            monkeypatch.setenv("PYDIFF_CUDA_WGMMA", mode)
            pytest.fail(f"wgmma kernel (layout {mode}) != mma.sync kernel at {bad} (of "
                        f"{int((outs[mode] != outs['0']).sum())}); single-element probes (m, n, k) -> nonzero "
                        f"outputs:\n{_wgmma_probes()}")
    _check_int4_vs_ref(outs["1"], qa, sa, qw, sw, G, bias, la, lu,
                       tol={torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[out_dtype])


def _wgmma_probes() -> str:
    """Diagnosis for a failing wgmma test (needs PYDIFF_CUDA_WGMMA=1 or 2): one chunk (M = N = 128, K = 64),
    qa[m, ka] = 1 and qw[n, kw] = 1, everything else 0, unit scales; the right answer is a single
    1 at (m, n) when ka == kw and all zeros otherwise. Where the ones land tells which of the
    descriptor strides or fragment indices is off."""
    lines = []
    for m, n, ka, kw in [(0, 0, 0, 0), (1, 0, 0, 0), (8, 0, 0, 0), (16, 0, 0, 0), (64, 0, 0, 0), (0, 1, 0, 0),
                         (0, 8, 0, 0), (0, 64, 0, 0), (0, 0, 1, 1), (0, 0, 8, 8), (0, 0, 16, 16), (0, 0, 32, 32),
                         (37, 101, 45, 45), (0, 0, 0, 1), (0, 0, 0, 8), (0, 0, 0, 16)]:
        qa = torch.zeros(128, 32, dtype=torch.uint8)
        qw = torch.zeros(128, 32, dtype=torch.uint8)
        qa[m, ka // 2] = 1 << (4 * (ka % 2))
        qw[n, kw // 2] = 1 << (4 * (kw % 2))
        ones = torch.ones(128, 1, device="cuda")
        out = quant_gemm(qa.cuda(), ones, qw.cuda(), ones, fmt="int4", group_size=64, out_dtype=torch.float32,
                         backend="cuda")
        nz = out.nonzero().tolist()
        lines.append(f"  m={m} n={n} ka={ka} kw={kw}: {nz[:4]}{' ...' if len(nz) > 4 else ''}"
                     f" values {out[out != 0][:4].tolist()}")
    return "\n".join(lines)


@pytest.mark.parametrize("fmt", ("int4", "int8"))
@pytest.mark.parametrize("M,N,K", [(300, 260, 1024), (4096, 384, 3072)])
def test_gpu_triton_fast_precision_at_gpu_tiles(fmt, M, N, K):
    """quant_gemm(precision="fast") on the GPU's default tile (FAST_TILE: k-steps of 128 channels over
    two groups) against its float64 definition (first 64 rows) within fp32 accumulation error, and
    against the exact GEMM within the fp16 operand rounding."""
    from pydiff.reference.quant import fast_operands_ref, quant_gemm_fast_ref

    if not triton_quant_ok():
        pytest.skip("triton is not importable")
    G = 64
    qa, sa, qw, sw = _operands(M, N, K, G, fmt, seed=M + K)
    sa = sa * torch.exp2(torch.randint(-30, 31, (M, 1), device=GPU).float())  # rows far outside fp16's range
    bias, la, lu = _epilogue_inputs(M, N, 8, seed=3)
    out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, bias=bias, lora_act=la, lora_up=lu,
                     out_dtype=torch.float32, backend="triton", precision="fast")
    r = 64
    args = (qa[:r].cpu(), sa[:r].cpu(), qw.cpu(), sw.cpu(), bias.cpu(), la[:r].cpu(), lu.cpu(), fmt, G)
    ref = quant_gemm_fast_ref(*args, None)
    a16, ra = fast_operands_ref(args[0], args[1], fmt, G)
    w16, rw = fast_operands_ref(args[2], args[3], fmt, G)
    mag = (a16.double().abs() @ w16.double().abs().T) * ra.double()[:, None] * rw.double()[None, :] \
        + args[5].double().abs() @ args[6].double().abs() + args[4].double().abs()
    err = (out[:r].cpu().double() - ref).abs()
    assert (err <= 2.0**-14 * mag).all(), f"max error / magnitude {(err / mag).max().item():.2e}"
    exact = quant_gemm_ref(*args, None)
    assert ((out[:r].cpu().double() - exact).abs() <= 2.0**-9 * mag * 1.01).all()
