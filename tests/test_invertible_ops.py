"""Invertible-block ops (coupling updates, fused GroupNorm + SiLU): every CPU backend (C++, Triton in
the interpreter, torch) against float64 references, autograd, registration, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import pydiff
from pydiff.ops import invertible as inv
from pydiff.reference.invertible import (
    coupling_update_fixed_ref,
    from_fixed,
    groupnorm_silu_backward_ref,
    groupnorm_silu_ref,
    to_fixed,
)

from _util import CPU, TOL, poison_allocator

BACKENDS = pydiff.available_backends(CPU)
HAS_EXT = pydiff.build_info()["cpu_kernels"]
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOLS = dict(TOL)
TOLS[torch.float64] = (1e-13, 1e-13)
# GroupNorm + SiLU in fp32: exp and the normalisation add a few ulp to the rounding of the output
GN_TOLS = dict(TOLS)
GN_TOLS[torch.float32] = (1e-5, 1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _close(out, ref, dtype, what, tols=TOLS):
    """|out - ref| <= rtol |ref| + atol max(1, max|ref|), as tests/_util.assert_close_to_ref."""
    rtol, atol = tols[dtype]
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (an element was not written?)"
    if ref64.numel() == 0:
        return
    scale = max(1.0, ref64.abs().max().item())
    err = (out64 - ref64).abs()
    worst = (err - (rtol * ref64.abs() + atol * scale)).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} exceeds rtol={rtol}, atol={atol}*{scale:.3g}"


def _rand(shape, dtype, seed, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


# ---------------------------------------------------------------- coupling update
COUPLING_SHAPES = [(1,), (7,), (3, 5, 13), (2, 1031)]
DTYPE_PAIRS = [(d, d) for d in ALL_DTYPES] + [(torch.float64, torch.float32), (torch.float64, torch.bfloat16),
                                                (torch.float32, torch.bfloat16), (torch.float16, torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("shape", COUPLING_SHAPES, ids=str)
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["host", "coeffs"])
def test_coupling_update_matches_float64_reference(backend, pair, shape, with_coeffs):
    xd, fd = pair
    seed = hash((shape, str(pair))) % 10_000
    x, f = _rand(shape, xd, seed), _rand(shape, fd, seed + 1)
    a, b = 0.75, -1.25
    coeffs = torch.tensor([1.5, -0.5], dtype=torch.float64) if with_coeffs else None
    A, B = (a * 1.5, b * -0.5) if with_coeffs else (a, b)
    ref = A * x.double() + B * f.double()
    poison_allocator(x.numel(), xd)
    y = inv.coupling_update(x, f, a, b, coeffs=coeffs, backend=backend)
    assert y.shape == x.shape and y.dtype == xd
    _close(y, ref, xd, f"{backend} coupling {pair}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_coupling_in_place_variants(backend):
    x, f = _rand((4, 3, 37), torch.float32, 1), _rand((4, 3, 37), torch.float32, 2)
    expect = inv.coupling_update(x, f, 1.0, -1.0, backend=backend)
    x1 = x.clone()
    with torch.no_grad():
        out = inv.coupling_update(x1, f, 1.0, -1.0, inplace=True, backend=backend)
    assert out is x1 and torch.equal(x1, expect)
    # a non-contiguous x is updated through its own strides
    base = x.clone().transpose(0, 2)
    fb = f.transpose(0, 2)
    with torch.no_grad():
        inv.coupling_update(base, fb, 1.0, -1.0, inplace=True, backend=backend)
    assert torch.equal(base.transpose(0, 2), expect)
    # f is x: y = (a + b) x
    x2 = x.clone()
    with torch.no_grad():
        inv.coupling_update(x2, x2, 2.0, 0.5, inplace=True, backend=backend)
    assert torch.allclose(x2, 2.5 * x, rtol=1e-6)
    # f overlaps x at an offset: f is read as it was before the update
    buf = _rand((101,), torch.float32, 3)
    xs, fs = buf[:100], buf[1:]
    want = xs + fs
    with torch.no_grad():
        inv.coupling_update(xs, fs, inplace=True, backend=backend)
    assert torch.allclose(xs, want, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", [torch.float32, torch.float64], ids=str)
def test_idm_scaled_coupling_round_trip_with_device_coefficient(backend, state):
    """y1 = v x2 + (1 - v) F, inverted with coeffs [1/v, -(1-v)/v] computed on the device."""
    x2 = _rand((2, 3, 17), state, 5)
    F_ = _rand((2, 3, 17), torch.float32, 6)
    v = torch.tensor(0.3, dtype=torch.float64)
    fwd = torch.stack([v, 1 - v])
    back = torch.stack([1 / v, -(1 - v) / v])
    y1 = inv.coupling_update(x2, F_, coeffs=fwd, backend=backend)
    rec = inv.coupling_update(y1, F_, coeffs=back, backend=backend)
    err = ((rec.double() - x2.double()).abs().max() / x2.double().abs().max()).item()
    assert err <= (2e-15 if state == torch.float64 else 2e-6), err


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_coupling_update_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    f = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, f, c: torch.ops.pydiff.coupling_update(x, f, 0.5, -2.0, c), (x, f, c))
    assert torch.autograd.gradcheck(lambda x, f: inv.coupling_update(x, f, 1.0, -1.0), (x, f))
    # mixed dtypes: the gradient of f comes back in f's dtype
    f32 = f.detach().float().requires_grad_()
    y = inv.coupling_update(x, f32, 1.0, 2.0)
    y.sum().backward()
    assert f32.grad.dtype == torch.float32 and torch.all(f32.grad == 2.0)


# ---------------------------------------------------------------- fixed point
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fd", ALL_DTYPES, ids=str)
def test_fixed_point_update_is_bit_exact_and_matches_reference(backend, fd):
    shape = (3, 1031)
    g = torch.Generator().manual_seed(9)
    x = torch.randint(-2 ** 62, 2 ** 62, shape, generator=g, dtype=torch.int64)
    x[0, :5] = torch.tensor([2 ** 63 - 1, -2 ** 63, 2 ** 63 - 3, 0, 1])  # wrap-around
    f = _rand(shape, fd, 10, std=3.0)
    y = inv.coupling_update_fixed(x, f, 1.0, 30, backend=backend)
    assert y.dtype == torch.int64 and torch.equal(y, coupling_update_fixed_ref(x, f, 1.0, 30))
    back = inv.coupling_update_fixed(y, f, -1.0, 30, backend=backend)
    assert torch.equal(back, x)
    x2 = x.clone()
    inv.coupling_update_fixed(x2, f, 1.0, 30, inplace=True, backend=backend)
    assert torch.equal(x2, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_point_rounding_half_to_even_nan_and_clamp(backend):
    f = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.75, float("nan"), 1e30, -1e30, float("inf")])
    y = inv.coupling_update_fixed(torch.zeros(11, dtype=torch.int64), f, 1.0, 0, backend=backend)
    assert y.tolist() == [0, 2, 2, 0, -2, -2, 4, 0, 2 ** 62, -2 ** 62, 2 ** 62]


def test_to_from_fixed():
    x = _rand((5, 7), torch.float32, 4)
    q = to_fixed(x, 32)
    assert q.dtype == torch.int64 and torch.equal(from_fixed(q, 32), x)


# ---------------------------------------------------------------- GroupNorm + SiLU
GN_CASES = [
    # (shape, groups, affine)
    ((1, 1, 1), 1, True),
    ((2, 6, 7), 3, True),
    ((3, 4, 5, 7), 2, False),
    ((2, 8, 131), 4, True),
    ((1, 6, 1031), 1, True),
    ((1, 4, 32, 32), 2, True),  # H*W = 1024: the Triton kernels' one-channel-per-block path
]


def _gn_inputs(shape, groups, affine, dtype, seed, pdtype=None):
    x = _rand(shape, dtype, seed, mean=0.7, std=1.6)
    C = shape[1]
    pd = pdtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    w = _rand((C,), pd, seed + 1, mean=1.0, std=0.5) if affine else None
    b = _rand((C,), pd, seed + 2, std=0.5) if affine else None
    dy = _rand(shape, dtype, seed + 3)
    return x, w, b, dy


def _skip_big_for_triton(backend, shape, dtype):
    if backend == "triton" and math.prod(shape) > 1000 and dtype not in (torch.float32,):
        pytest.skip("keep interpreter runs small")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{c[0]}g{c[1]}{'a' if c[2] else ''}")
def test_groupnorm_silu_forward_matches_float64_reference(backend, dtype, case):
    shape, groups, affine = case
    _skip_big_for_triton(backend, shape, dtype)
    x, w, b, _ = _gn_inputs(shape, groups, affine, dtype, seed=hash(case) % 1000)
    y64, m64, r64 = groupnorm_silu_ref(x.double(), None if w is None else w.double(),
                                       None if b is None else b.double(), groups, 1e-5)
    poison_allocator(x.numel(), dtype)
    y, mean, rstd = inv.groupnorm_silu_forward(x, groups, w, b, 1e-5, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.shape == x.shape and y.dtype == dtype and mean.shape == (shape[0], groups) and mean.dtype == acc
    _close(y, y64, dtype, f"{backend} y", GN_TOLS)
    stat_tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert torch.allclose(mean.double(), m64, rtol=stat_tol, atol=stat_tol)
    assert torch.allclose(rstd.double(), r64, rtol=stat_tol, atol=0)


def test_reference_is_torch_group_norm_then_silu():
    x, w, b, _ = _gn_inputs((2, 6, 5, 3), 3, True, torch.float64, seed=1)
    y, _, _ = groupnorm_silu_ref(x, w, b, 3, 1e-6)
    assert torch.allclose(y, F.silu(F.group_norm(x, 3, w, b, 1e-6)), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{c[0]}g{c[1]}{'a' if c[2] else ''}")
def test_groupnorm_silu_backward_matches_float64_reference(backend, dtype, case):
    shape, groups, affine = case
    _skip_big_for_triton(backend, shape, dtype)
    x, w, b, dy = _gn_inputs(shape, groups, affine, dtype, seed=hash(case) % 1000 + 7)
    _, mean, rstd = groupnorm_silu_ref(x, w, b, groups, 1e-5)
    ref = groupnorm_silu_backward_ref(dy.double(), x.double(), None if w is None else w.double(),
                                      None if b is None else b.double(), mean.double(), rstd.double(), groups)
    poison_allocator(x.numel(), dtype)
    gx, gw, gb = inv.groupnorm_silu_backward(dy, x, w, b, mean, rstd, groups, backend=backend)
    assert gx.shape == x.shape and gx.dtype == dtype
    _close(gx, ref[0], dtype, f"{backend} grad_x", GN_TOLS)
    if affine:
        assert gw.dtype == w.dtype and gb.dtype == b.dtype
        ptol = 1e-12 if dtype == torch.float64 else 1e-5
        _close(gw, ref[1], torch.float64, f"{backend} grad_w", {torch.float64: (ptol, ptol)})
        _close(gb, ref[2], torch.float64, f"{backend} grad_b", {torch.float64: (ptol, ptol)})
    else:
        assert gw.numel() == 0 and gb.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupnorm_silu_autograd_matches_torch(backend):
    """The differentiable wrapper against F.silu(F.group_norm(...)) autograd, float64."""
    x, w, b, dy = _gn_inputs((2, 6, 3, 5), 3, True, torch.float64, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = inv.groupnorm_silu(leaves[0], 3, leaves[1], leaves[2], 1e-5, backend=backend)
    y.backward(dy)
    refl = [t.clone().requires_grad_() for t in (x, w, b)]
    F.silu(F.group_norm(refl[0], 3, refl[1], refl[2], 1e-5)).backward(dy)
    for got, want in zip(leaves, refl):
        assert torch.allclose(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x", "w", "b", "x,b", "w,b"])
@pytest.mark.parametrize("affine", ["both", "w", "b"])
def test_groupnorm_silu_partial_grads(backend, which, affine):
    """Any subset of x / weight / bias needing gradients, with either parameter absent (the C++
    autograd node numbers its input edges over the tensors actually given)."""
    x, w, b, dy = _gn_inputs((2, 6, 7), 3, True, torch.float64, seed=5)
    w = w if affine in ("both", "w") else None
    b = b if affine in ("both", "b") else None
    names = which.split(",")
    if (w is None and "w" in names) or (b is None and "b" in names):
        pytest.skip("parameter absent")
    ours = {"x": x.clone(), "w": None if w is None else w.clone(), "b": None if b is None else b.clone()}
    ref = {k: (None if v is None else v.clone()) for k, v in ours.items()}
    for d in (ours, ref):
        for k in names:
            d[k].requires_grad_()
    y = inv.groupnorm_silu(ours["x"], 3, ours["w"], ours["b"], 1e-5, backend=backend)
    assert y.requires_grad
    y.backward(dy)
    # (torch 2.11's group_norm backward fails for weight None with a bias needing grad: ones instead)
    rw = ref["w"] if ref["w"] is not None else torch.ones(6, dtype=torch.float64)
    F.silu(F.group_norm(ref["x"], 3, rw, ref["b"], 1e-5)).backward(dy)
    for k in ("x", "w", "b"):
        if k in names:
            assert torch.allclose(ours[k].grad, ref[k].grad, rtol=1e-10, atol=1e-12), k
        elif ours[k] is not None:
            assert ours[k].grad is None, k
    # nothing needs a gradient: no graph
    with torch.no_grad():
        assert not inv.groupnorm_silu(ours["x"], 3, ours["w"], ours["b"], backend=backend).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a,b", [(1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (0.5, -2.0)])
def test_coupling_update_grads_with_other_consumers(backend, a, b):
    """dx = a g, df = b g (for a, b = +-1 the node hands g itself on): correct when x and f are the
    same tensor, and when the gradients are accumulated with other uses of x and f."""
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(4, 33, dtype=torch.float64, generator=g)
    f0 = torch.randn(4, 33, dtype=torch.float64, generator=g)
    w = torch.randn(4, 33, dtype=torch.float64, generator=g)
    x, f = x0.clone().requires_grad_(), f0.clone().requires_grad_()
    y = inv.coupling_update(x, f, a, b, backend=backend)
    ((y * w).sum() + (3 * x).sum() + (f * f).sum()).backward()
    assert torch.equal(x.grad, a * w + 3) and torch.allclose(f.grad, b * w + 2 * f0, rtol=0, atol=1e-15)
    s = x0.clone().requires_grad_()
    (inv.coupling_update(s, s, a, b, backend=backend) * w).sum().backward()
    assert torch.allclose(s.grad, (a + b) * w, rtol=0, atol=1e-15)
    # bf16 x with an fp32 f: each gradient in its input's dtype
    xb, ff = x0.bfloat16().requires_grad_(), f0.float().requires_grad_()
    inv.coupling_update(xb, ff, a, b, backend=backend).backward(w.bfloat16())
    assert xb.grad.dtype == torch.bfloat16 and ff.grad.dtype == torch.float32
    assert torch.equal(xb.grad, (w.bfloat16().float() * a).bfloat16())
    assert torch.equal(ff.grad, w.bfloat16().float() * b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupnorm_silu_gradcheck(backend):
    x, w, b, _ = _gn_inputs((2, 4, 3), 2, True, torch.float64, seed=4)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: inv.groupnorm_silu(x, 2, w, b, 1e-5, backend=backend), args)
    # only x needs a gradient, no affine parameters
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: inv.groupnorm_silu(x, 4, backend=backend), (xx,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupnorm_silu_mixed_precision_params_and_layouts(backend):
    """bf16 activations with fp32 parameters; channels-last and strided inputs."""
    x, w, b, dy = _gn_inputs((2, 8, 5, 3), 4, True, torch.bfloat16, seed=8, pdtype=torch.float32)
    ref = groupnorm_silu_ref(x.double(), w.double(), b.double(), 4, 1e-5)[0]
    y = inv.groupnorm_silu(x, 4, w, b, backend=backend)
    assert y.dtype == torch.bfloat16
    _close(y, ref, torch.bfloat16, f"{backend} bf16/fp32")
    xc = x.float().to(memory_format=torch.channels_last)
    ref32 = groupnorm_silu_ref(xc.double(), w.double(), b.double(), 4, 1e-5)[0]
    _close(inv.groupnorm_silu(xc, 4, w, b, backend=backend), ref32, torch.float32, f"{backend} channels_last", GN_TOLS)
    xt = x.float().transpose(2, 3)
    ref_t = groupnorm_silu_ref(xt.double(), w.double(), b.double(), 4, 1e-5)[0]
    _close(inv.groupnorm_silu(xt, 4, w, b, backend=backend), ref_t, torch.float32, f"{backend} strided", GN_TOLS)
    xg = x.float().requires_grad_()
    inv.groupnorm_silu(xg, 4, w, b, backend=backend).backward(dy.float())
    assert xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupnorm_statistics_survive_a_large_mean(backend):
    """float64 (shifted) sums: x = 1000 + small noise still normalises to fp32 accuracy."""
    x = _rand((2, 4, 257), torch.float32, 12, mean=1000.0, std=0.01)
    ref = groupnorm_silu_ref(x.double(), None, None, 2, 1e-6)[0]
    y = inv.groupnorm_silu(x, 2, eps=1e-6, backend=backend)
    assert (y.double() - ref).abs().max().item() < 5e-4  # |y| ~ 1; fp32 input spacing at 1000 is 6e-5 / 0.01 std


def test_empty_batch():
    for b in BACKENDS:
        x = torch.empty(0, 4, 3)
        y, mean, rstd = inv.groupnorm_silu_forward(x, 2, backend=b)
        assert y.shape == (0, 4, 3) and mean.shape == (0, 2)
        w = torch.ones(4)
        gx, gw, gb = inv.groupnorm_silu_backward(x, x, w, w, mean, rstd, 2, backend=b)
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros(4)) and torch.equal(gb, torch.zeros(4))
        assert inv.coupling_update(torch.empty(0), torch.empty(0), backend=b).shape == (0,)


def test_autocast_keeps_activation_dtype():
    x, w, b, _ = _gn_inputs((2, 4, 6), 2, True, torch.bfloat16, seed=2, pdtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = inv.groupnorm_silu(x, 2, w, b)
    assert y.dtype == torch.bfloat16


# ---------------------------------------------------------------- registration
@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_opcheck_all_ops():
    x, f = _rand((3, 7), torch.float32, 1), _rand((3, 7), torch.float64, 2)
    c = torch.tensor([0.5, 2.0])
    torch.library.opcheck(torch.ops.pydiff.coupling_update.default, (x, f, 1.0, -1.0, c))
    torch.library.opcheck(torch.ops.pydiff.coupling_update.default, (x, x.half(), 0.5, 2.0))
    torch.library.opcheck(torch.ops.pydiff.coupling_update_.default, (x.clone(), f, 1.0, -1.0, None))
    q = torch.randint(-1000, 1000, (3, 7))
    torch.library.opcheck(torch.ops.pydiff.coupling_update_fixed.default, (q, x, 1.0, 8))
    torch.library.opcheck(torch.ops.pydiff.coupling_update_fixed_.default, (q.clone(), x, -1.0, 8))
    xg, w, b, dy = _gn_inputs((2, 4, 5), 2, True, torch.float32, seed=5)
    torch.library.opcheck(torch.ops.pydiff.groupnorm_silu.default, (xg, w, b, 2, 1e-5))
    torch.library.opcheck(torch.ops.pydiff.groupnorm_silu.default, (xg.double(), None, None, 4, 1e-5))
    _, mean, rstd = torch.ops.pydiff.groupnorm_silu(xg, w, b, 2, 1e-5)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.pydiff.groupnorm_silu_backward.default, (dy, xg, w, b, mean, rstd, 2, mask))


def test_torch_compile_fullgraph():
    x, w, b, dy = _gn_inputs((2, 4, 5), 2, True, torch.float32, seed=6)
    f = _rand((2, 4, 5), torch.float32, 7)

    def fn(x, f, w, b):
        y = torch.ops.pydiff.coupling_update(x, f, 1.0, -1.0)
        z = torch.ops.pydiff.groupnorm_silu(y, w, b, 2, 1e-5)[0]
        q = torch.ops.pydiff.coupling_update_fixed(torch.zeros_like(z, dtype=torch.int64), z, 1.0, 16)
        s = z.clone()
        torch.ops.pydiff.coupling_update_(s, f, 2.0, 1.0)
        return z, q, s

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, f, w, b), fn(x, f, w, b)):
        assert torch.equal(got, want)
    # autograd through the compiled graph (registered backward)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    out = torch.compile(lambda x, w: torch.ops.pydiff.groupnorm_silu(x, w, b, 2, 1e-5)[0], fullgraph=True,
                        backend="aot_eager")(xg, wg)
    out.backward(dy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.silu(F.group_norm(xr, 2, wr, b, 1e-5)).backward(dy)
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(wg.grad, wr.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,exc,msg", [
    ("f_shape", ValueError, "f: expected shape"),
    ("x_dtype", TypeError, "x: expected dtype"),
    ("f_device", ValueError, "f: expected device"),
    ("nan_a", ValueError, "a, b: expected finite"),
    ("coeffs_len", ValueError, "coeffs: expected 2 elements"),
    ("coeffs_dtype", TypeError, "coeffs: expected dtype"),
    ("expanded_inplace", ValueError, "x: expected a tensor without internal overlap"),
    ("grad_inplace", RuntimeError, "x: the in-place coupling update is not differentiable"),
])
def test_coupling_bad_input(backend, case, exc, msg):
    x, f = torch.randn(2, 3), torch.randn(2, 3)
    kw = dict(backend=backend)
    a = 1.0
    if case == "f_shape":
        f = torch.randn(3, 2)
    elif case == "x_dtype":
        x = torch.ones(2, 3, dtype=torch.int32)
    elif case == "f_device":
        f = torch.randn(2, 3, device="meta")
    elif case == "nan_a":
        a = float("nan")
    elif case == "coeffs_len":
        kw["coeffs"] = torch.ones(3)
    elif case == "coeffs_dtype":
        kw["coeffs"] = torch.ones(2, dtype=torch.float16)
    elif case == "expanded_inplace":
        x, kw["inplace"] = torch.randn(1, 3).expand(2, 3), True
    elif case == "grad_inplace":
        x, kw["inplace"] = x.requires_grad_(), True
    with pytest.raises(exc) as ei:
        inv.coupling_update(x, f, a, **kw)
    assert msg in str(ei.value)


@pytest.mark.parametrize("case,exc,msg", [
    ("x_float", TypeError, "x: expected dtype int64"),
    ("f_int", TypeError, "f: expected dtype"),
    ("bits", ValueError, "frac_bits: expected an int in 0..62"),
    ("scale", ValueError, "scale: expected a finite number"),
])
def test_fixed_bad_input(case, exc, msg):
    x, f, s, k = torch.zeros(4, dtype=torch.int64), torch.randn(4), 1.0, 8
    if case == "x_float":
        x = torch.zeros(4)
    elif case == "f_int":
        f = torch.zeros(4, dtype=torch.int64)
    elif case == "bits":
        k = 63
    elif case == "scale":
        s = float("inf")
    with pytest.raises(exc) as ei:
        inv.coupling_update_fixed(x, f, s, k)
    assert msg in str(ei.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,exc,msg", [
    ("rank", ValueError, "x: expected shape [N, C, *]"),
    ("groups", ValueError, "groups: expected a divisor of the 6 channels"),
    ("weight_shape", ValueError, "weight: expected shape (6,)"),
    ("bias_dtype", TypeError, "bias: expected dtype"),
    ("eps", ValueError, "eps: expected a finite number >= 0"),
    ("x_dtype", TypeError, "x: expected dtype"),
    ("no_elems", ValueError, "x: expected at least one channel and one element per channel"),
])
def test_groupnorm_bad_input(backend, case, exc, msg):
    x, w, b, groups, eps = torch.randn(2, 6, 4), torch.ones(6), torch.zeros(6), 3, 1e-5
    if case == "rank":
        x = torch.randn(6)
    elif case == "groups":
        groups = 4
    elif case == "weight_shape":
        w = torch.ones(5)
    elif case == "bias_dtype":
        b = torch.zeros(6, dtype=torch.int64)
    elif case == "eps":
        eps = -1.0
    elif case == "x_dtype":
        x = torch.ones(2, 6, 4, dtype=torch.int64)
    elif case == "no_elems":
        x = torch.randn(2, 6, 0)
    with pytest.raises(exc) as ei:
        inv.groupnorm_silu(x, groups, w, b, eps, backend=backend)
    assert msg in str(ei.value)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
@pytest.mark.parametrize("case", ["coupling_shape", "coupling_dtype", "coeffs", "fixed_bits", "gn_groups", "gn_weight",
                                  "gn_mean", "gn_grad_dtype"])
def test_raw_ops_check_their_arguments(case):
    """The C++ ops validate on their own (never read out of bounds), naming the argument."""
    x = torch.randn(2, 6, 4)
    w = torch.ones(6)
    calls = {
        "coupling_shape": (lambda: torch.ops.pydiff.coupling_update(x, torch.randn(5), 1.0, 1.0), "f: expected shape"),
        "coupling_dtype": (lambda: torch.ops.pydiff.coupling_update(x.int(), x, 1.0, 1.0), "x: expected dtype"),
        "coeffs": (lambda: torch.ops.pydiff.coupling_update(x, x, 1.0, 1.0, torch.ones(3)), "coeffs: expected 2"),
        "fixed_bits": (lambda: torch.ops.pydiff.coupling_update_fixed(x.long(), x, 1.0, 70), "frac_bits: expected"),
        "gn_groups": (lambda: torch.ops.pydiff.groupnorm_silu(x, None, None, 4, 1e-5), "groups: expected a divisor"),
        "gn_weight": (lambda: torch.ops.pydiff.groupnorm_silu(x, torch.ones(5), None, 3, 1e-5), "weight: expected"),
        "gn_mean": (lambda: torch.ops.pydiff.groupnorm_silu_backward(x, x, w, None, torch.zeros(5), torch.ones(6), 3,
                                                                     [True, True, True]), "mean: expected shape (2, 3)"),
        "gn_grad_dtype": (lambda: torch.ops.pydiff.groupnorm_silu_backward(x.double(), x, w, None, torch.zeros(6),
                                                                           torch.ones(6), 3, [True, True, True]),
                          "grad_y: expected dtype"),
    }
    fn, msg = calls[case]
    with pytest.raises((ValueError, TypeError)) as ei:
        fn()
    assert msg in str(ei.value)


def test_ops_exist_without_compiled_extension():
    """No compiler at install time: the invertible ops run on the torch reference (and Triton)."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import pydiff\n"
        "from pydiff.ops import invertible as inv\n"
        "x = torch.randn(2, 4, 5); f = torch.randn(2, 4, 5); w = torch.rand(4) + 0.5\n"
        "assert torch.allclose(torch.ops.pydiff.coupling_update(x, f, 1.0, -1.0), x - f)\n"
        "y = x.clone(); torch.ops.pydiff.coupling_update_(y, f, 1.0, 1.0); assert torch.allclose(y, x + f)\n"
        "q = torch.ops.pydiff.coupling_update_fixed(torch.zeros(3, dtype=torch.int64), torch.tensor([0.5, 1.5, -2.5]), 1.0, 0)\n"
        "assert q.tolist() == [0, 2, -2]\n"
        "xg = x.clone().requires_grad_()\n"
        "out = torch.ops.pydiff.groupnorm_silu(xg, w, None, 2, 1e-5)[0]\n"
        "ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, w, None, 1e-5))\n"
        "assert torch.allclose(out, ref, atol=1e-5)\n"
        "out.sum().backward(); assert torch.isfinite(xg.grad).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYDIFF_SIMULATE_NO_EXT="1")
    env.pop("PYDIFF_DISABLE_EXT", None)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
