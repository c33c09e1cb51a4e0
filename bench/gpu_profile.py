"""One launch of each headline kernel, for Nsight Compute (a GPU session's profile of where the
time goes; nothing is timed here):

    ncu --clock-control none --kernel-name regex:"solver_step|partial_kernel|select_kernel|qgemm|quant_gemm|quantize|gn_" \
        --section SpeedOfLight --section WarpStateStats --section Occupancy python3 bench/gpu_profile.py [part ...]

Kernels: the DPM-Solver++(2M) + CFG step on fp32 1x16x21x90x160 (CUDA, Triton); categorical
sampling of [4096 x 126464] bf16 logits to tokens + probability (CUDA, Triton); the W4A4 GEMM
4096 x 3072 x 3072, groups of 64 (CUDA; Triton on int8 and on e4m3 tensor cores; part wgmma: the
Hopper warpgroup-MMA kernel with both tile layouts and the precision="fast" Triton GEMM); activation
quantization bf16 [4096, 3072] -> int4 g64 (CUDA, Triton); GroupNorm+SiLU 8x256x64x64 fp32 forward
and backward (CUDA, Triton).  Parts: solver, sampling, gemm, wgmma, quantize, groupnorm (default: all but wgmma).
``--clock-control none`` keeps the GPU's clocks as they are."""
import sys

import torch

import pydiff
from pydiff.ops.quant import quant_gemm, quantize
from pydiff.ops.sampling import sample_categorical
from pydiff.reference.solver import num_coeffs


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dt=torch.float32: torch.randn(*s, generator=g, device=dev).to(dt)  # noqa: E731
    which = sys.argv[1:] or ["solver", "sampling", "gemm", "quantize", "groupnorm"]
    if "solver" in which:
        shape = (1, 16, 21, 90, 160)
        x, c, u, h = rnd(*shape), rnd(*shape), rnd(*shape), rnd(*shape)
        co = [0.1 * (i + 1) for i in range(num_coeffs(1))]
        for b in ("cuda", "triton"):
            pydiff.solver_step(x, c, u, [h], None, coeffs=co, backend=b, check=False)
    if "sampling" in which:
        logits = rnd(4096, 126464, dt=torch.bfloat16)
        for b in ("cuda", "triton"):
            sample_categorical(logits, seed=1, return_probs=True, backend=b)
    if "gemm" in which:
        M, N, K, G = 4096, 3072, 3072, 64
        qa, sa, _ = quantize(rnd(M, K, dt=torch.bfloat16), "int4", G, backend="cuda")
        qw, sw, _ = quantize(rnd(N, K, dt=torch.bfloat16), "int4", G, backend="cuda")
        quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=G, out_dtype=torch.bfloat16, backend="cuda")
        from pydiff.triton_kernels import quant as tq
        for i4 in (0, 2):
            tq.quant_gemm_triton(qa, sa, qw, sw, None, None, None, "int4", G, torch.bfloat16, _config={"i4dot": i4})
    if "wgmma" in which:  # the Hopper warpgroup-MMA W4A4 kernel, both tile layouts; the fast Triton GEMM
        import os

        M, N, K, G = 4096, 3072, 3072, 64
        qa, sa, _ = quantize(rnd(M, K, dt=torch.bfloat16), "int4", G, backend="cuda")
        qw, sw, _ = quantize(rnd(N, K, dt=torch.bfloat16), "int4", G, backend="cuda")
        for mode in ("1", "2"):
            os.environ["PYDIFF_CUDA_WGMMA"] = mode
            quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=G, out_dtype=torch.bfloat16, backend="cuda")
        os.environ.pop("PYDIFF_CUDA_WGMMA")
        quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=G, out_dtype=torch.bfloat16, backend="triton",
                   precision="fast")
    if "quantize" in which:  # bf16 [4096, 3072] -> int4 g64 (the CUDA kernel ran at 4.6x its byte floor)
        x = rnd(4096, 3072, dt=torch.bfloat16)
        for b in ("cuda", "triton"):
            quantize(x, "int4", 64, backend=b)
    if "groupnorm" in which:  # GroupNorm+SiLU 8x256x64x64 fp32, forward and backward (CUDA fwd+bwd 302 us)
        from pydiff.ops import invertible as inv

        x, dy = rnd(8, 256, 64, 64), rnd(8, 256, 64, 64)
        w, bias = rnd(256), rnd(256)
        for b in ("cuda", "triton"):
            y, mean, rstd = inv.groupnorm_silu_forward(x, 32, w, bias, 1e-5, backend=b)
            inv.groupnorm_silu_backward(dy, x, w, bias, mean, rstd, 32, backend=b)
    torch.cuda.synchronize()
    print("profiled:", which)


if __name__ == "__main__":
    main()
