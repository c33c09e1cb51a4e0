"""InvertibleUNet (reversible stages, checkpointed transitions) and backpropagation through whole
DDIM / EDICT chains with memory independent of the number of steps (pydiff.invertible_sampling)."""
import copy

import pytest
import torch

from pydiff.invertible_sampling import ddim_sample, edict_sample, idm_ddim_stack
from pydiff.models import InvertibleUNet, timestep_embedding
from pydiff.nn import ReversibleSequential
from pydiff.solvers.ddim import DDIMSolver
from pydiff.solvers.edict import EDICTSolver
from pydiff.testing.memory import saved_bytes


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny(layers=1, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dict(channels=(16, 32), attention=(False, True), layers=layers, head_dim=8, groups=4,
                   zero_init=False), **kw)
    return InvertibleUNet(**kw)


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()




def weights_like(y):
    return torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)


# ---- the UNet -----------------------------------------------------------------------------------
def test_forward_shape_and_default_size():
    net = tiny()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert net(x, torch.tensor([1, 500, 999])).shape == (3, 4, 8, 8)
        assert net(x, 10).shape == (3, 4, 8, 8)
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    big = InvertibleUNet()  # 64x64 latents, channels (128, 256, 256)
    n = sum(p.numel() for p in big.parameters())
    assert 10e6 < n < 40e6
    assert all(isinstance(s, ReversibleSequential) for s in list(big.down) + list(big.up) + [big.mid])
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 4, 7, 7), 1)


@pytest.mark.parametrize("state_dtype,dropout", [(torch.float64, 0.0), (torch.float64, 0.2), (None, 0.0)])
def test_gradients_equal_plain_autograd(state_dtype, dropout):
    """Same weights, same loss: reversible stages + checkpointed transitions vs plain autograd
    everywhere (gradients of every parameter and of the input within 1e-5; dropout replayed)."""
    net = tiny(layers=2, state_dtype=state_dtype, dropout=dropout).train()
    torch.manual_seed(1)
    x0, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    res = []
    for reversible in (True, False):
        net.set_reversible(reversible)
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        y = net(x, t)
        g = torch.autograd.grad((y * weights_like(y)).sum(), [x] + list(net.parameters()))
        res.append((y.detach(), g))
    (y1, g1), (y2, g2) = res
    assert torch.equal(y1, y2)
    worst = max(rel_norm(a, b) for a, b in zip(g1, g2))
    print(f"UNet gradients (state {state_dtype}, dropout {dropout}): worst rel. diff {worst:.1e}")
    assert worst <= 1e-5
    assert all(g.abs().sum() > 0 for g in g1)


def test_memory_does_not_grow_with_blocks_per_stage():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.tensor([3, 400])
    ours, plain = {}, {}
    for layers in (1, 2, 4):
        net = tiny(layers)
        _, ours[layers] = saved_bytes(lambda: net(x, t))
        net.set_reversible(False)
        _, plain[layers] = saved_bytes(lambda: net(x, t))
    print(f"bytes saved for backward by layers per stage: reversible {ours}, plain {plain}")
    assert len(set(ours.values())) == 1
    assert plain[4] > plain[2] > plain[1] > 5 * ours[1]


# ---- invertible sampling ------------------------------------------------------------------------
def chain_grads(fn, net, x0):
    x = x0.clone().requires_grad_()
    out = fn(x)
    y = out[0] + 0.5 * out[1] if isinstance(out, tuple) else out
    g = torch.autograd.grad((y * weights_like(y)).sum(), [x] + list(net.parameters()))
    return y.detach(), g


@pytest.fixture(scope="module")
def chain_net():
    net = tiny(state_dtype=None)  # plain fp32 UNet stages inside; the chain is what is reversible
    net.set_reversible(False)
    return net


@pytest.mark.parametrize("sampler,dtype,state_dtype,bound", [
    ("edict", torch.float32, None, 1e-5),            # exact inverse (closed form), fp32 throughout
    ("edict", torch.float32, torch.float64, 1e-5),   # exact inverse, float64 chain state
    ("ddim", torch.float64, None, 1e-9),             # approximate inverse, float64 model: converges
    ("ddim", torch.float32, torch.float64, 1e-4),    # approximate inverse, fp32 model: stops at fp32 noise
])
def test_chain_gradients_equal_plain_autograd(chain_net, sampler, dtype, state_dtype, bound):
    """5-step chains: gradients w.r.t. the initial noise and every model parameter against plain
    autograd.  EDICT's inverse is exact (closed form): <= 1e-5 in fp32.  DDIM's is a fixed-point
    solve (60 iterations here; ``info`` reports the last iteration's change): with a float64 model
    it converges (<= 1e-9); with an fp32 model it stalls at the model's fp32 rounding noise
    (residual ~3e-7, gradients ~5e-6 here, bound 1e-4)."""
    net = copy.deepcopy(chain_net).to(dtype)
    torch.manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, dtype=dtype)
    if sampler == "ddim":
        solver = DDIMSolver(clip_sample=False)
        solver.set_timesteps(5)
        info = {}
        run = lambda x, rev: ddim_sample(net, solver, x, state_dtype=state_dtype, inverse_iters=60,  # noqa: E731
                                         reversible=rev, info=info)
    else:
        solver = EDICTSolver()
        solver.set_timesteps(5)
        run = lambda x, rev: edict_sample(net, solver, x, state_dtype=state_dtype, reversible=rev)  # noqa: E731
    y1, g1 = chain_grads(lambda x: run(x, True), net, x0)
    y2, g2 = chain_grads(lambda x: run(x, False), net, x0)
    assert torch.equal(y1, y2)
    worst = max(rel_norm(a, b) for a, b in zip(g1, g2))
    extra = f", DDIM inverse residual {info['inverse_residual'].item():.1e}" if sampler == "ddim" else ""
    print(f"{sampler} chain ({dtype}, state {state_dtype}): worst gradient rel. diff {worst:.1e}{extra}")
    assert worst <= bound


def test_chains_match_the_steppers(chain_net):
    torch.manual_seed(4)
    x0 = torch.randn(2, 4, 8, 8)
    solver = DDIMSolver(clip_sample=False, prediction_type="v_prediction", beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012)
    solver.set_timesteps(6)
    with torch.no_grad():
        ours = ddim_sample(chain_net, solver, x0)
        x = x0.clone()
        for t in solver.timesteps:
            x = solver.step(chain_net(x, t), x)
        assert rel_norm(ours, x) <= 2e-6
        e = EDICTSolver()
        e.set_timesteps(6)
        ox, oy = edict_sample(chain_net, e, x0)
        rx, ry = e.generate(chain_net, x0.clone())
        assert rel_norm(ox, rx) <= 2e-6 and rel_norm(oy, ry) <= 2e-6
    with pytest.raises(ValueError, match="clip_sample"):
        s = DDIMSolver()
        s.set_timesteps(3)
        ddim_sample(chain_net, s, x0)


def test_chain_memory_independent_of_steps(chain_net):
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ours, plain = {}, {}
    for n in (2, 6):
        e = EDICTSolver()
        e.set_timesteps(n)
        _, ours[n] = saved_bytes(lambda: edict_sample(chain_net, e, x))
        _, plain[n] = saved_bytes(lambda: edict_sample(chain_net, e, x, reversible=False))
    print(f"EDICT chain bytes saved for backward by steps: ours {ours}, plain {plain}")
    assert ours[2] == ours[6] == 2 * x.numel() * 4
    assert plain[6] > 2.5 * plain[2]


def test_chain_conditioning_gets_gradients(chain_net):
    """A conditioning tensor passed through ``cond`` receives its gradient (here a per-sample shift)."""
    torch.manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8)
    shift = torch.randn(2, 4, 1, 1)
    model = lambda x, t, s: chain_net(x + s, t)  # noqa: E731
    e = EDICTSolver()
    e.set_timesteps(3)
    gs = []
    for rev in (True, False):
        s = shift.clone().requires_grad_()
        xx, yy = edict_sample(model, e, x0, cond=(s,), params=chain_net.parameters(), reversible=rev)
        gs.append(torch.autograd.grad((xx * weights_like(xx)).sum(), s)[0])
    assert rel_norm(gs[0], gs[1]) <= 1e-5


def test_two_level_invertible():
    """IDM's two levels together: a reversible EDICT chain over a UNet with reversible stages."""
    net = tiny(state_dtype=torch.float64)
    e = EDICTSolver()
    e.set_timesteps(3)
    torch.manual_seed(6)
    x0 = torch.randn(2, 4, 8, 8)
    res = []
    for rev in (True, False):
        net.set_reversible(rev)
        x = x0.clone().requires_grad_()
        out, nbytes = saved_bytes(lambda: edict_sample(net, e, x, reversible=rev))
        y = out[0] + 0.5 * out[1]
        res.append((nbytes, torch.autograd.grad((y * weights_like(y)).sum(), [x] + list(net.parameters()))))
    assert res[0][0] == 2 * x0.numel() * 4 < res[1][0] / 100
    assert max(rel_norm(a, b) for a, b in zip(res[0][1], res[1][1])) <= 1e-5


def test_idm_coupled_ddim_stack(chain_net):
    """IDM's form: DDIM steps inside scaled couplings (learnable v): exact inverse, gradients for the
    noise, the model and every v within 1e-5 of plain autograd, memory independent of steps."""
    solver = DDIMSolver(clip_sample=False)
    solver.set_timesteps(4)
    stack = idm_ddim_stack(chain_net, solver, v_init=0.4)
    assert len(list(stack.parameters())) == len(list(chain_net.parameters())) + 4
    torch.manual_seed(8)
    x0 = torch.randn(2, 4, 8, 8)
    res = []
    for rev in (True, False):
        stack.reversible = rev
        x = x0.clone().requires_grad_()
        out, nbytes = saved_bytes(lambda: stack(torch.cat([x, x], dim=1)))
        y = out[:, :4]
        g = torch.autograd.grad((y * weights_like(y)).sum(), [x] + list(stack.parameters()))
        res.append((nbytes, y.detach(), g))
    assert torch.equal(res[0][1], res[1][1])
    assert res[0][0] == 2 * x0.numel() * 8 < res[1][0] / 100  # the float64 state only
    assert max(rel_norm(a, b) for a, b in zip(res[0][2], res[1][2])) <= 1e-5
    with torch.no_grad():
        s = stack.encode(torch.cat([x0, x0], dim=1))
        assert torch.allclose(stack.inverse_state(stack.forward_state(s)), s, rtol=0, atol=1e-12)
