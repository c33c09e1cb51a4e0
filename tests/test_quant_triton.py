"""Triton kernels of the quantization ops (triton_kernels/quant.py) against the float64 references of
pydiff/reference/quant.py.  Without a GPU they run in Triton's interpreter on CPU tensors (CI);
with one, the same tests run on the GPU.  The GPU-only code paths (libdevice rint, int8 / fp8
tensor-core dots, native bf16 stores, the GPU block shapes) are compiled ahead of time for sm_80,
sm_89 and sm_90 by test_gpu_compile, which needs no GPU.

Standards checked: q and scales bit-equal to the reference for prologue "none" (rounding half to
even, e4m3 round-to-nearest-even incl. subnormals and ties, int4 packing, NaN/inf groups);
gelu_tanh / layernorm within one quantization step at a handful of elements; quant_gemm exact in
its integer group sums (unit scales: the fp32 output equals the integer dot; adversarial +7x+7,
-8x-8, +127/-128 at K = 4096) and within fp32 epilogue rounding of the reference otherwise; every
output element written (outputs allocated poisoned).
"""
import os

import pytest
import torch
from _aot import ptxas_path, run_script
from _quant_util import fp8_mma_rel

from pydiff.reference.quant import (
    QMAX,
    dequantize_ref,
    pack_int4,
    q_values,
    fast_operands_ref,
    quant_gemm_fast_ref,
    quant_gemm_ref,
    quantize_ref,
    quantize_values,
)

tq = pytest.importorskip("pydiff.triton_kernels.quant")

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
FMTS = ("int4", "int8", "fp8")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Outputs come from an allocator that fills them with NaN (floats) or random bytes (ints)."""
    gen = torch.Generator().manual_seed(1234)

    def empty(shape, *, device=None, dtype=None):
        t = torch.empty(shape, device=device, dtype=dtype)
        if t.dtype.is_floating_point and t.element_size() > 1:
            t.fill_(float("nan"))
        else:
            raw = torch.randint(0, 256, (t.numel(),), generator=gen, dtype=torch.uint8)
            t.view(-1).view(torch.uint8).copy_(raw.to(t.device)) if t.numel() else None
        return t

    monkeypatch.setattr(tq, "_empty", empty)


def _randn(shape, seed, dtype=torch.float32, spread=True):
    """Random data with a different magnitude per 32-channel block (so groups get distinct scales)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if spread and len(shape) == 2 and shape[1] % 32 == 0:
        mag = torch.exp2(torch.randint(-3, 4, (shape[0], shape[1] // 32), generator=g).double())
        x = x * mag.repeat_interleave(32, dim=1)
    return x.to(dtype).to(DEV)


def _q_bits(q):
    return q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q


def _assert_bits_equal(out, ref, what):
    q, s, la = out
    qr, sr, lr = ref
    assert q.dtype == qr.dtype and q.shape == qr.shape, \
        f"{what}: q {q.dtype}{tuple(q.shape)} vs {qr.dtype}{tuple(qr.shape)}"
    bad = (_q_bits(q) != _q_bits(qr)).nonzero()
    assert bad.numel() == 0, f"{what}: q differs at {bad[:5].tolist()} ({bad.shape[0]} elements)"
    assert s.dtype == torch.float32 and s.shape == sr.shape
    assert torch.equal(s.isnan(), sr.isnan()), f"{what}: NaN scales differ"
    assert torch.equal(torch.nan_to_num(s), torch.nan_to_num(sr)), f"{what}: scales differ"


def _check_lora(la, x_y, ld, what):
    """lora_act against the float64 product of the (reference) prologue output and lora_down."""
    y64, ld64 = x_y.double(), ld.double()
    ref = y64 @ ld64
    mag = y64.abs() @ ld64.abs()
    assert la.dtype == torch.float32 and la.shape == ref.shape
    err = (la.double() - ref).abs()
    assert (err <= 2e-6 * mag + 1e-30).all(), f"{what}: lora_act error {(err / (mag + 1e-30)).max().item():.2e}"


# ---------------------------------------------------------------- quantize, prologue none: bit-exact
QUANT_CASES = [  # (M, K, G)
    (1, 32, 32), (3, 96, 32), (37, 320, 64), (5, 320, 320), (3, 96, 96), (2, 1024, 512),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,K,G", QUANT_CASES)
def test_quantize_bit_exact(fmt, M, K, G):
    dt = DTYPES[(M + K) % 3]
    x = _randn((M, K), seed=M * 1000 + K, dtype=dt)
    smooth = (torch.rand(K, generator=torch.Generator().manual_seed(K)) + 0.5).to(DEV) if M % 2 else None
    out = tq.quantize_triton(x, smooth, None, None, None, fmt, G, "none", 1e-6)
    ref = quantize_ref(x, smooth, None, None, None, fmt, G, "none", 1e-6)
    _assert_bits_equal(out, ref, f"{fmt} {dt} M={M} K={K} G={G}")
    assert out[2].shape == (M, 0)


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_lora_and_strides(fmt):
    """Non-contiguous x (column stride M), smoothing and the fused lora down-projection (R = 5)."""
    M, K, G, R = 37, 320, 64, 5
    x = _randn((K, M), seed=7).t()
    smooth = (torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEV)
    ld = _randn((K, R), seed=8, dtype=torch.bfloat16, spread=False)
    out = tq.quantize_triton(x, smooth, ld, None, None, fmt, G, "none", 1e-6)
    ref = quantize_ref(x, smooth, ld, None, None, fmt, G, "none", 1e-6)
    _assert_bits_equal(out, ref, fmt)
    _check_lora(out[2], x.float() / smooth, ld.float(), fmt)


def _ties(fmt):
    """Rows whose scale is exactly 1 (amax = QMAX) and whose other values sit on rounding ties."""
    if fmt == "fp8":
        vals = [448.0, 432.0, -432.0, 1.0625, 1.1875, -1.1875, 3 * 2.0 ** -10, 2.0 ** -10, -2.0 ** -10, -0.0,
                2.0 ** -7 * 1.0625, 15.5, 17.0, 0.0, -3.0, 2.0 ** -6 - 2.0 ** -11]
    else:
        q = QMAX[fmt]
        vals = [q, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -3.5, 3.5, 4.5, -q, 6.5 if q == 7 else 100.5, -0.0, 0.49999997,
                -6.5 if q == 7 else -126.5, 0.0]
    row = torch.tensor(vals * 2, dtype=torch.float32)
    return torch.stack([row, row.flip(0)]).to(DEV)


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_ties_nan_inf_zero(fmt):
    """Half-to-even ties, e4m3 ties / subnormals / signed zero, and groups holding NaN, inf or only
    zeros (scale NaN, NaN, 0; q = 0) against the reference (torch's own e4m3 cast)."""
    t = _ties(fmt)
    x = torch.cat([t, torch.randn(2, 32, device=DEV) * 3, torch.zeros(1, 32, device=DEV)], dim=0)  # [5, 32]
    x = torch.cat([x, x.flip(0) * 0.25], dim=1)  # [5, 64]: two groups of 32
    x[2, 3] = float("nan")
    x[3, 40] = float("inf")
    x[1, 50] = float("-inf")
    out = tq.quantize_triton(x, None, None, None, None, fmt, 32, "none", 1e-6)
    ref = quantize_ref(x, None, None, None, None, fmt, 32, "none", 1e-6)
    _assert_bits_equal(out, ref, fmt)
    s = out[1].cpu()
    assert s[2, 0].isnan() and s[3, 1].isnan() and s[1, 1].isnan() and s[4, 0] == 0


# ---------------------------------------------------------------- quantize with a prologue
def _steps(q, qr, fmt):
    """Per-element distance in quantization steps between two quantized tensors."""
    if fmt == "fp8":
        a, b = q.double(), qr.double()
        m = torch.maximum(a.abs(), b.abs()).clamp_min(2.0 ** -6)
        ulp = torch.exp2(torch.floor(torch.log2(m)) - 3)
        return (a - b).abs() / ulp
    return (q_values(q, fmt) - q_values(qr, fmt)).abs()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("prologue,M,K,G,B,R", [
    ("gelu_tanh", 37, 320, 64, 0, 0), ("gelu_tanh", 3, 96, 96, 0, 4),
    ("layernorm", 37, 320, 64, 1, 0), ("layernorm", 6, 96, 32, 3, 3), ("layernorm", 1, 320, 320, 0, 0),
])
def test_quantize_prologue(fmt, prologue, M, K, G, B, R):
    """Prologue in fp32 (kernel: exp form of tanh-GELU; LayerNorm statistics in fp32) vs the
    reference (torch.tanh; float64 statistics): scales to a few ulp, q within one step at a
    handful of elements, lora_act to fp32 accuracy."""
    dt = DTYPES[M % 3]
    x = (_randn((M, K), seed=M + K, dtype=torch.float64) * 2 + 0.5).to(dt)
    shift = _randn((B, K), seed=11, dtype=torch.bfloat16, spread=False) if B else None
    scale = (_randn((B, K), seed=12, dtype=torch.bfloat16, spread=False) * 0.3) if B else None
    ld = _randn((K, R), seed=13, spread=False) if R else None
    smooth = (torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5).to(DEV) if B == 3 else None
    q, s, la = tq.quantize_triton(x, smooth, ld, shift, scale, fmt, G, prologue, 1e-5)
    qr, sr, lr = quantize_ref(x, smooth, ld, shift, scale, fmt, G, prologue, 1e-5)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape
    rel = ((s.double() - sr.double()).abs() / sr.double()).max().item()
    assert rel < 2e-6, f"scales differ by {rel:.2e} relative"
    steps = _steps(q, qr, fmt)
    assert steps.max().item() <= 1.0, f"q differs by {steps.max().item()} steps"
    n_diff = int((steps > 0).sum())
    assert n_diff <= max(4, q.numel() // 500), f"q differs at {n_diff} of {q.numel()} elements"
    if R:
        from pydiff.reference.quant import prologue_ref
        y = prologue_ref(x, prologue, shift, scale, 1e-5)
        if smooth is not None:
            y = y / smooth
        _check_lora(la, y, ld, prologue)


# ---------------------------------------------------------------- the GPU block shapes, in the interpreter
@pytest.mark.parametrize("fmt", ("int4", "fp8"))
@pytest.mark.parametrize("cfg,M,K,G,R,prologue", [
    (dict(BM=4, GPC=4, GB=128, NSUB=1, SPLITS=2), 9, 96 * 5, 96, 0, "none"),  # masked groups, K split
    (dict(BM=2, GPC=1, GB=64, NSUB=5), 3, 640, 320, 0, "gelu_tanh"),  # two-pass wide groups
    (dict(BM=16, GPC=1, GB=64, NSUB=1, BR=16, LNB=64), 17, 192, 64, 7, "layernorm"),  # GPU lora shapes
    (dict(BM=16, GPC=1, GB=32, NSUB=4, BR=16), 5, 256, 128, 3, "none"),  # two-pass with lora
    # lora with the tiles split over programs: partial down-projections in a [splits, M, R] workspace
    (dict(BM=4, GPC=1, GB=64, NSUB=1, BR=16, SPLITS=3), 9, 64 * 7, 64, 5, "none"),  # 7 tiles: 3 + 3 + 1
    (dict(BM=8, GPC=2, GB=64, NSUB=1, BR=16, SPLITS=2), 3, 64 * 6, 64, 16, "gelu_tanh"),
    (dict(BM=16, GPC=1, GB=32, NSUB=4, BR=16, SPLITS=2), 5, 256 * 2, 128, 3, "none"),  # two-pass, split
])
def test_quantize_gpu_shapes(fmt, cfg, M, K, G, R, prologue):
    x = _randn((M, K), seed=M + 2 * K, dtype=torch.bfloat16)
    ld = _randn((K, R), seed=3, spread=False) if R else None
    out = tq.quantize_triton(x, None, ld, None, None, fmt, G, prologue, 1e-6, _config=cfg)
    ref = quantize_ref(x, None, ld, None, None, fmt, G, prologue, 1e-6)
    if prologue == "none":
        _assert_bits_equal(out, ref, str(cfg))
    else:
        assert _steps(out[0], ref[0], fmt).max().item() <= 1.0
        assert (out[1] - ref[1]).abs().max().item() <= 2e-6 * ref[1].abs().max().item()
    if R:
        from pydiff.reference.quant import prologue_ref
        _check_lora(out[2], prologue_ref(x, prologue), ld, str(cfg))


# ---------------------------------------------------------------- quant_gemm
def _operands(fmt, M, N, K, G, seed, R=0, bias=False, dt=torch.float32):
    qa, sa, _ = quantize_ref(_randn((M, K), seed, dt), fmt=fmt, group_size=G)
    qw, sw, _ = quantize_ref(_randn((N, K), seed + 1, dt), fmt=fmt, group_size=G)
    la = _randn((M, R), seed + 2, spread=False) if R else None
    lu = _randn((R, N), seed + 3, dt, spread=False) if R else None
    b = _randn((N,), seed + 4, dt, spread=False) if bias else None
    return qa, sa, qw, sw, b, la, lu


def _gemm_bound(qa, sa, qw, sw, b, la, lu, fmt, G):
    """Magnitude for the fp32 epilogue tolerance: sum of |terms| in float64."""
    A = dequantize_ref(qa, sa, fmt, G).abs()
    W = dequantize_ref(qw, sw, fmt, G).abs()
    mag = A @ W.T
    if la is not None:
        mag = mag + la.double().abs() @ lu.double().abs()
    if b is not None:
        mag = mag + b.double().abs()[None, :]
    return mag


GEMM_CASES = [  # (M, N, K, G, R, bias)
    (1, 1, 32, 32, 0, False), (3, 5, 96, 32, 2, True), (37, 67, 320, 64, 0, True),
    (3, 67, 320, 320, 5, False), (37, 5, 96, 96, 3, True), (1, 67, 96, 96, 0, False),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K,G,R,bias", GEMM_CASES)
def test_quant_gemm(fmt, M, N, K, G, R, bias):
    dt = DTYPES[(M + N + K) % 3]
    ops = _operands(fmt, M, N, K, G, seed=M * 100 + N + K, R=R, bias=bias, dt=dt)
    ref = quant_gemm_ref(*ops, fmt=fmt, group_size=G, out_dtype=None)
    mag = _gemm_bound(*ops, fmt, G)
    out = tq.quant_gemm_triton(*ops, fmt, G, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    err = (out.double() - ref).abs()
    tol = 1e-5 + fp8_mma_rel("triton", fmt, DEV)
    assert (err <= tol * mag + 1e-30).all(), f"max relative error {(err / (mag + 1e-30)).max().item():.2e}"
    # fp16 / bf16 outputs: the same fp32 accumulator, rounded to nearest even on the store
    for od in (torch.float16, torch.bfloat16):
        o = tq.quant_gemm_triton(*ops, fmt, G, od)
        assert o.dtype == od
        assert torch.equal(o.view(torch.int16), out.to(od).view(torch.int16)), f"{od} store differs from rounding fp32"


def test_quant_gemm_nan_scales_and_edges():
    """A NaN scale (a group that held NaN/inf) makes its output row NaN, as in the reference; M/N
    edge tiles with the interpreter's minimum tile of 16 and the GPU tile shapes."""
    fmt, M, N, K, G = "int4", 19, 21, 128, 64
    qa, sa, qw, sw, b, la, lu = _operands(fmt, M, N, K, G, seed=99, R=3, bias=True)
    sa[4, 1] = float("nan")
    ref = quant_gemm_ref(qa, sa, qw, sw, b, la, lu, fmt, G, None)
    for cfg in (None, dict(BM=16, BN=16, BK=32, BR=16, GROUP_M=2), dict(BM=16, BN=64, BK=64, GROUP_M=1)):
        out = tq.quant_gemm_triton(qa, sa, qw, sw, b, la, lu, fmt, G, torch.float32, _config=cfg)
        assert torch.equal(out.isnan(), ref.isnan()) and out[4].isnan().all()
        fin = ~ref.isnan()
        assert torch.allclose(out.double()[fin], ref[fin], rtol=1e-5, atol=1e-5 * ref[fin].abs().max().item())


@pytest.mark.parametrize("fmt", ("int4", "int8"))
@pytest.mark.parametrize("G", (32, 96, "K"))
def test_quant_gemm_exact_integers(fmt, G):
    """Unit scales and no epilogue terms: the fp32 output equals the exact integer dot (|D| < 2^24)."""
    M, N, K = 3, 5, 192
    G = K if G == "K" else G
    g = torch.Generator().manual_seed(G)
    lo, hi = (-8, 8) if fmt == "int4" else (-128, 128)
    a = torch.randint(lo, hi, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8)
    exact = a.long() @ w.long().T
    qa, qw = (pack_int4(a), pack_int4(w)) if fmt == "int4" else (a, w)
    ones = lambda r: torch.ones(r, K // G, device=DEV)  # noqa: E731
    out = tq.quant_gemm_triton(qa.to(DEV), ones(M), qw.to(DEV), ones(N), None, None, None, fmt, G, torch.float32)
    assert torch.equal(out.cpu().double(), exact.double())


@pytest.mark.parametrize("fmt,va,vw,G", [
    ("int4", 7, 7, 4096), ("int4", -8, -8, 4096), ("int4", -8, 7, 64),
    ("int8", 127, 127, 4096), ("int8", -128, -128, 4096), ("int8", -128, 127, 64), ("int8", -128, -128, 128),
])
def test_quant_gemm_adversarial(fmt, va, vw, G):
    """All-extreme operands at K = 4096 with unit scales: every int32 group sum is exact, the fp32
    output equals K va vw (exactly representable) in every element."""
    M, N, K = 2, 3, 4096
    a = torch.full((M, K), va, dtype=torch.int8)
    w = torch.full((N, K), vw, dtype=torch.int8)
    qa, qw = (pack_int4(a), pack_int4(w)) if fmt == "int4" else (a, w)
    out = tq.quant_gemm_triton(qa.to(DEV), torch.ones(M, K // G, device=DEV), qw.to(DEV),
                               torch.ones(N, K // G, device=DEV), None, None, None, fmt, G, torch.float32)
    assert (out == float(K * va * vw)).all(), f"{out.flatten()[:4].tolist()} != {K * va * vw}"


@pytest.mark.parametrize("i4dot", (1, 2, 3))
def test_int4_on_f16_and_e4m3_tensor_cores_equals_int8_path(i4dot):
    """``i4dot`` 1 / 2 (int4 unpacked to fp16, and on sm_89+ to e4m3, fp32 group sums) give the
    int8 path's output bit for bit: random operands with bias and low-rank terms, an odd group sum
    above fp16's exact range (49 * 63 = 3087), all -8 x -8 at K = 4096 in one group, and the fused
    quant_gemm_quant epilogue.  (In the interpreter 2 runs as 1; the GPU test runs both.)"""
    for M, N, K, G, R, bias in GEMM_CASES:
        ops = _operands("int4", M, N, K, G, seed=7 * M + N, R=R, bias=bias)
        ref = tq.quant_gemm_triton(*ops, "int4", G, torch.float32)
        out = tq.quant_gemm_triton(*ops, "int4", G, torch.float32, _config={"i4dot": i4dot})
        assert torch.equal(out, ref), (M, N, K, G)
    a = torch.full((2, 64), 7, dtype=torch.int8)
    a[:, -1] = 0
    w = torch.full((3, 64), 7, dtype=torch.int8)
    out = tq.quant_gemm_triton(pack_int4(a).to(DEV), torch.ones(2, 1, device=DEV), pack_int4(w).to(DEV),
                               torch.ones(3, 1, device=DEV), None, None, None, "int4", 64, torch.float32,
                               _config={"i4dot": i4dot})
    assert (out == 3087.0).all()
    a = torch.full((2, 4096), -8, dtype=torch.int8)
    out = tq.quant_gemm_triton(pack_int4(a).to(DEV), torch.ones(2, 1, device=DEV), pack_int4(a).to(DEV),
                               torch.ones(2, 1, device=DEV), None, None, None, "int4", 4096, torch.float32,
                               _config={"i4dot": i4dot})
    assert (out == 4096.0 * 64).all()
    qa, sa, qw, sw, b, la, lu = _operands("int4", 37, 128, 192, 64, seed=5, R=3, bias=True)
    args = (qa, sa, qw, sw, b, la, lu, None, None, "int4", 64, "gelu_tanh", "int4", 64)
    ref = tq.quant_gemm_quant_triton(*args)
    out = tq.quant_gemm_quant_triton(*args, _config={"i4dot": i4dot})
    assert all(torch.equal(x, y) for x, y in zip(out, ref))


def test_quant_gemm_fp8_exact():
    """fp8: e4m3 products are exact in fp32 and, for these values (multiples of 1/4 below 2^22),
    so is every partial sum: the output equals the exact dot."""
    M, N, K, G = 3, 5, 64, 32
    vals = torch.tensor([0.0, 0.5, -1.0, 1.5, 3.0, -6.0, 240.0, -224.0])
    g = torch.Generator().manual_seed(0)
    a = vals[torch.randint(0, 8, (M, K), generator=g)].to(torch.float8_e4m3fn)
    w = vals[torch.randint(0, 8, (N, K), generator=g)].to(torch.float8_e4m3fn)
    ones = lambda r: torch.ones(r, K // G, device=DEV)  # noqa: E731
    out = tq.quant_gemm_triton(a.to(DEV), ones(M), w.to(DEV), ones(N), None, None, None, "fp8", G, torch.float32)
    assert torch.equal(out.cpu().double(), a.double() @ w.double().T)


# ---------------------------------------------------------------- precision="fast": one fp16 accumulation over K
def _fast_bound(qa, sa, qw, sw, b, la, lu, fmt, G):
    """sum of |terms| of the fast form (float64): the scale of its fp32 accumulation errors."""
    a16, ra = fast_operands_ref(qa, sa, fmt, G)
    w16, rw = fast_operands_ref(qw, sw, fmt, G)
    mag = (a16.double().abs() @ w16.double().abs().T) * (ra.double()[:, None] * rw.double()[None, :])
    if la is not None:
        mag = mag + la.double().abs() @ lu.double().abs()
    if b is not None:
        mag = mag + b.double().abs()[None, :]
    return mag


def _spread_rows(qa_sa, M, seed):
    """Scale the rows' scales over 2^-40 .. 2^40 (far outside fp16's range both ways)."""
    g = torch.Generator().manual_seed(seed)
    return qa_sa * torch.exp2(torch.randint(-40, 41, (M, 1), generator=g).float()).to(DEV)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K,G,R,bias", GEMM_CASES)
def test_quant_gemm_fast(fmt, M, N, K, G, R, bias):
    """precision="fast": within fp32 accumulation error (K 2^-24 of the term magnitudes, allowed 2^-14)
    of its float64 definition (fp16 operands ``q * scale / row_max``), and within 2^-9 of the exact
    GEMM's term magnitudes (two fp16 roundings per product), for rows whose scales span 2^+-40."""
    dt = DTYPES[(M + N + K) % 3]
    qa, sa, qw, sw, b, la, lu = _operands(fmt, M, N, K, G, seed=M * 7 + N + K, R=R, bias=bias, dt=dt)
    sa = _spread_rows(sa, M, seed=M + K)
    if la is not None:
        la = la * 1e-3
    ops_ = (qa, sa, qw, sw, b, la, lu)
    out = tq.quant_gemm_triton(*ops_, fmt, G, torch.float32, precision="fast")
    assert out.dtype == torch.float32 and out.shape == (M, N) and out.isfinite().all()
    ref = quant_gemm_fast_ref(*ops_, fmt=fmt, group_size=G, out_dtype=None)
    err = (out.double() - ref).abs()
    mag = _fast_bound(*ops_, fmt, G)
    assert (err <= 2.0**-14 * mag + 1e-300).all(), f"max error / magnitude {(err / (mag + 1e-300)).max().item():.2e}"
    exact = quant_gemm_ref(*ops_, fmt=fmt, group_size=G, out_dtype=None)
    emag = _gemm_bound(*ops_, fmt, G)
    eerr = (out.double() - exact).abs()
    assert (eerr <= 2.0**-9 * emag + 1e-300).all(), f"vs exact: {(eerr / (emag + 1e-300)).max().item():.2e}"
    for od in (torch.float16, torch.bfloat16):
        o = tq.quant_gemm_triton(*ops_, fmt, G, od, precision="fast")
        assert torch.equal(o.view(torch.int16), out.to(od).view(torch.int16)), f"{od} store differs from rounding fp32"


def test_quant_gemm_fast_nan_zero_rows_and_tiles():
    """A NaN scale makes its row NaN; an all-zero row gives exactly the bias; edge tiles of several
    shapes (M, N not multiples of the tile) give the same result."""
    fmt, M, N, K, G = "int4", 19, 21, 256, 64
    qa, sa, qw, sw, b, la, lu = _operands(fmt, M, N, K, G, seed=5, R=2, bias=True)
    sa[4, 2] = float("nan")
    qa[7].zero_()
    sa[7].zero_()
    ref = quant_gemm_fast_ref(qa, sa, qw, sw, b, la, lu, fmt, G, None)
    mag = _fast_bound(qa, sa, qw, sw, b, la, lu, fmt, G)
    cfgs = (None, dict(BM=16, BN=16, BK=32, BR=16, GROUP_M=2), dict(BM=16, BN=64, BK=64, GROUP_M=1),
            dict(BM=16, BN=32, BK=128, unroll=2), dict(BM=32, BN=16, BK=32, unroll=2), dict(BK=256, unroll=4),
            dict(BK=192))  # BK spanning 2 / 4 groups, 2 k-steps per group, unrolled loops; 192: not a power of 2
    for cfg in cfgs:
        out = tq.quant_gemm_triton(qa, sa, qw, sw, b, la, lu, fmt, G, torch.float32, precision="fast", _config=cfg)
        assert torch.equal(out.isnan(), ref.isnan()) and out[4].isnan().all()
        fin = ~ref.isnan()
        assert ((out.double() - ref).abs()[fin] <= 2.0**-14 * mag[fin]).all()
    row7 = la[7].double() @ lu.double() + b.double()  # the zero row: only the epilogue terms
    assert torch.allclose(out[7].double(), row7, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt,out_fmt,epilogue,G2", [("int4", "int4", "gelu_tanh", 64), ("int8", "int4", "none", 32)])
def test_quant_gemm_quant_fast(fmt, out_fmt, epilogue, G2):
    """The fused GEMM + GELU + quantize kernel with precision="fast": its q within one step and its
    scales within 2^-12 of quantizing the fast GEMM's float64 definition."""
    M, N, K, G = 13, 128, 192, 64
    qa, sa, qw, sw, b, _, _ = _operands(fmt, M, N, K, G, seed=11, bias=True)
    q, s, _ = tq.quant_gemm_quant_triton(qa, sa, qw, sw, b, None, None, None, None, fmt, G, epilogue, out_fmt, G2,
                                         precision="fast")
    y = quant_gemm_fast_ref(qa, sa, qw, sw, b, None, None, fmt, G, None)
    if epilogue == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y**3)))
    qr, sr = quantize_values(y.float(), out_fmt, G2)
    assert torch.allclose(s.double(), sr.double(), rtol=2.0**-12, atol=0)
    from _quant_util import step_diff
    assert step_diff(q, qr, out_fmt).max().item() <= 1


def test_empty_shapes():
    x = torch.randn(0, 64, device=DEV)
    q, s, la = tq.quantize_triton(x, None, torch.randn(64, 3, device=DEV), None, None, "int4", 32, "none", 1e-6)
    assert q.shape == (0, 32) and s.shape == (0, 2) and la.shape == (0, 3)
    qa, sa, qw, sw, *_ = _operands("int8", 2, 3, 64, 32, seed=1)
    out = tq.quant_gemm_triton(qa[:0], sa[:0], qw, sw, None, None, None, "int8", 32, torch.bfloat16)
    assert out.shape == (0, 3) and out.dtype == torch.bfloat16


def test_ops_dispatch_to_triton():
    """pydiff.ops.quant routes backend='triton' here, through its argument checks."""
    from pydiff.ops import quant as ops

    x = _randn((5, 128), seed=21, dtype=torch.float16)
    w = _randn((7, 128), seed=22)
    qa, sa, la = ops.quantize(x, "int4", 64, backend="triton")
    qw, sw, _ = ops.quantize(w, "int4", 64, backend="triton")
    _assert_bits_equal((qa, sa, la), quantize_ref(x, fmt="int4", group_size=64), "ops.quantize")
    out = ops.quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=64, out_dtype=torch.float32, backend="triton")
    ref = quant_gemm_ref(qa, sa, qw, sw, fmt="int4", group_size=64, out_dtype=None)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------- GPU code paths, compiled ahead of time
_COMPILE_SCRIPT = r"""
import json, sys
import torch
from _aot import assemble
from pydiff.triton_kernels import quant as tq
from pydiff.reference.quant import quantize_ref

M, K, N, R = 256, 1024, 256, 32
x = torch.randn(M, K, dtype=torch.bfloat16)
ld = torch.randn(K, R)
res = {}

def gemm(fmt, cap, config=None):
    qa, sa, _ = quantize_ref(torch.randn(M, K), fmt=fmt, group_size=64)
    qw, sw, _ = quantize_ref(torch.randn(N, K), fmt=fmt, group_size=64)
    return tq.compile_for_gpu("quant_gemm", cap, qa, sa, qw, sw, torch.randn(N), torch.randn(M, R),
                              torch.randn(R, N, dtype=torch.bfloat16), fmt, 64, torch.bfloat16, config=config)

cases = {
    "quantize_sm90": ((9, 0), lambda: tq.compile_for_gpu("quantize", (9, 0), x, torch.rand(K) + 0.5, ld, x[:2], x[:2],
                                                           "int4", 64, "layernorm", 1e-6)),
    "quantize_sm80": ((8, 0), lambda: tq.compile_for_gpu("quantize", (8, 0), x, None, None, None, None, "fp8", K,
                                                           "gelu_tanh", 1e-6)),
    "gemm_int4_sm90": ((9, 0), lambda: gemm("int4", (9, 0), {"i4dot": 0})),
    "gemm_fp8_sm89": ((8, 9), lambda: gemm("fp8", (8, 9))),
    "gemm_int8_sm80": ((8, 0), lambda: gemm("int8", (8, 0))),
    "gemm_int4_e4m3_sm90": ((9, 0), lambda: gemm("int4", (9, 0), {"i4dot": 2, "BM": 64, "BN": 256,
                                                                       "num_warps": 8})),  # the default before
    "gemm_int4_e4m3_swar_sm90": ((9, 0), lambda: gemm("int4", (9, 0), {"i4dot": 3, "BM": 64, "BN": 256,
                                                                            "num_warps": 8})),
    "gemm_int4_e4m3_swar_2cta_sm90": ((9, 0), lambda: gemm("int4", (9, 0))),  # the sm_90 default: SWAR, 64x128
    "gemm_int4_f16_sm80": ((8, 0), lambda: gemm("int4", (8, 0), {"i4dot": 1})),
    "gemm_int4_fast_sm90": ((9, 0), lambda: gemm("int4", (9, 0), {"fast": True})),
    "gemm_int4_fast_bk128_sm90": ((9, 0), lambda: gemm("int4", (9, 0), {"fast": True, "BK": 128, "BM": 64,
                                                                                "BN": 128, "num_warps": 4, "unroll": 2})),
    "gemm_int8_fast_sm80": ((8, 0), lambda: gemm("int8", (8, 0), {"fast": True})),
}
for name, (cap, make) in cases.items():
    res[name] = assemble(make(), cap)
json.dump(res, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    """The GPU variants, compiled in a subprocess (tests/_aot.py)."""
    return run_script(_COMPILE_SCRIPT)


@pytest.mark.skipif(ptxas_path() is None, reason="no ptxas to compile the GPU kernels")
@pytest.mark.parametrize("case,expect", [
    ("quantize_sm90", ["cvt.rni.f32.f32", "div.rn.f32", "max.NaN.f32", "ld.global.v4"]),
    ("quantize_sm80", ["cvt.rni.f32.f32", "div.rn.f32", "max.NaN.f32"]),
    ("gemm_int4_sm90", ["wgmma.mma_async.sync.aligned", ".s32.s8.s8", ".f32.tf32.tf32", "cvt.rn.bf16"]),
    ("gemm_fp8_sm89", ["mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"]),
    ("gemm_int8_sm80", ["mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"]),
    ("gemm_int4_e4m3_sm90", ["wgmma.mma_async.sync.aligned", ".f32.e4m3.e4m3", "cvt.rn.satfinite.e4m3x2.f16x2"]),
    ("gemm_int4_e4m3_swar_sm90", ["wgmma.mma_async.sync.aligned", ".f32.e4m3.e4m3", "mul.lo.u32"]),
    ("gemm_int4_e4m3_swar_2cta_sm90", ["wgmma.mma_async.sync.aligned", ".f32.e4m3.e4m3", "mul.lo.u32"]),
    ("gemm_int4_f16_sm80", ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"]),
    ("gemm_int4_fast_sm90", ["wgmma.mma_async.sync.aligned", ".f32.f16.f16", "div.rn.f32", "mul.f16"]),
    ("gemm_int4_fast_bk128_sm90", ["wgmma.mma_async.sync.aligned", ".f32.f16.f16", "mul.f16"]),
    ("gemm_int8_fast_sm80", ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "div.rn.f32"]),
])
def test_gpu_compile(compiled, case, expect):
    """The GPU variants (libdevice rint, int8/fp8 tensor-core dots, native casts, GPU block shapes)
    compile for their architectures with no register spills, within Ada's 99 KB of shared memory,
    and use the expected instructions."""
    k = compiled[case]
    for e in expect:
        assert e in k["ptx"], f"{case}: {e} not in the PTX"
    assert k["shared"] <= 99 * 1024, f"{case}: {k['shared']} bytes of shared memory"
    assert k["spills"] == 0, f"{case}: {k['spills']} bytes of register spills"


def _run_ptx(asm: str, regs: dict) -> dict:
    """A tiny interpreter for the 32-bit integer PTX of :data:`tq.I4_E4M3_PTX` (shr.u32, and, or,
    xor, add.u32, mul.lo.u32, shl.b32 with register or immediate operands), so that the inline
    assembly the GPU path runs is checked on the CPU."""
    m32 = 0xFFFFFFFF
    ops = {"shr": lambda a, b: a >> b, "shl": lambda a, b: (a << b) & m32, "and": lambda a, b: a & b,
           "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b, "add": lambda a, b: (a + b) & m32,
           "mul": lambda a, b: (a * b) & m32}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, a, b = [x.strip() for x in rest.split(",")]
        val = lambda x: regs[x] if x in regs else int(x, 0)  # noqa: E731
        regs[dst] = ops[op.split(".")[0]](val(a), val(b))
    return regs


def test_int4_e4m3_inline_ptx_equals_its_elementwise_form():
    """The inline PTX of i4dot 3 (eight nibbles per register) gives, byte for byte, the codes of
    the element-wise form the interpreter runs: every byte value in every byte position, and random
    words; and those codes are sign-magnitude e4m3 bytes of v * 2^-9 for every int4 v."""
    def elementwise(byte):
        code = lambda n: (0x80 | (16 - n)) if n >= 8 else n  # noqa: E731
        return code(byte & 0xF), code(byte >> 4)

    g = torch.Generator().manual_seed(0)
    words = [b << (8 * pos) for b in range(256) for pos in range(4)]
    words += torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64).tolist()
    for w in words:
        r = _run_ptx(tq.I4_E4M3_PTX, {"$2": w})
        for pos in range(4):
            lo, hi = elementwise((w >> (8 * pos)) & 0xFF)
            assert (r["$0"] >> (8 * pos)) & 0xFF == lo and (r["$1"] >> (8 * pos)) & 0xFF == hi, hex(w)
    codes = torch.tensor([elementwise(v & 0xF)[0] for v in range(-8, 8)], dtype=torch.uint8)
    assert torch.equal(codes.view(torch.float8_e4m3fn).double(), torch.arange(-8, 8).double() * 2.0**-9)
