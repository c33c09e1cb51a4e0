"""Neural-network building blocks: reversible coupling stacks with a memory-free backward.

See :mod:`pydiff.nn.reversible` for the couplings, the exactness options and their bounds.
"""
from pydiff.nn.reversible import AdditiveCoupling, CouplingBlock, ReversibleSequential, ScaledCoupling

__all__ = ["AdditiveCoupling", "CouplingBlock", "ReversibleSequential", "ScaledCoupling"]
