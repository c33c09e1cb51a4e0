"""pydiff.nn.fused: GroupNormSiLU (a drop-in nn.GroupNorm with the SiLU fused) and
fuse_groupnorm_silu (swaps it into Sequentials), against GroupNorm -> SiLU in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydiff
from pydiff.nn import GroupNormSiLU, fuse_groupnorm_silu

BACKENDS = [b for b in pydiff.available_backends(torch.device("cpu"))]


def _net(c=12, groups=3, affine=True):
    return nn.Sequential(nn.Conv2d(4, c, 3, padding=1), nn.GroupNorm(groups, c, affine=affine), nn.SiLU(),
                         nn.Conv2d(c, c, 3, padding=1),
                         nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.0)),
                         nn.SiLU(), nn.GroupNorm(groups, c), nn.ReLU())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,groups", [((1, 6, 1), 3), ((3, 12, 7, 5), 4), ((2, 10, 13), 1)])
def test_group_norm_silu_module_matches_float64(backend, dtype, shape, groups):
    norm = nn.GroupNorm(groups, shape[1]).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = GroupNormSiLU.from_group_norm(norm)
    fused.backend = backend
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    y = fused(x)
    gx, gw, gb = torch.autograd.grad(y, [x, fused.weight, fused.bias], dy)
    xr = x.detach().double().requires_grad_()
    wr, br = norm.weight.detach().double().requires_grad_(), norm.bias.detach().double().requires_grad_()
    yr = F.silu(F.group_norm(xr, groups, wr, br, norm.eps))
    rx, rw, rb = torch.autograd.grad(yr, [xr, wr, br], dy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in ((y, yr), (gx, rx), (gw, rw), (gb, rb)):
        assert a.dtype == dtype
        assert (a.double() - b).abs().max() <= tol * max(1.0, b.abs().max().item())


def test_fuse_groupnorm_silu_swaps_pairs_in_place():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(2, 4, 6, 6)
    ref = net(x)
    params = {n: p for n, p in net.named_parameters()}
    keys = list(net.state_dict())
    assert fuse_groupnorm_silu(net) == 2
    assert isinstance(net[1], GroupNormSiLU) and isinstance(net[2], nn.Identity)
    assert isinstance(net[4][0], GroupNormSiLU) and isinstance(net[4][1], nn.Identity)
    assert type(net[6]) is nn.GroupNorm and isinstance(net[5], nn.SiLU)   # GroupNorm -> ReLU, lone SiLU: kept
    assert list(net.state_dict()) == keys
    assert all(p is params[n] for n, p in net.named_parameters())           # the same Parameter objects
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    assert fuse_groupnorm_silu(net) == 0                                  # idempotent
    fresh = _net()
    fuse_groupnorm_silu(fresh)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x))


def test_fuse_affine_false_and_bad_input():
    net = nn.Sequential(nn.GroupNorm(2, 8, affine=False), nn.SiLU())
    x = torch.randn(3, 8, 5)
    ref = net(x)
    assert fuse_groupnorm_silu(net) == 1 and net[0].weight is None
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x: expected \[N, 8"):
        net(torch.randn(3, 6, 5))
    with pytest.raises(TypeError, match="model"):
        fuse_groupnorm_silu(torch.randn(3))
    with pytest.raises(TypeError, match="norm"):
        GroupNormSiLU.from_group_norm(nn.LayerNorm(4))


def test_fused_module_saves_less_for_backward():
    """The fused module saves x and the statistics: less than GroupNorm -> SiLU, which also keeps
    the normalised tensor."""
    from pydiff.testing.memory import saved_bytes

    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    plain = nn.Sequential(nn.GroupNorm(8, 32), nn.SiLU())
    _, a = saved_bytes(lambda: plain(x))
    fuse_groupnorm_silu(plain)
    _, b = saved_bytes(lambda: plain(x))
    assert b < 0.6 * a, (a, b)
