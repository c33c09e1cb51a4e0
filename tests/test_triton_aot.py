"""The GPU compile path of the solver, sampling and invertible Triton kernels, checked without a GPU.

CI runs the Triton kernels in Triton's interpreter, which checks their arithmetic but not that the
compiler accepts them as they are launched (constexpr branches, dtypes, block shapes).  Here each
launcher runs on CPU tensors with its kernels' launches intercepted; every launch is compiled ahead
of time for the H100/H200 (sm_90a) and for Ampere (sm_80) with the specialisations the JIT would
use, assembled by Triton's bundled ptxas, and checked for register spills.  (The quant kernels'
equivalent lives in tests/test_quant_triton.py and tests/test_quant_fused.py.)
"""
import pytest
from _aot import ptxas_path, run_script

_SCRIPT = r"""
import json, sys
import torch, triton
from _aot import assemble
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from pydiff.triton_kernels import invertible as ti, sampling as tsm, solver as ts

TT = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
      torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
      torch.bool: "i1"}


def capture(module, call):
    rec = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: rec.append((self.fn, args, kw))

    saved = {n: o for n, o in vars(module).items() if isinstance(o, JITFunction)}
    for n, o in saved.items():
        setattr(module, n, Recorder(o))
    try:
        call()
    finally:
        for n, o in saved.items():
            setattr(module, n, o)
    return rec


def compile_launch(fn, args, kw, cap):
    # the JIT's specialisation: pointers 16-byte aligned, ints divisible by 16, ints equal to 1
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    bound = dict(zip(fn.arg_names, args), **kw)
    sig, attrs, const = {}, {}, {}
    for i, p in enumerate(fn.params):
        a = bound[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", a
        elif isinstance(a, torch.Tensor):
            sig[p.name] = "*" + TT[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[p.name] = "fp32"
        elif int(a) == 1:
            sig[p.name], const[p.name] = "constexpr", 1
        else:
            sig[p.name] = "i64" if abs(int(a)) >= 2 ** 31 else "i32"
            if int(a) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32),
                       options=dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3)))
    res = assemble(k, cap)
    res.pop("ptx")
    return res


g = torch.Generator().manual_seed(0)
rnd = lambda *s, dt=torch.float32: torch.randn(*s, generator=g).to(dt)  # noqa: E731
cases = {}


def solver(dt, k, noise, rs, clip, stats):
    shape = (3, 4, 9, 11)
    x, c, u = rnd(*shape, dt=dt), rnd(*shape, dt=dt), rnd(*shape, dt=dt)
    hist = [rnd(*shape, dt=dt) for _ in range(k)]
    co = [0.1] * ts.num_coeffs(k)
    st = torch.zeros((2,) + shape, dtype=torch.float64) if stats else None
    ts.solver_step_triton(x, c, u, hist, rnd(*shape, dt=dt) if noise else None, torch.rand(3) if rs else None, co,
                          None, None, -1.0 if clip else 0.0, 1.0 if clip else 0.0, True, x0_stats=st)


for dt in (torch.float32, torch.float16, torch.bfloat16):
    cases[f"solver_{dt}_k1_cfg"] = (ts, lambda dt=dt: solver(dt, 1, False, False, False, False))
cases["solver_k3_noise_rs_clip_stats"] = (ts, lambda: solver(torch.float32, 3, True, True, True, True))
cases["solver_k0"] = (ts, lambda: solver(torch.bfloat16, 0, True, False, False, False))
cases["cfg_rescale"] = (ts, lambda: ts.cfg_rescale_triton(rnd(2, 3, 17), rnd(2, 3, 17), 7.5, 0.7))
for dt in (torch.float32, torch.bfloat16, torch.float16):
    cases[f"sampling_{dt}"] = (tsm, lambda dt=dt: tsm.sample_categorical_triton(
        rnd(4, 126464, dt=dt), None, None, torch.arange(4), torch.zeros(4, dtype=torch.int64), 1.0))
cases["sampling_lean_bf16"] = (tsm, lambda: tsm.sample_categorical_triton(
    rnd(4, 126464, dt=torch.bfloat16), None, None, torch.arange(4), torch.zeros(4, dtype=torch.int64), 1.0,
    want_stats=False))
cases["sampling_topk_mask_argmax"] = (tsm, lambda: tsm.sample_categorical_triton(
    rnd(5, 1001), rnd(5), torch.ones(5, dtype=torch.bool), torch.arange(5), torch.zeros(5, dtype=torch.int64), 0.0))
cases["coupling_fp32"] = (ti, lambda: ti.coupling_update_triton(rnd(1000), rnd(1000), 1.0, 0.5))
cases["coupling_f64_state"] = (ti, lambda: ti.coupling_update_triton(rnd(1000, dt=torch.float64), rnd(1000), 1.0, 0.5))
cases["coupling_fixed"] = (ti, lambda: ti.coupling_update_fixed_triton(
    torch.randint(-2**40, 2**40, (1000,), generator=g), rnd(1000), 1.0, 24))
# (N, C, H, W, groups): odd H*W, and H*W = 1024 = the block (one channel per block: scalar weight loads)
for tag, (N, C, H, W, G) in (("", (2, 64, 9, 9, 32)), ("aligned_", (1, 8, 32, 32, 4))):
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        sdt = torch.float32 if dt != torch.float64 else dt
        cases[f"groupnorm_silu_{tag}{dt}"] = (ti, lambda dt=dt, s=(N, C, H, W), G=G: ti.groupnorm_silu_triton(
            rnd(*s, dt=dt), rnd(s[1], dt=dt), rnd(s[1], dt=dt), G, 1e-5))
        cases[f"groupnorm_silu_bwd_{tag}{dt}"] = (ti, lambda dt=dt, s=(N, C, H, W), G=G, sdt=sdt:
                                                  ti.groupnorm_silu_backward_triton(
            rnd(*s, dt=dt), rnd(*s, dt=dt), rnd(s[1], dt=dt), rnd(s[1], dt=dt), rnd(s[0], G, dt=sdt),
            rnd(s[0], G, dt=sdt).abs(), G, [True, True, True]))

res = {}
for name, (mod, call) in cases.items():
    launches = capture(mod, call)
    for j, (fn, args, kw) in enumerate(launches):
        for cap in ((9, 0), (8, 0)) if name.endswith(("fp32", "float32_k1_cfg", "float32")) else ((9, 0),):
            key = f"{name}/{fn.__name__}/sm{cap[0]}{cap[1]}"
            res[key] = compile_launch(fn, args, dict(kw), cap)
json.dump(res, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    return run_script(_SCRIPT)


@pytest.mark.skipif(ptxas_path() is None, reason="no ptxas to compile the GPU kernels")
def test_every_launch_compiles_for_sm90a_and_sm80_without_spills(compiled):
    kernels = {k.split("/")[1] for k in compiled}
    # every Triton kernel of the three families was launched by some case
    assert kernels == {"_solver_step_kernel", "_rescale_partial_kernel", "_partial_kernel", "_select_kernel",
                       "_coupling_kernel", "_fixed_kernel", "_gn_stats_kernel", "_gn_apply_kernel",
                       "_gn_bwd_reduce_kernel", "_gn_bwd_dx_kernel"}, kernels
    assert any(k.endswith("sm80") for k in compiled)
    bad = {k: v for k, v in compiled.items() if v["spills"] or v["shared"] > 99 * 1024}
    assert not bad, f"register spills or > 99 KB shared memory: {bad}"
