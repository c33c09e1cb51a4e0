"""Models built from pydiff's blocks: :class:`InvertibleUNet` (reversible stages, memory independent
of depth)."""
from pydiff.models.invertible_unet import AttentionBlock, InvertibleUNet, ResBlock, timestep_embedding

__all__ = ["AttentionBlock", "InvertibleUNet", "ResBlock", "timestep_embedding"]
