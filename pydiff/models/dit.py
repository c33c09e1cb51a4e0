"""A small DiT (Peebles & Xie 2023): patchified latents through adaLN-Zero transformer blocks.

Layout (``x [B, C, H, W]``, patch ``p``, ``T = (H / p) (W / p)`` tokens of width ``D``)::

    h   = x_embedder(x) + pos_embed            # Conv2d(C, D, p, stride p) -> [B, T, D]; fixed 2-D sin-cos
    c   = t_embedder(t) + y_embedder(y)        # sinusoidal(t) -> Linear-SiLU-Linear; class table [B, D]
    per block (adaLN-Zero):
        shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c)   # SiLU-Linear(D, 6D), each [B, D]
        h = h + gate1 * attn.proj(attention(attn.qkv(LN(h) * (1 + scale1) + shift1)))
        h = h + gate2 * mlp.fc2(GELU_tanh(mlp.fc1(LN(h) * (1 + scale2) + shift2)))
    out = final_layer(h, c)                    # LN-modulate (shift, scale from c), Linear(D, p*p*C_out)
    out -> unpatchify -> [B, C_out, H, W]      # C_out = C (2C with learn_sigma)

``LN`` has no affine parameters (eps 1e-6).  ``y`` = None (or the index ``num_classes``) is the
null class of classifier-free guidance.  ``forward(x, t, y)`` follows pydiff's sampler convention
``model(x, t, cond)``.

Quantized blocks: when :func:`pydiff.quant.quantize_` has replaced a block's linears with
:class:`pydiff.quant.QuantizedLinear`, the block runs the fused path: ``attn.qkv`` and ``mlp.fc1``
get the raw residual stream with ``prologue="layernorm", shift=, scale=`` (the LayerNorm and adaLN
modulation happen inside the activation-quantization pass, which writes int4 + scales instead of a
16-bit tensor).  The MLP runs through :func:`pydiff.quant.layers.quantized_mlp`: when ``fc2`` takes a
quantized input (no splits, no padding; see ``QuantizedLinear.can_feed``; a low-rank branch, such
as the W4A4 default rank 32, is fine), ``fc1``'s GEMM epilogue applies the tanh-GELU and ``fc2``'s
smoothing and writes ``fc2``'s int4 + scales, plus the down-projection ``lora_act`` of ``fc2``'s
low-rank branch, directly (``quant_gemm_quant``), so the 16-bit hidden activations never exist;
otherwise ``mlp.fc2`` gets ``fc1``'s output with ``prologue="gelu_tanh"``.
``DiTBlock.fused_mlp = False`` turns the first form off (for comparisons).

Weights are random (PyTorch's default init, adaLN included) unless ``zero_init=True`` (DiT's
adaLN-Zero training init: zero modulation and output layer, every block the identity), which would
make a random model trivial for tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pydiff.models.invertible_unet import timestep_embedding

__all__ = ["DiT", "DiTBlock", "FinalLayer", "modulate", "norm_modulate_mlp"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale[:, None]) + shift[:, None]`` (``x [B, T, D]``, ``shift/scale [B, D]``)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _fusable(linear: nn.Module) -> bool:
    from pydiff.quant.layers import QuantizedLinear

    return isinstance(linear, QuantizedLinear)


def norm_modulate_linear(norm: nn.LayerNorm, linear: nn.Module, x: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """``linear(modulate(norm(x), shift, scale))``; one fused quantize pass when ``linear`` is quantized
    (``norm`` must then have no affine parameters)."""
    if _fusable(linear) and norm.weight is None and norm.bias is None:
        return linear(x, prologue="layernorm", shift=shift, scale=scale, eps=norm.eps)
    return linear(modulate(norm(x), shift, scale))


def norm_modulate_mlp(norm: nn.LayerNorm, mlp: "Mlp", x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      fused: bool = True) -> torch.Tensor:
    """``mlp.fc2(GELU_tanh(mlp.fc1(modulate(norm(x), shift, scale))))``.  With both linears quantized and
    ``fused``, :func:`pydiff.quant.layers.quantized_mlp` (LayerNorm/adaLN in fc1's quantize pass when
    ``norm`` has no affine parameters; GELU + fc2's quantization and low-rank down-projection in
    fc1's GEMM epilogue when ``fc1.can_feed(fc2)``)."""
    act = mlp.act
    gelu = isinstance(act, nn.GELU) and act.approximate == "tanh"
    if fused and gelu and _fusable(mlp.fc1) and _fusable(mlp.fc2):
        from pydiff.quant.layers import quantized_mlp

        if norm.weight is None and norm.bias is None:
            return quantized_mlp(mlp.fc1, mlp.fc2, x, "gelu_tanh", prologue="layernorm", shift=shift, scale=scale,
                                 eps=norm.eps)
        return quantized_mlp(mlp.fc1, mlp.fc2, modulate(norm(x), shift, scale), "gelu_tanh")
    h = norm_modulate_linear(norm, mlp.fc1, x, shift, scale)
    return gelu_linear(act, mlp.fc2, h)


def gelu_linear(act: nn.Module, linear: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``linear(GELU_tanh(h))``; the GELU runs inside the quantize pass when ``linear`` is quantized."""
    if _fusable(linear):
        return linear(h, prologue="gelu_tanh")
    return linear(act(h))


def pos_embed_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[gh * gw, dim]`` (half the channels for each axis)."""
    half = dim // 2
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")

    def axis(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1) * omega[None]
        e = torch.cat([out.sin(), out.cos()], dim=1)
        return F.pad(e, (0, d - e.shape[1]))

    return torch.cat([axis(ys, half), axis(xs, dim - half)], dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T, D]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.frequency_size).to(device=w.device, dtype=w.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of hidden_size = {dim}, got {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv [B, T, 3D]`` -> softmax attention over the heads -> ``[B, T, D]`` (before ``proj``)."""
        B, T, D3 = qkv.shape
        q, k, v = qkv.reshape(B, T, 3, self.num_heads, D3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D3 // 3)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (see the module docstring for the formula)."""

    fused_mlp: bool = True  # quantized MLP: fc1's GEMM writes fc2's quantized input + lora_act (quant_gemm_quant)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = norm_modulate_linear(self.norm1, self.attn.qkv, x, shift1, scale1)
        x = x + gate1.unsqueeze(1) * self.attn.proj(self.attn.attend(qkv))
        return x + gate2.unsqueeze(1) * norm_modulate_mlp(self.norm2, self.mlp, x, shift2, scale2, self.fused_mlp)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return norm_modulate_linear(self.norm_final, self.linear, x, shift, scale)


class DiT(nn.Module):
    """Small DiT with random weights.  ``forward(x [B, C, H, W], t [B] or scalar, y [B] long or None)
    -> [B, C_out, H, W]``.  Defaults: 16x16x4 latents, patch 2 (64 tokens), width 192, 4 blocks of 3
    heads, MLP ratio 4, 10 classes."""

    def __init__(self, input_size: int = 16, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 192,
                 depth: int = 4, num_heads: int = 3, mlp_ratio: float = 4.0, num_classes: int = 10,
                 learn_sigma: bool = False, zero_init: bool = False):
        super().__init__()
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of input_size = {input_size}, got {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        g = input_size // patch_size
        self.register_buffer("pos_embed", pos_embed_2d(hidden_size, g, g)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # index num_classes: the null class
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if zero_init:
            for blk in list(self.blocks) + [self.final_layer]:
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``[B, T, p*p*C]`` -> ``[B, C, H, W]``."""
        p, C = self.patch_size, self.out_channels
        B = x.shape[0]
        x = x.reshape(B, H // p, W // p, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"x: expected H and W divisible by patch_size = {self.patch_size}, got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"t: expected a scalar or [B] = [{B}] timesteps, got shape {tuple(t.shape)}")
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        h = self.x_embedder(x)
        g = self.input_size // self.patch_size
        if H // self.patch_size == g and W // self.patch_size == g:  # (the stored table's grid, not just its size)
            h = h + self.pos_embed.to(h.dtype)
        else:
            h = h + pos_embed_2d(h.shape[2], H // self.patch_size, W // self.patch_size).to(h)[None]
        c = self.t_embedder(t) + self.y_embedder(y)
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.final_layer(h, c), H, W)
