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
