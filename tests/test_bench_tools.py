"""The GPU-check tools run on the CPU too: the quant-GEMM tile sweep (bench/tune_quant.py) in the
Triton interpreter, where every tile's output must equal the default tile's bit for bit, and the
targets summary (bench/summary.py) on rows shaped like bench/run.py's."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import summary  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU smoke run of the sweep needs Triton's interpreter")
def test_tune_quant_quick_tiles_agree(tmp_path, capsys):
    pytest.importorskip("triton")
    import tune_quant

    out = tmp_path / "tune.json"
    assert tune_quant.main(["--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MISMATCH" not in text and "best tile per shape" in text
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {r["fmt"] for r in rows} == {"int4", "int8", "fp8"}
    assert all(r.get("equal") for r in rows if "time_us" in r) and len(rows) >= 6


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU smoke run of the sweep needs Triton's interpreter")
def test_tune_quant_quick_fast_tiles_agree(tmp_path, capsys):
    """--fast: the precision="fast" GEMM's candidate tile (a k-step over two groups, unrolled) agrees
    with the default tile within 2^-12 of the output's largest value, int4 and int8 in groups of 64."""
    pytest.importorskip("triton")
    import json

    import tune_quant

    out = tmp_path / "tune_fast.json"
    assert tune_quant.main(["--quick", "--fast", "--fmts", "int4,int8", "--out", str(out)]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["fmt"] for r in rows} == {"int4", "int8"} and len(rows) == 4
    assert all(r.get("equal") for r in rows) and any("unroll=2" in r["config"] for r in rows)
    assert tune_quant.GROUP["int8"] is None  # the module's table is left as it was


def _rows(x_floor, call_us, x_amax, gemm_us, fp8_us, mem_frac, x_plain):
    return [
        dict(part="kernel", shape="1x16x21x90x160", config="dpmpp2m_cfg", impl="pydiff[cuda]", x_floor=x_floor),
        dict(part="kernel", shape="4x4x128x128", config="dpmpp2m_cfg", impl="pydiff[cuda]", call_us=call_us),
        dict(part="sampling", shape="4096x126464", impl="pydiff[cuda]", x_amax=x_amax),
        dict(part="quant", sub="gemm", shape="4096x3072x3072", impl="torch._scaled_mm fp8", time_us=fp8_us),
        dict(part="quant", sub="gemm", shape="4096x3072x3072", impl="pydiff int4 g64 (cuda)", time_us=gemm_us,
             tflops=1000.0),
        dict(part="invertible", shape="8x256x64x64", depth=16, method="reversible", mem_frac=mem_frac,
             x_plain=x_plain),
    ]


def _marks(lines, needle):
    return [ln.rsplit(None, 1)[-1] if not ln.endswith("not met") else "not met" for ln in lines if needle in ln]


def test_summary_marks_met_and_missed_targets():
    good = summary.targets(_rows(1.1, 8.0, 0.9, 50.0, 60.0, 0.05, 1.1))
    bad = summary.targets(_rows(1.3, 12.0, 1.2, 70.0, 60.0, 0.2, 1.3))
    for needle in ("1x16x21x90x160 pydiff[cuda]", "4x4x128x128 pydiff[cuda]", "4096x126464 bf16 pydiff[cuda]",
                   "4096x3072x3072 (cuda)", "reversible: memory", "reversible: time"):
        assert _marks(good, needle) == ["MET"], (needle, good)
        assert _marks(bad, needle) == ["not met"], (needle, bad)
    # absent rows are reported missing, never inferred
    assert _marks(good, "pydiff[triton]") and set(_marks(good, "pydiff[triton]")) == {"missing"}


def test_profile_stack_quick_breaks_down_each_method(capsys):
    """bench/profile_stack.py (the GPU session's profile of the invertible stack) runs on the CPU at
    the tiny size: every method profiled, operator times summed, the convolutions among the top."""
    import profile_stack

    assert profile_stack.main(["--quick", "--device", "cpu", "--depth", "2", "--top", "5"]) == 0
    text = capsys.readouterr().out
    for m in ("plain", "checkpoint", "coupling-plain", "reversible"):
        assert f"## {m}: wall" in text, m
    assert "convolution" in text


def test_overhead_quick_rows():
    """bench/overhead.py: one row per (op, implementation), positive per-call times, pydiff next to
    the eager baseline for every op."""
    import overhead

    rows = overhead.rows(torch.device("cpu"), quick=True)
    ops = {r["op"] for r in rows}
    assert len(ops) == 5 and all(r["us_per_call"] > 0 for r in rows)
    for op in ops:
        impls = {r["impl"] for r in rows if r["op"] == op}
        assert {"pydiff", "eager torch"} <= impls, (op, impls)


def test_tune_solver_sweep_runs_on_the_cpu_backend():
    """bench/tune_solver.py's sweep (a GPU tool) end to end on the CPU kernel, where the launch hook
    changes nothing: every row runs, is timed and compares equal to the default's output."""
    from pydiff import _ext

    if _ext._C is None or not _ext._C.built_with_cuda():
        pytest.skip("the launch hook exists in builds with the CUDA kernels")
    import tune_solver

    res = tune_solver.sweep(torch.device("cpu"), shape=(1, 3, 5, 7), steps=("dpmpp2m_cfg", "ddim_cfg"),
                            launches=[(0, 0), (128, 4), (64, 1)], backend="cpu")
    rows = res["rows"]
    assert len(rows) == 6 and all(r["bit_equal"] and r["time_us"] > 0 for r in rows)
    assert [(r["threads"], r["blocks_per_sm"]) for r in rows[:3]] == [(256, 64), (128, 4), (64, 1)]
    with pytest.raises(ValueError, match="threads in"):
        _ext._C.solver_cuda_launch(512, 0)
