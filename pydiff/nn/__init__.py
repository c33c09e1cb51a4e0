"""Neural-network building blocks: reversible coupling stacks with a memory-free backward, and
drop-in fused modules.

See :mod:`pydiff.nn.reversible` for the couplings, the exactness options and their bounds, and
:mod:`pydiff.nn.fused` for GroupNorm + SiLU.
"""
from pydiff.nn.fused import GroupNormSiLU, fuse_groupnorm_silu
from pydiff.nn.reversible import AdditiveCoupling, CouplingBlock, ReversibleSequential, ScaledCoupling

__all__ = ["AdditiveCoupling", "CouplingBlock", "GroupNormSiLU", "ReversibleSequential", "ScaledCoupling",
           "fuse_groupnorm_silu"]
