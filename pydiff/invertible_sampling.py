"""Backpropagation through a whole deterministic sampling chain with memory independent of its length.

IDM's first level (Chen et al. 2024, "Invertible Diffusion Models for Compressed Sensing"): a
deterministic sampler is a chain of invertible maps, so training through N steps need not keep N
activations.  The forward runs without autograd and keeps only the final state; the backward
rebuilds each step's input from its output, re-evaluates the model on it with autograd on, and
backpropagates through that one step before moving to the previous one.  Activation memory is one
model evaluation's plus the state, whatever N is (tested with saved-tensor hooks); gradients w.r.t.
the initial noise, the model's parameters and any conditioning tensors equal plain autograd's.

Two chains, with coefficients taken from pydiff's steppers:

* :func:`ddim_sample` — DDIM with ``eta = 0`` (:class:`pydiff.solvers.DDIMSolver`, which must have
  ``clip_sample=False``: a clamp is not invertible).  A step is ``x' = A x + M m(x, t)`` (``m`` the
  model output; epsilon, v or sample prediction are folded into ``A`` and ``M``).  Its inverse is
  implicit, ``x = (x' - M m(x, t)) / A``, and is solved by ``inverse_iters`` fixed-point iterations
  starting from ``x'``; they converge when ``|M / A| * Lip(m) < 1`` (geometrically, at that rate).
  So DDIM's inverse is **approximate**: the iteration stops improving at the model's rounding
  noise (an fp32 model's output moves when its input moves by one ulp), ~3e-7 relative per step for
  the tests' fp32 model, which leaves gradients ~5e-6 from plain autograd's; with a float64 model
  it converges to ~1e-15 and the gradients match to ~1e-14.  Each backward step costs
  ``inverse_iters + 1`` model evaluations.
* :func:`idm_ddim_stack` — IDM's own form: every DDIM step wrapped in IDM's scaled coupling
  (``y1 = (1 - v) step(x1) + v x2, y2 = x1`` with a learnable ``v`` per step) on a doubled state, a
  :class:`pydiff.nn.ReversibleSequential` whose inverse is exact and costs one model evaluation.
  It is a different (trainable) sampler than plain DDIM; ``v -> 0`` recovers DDIM but not its
  invertibility.
* :func:`edict_sample` — EDICT (Wallace et al. 2022; :class:`pydiff.solvers.EDICTSolver`): two
  coupled sequences whose step is an exact composition of affine couplings, inverted in closed form
  with the same two model evaluations the gradient needs, so the backward costs what a plain one
  does plus the forward again.  **Exact** up to rounding; ``state_dtype=torch.float64`` removes
  even that (the tests' exact reference).

Tested (tests/test_invertible_unet.py), 5-step chains on a tiny UNet, gradients for the initial
noise and every parameter against plain autograd: EDICT in fp32 <= 1e-5 relative (exact inverse;
0 with the float64 state); DDIM with a float64 model <= 1e-9 (measured 8e-15); DDIM with an fp32
model and the float64 state <= 1e-4 (measured 4e-6: the approximate inverse).

``model(sample, t, *cond)`` returns the model output (epsilon for EDICT) shaped like ``sample``;
put classifier-free guidance inside it.  ``t`` is the stepper's timestep (a 0-d tensor).  The
model's parameters (``params``, default ``model.parameters()``) and tensors in ``cond`` receive
gradients; tensors the model captures by closure do not.  Dropout in the model is replayed
exactly (``preserve_rng_state``); the model must compute the same function under ``no_grad`` and
with autograd on.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from pydiff.nn.reversible import (_NATIVE, ReversibleSequential, ScaledCoupling, _Float64, _GradAcc, _RngTape,
                                  _autocast_scope, _capture_autocast, _deterministic_scope, _noop)
from pydiff.ops.solver import StepCoeffs
from pydiff.reference.solver import HEAD, ROW

__all__ = ["DDIMStep", "ddim_sample", "edict_sample", "idm_ddim_stack"]


def _row(c: StepCoeffs, row: int, name: str) -> float:
    return float(c.v[len(HEAD) + row * (len(ROW) + c.k) + ROW.index(name)])


# ----------------------------------------------------------------------------------------------
# Steps: forward_state / inverse_state / backward_state on a tuple state in the codec's arithmetic.
# ----------------------------------------------------------------------------------------------
def _model(run, h: torch.Tensor, t):
    """``run.model(h, t, *cond)``, checked to return a tensor shaped like ``h`` (a broadcastable output
    would be summed over the broadcast axes only in the backward, with an autograd-internal error)."""
    out = run.model(h, t, *run.cond)
    if not isinstance(out, torch.Tensor) or out.shape != h.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected an output of the sample's shape {tuple(h.shape)}, got {got}")
    return out


class _DDIMStep:
    """``x' = A x + M m(x, t)``."""

    def __init__(self, A: float, M: float, t, iters: int):
        self.A, self.M, self.t, self.iters = A, M, t, iters

    def forward_state(self, s, run, rng):
        (x,) = s
        rng()
        m = _model(run, run.codec.decode(x, run.dtype), self.t)
        return (self.A * x + self.M * run.codec.prep(m),)

    def _solve(self, xp, run, again):
        x = xp
        for _ in range(self.iters):
            again()
            m = _model(run, run.codec.decode(x, run.dtype), self.t)
            x = (xp - self.M * run.codec.prep(m)) / self.A
        return x

    def inverse_state(self, s, run):
        return (self._solve(s[0], run, _noop),)

    def backward_state(self, s, ds, run, rng, acc):
        (xp,), (dxp,) = s, ds
        rng()  # positions the replay on this step's state; every evaluation below restores it
        with torch.no_grad():
            xk = self._solve(xp, run, rng.again)
        with torch.enable_grad():
            rng.again()
            z = run.codec.decode(xk, run.dtype).detach().requires_grad_()
            m = _model(run, z, self.t)
        (dz,) = acc.grad(m, [z], None, dxp * self.M)
        x = (xp - self.M * run.codec.prep(m.detach())) / self.A
        if run.info is not None:
            r = ((x - xk).abs().max() / x.abs().max().clamp_min(1e-30)).to(torch.float64)
            run.info["inverse_residual"] = torch.maximum(run.info.get("inverse_residual", r), r)
        dx = dxp * self.A
        return (x,), (dx if dz is None else dx + dz.to(dx.dtype),)


class _EDICTStep:
    """EDICT's coupled step (Wallace et al. 2022, eq. 10-12) with ``p`` the mixing coefficient::

        x_i = a x + b e(y);  y_i = a y + b e(x_i);  x' = p x_i + (1 - p) y_i;  y' = p y_i + (1 - p) x'
    """

    def __init__(self, a: float, b: float, p: float, t):
        self.a, self.b, self.p, self.q, self.t = a, b, p, 1.0 - p, t

    def _e(self, h, run):
        return _model(run, run.codec.decode(h, run.dtype), self.t)

    def forward_state(self, s, run, rng):
        x, y = s
        a, b, p, q, prep = self.a, self.b, self.p, self.q, run.codec.prep
        rng()
        xi = a * x + b * prep(self._e(y, run))
        rng()
        yi = a * y + b * prep(self._e(xi, run))
        xn = p * xi + q * yi
        return xn, p * yi + q * xn

    def _unmix(self, s):
        xn, yn = s
        yi = (yn - self.q * xn) / self.p
        return (xn - self.q * yi) / self.p, yi

    def inverse_state(self, s, run):
        a, b, prep = self.a, self.b, run.codec.prep
        xi, yi = self._unmix(s)
        y = (yi - b * prep(self._e(xi, run))) / a
        x = (xi - b * prep(self._e(y, run))) / a
        return x, y

    def backward_state(self, s, ds, run, rng, acc):
        a, b, p, q, prep = self.a, self.b, self.p, self.q, run.codec.prep
        dxn, dyn = ds
        xi, yi = self._unmix(s)
        dxt = dxn + q * dyn          # x' also feeds y'
        dyi = p * dyn + q * dxt
        dxi = p * dxt
        with torch.enable_grad():
            z2 = run.codec.decode(xi, run.dtype).detach().requires_grad_()
            rng()
            e2 = _model(run, z2, self.t)
        (dz2,) = acc.grad(e2, [z2], None, dyi * b)
        y = (yi - b * prep(e2.detach())) / a
        del e2, z2
        if dz2 is not None:
            dxi = dxi + dz2.to(dxi.dtype)
        dy = a * dyi
        with torch.enable_grad():
            z1 = run.codec.decode(y, run.dtype).detach().requires_grad_()
            rng()
            e1 = _model(run, z1, self.t)
        (dz1,) = acc.grad(e1, [z1], None, dxi * b)
        x = (xi - b * prep(e1.detach())) / a
        if dz1 is not None:
            dy = dy + dz1.to(dy.dtype)
        return (x, y), (a * dxi, dy)


# ----------------------------------------------------------------------------------------------
# The chain function
# ----------------------------------------------------------------------------------------------
class _ChainRun:
    __slots__ = ("model", "steps", "params", "cond", "cond_template", "slots", "codec", "dtype", "det",
                 "preserve", "tape", "autocast", "n_state", "info")


class _ChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _ChainRun, *tensors):
        n, nc = run.n_state, len(run.slots)
        states = tensors[:n]
        run.cond = _fill(run, tensors[n:n + nc])
        run.dtype = states[0].dtype
        run.tape = _RngTape(states[0].device, run.preserve)
        run.autocast = _capture_autocast(states[0].device)
        with torch.no_grad(), _deterministic_scope(states[0].device, run.det):
            s = tuple(run.codec.encode(t) for t in states)
            for step in run.steps:
                s = step.forward_state(s, run, run.tape.record)
            run.tape.close()
            outs = tuple(run.codec.decode(t, run.dtype) for t in s)
        ctx.save_for_backward(*s, *tensors[n:n + nc])
        ctx.run = run
        return outs if n > 1 else outs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts):
        run = ctx.run
        n, nc = run.n_state, len(run.slots)
        saved = ctx.saved_tensors
        s = tuple(saved[:n])
        leaves = []
        for k, c in enumerate(saved[n:n + nc]):
            leaf = c.detach()
            if ctx.needs_input_grad[1 + n + k]:
                leaf.requires_grad_()
            leaves.append(leaf)
        run.cond = _fill(run, leaves)
        acc = _GradAcc(run.params, leaves)
        gdt = run.codec.grad_dtype or run.dtype
        ds = tuple(g.to(gdt) for g in gouts)
        replay = run.tape.reader()
        device = gouts[0].device
        if run.info is not None:
            run.info.pop("inverse_residual", None)
        with _deterministic_scope(device, run.det), _autocast_scope(run.autocast), run.tape.fork():
            for step in reversed(run.steps):
                s, ds = step.backward_state(s, ds, run, replay, acc)
        run.cond = None
        cg, j = [], 0
        for leaf in leaves:
            cg.append(acc.cgrads[j] if leaf.requires_grad else None)
            j += int(leaf.requires_grad)
        return (None, *(d.to(run.dtype) for d in ds), *cg, *acc.pgrads)


def _fill(run, tensors) -> tuple:
    cond = list(run.cond_template)
    for i, t in zip(run.slots, tensors):
        cond[i] = t
    return tuple(cond)


def _run_chain(model, steps, states, cond, params, state_dtype, reversible, preserve_rng_state, deterministic,
               info=None):
    if state_dtype not in (None, torch.float64):
        raise ValueError(f"state_dtype: expected None or torch.float64, got {state_dtype}")
    for i, t in enumerate(states):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"state {i}: expected a floating-point tensor")
    if params is None:
        params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    seen, plist = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            plist.append(p)
    run = _ChainRun()
    run.model, run.steps, run.params, run.info = model, steps, plist, info
    run.cond_template = tuple(cond)
    run.slots = [i for i, c in enumerate(cond) if isinstance(c, torch.Tensor)]
    run.codec = _Float64() if state_dtype == torch.float64 else _NATIVE
    run.det = state_dtype is not None if deterministic is None else bool(deterministic)
    run.preserve = bool(preserve_rng_state)
    run.n_state = len(states)
    run.dtype = states[0].dtype
    tensors = [cond[i] for i in run.slots]
    needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in list(states) + tensors) or bool(plist))
    if reversible and needs_grad:
        return _ChainFunction.apply(run, *states, *tensors, *plist)
    # plain autograd (reversible=False: the reference), or no gradient needed
    run.cond = tuple(cond)
    with _deterministic_scope(states[0].device, run.det):
        s = tuple(run.codec.encode(t) for t in states)
        for step in steps:
            s = step.forward_state(s, run, _noop)
        outs = tuple(run.codec.decode(t, run.dtype) for t in s)
    return outs if len(outs) > 1 else outs[0]


def _check_timesteps(solver):
    if getattr(solver, "timesteps", None) is None:
        raise RuntimeError(f"{type(solver).__name__}: call set_timesteps() first")


def ddim_sample(model: Callable, solver, x: torch.Tensor, *, cond: Sequence = (), params=None,
                state_dtype: Optional[torch.dtype] = None, inverse_iters: int = 20, reversible: bool = True,
                preserve_rng_state: bool = True, deterministic: Optional[bool] = None,
                info: Optional[dict] = None) -> torch.Tensor:
    """Run every step of a deterministic DDIM schedule from ``x``; differentiable with O(1) memory.

    Per step ``i`` (``t = solver.timesteps[i]``): ``x <- A_i x + M_i model(x, t, *cond)``, with
    ``A_i, M_i`` the stepper's folded float64 coefficients (``eta = 0``).  The result equals
    ``DDIMSolver.step`` run over the schedule (up to fp32 rounding).

    Args:
        model: ``model(sample, t, *cond) -> model output`` (the solver's ``prediction_type``).
        solver: a :class:`pydiff.solvers.DDIMSolver` with ``clip_sample=False``, after
            ``set_timesteps``; its step counter is not used or changed.
        x: the initial noise ``[B, ...]``.
        cond: extra model arguments (tensors among them receive gradients).
        params: tensors that receive gradients (default: ``model.parameters()``).
        state_dtype: ``None`` (the chain state in ``x``'s dtype) or ``torch.float64`` (state and
            step arithmetic in float64, the model in ``x``'s dtype).
        inverse_iters: fixed-point iterations per step to rebuild its input in the backward; each
            is a model evaluation without autograd.
        reversible: ``False`` runs plain autograd over the chain (stores every step).
        info: optional dict; the backward stores ``info["inverse_residual"]`` (a device tensor, the
            largest relative change made by the last fixed-point iteration over all steps: the
            convergence check, read it after ``backward()``).

    Returns:
        the final sample, shaped like ``x``.
    """
    from pydiff.solvers.ddim import DDIMSolver, fold

    if not isinstance(solver, DDIMSolver):
        raise TypeError(f"solver: expected a pydiff.solvers.DDIMSolver, got {type(solver).__name__}")
    _check_timesteps(solver)
    if solver.config.clip_sample:
        raise ValueError("solver: clip_sample=True clamps the x0 estimate, which is not invertible; "
                         "build the DDIMSolver with clip_sample=False")
    if int(inverse_iters) < 1:
        raise ValueError(f"inverse_iters: expected >= 1, got {inverse_iters}")
    steps = []
    for i, c in enumerate(solver.coefficient_rows(0.0, False)):
        c = fold(c)
        steps.append(_DDIMStep(_row(c, 0, "x"), _row(c, 0, "m"), solver.timesteps[i], int(inverse_iters)))
    return _run_chain(model, steps, (x,), cond, params, state_dtype, reversible, preserve_rng_state,
                      deterministic, info)


def edict_sample(model: Callable, solver, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                 cond: Sequence = (), params=None, state_dtype: Optional[torch.dtype] = None,
                 reversible: bool = True, preserve_rng_state: bool = True,
                 deterministic: Optional[bool] = None):
    """Run every EDICT generation step from ``(x, y)`` (``y = x`` by default); differentiable with
    O(1) memory and an exact inverse.

    Per step (``t = solver.timesteps[i]``, ``a, b`` the DDIM step coefficients of the stepper,
    ``p = mixing_coeff``)::

        x_i = a x + b e(y, t);  y_i = a y + b e(x_i, t);  x' = p x_i + (1-p) y_i;  y' = p y_i + (1-p) x'

    The result equals ``EDICTSolver.generate`` (up to fp32 rounding).  Arguments as in
    :func:`ddim_sample`; ``model`` returns epsilon.  Returns ``(x, y)``.
    """
    from pydiff.solvers.edict import EDICTSolver

    if not isinstance(solver, EDICTSolver):
        raise TypeError(f"solver: expected a pydiff.solvers.EDICTSolver, got {type(solver).__name__}")
    _check_timesteps(solver)
    y = x if y is None else y
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError("y: expected the shape, dtype and device of x")
    p = float(solver.config.mixing_coeff)
    steps = [_EDICTStep(_row(first, 0, "x"), _row(first, 0, "m"), p, solver.timesteps[i])
             for i, (first, _) in enumerate(solver._gen)]
    return _run_chain(model, steps, (x, y), cond, params, state_dtype, reversible, preserve_rng_state,
                      deterministic)


class DDIMStep(torch.nn.Module):
    """One deterministic DDIM step as a module: ``h -> A h + M model(h, t, *cond)`` (the stepper's
    folded coefficients; ``model`` is registered, so its parameters are this module's)."""

    def __init__(self, model: torch.nn.Module, A: float, M: float, t: torch.Tensor):
        super().__init__()
        self.model, self.A, self.M = model, float(A), float(M)
        self.register_buffer("t", torch.as_tensor(t).clone(), persistent=False)

    def forward(self, h, *cond):
        return self.A * h + self.M * self.model(h, self.t, *cond)


def idm_ddim_stack(model: torch.nn.Module, solver, v_init: float = 0.5,
                   state_dtype: Optional[torch.dtype] = torch.float64) -> ReversibleSequential:
    """IDM's first level (Chen et al. 2024, ``Step`` in a ``RevBackProp`` chain): the DDIM schedule of
    ``solver`` (``clip_sample=False``) as a :class:`pydiff.nn.ReversibleSequential` of
    :class:`pydiff.nn.ScaledCoupling` blocks, ``F_i = DDIMStep(model, A_i, M_i, t_i)``::

        y1 = (1 - v_i) (A_i x1 + M_i model(x1, t_i)) + v_i x2,    y2 = x1

    Call it on ``cat([x, x], dim=1)`` (IDM scales the second copy by a learnable factor and merges
    the two output halves with another; that is left to the caller): the result's first half is the
    coupled chain's sample.  ``v_i`` start at ``v_init`` and are learnable; the model is shared by
    every step (its gradients are summed).  Memory is independent of the number of steps and the
    inverse is exact (float64 state by default).
    """
    from pydiff.solvers.ddim import DDIMSolver, fold

    if not isinstance(solver, DDIMSolver):
        raise TypeError(f"solver: expected a pydiff.solvers.DDIMSolver, got {type(solver).__name__}")
    _check_timesteps(solver)
    if solver.config.clip_sample:
        raise ValueError("solver: build the DDIMSolver with clip_sample=False (a clamp is not invertible)")
    blocks = []
    for i, c in enumerate(solver.coefficient_rows(0.0, False)):
        c = fold(c)
        blocks.append(ScaledCoupling(DDIMStep(model, _row(c, 0, "x"), _row(c, 0, "m"), solver.timesteps[i]), v_init))
    return ReversibleSequential(blocks, state_dtype=state_dtype)
