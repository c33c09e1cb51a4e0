"""A UNet whose resolution stages are reversible coupling stacks (memory independent of depth).

Layout (``channels = (C0, C1, ..., CL)``, ``layers`` coupling layers per stage)::

    temb = MLP(sinusoidal(t))                                    # [B, time_dim]
    h    = conv_in(x)                                            # [B, C0, H, W]
    for i in 0..L:   h = down[i](h, temb)     (reversible)      # resnet (+ attention) couplings at Ci
                     skip[i] = h
                     h = transition_down[i](h, temb)  (checkpointed: ResBlock Ci -> Ci+1, stride-2 conv)
    h = mid(h, temb)                           (reversible)      # resnet + attention + resnet couplings
    for i in L..0:   h = transition_up[i](h, skip[i], temb)  (checkpointed: upsample, concat, ResBlock -> Ci)
                     h = up[i](h, temb)        (reversible)
    out  = head(h)                             (checkpointed: GroupNorm, SiLU, conv)

Each reversible stage keeps a ``[B, Ci, ...]`` state split into two halves of ``Ci / 2`` channels;
one coupling layer is ``AdditiveCoupling(ResBlock, ResBlock)`` followed, on stages with attention,
by ``AdditiveCoupling(Attention, Attention)`` (:mod:`pydiff.nn.reversible`).  ResBlocks take the
time embedding (a per-channel shift, as in DDPM).  Down/up sampling and channel changes are not
invertible; they run under ``torch.utils.checkpoint`` (non-reentrant), so training stores, per
stage, the stage's output (the skip) and the checkpointed transitions' inputs: activation memory
grows with the number of stages, not with ``layers`` (tested with saved-tensor hooks).

Defaults are a latent-diffusion size one would train: 4-channel 64x64 latents, channels
(128, 256, 256), 2 coupling layers per stage, attention on the two lower-resolution stages
(heads of 64 channels), float64 coupling state (gradients within 1e-5 of plain autograd;
``state_dtype=None`` saves the casts at the cost of rebuilt inputs that carry rounding error).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pydiff.nn.reversible import AdditiveCoupling, ReversibleSequential
from pydiff.ops.invertible import groupnorm_silu_module

__all__ = ["AttentionBlock", "InvertibleUNet", "ResBlock", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t w_k), sin(t w_k)]`` with ``w_k = max_period ** (-k / (dim / 2))``
    (Vaswani et al. 2017; DDPM's time embedding).  ``t``: ``[B]`` or a scalar; returns ``[B, dim]``
    float32."""
    t = torch.as_tensor(t)
    if t.dim() == 0:
        t = t[None]
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """``GroupNorm-SiLU-conv3x3 (+ time shift) GroupNorm-SiLU-dropout-conv3x3``, plus a 1x1 skip when
    ``in_channels != out_channels`` and ``residual=True``.

    As the F or G of a coupling, ``residual=False`` returns the branch alone (the coupling adds it).
    ``zero_init`` zeroes the last conv (each block starts as the identity map, ADM style).
    Shapes: ``x [B, Cin, H, W]``, ``temb [B, time_dim]`` -> ``[B, Cout, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, time_dim: Optional[int] = None,
                 groups: int = 32, dropout: float = 0.0, residual: bool = False, zero_init: bool = True):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(_groups(in_channels, groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb = nn.Linear(time_dim, out_channels) if time_dim else None
        self.norm2 = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.residual = bool(residual)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if residual and in_channels != out_channels
                     else nn.Identity())
        if zero_init:
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # GroupNorm + SiLU: one fused kernel pair (pydiff.ops.invertible.groupnorm_silu), which saves
        # only its input for backward
        h = self.conv1(groupnorm_silu_module(self.norm1, x))
        if self.temb is not None and temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(groupnorm_silu_module(self.norm2, h)))
        return self.skip(x) + h if self.residual else h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions: ``proj(SDPA(qkv(GroupNorm(x))))``.

    Returns the branch alone (the coupling adds it).  ``x [B, C, H, W]`` -> ``[B, C, H, W]``; the
    time embedding, if given, is ignored.
    """

    def __init__(self, channels: int, head_dim: int = 64, groups: int = 32, zero_init: bool = True):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            raise ValueError(f"channels={channels} is not a multiple of heads={self.heads}")
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        if zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return self.proj(o.transpose(-1, -2).reshape(B, C, H, W))


class _Down(nn.Module):
    def __init__(self, cin, cout, time_dim, groups, dropout, zero_init, downsample):
        super().__init__()
        self.res = ResBlock(cin, cout, time_dim, groups, dropout, residual=True, zero_init=zero_init)
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else nn.Identity()

    def forward(self, h, temb):
        return self.down(self.res(h, temb))


class _Up(nn.Module):
    def __init__(self, cin, cskip, cout, time_dim, groups, dropout, zero_init, upsample):
        super().__init__()
        self.upsample = upsample
        self.up = nn.Conv2d(cin, cin, 3, padding=1) if upsample else nn.Identity()
        self.res = ResBlock(cin + cskip, cout, time_dim, groups, dropout, residual=True, zero_init=zero_init)

    def forward(self, h, skip, temb):
        if self.upsample:
            h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.res(torch.cat([h, skip], dim=1), temb)


class _Head(nn.Module):
    def __init__(self, cin, cout, groups, zero_init):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, h):
        return self.conv(groupnorm_silu_module(self.norm, h))


class InvertibleUNet(nn.Module):
    """Noise-prediction UNet with reversible stages; ``forward(x, t) -> [B, out_channels, H, W]``.

    Args:
        in_channels, out_channels: latent channels (4 for SD-style latents).
        channels: feature width of each resolution stage (each even: two coupling halves); the
            spatial size must be divisible by ``2 ** (len(channels) - 1)``.
        layers: coupling layers per stage (each: a resnet coupling, plus an attention coupling
            where ``attention[i]``); the mid stage has one resnet, one attention, one resnet.
        attention: per stage, whether to add attention couplings.
        head_dim: channels per attention head (of the C/2-channel halves).
        groups: GroupNorm groups (reduced to a divisor of the width where needed).
        time_dim: width of the time embedding (default ``4 * channels[0]``).
        dropout: dropout inside the ResBlocks (replayed exactly in the recompute).
        state_dtype: coupling state dtype of the reversible stages (``torch.float64`` default,
            ``None`` for the model dtype, ``torch.int64`` for fixed point; see
            :class:`pydiff.nn.ReversibleSequential`).
        reversible: ``False`` runs plain autograd everywhere (stages and transitions) — the
            reference for gradients; :meth:`set_reversible` switches later.
        zero_init: zero the last layer of every residual branch and of the head (ADM style).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 4, channels: Sequence[int] = (128, 256, 256),
                 layers: int = 2, attention: Sequence[bool] = (False, True, True), head_dim: int = 64,
                 groups: int = 32, time_dim: Optional[int] = None, dropout: float = 0.0,
                 state_dtype: Optional[torch.dtype] = torch.float64, reversible: bool = True,
                 zero_init: bool = True, mid_attention: bool = True):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        attention = tuple(bool(a) for a in attention)
        if not channels or any(c < 2 for c in channels):
            raise ValueError(f"channels: expected one width >= 2 per stage (at least one stage), got {channels}")
        for name, v in (("head_dim", head_dim), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if len(attention) != len(channels):
            raise ValueError(f"attention: expected {len(channels)} flags (one per stage), got {len(attention)}")
        if any(c % 2 for c in channels):
            raise ValueError(f"channels: each stage width must be even (two coupling halves), got {channels}")
        if layers < 1:
            raise ValueError(f"layers: expected >= 1 coupling layer per stage, got {layers}")
        self.channels, self.attention, self.layers = channels, attention, int(layers)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_dim = time_dim = int(time_dim or 4 * channels[0])
        self.temb_dim0 = channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        kw = dict(groups=groups, zero_init=zero_init)

        def stage(c: int, attn: bool, pattern=None) -> ReversibleSequential:
            h = c // 2
            blocks = []
            for kind in (pattern or (["res", "attn"] if attn else ["res"]) * self.layers):
                if kind == "res":
                    blocks.append(AdditiveCoupling(ResBlock(h, h, time_dim, dropout=dropout, **kw),
                                                   ResBlock(h, h, time_dim, dropout=dropout, **kw)))
                else:
                    blocks.append(AdditiveCoupling(AttentionBlock(h, head_dim, **kw),
                                                   AttentionBlock(h, head_dim, **kw)))
            return ReversibleSequential(blocks, state_dtype=state_dtype, reversible=reversible)

        n = len(channels)
        self.down = nn.ModuleList([stage(c, a) for c, a in zip(channels, attention)])
        self.down_trans = nn.ModuleList([_Down(channels[i], channels[i + 1], time_dim, groups, dropout, zero_init,
                                               downsample=True) for i in range(n - 1)])
        self.mid = stage(channels[-1], False, ["res", "attn", "res"] if mid_attention else ["res", "res"])
        self.up_trans = nn.ModuleList([
            _Up(channels[i + 1] if i + 1 < n else channels[-1], channels[i], channels[i], time_dim, groups, dropout,
                zero_init, upsample=i + 1 < n) for i in range(n)])
        self.up = nn.ModuleList([stage(c, a) for c, a in zip(channels, attention)])
        self.head = _Head(channels[0], out_channels, groups, zero_init)
        self.reversible = bool(reversible)

    def set_reversible(self, flag: bool) -> "InvertibleUNet":
        """Reversible stages + checkpointed transitions (``True``) or plain autograd (``False``)."""
        self.reversible = bool(flag)
        for m in self.modules():
            if isinstance(m, ReversibleSequential):
                m.reversible = self.reversible
        return self

    def _ckpt(self, fn, *args):
        if self.reversible and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
        return fn(*args)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """``x [B, in_channels, H, W]``, ``t`` a scalar or ``[B]`` timesteps -> ``[B, out_channels, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        f = 2 ** (len(self.channels) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} must be divisible by {f} "
                             f"({len(self.channels)} stages)")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t: expected a scalar or [B] = [{x.shape[0]}] timesteps, got shape {tuple(t.shape)}")
        temb = self.time_mlp(timestep_embedding(t, self.temb_dim0).to(self.conv_in.weight.dtype))
        h = self.conv_in(x)
        skips = []
        for i, stage in enumerate(self.down):
            h = stage(h, temb)
            skips.append(h)
            if i < len(self.down_trans):
                h = self._ckpt(self.down_trans[i], h, temb)
        h = self.mid(h, temb)
        for i in reversed(range(len(self.up))):
            h = self._ckpt(self.up_trans[i], h, skips[i], temb)
            h = self.up[i](h, temb)
        return self._ckpt(self.head, h)
