"""Quantized ``Linear`` / ``Conv2d`` layers (W4A4, W8A8 int8 / fp8) over :mod:`pydiff.ops.quant`.

What a layer computes (``x [M, K]`` after flattening leading dimensions; for a convolution, the
im2col patches ``[B * L, Cin * kh * kw]``; ``W [N, K]`` the float weight, ``b [N]`` its bias)::

    s          = smoothing factors [K]    (SmoothQuant: s_k = max|X_k|^a / max_n |W_nk|^(1-a); else 1)
    W_s        = W * s[None, :]           (the weight takes the factors, the activations are divided)
    L1 L2      ~ W_s^T                    (SVDQuant: top-R SVD, lora_down L1 [K, R], lora_up L2 [R, N],
                                           16-bit; R = 0 turns the branch off)
    Q(W_res)   = quantize(W_s - (L1 L2)^T) (rows = output channels, per group of G input channels)
    y          = quant_gemm(quantize(x / s), Q(W_res)) + (x / s) L1 L2 + b
               ~ x W^T + b

The activation quantization (one pass: prologue, ``/ s``, the down-projection ``(x / s) L1`` and
per-token, per-group quantization) is :func:`pydiff.ops.quant.quantize`; the GEMM with the
dequantization, ``+ lora_act L2`` and ``+ b`` fused into its epilogue is
:func:`pydiff.ops.quant.quant_gemm`.  K is zero-padded to a multiple of ``G`` (the weight at
conversion, the activations in ``forward``): zero channels change no group's maximum and add
nothing to the products.  ``group_size=None`` means one group per row (per-token activation
scales, per-output-channel weight scales): ``G = K`` rounded up to a multiple of 32.

Prologues (DiT blocks): ``layer(x, prologue="layernorm", shift=, scale=)`` computes
``LN(x) * (1 + scale[b]) + shift[b]`` (adaLN modulation, ``shift/scale [B, K]``, row ``m`` of the
flattened ``x`` in batch ``m // (M / B)``) and ``layer(x, prologue="gelu_tanh")`` computes the
MLP's tanh-GELU inside the quantize pass, so the block never writes the 16-bit normalized / activated
tensor.  When the fused path cannot apply (LayerNorm over a padded or split K) the layer computes the
prologue in fp32 torch first; the result is the same up to rounding ties.

Quantized outputs (a DiT MLP ``fc2(GELU_tanh(fc1(x)))``): :func:`quantized_mlp` runs ``fc1``'s GEMM
with an epilogue that applies the GELU, divides by ``fc2``'s smoothing factors, computes ``fc2``'s
low-rank down-projection ``lora_act2 = h_s @ fc2.lora_down`` of the unquantized ``h_s`` (SVDQuant;
each GEMM tile adds its slice of the N-term sum) and quantizes per token and group in ``fc2``'s
format (:func:`pydiff.ops.quant.quant_gemm_quant`), then ``fc2``'s GEMM on that with ``+ lora_act2
@ fc2.lora_up`` in its epilogue (:meth:`QuantizedLinear.forward_quantized`): the hidden activations
exist only as int4 (or int8 / fp8) + scales + ``[M, R]`` fp32 low-rank activations.  It applies
when ``fc1.can_feed(fc2)`` (``fc1`` one input part; ``fc2`` one input part, no K padding; either may
have a low-rank branch, e.g. the W4A4 default rank 32); otherwise the two layers run as ``fc1(x)``
and ``fc2(h, prologue="gelu_tanh")``.  The fused path skips the rounding of ``fc1``'s output to its
16-bit dtype, so with an fp32 ``fc1`` output both paths agree up to rounding ties (and the fp32
summation order of ``lora_act2``) and with bf16 / fp16 the fused one is the more exact.

Split inputs (Q-Diffusion's split-shortcut quantization): ``splits=(c,)`` cuts the input channels
into ``[0, c)`` and ``[c, Cin)``; each part is padded, grouped, smoothed and quantized on its own
(two ``quantize`` calls, two GEMMs summed in fp32), so an input that is a channel concat
``[h, skip]`` of tensors with very different ranges never shares a scale across the seam.  The
low-rank branch stays one ``[K, R]`` x ``[R, N]`` product (its down-projection is the sum of the
parts' ``lora_act``).

Storage (buffers, so ``state_dict`` save / load round-trips): ``qweight`` (int4: uint8 ``[N, K/2]``;
int8 ``[N, K]``; fp8 e4m3 ``[N, K]``), ``wscales`` fp32 ``[N, K/G]``, optional ``smooth`` fp32
``[K]``, ``lora_down [K, R]``, ``lora_up [R, N]`` and ``bias [N]`` in the layer's ``dtype`` (the
original weight's: bf16 / fp16, or fp32); split parts p >= 1 add ``qweight_p``, ``wscales_p``,
``smooth_p``, ``lora_down_p``.  int4 with G = 64: 4 bits + a 32-bit scale per 64 weights = 4.5
bits a weight, 0.281x of bf16 (a 3072 x 3072 layer: 0.281x, 0.302x with the rank-32 bf16 branch).

Papers: SmoothQuant (Xiao et al. 2023), SVDQuant (Li et al. 2025), Q-Diffusion (Li et al. 2023),
QuEST (Wang et al. 2024).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pydiff.ops import quant as qops
from pydiff.reference.quant import FORMATS, GROUP_MULTIPLE, PROLOGUES, gelu_tanh, q_cols, q_dtype

__all__ = ["QuantizedLayer", "QuantizedLinear", "QuantizedConv2d", "W4A4Linear", "W8A8Linear", "W4A4Conv2d",
           "W8A8Conv2d", "smoothing_factors", "resolve_group_size", "quantized_mlp"]

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def resolve_group_size(group_size: Optional[int], K: int) -> int:
    """The group size used for ``K`` channels: ``group_size``, or for ``None`` one group per row
    (``K`` rounded up to a multiple of 32)."""
    if group_size is None:
        return _round_up(max(int(K), 1), GROUP_MULTIPLE)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or group_size % GROUP_MULTIPLE:
        raise ValueError(f"group_size: expected None (one group per row) or a positive multiple of "
                         f"{GROUP_MULTIPLE}, got {group_size!r}")
    return group_size


def _check_fmt(fmt, allowed=FORMATS) -> str:
    if fmt not in allowed:
        raise ValueError(f"fmt: expected one of {tuple(allowed)}, got {fmt!r}")
    return fmt


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank: expected an int >= 0 (0 turns the low-rank branch off), got {rank!r}")
    return rank


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1] (SmoothQuant migration strength), got {alpha!r}")
    return float(alpha)


def _check_splits(splits, channels: int) -> tuple:
    if splits is None:
        return ()
    if isinstance(splits, int) and not isinstance(splits, bool):
        splits = (splits,)
    try:
        s = tuple(splits)
    except TypeError:
        raise TypeError(f"splits: expected a sequence of channel indices, got {type(splits).__name__}") from None
    prev = 0
    for c in s:
        if isinstance(c, bool) or not isinstance(c, int) or not prev < c < channels:
            raise ValueError(f"splits: expected increasing ints strictly between 0 and the {channels} input "
                             f"channels, got {s!r}")
        prev = c
    return s


def smoothing_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant factors ``s_k = act_absmax_k^alpha / w_absmax_k^(1 - alpha)`` (float64 ``[K]``).

    The activations are divided by ``s`` and the weight's columns multiplied by it, which moves
    ``alpha`` of the (log) range of outlier channels from the activations into the weight.  Channels
    whose statistics are zero or not finite get ``s = 1``; the factors are clamped to [1e-5, 1e5].
    """
    a = act_absmax.detach().to(torch.float64)
    w = w_absmax.detach().to(torch.float64)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5)


def _desc(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _pname(name: str, p: int) -> str:
    return name if p == 0 else f"{name}_{p}"


class QuantizedLayer(nn.Module):
    """Shared machinery of the quantized Linear / Conv2d layers: the per-part buffers, conversion of a
    float weight ``[N, K]`` and the quantize + GEMM forward of flattened activations ``[M, K]``.

    Parts: the input channels cut at ``splits`` (Q-Diffusion split shortcut); each part ``p`` covers
    ``part_k[p]`` columns of the flattened weight, padded to ``part_kpad[p]``, a multiple of its
    group size ``part_groups[p]``.  Without splits there is one part.
    """

    fmt: str
    #: ``"exact"`` (default: exact integer group sums) or ``"fast"``: the GEMMs run with
    #: ``quant_gemm(..., precision="fast")`` (fp16 operands ``q * scale / row max``, one fp32
    #: accumulation over K; see :func:`pydiff.ops.quant.quant_gemm`).  A plain attribute: set it on a
    #: layer, or on all of a model's with ``for m in model.modules(): m.precision = "fast"``.
    precision: str = "exact"

    def _init_parts(self, part_k: Sequence[int], out_features: int, *, fmt: str, group_size: Optional[int],
                    rank: int, bias: bool, smooth: bool, dtype: torch.dtype, out_dtype: Optional[torch.dtype],
                    device=None) -> None:
        self.fmt = _check_fmt(fmt)
        self.group_size = group_size if group_size is None else resolve_group_size(group_size, 1)
        self.rank = _check_rank(rank)
        if dtype not in PARAM_DTYPES:
            raise TypeError(f"dtype: expected one of float32, float16, bfloat16, got {dtype}")
        if out_dtype is not None and out_dtype not in PARAM_DTYPES:
            raise TypeError(f"out_dtype: expected None (the input's dtype), float32, float16 or bfloat16, "
                            f"got {out_dtype}")
        self.dtype, self.out_dtype, self.has_smooth = dtype, out_dtype, bool(smooth)
        self.out_features = int(out_features)
        self.part_k = tuple(int(k) for k in part_k)
        self.part_groups = tuple(resolve_group_size(group_size, k) for k in self.part_k)
        self.part_kpad = tuple(_round_up(k, g) for k, g in zip(self.part_k, self.part_groups))
        N, R = self.out_features, self.rank
        for p, (kp, g) in enumerate(zip(self.part_kpad, self.part_groups)):
            self.register_buffer(_pname("qweight", p), torch.zeros(N, q_cols(self.fmt, kp), dtype=q_dtype(self.fmt),
                                                                   device=device))
            self.register_buffer(_pname("wscales", p), torch.zeros(N, kp // g, dtype=torch.float32, device=device))
            self.register_buffer(_pname("smooth", p),
                                 torch.ones(kp, dtype=torch.float32, device=device) if smooth else None)
            self.register_buffer(_pname("lora_down", p),
                                 torch.zeros(kp, R, dtype=dtype, device=device) if R else None)
        self.register_buffer("lora_up", torch.zeros(R, N, dtype=dtype, device=device) if R else None)
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    # ------------------------------------------------------------------ conversion
    @torch.no_grad()
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict would cast quantized codes of another format (fp8 codes into an int8 buffer,
        # say) to this layer's dtype without a word: refuse codes whose dtype differs
        for name, buf in self._buffers.items():
            if buf is not None and name.startswith("qweight"):
                got = state_dict.get(prefix + name)
                if isinstance(got, torch.Tensor) and got.dtype != buf.dtype:
                    error_msgs.append(f"{prefix}{name}: expected dtype {buf.dtype} (fmt={self.fmt!r}), got "
                                      f"{got.dtype}: the state_dict holds another quantization format")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_float_weight(self, W: torch.Tensor, bias: Optional[torch.Tensor], act_absmax: Optional[torch.Tensor],
                           alpha: float, col_channel: torch.Tensor) -> None:
        """Fill the buffers from a float weight ``W [N, K]`` (smoothing, SVD, residual quantization).

        ``act_absmax``: per input-channel activation maxima (``[Cin]``); ``col_channel [K]`` maps a
        weight column to its input channel (im2col: ``k // (kh * kw)``).
        """
        if not torch.isfinite(W).all():
            raise ValueError("weight: expected finite values (got NaN or inf)")
        W64 = W.detach().to(torch.float64)
        N, K = W64.shape
        if act_absmax is not None:
            s = smoothing_factors(act_absmax.to(W.device)[col_channel], W64.abs().amax(dim=0), alpha)
        else:
            s = torch.ones(K, dtype=torch.float64, device=W.device)
        Ws = W64 * s[None, :]
        R = min(self.rank, N, K)
        ld = lu = None
        if self.rank:
            ld = torch.zeros(K, self.rank, dtype=torch.float64, device=W.device)
            lu = torch.zeros(self.rank, N, dtype=torch.float64, device=W.device)
            if R:
                U, S, Vh = _top_svd(Ws.T, R)  # Ws^T [K, N] ~ U diag(S) Vh
                r = S.sqrt()
                ld[:, :R], lu[:R] = U * r[None, :], r[:, None] * Vh
            # the 16-bit factors as stored; the quantized residual absorbs their rounding
            ld, lu = ld.to(self.dtype), lu.to(self.dtype)
            Ws = Ws - (ld.to(torch.float64) @ lu.to(torch.float64)).T
            self.lora_up.copy_(lu)
        k0 = 0
        for p, (kp, kpad, g) in enumerate(zip(self.part_k, self.part_kpad, self.part_groups)):
            sl = slice(k0, k0 + kp)
            res = F.pad(Ws[:, sl], (0, kpad - kp)).to(torch.float32)
            q, sc, _ = qops.quantize(res, self.fmt, g)
            getattr(self, _pname("qweight", p)).copy_(q)
            getattr(self, _pname("wscales", p)).copy_(sc)
            if self.has_smooth:
                getattr(self, _pname("smooth", p)).copy_(F.pad(s[sl], (0, kpad - kp), value=1.0))
            if self.rank:
                getattr(self, _pname("lora_down", p)).copy_(F.pad(ld[sl], (0, 0, 0, kpad - kp)))
            k0 += kp
        if bias is not None:
            self.bias.copy_(bias.detach())

    # ------------------------------------------------------------------ forward machinery
    def _quant_matmul(self, xs: Sequence[torch.Tensor], out_dtype: torch.dtype, prologue: str = "none",
                      shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                      eps: float = 1e-6) -> torch.Tensor:
        """``xs[p] [M, part_k[p]]`` (one tensor a part) -> ``[M, N]`` in ``out_dtype``."""
        qs = []
        lora_act = None
        for p, x in enumerate(xs):
            pad = self.part_kpad[p] - self.part_k[p]
            if pad:
                x = F.pad(x, (0, pad))
            q, sa, la = qops.quantize(x, self.fmt, self.part_groups[p], smooth=getattr(self, _pname("smooth", p)),
                                      lora_down=getattr(self, _pname("lora_down", p)), prologue=prologue,
                                      shift=shift, scale=scale, eps=eps)
            qs.append((q, sa))
            if self.rank:
                lora_act = la if lora_act is None else lora_act + la
        lora_up = self.lora_up if self.rank else None
        if len(qs) == 1:
            q, sa = qs[0]
            return qops.quant_gemm(q, sa, self.qweight, self.wscales, fmt=self.fmt, group_size=self.part_groups[0],
                                   bias=self.bias, lora_act=lora_act, lora_up=lora_up, out_dtype=out_dtype,
                                   precision=self.precision)
        out = None
        last = len(qs) - 1
        for p, (q, sa) in enumerate(qs):
            o = qops.quant_gemm(q, sa, getattr(self, _pname("qweight", p)), getattr(self, _pname("wscales", p)),
                                fmt=self.fmt, group_size=self.part_groups[p], bias=self.bias if p == last else None,
                                lora_act=lora_act if p == last else None, lora_up=lora_up if p == last else None,
                                out_dtype=torch.float32, precision=self.precision)
            out = o if out is None else out + o
        return out.to(out_dtype)

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        if x.dtype not in PARAM_DTYPES:
            raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x.dtype}")
        return self.out_dtype or x.dtype

    # ------------------------------------------------------------------ reporting
    def packed_weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (all parts)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False)
                   if n.startswith(("qweight", "wscales")))

    def total_bytes(self) -> int:
        """Bytes of every buffer (packed weight, scales, smoothing, low-rank branch, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _extra(self) -> str:
        g = "row" if self.group_size is None else self.group_size
        s = f"fmt={self.fmt}, group_size={g}, rank={self.rank}, smooth={self.has_smooth}, dtype={self.dtype}"
        if self.splits:
            s += f", splits={self.splits}"
        return s


def _top_svd(A: torch.Tensor, R: int):
    """Top-R singular triplets ``(U [m, R], S [R], Vh [R, n])`` of float64 ``A [m, n]``: the exact SVD
    up to 4M entries, above that a randomized range finder (Halko et al. 2011: R + 16 columns, 4
    power iterations) from a private seeded generator, so conversion is deterministic and leaves
    the caller's RNG streams alone."""
    m, n = A.shape
    if A.numel() <= (1 << 22) or 4 * R >= min(m, n):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :R], S[:R], Vh[:R]
    g = torch.Generator(device=A.device)
    g.manual_seed(0)
    omega = torch.randn(n, min(R + 16, min(m, n)), generator=g, device=A.device, dtype=A.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(4):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return (Q @ Ub)[:, :R], S[:R], Vh[:R]


def _check_modulation(x2: torch.Tensor, prologue: str, shift, scale) -> None:
    """The checks of :func:`pydiff.ops.quant.quantize` on ``shift`` / ``scale`` (for the unfused path)."""
    M, K = x2.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if t is None:
            continue
        if prologue != "layernorm":
            raise ValueError(f"{name}: only used with prologue='layernorm' (adaLN modulation), "
                             f"got prologue={prologue!r}")
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != K or t.shape[0] < 1 or M % t.shape[0]:
            raise ValueError(f"{name}: expected shape [B, K] with K = {K} and B dividing M = {M}, got {_desc(t)}")


def _prologue_torch(x: torch.Tensor, prologue: str, shift, scale, eps: float) -> torch.Tensor:
    """The prologue in fp32 torch (the unfused path): same formula as the op."""
    y = x.to(torch.float32)
    if prologue == "gelu_tanh":
        return gelu_tanh(y)
    y = F.layer_norm(y, (y.shape[-1],), eps=eps)
    M = y.shape[0]
    if scale is not None:
        y = y * (1.0 + scale.to(torch.float32).repeat_interleave(M // scale.shape[0], dim=0))
    if shift is not None:
        y = y + shift.to(torch.float32).repeat_interleave(M // shift.shape[0], dim=0)
    return y


class QuantizedLinear(QuantizedLayer):
    """Quantized ``nn.Linear``: ``y = x W^T + b`` with both operands in ``fmt`` (see the module doc).

    ``forward(x [..., K], prologue="none"|"gelu_tanh"|"layernorm", shift=None, scale=None, eps=1e-6)
    -> [..., N]`` in ``out_dtype`` (default: x's dtype).  Build with :meth:`from_linear`; the
    constructor makes an empty layer of that configuration (for ``load_state_dict``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fmt: str = "int4",
                 group_size: Optional[int] = 64, rank: int = 0, smooth: bool = False, splits: Sequence[int] = (),
                 dtype: torch.dtype = torch.float32, out_dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.in_features = in_features
        self.splits = _check_splits(splits, in_features)
        bounds = (0,) + self.splits + (in_features,)
        self._init_parts([b - a for a, b in zip(bounds[:-1], bounds[1:])], out_features, fmt=fmt,
                         group_size=group_size, rank=rank, bias=bias, smooth=smooth, dtype=dtype,
                         out_dtype=out_dtype, device=device)

    def config(self) -> dict:
        """Constructor keywords that rebuild an empty layer of this configuration."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    fmt=self.fmt, group_size=self.group_size, rank=self.rank, smooth=self.has_smooth,
                    splits=self.splits, dtype=self.dtype, out_dtype=self.out_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fmt: str = "int4", group_size: Optional[int] = 64, rank: int = 0,
                    smooth: Optional[torch.Tensor] = None, alpha: float = 0.5, splits: Sequence[int] = (),
                    out_dtype: Optional[torch.dtype] = None, **kw) -> "QuantizedLinear":
        """Convert ``linear`` (weight ``[N, K]``).

        Args:
            fmt: ``"int4"``, ``"int8"`` or ``"fp8"`` (e4m3), for weights and activations.
            group_size: channels per scale (multiple of 32; K is zero-padded to a multiple), or None
                for per-token activation / per-output-channel weight scales.
            rank: R of the 16-bit low-rank branch (SVDQuant), from the top-R SVD of the smoothed
                weight; 0 turns it off (R is capped at min(N, K); the buffers keep ``rank``).
            smooth: per input-channel activation absmax ``[K]`` (from calibration) for SmoothQuant
                factors ``s = smooth^alpha / max|W_k|^(1 - alpha)``; None: no smoothing.
            alpha: SmoothQuant migration strength in [0, 1].
            splits: input-channel cut points (split-shortcut quantization); each part has its own
                groups and scales.
            out_dtype: output dtype; None: the input's.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        alpha = _check_alpha(alpha)
        K = linear.in_features
        if smooth is not None:
            if not isinstance(smooth, torch.Tensor) or tuple(smooth.shape) != (K,):
                raise ValueError(f"smooth: expected per-channel activation absmax of shape ({K},), got "
                                 f"{_desc(smooth)}")
        w = linear.weight
        dtype = w.dtype if w.dtype in PARAM_DTYPES else torch.float32
        layer = cls(K, linear.out_features, linear.bias is not None, fmt=fmt, group_size=group_size, rank=rank,
                    smooth=smooth is not None, splits=splits, dtype=dtype, out_dtype=out_dtype, device=w.device, **kw)
        layer._load_float_weight(w, linear.bias, smooth, alpha, torch.arange(K, device=w.device))
        return layer

    def can_fuse(self, prologue: str) -> bool:
        """Whether ``prologue`` runs inside the quantize kernel (LayerNorm needs one unpadded part)."""
        if prologue == "layernorm":
            return len(self.part_k) == 1 and self.part_kpad[0] == self.part_k[0]
        return True

    def _inputs(self, x: torch.Tensor, prologue: str, shift, scale, eps: float):
        """Check ``x [..., K]``; return ``(parts [M, part_k[p]], prologue, shift, scale, lead shape)``
        with the prologue moved to fp32 torch where the quantize kernel cannot run it."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected a tensor [..., {self.in_features}], got {_desc(x)}")
        if prologue not in PROLOGUES:
            raise ValueError(f"prologue: expected one of {PROLOGUES}, got {prologue!r}")
        self._out_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if prologue != "none" and not self.can_fuse(prologue):
            _check_modulation(x2, prologue, shift, scale)
            x2 = _prologue_torch(x2, prologue, shift, scale, float(eps))
            prologue, shift, scale = "none", None, None
        if len(self.part_k) == 1:
            xs = [x2]
        else:
            bounds = (0,) + self.splits + (self.in_features,)
            xs = [x2[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return xs, prologue, shift, scale, lead

    def forward(self, x: torch.Tensor, prologue: str = "none", shift: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
        xs, prologue, shift, scale, lead = self._inputs(x, prologue, shift, scale, eps)
        out = self._quant_matmul(xs, self._out_dtype(x), prologue, shift, scale, float(eps))
        return out.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ quantized outputs (fused MLP)
    def takes_quantized_input(self) -> bool:
        """Whether :meth:`forward_quantized` applies: one input part and no K padding.  A low-rank
        branch is allowed: its down-projection ``lora_act`` of the float input then comes with the
        quantized input (:meth:`forward_quantized_for` computes it in the producer's epilogue)."""
        return len(self.part_k) == 1 and self.part_kpad[0] == self.part_k[0]

    def can_feed(self, consumer: nn.Module) -> bool:
        """Whether :meth:`forward_quantized_for` can write this layer's output as ``consumer``'s
        quantized input: ``consumer`` a :class:`QuantizedLinear` over these ``out_features`` that
        :meth:`takes_quantized_input` (a low-rank branch included: its down-projection runs in this
        layer's GEMM epilogue), and this layer one input part (no splits)."""
        return (isinstance(consumer, QuantizedLinear) and consumer.in_features == self.out_features
                and consumer.takes_quantized_input() and len(self.part_k) == 1)

    def forward_quantized_for(self, consumer: "QuantizedLinear", x: torch.Tensor, epilogue: str = "none",
                              prologue: str = "none", shift: Optional[torch.Tensor] = None,
                              scale: Optional[torch.Tensor] = None, eps: float = 1e-6):
        """``consumer``'s quantized input ``(q, scales, lora_act)`` of ``h = epilogue(self(x))``, rows
        flattened: ``q`` ``[M, N/2]`` (int4) / ``[M, N]`` in ``consumer.fmt``, ``scales`` fp32
        ``[M, N / G]`` (``G`` the consumer's group) and ``lora_act = (h / consumer.smooth) @
        consumer.lora_down`` fp32 ``[M, R]`` (``[M, 0]`` when the consumer has no low-rank branch),
        from one :func:`pydiff.ops.quant.quant_gemm_quant` (the GEMM's fp32 result, ``epilogue``
        "none" / "gelu_tanh", ``/ consumer.smooth``, the down-projection, quantization) after this
        layer's usual input quantization (with its ``prologue``).  Needs :meth:`can_feed`."""
        if not self.can_feed(consumer):
            raise ValueError("consumer: expected a QuantizedLinear over this layer's "
                             f"{self.out_features} outputs with one input part and no K padding, fed by a "
                             f"layer with one input part (see can_feed), got {type(consumer).__name__}")
        xs, prologue, shift, scale, _ = self._inputs(x, prologue, shift, scale, eps)
        x2 = xs[0]
        pad = self.part_kpad[0] - self.part_k[0]
        if pad:
            x2 = F.pad(x2, (0, pad))
        qa, sa, la = qops.quantize(x2, self.fmt, self.part_groups[0], smooth=self.smooth, lora_down=self.lora_down,
                                   prologue=prologue, shift=shift, scale=scale, eps=float(eps))
        return qops.quant_gemm_quant(qa, sa, self.qweight, self.wscales, fmt=self.fmt,
                                     group_size=self.part_groups[0], bias=self.bias,
                                     lora_act=la if self.rank else None, lora_up=self.lora_up if self.rank else None,
                                     epilogue=epilogue, smooth=consumer.smooth,
                                     lora_down=consumer.lora_down if consumer.rank else None,
                                     out_fmt=consumer.fmt, out_group_size=consumer.part_groups[0],
                                     precision=self.precision)

    def forward_quantized(self, q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype,
                          lora_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[M, N]`` in ``out_dtype`` from an input already quantized in this layer's format and group
        (and divided by its smoothing factors), e.g. by :meth:`forward_quantized_for`:
        ``quant_gemm(q, scales, qweight) + lora_act @ lora_up + bias``.  With a low-rank branch
        (``rank > 0``) ``lora_act`` fp32 ``[M, rank]`` is required: the down-projection
        ``(h / smooth) @ lora_down`` of the float input ``h`` that ``q`` quantizes (the third output
        of :meth:`forward_quantized_for`); without one it must be None or ``[M, 0]``.  Needs
        :meth:`takes_quantized_input`."""
        if not self.takes_quantized_input():
            raise ValueError("q: this layer cannot take a quantized input (it has split inputs or padded K; "
                             "see takes_quantized_input)")
        M = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 2 else None
        if self.rank:
            if not isinstance(lora_act, torch.Tensor) or lora_act.dim() != 2 or lora_act.shape[0] != M \
                    or lora_act.shape[1] != self.rank:
                raise ValueError(f"lora_act: this layer has a rank-{self.rank} low-rank branch, so it needs the "
                                 f"branch's down-projection of its float input, a tensor [{M}, {self.rank}] "
                                 f"(forward_quantized_for returns it), got {_desc(lora_act)}")
            lora_up = self.lora_up
        else:
            if lora_act is not None and (not isinstance(lora_act, torch.Tensor) or lora_act.numel() != 0):
                raise ValueError(f"lora_act: this layer has no low-rank branch (rank 0): expected None or an "
                                 f"empty [M, 0] tensor, got {_desc(lora_act)}")
            lora_act = lora_up = None
        return qops.quant_gemm(q, scales, self.qweight, self.wscales, fmt=self.fmt, group_size=self.part_groups[0],
                               bias=self.bias, lora_act=lora_act, lora_up=lora_up, out_dtype=out_dtype,
                               precision=self.precision)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               + self._extra()


class W4A4Linear(QuantizedLinear):
    """W4A4 ``nn.Linear``: int4 weights and activations, per-group (default 64) fp32 scales, a rank-32
    16-bit SVDQuant branch by default.  See :class:`QuantizedLinear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fmt: str = "int4",
                 group_size: Optional[int] = 64, rank: int = 32, **kw):
        _check_fmt(fmt, ("int4",))
        super().__init__(in_features, out_features, bias, fmt="int4", group_size=group_size, rank=rank, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: Optional[int] = 64, rank: int = 32,
                    smooth: Optional[torch.Tensor] = None, alpha: float = 0.5, splits: Sequence[int] = (),
                    out_dtype: Optional[torch.dtype] = None, *, fmt: str = "int4") -> "W4A4Linear":
        _check_fmt(fmt, ("int4",))
        return super().from_linear(linear, fmt="int4", group_size=group_size, rank=rank, smooth=smooth, alpha=alpha,
                                   splits=splits, out_dtype=out_dtype)


class W8A8Linear(QuantizedLinear):
    """W8A8 ``nn.Linear``: int8 or fp8 e4m3 weights and activations; per-token / per-output-channel
    scales by default (``group_size=None``), no low-rank branch by default.  See
    :class:`QuantizedLinear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fmt: str = "int8",
                 group_size: Optional[int] = None, rank: int = 0, **kw):
        _check_fmt(fmt, ("int8", "fp8"))
        super().__init__(in_features, out_features, bias, fmt=fmt, group_size=group_size, rank=rank, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int8", group_size: Optional[int] = None, rank: int = 0,
                    smooth: Optional[torch.Tensor] = None, alpha: float = 0.5, splits: Sequence[int] = (),
                    out_dtype: Optional[torch.dtype] = None) -> "W8A8Linear":
        _check_fmt(fmt, ("int8", "fp8"))
        return super().from_linear(linear, fmt=fmt, group_size=group_size, rank=rank, smooth=smooth, alpha=alpha,
                                   splits=splits, out_dtype=out_dtype)


def _pair(v, name: str) -> tuple:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, int) for a in v):
        return tuple(v)
    raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")


class QuantizedConv2d(QuantizedLayer):
    """Quantized ``nn.Conv2d`` (``groups=1``, zero padding) as an im2col GEMM.

    ``x [B, Cin, H, W]`` -> patches ``F.unfold(x) [B, Cin*kh*kw, L]`` -> rows ``[B*L, K]`` (K ordered
    channel-major like the weight ``[Cout, Cin, kh, kw]`` flattened to ``[N, K]``) -> quantized GEMM
    ``[B*L, Cout]`` -> ``[B, Cout, Hout, Wout]``.  Split parts cut the input channels (part p's K is
    its channels times ``kh*kw``).  Smoothing factors are per K column (the channel's activation
    maximum over the column's weights' maximum).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, fmt: str = "int4", group_size: Optional[int] = 64, rank: int = 0,
                 smooth: bool = False, splits: Sequence[int] = (), dtype: torch.dtype = torch.float32,
                 out_dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.splits = _check_splits(splits, in_channels)
        taps = self.kernel_size[0] * self.kernel_size[1]
        bounds = (0,) + self.splits + (in_channels,)
        self._init_parts([(b - a) * taps for a, b in zip(bounds[:-1], bounds[1:])], out_channels, fmt=fmt,
                         group_size=group_size, rank=rank, bias=bias, smooth=smooth, dtype=dtype,
                         out_dtype=out_dtype, device=device)

    @property
    def in_features(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def config(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    stride=self.stride, padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                    fmt=self.fmt, group_size=self.group_size, rank=self.rank, smooth=self.has_smooth,
                    splits=self.splits, dtype=self.dtype, out_dtype=self.out_dtype)

    @staticmethod
    def check_conv(conv) -> None:
        """Raise unless ``conv`` is an ``nn.Conv2d`` this layer can replace."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv: only groups=1 is supported (grouped / depthwise convs stay in 16 bits), "
                             f"got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv: only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str) and conv.padding != "valid":
            raise ValueError(f"conv: string padding {conv.padding!r} is not supported (give explicit ints)")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, fmt: str = "int4", group_size: Optional[int] = 64, rank: int = 0,
                  smooth: Optional[torch.Tensor] = None, alpha: float = 0.5, splits: Sequence[int] = (),
                  out_dtype: Optional[torch.dtype] = None, **kw) -> "QuantizedConv2d":
        """Convert ``conv``; arguments as :meth:`QuantizedLinear.from_linear`, with ``smooth`` the
        per input-channel activation absmax ``[Cin]`` and ``splits`` input-channel cut points."""
        cls.check_conv(conv)
        alpha = _check_alpha(alpha)
        Cin = conv.in_channels
        if smooth is not None:
            if not isinstance(smooth, torch.Tensor) or tuple(smooth.shape) != (Cin,):
                raise ValueError(f"smooth: expected per input-channel activation absmax of shape ({Cin},), got "
                                 f"{_desc(smooth)}")
        w = conv.weight
        dtype = w.dtype if w.dtype in PARAM_DTYPES else torch.float32
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        layer = cls(Cin, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                    conv.bias is not None, fmt=fmt, group_size=group_size, rank=rank, smooth=smooth is not None,
                    splits=splits, dtype=dtype, out_dtype=out_dtype, device=w.device, **kw)
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        col_channel = torch.arange(Cin * taps, device=w.device) // taps
        layer._load_float_weight(w.reshape(conv.out_channels, -1), conv.bias, smooth, alpha, col_channel)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x[None]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected a tensor [B, {self.in_channels}, H, W], got {_desc(x)}")
        out_dtype = self._out_dtype(x)
        B, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        bounds = (0,) + self.splits + (self.in_channels,)
        xs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            xp = x if (a, b) == (0, self.in_channels) else x[:, a:b]
            if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
                cols = xp.permute(0, 2, 3, 1).reshape(B * H * W, b - a)  # a 1x1 conv is a matmul
            else:
                cols = F.unfold(xp, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
                cols = cols.transpose(1, 2).reshape(B * Ho * Wo, (b - a) * kh * kw)
            xs.append(cols)
        out = self._quant_matmul(xs, out_dtype)
        out = out.reshape(B, Ho, Wo, self.out_channels).permute(0, 3, 1, 2).contiguous()
        return out[0] if unbatched else out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, " + self._extra())


class W4A4Conv2d(QuantizedConv2d):
    """W4A4 ``nn.Conv2d`` (im2col + the W4A4 GEMM); see :class:`QuantizedConv2d`.  Default group 64,
    no low-rank branch (``rank=0``: UNet convs are small; pass ``rank`` to add one)."""

    def __init__(self, *args, fmt: str = "int4", **kw):
        _check_fmt(fmt, ("int4",))
        super().__init__(*args, fmt="int4", **kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group_size: Optional[int] = 64, rank: int = 0,
                  smooth: Optional[torch.Tensor] = None, alpha: float = 0.5, splits: Sequence[int] = (),
                  out_dtype: Optional[torch.dtype] = None, *, fmt: str = "int4") -> "W4A4Conv2d":
        _check_fmt(fmt, ("int4",))
        return super().from_conv(conv, fmt="int4", group_size=group_size, rank=rank, smooth=smooth, alpha=alpha,
                                 splits=splits, out_dtype=out_dtype)


class W8A8Conv2d(QuantizedConv2d):
    """W8A8 ``nn.Conv2d`` (int8 or fp8; per-token / per-output-channel scales by default)."""

    def __init__(self, *args, fmt: str = "int8", group_size: Optional[int] = None, **kw):
        _check_fmt(fmt, ("int8", "fp8"))
        super().__init__(*args, fmt=fmt, group_size=group_size, **kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, fmt: str = "int8", group_size: Optional[int] = None, rank: int = 0,
                  smooth: Optional[torch.Tensor] = None, alpha: float = 0.5, splits: Sequence[int] = (),
                  out_dtype: Optional[torch.dtype] = None) -> "W8A8Conv2d":
        _check_fmt(fmt, ("int8", "fp8"))
        return super().from_conv(conv, fmt=fmt, group_size=group_size, rank=rank, smooth=smooth, alpha=alpha,
                                 splits=splits, out_dtype=out_dtype)


def quantized_mlp(fc1: "QuantizedLinear", fc2: "QuantizedLinear", x: torch.Tensor, activation: str = "gelu_tanh",
                  prologue: str = "none", shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                  eps: float = 1e-6) -> torch.Tensor:
    """``fc2(activation(fc1(prologue(x))))`` for two quantized linears, ``x [..., K] -> [..., fc2.out_features]``.

    When ``fc1.can_feed(fc2)``: ``fc1``'s input quantization (with ``prologue``: LayerNorm / adaLN),
    then one :func:`pydiff.ops.quant.quant_gemm_quant` whose epilogue applies ``activation``
    ("gelu_tanh" or "none") and writes ``fc2``'s quantized input and, when ``fc2`` has a low-rank
    branch (the W4A4 default, rank 32), its down-projection ``lora_act``, then ``fc2``'s GEMM with
    ``+ lora_act @ fc2.lora_up``: the hidden activations are never written in 16 bits.  Otherwise
    ``fc2(fc1(x, prologue), prologue=activation)``.
    Output dtype: ``fc2.out_dtype`` or ``fc1.out_dtype`` or ``x``'s (as the unfused chain).
    """
    for name, m in (("fc1", fc1), ("fc2", fc2)):
        if not isinstance(m, QuantizedLinear):
            raise TypeError(f"{name}: expected a pydiff.quant.QuantizedLinear, got {type(m).__name__}")
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"fc2: expected {fc1.out_features} input features (fc1's outputs), got {fc2.in_features}")
    if activation not in ("none", "gelu_tanh"):
        raise ValueError(f"activation: expected 'none' or 'gelu_tanh', got {activation!r}")
    if not fc1.can_feed(fc2):
        h = fc1(x, prologue=prologue, shift=shift, scale=scale, eps=eps)
        return fc2(h, prologue=activation)
    q, s, lora_act = fc1.forward_quantized_for(fc2, x, activation, prologue, shift, scale, eps)
    out_dtype = fc2.out_dtype or fc1._out_dtype(x)
    return fc2.forward_quantized(q, s, out_dtype, lora_act).reshape(*x.shape[:-1], fc2.out_features)
