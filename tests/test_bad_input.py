"""Regression tests from an adversarial review of the public ops (bad or unusual input on every
backend): strided inputs the Triton launchers passed through raw, an int32 overflow the GEMM
could reach, empty inputs, unclear exceptions, and ``check=False`` on the backends that have no
checks of their own (the Triton launchers then read and wrote out of bounds)."""
import pytest
import torch

import pydiff
from pydiff.ops import invertible as inv
from pydiff.ops import quant as Q
from pydiff.ops.solver import cfg_rescale, solver_step
from pydiff.reference.solver import num_coeffs

from _util import CPU

BACKENDS = pydiff.available_backends(CPU)
HAS_TRITON = "triton" in BACKENDS
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the Triton backend (TRITON_INTERPRET=1 on the CPU)")


def _coeffs(n_hist: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_coeffs(n_hist), generator=g, dtype=torch.float64) * 2 - 1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_solver_step_strided_row_scale_and_coeff_table(backend):
    """A strided or expanded ``row_scale`` and a transposed ``coeff_table`` give the answer of their
    contiguous copies (the Triton launcher passed them through raw and read the wrong elements)."""
    g = torch.Generator().manual_seed(3)
    x, c, u = (torch.randn(5, 7, generator=g) for _ in range(3))
    hist = [torch.randn(5, 7, generator=g)]
    co = _coeffs(1, 4)
    base = torch.randn(10, generator=g).abs() + 0.5
    for rs in (base[::2], torch.tensor([1.7]).expand(5)):
        want = solver_step(x, c, u, hist, coeffs=co, row_scale=rs.contiguous(), backend=backend)
        got = solver_step(x, c, u, hist, coeffs=co, row_scale=rs, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    table = torch.randn(num_coeffs(1), 4, generator=g, dtype=torch.float64).t()  # [4 steps, coeffs], strided
    step = torch.tensor([2])
    want = solver_step(x, c, u, hist, coeff_table=table.contiguous(), step=step, backend=backend)
    got = solver_step(x, c, u, hist, coeff_table=table, step=step, backend=backend)
    ref = solver_step(x, c, u, hist, coeffs=table[2].tolist(), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_still_validates_where_no_compiled_op_does(backend):
    """``check=False`` skips only what the compiled ops check again; on the Triton and torch
    backends bad shapes still raise (they crashed the process or read out of bounds)."""
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    with pytest.raises(ValueError, match="x0_stats"):
        solver_step(x, c, coeffs=_coeffs(0, 1), backend=backend, check=False,
                    x0_stats=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="f: expected shape"):
        inv.coupling_update(x, torch.randn(2, 3), backend=backend, check=False)
    with pytest.raises(ValueError, match="f: expected shape"):
        inv.coupling_update_fixed(torch.zeros(6, dtype=torch.int64), torch.randn(5), backend=backend, check=False)
    xg = torch.randn(2, 6, 3, 3, generator=g)
    with pytest.raises(ValueError, match="weight"):
        inv.groupnorm_silu(xg, 3, torch.ones(2), None, backend=backend, check=False)
    with pytest.raises(ValueError, match="group_size"):
        Q.quantize(torch.randn(4, 96, generator=g), "int4", 48, backend=backend, check=False)
    qa, sa = Q.quantize(torch.randn(4, 64, generator=g), "int8", 32, backend="torch")[:2]
    qw, sw = Q.quantize(torch.randn(3, 64, generator=g), "int8", 32, backend="torch")[:2]
    with pytest.raises(ValueError, match="sa"):
        Q.quant_gemm(qa, sa[:1], qw, sw, fmt="int8", group_size=32, backend=backend, check=False)
    with pytest.raises(ValueError, match="bias"):
        Q.quant_gemm(qa, sa, qw, sw, fmt="int8", group_size=32, bias=torch.ones(1), backend=backend, check=False)
    with pytest.raises(ValueError, match="sa"):
        Q.quant_gemm(qa, sa[:1], qw, sw, fmt="int8", group_size=32, backend=backend, check=False, precision="fast")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check", [True, False])
def test_groupnorm_backward_statistics_shape(backend, check):
    """``mean`` / ``rstd`` must be ``[N, groups]`` as the forward returns them: the transposed
    ``[groups, N]`` (same number of elements) gave silently wrong gradients."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 3, 3, generator=g)
    _, m, r = inv.groupnorm_silu_forward(x, 3, backend="torch")
    gy = torch.randn_like(x)
    with pytest.raises(ValueError, match=r"mean: expected shape \(2, 3\)"):
        inv.groupnorm_silu_backward(gy, x, None, None, m.t(), r, 3, backend=backend, check=check)
    with pytest.raises(ValueError, match="output_mask"):
        inv.groupnorm_silu_backward(gy, x, None, None, m, r, 3, output_mask=(True,), backend=backend)
    gx = inv.groupnorm_silu_backward(gy, x, None, None, m, r, 3, backend=backend, check=check)[0]
    xr = x.double().requires_grad_()
    torch.nn.functional.silu(torch.nn.functional.group_norm(xr, 3, eps=1e-5)).backward(gy.double())
    torch.testing.assert_close(gx.double(), xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_gemm_group_size_limit(backend):
    """The GPU kernels sum a group's integer products in int32: int8 groups wider than 131040
    channels could overflow (the Triton kernel returned -2**31 for 2**31), so they raise; at the
    limit the sum is exact."""
    K = Q.MAX_GROUP["int8"] + 32
    qa = torch.full((1, K), -128, dtype=torch.int8)
    s = torch.ones(1, 1)
    for check in (True, False):
        with pytest.raises(ValueError, match="group_size: at most 131040"):
            Q.quant_gemm(qa, s, qa.clone(), s, fmt="int8", group_size=K, out_dtype=torch.float32, backend=backend,
                         check=check)
    if backend != "triton":  # (the interpreter would take minutes over 131040 channels)
        K = Q.MAX_GROUP["int8"]
        qa = torch.full((1, K), -128, dtype=torch.int8)
        out = Q.quant_gemm(qa, s, qa.clone(), s, fmt="int8", group_size=K, out_dtype=torch.float32, backend=backend)
        assert out.item() == K * 128 * 128


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_empty_rows(backend):
    q, s, la = Q.quantize(torch.randn(0, 64), "int4", 32, backend=backend)
    assert q.shape == (0, 32) and s.shape == (0, 2) and la.shape == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_rescale_and_clip_messages(backend):
    c = torch.randn(3, 5)
    with pytest.raises(ValueError, match="model_cond: expected \\[B >= 1"):
        cfg_rescale(torch.randn(0, 5), torch.randn(0, 5), 3.0, 0.7, backend=backend)
    with pytest.raises(TypeError, match="model_uncond: expected a torch.Tensor"):
        cfg_rescale(c, None, 3.0, 0.7, backend=backend)
    with pytest.raises(TypeError, match="model_cond: expected a torch.Tensor"):
        cfg_rescale(None, c, 3.0, 0.7, backend=backend)
    with pytest.raises(TypeError, match="guidance, phi"):
        cfg_rescale(c, c.clone(), "3", 0.7, backend=backend)
    with pytest.raises(TypeError, match="clip"):
        solver_step(c, c, coeffs=_coeffs(0, 2), clip=(1.0,), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_gemm_propagates_nan_codes(backend):
    """An e4m3 NaN byte (0x7F / 0xFF) in an operand makes its output row / column NaN on every
    backend (the Triton kernels' integer e4m3 -> fp16 decode turned it into 480)."""
    g = torch.Generator().manual_seed(8)
    qa, sa = Q.quantize(torch.randn(3, 64, generator=g), "fp8", 32, backend="torch")[:2]
    qw, sw = Q.quantize(torch.randn(5, 64, generator=g), "fp8", 32, backend="torch")[:2]
    qa = qa.view(torch.uint8).clone()
    qa[1, 7] = 0x7F
    qa[2, 40] = 0xFF
    out = Q.quant_gemm(qa.view(torch.float8_e4m3fn), sa, qw, sw, fmt="fp8", group_size=32, out_dtype=torch.float32,
                       backend=backend)
    assert torch.isnan(out[1:]).all() and torch.isfinite(out[0]).all()


def test_fixed_point_helpers_validate():
    x = torch.tensor([0.5, -0.25, 1.0])
    for bits in (100, -5, 2.5, True):
        with pytest.raises(ValueError, match="frac_bits"):
            inv.to_fixed(x, bits)
    with pytest.raises(TypeError, match="q: expected dtype int64"):
        inv.from_fixed(x, 10)
    with pytest.raises(TypeError, match="dtype"):
        inv.from_fixed(inv.to_fixed(x, 10), 10, torch.int32)
    assert torch.equal(inv.from_fixed(inv.to_fixed(x, 10), 10), x)


def test_sampling_and_loop_arguments():
    from pydiff.ops.sampling import sample_categorical
    from pydiff.samplers.loop import sample

    lg = torch.randn(4, 9)
    cases = [(dict(seed=2 ** 70), "seed"), (dict(top_k=True), "top_k"), (dict(top_p="a"), "top_p"),
             (dict(min_p=float("nan")), "min_p"),
             (dict(seed=1, seeds=torch.zeros(4, dtype=torch.long), offsets=torch.arange(4)), "seed"),
             (dict(seed=1, generator=torch.Generator()), "seed"),
             (dict(fill=torch.zeros(4, dtype=torch.long)), "fill")]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            sample_categorical(lg, **kw)
    import numpy as np

    want = sample_categorical(lg, seed=5, top_k=3)
    assert torch.equal(sample_categorical(lg, seed=np.int64(5), top_k=np.int64(3)), want)
    model = lambda x, t, c=None: x * 0.5  # noqa: E731
    with pytest.raises(ValueError, match="shape_or_x"):
        sample(model, (), "ddim", 3, progress=False)
    with pytest.raises(ValueError, match="steps"):
        sample(model, (1, 2), "ddim", 5.5, progress=False)


# ---- round 2: the layers above the ops -------------------------------------------------------------
def test_masked_generation_flags_invalid_draws():
    """on_invalid="flag": positions whose logits are NaN get token -2 in LLaDA-style and MaskGIT
    generation too (they stayed mask_id: a NaN confidence is never selected), as in FHS."""
    from pydiff.masked import generate_llada, generate_maskgit, sample_fhs

    V, M = 8, 7
    nan_model = lambda x: torch.full((x.shape[0], x.shape[1], V), float("nan"))  # noqa: E731
    out = generate_llada(nan_model, torch.tensor([[1, 2]]), mask_id=M, gen_length=4, block_length=4, steps=4,
                         seeds=1, on_invalid="flag")
    assert out.tolist() == [[1, 2, -2, -2, -2, -2]]
    x = torch.tensor([[1, M, M, 3]])
    for fn, kw in ((generate_maskgit, dict(steps=2)), (sample_fhs, {})):
        assert fn(nan_model, x, mask_id=M, seeds=1, on_invalid="flag", **kw).tolist() == [[1, -2, -2, 3]]
        with pytest.raises(ValueError):
            fn(nan_model, x, mask_id=M, seeds=1, **kw)


def test_inversion_and_invertible_sampling_check_shapes():
    from pydiff.inversion import ddim_invert, direct_inversion_edit, direct_inversion_offsets
    from pydiff.invertible_sampling import ddim_sample
    from pydiff.solvers import DDIMSolver

    model = lambda x, t, c: torch.tanh(x) * 0.5  # noqa: E731
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    inv_ = ddim_invert(model, x0, 4)
    offs = direct_inversion_offsets(model, inv_)
    with pytest.raises(ValueError, match=r"offsets\[0\]: expected shape \(2, 3, 4, 4\)"):
        direct_inversion_edit(model, inv_, None, offsets=[o[:1] for o in offs])
    assert (direct_inversion_edit(model, inv_, None, offsets=offs).source - x0).abs().max() < 1e-10
    s = DDIMSolver(clip_sample=False)
    s.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    for bad in (lambda h, t: h[:1] * 0.1, lambda h, t: h[:, :1] * 0.1):
        with pytest.raises(ValueError, match="model: expected an output of the sample's shape"):
            ddim_sample(bad, s, x.clone().requires_grad_())


def test_schedulers_and_kdiffusion_reject_degenerate_schedules():
    import pydiff.kdiffusion as K
    from pydiff.integrations.diffusers import PNDMScheduler

    for n in (1, 2, 3):
        with pytest.raises(ValueError, match="num_inference_steps"):
            PNDMScheduler().set_timesteps(n)
    PNDMScheduler(skip_prk_steps=True).set_timesteps(2)
    den = lambda x, s: x * 0.5  # noqa: E731
    x = torch.randn(1, 3, 4, 4)
    for f, sig in ((K.sample_euler, [0.0, 0.0]), (K.sample_heun, [1.0, 0.0, 0.0]),
                   (K.sample_dpmpp_2m, [2.0, 1.0, 1.0, 0.0]), (K.sample_dpmpp_2m, [0.0, 1.0, 2.0])):
        with pytest.raises(ValueError, match="sigmas: expected a strictly decreasing"):
            f(den, x, torch.tensor(sig), disable=True)
    assert torch.isfinite(K.sample_dpmpp_2m(den, x, torch.tensor([2.0, 1.0, 0.0]), disable=True)).all()


def test_quantized_layers_edge_cases():
    from torch import nn

    from pydiff.quant import QuantConfig, W4A4Linear, W8A8Linear, quantize_

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    qa = W8A8Linear.from_linear(lin, fmt="fp8")
    with pytest.raises(RuntimeError, match="qweight: expected dtype torch.int8"):
        W8A8Linear(64, 32).load_state_dict(qa.state_dict())
    W8A8Linear(64, 32, fmt="fp8").load_state_dict(qa.state_dict())
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    xs = torch.randn(8, 64)
    xs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration: the inputs of layer"):
        quantize_(m, QuantConfig(), calibration=lambda mod: mod(xs))
    empty = torch.randn(0, 64)
    quantize_(nn.Sequential(nn.Linear(64, 64)), QuantConfig(fmt="int8"), calibration=lambda mod: mod(empty))
    # an empty batch with the adaLN prologue (M = 0 rows, B = 0 modulation rows) on every backend
    q = W4A4Linear.from_linear(nn.Linear(64, 32))
    out = q(torch.randn(0, 64), prologue="layernorm", shift=torch.randn(0, 64), scale=torch.randn(0, 64))
    assert out.shape == (0, 32)
    for backend in BACKENDS:
        qq = Q.quantize(torch.randn(0, 64), "int4", 32, prologue="layernorm", shift=torch.randn(0, 64),
                        scale=torch.randn(0, 64), backend=backend)
        assert qq[0].shape == (0, 32) and qq[1].shape == (0, 2)
    with pytest.raises(ValueError, match="shift: expected shape"):
        Q.quantize(torch.randn(4, 64), "int4", 32, prologue="layernorm", shift=torch.randn(0, 64))


def test_step_counts_and_unet_arguments():
    from pydiff.integrations import diffusers as D
    from pydiff.models.invertible_unet import InvertibleUNet

    for S in (D.DPMSolverMultistepScheduler, D.UniPCMultistepScheduler, D.FlowMatchEulerDiscreteScheduler,
              D.DDIMScheduler, D.EulerDiscreteScheduler):
        for n in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
                S().set_timesteps(n)
    import numpy as np

    s = D.DDIMScheduler()
    s.set_timesteps(np.int64(5))
    assert len(s.timesteps) == 5
    u = InvertibleUNet(in_channels=3, out_channels=3, channels=(8, 12), layers=1, attention=(False, True),
                       head_dim=4, groups=4)
    for x, t in ((torch.randn(1, 3, 4, 4), torch.tensor([1.0, 2.0, 3.0])),
                 (torch.randn(2, 3, 4, 4), torch.tensor([[1.0], [2.0]]))):
        with pytest.raises(ValueError, match="t: expected a scalar or"):
            u(x, t)
    assert u(torch.randn(2, 3, 4, 4), 5.0).shape == (2, 3, 4, 4)
    for kw, name in ((dict(channels=()), "channels"), (dict(head_dim=0), "head_dim"), (dict(groups=0), "groups")):
        with pytest.raises(ValueError, match=name):
            InvertibleUNet(**kw)


# ---- round 3: pydiff.nn, models, testing helpers, CLI, backend names ---------------------------------
def _tiny_stack(n=2, **kw):
    from torch import nn

    from pydiff.nn import AdditiveCoupling, ReversibleSequential

    torch.manual_seed(0)
    return ReversibleSequential([AdditiveCoupling(nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
                                                  nn.Sequential(nn.Linear(2, 2), nn.Tanh())) for _ in range(n)],
                                dim=-1, **kw)


class _Const(torch.nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, h):
        return torch.full_like(h, self.v)


def test_reversible_stack_refuses_what_it_cannot_recompute():
    """The backward recomputes each block with its current modules: swapped parameters
    (torch.func.functional_call) and parameters modified in place after the forward raise (they
    gave wrong gradients silently); a fixed-point state whose running sum outgrows int64 gives NaN
    (it wrapped); frac_bits must be an int."""
    from pydiff.nn import AdditiveCoupling, ReversibleSequential

    s = _tiny_stack()
    p = {k: v.detach().clone().mul(1.5).requires_grad_() for k, v in s.named_parameters()}
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.func.functional_call(s, p, (x,))
    with pytest.raises(RuntimeError, match="parameters are not the tensors its forward used"):
        torch.autograd.grad(y.pow(2).sum(), [x] + list(p.values()))
    y = s(x)
    with torch.no_grad():
        next(iter(s.parameters())).add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()
    y = s(x)  # unchanged parameters: fine (and again after an optimizer step, with a new forward)
    y.sum().backward()
    for bits, v in ((52, 1000.0), (32, 2.0 ** 29.5)):
        st = ReversibleSequential([AdditiveCoupling(_Const(v), _Const(v)) for _ in range(4)], dim=-1,
                                  state_dtype=torch.int64, frac_bits=bits)
        with torch.no_grad():
            assert torch.isnan(st(torch.zeros(1, 2))).all(), bits
    ok = ReversibleSequential([AdditiveCoupling(_Const(1.0), _Const(1.0)) for _ in range(4)], dim=-1,
                              state_dtype=torch.int64, frac_bits=52)
    with torch.no_grad():
        assert torch.equal(ok(torch.zeros(1, 2)), torch.tensor([[4.0, 4.0]]))
    for bits in (1.5, True):
        with pytest.raises(ValueError, match="frac_bits"):
            _tiny_stack(state_dtype=torch.int64, frac_bits=bits)


def test_dit_position_embedding_follows_the_patch_grid():
    from pydiff.models.dit import DiT, pos_embed_2d

    torch.manual_seed(0)
    m = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2).eval()
    x = torch.randn(1, 4, 4, 64)  # a 2 x 32 patch grid: as many tokens as the stored 8 x 8 table
    out = m(x, torch.tensor([10.0]))
    m.pos_embed = pos_embed_2d(32, 2, 32)[None]
    assert torch.equal(out, m(x, torch.tensor([10.0])))
    with pytest.raises(ValueError, match="t: expected a scalar or"):
        m(torch.randn(2, 4, 16, 16), torch.zeros(2, 1))


def test_testing_helpers_cli_and_backend_names():
    import subprocess
    import sys

    from pydiff.ops.invertible import coupling_update
    from pydiff.testing.discrete import chi2_gof, tv_distance, tv_noise_bound

    s = torch.tensor([0, 1] * 50)
    with pytest.raises(ValueError, match="probs: expected a 1-D distribution"):
        chi2_gof(s, torch.tensor([1.0, 1.0]))
    assert chi2_gof(s, torch.tensor([0.5, 0.5]))[2] > 0.5
    with pytest.raises(ValueError, match="samples"):
        tv_distance(torch.zeros(0, dtype=torch.long), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="n: expected"):
        tv_noise_bound(torch.tensor([0.5, 0.5]), 0)
    for b in (0, ""):
        with pytest.raises(ValueError, match="backend: expected one of"):
            coupling_update(torch.ones(2), torch.ones(2), backend=b)
    env = dict(__import__("os").environ, PYDIFF_BACKEND="")
    out = subprocess.run([sys.executable, "-c", "import pydiff; print(pydiff.backend.get_backend())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "auto", out.stderr[-500:]
    for n in ("0", "1000000"):
        out = subprocess.run([sys.executable, "-m", "pydiff", "demo", "--quick", "--no-plot", "--threads", n],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "--threads: expected an int in 1..1024" in out.stderr, out.stderr[-500:]
