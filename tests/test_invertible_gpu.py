"""GPU tests of the invertible-block kernels (CUDA and Triton backends): skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

import pydiff
from pydiff.ops import invertible as inv
from pydiff.reference.invertible import (
    coupling_update_fixed_ref,
    groupnorm_silu_backward_ref,
    groupnorm_silu_ref,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
GPU = torch.device("cuda")
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-4), torch.bfloat16: (8e-3, 2e-3),
        torch.float64: (1e-12, 1e-12)}


def _backends():
    return [b for b in pydiff.available_backends(GPU) if b != "torch"] if torch.cuda.is_available() else []


def _rand(shape, dtype, seed, mean=0.0, std=1.0):
    g = torch.Generator(device=GPU).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=GPU, dtype=torch.float64) * std + mean).to(dtype)


def _poison(shape, dtype):
    junk = [torch.full(shape, float("nan"), device=GPU, dtype=dtype) for _ in range(4)]
    del junk


def _close(out, ref, dtype, what):
    rtol, atol = TOLS[dtype]
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (an element was not written?)"
    scale = max(1.0, ref64.abs().max().item())
    err = (out64 - ref64).abs()
    assert (err - (rtol * ref64.abs() + atol * scale)).max().item() <= 0, f"{what}: max error {err.max().item():.3e}"


@pytest.mark.parametrize("xd,fd", [(d, d) for d in ALL_DTYPES] + [(torch.float64, torch.float32),
                                                                    (torch.float64, torch.bfloat16),
                                                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 13), (2, 4, 33, 31), (3, 1000003)], ids=str)
def test_gpu_coupling_matches_float64_reference(xd, fd, shape):
    x, f = _rand(shape, xd, 1), _rand(shape, fd, 2)
    c = torch.tensor([1.5, -0.5], device=GPU, dtype=torch.float64)
    ref = (0.75 * 1.5) * x.double() + (-1.25 * -0.5) * f.double()
    for b in _backends():
        _poison(shape, xd)
        _close(inv.coupling_update(x, f, 0.75, -1.25, coeffs=c, backend=b), ref, xd, f"{b} {xd}/{fd}")
        y = x.clone()
        with torch.no_grad():
            inv.coupling_update(y, f, 0.75, -1.25, coeffs=c, inplace=True, backend=b)
        _close(y, ref, xd, f"{b} in place {xd}/{fd}")


def test_gpu_coupling_misaligned_and_strided():
    base = torch.randn(4 * 1001 + 1, device=GPU)
    x = base[1:].view(4, 1001)  # odd offset: the scalar path
    f = torch.randn(1001, 4, device=GPU).t()  # strided
    for b in _backends():
        _close(inv.coupling_update(x, f, 1.0, -1.0, backend=b), x.double() - f.double(), torch.float32, b)


@pytest.mark.parametrize("fd", ALL_DTYPES, ids=str)
def test_gpu_fixed_point_bit_exact_and_equal_across_backends(fd):
    shape = (3, 100003)
    g = torch.Generator(device=GPU).manual_seed(3)
    x = torch.randint(-2 ** 62, 2 ** 62, shape, generator=g, device=GPU)
    f = _rand(shape, fd, 4, std=5.0)
    f.view(-1)[:6] = torch.tensor([0.5, 1.5, 2.5, -0.5, float("nan"), float("inf")], device=GPU).to(fd)
    ref = coupling_update_fixed_ref(x, f, 1.0, 20)
    cpu = inv.coupling_update_fixed(x.cpu(), f.cpu(), 1.0, 20)
    assert torch.equal(ref.cpu(), cpu)
    for b in _backends():
        y = inv.coupling_update_fixed(x, f, 1.0, 20, backend=b)
        assert torch.equal(y, ref), b
        assert torch.equal(inv.coupling_update_fixed(y, f, -1.0, 20, backend=b), x), b


GN_CASES = [((1, 1, 1), 1), ((2, 6, 7), 3), ((3, 4, 5, 7), 2), ((2, 32, 9, 9), 8), ((2, 320, 64, 64), 32),
            ((1, 64, 3, 33, 31), 32), ((4, 1280, 8, 8), 32), ((1, 8, 300000), 1)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", GN_CASES, ids=str)
def test_gpu_groupnorm_silu_forward_backward(dtype, case):
    shape, G = case
    C = shape[1]
    x = _rand(shape, dtype, 5, mean=0.5, std=1.7)
    dy = _rand(shape, dtype, 6)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w = _rand((C,), pd, 7, mean=1.0, std=0.5)
    b = _rand((C,), pd, 8, std=0.5)
    y64, m64, r64 = groupnorm_silu_ref(x.double(), w.double(), b.double(), G, 1e-5)
    gref = groupnorm_silu_backward_ref(dy.double(), x.double(), w.double(), b.double(), m64, r64, G)
    for bk in _backends():
        _poison(shape, dtype)
        y, mean, rstd = inv.groupnorm_silu_forward(x, G, w, b, 1e-5, backend=bk)
        _close(y, y64, dtype, f"{bk} y")
        st = 1e-12 if dtype == torch.float64 else 1e-6
        assert torch.allclose(mean.double(), m64, rtol=st, atol=st) and torch.allclose(rstd.double(), r64, rtol=st)
        _poison(shape, dtype)
        gx, gw, gb = inv.groupnorm_silu_backward(dy, x, w, b, mean, rstd, G, backend=bk)
        _close(gx, gref[0], dtype, f"{bk} grad_x")
        pt = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
        for got, want, nm in ((gw, gref[1], "grad_w"), (gb, gref[2], "grad_b")):
            scale = max(1.0, want.abs().max().item())
            assert ((got.double() - want).abs() <= pt[0] * want.abs() + pt[1] * scale).all(), f"{bk} {nm}"


def test_gpu_autograd_matches_torch_and_saves_less():
    x = _rand((4, 64, 16, 16), torch.float32, 9).requires_grad_()
    w = torch.rand(64, device=GPU, requires_grad=True)
    b = torch.randn(64, device=GPU, requires_grad=True)
    dy = _rand((4, 64, 16, 16), torch.float32, 10)
    F.silu(F.group_norm(x, 32, w, b)).backward(dy)
    want = [t.grad.clone() for t in (x, w, b)]
    for bk in _backends():
        for t in (x, w, b):
            t.grad = None
        inv.groupnorm_silu(x, 32, w, b, backend=bk).backward(dy)
        for t, ref in zip((x, w, b), want):
            assert torch.allclose(t.grad, ref, rtol=1e-4, atol=1e-4), bk


def test_gpu_no_host_sync_and_cuda_graph():
    """The ops launch without host synchronisation (device coefficients) and replay in a CUDA graph."""
    x, f = _rand((2, 64, 32, 32), torch.float32, 11), _rand((2, 64, 32, 32), torch.float32, 12)
    v = torch.tensor(0.3, device=GPU, dtype=torch.float64)
    c = torch.stack([v, 1 - v])
    for bk in _backends():
        inv.coupling_update(x, f, coeffs=c, backend=bk)  # warm up (Triton compiles)
        inv.groupnorm_silu_forward(x, 32, backend=bk)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = inv.coupling_update(x, f, coeffs=c, backend=bk, check=False)
            z = inv.groupnorm_silu_forward(y, 32, backend=bk, check=False)[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if bk != "cuda":
            continue
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with torch.cuda.graph(g):
                yy = torch.ops.pydiff.coupling_update(x, f, 1.0, 1.0, c)
                zz = torch.ops.pydiff.groupnorm_silu(yy, None, None, 32, 1e-5)[0]
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        torch.cuda.synchronize()
        assert torch.allclose(zz, z, atol=1e-6)


def _stack(c, n, state_dtype, seed=0):
    from torch import nn

    from pydiff.nn import AdditiveCoupling, ReversibleSequential

    torch.manual_seed(seed)

    def branch():
        return nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                             nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    return ReversibleSequential([AdditiveCoupling(branch(), branch()) for _ in range(n)],
                                state_dtype=state_dtype).to(GPU)


@pytest.mark.parametrize("state_dtype", [None, torch.float64])
def test_gpu_reversible_stack_gradients_and_peak_memory(state_dtype):
    """On CUDA: the per-block backward's gradients equal plain autograd's (float64 state: <= 1e-5
    relative), and the allocator's peak over forward + backward stays within the op-by-op model
    (meta device) plus 25 % and far below plain autograd's. TF32 convolutions are switched off
    here: cuDNN's TF32 rounding (2^-11) of the branch inputs, which differ in their last fp32 bit
    between the float64-state and the plain path, gave 4e-4 relative on an H200 (2026-11-27)."""
    from pydiff.testing.memory import peak_bytes

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _stack_gradients_and_peak_memory(state_dtype, peak_bytes)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _stack_gradients_and_peak_memory(state_dtype, peak_bytes):
    stack = _stack(32, 8, state_dtype)
    x = _rand((2, 64, 32, 32), torch.float32, 21).requires_grad_()
    w = _rand((2, 64, 32, 32), torch.float32, 22)
    params = list(stack.parameters())
    g = torch.autograd.grad((stack(x) * w).sum(), [x] + params)
    stack.reversible = False
    ref = torch.autograd.grad((stack(x) * w).sum(), [x] + params)
    stack.reversible = True
    for a, b in zip(g, ref):
        assert (a - b).abs().max() <= (1e-5 if state_dtype is not None else 1e-3) * b.abs().max()

    def step():
        (stack(x) * w).sum().backward()

    peaks = {}
    for rev in (True, False):
        stack.reversible = rev
        for p in params + [x]:
            p.grad = torch.zeros_like(p)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peaks[rev] = torch.cuda.max_memory_allocated() - base
    stack.reversible = True
    meta = _stack(32, 8, state_dtype).to("meta")
    xm, wm = torch.empty_like(x, device="meta").requires_grad_(), torch.empty_like(w, device="meta")
    for p in meta.parameters():
        p.grad = torch.zeros_like(p)
    model = peak_bytes(lambda: (meta(xm) * wm).sum().backward())[1]
    assert peaks[True] <= 1.25 * model + (8 << 20), (peaks, model)
    assert peaks[True] <= 0.5 * peaks[False], peaks


def test_gpu_reversible_stack_in_cuda_graph():
    """make_graphed_callables captures the reversible stack's forward and backward (without RNG state
    tracking) and replays them to the eager gradients; with it, capture raises a clear error."""
    stack = _stack(16, 4, None)
    x = _rand((2, 32, 16, 16), torch.float32, 23).requires_grad_()
    w = _rand((2, 32, 16, 16), torch.float32, 24)
    params = list(stack.parameters())
    want = torch.autograd.grad((stack(x) * w).sum(), [x] + params)
    with pytest.raises(RuntimeError, match="preserve_rng_state"):
        torch.cuda.make_graphed_callables(_stack(16, 4, None), (x,))
    torch.cuda.synchronize()
    stack.preserve_rng_state = False
    graphed = torch.cuda.make_graphed_callables(stack, (x,))
    for _ in range(2):
        got = torch.autograd.grad((graphed(x) * w).sum(), [x] + params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gpu_reversible_dropout_replays_the_cuda_rng():
    """Dropout in one sub-network on CUDA: the recompute restores the CUDA generator's state for that
    call only (read and set on the generator directly), so the gradients equal plain autograd's with
    the same seed, and the backward leaves the CUDA RNG state as it found it."""
    from torch import nn

    from pydiff.nn import AdditiveCoupling, ReversibleSequential

    torch.manual_seed(0)

    def branch(p):
        return nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Dropout(p), nn.Conv2d(8, 8, 3, padding=1))

    stack = ReversibleSequential([AdditiveCoupling(branch(0.0), branch(0.3 if i == 1 else 0.0)) for i in range(3)],
                                 state_dtype=torch.float64).to(GPU).train()
    x = _rand((2, 16, 8, 8), torch.float32, 31)
    params = list(stack.parameters())
    grads = []
    for rev in (True, False):
        stack.reversible = rev
        xr = x.clone().requires_grad_()
        torch.cuda.manual_seed(7)
        y = stack(xr)
        before = torch.cuda.get_rng_state()
        grads.append(torch.autograd.grad((y * y).sum(), [xr] + params))
        assert torch.equal(torch.cuda.get_rng_state(), before)
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
