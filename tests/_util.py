"""Helpers shared by the op tests."""
import torch

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# |out - ref| <= RTOL * |ref| + ATOL * max|ref|, ref in float64 from the same (rounded) inputs
TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (1e-3, 2e-4), torch.bfloat16: (8e-3, 2e-3)}


def poison_allocator(numel: int, dtype: torch.dtype, count: int = 4) -> None:
    """Fill freed memory of the sizes the next outputs will take with NaN, so an output element
    that a kernel forgets to write shows up as NaN rather than as a lucky zero."""
    bufs = [torch.full((numel,), float("nan"), dtype=dtype) for _ in range(count)]
    del bufs


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = TOL[dtype]
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (an element was not written?)"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = (out64 - ref64).abs()
    bound = rtol * ref64.abs() + atol * scale
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} exceeds the bound (rtol={rtol}, atol={atol}*{scale:.3g})"
