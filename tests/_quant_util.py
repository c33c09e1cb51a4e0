"""Helpers shared by the quantization tests (test_quant_op, test_quant_fused, test_quant_gpu)."""
import importlib

import torch

import pydiff
from pydiff.reference.quant import q_values, unpack_int4

from _util import CPU


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


def check_gemm(out, ref, mag, n_terms, out_dtype, what):
    """out within fp32 epilogue rounding of the float64 reference: ``2 (n_terms + 2) 2^-24 mag`` plus
    one unit in the last place of the output dtype."""
    assert out.dtype == out_dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element was not written?)"
    ulp_out = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out_dtype]
    bound = 2 * (n_terms + 2) * 2.0**-24 * mag + ulp_out * ref.abs() + 2.0**-24
    err = (out.double() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} (bound exceeded by {worst:.3e})"
