"""pydiff._C.solver_step_direct: the dispatcher-free call of the solver_step kernels.

It must give exactly what torch.ops.pydiff.solver_step gives (bits, exception types and messages),
and step aside (NotImplemented, then pydiff.solver_step goes through torch.ops) wherever the
dispatcher would do anything but call the CPU kernel: torch.compile, dispatch / function modes,
tensor subclasses, autograd, the profiler, odd argument types.
"""
import math
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pydiff
from pydiff.ops import solver as solver_mod
from pydiff.reference.solver import HEAD, ROW, num_coeffs

pytestmark = pytest.mark.skipif(solver_mod._direct is None, reason="needs the compiled extension")

direct = solver_mod._direct
op = torch.ops.pydiff.solver_step
track_op = torch.ops.pydiff.solver_step_track
INF = math.inf


def _coeffs(k, g, *, history_row=True):
    co = (torch.rand(num_coeffs(k), generator=g, dtype=torch.float64) * 3 - 1.5).tolist()
    if not history_row:
        base = len(HEAD) + len(ROW) + k
        co[base:] = [0.0] * (len(co) - base)
    return co


def _case(k, dtype, *, noise, rs, table, clip, history_row=True, shape=(3, 5, 7), seed=0):
    """Positional torch.ops arguments (write_history left None: the wrapper's default)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    x, c, u = mk(), mk(), mk()
    hist = [mk() for _ in range(k)]
    z = mk() if noise else None
    r = (torch.rand(shape[0], generator=g) + 0.5) if rs else None
    co = _coeffs(k, g, history_row=history_row)
    ct = st = None
    if table:
        ct = torch.tensor([co, _coeffs(k, g)], dtype=torch.float64)
        st = torch.tensor([1], dtype=torch.int64)
        co = []
    lo, hi = clip if clip else (-INF, INF)
    return [x, c, u, hist, z, r, co, ct, st, float(lo), float(hi), None]


def _resolved(args):
    """The args with write_history resolved as pydiff.solver_step does (for torch.ops)."""
    a = list(args)
    if a[11] is None:
        base = len(HEAD) + len(ROW) + len(a[3])
        a[11] = a[7] is not None or any(a[6][base:])
    return a


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
    assert a.requires_grad == b.requires_grad and a.is_inference() == b.is_inference()
    # bit-identical (NaNs included)
    assert torch.equal(a.view(torch.int8) if a.numel() else a, b.view(torch.int8) if b.numel() else b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("noise,rs,table,clip", [
    (False, False, False, None),
    (True, True, False, (-1.0, 0.5)),
    (True, False, True, None),
    (False, True, True, (-0.25, 2.0)),
])
@pytest.mark.parametrize("write_history", [None, True, False])
def test_direct_is_bit_identical_to_the_op(dtype, k, noise, rs, table, clip, write_history):
    for history_row in (True, False):
        args = _case(k, dtype, noise=noise, rs=rs, table=table, clip=clip, history_row=history_row,
                     seed=k * 7 + int(noise) + 2 * int(rs))
        args[11] = write_history
        got = direct(*args)
        assert got is not NotImplemented
        want = op(*_resolved(args))
        _same(got[0], want[0])
        _same(got[1], want[1])
        # and the public wrapper (which takes the direct path) agrees too
        x, c, u, hist, z, r, co, ct, st, lo, hi, _ = args
        for check in (True, False):
            out = pydiff.solver_step(x, c, u, hist, z, coeffs=co, coeff_table=ct, step=st, row_scale=r,
                                     clip=None if clip is None else (lo, hi), backend="cpu", check=check,
                                     write_history=write_history)
            _same(out[0], want[0])
            _same(out[1], want[1])


def test_direct_track_is_bit_identical_to_the_op():
    for k in range(4):
        args = _case(k, torch.float32, noise=True, rs=False, table=k % 2 == 1, clip=None, seed=k)
        args[11] = True
        s1 = torch.rand((2,) + tuple(args[0].shape), dtype=torch.float64)
        s2 = s1.clone()
        got = direct(*args, s1)
        assert got is not NotImplemented
        want = track_op(*args, s2)
        _same(got[0], want[0])
        _same(got[1], want[1])
        assert torch.equal(s1, s2)
        assert s1._version == s2._version  # neither path bumps it (the op's autograd fallback does not)


def test_direct_strided_and_inference_inputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, 10, generator=g)
    x = base[:, :, ::2]  # non-contiguous
    c = base.transpose(1, 2)[:, :5, :6].transpose(1, 2).contiguous()[:, :, :5]
    h = [torch.randn(4, 5, 6, generator=g).transpose(1, 2)]
    co = _coeffs(1, g)
    args = [x, c, None, h, None, None, co, None, None, -INF, INF, True]
    got = direct(*args)
    want = op(*args)
    _same(got[0], want[0])
    _same(got[1], want[1])
    with torch.inference_mode():
        got = direct(*args)
        want = op(*args)
    assert got[0].is_inference()
    _same(got[0], want[0])
    _same(got[1], want[1])


def _outcome(fn, args):
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return out


BAD = {
    "noise shape": lambda a: a.__setitem__(4, torch.zeros(3, 5)),
    "model_cond dtype": lambda a: a.__setitem__(1, a[1].half()),
    "history dtype": lambda a: a[3].__setitem__(0, a[3][0].double()),
    "x dtype": lambda a: [a.__setitem__(i, a[i].double()) for i in (0, 1, 2)] + [a.__setitem__(3, [h.double() for h in a[3]])],
    "x 0-d": lambda a: [a.__setitem__(i, None) for i in (1, 2)] + [a.__setitem__(0, torch.tensor(1.0)),
                                                                   a.__setitem__(3, [])],
    "too few coeffs": lambda a: a.__setitem__(6, a[6][:-1]),
    "too many coeffs": lambda a: a.__setitem__(6, a[6] + [0.0]),
    "non-finite coeff": lambda a: a[6].__setitem__(3, math.inf),
    "uncond without cond": lambda a: a.__setitem__(1, None),
    "row_scale dtype": lambda a: a.__setitem__(5, torch.ones(3, dtype=torch.float16)),
    "row_scale shape": lambda a: a.__setitem__(5, torch.ones(4)),
    "step without table": lambda a: a.__setitem__(8, torch.tensor([0])),
    "table and coeffs": lambda a: a.__setitem__(7, torch.zeros(2, len(a[6]), dtype=torch.float64)),
    "table shape": lambda a: [a.__setitem__(7, torch.zeros(2, 5, dtype=torch.float64)),
                              a.__setitem__(8, torch.tensor([0])), a.__setitem__(6, [])],
    "table without step": lambda a: [a.__setitem__(7, torch.zeros(2, len(a[6]), dtype=torch.float64)),
                                     a.__setitem__(6, [])],
    "clip nan": lambda a: a.__setitem__(9, math.nan),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_the_same_through_both_paths(case):
    args = _case(1, torch.float32, noise=True, rs=False, table=False, clip=None)
    args[11] = True
    BAD[case](args)
    want = _outcome(op, args)
    got = _outcome(direct, args)
    assert isinstance(want, tuple) and isinstance(want[0], type), want
    assert got == want


@pytest.mark.parametrize("case", ["history too long", "meta tensor", "int coeffs", "tensor coeff", "bad type",
                                  "write_history int", "clip int"])
def test_unusual_arguments_fall_back_to_the_dispatcher(case):
    args = _case(1, torch.float32, noise=True, rs=False, table=False, clip=None)
    args[11] = True
    if case == "history too long":
        args[3] = args[3] * 7
    elif case == "meta tensor":
        args[4] = args[4].to("meta")
    elif case == "int coeffs":
        args[6] = [int(v) for v in args[6]]
    elif case == "tensor coeff":
        args[6][0] = torch.tensor(1.0)
    elif case == "bad type":
        args[4] = "noise"
    elif case == "write_history int":
        args[11] = 1
    elif case == "clip int":
        args[9] = -1
    assert direct(*args) is NotImplemented
    # and the wrapper still behaves as the op does
    try:
        op(*args)
    except Exception:  # noqa: BLE001
        pass


def test_device_mismatch_falls_back_with_the_wrappers_error():
    x = torch.randn(2, 3)
    m = torch.randn(2, 3, device="meta")
    args = [x, m, None, [], None, None, [0.0] * num_coeffs(0), None, None, -INF, INF, True]
    assert direct(*args) is NotImplemented
    with pytest.raises(ValueError, match="model_cond: expected device cpu"):
        pydiff.solver_step(x, m, coeffs=args[6], backend="cpu")
    with pytest.raises(ValueError, match="model_cond: expected device cpu"):
        pydiff.solver_step(x, m, coeffs=args[6], backend="cpu", check=False)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _FnRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def spy(monkeypatch):
    """Records what pydiff.solver_step's direct call returned (NotImplemented = dispatcher path)."""
    seen = []

    def wrapped(*a):
        out = direct(*a)
        seen.append(out is not NotImplemented)
        return out

    monkeypatch.setattr(solver_mod, "_direct", wrapped)
    return seen


def _call(x, c, u, hist, **kw):
    co = _coeffs(len(hist), torch.Generator().manual_seed(1))
    return pydiff.solver_step(x, c, u, hist, coeffs=co, backend="cpu", **kw)


def _tensors(requires_grad=False):
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(2, 8, generator=g) for _ in range(4)]
    if requires_grad:
        ts[1].requires_grad_()
    return ts[0], ts[1], ts[2], [ts[3]]


def test_plain_call_takes_the_direct_path(spy):
    x, c, u, h = _tensors()
    _call(x, c, u, h)
    _call(x, c, u, h, check=False)
    with torch.no_grad():
        _call(x, c, u, h)
    with torch.inference_mode():
        _call(x, c, u, h)
    x0 = torch.zeros((2,) + tuple(x.shape), dtype=torch.float64)
    _call(x, c, u, h, x0_stats=x0)
    assert spy == [True] * 5


def test_dispatch_mode_sees_the_op(spy):
    x, c, u, h = _tensors()
    want = _call(x, c, u, h)
    with _Recorder() as rec:
        got = _call(x, c, u, h)
    assert "pydiff.solver_step.default" in rec.ops
    assert spy == [True, False]
    _same(got[0], want[0])


def test_torch_function_mode_sees_the_op(spy):
    x, c, u, h = _tensors()
    with _FnRecorder() as rec:
        _call(x, c, u, h)
    assert any("solver_step" in f for f in rec.funcs), rec.funcs
    assert spy == [False]


def test_tensor_subclass_goes_through_the_dispatcher(spy):
    class Sub(torch.Tensor):
        pass

    x, c, u, h = _tensors()
    _call(x.as_subclass(Sub), c, u, h)
    _call(x, c, u, [h[0].as_subclass(Sub)])
    _call(x, torch.nn.Parameter(c, requires_grad=False), u, h)
    assert spy == [False, False, False]


def test_negative_view_goes_through_the_dispatcher(spy):
    x, c, u, h = _tensors()
    got = _call(x, c._neg_view(), u, h)
    want = _call(x, -c, u, h)
    assert spy == [False, True]
    _same(got[0], want[0])


def test_requires_grad_keeps_the_dispatcher_behaviour(spy):
    x, c, u, h = _tensors(requires_grad=True)
    out = _call(x, c, u, h)
    assert spy == [False]
    assert out[0].requires_grad and out[0].grad_fn is not None  # the autograd fallback's grad_fn
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out[0].sum().backward()
    assert any("autograd kernel was not registered" in str(m.message) for m in w)
    with torch.no_grad():
        out = _call(x, c, u, h)
    assert spy == [False, True] and not out[0].requires_grad


def test_autocast_takes_the_direct_path_with_the_same_result(spy):
    x, c, u, h = _tensors()
    want = _call(x, c, u, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _call(x, c, u, h)
    assert spy == [True, True]  # the op has no autocast rule: both paths run it in float32
    _same(got[0], want[0])


def test_profiler_records_the_op(spy):
    x, c, u, h = _tensors()
    with torch.autograd.profiler.profile() as prof:
        _call(x, c, u, h)
    assert spy == [False]
    assert any(e.name == "pydiff::solver_step" for e in prof.function_events)


def test_torch_compile_uses_the_op(spy):
    x, c, u, h = _tensors()
    co = _coeffs(1, torch.Generator().manual_seed(1))

    def step(x, c, u, h0):
        return pydiff.solver_step(x, c, u, [h0], coeffs=co, backend="cpu")

    torch._dynamo.reset()
    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = fn(x, c, u, h[0])
    want = op(x, c, u, h, None, None, co, None, None, -INF, INF, True)
    _same(got[0], want[0])
    _same(got[1], want[1])
    assert spy == []  # traced through torch.ops, never called directly
    torch._dynamo.reset()


def test_torch_compile_graph_contains_the_op():
    x, c, u, h = _tensors()
    co = _coeffs(1, torch.Generator().manual_seed(1))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    fn = torch.compile(lambda x, c, u, h0: pydiff.solver_step(x, c, u, [h0], coeffs=co, backend="cpu"),
                       backend=backend, fullgraph=True)
    fn(x, c, u, h[0])
    assert graphs and "pydiff.solver_step" in str(graphs[0].graph)
    torch._dynamo.reset()
