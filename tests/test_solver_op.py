"""torch.ops.pydiff.solver_step / cfg_rescale: every backend against the float64 reference."""
import math
import random

import pytest
import torch

import pydiff
from pydiff.ops.solver import MAX_HISTORY, StepCoeffs, check_solver_step_args
from pydiff.reference.solver import cfg_rescale_ref, num_coeffs, solver_step_ref

from _util import CPU, DTYPES, assert_close_to_ref, poison_allocator

BACKENDS = pydiff.available_backends(CPU)
# odd sizes: 1, primes, non-multiples of the CPU chunk (512) and the Triton block (1024)
SHAPES = [(1,), (7,), (3, 5, 13), (2, 4, 7, 9), (1, 1031), (2, 1543)]


def _rand_coeffs(k, gen):
    return [round(random.Random(gen.initial_seed() + i).uniform(-1.5, 1.5), 6) for i in range(num_coeffs(k))]


def _inputs(shape, dtype, k, *, cond=True, uncond=True, noise=True, rs=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    x = mk()
    c = mk() if cond else None
    u = mk() if (uncond and cond) else None
    z = mk() if noise else None
    hist = [mk() for _ in range(k)]
    row_scale = (torch.rand(shape[0], generator=g) + 0.5) if rs else None
    return x, c, u, hist, z, row_scale, _rand_coeffs(k, g)


CONFIGS = [
    # (history, cond, uncond, noise, row_scale, clip)
    (0, True, False, False, False, None),
    (1, True, True, False, False, None),
    (2, True, True, True, True, (-1.0, 1.0)),
    (3, True, False, True, False, (-0.5, 0.25)),
    (6, True, True, True, True, None),
    (2, False, False, False, False, None),
    (4, True, True, False, False, None),  # every history length has its own compiled CPU loop
    (5, False, False, True, False, (-1.0, 0.5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c[0]}c{int(c[1])}u{int(c[2])}z{int(c[3])}r{int(c[4])}clip{int(c[5] is not None)}")
def test_solver_step_matches_float64_reference(backend, dtype, shape, cfg):
    k, cond, uncond, noise, rs, clip = cfg
    if backend == "triton" and (shape[-1] > 1000 and dtype != torch.float32):
        pytest.skip("keep interpreter runs small")
    x, c, u, hist, z, r, coeffs = _inputs(shape, dtype, k, cond=cond, uncond=uncond, noise=noise, rs=rs,
                                          seed=hash((shape, k, str(dtype))) % 10_000)
    lo, hi = clip if clip else (-math.inf, math.inf)
    ref_x, ref_h = solver_step_ref(x, c, u, hist, z, r, coeffs, lo, hi, compute_dtype=torch.float64)
    # the reference in float64 without the cast to x's dtype
    ref64 = solver_step_ref(x.double(), None if c is None else c.double(), None if u is None else u.double(),
                            [h.double() for h in hist], None if z is None else z.double(), r, coeffs, lo, hi)
    poison_allocator(x.numel(), dtype)
    out_x, out_h = pydiff.solver_step(x, c, u, hist, z, coeffs=coeffs, row_scale=r, clip=clip, backend=backend)
    assert out_x.shape == x.shape and out_x.dtype == dtype and out_h.dtype == dtype
    assert_close_to_ref(out_x, ref64[0], dtype, f"{backend} x_next")
    assert_close_to_ref(out_h, ref64[1], dtype, f"{backend} history entry")
    del ref_x, ref_h


@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_step_device_table_and_step_counter(backend):
    """Coefficients from a float64 table at a device-side step index (clamped to the table)."""
    shape, k = (2, 3, 11), 2
    x, c, u, hist, z, _, _ = _inputs(shape, torch.float32, k, seed=3)
    gen = torch.Generator().manual_seed(5)
    table = torch.rand((4, num_coeffs(k)), generator=gen, dtype=torch.float64) * 2 - 1
    for s in (0, 2, 3, 7, -1):
        step = torch.tensor([s], dtype=torch.int64)
        row = table[min(max(s, 0), 3)].tolist()
        ref = solver_step_ref(x, c, u, hist, z, None, row)
        out = pydiff.solver_step(x, c, u, hist, z, coeff_table=table, step=step, backend=backend)
        for o, rr in zip(out, ref):
            assert_close_to_ref(o, rr, torch.float32, f"{backend} table row {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_step_strided_inputs(backend):
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(5, 6, 7, generator=g).transpose(1, 2) for _ in range(4)]
    x, c, u, h = base
    coeffs = _rand_coeffs(1, g)
    ref = solver_step_ref(x, c, u, [h], None, None, coeffs)
    out = pydiff.solver_step(x, c, u, [h], coeffs=coeffs, backend=backend)
    for o, rr in zip(out, ref):
        assert o.shape == x.shape
        assert_close_to_ref(o, rr, torch.float32, f"{backend} strided")


def test_nan_propagates_and_clip_passes_nan():
    x = torch.tensor([[1.0, float("nan"), 3.0]])
    c = torch.tensor([[0.5, 0.5, float("nan")]])
    k = StepCoeffs(0).set(px=1.0, pm=1.0).out(0, d=1.0).out(1, x=1.0)
    for b in BACKENDS:
        out, _ = pydiff.solver_step(x, c, coeffs=k, clip=(-1.0, 1.0), backend=b)
        assert out[0, 0].item() == 1.0 and math.isnan(out[0, 1].item()) and math.isnan(out[0, 2].item()), b


def test_empty_tensor():
    for b in BACKENDS:
        x = torch.empty(0, 4)
        out = pydiff.solver_step(x, x, coeffs=[0.5] * num_coeffs(0), backend=b)
        assert out[0].shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 7), (2, 4, 33, 31)], ids=str)
def test_cfg_rescale_matches_reference(backend, dtype, shape):
    g = torch.Generator().manual_seed(7)
    c = (torch.randn(shape, generator=g) * 1.3 + 0.2).to(dtype)
    u = torch.randn(shape, generator=g).to(dtype)
    ref = cfg_rescale_ref(c, u, 7.5, 0.7).double()
    out = pydiff.cfg_rescale(c, u, 7.5, 0.7, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6), (out, ref)


def test_guidance_rescale_end_to_end_matches_diffusers_formula():
    """row_scale from cfg_rescale reproduces diffusers' rescale_noise_cfg inside the fused step."""
    g = torch.Generator().manual_seed(2)
    x, c, u = (torch.randn(2, 4, 9, 9, generator=g) for _ in range(3))
    gs, phi = 5.0, 0.7
    cfg = u + gs * (c - u)
    std_c = c.std(dim=(1, 2, 3), keepdim=True)
    std_f = cfg.std(dim=(1, 2, 3), keepdim=True)
    expect = phi * cfg * (std_c / std_f) + (1 - phi) * cfg
    k = StepCoeffs(0).set(g=gs).out(0, m=1.0)
    for b in BACKENDS:
        r = pydiff.cfg_rescale(c, u, gs, phi, backend=b)
        out, _ = pydiff.solver_step(x, c, u, coeffs=k, row_scale=r, backend=b)
        assert torch.allclose(out, expect, rtol=1e-5, atol=1e-5), b


# ---------------------------------------------------------------- registration
def _op_args(k=2, seed=0):
    x, c, u, hist, z, r, coeffs = _inputs((2, 3, 5), torch.float32, k, rs=True, seed=seed)
    return (x, c, u, hist, z, r, coeffs, None, None, -2.0, 2.0)


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_opcheck_solver_step():
    torch.library.opcheck(torch.ops.pydiff.solver_step.default, _op_args())
    x, c, u, hist, z, r, _ = _inputs((3, 7), torch.float32, 1, seed=4)
    table = torch.rand((3, num_coeffs(1)), dtype=torch.float64)
    torch.library.opcheck(torch.ops.pydiff.solver_step.default,
                          (x, c, u, hist, z, None, [], table, torch.tensor([1]), -math.inf, math.inf))


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_opcheck_cfg_rescale():
    g = torch.Generator().manual_seed(0)
    torch.library.opcheck(torch.ops.pydiff.cfg_rescale.default,
                          (torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g), 3.0, 0.5))


def test_torch_compile_fullgraph():
    args = _op_args(k=1, seed=9)
    x, c, u, hist, z, r, coeffs = args[:7]

    def f(x, c, u, h0, z, r):
        a, b = torch.ops.pydiff.solver_step(x * 1.0, c, u, [h0], z, r, coeffs, None, None, -2.0, 2.0)
        return a + b

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, c, u, hist[0], z, r)
    ref = f(x, c, u, hist[0], z, r)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- bad input
def _good():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g)
    return dict(x=x, c=torch.randn(2, 3, generator=g), h=[torch.randn(2, 3, generator=g)], coeffs=[0.1] * num_coeffs(1))


@pytest.mark.parametrize("case,exc,msg", [
    ("shape", ValueError, "model_cond: expected shape"),
    ("dtype", TypeError, "model_cond: expected dtype"),
    ("int_x", TypeError, "x: expected dtype"),
    ("history_len", ValueError, "coeffs: expected 20 values for 2 history entries, got 18"),
    ("history_shape", ValueError, "history[0]: expected shape"),
    ("too_many_history", ValueError, "history: expected at most 6"),
    ("nan_coeff", ValueError, "coeffs[3]: expected a finite coefficient"),
    ("inf_coeff", ValueError, "coeffs[0]: expected a finite coefficient"),
    ("device", ValueError, "noise: expected device"),
    ("uncond_only", ValueError, "model_uncond: given without model_cond"),
    ("row_scale", ValueError, "row_scale: expected shape"),
    ("table_and_coeffs", ValueError, "coeffs: pass either coeffs or coeff_table"),
    ("table_dtype", TypeError, "coeff_table: expected a 2-D float64"),
    ("no_step", TypeError, "step: expected a one-element int64"),
    ("scalar_x", ValueError, "x: expected at least 1 dimension"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clear_errors(case, exc, msg, backend):
    a = _good()
    kw = dict(coeffs=a["coeffs"], backend=backend)
    x, c, h, u, z = a["x"], a["c"], a["h"], None, None
    if case == "shape":
        c = torch.randn(2, 4)
    elif case == "dtype":
        c = c.double()
    elif case == "int_x":
        x = torch.ones(2, 3, dtype=torch.int32)
    elif case == "history_len":
        h = h + [h[0]]
        kw["coeffs"] = [0.1] * num_coeffs(1)
    elif case == "history_shape":
        h = [torch.randn(3, 2)]
    elif case == "too_many_history":
        h = h * (MAX_HISTORY + 1)
    elif case == "nan_coeff":
        kw["coeffs"] = list(a["coeffs"])
        kw["coeffs"][3] = float("nan")
    elif case == "inf_coeff":
        kw["coeffs"] = list(a["coeffs"])
        kw["coeffs"][0] = float("inf")
    elif case == "device":
        z = torch.randn(2, 3, device="meta")
    elif case == "uncond_only":
        u, c = c, None
    elif case == "row_scale":
        kw["row_scale"] = torch.ones(3)
    elif case == "table_and_coeffs":
        kw["coeff_table"] = torch.zeros(1, num_coeffs(1), dtype=torch.float64)
        kw["step"] = torch.zeros(1, dtype=torch.int64)
    elif case == "table_dtype":
        kw["coeffs"] = ()
        kw["coeff_table"] = torch.zeros(1, num_coeffs(1))
        kw["step"] = torch.zeros(1, dtype=torch.int64)
    elif case == "no_step":
        kw["coeffs"] = ()
        kw["coeff_table"] = torch.zeros(1, num_coeffs(1), dtype=torch.float64)
    elif case == "scalar_x":
        x, c, h = torch.tensor(1.0), None, []
        kw["coeffs"] = [0.1] * num_coeffs(0)
    with pytest.raises(exc) as ei:
        pydiff.solver_step(x, c, u, h, z, **kw)
    assert msg in str(ei.value)


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
@pytest.mark.parametrize("case", ["shape", "dtype", "coeffs", "nan", "history", "meta_noise", "nan_clip"])
def test_raw_op_checks_its_arguments(case):
    """The C++ op validates on its own: torch.ops.pydiff.solver_step never reads out of bounds."""
    a = _good()
    x, c, h, coeffs = a["x"], a["c"], a["h"], a["coeffs"]
    if case == "shape":
        c = torch.randn(5)
    elif case == "dtype":
        c = c.half()
    elif case == "coeffs":
        coeffs = coeffs[:-1]
    elif case == "nan":
        coeffs = [float("nan")] + coeffs[1:]
    elif case == "history":
        h = [torch.randn(1)]
    noise, lo = None, -math.inf
    if case == "meta_noise":  # the dispatcher picks the Meta (fake) kernel: it must not return garbage
        noise = torch.randn(2, 3, device="meta")
    elif case == "nan_clip":
        lo = math.nan
    with pytest.raises((ValueError, TypeError)) as ei:
        torch.ops.pydiff.solver_step(x, c, None, h, noise, None, coeffs, None, None, lo, math.inf)
    if case == "meta_noise":
        assert "noise: expected device cpu" in str(ei.value)
    if case == "nan_clip":
        assert "clip: expected numbers" in str(ei.value)


def test_backend_selection():
    assert pydiff.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend: expected one of"):
        pydiff.set_backend("bogus")
    with pytest.raises(RuntimeError, match="'cuda' cannot run tensors on cpu"):
        pydiff.solver_step(torch.ones(2), torch.ones(2), coeffs=[0.0] * num_coeffs(0), backend="cuda")
    x = torch.randn(4, 3)
    k = [0.3] * num_coeffs(0)
    with pydiff.use_backend("torch"):
        assert pydiff.get_backend() == "torch"
        a = pydiff.solver_step(x, x, coeffs=k)[0]
    assert pydiff.get_backend() == "auto"
    b = pydiff.solver_step(x, x, coeffs=k)[0]
    assert torch.allclose(a, b, atol=1e-6)


def test_step_coeffs_builder():
    c = StepCoeffs(history=2).set(g=7.5, px=2.0).out(0, x=1.0, h=[0.5, 0.25]).out(1, d=1.0)
    v = c.tolist()
    assert len(v) == num_coeffs(2) and v[0] == 7.5 and v[1] == 2.0
    assert v[6] == 1.0 and v[6 + 5] == 0.5 and v[6 + 6] == 0.25 and v[6 + 7 + 2] == 1.0
    with pytest.raises(KeyError, match="unknown term"):
        c.out(0, q=1.0)
    with pytest.raises(ValueError, match="history: expected 0..6"):
        StepCoeffs(history=7)
    with pytest.raises(ValueError):
        check_solver_step_args(torch.ones(2), None, None, [], None, None, [0.0] * 3, None, None, 0.0, 1.0)


def test_without_compiled_extension_imports_with_one_warning_and_runs():
    """No compiler at install time: pydiff imports, warns once, and the ops run on torch/Triton."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pydiff\n"
        "msgs = [str(x.message) for x in w if 'pydiff' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'compiled extension' in msgs[0], msgs\n"
        "assert 'cpu' not in pydiff.available_backends(torch.device('cpu'))\n"
        "x = torch.randn(3, 4); n = pydiff.reference.num_coeffs(0)\n"
        "a = torch.ops.pydiff.solver_step(x, x, None, [], None, None, [0.5] * n, None, None, -1.0, 1.0)[0]\n"
        "b = pydiff.solver_step(x, x, coeffs=[0.5] * n, clip=(-1.0, 1.0))[0]\n"
        "assert torch.allclose(a, b)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYDIFF_SIMULATE_NO_EXT="1")
    env.pop("PYDIFF_DISABLE_EXT", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_history_false_skips_the_second_output(backend):
    x, c, u, hist, z, r, coeffs = _inputs((3, 5, 7), torch.float32, 2, rs=True, seed=11)
    ref = solver_step_ref(x.double(), c.double(), u.double(), [h.double() for h in hist], z.double(), r, coeffs)
    out_x, out_h = pydiff.solver_step(x, c, u, hist, z, coeffs=coeffs, row_scale=r, write_history=False,
                                      backend=backend)
    assert out_h.numel() == 0
    assert_close_to_ref(out_x, ref[0], torch.float32, backend)
    # auto: an all-zero history row is not written
    k = StepCoeffs(0).set(px=1.0).out(0, x=0.5, d=0.5)
    assert pydiff.solver_step(x, c, coeffs=k, backend=backend)[1].numel() == 0
    assert pydiff.solver_step(x, c, coeffs=k.out(1, x=1.0), backend=backend)[1].shape == x.shape


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_opcheck_solver_step_without_history_output():
    torch.library.opcheck(torch.ops.pydiff.solver_step.default, _op_args() + (False,))


def test_float64_runs_on_the_torch_backend_in_float64():
    x, c, u, hist, z, r, coeffs = _inputs((2, 3, 5), torch.float64, 1, rs=True, seed=21)
    out = pydiff.solver_step(x, c, u, hist, z, coeffs=coeffs, row_scale=r)
    ref = solver_step_ref(x, c, u, hist, z, r, coeffs)
    assert out[0].dtype == torch.float64 and torch.allclose(out[0], ref[0], rtol=1e-14, atol=1e-14)
    if "cpu" in BACKENDS:
        with pytest.raises(TypeError, match="float64 runs on the 'torch' backend only"):
            pydiff.solver_step(x, c, u, hist, z, coeffs=coeffs, backend="cpu")


# ---------------------------------------------------------------- x0 statistics (solver_step_track)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 13), (1, 1031), (2, 1543)], ids=str)
@pytest.mark.parametrize("clip", [None, (-0.5, 0.25)], ids=["noclip", "clip"])
def test_x0_stats_accumulate_in_the_step_kernel(backend, dtype, shape, clip):
    """x0_stats[0] += d, x0_stats[1] += d^2 (float64) inside the same call, outputs unchanged."""
    x, c, u, hist, z, r, coeffs = _inputs(shape, dtype, 2, rs=True, seed=11)
    g = torch.Generator().manual_seed(5)
    stats = torch.randn((2,) + shape, generator=g, dtype=torch.float64)  # accumulates onto existing sums
    before = stats.clone()
    out, h = pydiff.solver_step(x, c, u, hist, z, coeffs=coeffs, row_scale=r, clip=clip, backend=backend,
                                x0_stats=stats)
    plain = pydiff.solver_step(x, c, u, hist, z, coeffs=coeffs, row_scale=r, clip=clip, backend=backend)
    assert torch.equal(out, plain[0]) and torch.equal(h, plain[1])
    # d in float64 from the reference formula
    ref = torch.zeros((2,) + shape, dtype=torch.float64)
    lo, hi = clip if clip else (-math.inf, math.inf)
    solver_step_ref(x, c, u, hist, z, r, coeffs, lo, hi, x0_stats=ref)
    d = ref[0]
    tol = 2e-6 * (1 + d.abs())
    assert ((stats[0] - before[0] - d).abs() <= tol).all()
    assert ((stats[1] - before[1] - d * d).abs() <= 2 * tol * (1 + d.abs())).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_x0_stats_with_device_table(backend):
    x, c, u, hist, z, _, _ = _inputs((3, 7), torch.float32, 1, seed=4)
    table = torch.rand((3, num_coeffs(1)), dtype=torch.float64)
    stats = torch.zeros((2, 3, 7), dtype=torch.float64)
    pydiff.solver_step(x, c, u, hist, z, coeff_table=table, step=torch.tensor([2]), backend=backend, x0_stats=stats)
    ref = torch.zeros_like(stats)
    solver_step_ref(x, c, u, hist, z, None, table[2], x0_stats=ref)
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_opcheck_solver_step_track():
    stats = torch.rand((2, 2, 3, 5), dtype=torch.float64)
    torch.library.opcheck(torch.ops.pydiff.solver_step_track.default, _op_args() + (True, stats))


@pytest.mark.skipif(not pydiff.build_info()["cpu_kernels"], reason="compiled extension not built")
def test_raw_track_op_checks_x0_stats():
    args = _op_args() + (True,)
    with pytest.raises(TypeError, match="x0_stats"):
        torch.ops.pydiff.solver_step_track(*args, torch.zeros((2, 2, 3, 5)))
    with pytest.raises(ValueError, match="x0_stats"):
        torch.ops.pydiff.solver_step_track(*args, torch.zeros((2, 2, 3, 4), dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.pydiff.solver_step_track(*args, torch.zeros((2, 2, 5, 3), dtype=torch.float64).transpose(2, 3))


@pytest.mark.parametrize("backend", [None, "auto", "cpu", "torch", "triton", "cuda", "nope"])
def test_resolve_tensor_agrees_with_resolve(backend):
    """backend.resolve_tensor (solver_step's hot-path resolution) answers as resolve(backend, t.device),
    errors included, for CPU and meta tensors."""
    from pydiff import backend as B

    for t in (torch.zeros(2), torch.zeros(2, device="meta")):
        try:
            want = B.resolve(backend, t.device)
        except (ValueError, RuntimeError) as exc:
            with pytest.raises(type(exc), match="backend"):
                B.resolve_tensor(backend, t)
        else:
            assert B.resolve_tensor(backend, t) == want
