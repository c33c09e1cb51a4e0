"""Quantized-matmul benchmarks: activation quantization, the W4A4 / W8A8 GEMM, and the whole linear.

GPU (the issue's shapes: M = 4096 tokens, (K, N) in (3072, 3072), (3072, 12288), (12288, 3072)),
every row measured in the same run:

* ``gemm``: the GEMM alone (quantized operands in, fused per-group epilogue, bf16 out) for each
  pydiff backend (cuda, triton) and format, next to cuBLAS bf16 (``F.linear``), ``torch._int_mm``
  (int8, int32 out, no scales) and ``torch._scaled_mm`` fp8 e4m3 (per-tensor scales).
  ``tflops`` is 2 M N K / time (TFLOP/s-equivalent); ``x_bf16`` the bf16 time over this one.
* ``quantize``: per-token, group-64 int4 quantization of ``[M, K]`` bf16, next to eager torch (the
  reference formula) and ``torch.compile`` of it; the floor is the bytes (read bf16, write int4 and
  fp32 scales) over the measured copy bandwidth.
* ``linear``: quantize + GEMM (what a W4A4 layer runs: the default ``W4A4Linear``, rank-32 bf16
  SVDQuant branch, its down-projection in the quantize pass and up-projection in the GEMM
  epilogue; and rank 0) vs ``F.linear`` in bf16; and the DiT case where the quantization is fused
  into the LayerNorm / adaLN modulation that produces the activations (``prologue='layernorm'``)
  vs LayerNorm + modulation + bf16 linear; and the DiT MLP ``fc2(GELU_tanh(fc1(x)))`` (M = 4096,
  3072 -> 12288 -> 3072 on a GPU) with fc1's GEMM writing fc2's int4 input and, at rank 32, fc2's
  low-rank down-projection (``quant_gemm_quant``, the 16-bit hidden activations never exist) vs
  bf16 ``F.linear`` + ``F.gelu(approximate='tanh')`` + ``F.linear``, and vs the unfused W4A4
  chain (fc1 bf16 out, then quantize with the GELU prologue), each at rank 32 (the W4A4 default)
  and rank 0; ``hidden_mib``: bytes of the hidden activations written and read back.
* ``weight_mib``: the bytes of the layer's weights (packed values + scales) vs bf16.

CPU: the C++ reference kernels' speed only (the CPU is not a target for these kernels).

    python bench/quant.py [--device cuda|cpu] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pydiff  # noqa: E402
from pydiff.ops import quant as Q  # noqa: E402

from _timing import bench, copy_bandwidth, device_name  # noqa: E402

GPU_SHAPES = [(4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072)]  # (M, K, N)
CPU_SHAPES = [(256, 1024, 1024)]
QUICK_SHAPES = [(64, 256, 128)]
MLP_GPU_SHAPES = [(4096, 3072, 12288)]  # (M, D, hidden): fc1 D -> hidden, fc2 hidden -> D
MLP_CPU_SHAPES = [(256, 512, 2048)]
MLP_QUICK_SHAPES = [(64, 256, 1024)]
GROUP = {"int4": 64, "int8": None, "fp8": None}  # None: per token / per output channel (group = K)
RANK = 32  # W4A4Linear's default SVDQuant rank (bf16 branch)


def _backends(device):
    return [b for b in pydiff.available_backends(device) if b in ("cuda", "triton", "cpu")
            and not (b == "triton" and device.type == "cpu")]


def _row(**kw):
    return {k: v for k, v in kw.items() if v is not None}


def _why(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _mib(*ts) -> float:
    return sum(t.numel() * t.element_size() for t in ts) / 2**20


def gemm_rows(device, shapes):
    rows = []
    for M, K, N in shapes:
        flops = 2.0 * M * N * K
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5
        shape = f"{M}x{K}x{N}"
        t_bf16 = None
        if device.type == "cuda":
            t_bf16 = bench(lambda: F.linear(x, w), device)
            rows.append(_row(shape=shape, impl="cuBLAS bf16 (F.linear)", time_us=t_bf16 * 1e6,
                             tflops=flops / t_bf16 / 1e12, x_bf16=1.0, weight_mib=_mib(w)))
            xi = torch.randint(-128, 128, (M, K), device=device, dtype=torch.int8)
            wi = torch.randint(-128, 128, (N, K), device=device, dtype=torch.int8)
            try:
                t = bench(lambda: torch._int_mm(xi, wi.t()), device)
                rows.append(_row(shape=shape, impl="torch._int_mm int8", time_us=t * 1e6, tflops=flops / t / 1e12,
                                 x_bf16=t_bf16 / t, weight_mib=_mib(wi)))
            except RuntimeError as exc:
                print(f"torch._int_mm: {_why(exc)}")
            try:
                x8 = x.to(torch.float8_e4m3fn)
                w8 = w.to(torch.float8_e4m3fn)
                one = torch.ones((), device=device)
                t = bench(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                          device)
                rows.append(_row(shape=shape, impl="torch._scaled_mm fp8", time_us=t * 1e6, tflops=flops / t / 1e12,
                                 x_bf16=t_bf16 / t, weight_mib=_mib(w8)))
            except (RuntimeError, TypeError) as exc:
                print(f"torch._scaled_mm: {_why(exc)}")
        for fmt in ("int4", "int8", "fp8"):
            g = GROUP[fmt] or K
            qa, sa, _ = Q.quantize(x, fmt, g, backend="torch" if device.type == "cpu" else None)
            qw, sw, _ = Q.quantize(w, fmt, g, backend="torch" if device.type == "cpu" else None)
            gemm = dict(fmt=fmt, group_size=g, out_dtype=torch.bfloat16, check=False)
            for b in _backends(device):  # (a failure is reported and skipped: fp8 needs sm_89+)
                _timed_row(rows, device, shape, f"pydiff {fmt} g{g} ({b})", flops, t_bf16, _mib(qw, sw),
                           lambda: Q.quant_gemm(qa, sa, qw, sw, backend=b, **gemm))
            if fmt == "int4" and device.type == "cuda" and "triton" in _backends(device):
                # the same Triton kernel on the fp16 / fp8 tensor cores (i4dot; see triton_kernels/quant.py)
                from pydiff.triton_kernels.quant import quant_gemm_triton

                # (64x256 with 8 warps at ~200 registers a thread, the Hopper tile before 2026-11-27, fits
                # one CTA per SM, whose two warpgroups meet at a barrier every group: their MMAs and folds
                # run in step; 64x128 with 4 warps, the Hopper default since, fits two independent CTAs
                # per SM, so one's fold can run under the other's MMA.  The plain "(triton)" row above
                # is the default: i4dot 3 at 64x128 on Hopper)
                one, two = dict(BM=64, BN=256, num_warps=8, num_stages=3), dict(BM=64, BN=128, num_warps=4, num_stages=3)
                for mode, name, tile in ((1, "fp16, 64x256 tiles", one), (2, "fp8 e4m3, 64x256 tiles", one),
                                         (3, "fp8 e4m3, SWAR, 64x256 tiles", one),
                                         (2, "fp8 e4m3, 64x128 tiles, 2 CTAs/SM", two),
                                         (3, "fp8 e4m3, SWAR, 64x128 tiles, 2 CTAs/SM", two)):
                    _timed_row(rows, device, shape, f"pydiff {fmt} g{g} (triton, {name} tensor cores)", flops, t_bf16,
                               _mib(qw, sw),
                               lambda: quant_gemm_triton(qa, sa, qw, sw, None, None, None, fmt, g, torch.bfloat16,
                                                         _config={"i4dot": mode, **tile}))
            if fmt == "int4" and _wgmma_available(device):
                for mode, name in (("1", "wgmma f16 tensor cores"), ("2", "wgmma f16, swizzled tiles")):
                    _timed_row(rows, device, shape, f"pydiff {fmt} g{g} (cuda, {name})", flops, t_bf16, _mib(qw, sw),
                               lambda: Q.quant_gemm(qa, sa, qw, sw, backend="cuda", **gemm), mode)
            if fmt in ("int4", "int8") and device.type == "cuda" and "triton" in _backends(device) and g < K:
                # precision="fast": fp16 operands, one accumulation over K (not the exact group sums)
                _timed_row(rows, device, shape, f"pydiff {fmt} g{g} (triton, precision fast)", flops, t_bf16,
                           _mib(qw, sw),
                           lambda: Q.quant_gemm(qa, sa, qw, sw, backend="triton", precision="fast", **gemm))
        if os.environ.get("PYDIFF_QUANT_DIAG") == "1" and device.type == "cuda":
            rows += _diag_rows(x, w, shape, flops, t_bf16, device)
    return rows


def _timed_row(rows, device, shape, impl, flops, t_bf16, weight_mib, fn, wgmma_mode=None):
    """Time ``fn`` (with PYDIFF_CUDA_WGMMA=wgmma_mode when given) and append its GEMM row; a failure
    is printed and skipped (a path this GPU or build lacks)."""
    try:
        with (_wgmma_on(wgmma_mode) if wgmma_mode else contextlib.nullcontext()):
            t = bench(fn, device)
    except Exception as exc:  # noqa: BLE001
        print(f"{impl}: {_why(exc)}")
        return
    rows.append(_row(shape=shape, impl=impl, time_us=t * 1e6, tflops=flops / t / 1e12,
                     x_bf16=(t_bf16 / t) if t_bf16 else None, weight_mib=weight_mib))


def _diag_rows(x, w, shape, flops, t_bf16, device):
    """What the per-group fold costs (PYDIFF_QUANT_DIAG=1): the exact GEMMs with one group per row
    (no fold but at the end) next to int8 in groups of 64 (a fold every 64 channels, no unpacking)."""
    K = x.shape[1]
    out = []
    for fmt, g in (("int4", K), ("int8", 64)):
        qa, sa, _ = Q.quantize(x, fmt, g)
        qw, sw, _ = Q.quantize(w, fmt, g)
        cases = [("triton", None), ("cuda", None)]
        if fmt == "int4" and _wgmma_available(device):
            cases += [("cuda", "1"), ("cuda", "2")]
        for b, mode in cases:
            name = f"{b}, wgmma layout {mode}" if mode else b
            _timed_row(out, device, shape, f"diag: pydiff {fmt} g{g} ({name})", flops, t_bf16, None,
                       lambda: Q.quant_gemm(qa, sa, qw, sw, fmt=fmt, group_size=g, out_dtype=torch.bfloat16,
                                            backend=b, check=False), mode)
    return out


def _wgmma_available(device) -> bool:
    """The Hopper warpgroup-MMA W4A4 kernel (opt-in, PYDIFF_CUDA_WGMMA=1) can run here."""
    return (device.type == "cuda" and "cuda" in _backends(device) and torch.cuda.get_device_capability(device) == (9, 0)
            and "9.0a" in pydiff.build_info()["cuda_archs"])


@contextlib.contextmanager
def _wgmma_on(mode: str = "1"):
    """PYDIFF_CUDA_WGMMA=mode for a block (the CUDA quant_gemm reads it on every call; 1: the
    no-swizzle tiles, 2: the 128-byte swizzled ones)."""
    old = os.environ.get("PYDIFF_CUDA_WGMMA")
    os.environ["PYDIFF_CUDA_WGMMA"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYDIFF_CUDA_WGMMA", None)
        else:
            os.environ["PYDIFF_CUDA_WGMMA"] = old


def _quantize_eager(x, g=64):
    M, K = x.shape
    y = x.float().reshape(M, K // g, g)
    s = y.abs().amax(dim=2, keepdim=True) / 7.0
    q = torch.round(y / s.clamp_min(1e-30)).clamp(-8, 7).to(torch.int8).reshape(M, K)
    packed = ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    return packed, s.reshape(M, K // g)


def quantize_rows(device, shapes, bw, compile_baseline=True):
    rows = []
    for M, K, _ in shapes:
        if (M, K) in {(r["M"], r["K"]) for r in rows}:
            continue
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        nbytes = M * K * 2 + M * K // 2 + M * (K // 64) * 4
        floor = nbytes / bw
        base = dict(M=M, K=K, shape=f"{M}x{K} bf16 -> int4 g64", floor_us=floor * 1e6)
        impls = [("eager torch", lambda: _quantize_eager(x))]
        if compile_baseline:
            comp = torch.compile(_quantize_eager)
            impls.append(("torch.compile", lambda: comp(x)))
        for b in _backends(device):
            impls.append((f"pydiff ({b})", lambda b=b: Q.quantize(x, "int4", 64, backend=b, check=False)))
        for name, fn in impls:
            try:
                t = bench(fn, device)
            except Exception as exc:  # noqa: BLE001
                print(f"quantize {name}: {_why(exc)}")
                continue
            rows.append(dict(base, impl=name, time_us=t * 1e6, gbps=nbytes / t / 1e9, x_floor=t / floor))
    for r in rows:
        r.pop("M"), r.pop("K")
    return rows


def linear_rows(device, shapes, mlp_shapes=()):
    """quantize + GEMM (a W4A4 layer) vs bf16 F.linear; and with the LayerNorm/adaLN prologue fused;
    and the MLP fc1 + GELU + fc2 with the GELU and fc2's quantization fused into fc1's GEMM."""
    rows = []
    for M, K, N in shapes:
        B = 4
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5
        shift = 0.1 * torch.randn(B, K, device=device, dtype=torch.bfloat16)
        scale = 0.1 * torch.randn(B, K, device=device, dtype=torch.bfloat16)
        shape = f"{M}x{K}x{N}"
        qw, sw, _ = Q.quantize(w, "int4", 64, backend="torch" if device.type == "cpu" else None)
        ld = torch.randn(K, RANK, device=device, dtype=torch.bfloat16) / K**0.5  # the rank-32 branch
        lu = torch.randn(RANK, N, device=device, dtype=torch.bfloat16) / RANK**0.5

        def bf16_linear():
            return F.linear(x, w)

        def bf16_adaln():
            h = F.layer_norm(x, (K,), eps=1e-6).view(B, M // B, K)
            h = h * (1 + scale[:, None]) + shift[:, None]
            return F.linear(h.view(M, K), w)

        adaln = dict(prologue="layernorm", shift=shift, scale=scale)
        variants = list(_backends(device)) + (["cuda wgmma"] if _wgmma_available(device) else []) \
            + (["triton fast"] if device.type == "cuda" and "triton" in _backends(device) else [])
        for b in variants:
            def w4a4(b, rank, pro):
                # wgmma / fast: the default quantizer; fast: quant_gemm(precision="fast") on Triton
                qb, gb = {"cuda wgmma": (None, "cuda"), "triton fast": (None, "triton")}.get(b, (b, b))
                qa, sa, la = Q.quantize(x, "int4", 64, lora_down=ld if rank else None, backend=qb, check=False, **pro)
                lora = dict(lora_act=la, lora_up=lu) if rank else {}
                with (_wgmma_on() if b == "cuda wgmma" else contextlib.nullcontext()):
                    return Q.quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=64, out_dtype=torch.bfloat16,
                                        backend=gb, check=False, precision="fast" if b == "triton fast" else "exact",
                                        **lora)

            for case, rank, pro, theirs, theirs_name in (
                    ("linear", RANK, {}, bf16_linear, "bf16 F.linear"),
                    ("linear", 0, {}, bf16_linear, "bf16 F.linear"),
                    ("adaLN + linear", RANK, adaln, bf16_adaln, "bf16 LayerNorm + modulate + F.linear"),
                    ("adaLN + linear", 0, adaln, bf16_adaln, "bf16 LayerNorm + modulate + F.linear")):
                try:
                    t_ours = bench(lambda: w4a4(b, rank, pro), device)
                    t_base = bench(theirs, device)
                except Exception as exc:  # noqa: BLE001
                    print(f"{case} rank {rank} {b}: {_why(exc)}")
                    continue
                rows.append(dict(shape=shape, case=case, impl=f"pydiff W4A4 rank {rank} ({b})", time_us=t_ours * 1e6,
                                 baseline=theirs_name, baseline_us=t_base * 1e6, speedup=t_base / t_ours))
        rows += _linear_part_rows(device, shape, x, w, qw, sw, ld, lu)
    for M, D, H in mlp_shapes:
        rows += _mlp_rows(device, M, D, H)
    return rows


def _linear_part_rows(device, shape, x, w, qw, sw, ld, lu):
    """``case="linear parts"``: the W4A4 linear's two kernels timed apart, each with and without the
    rank-32 branch (the quantizer's fused down-projection ``x @ lora_down``, the GEMM epilogue's
    ``lora_act @ lora_up``), so the branch's cost is located without a profiler: on an H200 (11-27)
    the whole linear took ~80 us more at rank 32 than at rank 0.  Next to each part, bf16
    ``F.linear`` as the common baseline."""
    rows = []
    try:
        t_base = bench(lambda: F.linear(x, w), device)
    except Exception as exc:  # noqa: BLE001
        print(f"linear parts: {_why(exc)}")
        return rows
    for b in _backends(device):
        try:
            qa, sa, la = Q.quantize(x, "int4", 64, lora_down=ld, backend=b, check=False)
            parts = {
                "quantize": lambda: Q.quantize(x, "int4", 64, backend=b, check=False),
                f"quantize + lora_down (rank {RANK})": lambda: Q.quantize(x, "int4", 64, lora_down=ld, backend=b,
                                                                          check=False),
                "quant_gemm": lambda: Q.quant_gemm(qa, sa, qw, sw, fmt="int4", group_size=64,
                                                   out_dtype=torch.bfloat16, backend=b, check=False),
                f"quant_gemm + lora_up (rank {RANK})": lambda: Q.quant_gemm(
                    qa, sa, qw, sw, fmt="int4", group_size=64, out_dtype=torch.bfloat16, backend=b, check=False,
                    lora_act=la, lora_up=lu),
            }
            for name, fn in parts.items():
                t = bench(fn, device)
                rows.append(dict(shape=shape, case="linear parts", impl=f"{name} ({b})", time_us=t * 1e6,
                                 baseline="bf16 F.linear", baseline_us=t_base * 1e6, speedup=t_base / t))
        except Exception as exc:  # noqa: BLE001
            print(f"linear parts {b}: {_why(exc)}")
    return rows


def _mlp_rows(device, M, D, H):
    """``fc2(GELU_tanh(fc1(x)))``, x [M, D] bf16, fc1 D -> H, fc2 H -> D, both with bias."""
    rows = []
    x = torch.randn(M, D, device=device, dtype=torch.bfloat16)
    w1 = torch.randn(H, D, device=device, dtype=torch.bfloat16) / D**0.5
    w2 = torch.randn(D, H, device=device, dtype=torch.bfloat16) / H**0.5
    b1 = 0.1 * torch.randn(H, device=device, dtype=torch.bfloat16)
    b2 = 0.1 * torch.randn(D, device=device, dtype=torch.bfloat16)
    ref_backend = "torch" if device.type == "cpu" else None
    qw1, sw1, _ = Q.quantize(w1, "int4", 64, backend=ref_backend)
    qw2, sw2, _ = Q.quantize(w2, "int4", 64, backend=ref_backend)
    shape = f"{M}x{D}->{H}->{D}"
    flops = 4.0 * M * D * H

    def bf16_mlp():
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    try:
        t_base = bench(bf16_mlp, device)
    except Exception as exc:  # noqa: BLE001
        print(f"MLP bf16: {_why(exc)}")
        return rows
    hidden_bf16 = M * H * 2 / 2**20
    hidden_int4 = (M * H // 2 + M * (H // 64) * 4) / 2**20
    rows.append(dict(shape=shape, case="MLP fc1+GELU+fc2", impl="bf16 F.linear + F.gelu + F.linear",
                     time_us=t_base * 1e6, tflops=flops / t_base / 1e12, baseline="-", speedup=1.0,
                     hidden_mib=hidden_bf16))
    # the rank-32 SVDQuant branches of fc1 (down [D, R], up [R, H]) and fc2 (down [H, R], up [R, D]), bf16
    ld1 = torch.randn(D, RANK, device=device, dtype=torch.bfloat16) / D**0.5
    lu1 = torch.randn(RANK, H, device=device, dtype=torch.bfloat16) / RANK**0.5
    ld2 = torch.randn(H, RANK, device=device, dtype=torch.bfloat16) / H**0.5
    lu2 = torch.randn(RANK, D, device=device, dtype=torch.bfloat16) / RANK**0.5
    for b in _backends(device):
        def fused(b, rank):
            qa, sa, la1 = Q.quantize(x, "int4", 64, lora_down=ld1 if rank else None, backend=b, check=False)
            l1 = dict(lora_act=la1, lora_up=lu1) if rank else {}
            qh, sh, la2 = Q.quant_gemm_quant(qa, sa, qw1, sw1, fmt="int4", group_size=64, bias=b1, epilogue="gelu_tanh",
                                             lora_down=ld2 if rank else None, out_fmt="int4", out_group_size=64,
                                             backend=b, check=False, **l1)
            l2 = dict(lora_act=la2, lora_up=lu2) if rank else {}
            return Q.quant_gemm(qh, sh, qw2, sw2, fmt="int4", group_size=64, bias=b2, out_dtype=torch.bfloat16,
                                backend=b, check=False, **l2)

        def unfused(b, rank):
            qa, sa, la1 = Q.quantize(x, "int4", 64, lora_down=ld1 if rank else None, backend=b, check=False)
            l1 = dict(lora_act=la1, lora_up=lu1) if rank else {}
            h = Q.quant_gemm(qa, sa, qw1, sw1, fmt="int4", group_size=64, bias=b1, out_dtype=torch.bfloat16,
                             backend=b, check=False, **l1)
            qh, sh, la2 = Q.quantize(h, "int4", 64, prologue="gelu_tanh", lora_down=ld2 if rank else None, backend=b,
                                     check=False)
            l2 = dict(lora_act=la2, lora_up=lu2) if rank else {}
            return Q.quant_gemm(qh, sh, qw2, sw2, fmt="int4", group_size=64, bias=b2, out_dtype=torch.bfloat16,
                                backend=b, check=False, **l2)

        for rank in (RANK, 0):
            hid_lora = M * rank * 4 / 2**20  # fp32 lora_act of fc2's branch
            for impl, fn, hid in ((f"pydiff W4A4 rank {rank}, GELU + quantize in fc1's epilogue ({b})", fused,
                                   hidden_int4 + hid_lora),
                                  (f"pydiff W4A4 rank {rank} unfused: fc1 bf16 out, quantize(gelu) ({b})", unfused,
                                   hidden_bf16 + hidden_int4 + hid_lora)):
                try:
                    t = bench(lambda: fn(b, rank), device)
                except Exception as exc:  # noqa: BLE001
                    print(f"MLP {impl}: {_why(exc)}")
                    continue
                rows.append(dict(shape=shape, case="MLP fc1+GELU+fc2", impl=impl, time_us=t * 1e6,
                                 tflops=flops / t / 1e12, baseline="bf16 F.linear + F.gelu + F.linear",
                                 baseline_us=t_base * 1e6, speedup=t_base / t, hidden_mib=hid))
    return rows


def rows(device: torch.device, quick: bool = False, bw=None, out=None):
    """Rows of the three tables, appended to ``out`` table by table (a run stopped at its time limit
    keeps the finished tables)."""
    out = [] if out is None else out
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    mlp_shapes = MLP_QUICK_SHAPES if quick else (MLP_GPU_SHAPES if device.type == "cuda" else MLP_CPU_SHAPES)
    # a subset for a short GPU session: PYDIFF_QUANT_TABLES="gemm,linear" (of gemm, quantize, linear, mlp),
    # PYDIFF_QUANT_SHAPES=1 (the first n shapes)
    tables = os.environ.get("PYDIFF_QUANT_TABLES", "gemm,quantize,linear,mlp").split(",")
    n = int(os.environ.get("PYDIFF_QUANT_SHAPES", "0") or 0)
    shapes = shapes[:n] if n > 0 else shapes
    mlp_shapes = mlp_shapes if "mlp" in tables else []
    bw = bw or copy_bandwidth(device, (64 << 20) if device.type == "cpu" else (512 << 20))
    if "gemm" in tables:
        out += [dict(r, part="gemm") for r in gemm_rows(device, shapes)]
    if "quantize" in tables:
        out += [dict(r, part="quantize") for r in quantize_rows(device, shapes, bw, compile_baseline=not quick)]
    if "linear" in tables or mlp_shapes:
        out += [dict(r, part="linear") for r in linear_rows(device, shapes if "linear" in tables else [], mlp_shapes)]
    return out


def _print(rs):
    for part in dict.fromkeys(r["part"] for r in rs):
        sub = [r for r in rs if r["part"] == part]
        cols = list(dict.fromkeys(k for r in sub for k in r if k != "part"))
        print(f"\n## quant: {part}")
        print("  ".join(cols))
        for r in sub:
            print("  ".join(f"{r.get(c, '-'):.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"# pydiff quant bench on {device_name(device)}, torch {torch.__version__}")
    _print(rows(device, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
