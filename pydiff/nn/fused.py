"""Drop-in fused modules for existing networks.

:class:`GroupNormSiLU` is an ``nn.GroupNorm`` (same parameters, same ``state_dict``) whose forward
is ``silu(group_norm(x))`` in one fused kernel with a fused backward
(:func:`pydiff.ops.invertible.groupnorm_silu`): one read and one write of ``x`` instead of two of
each, and autograd saves ``x`` and the per-group statistics instead of the normalised tensor and
the SiLU input.  :func:`fuse_groupnorm_silu` swaps it into a model wherever an ``nn.GroupNorm`` is
followed directly by an ``nn.SiLU`` inside an ``nn.Sequential`` (the SiLU becomes ``nn.Identity``),
the pattern of UNet resnet blocks written as Sequentials.  A functional ``F.silu`` in a module's
``forward`` cannot be seen from outside: call :func:`pydiff.ops.invertible.groupnorm_silu_module`
there instead.
"""
from __future__ import annotations

import torch
from torch import nn

from pydiff.ops.invertible import groupnorm_silu

__all__ = ["GroupNormSiLU", "fuse_groupnorm_silu"]


class GroupNormSiLU(nn.GroupNorm):
    """``silu(GroupNorm(num_groups, num_channels, eps, affine)(x))`` fused; ``x``: ``[N, C, *]``.

    Statistics in float64, the rest in fp32 (float64 for float64 input), output in ``x``'s dtype.
    ``backend`` (attribute): ``None`` (the default choice), or a backend name forced per module.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, backend: str | None = None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "GroupNormSiLU":
        """A fused module that shares ``norm``'s parameters (the same ``nn.Parameter`` objects, so an
        optimizer built before the swap keeps updating them)."""
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"norm: expected an nn.GroupNorm, got {type(norm).__name__}")
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        # its plain attributes (num_groups, eps, ... and any a newer torch adds), not hooks or registries
        new.__dict__.update({k: v for k, v in norm.__dict__.items() if not k.startswith("_") and k != "training"})
        new.weight, new.bias = norm.weight, norm.bias  # the same Parameter objects (or None)
        new.backend = None
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"x: expected [N, {self.num_channels}, *] (num_channels of this GroupNormSiLU), "
                             f"got shape {tuple(x.shape)}")
        return groupnorm_silu(x, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", then SiLU (fused)"


def fuse_groupnorm_silu(model: nn.Module) -> int:
    """Replace, in place, every ``nn.GroupNorm`` directly followed by ``nn.SiLU`` in an
    ``nn.Sequential`` of ``model`` (at any depth, ``model`` itself included) by a
    :class:`GroupNormSiLU` sharing its parameters, and that SiLU by ``nn.Identity`` (indices and
    ``state_dict`` keys unchanged).  Returns the number of pairs fused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    n = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules.keys())
        for a, b in zip(keys, keys[1:]):
            norm, act = seq._modules[a], seq._modules[b]
            if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
                seq._modules[a] = GroupNormSiLU.from_group_norm(norm)
                seq._modules[b] = nn.Identity()
                n += 1
    return n
