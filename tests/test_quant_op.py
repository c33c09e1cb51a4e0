"""Quantization ops (``quantize``, ``quant_gemm``; W4A4, W8A8 int8 / fp8) on the CPU backends: the C++
kernels ('cpu'), the pure-torch reference ('torch') and, when its module imports, Triton in the
interpreter ('triton', on a subset of the sizes), all against the float64 reference of
pydiff/reference/quant.py.

* quantize: q and scales bit-equal to the reference for prologue "none" (every format, input dtype,
  odd sizes, smoothing and the low-rank down-projection); with gelu_tanh / layernorm (adaLN) at most
  a handful of one-step differences (tanh and the float64 summation order move y by an ulp; the
  C++ kernel showed 0 of 6.4M q values and 1-ulp scale differences in about 1 group in 3000 while
  this file was written); fp8 e4m3 encoding bit-equal to torch's ``.to(torch.float8_e4m3fn)`` for
  every fp16 and bf16 value in [-448, 448] and every rounding tie of fp32; NaN / inf / zero groups.
* quant_gemm: against ``quant_gemm_ref(out_dtype=None)`` within the fp32 rounding of the epilogue;
  the integer accumulators equal (unit scales, one group: out == the exact integer sum); adversarial
  all +7 x +7, -8 x -8 (int4), +127 x +127, -128 x -128 (int8), 448 x 448 (fp8) at K up to 16384.
* registration (opcheck, torch.compile fullgraph) and bad input naming the argument.
"""
import pytest
import torch

import pydiff
from pydiff.ops.quant import quant_gemm, quantize
from pydiff.reference.quant import (
    FORMATS,
    QMAX,
    q_dtype,
    q_values,
    quant_gemm_ref,
    quantize_ref,
)

from _quant_util import (check_fp8_encoding, check_gemm, check_special_groups, codes, fp8_sweep_values,
                         gemm_magnitude, special_groups_input, step_diff, triton_quant_ok)
from _util import CPU, poison_allocator

HAS_EXT = pydiff.build_info()["cpu_kernels"]


BACKENDS = [b for b in ("cpu", "torch") if b in pydiff.available_backends(CPU)]
ALL_BACKENDS = BACKENDS + (["triton"] if triton_quant_ok() else [])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (M, K, G): M = 1, primes; K not a power of two; one group per row (G = K) included
Q_SIZES = [(1, 32, 32), (3, 64, 32), (37, 96, 32), (37, 320, 64), (3, 320, 320), (1, 96, 96), (37, 64, 64),
           (3, 320, 32)]
Q_SIZES_SMALL = [(3, 64, 32), (37, 320, 64), (1, 96, 96)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _rand(shape, dtype, seed, std=1.0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


def _sizes(backend, full, small):
    return small if backend == "triton" else full


# ---------------------------------------------------------------- quantize
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_quantize_matches_reference(backend, fmt, dtype):
    for i, (M, K, G) in enumerate(_sizes(backend, Q_SIZES, Q_SIZES_SMALL)):
        seed = 100 * i + FORMATS.index(fmt)
        x = _rand((M, K), dtype, seed, std=1.5, mean=0.25)
        smooth = _rand((K,), DTYPES[i % 3], seed + 1).abs().add(0.5) if i % 2 else None
        lora_down = _rand((K, 3 + i), DTYPES[(i + 1) % 3], seed + 2, std=0.1) if i % 3 != 1 else None
        poison_allocator(M * K, torch.float32)  # freed blocks of the outputs' sizes hold NaN bytes
        q, s, la = quantize(x, fmt, G, smooth=smooth, lora_down=lora_down, backend=backend)
        qr, sr, lar = quantize_ref(x, smooth, lora_down, fmt=fmt, group_size=G)
        what = f"{backend} {fmt} {dtype} M={M} K={K} G={G} smooth={smooth is not None} lora={lora_down is not None}"
        assert q.dtype == q_dtype(fmt) and q.shape == qr.shape, what
        assert s.dtype == torch.float32 and s.shape == (M, K // G), what
        R = 0 if lora_down is None else lora_down.shape[1]
        assert la.dtype == torch.float32 and la.shape == (M, R), what
        assert torch.equal(codes(q, fmt), codes(qr, fmt)), f"{what}: q differs from the reference"
        assert torch.equal(s, sr), f"{what}: scales differ from the reference"
        assert torch.isfinite(s).all() and (s > 0).all(), what
        if R:
            y = x.float() / smooth.float() if smooth is not None else x.float()
            bound = 4 * K * 2.0**-24 * (y.double().abs() @ lora_down.double().abs()) + 1e-30
            assert ((la.double() - lar.double()).abs() <= bound).all(), f"{what}: lora_act"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_prologues_match_reference(backend, fmt):
    """gelu_tanh and layernorm (+ adaLN): q within one step of the reference in a handful of places."""
    M, K, G = 12, 320, 64
    step_diffs, total = 0, 0
    for j, dtype in enumerate(DTYPES):
        x = _rand((M, K), dtype, 7 + j, std=2.0, mean=0.3)
        sh = _rand((4, K), dtype, 8 + j, std=0.5)
        sc = _rand((4, K), dtype, 9 + j, std=0.2)
        cases = [("gelu_tanh", {}), ("layernorm", {}), ("layernorm", dict(shift=sh, scale=sc)),
                 ("layernorm", dict(shift=sh[:1])), ("layernorm", dict(scale=sc[:2])),
                 ("layernorm", dict(shift=_rand((M, K), dtype, 10), scale=_rand((M, K), dtype, 11, std=0.2)))]
        for pro, kw in cases:
            smooth = _rand((K,), torch.float32, 12).abs().add(0.5) if pro == "gelu_tanh" else None
            q, s, _ = quantize(x, fmt, G, prologue=pro, smooth=smooth, backend=backend, **kw)
            qr, sr, _ = quantize_ref(x, smooth, None, kw.get("shift"), kw.get("scale"), fmt, G, pro)
            what = f"{backend} {fmt} {dtype} {pro} {sorted(kw)}"
            assert torch.isfinite(s).all(), what
            rel = ((s.double() - sr.double()).abs() / sr.double()).max().item()
            assert rel <= (2.0**-22 if backend != "triton" else 2.0**-18), f"{what}: scales rel diff {rel:.3g}"
            d = step_diff(q, qr, fmt)
            assert d.max().item() <= 1, f"{what}: q differs by {d.max().item()} steps"
            step_diffs += int((d > 0).sum())
            total += d.numel()
    # the C++ kernel and the reference differ only by tanh's last bit and the float64 summation order
    limit = 8 if backend != "triton" else total // 100
    assert step_diffs <= limit, f"{backend} {fmt}: {step_diffs} of {total} q values one step off"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp8_encoding_matches_torch_bit_for_bit(backend):
    """Each group is [448, v0 .. v30]: amax 448, scale exactly 1, so q = e4m3(v) for every swept v."""
    v = fp8_sweep_values()
    if backend == "triton":
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:4000]]
    check_fp8_encoding(lambda x: quantize(x, "fp8", 32, backend=backend)[:2], v, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_rounding_ties_and_special_groups(backend, fmt):
    # group 0: amax = QMAX -> scale 1, so q = rint(v) (half to even) or e4m3(v)
    x = special_groups_input(QMAX[fmt], lambda seed: _rand((32,), torch.float32, seed))
    q, s, _ = quantize(x, fmt, 32, backend=backend)
    qr, _, _ = quantize_ref(x, fmt=fmt, group_size=32)
    check_special_groups(q, s, qr, fmt, backend)


# ---------------------------------------------------------------- quant_gemm
GEMM_M, GEMM_N = (1, 3, 37), (1, 5, 67)
GEMM_KG = [(32, 32), (64, 32), (64, 64), (96, 32), (96, 96), (320, 32), (320, 64), (320, 320)]
GEMM_SMALL = [(3, 5, 64, 32), (37, 67, 320, 64), (1, 1, 96, 96)]


def _gemm_cases(backend):
    if backend == "triton":
        return GEMM_SMALL
    return [(M, N, K, G) for M in GEMM_M for N in GEMM_N for K, G in GEMM_KG]


def _operands(M, N, K, G, fmt, seed, dtype=torch.float32):
    x = _rand((M, K), dtype, seed, std=1.2, mean=0.1)
    w = _rand((N, K), dtype, seed + 1, std=0.05)
    qa, sa, _ = quantize_ref(x, fmt=fmt, group_size=G)
    qw, sw, _ = quantize_ref(w, fmt=fmt, group_size=G)
    return qa, sa, qw, sw


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_quant_gemm_matches_reference(backend, fmt, out_dtype):
    for i, (M, N, K, G) in enumerate(_gemm_cases(backend)):
        in_dtype = DTYPES[i % 3]
        qa, sa, qw, sw = _operands(M, N, K, G, fmt, seed=10 * i + FORMATS.index(fmt), dtype=in_dtype)
        bias = _rand((N,), DTYPES[(i + 1) % 3], i) if i % 2 else None
        la = lu = None
        if i % 4 >= 2:
            R = 1 + i % 7
            la = _rand((M, R), DTYPES[i % 3], i + 1)
            lu = _rand((R, N), DTYPES[(i + 2) % 3], i + 2, std=0.1)
        poison_allocator(M * N, out_dtype)
        out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, bias=bias, lora_act=la, lora_up=lu,
                         out_dtype=out_dtype, backend=backend)
        ref = quant_gemm_ref(qa, sa, qw, sw, bias, la, lu, fmt, G, out_dtype=None)
        mag = gemm_magnitude(qa, sa, qw, sw, bias, la, lu, fmt, G)
        n_terms = K // G + (0 if la is None else la.shape[1])
        check_gemm(out, ref, mag, n_terms, out_dtype,
                    f"{backend} {fmt} M={M} N={N} K={K} G={G} bias={bias is not None} lora={la is not None}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quant_gemm_integer_accumulators_equal(backend, fmt):
    """Unit scales and one group: out (fp32) is the exact integer dot product, rounded once to fp32."""
    g = torch.Generator().manual_seed(1)
    cases = [(3, 5, 64), (37, 67, 320), (2, 3, 4096)] if backend != "triton" else [(3, 5, 64), (2, 3, 1024)]
    for M, N, K in cases:
        if fmt == "int4":
            qa = torch.randint(0, 256, (M, K // 2), generator=g, dtype=torch.int32).to(torch.uint8)
            qw = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.int32).to(torch.uint8)
        else:
            qa = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int32).to(torch.int8)
            qw = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int32).to(torch.int8)
        sa, sw = torch.ones(M, 1), torch.ones(N, 1)
        out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=K, out_dtype=torch.float32, backend=backend)
        exact = q_values(qa, fmt) @ q_values(qw, fmt).T  # float64, exact
        assert torch.equal(out, exact.to(torch.float32)), f"{backend} {fmt} M={M} N={N} K={K}"


ADVERSARIAL = [("int4", 7, 7), ("int4", -8, -8), ("int4", 7, -8), ("int8", 127, 127), ("int8", -128, -128),
               ("int8", -128, 127), ("fp8", 448.0, 448.0), ("fp8", -448.0, 448.0), ("fp8", 2.0**-9, 448.0)]


def _filled(fmt, v, rows, K):
    if fmt == "fp8":
        return torch.full((rows, K), v).to(torch.float8_e4m3fn)
    if fmt == "int8":
        return torch.full((rows, K), v, dtype=torch.int8)
    nib = v & 0xF
    return torch.full((rows, K // 2), nib | (nib << 4), dtype=torch.uint8)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", ADVERSARIAL, ids=lambda c: f"{c[0]}:{c[1]}x{c[2]}")
def test_quant_gemm_adversarial_extremes(backend, case):
    """Every product at the extreme of the format, K up to 16384: exact (every partial sum here is
    representable in fp32, and the scales are powers of two)."""
    fmt, va, vw = case
    Ks = (4096, 16384) if backend != "triton" else (4096,)
    for K in Ks:
        for G in (64, K):
            M, N = 2, 3
            qa, qw = _filled(fmt, va, M, K), _filled(fmt, vw, N, K)
            sa = torch.full((M, K // G), 0.5)
            sw = torch.full((N, K // G), 2.0**-3)
            out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, out_dtype=torch.float32, backend=backend)
            ref = quant_gemm_ref(qa, sa, qw, sw, fmt=fmt, group_size=G, out_dtype=None)
            exact = float(q_values(qa[:1, :], fmt)[0, 0] * q_values(qw[:1, :], fmt)[0, 0]) * K * 0.5 * 2.0**-3
            assert (ref == exact).all()
            assert torch.equal(out.double(), ref), f"{backend} {case} K={K} G={G}: {out[0, 0].item()} != {exact}"


def test_quant_gemm_layer_size_and_noncontiguous_inputs():
    """A UNet-sized layer (M 2048, K 1152, N 128) end to end from float inputs, with a transposed
    (non-contiguous) activation view, on every backend."""
    M, K, N, G = 2048, 1152, 128, 64
    x = _rand((K, M), torch.bfloat16, 1).T  # non-contiguous [M, K]
    w = _rand((N, K), torch.float32, 2, std=0.03)
    bias = _rand((N,), torch.bfloat16, 3)
    outs = {}
    for backend in BACKENDS:
        qa, sa, _ = quantize(x, "int4", G, backend=backend)
        qw, sw, _ = quantize(w, "int4", G, backend=backend)
        outs[backend] = quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=G, bias=bias, out_dtype=torch.float32,
                                   backend=backend)
    qa, sa, _ = quantize_ref(x, fmt="int4", group_size=G)
    qw, sw, _ = quantize_ref(w, fmt="int4", group_size=G)
    ref = quant_gemm_ref(qa, sa, qw, sw, bias, fmt="int4", group_size=G, out_dtype=None)
    mag = gemm_magnitude(qa, sa, qw, sw, bias, None, None, "int4", G)
    for backend, out in outs.items():
        check_gemm(out, ref, mag, K // G, torch.float32, f"{backend} layer")
    full = x.double() @ w.double().T + bias.double()
    rel = ((ref - full).norm() / full.norm()).item()
    assert rel < 0.2, f"W4A4 relative error {rel:.3f} of the layer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    x = torch.randn(0, 64)
    q, s, la = quantize(x, "int4", 32, lora_down=torch.randn(64, 4), backend=backend)
    assert q.shape == (0, 32) and s.shape == (0, 2) and la.shape == (0, 4)
    qw, sw, _ = quantize(torch.randn(5, 64), "int4", 32, backend=backend)
    out = quant_gemm(q, s, qw, sw, fmt="int4", group_size=32, out_dtype=torch.float16, backend=backend)
    assert out.shape == (0, 5) and out.dtype == torch.float16


# ---------------------------------------------------------------- registration
@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_opcheck_quant_ops():
    x = _rand((5, 64), torch.float32, 1)
    sm = _rand((64,), torch.float32, 2).abs() + 0.5
    ld = _rand((64, 3), torch.bfloat16, 3)
    sh, sc = _rand((1, 64), torch.float16, 4), _rand((1, 64), torch.float16, 5)
    for fmt in FORMATS:
        # test_schema compares tensors with arithmetic that float8_e4m3fn lacks on the CPU: skipped for fp8
        utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_dynamic") if fmt != "fp8" or u != "test_schema"]
        check = lambda op, args: torch.library.opcheck(op, args, test_utils=utils)  # noqa: E731
        check(torch.ops.pydiff.quantize.default, (x, sm, ld, None, None, fmt, 32, "none", 1e-6))
        check(torch.ops.pydiff.quantize.default, (x.half(), None, None, sh, sc, fmt, 64, "layernorm", 1e-5))
        qa, sa, la = quantize_ref(x, None, ld, fmt=fmt, group_size=32)
        qw, sw, _ = quantize_ref(_rand((7, 64), torch.float32, 6), fmt=fmt, group_size=32)
        bias, lu = _rand((7,), torch.bfloat16, 7), _rand((3, 7), torch.float32, 8)
        check(torch.ops.pydiff.quant_gemm.default, (qa, sa, qw, sw, bias, la, lu, fmt, 32, torch.bfloat16))
        check(torch.ops.pydiff.quant_gemm.default, (qa, sa, qw, sw, None, None, None, fmt, 32, torch.float32))


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_torch_compile_fullgraph():
    x = _rand((6, 128), torch.bfloat16, 1)
    w = _rand((9, 128), torch.float32, 2, std=0.1)
    ld, lu = _rand((128, 4), torch.float32, 3, std=0.1), _rand((4, 9), torch.bfloat16, 4)
    bias = _rand((9,), torch.float32, 5)
    qw, sw, _ = quantize(w, "int4", 64, backend="cpu")

    def raw(x):
        q, s, la = torch.ops.pydiff.quantize(x, None, ld, None, None, "int4", 64, "gelu_tanh", 1e-6)
        return torch.ops.pydiff.quant_gemm(q, s, qw, sw, bias, la, lu, "int4", 64, torch.bfloat16)

    def wrapped(x):
        q, s, la = quantize(x, "int8", 64, lora_down=ld, prologue="layernorm", backend="cpu")
        qw8, sw8, _ = quantize(w, "int8", 64, backend="cpu")
        return quant_gemm(q, s, qw8, sw8, fmt="int8", group_size=64, bias=bias, lora_act=la, lora_up=lu,
                          out_dtype=torch.float32, backend="cpu")

    for fn in (raw, wrapped):
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(got, fn(x))


# ---------------------------------------------------------------- bad input
def _q_inputs():
    return dict(x=torch.randn(4, 64), fmt="int4", group_size=32)


QUANTIZE_BAD = [
    ("x_dtype", TypeError, "x: expected dtype", lambda a: a.update(x=torch.ones(4, 64, dtype=torch.int32))),
    ("x_rank", ValueError, "x: expected a 2-D tensor", lambda a: a.update(x=torch.randn(2, 4, 64))),
    ("fmt", ValueError, "fmt: expected", lambda a: a.update(fmt="int3")),
    ("group_mult", ValueError, "group_size: expected", lambda a: a.update(group_size=48)),
    ("group_div", ValueError, "group_size: expected", lambda a: a.update(x=torch.randn(4, 96), group_size=64)),
    ("prologue", ValueError, "prologue: expected", lambda a: a.update(prologue="relu")),
    ("smooth_shape", ValueError, "smooth: expected shape", lambda a: a.update(smooth=torch.ones(63))),
    ("smooth_dtype", TypeError, "smooth: expected dtype", lambda a: a.update(smooth=torch.ones(64, dtype=torch.int64))),
    ("smooth_device", ValueError, "smooth: expected device", lambda a: a.update(smooth=torch.ones(64, device="meta"))),
    ("lora_shape", ValueError, "lora_down: expected shape", lambda a: a.update(lora_down=torch.ones(65, 4))),
    ("shift_prologue", ValueError, "shift: only used", lambda a: a.update(shift=torch.zeros(1, 64))),
    ("scale_batch", ValueError, "scale: expected shape",
     lambda a: a.update(prologue="layernorm", scale=torch.zeros(3, 64))),
    ("eps", ValueError, "eps: expected", lambda a: a.update(prologue="layernorm", eps=-1.0)),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case,exc,msg,edit", QUANTIZE_BAD, ids=[c[0] for c in QUANTIZE_BAD])
def test_quantize_bad_input(backend, case, exc, msg, edit):
    a = _q_inputs()
    edit(a)
    x, fmt, G = a.pop("x"), a.pop("fmt"), a.pop("group_size")
    with pytest.raises(exc) as ei:
        quantize(x, fmt, G, backend=backend, **a)
    assert msg in str(ei.value)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
@pytest.mark.parametrize("case,exc,msg,edit", [c for c in QUANTIZE_BAD if c[0] != "smooth_device"],
                         ids=[c[0] for c in QUANTIZE_BAD if c[0] != "smooth_device"])
def test_raw_quantize_checks_its_arguments(case, exc, msg, edit):
    """The C++ op validates on its own (never reads out of bounds), naming the argument."""
    a = dict(_q_inputs(), smooth=None, lora_down=None, shift=None, scale=None, prologue="none", eps=1e-6)
    edit(a)
    with pytest.raises(exc) as ei:
        torch.ops.pydiff.quantize(a["x"], a["smooth"], a["lora_down"], a["shift"], a["scale"], a["fmt"],
                                  a["group_size"], a["prologue"], a["eps"])
    assert msg in str(ei.value)


def _g_inputs():
    M, N, K, G = 3, 5, 64, 32
    qa, sa, _ = quantize_ref(torch.randn(M, K), fmt="int4", group_size=G)
    qw, sw, _ = quantize_ref(torch.randn(N, K), fmt="int4", group_size=G)
    return dict(qa=qa, sa=sa, qw=qw, sw=sw, bias=None, lora_act=None, lora_up=None, fmt="int4", group_size=G,
                out_dtype=torch.float32)


GEMM_BAD = [
    ("qa_dtype", TypeError, "qa: expected dtype", lambda a: a.update(qa=a["qa"].to(torch.int8))),
    ("qa_fmt", TypeError, "qw: expected dtype", lambda a: a.update(qa=torch.zeros(3, 64, dtype=torch.int8),
                                                                   fmt="int8")),
    ("qa_rank", ValueError, "qa: expected a 2-D", lambda a: a.update(qa=a["qa"].reshape(-1))),
    ("qw_cols", ValueError, "qw: expected", lambda a: a.update(qw=torch.zeros(5, 48, dtype=torch.uint8))),
    ("qw_device", ValueError, "qw: expected device", lambda a: a.update(qw=a["qw"].to("meta"))),
    ("sa_shape", ValueError, "sa: expected shape", lambda a: a.update(sa=torch.ones(3, 1))),
    ("sw_dtype", TypeError, "sw: expected dtype", lambda a: a.update(sw=a["sw"].half())),
    ("bias_shape", ValueError, "bias: expected shape", lambda a: a.update(bias=torch.ones(4))),
    ("bias_dtype", TypeError, "bias: expected dtype", lambda a: a.update(bias=torch.ones(5, dtype=torch.int32))),
    ("lora_pair", ValueError, "lora_act, lora_up", lambda a: a.update(lora_act=torch.ones(3, 2))),
    ("lora_act_rows", ValueError, "lora_act: expected shape",
     lambda a: a.update(lora_act=torch.ones(4, 2), lora_up=torch.ones(2, 5))),
    ("lora_up_shape", ValueError, "lora_up: expected shape",
     lambda a: a.update(lora_act=torch.ones(3, 2), lora_up=torch.ones(3, 5))),
    ("group", ValueError, "group_size: expected", lambda a: a.update(group_size=48)),
    ("fmt", ValueError, "fmt: expected", lambda a: a.update(fmt="nf4")),
    ("out_dtype", TypeError, "out_dtype: expected", lambda a: a.update(out_dtype=torch.int32)),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case,exc,msg,edit", GEMM_BAD, ids=[c[0] for c in GEMM_BAD])
def test_quant_gemm_bad_input(backend, case, exc, msg, edit):
    a = _g_inputs()
    edit(a)
    qa, sa, qw, sw = a.pop("qa"), a.pop("sa"), a.pop("qw"), a.pop("sw")
    with pytest.raises(exc) as ei:
        quant_gemm(qa, sa, qw, sw, backend=backend, **a)
    assert msg in str(ei.value)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
@pytest.mark.parametrize("case,exc,msg,edit", [c for c in GEMM_BAD if c[0] != "qw_device"],
                         ids=[c[0] for c in GEMM_BAD if c[0] != "qw_device"])
def test_raw_quant_gemm_checks_its_arguments(case, exc, msg, edit):
    a = _g_inputs()
    edit(a)
    with pytest.raises(exc) as ei:
        torch.ops.pydiff.quant_gemm(a["qa"], a["sa"], a["qw"], a["sw"], a["bias"], a["lora_act"], a["lora_up"],
                                    a["fmt"], a["group_size"], a["out_dtype"])
    assert msg in str(ei.value)


def test_auto_triton_yields_to_the_custom_op_under_torch_compile(monkeypatch):
    """``auto`` sends quant ops on Hopper to Triton in eager mode, but while torch.compile traces it
    keeps the registered custom op (CUDA kernel + fake kernel), so ``fullgraph=True`` holds; the
    logic of ``backend.resolve``, checked with a stand-in CUDA device."""
    from pydiff import backend as be

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(be, "triton_available", lambda: True)
    monkeypatch.setattr(be._ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(be, "_compiling", lambda: False)
    assert be.resolve(None, dev, auto_triton=True) == "triton"
    assert be.resolve(None, dev) == "cuda"
    monkeypatch.setattr(be, "_compiling", lambda: True)
    assert be.resolve(None, dev, auto_triton=True) == "cuda"
    assert be.resolve("triton", dev, auto_triton=True) == "triton"  # a named backend is kept
    monkeypatch.setattr(be._ext, "has_cuda_kernels", lambda: False)  # no CUDA kernels: Triton regardless
    assert be.resolve(None, dev, auto_triton=True) == "triton"


# ---------------------------------------------------------------- precision="fast"
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", ("int4", "int8"))
def test_quant_gemm_fast_precision(backend, fmt):
    """quant_gemm(precision="fast") on every backend: within fp32 accumulation error (2^-14 of the
    terms' magnitudes) of quant_gemm_fast_ref, and within 2^-9 of the exact GEMM; rows whose scales
    span 2^+-30; bias and a low-rank branch."""
    from pydiff.reference.quant import fast_operands_ref, quant_gemm_fast_ref

    M, N, K, G, R = 23, 41, 192, 64, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-30, 31, (M, 1), generator=g).float())
    w = torch.randn(N, K, generator=g)
    qa, sa, _ = quantize_ref(x, fmt=fmt, group_size=G)
    qw, sw, _ = quantize_ref(w, fmt=fmt, group_size=G)
    b, la, lu = torch.randn(N, generator=g), torch.randn(M, R, generator=g), torch.randn(R, N, generator=g)
    out = quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, bias=b, lora_act=la, lora_up=lu, out_dtype=torch.float32,
                     backend=backend, precision="fast")
    ref = quant_gemm_fast_ref(qa, sa, qw, sw, b, la, lu, fmt, G, None)
    a16, ra = fast_operands_ref(qa, sa, fmt, G)
    w16, rw = fast_operands_ref(qw, sw, fmt, G)
    mag = (a16.double().abs() @ w16.double().abs().T) * ra.double()[:, None] * rw.double()[None, :] \
        + la.double().abs() @ lu.double().abs() + b.double().abs()
    assert ((out.double() - ref).abs() <= 2.0**-14 * mag).all()
    exact = quant_gemm_ref(qa, sa, qw, sw, b, la, lu, fmt, G, None)
    emag = gemm_magnitude(qa, sa, qw, sw, b, la, lu, fmt, G)
    assert ((out.double() - exact).abs() <= 2.0**-9 * emag).all()
    for chk in (True, False):  # a typo raises even without the argument checks
        with pytest.raises(ValueError, match="precision: expected one of"):
            quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=G, backend=backend, precision="Fast", check=chk)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_quant_gemm_quant_fast_precision(backend):
    """quant_gemm_quant(precision="fast"): the scales of quantizing GELU(fast GEMM) within 2^-12 and
    q within one step (the Triton kernel fuses it; the others compose the torch GEMM and quantize)."""
    from pydiff.ops.quant import quant_gemm_quant
    from pydiff.reference.quant import gelu_tanh, quant_gemm_fast_ref, quantize_values

    M, N, K, G = 9, 128, 128, 64
    g = torch.Generator().manual_seed(3)
    qa, sa, _ = quantize_ref(torch.randn(M, K, generator=g), fmt="int4", group_size=G)
    qw, sw, _ = quantize_ref(torch.randn(N, K, generator=g), fmt="int4", group_size=G)
    q, s, la2 = quant_gemm_quant(qa, sa, qw, sw, epilogue="gelu_tanh", backend=backend, precision="fast")
    y = gelu_tanh(quant_gemm_fast_ref(qa, sa, qw, sw, None, None, None, "int4", G, None))
    qr, sr = quantize_values(y.float(), "int4", G)
    assert torch.allclose(s.double(), sr.double(), rtol=2.0**-12, atol=0)
    assert step_diff(q, qr, "int4").max().item() <= 1 and la2.shape == (M, 0)
    with pytest.raises(ValueError, match="precision: expected one of"):
        quant_gemm_quant(qa, sa, qw, sw, backend=backend, precision="fp16", check=False)


def test_quant_gemm_fast_precision_under_torch_compile():
    """precision="fast" traces whole (fullgraph) and gives the eager result: under torch.compile it
    takes the torch form, never the Python Triton launcher."""
    from pydiff import backend as B
    from pydiff.ops import quant as Q

    g = torch.Generator().manual_seed(5)
    qa, sa, _ = quantize_ref(torch.randn(7, 128, generator=g), fmt="int4", group_size=64)
    qw, sw, _ = quantize_ref(torch.randn(9, 128, generator=g), fmt="int4", group_size=64)

    def f(qa, sa, qw, sw):
        return quant_gemm(qa, sa, qw, sw, out_dtype=torch.float32, precision="fast")

    eager = f(qa, sa, qw, sw)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(qa, sa, qw, sw)
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6 * eager.abs().max().item())
    orig = B._compiling
    try:
        B._compiling = lambda: True
        assert not Q._fast_on_triton("triton", torch.device("cpu"))
    finally:
        B._compiling = orig
