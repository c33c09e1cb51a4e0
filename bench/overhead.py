"""Per-call overhead: what one call of each op costs when its tensors are tiny.

    python bench/run.py --only overhead

At these sizes the kernels take about a microsecond, so the time per call is the host path: the
Python wrapper, argument checks, the dispatcher, autograd bookkeeping and the launch.  In a
sampling loop or a training step with small tensors this is what an op costs, and on a GPU it is
the floor under ``call_us`` (the solver benchmark's back-to-back calls).  Each op is timed next to
the eager torch a user would write instead, same run, with calls issued back to back and one
synchronisation at the end (``_timing.call_time``).

Rows: ``op``, ``impl`` (``pydiff`` = the default path, backend ``auto`` and argument checks on;
``pydiff[check=False]``; ``eager torch``), ``us_per_call``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pydiff
from pydiff.sampling import sample_categorical
from pydiff.ops import invertible as inv

from _timing import call_time

SHAPE = (1, 8, 4, 4)  # 128 elements: the kernels are negligible, the host path is what is timed


def _cases(device):
    gen = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(s or SHAPE, device=device, generator=gen)  # noqa: E731
    x, u, c, h = mk(), mk(), mk(), mk()
    from solver import _coeffs, eager_step

    co = _coeffs(1, False)
    shape = "x".join(map(str, SHAPE))
    yield ("solver_step DPM++2M+CFG", shape, {
        "pydiff": lambda: pydiff.solver_step(x, c, u, [h], coeffs=co),
        "pydiff[check=False]": lambda: pydiff.solver_step(x, c, u, [h], coeffs=co, check=False),
        "eager torch": lambda: eager_step(x, u, c, [h], None, co.v, 1),
    })
    C = SHAPE[1]
    w = (torch.rand(C, device=device, generator=gen) + 0.5)
    b = torch.randn(C, device=device, generator=gen)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    yield ("groupnorm_silu fwd", shape, {
        "pydiff": no_grad(lambda: inv.groupnorm_silu(x, 4, w, b)),
        "pydiff[check=False]": no_grad(lambda: inv.groupnorm_silu(x, 4, w, b, check=False)),
        "eager torch": no_grad(lambda: F.silu(F.group_norm(x, 4, w, b))),
    })
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    dy = mk()

    def train(fwd, leaves):
        def run():
            fwd().backward(dy)
            for t in leaves:
                t.grad = None
        return run

    yield ("groupnorm_silu fwd+bwd", shape, {
        "pydiff": train(lambda: inv.groupnorm_silu(xg, 4, wg, bg), (xg, wg, bg)),
        "pydiff[check=False]": train(lambda: inv.groupnorm_silu(xg, 4, wg, bg, check=False), (xg, wg, bg)),
        "eager torch": train(lambda: F.silu(F.group_norm(xg, 4, wg, bg)), (xg, wg, bg)),
    })
    fg = mk().requires_grad_()
    yield ("coupling_update fwd+bwd", shape, {
        "pydiff": train(lambda: inv.coupling_update(xg, fg, 1.0, 1.0), (xg, fg)),
        "pydiff[check=False]": train(lambda: inv.coupling_update(xg, fg, 1.0, 1.0, check=False), (xg, fg)),
        "eager torch": train(lambda: xg + fg, (xg, fg)),
    })
    logits = torch.randn(4, 64, device=device, generator=gen)
    sgen = torch.Generator(device=device).manual_seed(1)
    yield ("sample_categorical", "4x64", {
        "pydiff": lambda: sample_categorical(logits, generator=sgen),
        "eager torch": lambda: torch.multinomial(torch.softmax(logits, -1), 1, generator=sgen),
    })


def rows(device, quick: bool = False, out=None) -> list:
    device = torch.device(device)
    res = out if out is not None else []
    calls = 200 if quick else 2000
    for op, shape, impls in _cases(device):
        for impl, fn in impls.items():
            fn()
            t = min(call_time(fn, device, calls=calls) for _ in range(1 if quick else 3))
            res.append(dict(op=op, shape=shape, impl=impl, us_per_call=t * 1e6))
    return res


if __name__ == "__main__":
    for r in rows(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        print(f"{r['op']:28s} {r['impl']:22s} {r['us_per_call']:8.1f} us")
