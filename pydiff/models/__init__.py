"""Models built from pydiff's blocks: :class:`InvertibleUNet` (reversible stages, memory independent
of depth) and :class:`DiT` (a small DiT-style transformer whose quantized blocks use the fused
LayerNorm/adaLN and GELU quantization prologues)."""
from pydiff.models.invertible_unet import AttentionBlock, InvertibleUNet, ResBlock, timestep_embedding
from pydiff.models.dit import DiT

__all__ = ["AttentionBlock", "DiT", "InvertibleUNet", "ResBlock", "timestep_embedding"]
