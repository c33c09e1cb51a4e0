"""Triton kernels of the quantization ops (definitions: :mod:`pydiff.reference.quant`).

* ``quantize``: ``(q, scales, lora_act)`` of ``x [M, K]``.  Grid ``(row blocks, group-tile
  splits)``; a program holds ``BM`` rows and walks their channels in tiles ``[BM, GPC, GB]`` (GPC
  groups of GB >= G channels, masked where GB > G), all in registers::

      y        = prologue(x) / smooth                    (gelu_tanh as y / (1 + exp(-2u)), the same
                                                          function as 0.5 y (1 + tanh u); layernorm:
                                                          row mean, then centred variance, two passes
                                                          over the row in the same program, fp32)
      lora_act += y_tile @ lora_down[tile channels, :]    (tl.dot, fp32 accuracy: tf32x3 on GPUs)
      amax     = max |y| over the group (NaN propagates)
      scale    = amax / QMAX (IEEE division), q = rint(y / scale) clamped (int4 / int8) or
                 e4m3(clamp(y / scale, +-448)) (fp8, round to nearest even)

  Divisions are IEEE (``div_rn``), so with prologue "none" q and scales are bit-equal to the
  reference.  A group wider than the tile takes two passes over its channels (amax, then
  quantize).  int4 pairs are split out of the tile in registers (``reshape [.., GB/2, 2]`` +
  ``split``) and packed low nibble = even channel.  With ``lora_down`` or ``layernorm`` one program
  covers whole rows (the lora sum and the statistics run over K); otherwise the group tiles of a
  row block are also split over grid axis 1.  e4m3 is encoded with integer arithmetic on the fp32
  bits on every target (Triton's sm_89 fp32->e4m3 cast goes through fp16: double rounding).

* ``quant_gemm``: ``out = sum_g sa[:, g] sw[:, g]^T (qa_g qw_g^T) + lora_act @ lora_up + bias``.
  Grid: one program per ``[BM, BN]`` output tile (grouped launch order for L2 reuse).  Per group g:
  an int32 accumulator ``D`` sums ``tl.dot`` of int8 tiles over the group's ``G / BK`` k-steps
  (int4 nibbles are sign-extended to int8 in registers by shifts and interleaved with
  ``join``/``reshape``; fp8 runs ``tl.dot`` on float8e4nv (sm_89+) with an fp32 accumulator), then
  ``acc += D.to(f32) * sa[:, None] * sw[None, :]`` (fp32).  Fused epilogue: ``acc += lora_act @
  lora_up`` (fp32 accuracy), ``+ bias``, cast to ``out_dtype``; rows/columns masked at the M/N edges.

* ``quant_gemm_quant``: the same GEMM tile (``_qgemm_tile``), then in registers ``y = gelu_tanh(acc)
  / smooth[n]`` and the per-row, per-group quantization of the output for the next layer, storing
  ``q`` and ``scales`` instead of the 16-bit ``out``.  A tile holds ``GPT`` whole output groups of
  ``G2`` columns, each in ``GB = next_pow2(G2)`` lanes (lanes >= G2 masked, so G2 = 96 works), so a
  group's amax is a reduction over the tile reshaped to ``[BM, GPT, GB]``; rounding, the NaN-aware
  max, int4 packing and the e4m3 encoding are the quantize kernel's helpers.  With the consumer's
  low-rank down-projection ``lora_down [N, R2]``, each program also adds its partial product
  ``y_tile [BM, BN] @ lora_down[tile columns, :]`` (``tl.dot`` in chunks of ``BR2`` ranks, fp32
  accuracy) into ``lora_act2 [M, R2]`` with fp32 ``tl.atomic_add``: the launcher zero-fills it, and
  the ``cdiv(N, BN)`` column tiles of a row arrive in any order, so ``lora_act2``'s summation order
  (and its last bits) vary from run to run.  On GPUs the tiles are then at most 64 x 128 (8 warps)
  or 64 x 64 (4 warps) with BR2 = 16 (compiled for sm_80/89/90: no spills, shared memory < 99 KB).
  ``G2 > 256`` (``> 128`` with ``lora_down``): the GEMM (fp32 out) + quantize kernels instead (the
  quantize kernel's ``lora_act``, deterministic).

Interpreter (CPU tensors, ``TRITON_INTERPRET=1``; constexpr ``INTERP``): int8 ``tl.dot`` with an
int32 result, ``div_rn`` and bitcasts work there, but its float down-casts to bf16 and fp8
truncate / round ties away instead of rounding to nearest even, ``tl.max`` skips NaN, custom
reductions run element by element in Python, and there is no libdevice.  So there the kernels
store bf16 through integer rounding of the fp32 bits, take the group max with ``tl.max`` plus a NaN
flag, and write ``rint`` with ``floor``.  GPUs without fp8 dots (sm < 89) and the interpreter decode
fp8 GEMM operands to fp16 with integer arithmetic (exact) for an fp16 ``tl.dot``.  On GPUs the fast
forms are used: ``libdevice.rint``, a NaN-propagating max reduction, native bf16/fp16 stores, int8
and fp8 tensor-core dots.  Index arithmetic is int64 wherever it scales with M or N.

``compile_for_gpu`` compiles the GPU variants ahead of time (no GPU needed); the tests use it to
check that they build for sm_80/89/90 without register spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pydiff.reference.quant import q_cols, q_dtype

_FMT = {"int4": 0, "int8": 1, "fp8": 2}
_PROLOGUE = {"none": 0, "gelu_tanh": 1, "layernorm": 2}
_QMAX = {"int4": 7.0, "int8": 127.0, "fp8": 448.0}
_empty = torch.empty  # output allocator (tests replace it with one that poisons the memory)


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing ``n``, at most ``cap``."""
    return min(n & -n, cap)


def _cap(device: torch.device):
    """``None`` for the interpreter (CPU tensors), else the GPU's compute capability."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _nv(cap, at_least) -> bool:
    """An NVIDIA GPU of compute capability >= ``at_least`` (ROCm builds report other numbers)."""
    return cap is not None and torch.version.hip is None and tuple(cap) >= at_least


def _lora_prec(interp: bool, cap) -> str:
    """fp32-accurate ``tl.dot`` for the low-rank terms: three tf32 products on NVIDIA sm_80+."""
    return "tf32x3" if not interp and _nv(cap, (8, 0)) else "ieee"


# ---------------------------------------------------------------- shared helpers
@triton.jit
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _group_amax(y, INTERP: tl.constexpr):
    """max |y| over the last axis, NaN if any element is NaN.  GPU: one NaN-propagating max
    reduction; the interpreter runs custom reductions element by element in Python, and its
    tl.max skips NaN (np.nanmax), so there: tl.max plus a NaN flag."""
    if INTERP:
        nan = tl.max((y != y).to(tl.int32), 2) > 0
        a = tl.where(nan, float("nan"), tl.max(tl.abs(y), 2))
    else:
        a = tl.reduce(tl.abs(y), 2, _nanmax)
    return a


@triton.jit
def _rint(v, INTERP: tl.constexpr):
    """Round half to even (|v| < 2^22)."""
    if INTERP:
        f = tl.floor(v)
        d = v - f  # exact
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    else:
        r = libdevice.rint(v)
    return r


@triton.jit
def _e4m3_code(v, INTERP: tl.constexpr):
    """float8_e4m3fn bits (int32 in [0, 255]) of a finite fp32 ``v`` with |v| <= 448, rounded to
    nearest even: normals by rounding the fp32 mantissa to 3 bits in integer arithmetic and
    re-biasing the exponent (127 - 7 = 120, shifted left 3: 960); |v| < 2^-6 as the subnormal
    ``rint(|v| 2^9)`` (8 carries into the smallest normal, whose code is also 8)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    ab = bits & 0x7FFFFFFF
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - 960
    sub = _rint(tl.abs(v) * 512.0, INTERP).to(tl.int32)
    code = tl.where(ab >= 0x3C800000, normal, sub)  # 0x3C800000 = 2^-6
    return code | sign


@triton.jit
def _e4m3_decode_f16(p):
    """uint8 e4m3 bits -> fp16 value (exact): place the 7 magnitude bits at the top of fp16's
    exponent/mantissa (exponent bias 15 instead of 7, so the value is 2^-8 of the e4m3 value, e4m3
    subnormals landing on fp16 subnormals), then multiply by 2^8.  The NaN codes (magnitude bits
    0x7F) become an fp16 NaN, as the hardware conversion and the CPU kernel make them."""
    b = p.to(tl.int16)
    m = b & 0x7F
    h = tl.where(m == 0x7F, 0x7E00, m << 7) | ((b & 0x80) << 8)
    return h.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def _bf16_bits(v):
    """fp32 -> bf16 bits (int16) rounded to nearest even, NaN kept NaN (interpreter path)."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def _unpack_int4(p, R: tl.constexpr, C: tl.constexpr):
    """uint8 ``[R, C]`` (two's-complement nibbles, even channel low) -> int8 ``[R, 2C]``."""
    s = p.to(tl.int8, bitcast=True)
    lo = (s << 4) >> 4  # arithmetic shift sign-extends
    hi = s >> 4
    return tl.reshape(tl.join(lo, hi), [R, 2 * C])


@triton.jit
def _unpack_int4_f16(p, R: tl.constexpr, C: tl.constexpr):
    """uint8 ``[R, C]`` (two's-complement nibbles, even channel low) -> fp16 ``[R, 2C]``, exact:
    the offset-binary nibble ``v + 8 = nibble ^ 8`` goes into the mantissa of 1024.0
    (``0x6400 | (v + 8)`` is the fp16 ``1024 + v + 8``), then ``- 1032``: two integer ops and one
    fp16 subtraction per value, no int -> float conversion instruction."""
    b = p.to(tl.int16)  # zero-extends the byte
    lo = (b & 0xF) ^ 0x6408
    hi = (b >> 4) ^ 0x6408
    h = tl.reshape(tl.join(lo, hi), [R, 2 * C])
    return h.to(tl.float16, bitcast=True) - 1032.0


# int4 -> e4m3 codes for I4DOT 3, eight nibbles per 32-bit register (SWAR, ~14 integer instructions
# for 8 values; the f16 route costs ~5 per value plus the interleave): sign-magnitude e4m3 bytes
# whose value is v * 2^-9 (magnitudes 0..7 are e4m3 subnormals, 8 is 2^-6, the smallest normal).
# $2: 4 packed bytes; $0: the codes of their low nibbles (even channels), $1: of their high ones.
# s: each nibble's sign at its lowest bit; f = 15 s: 0xF in the negative nibbles; (n ^ f) + s is
# 16 - n there (1..8, no carry into the next nibble), n elsewhere.
I4_E4M3_PTX = """{
.reg .b32 s, f, m, t;
shr.u32 t, $2, 3;
and.b32 s, t, 0x11111111;
mul.lo.u32 f, s, 15;
xor.b32 m, $2, f;
add.u32 m, m, s;
and.b32 $0, m, 0x0F0F0F0F;
and.b32 t, s, 0x01010101;
shl.b32 t, t, 7;
or.b32 $0, $0, t;
shr.u32 $1, m, 4;
and.b32 $1, $1, 0x0F0F0F0F;
and.b32 t, s, 0x10101010;
shl.b32 t, t, 3;
or.b32 $1, $1, t;
}"""
_I4_E4M3_ASM = tl.constexpr(I4_E4M3_PTX)


@triton.jit
def _int4_e4m3_codes(p, ASM: tl.constexpr):
    """uint8 ``[R, C]`` packed int4 (two's-complement nibbles, even channel low) -> ``(lo, hi)``
    uint8 ``[R, C]``: e4m3 codes of the even and the odd channels, sign-magnitude with the value
    ``v * 2^-9`` (``|v| <= 7``: e4m3 subnormals; 8: 2^-6).  ASM: the GPU's inline-PTX form
    (:data:`I4_E4M3_PTX`); else the same bytes by element-wise integer ops (the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise(_I4_E4M3_ASM, "=r,=r,r", [p], dtype=(tl.uint8, tl.uint8), is_pure=True,
                                         pack=4)
    b = p.to(tl.int32)
    n_lo = b & 0xF
    n_hi = (b >> 4) & 0xF
    lo = tl.where(n_lo >= 8, 0x80 | (16 - n_lo), n_lo)
    hi = tl.where(n_hi >= 8, 0x80 | (16 - n_hi), n_hi)
    return lo.to(tl.uint8), hi.to(tl.uint8)


@triton.jit
def _gelu_tanh(y):
    """``0.5 y (1 + tanh(u))``, ``u = sqrt(2/pi) (y + 0.044715 y^3)``, computed as ``y / (1 + exp(-2u))``
    (the same function; no libdevice in the interpreter)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y / (1.0 + tl.exp(-2.0 * u))


# ---------------------------------------------------------------- quantize
@triton.jit
def _load_y(x_ptr, xoff, mask, k, rows, smooth_ptr, shift_ptr, scale_ptr, K, rows_per_batch, mean, rstd,
            PROLOGUE: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``y = prologue(x) / smooth`` in fp32 at offsets ``xoff`` (0 where ``mask`` is false)."""
    y = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        y = _gelu_tanh(y)
    elif PROLOGUE == 2:
        y = (y - mean) * rstd
        if HAS_SCALE or HAS_SHIFT:
            boff = (rows // rows_per_batch) * K + k
        if HAS_SCALE:
            y = y * (1.0 + tl.load(scale_ptr + boff, mask=mask, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            y = y + tl.load(shift_ptr + boff, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        y = tl.math.div_rn(y, tl.load(smooth_ptr + k, mask=mask, other=1.0).to(tl.float32))
    return tl.where(mask, y, 0.0)


@triton.jit
def _group_scale(amax, QMAX: tl.constexpr):
    """(divisor, ok, stored scale) of a group: scale = amax / QMAX; stored NaN unless finite; the
    divisor is 1 where the group quantizes to zeros (scale 0 or not finite)."""
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    fin = scale <= 3.4028234663852886e38
    ok = fin & (scale > 0.0)
    stored = tl.where(fin, scale, float("nan"))
    div = tl.where(ok, scale, 1.0)
    return div, ok, stored


@triton.jit
def _quant_store(y, div, ok, q_ptr, rows, rmask, kq, kqmask, FMT: tl.constexpr, QMAX: tl.constexpr,
                 BM: tl.constexpr, GPC: tl.constexpr, GB: tl.constexpr, INTERP: tl.constexpr, QC):
    """Quantize ``y [BM, GPC, GB]`` with per-group ``div``/``ok [BM, GPC]`` and store it.

    ``kq``/``kqmask``: storage columns of the tile, ``[GPC, GB]`` (int8/fp8) or ``[GPC, GB/2]``
    (int4: column of each even channel's byte)."""
    v = tl.math.div_rn(y, div[:, :, None])
    ok3 = ok[:, :, None]
    if FMT == 2:
        v = tl.where(ok3, tl.minimum(tl.maximum(v, -448.0), 448.0), 0.0)
        qv = _e4m3_code(v, INTERP).to(tl.uint8)
    else:
        r = tl.minimum(tl.maximum(_rint(v, INTERP), -QMAX - 1.0), QMAX)
        qi = tl.where(ok3, r, 0.0).to(tl.int32)
        if FMT == 1:
            qv = qi.to(tl.int8)
        else:
            lo, hi = tl.split(tl.reshape(qi, [BM, GPC, GB // 2, 2]))
            qv = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
    tl.store(q_ptr + rows[:, None, None] * QC + kq[None, :, :], qv,
             mask=rmask[:, None, None] & kqmask[None, :, :])


@triton.jit
def _lora_acc(acc, y, ld_ptr, k, kmask, R, BM: tl.constexpr, KC: tl.constexpr, BR: tl.constexpr,
              LORA_PREC: tl.constexpr):
    """``acc [BM, BR] += y [BM, KC] @ lora_down[k, :R]``."""
    r = tl.arange(0, BR)
    kf = tl.reshape(k, [KC])
    km = tl.reshape(kmask, [KC])
    ld = tl.load(ld_ptr + kf[:, None] * R + r[None, :], mask=km[:, None] & (r < R)[None, :], other=0.0)
    return tl.dot(tl.reshape(y, [BM, KC]), ld.to(tl.float32), acc, input_precision=LORA_PREC)


@triton.jit
def _quantize_kernel(x_ptr, smooth_ptr, ld_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr, la_ptr,
                     M, K, R, rows_per_batch, stride_xm, stride_xk, eps, n_tiles, tiles_per_prog,
                     FMT: tl.constexpr, PROLOGUE: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, G: tl.constexpr, GB: tl.constexpr,
                     GPC: tl.constexpr, NSUB: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                     LNB: tl.constexpr, QMAX: tl.constexpr, INTERP: tl.constexpr, LORA_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < M
    Gn = K // G
    if FMT == 0:
        QC = K // 2
    else:
        QC = K

    # LayerNorm row statistics: mean, then the centred variance (second pass over the row)
    mean = tl.zeros([BM], dtype=tl.float32)
    rstd = tl.full([BM], 1.0, tl.float32)
    if PROLOGUE == 2:
        s1 = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, LNB):
            kk = k0 + tl.arange(0, LNB)
            m2 = rmask[:, None] & (kk < K)[None, :]
            xv = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m2, other=0.0)
            s1 += tl.sum(xv.to(tl.float32), 1)
        mean = s1 / K
        s2 = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, LNB):
            kk = k0 + tl.arange(0, LNB)
            m2 = rmask[:, None] & (kk < K)[None, :]
            xv = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m2, other=0.0)
            d = tl.where(m2, xv.to(tl.float32) - mean[:, None], 0.0)
            s2 += tl.sum(d * d, 1)
        rstd = 1.0 / tl.sqrt_rn(s2 / K + eps)
    mean3 = mean[:, None, None]
    rstd3 = rstd[:, None, None]
    rows3 = rows[:, None, None]
    rmask3 = rmask[:, None, None]

    gi = tl.arange(0, GPC)
    c = tl.arange(0, GB)
    cp = tl.arange(0, GB // 2)
    acc_l = tl.zeros([BM, BR], dtype=tl.float32)
    t_lo = pid_t * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, n_tiles)
    for t in range(t_lo, t_hi):
        g = t * GPC + gi  # [GPC] groups of this tile
        gmask = g < Gn
        g64 = g.to(tl.int64)
        if NSUB == 1:
            k = g64[:, None] * G + c[None, :]  # [GPC, GB]
            kmask = gmask[:, None] & (c < G)[None, :]
            mask3 = rmask3 & kmask[None, :, :]
            y = _load_y(x_ptr, rows3 * stride_xm + k[None, :, :] * stride_xk, mask3, k[None, :, :], rows3,
                        smooth_ptr, shift_ptr, scale_ptr, K, rows_per_batch, mean3, rstd3,
                        PROLOGUE, HAS_SMOOTH, HAS_SHIFT, HAS_SCALE)
            if HAS_LORA:
                acc_l = _lora_acc(acc_l, y, ld_ptr, k, kmask, R, BM, GPC * GB, BR, LORA_PREC)
            amax = _group_amax(y, INTERP)  # [BM, GPC]
            div, ok, stored = _group_scale(amax, QMAX)
            if FMT == 0:
                kq = g64[:, None] * (G // 2) + cp[None, :]
                kqm = gmask[:, None] & (cp < G // 2)[None, :]
            else:
                kq = k
                kqm = kmask
            _quant_store(y, div, ok, q_ptr, rows, rmask, kq, kqm, FMT, QMAX, BM, GPC, GB, INTERP, QC)
        else:
            # group wider than the tile: pass 1 amax (and the lora sum), pass 2 quantize
            amax = tl.zeros([BM, GPC], dtype=tl.float32)
            for s in range(NSUB):
                k = g64[:, None] * G + s * GB + c[None, :]
                kmask = gmask[:, None] & (c < GB)[None, :]
                mask3 = rmask3 & kmask[None, :, :]
                y = _load_y(x_ptr, rows3 * stride_xm + k[None, :, :] * stride_xk, mask3, k[None, :, :], rows3,
                            smooth_ptr, shift_ptr, scale_ptr, K, rows_per_batch, mean3, rstd3,
                            PROLOGUE, HAS_SMOOTH, HAS_SHIFT, HAS_SCALE)
                if HAS_LORA:
                    acc_l = _lora_acc(acc_l, y, ld_ptr, k, kmask, R, BM, GPC * GB, BR, LORA_PREC)
                amax = _nanmax(amax, _group_amax(y, INTERP))
            div, ok, stored = _group_scale(amax, QMAX)
            for s in range(NSUB):
                k = g64[:, None] * G + s * GB + c[None, :]
                kmask = gmask[:, None] & (c < GB)[None, :]
                mask3 = rmask3 & kmask[None, :, :]
                y = _load_y(x_ptr, rows3 * stride_xm + k[None, :, :] * stride_xk, mask3, k[None, :, :], rows3,
                            smooth_ptr, shift_ptr, scale_ptr, K, rows_per_batch, mean3, rstd3,
                            PROLOGUE, HAS_SMOOTH, HAS_SHIFT, HAS_SCALE)
                if FMT == 0:
                    kq = g64[:, None] * (G // 2) + s * (GB // 2) + cp[None, :]
                    kqm = gmask[:, None] & (cp < GB // 2)[None, :]
                else:
                    kq = k
                    kqm = kmask
                _quant_store(y, div, ok, q_ptr, rows, rmask, kq, kqm, FMT, QMAX, BM, GPC, GB, INTERP, QC)
        tl.store(s_ptr + rows[:, None] * Gn + g64[None, :], stored, mask=rmask[:, None] & gmask[None, :])
    if HAS_LORA:  # this program's partial sum: slice pid_t of the [splits, M, R] workspace (splits = 1: lora_act)
        r = tl.arange(0, BR)
        part = pid_t.to(tl.int64) * M * R
        tl.store(la_ptr + part + rows[:, None] * R + r[None, :], acc_l, mask=rmask[:, None] & (r < R)[None, :])


def _quantize_config(M: int, K: int, R: int, G: int, prologue: str, has_lora: bool, cap):
    """Block shapes chosen by size (no autotuning: it is slow in the interpreter).

    GPU choices were checked by compiling for sm_80/89/90 (no spills, shared memory < 99 KB);
    timings need a GPU.  On a GPU one would autotune BM in {2, 4, 8, 16}, the tile width GPC*GB in
    {64, 128, 256, 512, 1024}, num_warps in {2, 4, 8} and the splits along K (grid axis 1)."""
    interp = cap is None
    BR = max(16, _np2(R)) if has_lora else 16
    if interp:  # few, large programs: every tl op is a numpy call
        chunk = 512 if has_lora else 1024
        BM, num_warps = max(1, min(64, _np2(M))), 4
    elif has_lora:  # lora_down tile [chunk, BR] and the tf32x3 dot's operands live in shared memory
        # H100, [4096, 3072] bf16, rank 32 (bench/tune_quantize.py), one program per row block (no K
        # split, as before 11-27): BM 8 x 128 channels 82 us, BM 16 x 64 99 us
        chunk = 128 if BR <= 32 else (64 if BR <= 64 else 32)
        BM, num_warps = (8 if BR <= 32 else 16), 4
    else:
        # H100 (bench/tune_quantize.py): 2 rows x 512 channels per program, each row's tiles split over
        # about 6 programs (see _quantize_launch): [4096, 12288] 66.5 us (1.52x the byte floor; 4 rows,
        # no split: 80 us), [4096, 3072] 22.3 us
        chunk = 512
        BM, num_warps = max(1, min(2, _np2(M))), 4
    if _np2(G) <= max(chunk, 128):  # whole groups in the tile: one pass
        GB, NSUB = _np2(G), 1
        GPC = max(1, min(chunk // GB, _np2(K // G)))
    else:  # wide groups: sub-chunks of GB channels, two passes (amax, quantize)
        GB = _pow2_divisor(G, chunk)
        NSUB, GPC = G // GB, 1
    LNB = max(32, min(_np2(K), (4096 if interp else 2048) // BM))
    return dict(GB=GB, GPC=GPC, NSUB=NSUB, BM=BM, BR=BR, LNB=LNB, num_warps=num_warps)


def _quantize_launch(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps, *, cap=None,
                     config=None, interp=None):
    """Allocate the outputs and return ``(outputs, kernel args, constexprs, grid, options)``."""
    M, K = x.shape
    G = int(group_size)
    Gn = K // G
    R = 0 if lora_down is None else lora_down.shape[1]
    has_lora = R > 0
    interp = cap is None if interp is None else interp
    q = _empty((M, q_cols(fmt, K)), device=x.device, dtype=q_dtype(fmt))
    s = _empty((M, Gn), device=x.device, dtype=torch.float32)
    la = _empty((M, R), device=x.device, dtype=torch.float32)
    cfg = _quantize_config(M, K, R, G, prologue, has_lora, None if interp else cap)
    if config:
        cfg.update(config)
    if cfg["NSUB"] == 1:
        assert cfg["GB"] >= G, "config: a one-pass tile needs GB >= group_size"
    else:
        assert cfg["GB"] * cfg["NSUB"] == G and cfg["GPC"] == 1, "config: two passes need GB * NSUB == group_size"
    qk = q.view(torch.uint8) if fmt == "fp8" else q
    n_tiles = -(-Gn // cfg["GPC"])
    n_rb = max(1, -(-M // cfg["BM"]))  # (M = 0: nothing is launched)
    if prologue == "layernorm":
        splits = 1  # each program reads its rows whole for the statistics: a split would repeat that
    elif has_lora:
        # Each program's share of the down-projection goes to slice [split] of a [splits, M, R] fp32
        # workspace, summed in a fixed order after the kernel (deterministic, no atomics). Without
        # the split (before 11-27) the 512 programs of [4096, 3072] each ran all 24 tiles' dots in a
        # chain: 82 us on an H100 against 22 us without the branch. ~4096 programs on a GPU;
        # **not yet timed** (bench/quant.py "linear parts" rows, bench/tune_quantize.py).
        splits = max(1, min(n_tiles, -(-(4096 if not interp else 1) // n_rb)))
    else:
        splits = max(1, min(n_tiles, -(-(12288 if not interp else 1) // n_rb)))  # ~12k programs on a GPU
    if "SPLITS" in cfg:
        splits = max(1, min(n_tiles, cfg["SPLITS"]))
    tpp = -(-n_tiles // splits) if n_tiles else 1
    splits = -(-n_tiles // tpp) if n_tiles else 1
    la_parts = _empty((splits, M, R), device=x.device, dtype=torch.float32) if has_lora and splits > 1 else la
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    smooth, lora_down, shift, scale = map(contig, (smooth, lora_down, shift, scale))
    mod = shift if shift is not None else scale
    rpb = M // mod.shape[0] if mod is not None and mod.shape[0] > 0 else 1  # (B = 0 only with M = 0)
    dummy = x
    args = [x, smooth if smooth is not None else dummy, lora_down if has_lora else dummy,
            shift if shift is not None else dummy, scale if scale is not None else dummy, qk, s, la_parts,
            M, K, R, max(rpb, 1), x.stride(0), x.stride(1), float(eps), n_tiles, tpp]
    const = dict(FMT=_FMT[fmt], PROLOGUE=_PROLOGUE[prologue], HAS_SMOOTH=smooth is not None, HAS_LORA=has_lora,
                 HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, G=G, GB=cfg["GB"], GPC=cfg["GPC"],
                 NSUB=cfg["NSUB"], BM=cfg["BM"], BR=cfg["BR"], LNB=cfg["LNB"], QMAX=_QMAX[fmt], INTERP=interp,
                 LORA_PREC=_lora_prec(interp, cap))
    grid = (n_rb, splits)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2))
    return (q, s, la), args, const, grid, opts, la_parts


def quantize_triton(x, smooth, lora_down, shift, scale, fmt, group_size, prologue, eps, *, _config=None):
    """``(q, scales, lora_act)`` of ``torch.ops.pydiff.quantize`` (arguments already checked).

    ``x [M, K]`` fp32/fp16/bf16 (any strides); ``q`` uint8 ``[M, K/2]`` (int4) / int8 / float8_e4m3fn
    ``[M, K]``, ``scales`` fp32 ``[M, K/G]``, ``lora_act`` fp32 ``[M, R]``.  ``_config`` overrides
    the block shapes (tests)."""
    M, K = x.shape
    outs, args, const, grid, opts, la_parts = _quantize_launch(x, smooth, lora_down, shift, scale, fmt, group_size,
                                                               prologue, eps, cap=_cap(x.device), config=_config)
    if M == 0:
        return outs
    if K == 0:
        outs[2].zero_()
        return outs
    _quantize_kernel[grid](*args, **const, **opts)
    if la_parts is not outs[2]:
        torch.sum(la_parts, dim=0, out=outs[2])  # the programs' partial down-projections, in split order
    return outs


# ---------------------------------------------------------------- quant_gemm
@triton.jit
def _i32_to_f32(d, MAGIC: tl.constexpr):
    """int32 -> fp32; with MAGIC (|d| < 2^22) by the bit pattern of 1.5 * 2^23 + d minus 1.5 * 2^23,
    two full-rate ops instead of one I2F (exact either way)."""
    if MAGIC:
        f = (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        f = d.to(tl.float32)
    return f


@triton.jit
def _kstep(d, a_ptrs, w_ptrs, rmask, cmask, FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           KB: tl.constexpr, DOT_FP8: tl.constexpr, I4DOT: tl.constexpr):
    """One k-step of ``KB`` stored columns: ``d [BM, BN] += a_tile @ w_tile^T`` (int32; fp32 for fp8
    and for int4 on the f16 / e4m3 tensor cores, I4DOT = 1 / 2: every int4 value and product is
    exact there, and a group's sum (|D| <= 64 * 128) is exact in the fp32 accumulator)."""
    a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0 if DOT_FP8 else 0)
    w = tl.load(w_ptrs, mask=cmask[:, None], other=0.0 if DOT_FP8 else 0)
    if FMT == 0 and I4DOT >= 3:
        # e4m3 codes of v * 2^-9 (products exact multiples of 2^-18, scaled back in the epilogue), the
        # even channels' and the odd channels' dots apart: the sum over a group's channels in another
        # order, so the nibbles need no interleaving.  3: inline PTX and the fp8 tensor cores; 4 (the
        # interpreter): the same codes by element-wise ops, decoded exactly to fp16.
        alo, ahi = _int4_e4m3_codes(a, I4DOT == 3)
        wlo, whi = _int4_e4m3_codes(w, I4DOT == 3)
        if I4DOT == 3:
            a8 = tl.reshape(tl.join(alo, ahi), [BM, 2 * KB]).to(tl.float8e4nv, bitcast=True)
            w8 = tl.reshape(tl.join(wlo, whi), [BN, 2 * KB]).to(tl.float8e4nv, bitcast=True)
            return tl.dot(a8, tl.trans(w8), d, out_dtype=d.dtype, max_num_imprecise_acc=2 * KB)
        d = tl.dot(_e4m3_decode_f16(alo), tl.trans(_e4m3_decode_f16(wlo)), d, out_dtype=d.dtype)
        return tl.dot(_e4m3_decode_f16(ahi), tl.trans(_e4m3_decode_f16(whi)), d, out_dtype=d.dtype)
    if FMT == 0:
        if I4DOT == 0:
            a = _unpack_int4(a, BM, KB)
            w = _unpack_int4(w, BN, KB)
        else:
            a = _unpack_int4_f16(a, BM, KB)
            w = _unpack_int4_f16(w, BN, KB)
            if I4DOT == 2:
                a = a.to(tl.float8e4nv)
                w = w.to(tl.float8e4nv)
    elif FMT == 2:
        if not DOT_FP8:
            a = _e4m3_decode_f16(a)
            w = _e4m3_decode_f16(w)
    if DOT_FP8 or I4DOT == 2:
        # Hopper's fp8 MMA keeps ~14 significant bits in its accumulator ("fast accumulation"; Triton's
        # sm_90 default never promotes): promote into the fp32 ``d`` after every k-step of KB, so the
        # truncation stays relative to one k-step's partial sum (measured: a 20 % loss at K = 12288
        # without this).  The int4 group sums (|D| <= 64 G, G <= 128) are exact either way.
        if FMT == 0:
            return tl.dot(a, tl.trans(w), d, out_dtype=d.dtype, max_num_imprecise_acc=2 * KB)
        return tl.dot(a, tl.trans(w), d, out_dtype=d.dtype, max_num_imprecise_acc=KB)
    return tl.dot(a, tl.trans(w), d, out_dtype=d.dtype)


@triton.jit
def _kstep_fast(acc, a_ptrs, w_ptrs, rmask, cmask, ra, rw, FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                KB: tl.constexpr, DOT_FP8: tl.constexpr, GPS: tl.constexpr):
    """One k-step of the ``precision="fast"`` GEMM: each operand element becomes ``q * ratio`` in
    fp16 (``ratio`` = fp16 of the group's scale over the row's largest, so |values| <= 448 (fp8), 128
    (int8), 8 (int4): no overflow; one correctly rounded fp16 multiply per element), then one fp16
    ``tl.dot`` into the fp32 accumulator that runs over all of K.  GPS > 1: the step spans GPS
    groups and ``ra`` / ``rw`` are ``[rows, GPS]``."""
    a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0 if DOT_FP8 else 0)
    w = tl.load(w_ptrs, mask=cmask[:, None], other=0.0 if DOT_FP8 else 0)
    if FMT == 0:
        a = _unpack_int4_f16(a, BM, KB)
        w = _unpack_int4_f16(w, BN, KB)
        BKE: tl.constexpr = 2 * KB
    else:
        BKE: tl.constexpr = KB
        if FMT == 2 and not DOT_FP8:
            a = _e4m3_decode_f16(a)
            w = _e4m3_decode_f16(w)
        else:
            a = a.to(tl.float16)  # int8 and e4m3 values are exact in fp16
            w = w.to(tl.float16)
    if GPS == 1:
        a = a * ra[:, None]
        w = w * rw[:, None]
    else:
        a = tl.reshape(tl.reshape(a, [BM, GPS, BKE // GPS]) * ra[:, :, None], [BM, BKE])
        w = tl.reshape(tl.reshape(w, [BN, GPS, BKE // GPS]) * rw[:, :, None], [BN, BKE])
    return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _row_scale_max(s_ptr, idx, mask, Gn):
    """``max_g |s[idx, g]|`` (NaN if any is NaN), 1 where it is 0: the row factor of the fast GEMM."""
    m = tl.zeros(idx.shape, dtype=tl.float32)
    for g in range(Gn):
        m = _nanmax(m, tl.abs(tl.load(s_ptr + idx * Gn + g, mask=mask, other=0.0)))
    return tl.where(m == 0.0, 1.0, m)


@triton.jit
def _fold(acc, d, sa_ptr, sw_ptr, rows, cols, rmask, cmask, Gn, g, FMT: tl.constexpr, I4DOT: tl.constexpr,
          MAGIC: tl.constexpr):
    """``acc + D_g sa[rows, g] sw[cols, g]``: group g's exact sum ``d`` scaled into the fp32 tile."""
    sa_g = tl.load(sa_ptr + rows * Gn + g, mask=rmask, other=0.0)
    sw_g = tl.load(sw_ptr + cols * Gn + g, mask=cmask, other=0.0)
    if I4DOT >= 3:
        df = d
        sa_g = sa_g * 262144.0  # the codes' 2^-9 scale, twice (exact), on the row scales
    elif FMT == 2 or I4DOT != 0:
        df = d
    else:
        df = _i32_to_f32(d, MAGIC)
    return acc + df * sa_g[:, None] * sw_g[None, :]


@triton.jit
def _qgemm_tile(qa_ptr, sa_ptr, qw_ptr, sw_ptr, bias_ptr, la_ptr, lu_ptr, rows, cols, rmask, cmask,
                N, Gn, R, stride_am, stride_wn,
                FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, STEPS: tl.constexpr,
                BR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DOT_FP8: tl.constexpr,
                MAGIC: tl.constexpr, LORA_PREC: tl.constexpr, I4DOT: tl.constexpr, FAST: tl.constexpr,
                UNROLL: tl.constexpr, GPS: tl.constexpr):
    """The fp32 tile ``acc [BM, BN] = sum_g sa sw D_g + lora_act @ lora_up + bias`` of output rows
    ``rows`` and columns ``cols`` (int64 ``[BM]`` / ``[BN]``, any column indices; masked lanes give 0).
    FAST: ``ref_a ref_w^T * sum_k fp16(qa sa / ref_a) fp16(qw sw / ref_w)`` instead (one fp32
    accumulator over K, see ``pydiff.reference.quant.quant_gemm_fast_ref``)."""
    kb = tl.arange(0, KB)
    a_ptrs = qa_ptr + rows[:, None] * stride_am + kb[None, :]
    w_ptrs = qw_ptr + cols[:, None] * stride_wn + kb[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if FMT == 2 or I4DOT != 0:
        DT: tl.constexpr = tl.float32
    else:
        DT: tl.constexpr = tl.int32
    if FAST:
        ref_a = _row_scale_max(sa_ptr, rows, rmask, Gn)
        ref_w = _row_scale_max(sw_ptr, cols, cmask, Gn)
        for i in range(0, Gn * STEPS // GPS, UNROLL):  # one flat loop over the k-steps (software-pipelined)
            for u in tl.static_range(UNROLL):
                if GPS == 1:
                    g = (i + u) // STEPS
                    ra = tl.math.div_rn(tl.load(sa_ptr + rows * Gn + g, mask=rmask, other=0.0), ref_a)
                    rw = tl.math.div_rn(tl.load(sw_ptr + cols * Gn + g, mask=cmask, other=0.0), ref_w)
                else:
                    gg = (i + u) * GPS + tl.arange(0, GPS)
                    ra = tl.math.div_rn(tl.load(sa_ptr + rows[:, None] * Gn + gg[None, :], mask=rmask[:, None],
                                                other=0.0), ref_a[:, None])
                    rw = tl.math.div_rn(tl.load(sw_ptr + cols[:, None] * Gn + gg[None, :], mask=cmask[:, None],
                                                other=0.0), ref_w[:, None])
                acc = _kstep_fast(acc, a_ptrs, w_ptrs, rmask, cmask, ra.to(tl.float16), rw.to(tl.float16), FMT, BM,
                                  BN, KB, DOT_FP8, GPS)
                a_ptrs += KB
                w_ptrs += KB
        acc = acc * ref_a[:, None] * ref_w[None, :]
    else:
        for g in range(Gn):
            d = tl.zeros([BM, BN], dtype=DT)
            if STEPS == 1:
                d = _kstep(d, a_ptrs, w_ptrs, rmask, cmask, FMT, BM, BN, KB, DOT_FP8, I4DOT)
                a_ptrs += KB
                w_ptrs += KB
            else:
                for _s in range(STEPS):
                    d = _kstep(d, a_ptrs, w_ptrs, rmask, cmask, FMT, BM, BN, KB, DOT_FP8, I4DOT)
                    a_ptrs += KB
                    w_ptrs += KB
            acc = _fold(acc, d, sa_ptr, sw_ptr, rows, cols, rmask, cmask, Gn, g, FMT, I4DOT, MAGIC)
    if HAS_LORA:
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            rm = r < R
            la = tl.load(la_ptr + rows[:, None] * R + r[None, :], mask=rmask[:, None] & rm[None, :], other=0.0)
            lu = tl.load(lu_ptr + r[:, None].to(tl.int64) * N + cols[None, :], mask=rm[:, None] & cmask[None, :],
                         other=0.0)
            acc = tl.dot(la.to(tl.float32), lu.to(tl.float32), acc, input_precision=LORA_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_pid(pid, M, NCOLS, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in the grouped launch order (GROUP_M row tiles share a
    column sweep, for L2 reuse of the weight tiles); NCOLS: the tile count is ``cdiv(NCOLS, BN)``."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(NCOLS, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    return pid_m, pid_n


@triton.jit
def _qgemm_kernel(qa_ptr, sa_ptr, qw_ptr, sw_ptr, bias_ptr, la_ptr, lu_ptr, out_ptr,
                  M, N, Gn, R, stride_am, stride_wn, stride_om,
                  FMT: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  KB: tl.constexpr, STEPS: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                  DOT_FP8: tl.constexpr, MAGIC: tl.constexpr, OUT_BF16_BITS: tl.constexpr,
                  LORA_PREC: tl.constexpr, I4DOT: tl.constexpr, FAST: tl.constexpr, UNROLL: tl.constexpr,
                  GPS: tl.constexpr):
    pid_m, pid_n = _tile_pid(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    acc = _qgemm_tile(qa_ptr, sa_ptr, qw_ptr, sw_ptr, bias_ptr, la_ptr, lu_ptr, rows, cols, rmask, cmask,
                      N, Gn, R, stride_am, stride_wn, FMT, BM, BN, KB, STEPS, BR, HAS_BIAS, HAS_LORA, DOT_FP8,
                      MAGIC, LORA_PREC, I4DOT, FAST, UNROLL, GPS)
    optrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if OUT_BF16_BITS:
        tl.store(optrs, _bf16_bits(acc), mask=omask)
    else:
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


# The fast GEMM's tile on GPUs for M > 64 (a k-step of 128 channels spans two groups of 64): a first
# choice, compiled for sm_90 without spills in 69 KB of shared memory, not yet timed (bench/tune_quant.py
# --fast sweeps the candidates on a GPU).
FAST_TILE = dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3)


def _gemm_config(M: int, N: int, K: int, G: int, R: int, fmt: str, cap, fast: bool = False):
    """Tile shapes chosen by size (no autotuning); ``fast``: the precision="fast" GEMM's (FAST_TILE on
    GPUs for M > 64).

    BK = the largest power of two dividing G, at most 128 (one int32 accumulator per group).  The
    GPU shapes were checked by compiling for sm_80/89/90: no register spills, shared memory < 99 KB
    (Ada's limit) with the lora epilogue in chunks of BR = 16.  On a GPU one would autotune BM in
    {64, 128}, BN in {64, 128, 256}, BK in {64, 128} (<= G), num_warps in {4, 8}, num_stages in
    {2, 3, 4, 5} and GROUP_M in {4, 8, 16}."""
    BK = _pow2_divisor(G, 128)
    if cap is None:  # interpreter: few, large programs
        return dict(BM=max(16, min(64, _np2(M))), BN=max(16, min(64, _np2(N))), BK=BK, BR=min(64, max(16, _np2(R))),
                    GROUP_M=8, num_warps=4, num_stages=1, i4dot=0)
    if M <= 16:
        BM, BN, warps = 16, 64, 4
    elif M <= 32:
        BM, BN, warps = 32, 64, 4
    elif M <= 64:
        BM, BN, warps = 64, 128, 4
    elif fmt == "int4" and _nv(cap, (9, 0)):
        # 4 warps, ~210 registers a thread: two CTAs per SM, so one's per-group fold runs under the
        # other's MMAs (one 64x256 CTA of 8 warps ran both warpgroups in step); 128x128 spills here
        BM, BN, warps = 64, 128, 4
    else:
        BM, BN, warps = 128, 128, 8
    # int4 on Hopper: the e4m3 tensor cores.  H200, 2026-11-27, M = 4096, (K, N) in {(3072, 3072),
    # (3072, 12288), (12288, 3072)}, groups of 64 (bench/quant.py): i4dot 2 at 64x256 / 8 warps
    # (the default before) 454-1742 us; i4dot 3 (SWAR codes) at 64x128 / 4 warps 278-1125 us, 1.55-1.64x
    # faster, bit for bit equal to i4dot 0 on that GPU (tests/test_quant_gpu.py).  The 16- and 32-row
    # tiles keep i4dot 2 (i4dot 3 was not run on a GPU at those tiles).
    i4dot = (3 if BM == 64 else 2) if fmt == "int4" and _nv(cap, (9, 0)) else 0
    cfg = dict(BM=BM, BN=BN, BK=BK, BR=16, GROUP_M=8, num_warps=warps, num_stages=3, i4dot=i4dot)
    if fast and M > 64:
        cfg.update(FAST_TILE)
    return cfg


def _i4dot(cfg, fmt: str, G: int, interp: bool, cap) -> int:
    """The int4 GEMM's tensor-core type (config key ``i4dot``): 0 int8 (``IMMA``; the int32 group
    sums then need an int -> fp32 conversion per output and group), 1 fp16, 2 fp8 e4m3 (sm_89+;
    fp16 elsewhere and in the interpreter).  1 and 2 unpack the nibbles straight to fp16 and
    accumulate each group in fp32, so the per-group epilogue is one multiply-add and a scale
    product: on Hopper, where that CUDA-core epilogue rivals the int8 MMA time at G = 64, fp8 may
    be the faster path.  3 (sm_89+; 4, its element-wise form, in the interpreter; fp16 elsewhere):
    e4m3 codes of ``v * 2^-9`` built eight nibbles at a time by inline PTX (:data:`I4_E4M3_PTX`,
    ~1.75 integer instructions per value instead of ~5 and no interleave), the even and odd
    channels dotted apart; it relies on the tensor cores taking e4m3 subnormals exactly (a GPU test
    checks it bit for bit against mode 0; passed on an H200).  All give bit-identical outputs
    (exact group sums, same epilogue).  Default: 3 on sm_90 for 64-row tiles, 2 for the smaller
    ones (measured faster there, see ``_gemm_config``), 0 elsewhere (Ada's fp8 path: not timed)."""
    mode = int(cfg.get("i4dot", 0)) if fmt == "int4" else 0
    if mode in (2, 3) and G > 128:
        return 1  # Hopper's fp8 MMA accumulates with ~14 bits: group sums of up to 128 int4 products
        #           (|D| <= 2^13) are exact there, longer ones need not be
    if mode == 3:
        return 4 if interp else (3 if _nv(cap, (8, 9)) else 1)
    if mode == 2 and (interp or not _nv(cap, (8, 9))):
        return 1
    return mode


def _gemm_operands(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, G, R, interp, cap):
    """The GEMM kernels' operands (shared by quant_gemm and quant_gemm_quant): fp8 as raw bytes where
    the fp8 dot is unavailable (decoded in the kernel), unit column stride, contiguous scales, and
    a valid pointer (sa) in place of absent bias / lora tensors.  Returns them with ``has_lora``,
    ``dot_fp8`` and ``magic`` (group sums small enough for the two-instruction int32 -> fp32 trick)."""
    has_lora = lora_act is not None and lora_up is not None and R > 0
    dot_fp8 = fmt == "fp8" and not interp and _nv(cap, (8, 9))
    if fmt == "fp8" and not dot_fp8:
        qa, qw = qa.view(torch.uint8), qw.view(torch.uint8)
    if qa.stride(1) != 1:
        qa = qa.contiguous()
    if qw.stride(1) != 1:
        qw = qw.contiguous()
    sa, sw = sa.contiguous(), sw.contiguous()
    la = lora_act.contiguous() if has_lora else sa
    lu = lora_up.contiguous() if has_lora else sa
    b = bias.contiguous() if bias is not None else sa
    qmax = {"int4": 8, "int8": 128, "fp8": 0}[fmt]
    magic = fmt != "fp8" and G * qmax * qmax < (1 << 22)
    return qa, sa, qw, sw, b, la, lu, has_lora, dot_fp8, magic


def _run_shrinking_stages(kernel, grid, args, const, opts):
    """Launch, retrying with fewer pipeline stages on a GPU with less shared memory than planned."""
    while True:
        try:
            kernel[grid](*args, **const, **opts)
            return
        except triton.runtime.errors.OutOfResources:
            if opts["num_stages"] <= 1:
                raise
            opts["num_stages"] -= 1


def _gemm_launch(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype, *, cap=None, config=None,
                 interp=None):
    M, N = qa.shape[0], qw.shape[0]
    K = qa.shape[1] * (2 if fmt == "int4" else 1)
    G = int(group_size)
    Gn = K // G if G else 0
    interp = cap is None if interp is None else interp
    R = 0 if lora_act is None else lora_act.shape[1]
    out = _empty((M, N), device=qa.device, dtype=out_dtype)
    cfg = _gemm_config(M, N, K, G, R, fmt, None if interp else cap, fast=bool(config and config.get("fast")))
    if config:
        cfg.update(config)
    qa, sa, qw, sw, b, la, lu, has_lora, dot_fp8, magic = _gemm_operands(qa, sa, qw, sw, bias, lora_act, lora_up, fmt,
                                                                        G, R, interp, cap)
    bf16_bits = interp and out_dtype == torch.bfloat16
    ok = out.view(torch.int16) if bf16_bits else out
    BR = cfg["BR"]
    steps, gps, unroll = _ksteps(cfg, G, Gn)
    args = [qa, sa, qw, sw, b, la, lu, ok, M, N, Gn, R, qa.stride(0), qw.stride(0), out.stride(0)]
    const = dict(FMT=_FMT[fmt], G=G, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                 KB=cfg["BK"] // 2 if fmt == "int4" else cfg["BK"], STEPS=steps, BR=BR, GROUP_M=cfg["GROUP_M"],
                 HAS_BIAS=bias is not None, HAS_LORA=has_lora, DOT_FP8=dot_fp8, MAGIC=magic,
                 OUT_BF16_BITS=bf16_bits, LORA_PREC=_lora_prec(interp, cap), I4DOT=_i4dot(cfg, fmt, G, interp, cap),
                 FAST=bool(cfg.get("fast", False)), UNROLL=unroll, GPS=gps)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, args, const, grid, opts


def _ksteps(cfg, G: int, Gn: int):
    """``(STEPS, GPS, UNROLL)`` of a config: k-steps per group (BK <= G), groups per k-step (BK > G:
    the fast GEMM only, whose per-element ratios need no per-group accumulator; BK must then be a
    power-of-two multiple of G dividing K, else BK falls back to the default), and k-steps per loop
    iteration of the fast GEMM (config ``unroll``, if it divides their count).  Sets ``cfg["BK"]``."""
    bk = int(cfg["BK"])
    if G and bk > G:
        gps = bk // G
        if not cfg.get("fast") or bk % G or gps & (gps - 1) or Gn % gps:
            bk = cfg["BK"] = _pow2_divisor(G, 128)
    if not G:
        return 1, 1, 1
    steps, gps = max(1, G // bk), max(1, bk // G)
    u = int(cfg.get("unroll", 1)) if cfg.get("fast") else 1
    n = Gn * steps // gps
    return steps, gps, (u if u > 1 and n % u == 0 else 1)


def _with_precision(config, precision: str):
    if precision == "exact":
        return config
    return {**(config or {}), "fast": True}


def quant_gemm_triton(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, out_dtype, *, precision="exact",
                      _config=None):
    """``out [M, N]`` of ``torch.ops.pydiff.quant_gemm`` (arguments already checked); with
    ``precision="fast"`` the one-accumulator form of ``pydiff.reference.quant.quant_gemm_fast_ref``."""
    out, args, const, grid, opts = _gemm_launch(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size,
                                                out_dtype, cap=_cap(qa.device),
                                                config=_with_precision(_config, precision))
    if out.numel() > 0:
        _run_shrinking_stages(_qgemm_kernel, grid, args, const, opts)
    return out


# ---------------------------------------------------------------- quant_gemm_quant (GEMM + GELU + quantize)
@triton.jit
def _qgemm_quant_kernel(qa_ptr, sa_ptr, qw_ptr, sw_ptr, bias_ptr, la_ptr, lu_ptr, smooth_ptr, ld2_ptr, q_ptr, s_ptr,
                        la2_ptr, M, N, Gn, R, stride_am, stride_wn, Gn2, QC, R2,
                        FMT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
                        STEPS: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DOT_FP8: tl.constexpr, MAGIC: tl.constexpr,
                        LORA_PREC: tl.constexpr, GELU: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                        OFMT: tl.constexpr, OQMAX: tl.constexpr, G2: tl.constexpr, GB: tl.constexpr,
                        GPT: tl.constexpr, INTERP: tl.constexpr, HAS_LD2: tl.constexpr, BR2: tl.constexpr,
                        I4DOT: tl.constexpr, FAST: tl.constexpr, UNROLL: tl.constexpr, GPS: tl.constexpr):
    """One ``[BM, GPT * GB]`` output tile: GPT whole output groups of G2 columns, each held in GB =
    next_pow2(G2) lanes (lanes >= G2 masked), so every group's amax is a reduction inside the tile.
    With HAS_LD2: ``lora_act2[rows, :] += y_tile @ lora_down[cols, :]`` (fp32 atomics)."""
    BN: tl.constexpr = GPT * GB
    pid_m, pid_n = _tile_pid(tl.program_id(0), M, Gn2, BM, GPT, GROUP_M)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < M
    j = tl.arange(0, BN)
    if GB == G2:  # contiguous columns (N % G2 == 0: whole groups are in or out)
        cols = pid_n.to(tl.int64) * BN + j
        cmask = cols < N
    else:
        gl = pid_n.to(tl.int64) * GPT + j // GB  # output group of each lane
        cin = j % GB
        cols = gl * G2 + cin
        cmask = (cin < G2) & (gl < Gn2)
    acc = _qgemm_tile(qa_ptr, sa_ptr, qw_ptr, sw_ptr, bias_ptr, la_ptr, lu_ptr, rows, cols, rmask, cmask,
                      N, Gn, R, stride_am, stride_wn, FMT, BM, BN, KB, STEPS, BR, HAS_BIAS, HAS_LORA, DOT_FP8,
                      MAGIC, LORA_PREC, I4DOT, FAST, UNROLL, GPS)
    y = acc
    if GELU:
        y = _gelu_tanh(y)
    if HAS_SMOOTH:
        y = tl.math.div_rn(y, tl.load(smooth_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :])
    y = tl.where(rmask[:, None] & cmask[None, :], y, 0.0)
    if HAS_LD2:
        # the consumer's down-projection of the unquantized y_s: this tile's N-slice of the sum
        for r0 in range(0, R2, BR2):
            r = r0 + tl.arange(0, BR2)
            rm = r < R2
            ld = tl.load(ld2_ptr + cols[:, None] * R2 + r[None, :], mask=cmask[:, None] & rm[None, :], other=0.0)
            part = tl.dot(y, ld.to(tl.float32), input_precision=LORA_PREC)
            tl.atomic_add(la2_ptr + rows[:, None] * R2 + r[None, :], part, mask=rmask[:, None] & rm[None, :],
                          sem="relaxed")
    y3 = tl.reshape(y, [BM, GPT, GB])
    amax = _group_amax(y3, INTERP)  # [BM, GPT]
    div, ok, stored = _group_scale(amax, OQMAX)
    g = pid_n.to(tl.int64) * GPT + tl.arange(0, GPT)
    gmask = g < Gn2
    if OFMT == 0:
        cp = tl.arange(0, GB // 2)
        kq = g[:, None] * (G2 // 2) + cp[None, :]
        kqm = gmask[:, None] & (cp < G2 // 2)[None, :]
    else:
        c = tl.arange(0, GB)
        kq = g[:, None] * G2 + c[None, :]
        kqm = gmask[:, None] & (c < G2)[None, :]
    _quant_store(y3, div, ok, q_ptr, rows, rmask, kq, kqm, OFMT, OQMAX, BM, GPT, GB, INTERP, QC)
    tl.store(s_ptr + rows[:, None] * Gn2 + g[None, :], stored, mask=rmask[:, None] & gmask[None, :])


FUSED_MAX_GROUP = 256  # widest output group the fused kernel holds in one tile (wider: GEMM + quantize)
FUSED_MAX_GROUP_LORA2 = 128  # the same with lora_down (y's tile also feeds the tf32x3 dot: 256 lanes need
#                              160+ KB of shared memory and spill on sm_80/89/90)


def _gemm_quant_launch(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue,
                       out_fmt, out_group_size, *, cap=None, config=None, interp=None):
    """Allocate ``(q, scales, lora_act2)`` (``lora_act2`` zero-filled: the kernel accumulates into it)
    and return ``(outputs, kernel args, constexprs, grid, options)``."""
    M, N = qa.shape[0], qw.shape[0]
    K = qa.shape[1] * (2 if fmt == "int4" else 1)
    G, G2 = int(group_size), int(out_group_size)
    Gn, Gn2 = (K // G if G else 0), N // G2
    interp = cap is None if interp is None else interp
    R = 0 if lora_act is None else lora_act.shape[1]
    R2 = 0 if lora_down is None else lora_down.shape[1]
    q = _empty((M, q_cols(out_fmt, N)), device=qa.device, dtype=q_dtype(out_fmt))
    s = _empty((M, Gn2), device=qa.device, dtype=torch.float32)
    la2 = _empty((M, R2), device=qa.device, dtype=torch.float32)
    la2.zero_()
    cfg = _gemm_config(M, N, K, G, R, fmt, None if interp else cap)
    GB = _np2(G2)
    if interp:  # rank chunk of the lora_act2 dot: one chunk (up to 64 ranks)
        cfg["BR2"] = min(64, max(16, _np2(R2)))
    else:
        cfg["BR2"] = 16
        if R2 > 0:  # the tf32x3 dot holds y [BM, BN] (hi + lo) and lora_down [BN, 16]: smaller tiles
            cfg["BM"] = min(cfg["BM"], 64)
            cfg["BN"] = min(cfg["BN"], 128 if cfg["num_warps"] == 8 else 64)
            if GB > cfg["BN"] or cfg["BM"] == 32:
                cfg["num_warps"] = 8
    cfg["GPT"] = max(1, min(cfg["BN"] // GB, _np2(Gn2)))
    if config:
        cfg.update(config)
    qa, sa, qw, sw, b, la, lu, has_lora, dot_fp8, magic = _gemm_operands(qa, sa, qw, sw, bias, lora_act, lora_up, fmt,
                                                                        G, R, interp, cap)
    sm = smooth.contiguous() if smooth is not None else sa
    ld2 = lora_down.contiguous() if R2 > 0 else sa
    qk = q.view(torch.uint8) if out_fmt == "fp8" else q
    steps, gps, unroll = _ksteps(cfg, G, Gn)
    args = [qa, sa, qw, sw, b, la, lu, sm, ld2, qk, s, la2, M, N, Gn, R, qa.stride(0), qw.stride(0), Gn2, qk.shape[1],
            R2]
    const = dict(FMT=_FMT[fmt], BM=cfg["BM"], BK=cfg["BK"], KB=cfg["BK"] // 2 if fmt == "int4" else cfg["BK"],
                 STEPS=steps, BR=cfg["BR"], GROUP_M=cfg["GROUP_M"], HAS_BIAS=bias is not None,
                 HAS_LORA=has_lora, DOT_FP8=dot_fp8, MAGIC=magic, LORA_PREC=_lora_prec(interp, cap),
                 GELU=epilogue == "gelu_tanh", HAS_SMOOTH=smooth is not None, OFMT=_FMT[out_fmt],
                 OQMAX=_QMAX[out_fmt], G2=G2, GB=GB, GPT=cfg["GPT"], INTERP=interp, HAS_LD2=R2 > 0,
                 BR2=cfg["BR2"], I4DOT=_i4dot(cfg, fmt, G, interp, cap),
                 FAST=bool(cfg.get("fast", False)), UNROLL=unroll, GPS=gps)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(Gn2, cfg["GPT"]),)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (q, s, la2), args, const, grid, opts


def quant_gemm_quant_triton(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, group_size, epilogue,
                            out_fmt, out_group_size, *, precision="exact", _config=None):
    """``(q, scales, lora_act2)`` of ``torch.ops.pydiff.quant_gemm_quant`` (arguments already checked):
    one kernel whose GEMM tile goes through the GELU, ``/ smooth`` and the per-group quantization in
    registers (round half to even; fp8 through the integer e4m3 encoder) and adds its share of
    ``lora_act2 = y_s @ lora_down`` with fp32 atomics (summation order not fixed).  Output groups
    wider than ``FUSED_MAX_GROUP`` channels (``FUSED_MAX_GROUP_LORA2`` with ``lora_down``) do not fit
    a tile: then ``quant_gemm_triton`` (fp32 out) + ``quantize_triton`` (same result)."""
    R2 = 0 if lora_down is None else lora_down.shape[1]
    if int(out_group_size) > (FUSED_MAX_GROUP_LORA2 if R2 > 0 else FUSED_MAX_GROUP):
        y = quant_gemm_triton(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, group_size, torch.float32,
                              precision=precision)
        return quantize_triton(y, smooth, lora_down, None, None, out_fmt, out_group_size,
                               "gelu_tanh" if epilogue == "gelu_tanh" else "none", 0.0)
    outs, args, const, grid, opts = _gemm_quant_launch(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down,
                                                       fmt, group_size, epilogue, out_fmt, out_group_size,
                                                       cap=_cap(qa.device), config=_with_precision(_config, precision))
    if outs[1].numel() > 0:
        _run_shrinking_stages(_qgemm_quant_kernel, grid, args, const, opts)
    return outs


# ---------------------------------------------------------------- ahead-of-time compile check
_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
       torch.int16: "i16", torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}


def compile_for_gpu(op: str, cap=(9, 0), *inputs, **kw):
    """Compile (without running: no GPU needed, Triton's bundled ptxas is; not under the
    interpreter, whose language functions are not compilable) the kernel that
    ``quantize_triton`` (op="quantize"), ``quant_gemm_triton`` (op="quant_gemm") or
    ``quant_gemm_quant_triton`` (op="quant_gemm_quant", groups <= 256, <= 128 with lora_down) would launch on
    a GPU of compute capability ``cap`` for these (CPU) inputs; returns the compiled kernel
    (``.asm["ptx"]``, ``.metadata``).  Used by the tests to check the GPU-only code paths."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, fn = {"quantize": (_quantize_launch, _quantize_kernel), "quant_gemm": (_gemm_launch, _qgemm_kernel),
                  "quant_gemm_quant": (_gemm_quant_launch, _qgemm_quant_kernel)}[op]
    _, args, const, _, opts = launch(*inputs, cap=cap, interp=False, **kw)[:5]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile_for_gpu: Triton's interpreter is on (TRITON_INTERPRET=1); its language "
                           "functions cannot be compiled in this process: run it in one without it")
    return _compile(fn, args, const, opts, cap, ASTSource, GPUTarget)


def _compile(fn, args, const, opts, cap, ASTSource, GPUTarget):
    names = [p.name for p in fn.params if not p.is_constexpr]
    sig, attrs, const = {}, {}, dict(const)
    for name, a in zip(names, args):
        idx = (fn.arg_names.index(name),)
        if isinstance(a, torch.Tensor):  # as the JIT specializes: pointers 16-byte aligned, ints % 16, ints == 1
            sig[name] = "*" + _TT[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[idx] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        elif int(a) == 1:
            sig[name] = "constexpr"
            const[name] = 1
        else:
            sig[name] = "i64" if abs(int(a)) >= 2 ** 31 else "i32"
            if int(a) % 16 == 0:
                attrs[idx] = [["tt.divisibility", 16]]
    for name in const:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32),
                          options=dict(num_warps=opts["num_warps"], num_stages=opts["num_stages"]))


__all__ = ["quantize_triton", "quant_gemm_triton", "quant_gemm_quant_triton", "compile_for_gpu"]
