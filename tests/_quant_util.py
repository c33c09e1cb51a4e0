"""Helpers shared by the quantization tests (test_quant_op, test_quant_fused, test_quant_gpu)."""
import importlib
import math

import torch

import pydiff
from pydiff.reference.quant import q_values, unpack_int4

from _util import CPU


def fp8_mma_rel(backend: str, fmt: str, device) -> float:
    """The Triton fp8 GEMM's extra error on sm_89+ tensor cores, relative to :func:`gemm_magnitude`:
    their fp8 MMA accumulates with about 14 significant bits (measured on Hopper; the DeepSeek-V3
    report, section 3.3.2), and the kernel promotes into its fp32 accumulator after every k-step
    (at most 128 products, four MMA instructions), so each k-step's sum is within about
    4 * 2^-13 of its magnitude: allowed 2^-10.  0 for every other backend / format / device (the
    CUDA kernel and the int formats sum exactly; Triton decodes fp8 to fp16 elsewhere)."""
    if backend != "triton" or fmt != "fp8" or torch.device(device).type != "cuda":
        return 0.0
    return 2.0**-10 if torch.cuda.get_device_capability(device) >= (8, 9) else 0.0


def triton_quant_ok() -> bool:
    """Whether the Triton quant kernels can run here (a GPU, or the interpreter on the CPU)."""
    if "triton" not in pydiff.available_backends(CPU) and not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("pydiff.triton_kernels.quant")
    except Exception:
        return False
    return True


def codes(q, fmt):
    """Stored q as comparable integers: int values (int4/int8) or e4m3 bit patterns (fp8)."""
    if fmt == "fp8":
        return q.view(torch.uint8).to(torch.int64)
    if fmt == "int4":
        return unpack_int4(q).to(torch.int64)
    return q.to(torch.int64)


def step_diff(qa, qb, fmt):
    """Elementwise distance in quantization steps (fp8: between codes of one sign, across zero the sum)."""
    a, b = codes(qa, fmt), codes(qb, fmt)
    if fmt == "fp8":
        sa, sb, ma, mb = a >> 7, b >> 7, a & 0x7F, b & 0x7F
        return torch.where(sa == sb, (ma - mb).abs(), ma + mb)
    return (a - b).abs()


def gemm_magnitude(qa, sa, qw, sw, bias, la, lu, fmt, G):
    """sum of |terms| of out (float64): the scale of the fp32 rounding errors of the epilogue."""
    a, w = q_values(qa, fmt).abs(), q_values(qw, fmt).abs()
    M, K = a.shape
    mag = torch.zeros(M, w.shape[0], dtype=torch.float64, device=a.device)
    for g in range(K // G):
        sl = slice(g * G, (g + 1) * G)
        mag += (a[:, sl] @ w[:, sl].T) * (sa[:, g:g + 1].double().abs() * sw[:, g].double().abs()[None, :])
    if la is not None:
        mag += la.double().abs() @ lu.double().abs()
    if bias is not None:
        mag += bias.double().abs()[None, :]
    return mag


def check_gemm(out, ref, mag, n_terms, out_dtype, what, mma_rel=0.0):
    """out within fp32 epilogue rounding of the float64 reference: ``2 (n_terms + 2) 2^-24 mag`` plus
    one unit in the last place of the output dtype (plus ``mma_rel mag``: :func:`fp8_mma_rel`)."""
    assert out.dtype == out_dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element was not written?)"
    ulp_out = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out_dtype]
    bound = (2 * (n_terms + 2) * 2.0**-24 + mma_rel) * mag + ulp_out * ref.abs() + 2.0**-24
    err = (out.double() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} (bound exceeded by {worst:.3e})"


def fp8_sweep_values():
    """Every finite fp16 and bf16 value within +-448, every e4m3 rounding tie and its two fp32
    neighbours, and a few subnormal / boundary values, both signs."""
    half = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    bf = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    e4 = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (e4[:-1] + e4[1:]) / 2  # every tie (exact in fp32)
    ties = torch.cat([mid, torch.nextafter(mid, torch.zeros_like(mid)),
                      torch.nextafter(mid, torch.full_like(mid, 1e3))])
    tiny = torch.tensor([0.0, 1e-45, 1.1754944e-38, 2.0**-10, 2.0**-9 * 0.5, 2.0**-9 * 1.5, 464.0 - 2.0**-5])
    v = torch.cat([half, bf, ties, tiny])
    v = v[torch.isfinite(v) & (v.abs() <= 448)]
    return torch.cat([v, -v])


def check_fp8_encoding(quantize_fn, v, backend):
    """Groups [448, v0 .. v30]: amax 448, scale exactly 1, so q = e4m3(v) for every swept v, bit for
    bit as torch's cast.  ``quantize_fn(x) -> (q, scales)`` on CPU tensors."""
    per = 31
    rows = (v.numel() + per - 1) // per
    body = torch.zeros(rows * per)
    body[: v.numel()] = v
    x = torch.cat([torch.full((rows, 1), 448.0), body.reshape(rows, per)], dim=1)
    q, s = quantize_fn(x)
    assert torch.equal(s, torch.ones_like(s))
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = q.view(torch.uint8) != want
    assert not bad.any(), f"{backend}: e4m3({x[bad][:5].tolist()}) = {q[bad][:5].view(torch.uint8).tolist()}, " \
                          f"torch gives {want[bad][:5].tolist()} ({int(bad.sum())} of {x.numel()})"


TIES = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -6.5, 2.5000002, 2.4999998, 0.25,
                     -0.75, 1.0, -0.0, 6.4999995])


def special_groups_input(qmax, rand32):
    """Two rows of three 32-channel groups: [ties with amax QMAX (scale 1), NaN group, +inf group],
    [all zeros / -0 (scale 0), random, -inf group]; ``rand32(seed)`` gives 32 fp32 CPU values."""
    g0 = torch.zeros(32)
    g0[0] = -qmax
    g0[1:1 + TIES.numel()] = TIES
    g1 = rand32(3)
    g1[5] = float("nan")
    g2 = rand32(4)
    g2[7] = float("inf")
    g3 = torch.zeros(32)
    g3[::2] = -0.0
    g4 = rand32(5)
    g5 = rand32(6)
    g5[31] = -float("inf")
    return torch.stack([torch.cat([g0, g1, g2]), torch.cat([g3, g4, g5])])


def check_special_groups(q, s, qr, fmt, backend):
    """``q, s``: a backend's quantization (CPU tensors) of :func:`special_groups_input`; ``qr``: the
    reference's q.  Rounding half to even, NaN scale and zero codes for NaN/inf groups, scale 0 for
    the zero group, int4 packing with channel 2j in the low nibble."""
    assert torch.equal(codes(q, fmt), codes(qr, fmt)), backend
    assert s[0, 0].item() == 1.0 and s[1, 0].item() == 0.0 and s[1, 1].item() > 0
    for m, g in ((0, 1), (0, 2), (1, 2)):
        assert math.isnan(s[m, g].item()), f"{backend} {fmt}: scale of a NaN/inf group is {s[m, g].item()}"
        assert (codes(q, fmt)[m, 32 * g:32 * (g + 1)] == 0).all()
    assert (codes(q, fmt)[1, :32] == 0).all()
    if fmt != "fp8":
        assert torch.equal(codes(q, fmt)[0, 1:1 + TIES.numel()], torch.round(TIES).to(torch.int64))  # half to even
    if fmt == "int4":
        assert q[0, 0].item() == ((-7) & 0xF) | ((0 & 0xF) << 4)  # -7 (amax), rint(0.5) = 0


def y_and_error_bound(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, fmt, G, epilogue, mma_rel=0.0):
    """quant_gemm_quant's unquantized output ``y_s`` (after the epilogue and ``/ smooth``; float64
    ``[M, N]``) and a bound ``dy`` on a kernel's error in it, elementwise: the kernels' fp32 GEMM
    epilogue is within ``2 (Gn + R + 2) 2^-24 mag`` of the exact value (``mag``:
    :func:`gemm_magnitude`; plus ``mma_rel mag`` on Hopper's fp8 MMA), plus its own rounding; the
    GELU (slope below 1.2) adds 8 ulps of its result; ``/ smooth`` divides the error and adds an ulp."""
    from pydiff.reference.quant import gelu_tanh, quant_gemm_ref

    u = 2.0**-24
    K = q_values(qa, fmt).shape[1]
    R = 0 if lora_act is None else lora_act.shape[1]
    y = quant_gemm_ref(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, G, None)
    dy = ((2 * (K // G + R + 2) * u + mma_rel) * gemm_magnitude(qa, sa, qw, sw, bias, lora_act, lora_up, fmt, G)
          + u * y.abs())
    if epilogue == "gelu_tanh":
        y = gelu_tanh(y)
        dy = 1.2 * dy + 8 * u * y.abs()
    if smooth is not None:
        s = smooth.double()[None, :]
        y = y / s
        dy = dy / s.abs() + u * y.abs()
    return y, dy


def code_step(q, fmt):
    """The quantization step at each stored value of q, float64 (int formats 1; e4m3: 2^(e - 3) for
    |v| in [2^e, 2^(e+1)), e >= -6, and 2^-9 among the subnormals)."""
    v = q_values(q, fmt)
    if fmt != "fp8":
        return torch.ones_like(v)
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    return torch.exp2(e - 3)


def check_q_within(q, s, qr, sr, dy, fmt, G2, what):
    """Quantized outputs ``(q, s)`` against the reference's ``(qr, sr)`` where ``y`` may carry an error
    up to ``dy`` (:func:`y_and_error_bound`): each rounds its own y to the nearest step, so
    ``|q s - qr sr| <= dy + (half a step of each, at its scale)``, elementwise.  This is the check
    where a ``dy`` of fp8 MMA size makes small values many e4m3 steps apart (near zero a step is
    2^-9 of the group's scale, but dy scales with the whole sum's magnitude)."""
    sx, srx = s.double().repeat_interleave(G2, 1), sr.double().repeat_interleave(G2, 1)
    v, vr = q_values(q, fmt) * sx, q_values(qr, fmt) * srx
    bound = dy + 0.5 * (code_step(q, fmt) * sx + code_step(qr, fmt) * srx)
    err = (v - vr).abs()
    worst = (err / (bound * (1 + 1e-6) + 1e-30)).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: dequantized q differs by up to {worst:.3g} x its bound"
    return worst


def check_lora_act2(la2, ref, qa, sa, qw, sw, bias, lora_act, lora_up, smooth, lora_down, fmt, G, epilogue, what,
                    mma_rel=0.0):
    """``lora_act2 = y_s @ lora_down`` of quant_gemm_quant (``la2``, a backend's fp32 ``[M, R2]``)
    against the reference's ``ref``, within a bound derived from fp32 rounding, elementwise:

    * ``y_s`` itself: within ``dy`` of :func:`y_and_error_bound`. That error enters the sum as
      ``|dy| @ |lora_down|``;
    * the N-term fp32 sum (any order, atomics included; tf32x3 dots on GPUs): ``(N + 4) 2^-24
      |y_s| @ |lora_down|``, plus the final rounding ``2^-24 |ref|``.
    """
    M, N = qa.shape[0], qw.shape[0]
    R2 = 0 if lora_down is None else lora_down.shape[1]
    assert la2.dtype == torch.float32 and tuple(la2.shape) == (M, R2), f"{what}: lora_act2 {la2.dtype} {tuple(la2.shape)}"
    assert tuple(ref.shape) == (M, R2)
    if R2 == 0:
        return
    assert torch.isfinite(la2).all(), f"{what}: lora_act2 not written or not finite"
    u = 2.0**-24
    y, dy = y_and_error_bound(qa, sa, qw, sw, bias, lora_act, lora_up, smooth, fmt, G, epilogue, mma_rel)
    ld = lora_down.double().abs()
    bound = dy @ ld + (N + 4) * u * (y.abs() @ ld) + u * ref.double().abs() + 1e-30
    err = (la2.double() - ref.double()).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: lora_act2 error {err.max().item():.3e}, {worst:.3g} x the fp32 bound"
    return worst
