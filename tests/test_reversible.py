"""Reversible coupling stacks (pydiff.nn): exact reconstruction, gradients equal plain autograd's,
autocast, shared parameters, dropout, memory independent of depth."""
import contextlib
import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

from pydiff.nn import AdditiveCoupling, ReversibleSequential, ScaledCoupling
from pydiff.testing.memory import saved_bytes


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def resblock(c, gain=None, groups=4, dropout=0.0, dtype=torch.float32):
    """GroupNorm-SiLU-conv x2 (the residual branch; the coupling adds it)."""
    m = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                      nn.GroupNorm(groups, c), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c, c, 3, padding=1))
    if gain is not None:  # weights N(0, gain^2 / fan_in): a larger Lipschitz constant than PyTorch's default
        for layer in m:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=gain / (9 * c) ** 0.5)
    return m.to(dtype)


class TimeRes(nn.Module):
    """A resnet branch conditioned on a time embedding: F(h, temb)."""

    def __init__(self, c, tdim):
        super().__init__()
        self.body1 = nn.Sequential(nn.GroupNorm(4, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
        self.t = nn.Linear(tdim, c)
        self.body2 = nn.Sequential(nn.GroupNorm(4, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, h, temb):
        return self.body2(self.body1(h) + self.t(temb)[:, :, None, None])


def stack16(c=16, gain=None, seed=0, **kw):
    torch.manual_seed(seed)
    return [AdditiveCoupling(resblock(c, gain, **kw), resblock(c, gain, **kw)) for _ in range(16)]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def rebuild_error(blocks, x, state_dtype, autocast=False):
    stack = ReversibleSequential(blocks, state_dtype=state_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        s = stack.encode(x)
        back = stack.inverse_state(stack.forward_state(s))
    return rel(stack.decode(back, x.dtype), x), torch.equal(back, s)


# ---- numerical exactness --------------------------------------------------------------------------
@pytest.mark.parametrize("gain,autocast", [(None, False), (3.0, False), (None, True)])
def test_16_block_stack_rebuilds_its_input(gain, autocast):
    """Bound: a 16-block fp32 stack of random GroupNorm-SiLU-conv x2 couplings rebuilds its input to
    <= 1e-12 relative (max-abs) with the float64 state and bit-exactly with the fixed-point state; the
    naive fp32 state is shown alongside (and must exceed 1e-5 where noted, so the bound means
    something).  On the CPU with a deterministic recompute the naive error is ~1e-6 with PyTorch's
    default init, ~4e-5 with weights of std 3/sqrt(fan_in), and ~4e-3 under bf16 autocast
    (F's bf16 rounding flips when its input moves by one fp32 ulp)."""
    blocks = stack16(gain=gain)
    torch.manual_seed(1)
    x = torch.randn(2, 32, 16, 16)
    naive, _ = rebuild_error(blocks, x, None, autocast)
    f64, _ = rebuild_error(blocks, x, torch.float64, autocast)
    fixed, bit_exact = rebuild_error(blocks, x, torch.int64, autocast)
    print(f"16-block rebuild error (gain={gain}, autocast={autocast}): naive fp32 state {naive:.2e}, "
          f"float64 state {f64:.2e}, fixed point {fixed:.2e} (bit-exact state: {bit_exact})")
    assert f64 <= 1e-12
    assert bit_exact and fixed <= 1e-9  # fixed point: exact state; decode/encode round x to 2**-32
    if gain is not None or autocast:
        assert naive > 1e-5, "the naive error should exceed the bound here"
    assert naive > 10 * max(f64, 1e-15)


# ---- gradients --------------------------------------------------------------------------------------
def grads_of(stack, x, cond=(), reversible=True, autocast=False, seed=None):
    stack.reversible = reversible
    x = x.detach().clone().requires_grad_()
    leaves = [c.detach().clone().requires_grad_() for c in cond]
    params = [p for p in stack.parameters() if p.requires_grad]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # conditioning as a non-leaf (as a time embedding from an MLP is): autocast caches the bf16 cast
        # of a leaf that requires grad, and plain autograd would then sum its gradient over all uses
        # in bf16 (the reversible backward sums per-block fp32 gradients: 3e-3 apart)
        y = stack(x, *[c * 1.0 for c in leaves])
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    g = torch.autograd.grad((y * w).sum(), [x] + leaves + params)
    return y.detach(), g


def compare(stack, x, cond=(), autocast=False, seed=None):
    y1, g1 = grads_of(stack, x, cond, True, autocast, seed)
    y2, g2 = grads_of(stack, x, cond, False, autocast, seed)
    return rel(y1, y2), max(rel_norm(a, b) for a, b in zip(g1, g2)), g1


def mixed_stack(c, tdim, state_dtype, scaled=True, dtype=torch.float32):
    torch.manual_seed(0)
    blocks = []
    for i in range(4):
        blocks.append(AdditiveCoupling(TimeRes(c, tdim), TimeRes(c, tdim)))
        if scaled:
            blocks.append(ScaledCoupling(TimeRes(c, tdim), v_init=0.5 + 0.1 * i))
    return ReversibleSequential(blocks, state_dtype=state_dtype).to(dtype)


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.int64, None])
def test_gradients_fp32_equal_plain_autograd(state_dtype):
    """fp32: parameters, input and the conditioning tensor within 1e-5 relative of plain autograd with
    the float64 / fixed-point state (the naive state is checked at 1e-4)."""
    stack = mixed_stack(8, 12, state_dtype, scaled=state_dtype != torch.int64)
    torch.manual_seed(2)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 12)
    dy, dg, g = compare(stack, x, (temb,))
    print(f"state {state_dtype}: output diff {dy:.1e}, worst gradient rel. diff {dg:.1e}")
    assert dy <= 1e-6
    assert dg <= (1e-5 if state_dtype is not None else 1e-4)
    assert all(t is not None and t.abs().sum() > 0 for t in g)
    if state_dtype is None:
        assert dg > 0  # rebuilt inputs carry fp32 rounding; with the exact states it is 0 here


def test_gradients_fp64_equal_plain_autograd():
    stack = mixed_stack(8, 12, None, dtype=torch.float64)
    torch.manual_seed(2)
    x, temb = torch.randn(2, 16, 8, 8, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    dy, dg, _ = compare(stack, x, (temb,))
    assert dy <= 1e-13 and dg <= 1e-10


@pytest.mark.parametrize("state_dtype", [torch.float64, None])
def test_autocast_bf16(state_dtype):
    """CPU bf16 autocast: the recompute runs under the forward's autocast state."""
    stack = mixed_stack(8, 12, state_dtype)
    torch.manual_seed(2)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 12)
    dy, dg, g = compare(stack, x, (temb,), autocast=True)
    print(f"bf16 autocast, state {state_dtype}: output diff {dy:.1e}, gradient diff {dg:.1e}")
    if state_dtype is not None:
        assert dy <= 1e-6 and dg <= 1e-5
    else:
        assert dg < 0.5  # naive state: bf16 roundings flip in the rebuilt inputs (see the rebuild test)
    assert g[0].dtype == torch.float32


def test_shared_parameters():
    torch.manual_seed(0)
    f, g = resblock(8), resblock(8)
    blocks = [AdditiveCoupling(f, g), AdditiveCoupling(resblock(8), g), AdditiveCoupling(f, f), ScaledCoupling(g)]
    stack = ReversibleSequential(blocks, state_dtype=torch.float64)
    x = torch.randn(2, 16, 8, 8)
    dy, dg, _ = compare(stack, x)
    assert dy <= 1e-6 and dg <= 1e-5
    assert len(list(stack.parameters())) == 3 * 8 + 1


def test_backward_recomputes_the_blocks_its_forward_ran():
    """A block of the stack replaced between the forward and the backward (a model surgery, a LoRA
    swap): the backward recomputes the block the forward ran, as plain autograd backpropagates the
    graph it recorded, so the gradients are those of the forward's network."""
    torch.manual_seed(0)
    blocks = [AdditiveCoupling(resblock(8), resblock(8)) for _ in range(3)]
    stack = ReversibleSequential(blocks, state_dtype=torch.float64)
    x = torch.randn(2, 16, 8, 8)
    want = torch.autograd.grad(stack(x.clone().requires_grad_()).square().sum(), list(stack.parameters()))
    xr = x.clone().requires_grad_()
    y = stack(xr)
    params = list(stack.parameters())
    stack.blocks[1] = AdditiveCoupling(resblock(8), resblock(8))  # after the forward
    got = torch.autograd.grad(y.square().sum(), params)
    assert max(rel_norm(a, b) for a, b in zip(got, want)) <= 1e-10


def test_dropout_rng_replayed_and_restored():
    """Dropout draws the same masks in the recompute (RNG state recorded per F/G call); the backward
    leaves the global RNG state as it found it."""
    blocks = stack16(c=8, dropout=0.3)[:4]
    stack = ReversibleSequential(blocks, state_dtype=torch.float64).train()
    x = torch.randn(2, 16, 8, 8)
    dy, dg, _ = compare(stack, x, seed=123)
    assert dy <= 1e-6 and dg <= 1e-5
    torch.manual_seed(5)
    xr = x.clone().requires_grad_()
    y = stack(xr)
    before = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), before)
    stack.preserve_rng_state = False  # without it the recompute draws other masks
    _, dg2, _ = compare(stack, x, seed=123)
    assert dg2 > 1e-3


def test_rng_replay_only_for_calls_that_draw():
    """Only the F/G calls that drew random numbers in the forward get their RNG state restored in the
    recompute: with dropout in one sub-network of four blocks the gradients still equal plain
    autograd's; without any random op the backward restores nothing and leaves the state alone."""
    torch.manual_seed(0)
    blocks = [AdditiveCoupling(resblock(8), resblock(8, dropout=0.3 if i == 2 else 0.0)) for i in range(4)]
    stack = ReversibleSequential(blocks, state_dtype=torch.float64).train()
    x = torch.randn(2, 16, 8, 8)
    dy, dg, _ = compare(stack, x, seed=7)
    assert dy <= 1e-6 and dg <= 1e-5

    calls = []
    real = torch.set_rng_state
    stack = ReversibleSequential(stack16(c=8)[:4], state_dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y = stack(xr)
    before = torch.get_rng_state()
    try:
        torch.set_rng_state = lambda st: (calls.append(1), real(st))[1]
        y.sum().backward()
    finally:
        torch.set_rng_state = real
    assert calls == [] and torch.equal(torch.get_rng_state(), before)
    assert xr.grad is not None and xr.grad.abs().sum() > 0


class _Blowup(nn.Module):
    """A sub-network whose output is NaN where its input exceeds a threshold."""

    def forward(self, h):
        return torch.where(h > 10.0, float("nan"), h * 0.5)


@pytest.mark.parametrize("grad", [False, True])
def test_fixed_point_state_turns_what_it_cannot_hold_into_nan(grad):
    """int64 cannot hold NaN, infinities or |x| >= 2**(62 - frac_bits): the fixed-point stack's
    output becomes NaN (as the float64 state's would, for NaN) instead of finite wrapped values."""
    torch.manual_seed(0)
    blocks = [AdditiveCoupling(resblock(4), resblock(4)) for _ in range(2)]
    stack = ReversibleSequential(blocks, state_dtype=torch.int64)
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    x = torch.randn(2, 8, 5, 5)
    with ctx:
        ok = stack(x.clone().requires_grad_(grad))
        assert torch.isfinite(ok).all()
        for bad in (float("nan"), float("inf"), 2.0 ** 30):
            xb = x.clone()
            xb[1, 3, 2, 2] = bad
            assert torch.isnan(stack(xb.requires_grad_(grad))).all(), bad
        assert torch.isfinite(stack(x.clone().requires_grad_(grad) * 1e8)).all()  # 1e8 < 2**30 is fine
        blown = ReversibleSequential([AdditiveCoupling(_Blowup(), _Blowup())], state_dtype=torch.int64)
        small = torch.rand(1, 4, 3) * 2
        assert torch.isfinite(blown(small.requires_grad_(grad))).all()
        big = small.detach().clone()
        big[0, 3, 1] = 30.0  # F's output goes NaN there
        assert torch.isnan(blown(big.requires_grad_(grad))).all()


def test_scaled_coupling_is_idms_form():
    torch.manual_seed(0)
    F = resblock(4)
    blk = ScaledCoupling(F, v_init=0.3)
    x1, x2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    y1, y2 = blk(x1, x2)
    torch.testing.assert_close(y1, 0.7 * F(x1) + 0.3 * x2)
    assert torch.equal(y2, x1)
    r1, r2 = blk.inverse(y1, y2)
    assert torch.equal(r1, x1)
    torch.testing.assert_close(r2, x2, rtol=0, atol=1e-5)
    torch.testing.assert_close(r2, (y1 - 0.7 * F(y2)) / 0.3, rtol=0, atol=1e-6)


def test_additive_coupling_inverse_and_no_grad_path():
    blocks = stack16(c=8)[:3]
    stack = ReversibleSequential(blocks)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y0 = stack(x)
    y1 = stack(x.requires_grad_())
    assert torch.equal(y0, y1.detach())
    assert rel(stack.inverse(y0), x) <= 1e-5




def test_backward_inside_autocast_region_recomputes_like_the_forward():
    """A forward without autocast and its backward run inside a bf16 autocast region: the recompute
    must leave autocast off (the backward re-enters the forward's state only where it differs), so
    the gradients are the ones of a backward outside the region, bit for bit."""
    stack = mixed_stack(8, 12, torch.float64)
    torch.manual_seed(2)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 12)
    params = [p for p in stack.parameters()]
    grads = []
    for region in (False, True):
        xr = x.clone().requires_grad_()
        y = stack(xr, temb)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=region):
            grads.append(torch.autograd.grad((y * y).sum(), [xr] + params))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_parameter_walk_and_vjp_helpers():
    """The stack's hot-path helpers against what they replace: ``_trainable_params`` lists what
    ``[p for p in m.parameters() if p.requires_grad]`` does (shared modules and parameters, frozen
    ones, None entries), and ``_vjp`` returns ``torch.autograd.grad(..., allow_unused=True)`` (also
    for a tensor subclass, which takes the public path)."""
    from pydiff.nn.reversible import _trainable_params, _vjp

    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    inner = nn.Sequential(shared, nn.Linear(3, 2))
    inner[1].weight.requires_grad_(False)
    m = nn.Sequential(shared, inner, nn.ReLU(), inner)
    m.register_parameter("none", None)
    m.tied = shared.weight
    for mod in (m, inner, mixed_stack(4, 6, None), AdditiveCoupling(resblock(4), resblock(4))):
        want = [p for p in mod.parameters() if p.requires_grad]
        got = _trainable_params(mod)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want))

    class Sub(torch.Tensor):
        pass

    z = torch.randn(4, 3, requires_grad=True)
    unused = nn.Parameter(torch.randn(2))
    for wrap in (lambda t: t, lambda t: t.as_subclass(Sub)):
        out = inner(shared(wrap(z)))
        go = torch.randn_like(out)
        ins = [z, shared.weight, inner[1].bias, unused]
        want = torch.autograd.grad(out, ins, go, allow_unused=True, retain_graph=True)
        got = _vjp((out,), ins, (go,))
        assert got[3] is None and want[3] is None
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


@pytest.mark.parametrize("state_dtype", [None, torch.float64])
def test_memory_independent_of_depth(state_dtype):
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    got, plain = {}, {}
    for depth in (2, 4, 8):
        torch.manual_seed(0)
        stack = ReversibleSequential([AdditiveCoupling(resblock(8), resblock(8)) for _ in range(depth)],
                                     state_dtype=state_dtype)
        _, got[depth] = saved_bytes(lambda: stack(x))
        stack.reversible = False
        _, plain[depth] = saved_bytes(lambda: stack(x))
    per_state = x.numel() * (8 if state_dtype == torch.float64 else 4)
    assert set(got.values()) == {per_state}, got           # only the final state
    assert plain[8] > 3 * plain[2] > 3 * 3 * per_state      # plain autograd grows with depth


def test_bad_arguments():
    with pytest.raises(ValueError, match="even size"):
        ReversibleSequential(stack16(c=4)[:1])(torch.randn(1, 7, 4, 4))
    with pytest.raises(ValueError, match="additive couplings only"):
        ReversibleSequential([ScaledCoupling(resblock(4))], state_dtype=torch.int64)
    with pytest.raises(ValueError, match="state_dtype"):
        ReversibleSequential([], state_dtype=torch.float16)
    with pytest.raises(TypeError, match="CouplingBlock"):
        ReversibleSequential([resblock(4)])


@contextlib.contextmanager
def _bench_invertible():
    """bench/invertible.py as a module (bench/ on sys.path while it is used)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, here)
    try:
        spec = importlib.util.spec_from_file_location("bench_invertible", os.path.join(here, "invertible.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(here)


def test_bench_rows_smoke(tmp_path):
    """bench/invertible.py at a tiny size: every method runs, ours saves only the final state."""
    with _bench_invertible() as mod:
        rows = mod.rows("cpu", dict(C=8, H=4, B=1), depths=(2, 4), reps=1, model=False)
    main = {r["method"]: r for r in rows if r["part"] == "invertible"}
    assert set(main) == set(mod.METHODS)
    assert main["reversible"]["saved_mib"] * 2**20 == 1 * 8 * 4 * 4 * 4
    dep = {(r["method"], r["depth"]): r["saved_mib"] for r in rows if r["part"] == "invertible_depth"}
    assert dep[("reversible-f64", 2)] == dep[("reversible-f64", 4)] < dep[("plain", 2)] < dep[("plain", 4)]
    pk = {(r["method"], r["depth"]): r["peak_mib"] for r in rows if r["part"] == "invertible_depth"}
    assert pk[("reversible-f64", 2)] == pk[("reversible-f64", 4)] < pk[("plain", 4)]
    assert main["reversible"]["mem_frac"] < 1 and main["plain"]["mem_frac"] == 1
    host = {r["method"]: r for r in rows if r["part"] == "invertible_host"}
    assert set(host) == set(mod.HOST_METHODS) and all(r["host_ms"] > 0 for r in host.values())
    # the reversible step dispatches the coupling network's ops plus one recompute of F and G
    assert host["plain"]["ops"] < host["coupling-plain"]["ops"] < host["reversible"]["ops"]
    mod.plot(rows, str(tmp_path / "inv.png"))
    assert (tmp_path / "inv.png").stat().st_size > 0


# ---- peak memory (live tensors, op by op) and the per-block backward ------------------------------
def test_live_bytes_tracker_counts_new_storages_once():
    """peak_bytes: new storages count until freed; views and in-place results add nothing."""
    from pydiff.testing.memory import LiveBytes, peak_bytes

    n = 1000 + int(torch.randint(0, 500, ()).item())
    x = torch.randn(n)

    def fn():
        a = x * 2             # +4n
        v = a[: n // 2]       # a view: +0
        v.add_(1.0)           # in place: +0
        b = a + 1             # +4n (peak 8n)
        del a, v
        c = b * 3             # +4n, a freed: 8n
        return c.sum()        # +4 bytes

    out, peak = peak_bytes(fn)
    assert peak == 8 * n + 4, peak  # a and b, then b and c and the 4-byte sum
    with LiveBytes() as lb:
        y = torch.randn(n, 3)
        z = y.t().contiguous()  # a copy: 2 x 12n alive
        del y
    assert lb.peak == 24 * n and lb.current == 12 * n and z.shape == (3, n)


def _gpu_size_peaks(methods, depth):
    """The bench's GPU-size stack (C = 256, 64x64, batch 8) on the meta device: peak MiB per method."""
    with _bench_invertible() as mod:
        dev = torch.device("meta")
        C, H, B = mod.GPU_CFG["C"], mod.GPU_CFG["H"], mod.GPU_CFG["B"]
        x = torch.empty(B, C, H, H, device=dev, requires_grad=True)
        w = torch.empty(B, C, H, H, device=dev)
        return {m: mod._measure(mod.build(m, C, depth, dev), x, w, dev, False, 1)[2] for m in methods}


def test_peak_memory_gpu_size_stack_on_meta():
    """Issue 6's memory target on the GPU-size 16-block stack, measured without a GPU (live tensors
    on the meta device): the reversible stack's training peak <= 10 % of plain autograd's, the same
    at 4 and 16 blocks (parameter gradients reach .grad block by block, the rebuilt state and the
    state gradient are updated in place), float64 state <= 12 %."""
    p16 = _gpu_size_peaks(("plain", "reversible", "reversible-f64"), 16)
    p4 = _gpu_size_peaks(("reversible", "reversible-f64"), 4)
    half = 8 * 128 * 64 * 64 * 4 / 2**20  # one fp32 coupling half: 16 MiB
    assert p16["plain"] > 150 * half
    assert p16["reversible"] <= 0.10 * p16["plain"] and p16["reversible"] <= 14 * half, p16
    assert p16["reversible-f64"] <= 0.12 * p16["plain"], p16
    assert p4 == {m: p16[m] for m in p4}, (p4, p16)


@pytest.mark.parametrize("state_dtype", [None, torch.float64, torch.int64])
def test_backward_leaves_output_and_incoming_gradient_alone(state_dtype):
    """The in-place rebuild and gradient updates never touch the caller's output or the gradient
    handed to backward; a second backward (retain_graph) gives the same gradients again; gradients
    with respect to one block's parameters alone (autograd.grad) equal the full backward's."""
    torch.manual_seed(1)
    blocks = [AdditiveCoupling(resblock(4), resblock(4)) for _ in range(3)] + [ScaledCoupling(resblock(4))] * (
        state_dtype != torch.int64)
    stack = ReversibleSequential(blocks, state_dtype=state_dtype)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = stack(x)
    y0 = y.detach().clone()
    gy = torch.randn_like(y)
    gy0 = gy.clone()
    params = list(stack.parameters())
    g1 = torch.autograd.grad(y, [x] + params, gy, retain_graph=True)
    assert torch.equal(y.detach(), y0) and torch.equal(gy, gy0)
    g2 = torch.autograd.grad(y, [x] + params, gy, retain_graph=True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    last = list(blocks[-1].parameters())
    g3 = torch.autograd.grad(y, last, gy)
    for a, b in zip(g3, g1[1 + len(params) - len(last):]):
        assert torch.equal(a, b)
    # an expanded (stride-0) incoming gradient, e.g. from y.sum(): must not be written
    y = stack(x)
    ones = torch.ones(()).expand_as(y)
    ga = torch.autograd.grad(y, [x], ones)[0]
    gb = torch.autograd.grad(stack(x), [x], torch.ones_like(y))[0]
    assert torch.equal(ga, gb)
