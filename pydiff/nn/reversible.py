"""Reversible coupling stacks whose backward rebuilds each block's input from its output.

A stack of coupling blocks ``(x1, x2) -> (y1, y2)`` is invertible block by block, so training
needs to keep only the stack's final output: the backward pass rebuilds every block's input from
its output, recomputes the block's sub-networks with autograd on, and backpropagates through that
one block before moving to the previous one (RevNet: Gomez et al. 2017, "The Reversible Residual
Network"; IDM: Chen et al. 2024, "Invertible Diffusion Models for Compressed Sensing").  Activation
memory is the final state plus one block's activations, independent of depth.

Each block is its own autograd node (plus an entry and an exit node), so its parameter gradients
reach ``.grad`` as soon as its backward is done, as in plain autograd, rather than all held until
the end; the rebuilt state and the state gradient overwrite the previous block's in place (never
the caller's output or the gradient handed to backward, nor, under ``retain_graph=True``, the saved
state).  On the GPU-size 16-block stack of bench/invertible.py (C = 256, 64x64, batch 8, fp32) the
training peak, counted op by op on the meta device, is 210 MiB against plain autograd's 3138 MiB
(6.7 %; float64 state 306 MiB, 9.7 %), the same at 4 or 64 blocks.

Couplings (``x = cat(x1, x2)`` split on ``dim``, both halves the same shape)::

    AdditiveCoupling(F, G):   y1 = x1 + F(x2)              x2 = y2 - G(y1)
                              y2 = x2 + G(y1)              x1 = y1 - F(x2)
    ScaledCoupling(F, v):     y1 = (1 - v) F(x1) + v x2    x1 = y2
                              y2 = x1                      x2 = (y1 - (1 - v) F(y2)) / v

``ScaledCoupling`` is IDM's ``RevModule`` (learnable scalar ``v``, initialised to 0.5).  ``F`` and
``G`` are any modules (resnet blocks, attention, a whole sampler step) called as ``F(h, *cond)``,
where ``cond`` are the extra arguments given to :meth:`ReversibleSequential.forward` (e.g. a
time embedding; gradients flow to them too).  They must own (register) the parameters they use.

Numerical exactness.  Rebuilding an input subtracts ``F(x2)`` from a rounded ``x1 + F(x2)``; the
rounding error then passes through every earlier block's F and G on the way back and grows with
their Lipschitz constants, and it is larger still when the recompute does not reproduce F exactly
(another conv algorithm, TF32, or a bf16 autocast output that rounds the other way once its input
moved by an ulp).  With the state kept in the model dtype (``state_dtype=None``) a 16-block fp32
stack of random GroupNorm-SiLU-conv x2 couplings rebuilds its input with, measured on the CPU
(tests/test_reversible.py): 8e-7 relative (max-abs) with PyTorch's default init, 4e-5 with conv
weights of std 3/sqrt(fan_in), 4e-3 under bf16 autocast; ../shared/DESIGN.md reports 6.9e-4 for
the GPU stack.  Two remedies, chosen by ``state_dtype``:

* ``torch.float64``: the coupling state ``(x1, x2)`` is carried in float64 between blocks while F
  and G run in the model dtype on ``x.to(dtype)``.  Each add/subtract rounds at ~1e-16 and the
  rebuilt state, cast back to the model dtype, almost always equals the forward's F input bit for
  bit, so the error does not compound.  Bound (tested, all three cases above): input rebuilt to
  <= 1e-12 relative (max-abs; measured 0) for the 16-block fp32 stack, and gradients within 1e-5
  of plain autograd (fp32 model; measured <= 4e-7).
* ``torch.int64``: fixed point with ``frac_bits`` fractional bits (default 32: resolution 2.3e-10,
  range |x| < 2**30, values exact in float64 while |x| < 2**21; an input or F/G output that is NaN,
  infinite or out of range makes the whole output NaN, as float arithmetic would, instead of
  wrapping).  ``F(x2)`` is rounded to the grid and added in int64, so the inverse is bit-exact
  whenever F and G recompute bit-identically (MacKay et al. 2018, "Reversible Recurrent Neural
  Networks").  The forward differs from float
  arithmetic by one grid rounding per add (gradients pass the rounding straight through).
  Additive couplings only (``ScaledCoupling`` divides by ``v``).

Recomputation must reproduce the forward: ``deterministic=True`` (the default when
``state_dtype`` is set) runs forward and recompute with cuDNN's deterministic algorithms and no
autotuning; the autocast state and (``preserve_rng_state=True``) the CPU and device RNG state
before every F/G call are recorded in the forward and restored in the recompute, as
``torch.utils.checkpoint`` does, so dropout draws the same mask (only for the calls that drew
random numbers in the forward: a stack without random ops restores nothing).  Modules whose
forward differs between ``no_grad`` and grad mode, or that update buffers (BatchNorm running stats are updated
twice), are outside these guarantees.

Shapes: input ``[B, 2C, ...]`` (``dim=1`` by default) to output of the same shape and dtype.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from pydiff.ops import invertible as _inv_ops

__all__ = ["AdditiveCoupling", "CouplingBlock", "ReversibleSequential", "ScaledCoupling"]


# ----------------------------------------------------------------------------------------------
# The coupling update: the one place a fused kernel plugs in.
# ----------------------------------------------------------------------------------------------
def _coupling_add(x1: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``y1 = x1 + f``: the fused coupling kernel (:func:`pydiff.ops.invertible.coupling_update`;
    one read of each, one write; float64 arithmetic when either is float64, so a float64 state
    takes an fp32 block output without a float64 copy of it).  Differentiable."""
    return _inv_ops.coupling_update(x1, f, 1.0, 1.0, check=False)


def _coupling_sub(y1: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``x1 = y1 - f``, the inverse of :func:`_coupling_add` (same kernel, ``b = -1``)."""
    return _inv_ops.coupling_update(y1, f, 1.0, -1.0, check=False)


# ----------------------------------------------------------------------------------------------
# State arithmetic ("codecs"): how the coupling state is held between blocks.
# ----------------------------------------------------------------------------------------------
class _Native:
    """State in the model dtype (naive: each add rounds in that dtype)."""

    name = "native"
    grad_dtype = None  # the model dtype

    @staticmethod
    def encode(x):
        return x

    @staticmethod
    def decode(s, dtype):
        return s if s.dtype == dtype else s.to(dtype)

    @staticmethod
    def prep(f):
        return f

    @staticmethod
    def finish(y):
        """The stack's decoded output (the fixed-point state turns it NaN when it could not hold a value)."""
        return y

    # Same dtypes (the model-dtype state, or a float64 model): torch's own add / sub, the same bits as
    # the coupling kernel at a = 1, b = +-1 (one fp32 rounding, or none beyond the dtype's) in one
    # dispatch: the kernel's Python entry and boxed call cost ~20 us more per call on the CPU box,
    # 64 calls per step of a 16-block stack (6 % of its host time). Mixed dtypes (a float64 state
    # with a model-dtype block output): the coupling kernel, which reads f in its own dtype (torch
    # would first cast f to a float64 copy on the CPU).
    def add(self, s, f):
        f = self.prep(f)
        return s + f if s.dtype == f.dtype else _coupling_add(s, f)

    def sub(self, s, f, inplace: bool = False):
        """``s - f``; ``inplace``: written into ``s`` (a state the backward owns)."""
        f = self.prep(f)
        if s.dtype == f.dtype:
            return s.sub_(f) if inplace else s - f
        if inplace:
            return _inv_ops.coupling_update(s, f, 1.0, -1.0, inplace=True, check=False)
        return _coupling_sub(s, f)

    @staticmethod
    def mix(a, v, x2):
        return a + v * x2

    @staticmethod
    def unmix(y1, a, v):
        return (y1 - a) / v


class _Float64(_Native):
    """State in float64; F and G see it cast to the model dtype."""

    name = "float64"
    grad_dtype = torch.float64

    @staticmethod
    def encode(x):
        return x.to(torch.float64)

    @staticmethod
    def prep(f):
        return f  # the coupling kernel reads f in its own dtype and adds in float64

    @staticmethod
    def mix(a, v, x2):
        return a.to(torch.float64) + v.to(torch.float64) * x2

    @staticmethod
    def unmix(y1, a, v):
        return (y1 - a.to(torch.float64)) / v.to(torch.float64)


class _Fixed(_Native):
    """State in int64 fixed point with ``bits`` fractional bits: bit-exact inverse."""

    name = "fixed"
    grad_dtype = torch.float64

    def __init__(self, bits: int):
        self.bits = int(bits)
        self.scale = float(2.0 ** self.bits)
        self.inv = float(2.0 ** -self.bits)
        self.limit = float(2.0 ** (62 - self.bits))
        # a device flag, set when the input or an F/G output is NaN, infinite or beyond +-2**(62 - bits),
        # which int64 cannot hold (NaN would count as 0, large values wrap): the output is then NaN,
        # without a host synchronisation (one instance serves one call of the stack)
        self.bad = None

    def _flag(self, t, limit):
        b = ~(t.detach().abs() < limit).all()
        self.bad = b if self.bad is None else self.bad | b

    def encode(self, x):
        self._flag(x, self.limit)
        return torch.round(x.to(torch.float64) * self.scale).to(torch.int64)

    def finish(self, y):
        return y if self.bad is None else torch.where(self.bad, float("nan"), y)

    def decode(self, s, dtype):
        return (s.to(torch.float64) * self.inv).to(dtype)

    def prep(self, f):
        return torch.round(f.to(torch.float64) * self.scale).to(torch.int64)

    def add(self, s, f):
        # fused: s + rint(f * 2^bits) in int64 (pydiff.ops.invertible.coupling_update_fixed); with |s| < 2^62
        # and |rint(f 2^bits)| < 2^62 (both flagged otherwise) the int64 sum cannot wrap
        self._flag(f, self.limit)
        self._flag(s, 2 ** 62)
        return _inv_ops.coupling_update_fixed(s, f.detach(), 1.0, self.bits, check=False)

    def sub(self, s, f, inplace: bool = False):
        return _inv_ops.coupling_update_fixed(s, f.detach(), -1.0, self.bits, inplace=inplace, check=False)

    def mix(self, a, v, x2):  # pragma: no cover - rejected at construction
        raise NotImplementedError("fixed-point state supports additive couplings only")

    unmix = mix


class _FixedSTE(_Native):
    """Autograd twin of :class:`_Fixed` for the plain (non-reversible) path: the same grid values
    held in float64, roundings passed straight through by the gradient."""

    name = "fixed-ste"
    grad_dtype = torch.float64

    def __init__(self, bits: int):
        self.scale = float(2.0 ** bits)
        self.inv = float(2.0 ** -bits)

    def _q(self, t):
        t = t.to(torch.float64)
        return t + (torch.round(t * self.scale) * self.inv - t).detach()

    def encode(self, x):
        return self._q(x)

    def prep(self, f):
        return self._q(f)

    def decode(self, s, dtype):
        return s.to(dtype)


_NATIVE = _Native()


def _noop() -> None:
    return None


# ----------------------------------------------------------------------------------------------
# Recompute helpers shared with pydiff.invertible_sampling: RNG tape, autocast, determinism.
# ----------------------------------------------------------------------------------------------
class _RngTape:
    """Records the CPU (and CUDA device) RNG state before every sub-network call in the forward;
    a reader replays them in reverse order during the backward's recompute.

    :meth:`close` (at the end of the forward) marks each call that left the RNG state as it found
    it (no dropout or other random op): its replay is skipped, and when no call drew random
    numbers the backward neither restores nor forks the RNG state at all (each restore is a few
    host calls; the blocks of a typical UNet draw nothing)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = bool(enabled)
        self.cuda = device if device.type == "cuda" else None
        self.gen = None
        if self.enabled and self.cuda is not None:
            idx = self.cuda.index if self.cuda.index is not None else torch.cuda.current_device()
            self.gen = torch.cuda.default_generators[idx]
        self.states: list = []
        self.used: Optional[list] = None  # per recorded call, whether it changed the state (None: unknown)

    def _now(self) -> tuple:
        return torch.get_rng_state(), (self.gen.get_state() if self.gen is not None else None)

    def record(self) -> None:
        if self.enabled:
            if self.cuda is not None and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("preserve_rng_state=True: the RNG state cannot be recorded during CUDA graph "
                                   "capture; construct the stack with preserve_rng_state=False (blocks without "
                                   "random ops, e.g. no dropout) to capture it")
            self.states.append(self._now())

    def close(self) -> None:
        """The forward is over: compare each recorded state with the next one (the last with the
        state now) to find the calls that drew random numbers."""
        if self.enabled and self.states:
            seq = self.states + [self._now()]
            same = lambda a, b: torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))  # noqa: E731
            if same(seq[0], seq[-1]):  # the state as the forward found it: nothing drew (every draw moves
                self.used = [False] * len(self.states)  # it: Mersenne Twister position, Philox offset)
                return
            self.used = [not same(a, b) for a, b in zip(seq, seq[1:])]

    def replays(self) -> bool:
        """Whether a backward has any state to restore."""
        return self.enabled and (self.used is None or any(self.used))

    def reader(self) -> "_Replay":
        return _Replay(self)

    def fork(self):
        """Context that restores the RNG state on exit (the recompute must not disturb it)."""
        if not self.replays():
            return contextlib.nullcontext()
        devices = [self.cuda] if self.cuda is not None else []
        return torch.random.fork_rng(devices=devices, enabled=True)


class _Replay:
    """Replays a tape backwards: each call restores the state recorded before the matching forward
    call (last recorded first); :meth:`again` restores the last one replayed once more.  Calls
    that drew no random numbers in the forward are not restored (their recompute draws none)."""

    def __init__(self, tape: _RngTape):
        self.tape = tape
        self.pos = len(tape.states)
        self.on = tape.replays()

    def __call__(self) -> None:
        if self.on:
            self.pos -= 1
            self.again()

    def again(self) -> None:
        if self.on and (self.tape.used is None or self.tape.used[self.pos]):
            cpu, dev = self.tape.states[self.pos]
            torch.set_rng_state(cpu)
            if dev is not None:
                self.tape.gen.set_state(dev)


def _capture_autocast(device: torch.device) -> dict:
    """The autocast state of ``device``'s type (and the CPU's) now, to re-enter in the backward."""
    state = {}
    for dt in dict.fromkeys((device.type, "cpu")):
        if torch.amp.is_autocast_available(dt):
            state[dt] = dict(enabled=torch.is_autocast_enabled(dt), dtype=torch.get_autocast_dtype(dt),
                             cache_enabled=torch.is_autocast_cache_enabled())
    return state


def _autocast_scope(state: dict):
    """Re-enters the autocast state captured by :func:`_capture_autocast` for the device types whose
    current state differs (usually none: a backward then enters no context at all)."""
    stack = None
    for dt, kw in state.items():
        if (torch.is_autocast_enabled(dt) != kw["enabled"] or torch.get_autocast_dtype(dt) != kw["dtype"]
                or torch.is_autocast_cache_enabled() != kw["cache_enabled"]):
            stack = stack or contextlib.ExitStack()
            stack.enter_context(torch.autocast(dt, **kw))
    return stack or contextlib.nullcontext()


@contextlib.contextmanager
def _cudnn_deterministic():
    cudnn = torch.backends.cudnn
    old = (cudnn.benchmark, cudnn.deterministic)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = old


def _deterministic_scope(device: torch.device, enabled: bool):
    """cuDNN deterministic algorithms, no autotuning (so the forward and the recompute pick the same
    convolution algorithm); other cuDNN settings (TF32) are left as they are.  A no-op off CUDA."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return _cudnn_deterministic()


try:  # the engine call torch.autograd.grad wraps (torch >= 2.4)
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - older torch
    _engine_run_backward = None


def _vjp(outs, ins, gos) -> tuple:
    """``torch.autograd.grad(outs, ins, gos, allow_unused=True)``.  For plain tensors whose gradients
    already have the outputs' shapes and dtypes (what the blocks' backward passes) it calls the
    autograd engine the way ``torch.autograd.grad`` does, minus the argument normalisation that
    costs ~30 us per call on the CPU (two calls per block per backward)."""
    outs, ins, gos = tuple(outs), tuple(ins), tuple(gos)
    if (_engine_run_backward is not None and not torch.overrides.has_torch_function(outs + ins + gos)
            and all(g.shape == o.shape and g.dtype == o.dtype for o, g in zip(outs, gos))):
        return _engine_run_backward(outs, gos, False, False, ins, True, accumulate_grad=False)
    return torch.autograd.grad(outs, ins, gos, allow_unused=True)


class _GradAcc:
    """Accumulates parameter and conditioning gradients over the per-block recomputes."""

    def __init__(self, params: Sequence[torch.Tensor], cond_leaves: Sequence[torch.Tensor]):
        self.params = list(params)
        self.index = None  # id -> position, built on the first call that names its parameters
        self.pgrads: list = [None] * len(self.params)
        self.cond_leaves = [c for c in cond_leaves if c.requires_grad]
        self.cgrads: list = [None] * len(self.cond_leaves)

    def grad(self, out, leaves: Sequence[torch.Tensor], params: Optional[Iterable[torch.Tensor]], grad_out,
             use_cond: bool = True) -> list:
        """``d out / d leaves`` contracted with ``grad_out``; parameter and cond gradients are added to
        the accumulators.  ``grad_out`` is cast to ``out``'s dtype (as autograd's add would).
        ``params``: the tracked parameters ``out`` may depend on (None: all of them; the others come
        back unused, which costs less than walking a module's ``parameters()`` on every call)."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        gos = grad_out if isinstance(grad_out, (tuple, list)) else (grad_out,)
        gos = [g if g.dtype == o.dtype else g.to(o.dtype) for o, g in zip(outs, gos)]
        if params is None:
            plist, pidx = self.params, range(len(self.params))
        else:
            if self.index is None:
                self.index = {id(p): i for i, p in enumerate(self.params)}
            seen, plist, pidx = set(), [], []
            for p in params:
                i = self.index.get(id(p))
                if i is not None and i not in seen:
                    seen.add(i)
                    plist.append(p)
                    pidx.append(i)
        conds = self.cond_leaves if use_cond else []
        leaves = list(leaves)
        ins = leaves + plist + conds
        if not any(o.requires_grad for o in outs):
            return [None] * len(leaves)
        gs = _vjp(outs, ins, gos)
        n, m = len(leaves), len(plist)
        for i, g in zip(pidx, gs[n:n + m]):
            if g is not None:
                self.pgrads[i] = g if self.pgrads[i] is None else self.pgrads[i] + g
        for j, g in enumerate(gs[n + m:]):
            if g is not None:
                self.cgrads[j] = g if self.cgrads[j] is None else self.cgrads[j] + g
        return list(gs[:n])


def _trainable_params(module: nn.Module, locs: Optional[list] = None) -> list:
    """``[p for p in module.parameters() if p.requires_grad]``, same order, without building the
    parameter names (a third of the time of ``parameters()``; the stack calls it per block and call).
    ``locs``: also receives, per parameter, where it was found (``(owner._parameters, name)``)."""
    out, seen_p, seen_m = [], set(), set()

    def walk(m):
        seen_m.add(id(m))
        d = m._parameters
        for name, p in d.items():
            if p is not None and id(p) not in seen_p:
                seen_p.add(id(p))
                if p.requires_grad:
                    out.append(p)
                    if locs is not None:
                        locs.append((d, name))
        for c in m._modules.values():
            if c is not None and id(c) not in seen_m:
                walk(c)

    walk(module)
    return out


def _check_params_unchanged(k: int, params, versions, locs) -> None:
    """The recompute runs the block's modules as they are now: it must find the parameter tensors the
    forward used, where the forward found them (``locs``, from :func:`_trainable_params`), still
    requiring gradients and unmodified (plain autograd raises for an in-place change; a swap, as
    ``torch.func.functional_call`` makes and undoes around the forward, would go unnoticed).  A look
    per parameter, not a walk of the block's modules."""
    if any(d.get(name) is not p or not p.requires_grad for p, (d, name) in zip(params, locs)):
        raise RuntimeError(f"ReversibleSequential: block {k}'s parameters are not the tensors its forward used (swapped "
                           f"between forward and backward, e.g. by torch.func.functional_call, or requires_grad "
                           f"changed); the backward recomputes the block with its current modules")
    for p, v in zip(params, versions):
        if p._version != v:
            raise RuntimeError(f"ReversibleSequential: a parameter of block {k} was modified in place between the "
                               f"forward and the backward (an optimizer or EMA step?); the recompute would use the new "
                               f"values (plain autograd raises for this too)")


def _add_grad(a: torch.Tensor, b: Optional[torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """``a + b`` (``b`` None: ``a``); ``inplace``: added into ``a`` (a gradient the backward owns)."""
    if b is None:
        return a
    if inplace:
        return a.add_(b)  # (b is promoted inside the kernel: no cast copy)
    return a + b if torch.promote_types(a.dtype, b.dtype) == a.dtype else a + b.to(a.dtype)


# ----------------------------------------------------------------------------------------------
# Coupling blocks
# ----------------------------------------------------------------------------------------------
class CouplingBlock(nn.Module):
    """Base class: an invertible map ``(x1, x2) -> (y1, y2)`` with a memory-free backward.

    Subclasses implement :meth:`forward_state` (used with autograd on for the plain path and under
    ``no_grad`` for the reversible forward), :meth:`inverse_state` and :meth:`backward_state`.
    ``pass_cond=False`` calls the sub-networks without the stack's extra arguments.
    """

    def __init__(self, pass_cond: bool = True):
        super().__init__()
        self.pass_cond = bool(pass_cond)

    def _c(self, cond: tuple) -> tuple:
        return cond if self.pass_cond else ()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *cond):
        """Plain autograd forward in the inputs' dtype: returns ``(y1, y2)``."""
        return self.forward_state(x1, x2, cond, _NATIVE, x1.dtype, _noop)

    @torch.no_grad()
    def inverse(self, y1: torch.Tensor, y2: torch.Tensor, *cond):
        """``(x1, x2)`` from ``(y1, y2)`` in the inputs' dtype (no autograd)."""
        return self.inverse_state(y1, y2, cond, _NATIVE, y1.dtype)

    def forward_state(self, x1, x2, cond, codec, dtype, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse_state(self, y1, y2, cond, codec, dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward_state(self, y1, y2, dy1, dy2, cond, codec, dtype, rng, acc, own=(False,) * 4):  # pragma: no cover
        """Rebuild ``(x1, x2)`` from ``(y1, y2)`` and backpropagate ``(dy1, dy2)`` through the block:
        returns ``(x1, x2, dx1, dx2)``; parameter and cond gradients go to ``acc``.  ``own`` says
        which of ``(y1, y2, dy1, dy2)`` the backward owns: those may be overwritten in place (the
        rebuilt state and the updated gradient reuse their memory)."""
        raise NotImplementedError


class AdditiveCoupling(CouplingBlock):
    """RevNet's additive coupling: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.

    ``F`` and ``G`` map a half ``[B, C, ...]`` to the same shape (``F(h, *cond)``).  Inverse:
    ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``.  The backward evaluates G and F once each with autograd
    on (the evaluation that rebuilds the input is the one backpropagated), so a reversible stack
    costs one extra forward over plain autograd.
    """

    def __init__(self, F: nn.Module, G: nn.Module, pass_cond: bool = True):
        super().__init__(pass_cond)
        self.F, self.G = F, G

    def forward_state(self, x1, x2, cond, codec, dtype, rng):
        c = self._c(cond)
        rng()
        y1 = codec.add(x1, self.F(codec.decode(x2, dtype), *c))
        rng()
        y2 = codec.add(x2, self.G(codec.decode(y1, dtype), *c))
        return y1, y2

    def inverse_state(self, y1, y2, cond, codec, dtype):
        c = self._c(cond)
        x2 = codec.sub(y2, self.G(codec.decode(y1, dtype), *c))
        x1 = codec.sub(y1, self.F(codec.decode(x2, dtype), *c))
        return x1, x2

    def backward_state(self, y1, y2, dy1, dy2, cond, codec, dtype, rng, acc, own=(False,) * 4):
        c = self._c(cond)
        with torch.enable_grad():
            z1 = codec.decode(y1, dtype).detach().requires_grad_()
            rng()
            g = self.G(z1, *c)
        (dz1,) = acc.grad(g, [z1], None, dy2, self.pass_cond)
        x2 = codec.sub(y2, g.detach(), inplace=own[1])
        del g, z1, y2
        dy1 = _add_grad(dy1, dz1, inplace=own[2])
        del dz1
        with torch.enable_grad():
            z2 = codec.decode(x2, dtype).detach().requires_grad_()
            rng()
            f = self.F(z2, *c)
        (dz2,) = acc.grad(f, [z2], None, dy1, self.pass_cond)
        x1 = codec.sub(y1, f.detach(), inplace=own[0])
        return x1, x2, dy1, _add_grad(dy2, dz2, inplace=own[3])


class ScaledCoupling(CouplingBlock):
    """IDM's scaled coupling (Chen et al. 2024, ``RevModule``): ``y1 = (1 - v) F(x1) + v x2``,
    ``y2 = x1``, with a learnable scalar ``v`` (``v_init``, IDM uses 0.5).

    Inverse: ``x1 = y2``, ``x2 = (y1 - (1 - v) F(y2)) / v``.  ``v`` must stay away from 0: the
    rebuild divides by it, so the reversible gradients lose accuracy as ``v`` shrinks and are NaN at
    ``v = 0``, where plain autograd's are not.  One evaluation of F per block in the forward and one
    (with autograd) in the backward.
    """

    def __init__(self, F: nn.Module, v_init: float = 0.5, pass_cond: bool = True):
        super().__init__(pass_cond)
        self.F = F
        self.v = nn.Parameter(torch.tensor(float(v_init)))

    def forward_state(self, x1, x2, cond, codec, dtype, rng):
        rng()
        a = (1 - self.v) * self.F(codec.decode(x1, dtype), *self._c(cond))
        return codec.mix(a, self.v, x2), x1

    def inverse_state(self, y1, y2, cond, codec, dtype):
        a = (1 - self.v) * self.F(codec.decode(y2, dtype), *self._c(cond))
        return y2, codec.unmix(y1, a, self.v)

    def backward_state(self, y1, y2, dy1, dy2, cond, codec, dtype, rng, acc, own=(False,) * 4):
        with torch.enable_grad():
            z = codec.decode(y2, dtype).detach().requires_grad_()
            rng()
            a = (1 - self.v) * self.F(z, *self._c(cond))
        x2 = codec.unmix(y1, a.detach(), self.v.detach())
        with torch.enable_grad():
            y1r = codec.mix(a, self.v, x2)  # x2 is a constant here: d/dv picks up x2 * dy1
        (dz,) = acc.grad(y1r, [z], None, dy1, self.pass_cond)
        dx2 = dy1 * self.v.detach().to(dy1.dtype)
        return y2, x2, _add_grad(dy2, dz, inplace=own[3]), dx2


# ----------------------------------------------------------------------------------------------
# The stack
# ----------------------------------------------------------------------------------------------
def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when unknown."""
    f = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if f is None else bool(f())
    except RuntimeError:  # not inside a backward
        return True


class _Chain:
    """What one call of a reversible stack shares between its autograd nodes (one per block, plus
    the entry and the exit): the call's settings, and in the backward the state rebuilt so far.

    The backward runs exit -> block n-1 -> ... -> block 0 -> entry (each node's gradient comes from
    the next one), so each block's node finds in :attr:`state` its own output, rebuilt by the node
    that ran just before it, and leaves there its input.  :attr:`grads` holds the gradients the
    last block node returned that are the backward's own (not views of the caller's gradient):
    when the next node receives them, it updates them in place."""

    __slots__ = ("stack", "cond", "slots", "dtype", "codec", "det", "tape", "autocast", "replay", "state",
                 "grads", "wrap", "locs", "blocks")

    def __init__(self, stack, cond, x: torch.Tensor):
        self.stack = stack
        self.cond = tuple(cond)
        self.slots = [i for i, c in enumerate(cond) if isinstance(c, torch.Tensor)]
        self.dtype, self.codec = x.dtype, stack._codec(reversible=True)
        self.det = stack._deterministic()
        self.tape = _RngTape(x.device, stack.preserve_rng_state)
        self.autocast = _capture_autocast(x.device)
        self.replay = None
        self.state = None   # [s1, s2, (own1, own2)] in the codec's dtype
        self.grads = ()
        # an int64 fixed-point state crosses node boundaries as its bits viewed as float64 (autograd
        # carries gradients only for floating-point tensors); the gradients are float64
        self.wrap = self.codec.name == "fixed"
        self.locs = ()  # per block, where its parameters were found (set by the forward)
        # the blocks this call runs (the backward recomputes the same modules, even if the stack's
        # list is changed in between; a ModuleList lookup per node also costs more than this)
        self.blocks = list(stack.blocks)

    def fill(self, tensors) -> tuple:
        cond = list(self.cond)
        for i, t in zip(self.slots, tensors):
            cond[i] = t
        return tuple(cond)

    def out(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(torch.float64) if self.wrap else s

    def inn(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(torch.int64) if self.wrap else s


class _Enter(torch.autograd.Function):
    """``x -> (s1, s2)``: the input in the state's arithmetic, split in halves (gradient: the
    halves' gradients concatenated, in x's dtype)."""

    @staticmethod
    def forward(ctx, chain: _Chain, x: torch.Tensor):
        ctx.chain = chain
        s1, s2 = chain.stack._split(chain.codec.encode(x))
        return chain.out(s1), chain.out(s2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d1, d2):
        chain = ctx.chain
        chain.state, chain.grads = None, ()
        return None, torch.cat([d1, d2], dim=chain.stack.dim).to(chain.dtype)


class _Exit(torch.autograd.Function):
    """``(s1, s2) -> y``: the final state decoded and concatenated.  Saves the only activation the
    stack keeps (the output itself for a model-dtype state, the exact state halves otherwise); its
    backward starts the rebuild."""

    @staticmethod
    def forward(ctx, chain: _Chain, s1: torch.Tensor, s2: torch.Tensor):
        ctx.chain = chain
        chain.tape.close()
        dim = chain.stack.dim
        if chain.codec is _NATIVE:   # the output is the state: save it once, chunk it in backward
            out = torch.cat([s1, s2], dim=dim)
            ctx.save_for_backward(out)
        else:
            a, b = chain.inn(s1), chain.inn(s2)
            out = torch.cat([chain.codec.decode(a, chain.dtype), chain.codec.decode(b, chain.dtype)], dim=dim)
            out = chain.codec.finish(out)
            ctx.save_for_backward(s1, s2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        chain = ctx.chain
        saved = ctx.saved_tensors
        s1, s2 = chain.stack._split(saved[0]) if len(saved) == 1 else (chain.inn(saved[0]), chain.inn(saved[1]))
        # the caller's output is read only; the saved state halves (float64 / fixed point) are ours
        # unless this backward keeps the graph for another one (retain_graph=True)
        own = len(saved) == 2 and not _keep_graph()
        chain.state = [s1, s2, (own, own)]
        chain.replay = chain.tape.reader()
        g = gout.to(chain.codec.grad_dtype or chain.dtype)
        d1, d2 = chain.stack._split(g)
        # a cast made a copy that is ours; the caller's gradient is not
        chain.grads = (d1, d2) if g is not gout else ()
        return None, d1, d2


class _Block(torch.autograd.Function):
    """One coupling block ``(s1, s2) -> (y1, y2)`` without autograd in the forward (nothing saved
    but the conditioning tensors); the backward rebuilds the block's input from its output (left in
    ``chain.state`` by the node after it), recomputes F and G with autograd on, and returns the
    gradients of the state, the conditioning tensors and the block's parameters, so that they reach
    ``.grad`` block by block, as in plain autograd (not all at the end)."""

    @staticmethod
    def forward(ctx, chain: _Chain, k: int, n_params: int, s1: torch.Tensor, s2: torch.Tensor, *tensors):
        ctx.chain, ctx.k = chain, k
        n_cond = len(tensors) - n_params
        ctx.save_for_backward(*tensors[:n_cond])
        ctx.params = tensors[n_cond:]
        ctx.versions = [p._version for p in ctx.params]
        blk = chain.blocks[k]
        cond = chain.fill(tensors[:n_cond])
        with _deterministic_scope(s1.device, chain.det):
            y1, y2 = blk.forward_state(chain.inn(s1), chain.inn(s2), cond, chain.codec, chain.dtype,
                                       chain.tape.record)
        return chain.out(y1), chain.out(y2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy1, dy2):
        chain, k = ctx.chain, ctx.k
        if chain.state is None:
            raise RuntimeError("ReversibleSequential: a block's backward ran before the stack's output node's "
                               "(backpropagate from the stack's output)")
        blk = chain.blocks[k]
        _check_params_unchanged(k, ctx.params, ctx.versions, chain.locs[k])
        st, chain.state = chain.state, None
        o1, o2 = st.pop()
        # the read-only states (by id: the block may free them as soon as it is done with them, so
        # neither this frame nor the chain holds a reference; a reused id only costs a copy)
        ro = [id(y) for y, own in zip(st, (o1, o2)) if not own]
        mine = chain.grads
        chain.grads = ()
        g1, g2 = any(dy1 is t for t in mine), any(dy2 is t for t in mine)
        del mine
        cond_in = ctx.saved_tensors
        leaves = []
        for j, c in enumerate(cond_in):
            leaf = c.detach()
            if ctx.needs_input_grad[5 + j]:
                leaf.requires_grad_()
            leaves.append(leaf)
        acc = _GradAcc(ctx.params, leaves)
        with _deterministic_scope(dy1.device, chain.det), _autocast_scope(chain.autocast), chain.tape.fork():
            x1, x2, dx1, dx2 = blk.backward_state(st.pop(0), st.pop(0), dy1, dy2, chain.fill(leaves), chain.codec,
                                                  chain.dtype, chain.replay, acc, own=(o1, o2, g1, g2))
        # what the next node may overwrite: not the caller's output or gradient passed through unchanged
        if k > 0:
            chain.state = [x1, x2, (id(x1) not in ro, id(x2) not in ro)]
        ro_grads = [d for d, own in ((dy1, g1), (dy2, g2)) if not own]
        chain.grads = tuple(d for d in (dx1, dx2) if not any(d is r for r in ro_grads))
        del x1, x2, dy1, dy2, ro_grads
        cgrads, j = [], 0
        for leaf in leaves:
            if leaf.requires_grad:
                cgrads.append(acc.cgrads[j])
                j += 1
            else:
                cgrads.append(None)
        return (None, None, None, dx1, dx2, *cgrads, *acc.pgrads)


class ReversibleSequential(nn.Module):
    """A stack of coupling blocks trained with a memory-free backward.

    ``forward(x, *cond)``: ``x`` is ``[B, 2C, ...]``, split into halves along ``dim``; ``cond`` are
    extra arguments handed to every block's sub-networks (tensors among them receive gradients).
    Returns the stack's output, same shape and dtype as ``x``.

    With autograd on and ``reversible=True`` the forward runs without building a graph and saves
    only the final state (``[B, 2C, ...]`` in the state dtype); the backward rebuilds each block's
    input from its output and recomputes F and G one block at a time (the blocks that forward ran,
    even if ``blocks`` is changed before the backward; their parameters must not be replaced or
    changed in place in between, which raises).  Gradients equal plain
    autograd's (tested: <= 1e-5 relative in fp32 with ``state_dtype=torch.float64`` or fixed point,
    <= 1e-10 in float64); ``reversible=False`` runs the same arithmetic with plain autograd.

    Args:
        blocks: :class:`CouplingBlock` instances (modules may be shared between blocks).
        dim: the split dimension (1: channels).
        state_dtype: ``None`` (the coupling state in the model dtype: rebuilt inputs carry rounding
            error, 8e-7..4e-3 relative after 16 random fp32 resnet couplings, see the module docs),
            ``torch.float64`` (rebuilt to <= 1e-12 relative on that stack) or ``torch.int64``
            (fixed point with ``frac_bits`` fractional bits, bit-exact inverse; additive couplings
            only).
        frac_bits: fractional bits of the fixed-point state (default 32: step 2.3e-10, values below
            2**(62 - frac_bits) = 2**30 in magnitude).
        preserve_rng_state: record and replay the RNG state around every F/G call (dropout).  Off
            for CUDA graph capture (``torch.cuda.make_graphed_callables``), which cannot read it.
        deterministic: fix the cuDNN algorithm between forward and recompute; default: on when
            ``state_dtype`` is set.
        reversible: ``False`` runs plain autograd (the reference; stores every activation).
    """

    def __init__(self, blocks: Iterable[CouplingBlock], *, dim: int = 1, state_dtype: Optional[torch.dtype] = None,
                 frac_bits: int = 32, preserve_rng_state: bool = True, deterministic: Optional[bool] = None,
                 reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        for i, b in enumerate(self.blocks):
            if not isinstance(b, CouplingBlock):
                raise TypeError(f"blocks[{i}]: expected a CouplingBlock (AdditiveCoupling, ScaledCoupling, ...), "
                                f"got {type(b).__name__}")
        if state_dtype not in (None, torch.float64, torch.int64):
            raise ValueError(f"state_dtype: expected None, torch.float64 or torch.int64, got {state_dtype}")
        if state_dtype == torch.int64:
            if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 < frac_bits <= 52:
                raise ValueError(f"frac_bits: expected an int in 1..52, got {frac_bits!r}")
            bad = [i for i, b in enumerate(self.blocks) if isinstance(b, ScaledCoupling)]
            if bad:
                raise ValueError(f"state_dtype=torch.int64 (fixed point) supports additive couplings only; "
                                 f"blocks {bad} are ScaledCoupling (use state_dtype=torch.float64)")
        self.dim = int(dim)
        self.state_dtype = state_dtype
        self.frac_bits = int(frac_bits)
        self.preserve_rng_state = bool(preserve_rng_state)
        self.deterministic = deterministic
        self.reversible = bool(reversible)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, state_dtype={self.state_dtype}, reversible={self.reversible}"
                + (f", frac_bits={self.frac_bits}" if self.state_dtype == torch.int64 else ""))

    # ---- state helpers ---------------------------------------------------------------------------
    def _codec(self, reversible: bool):
        if self.state_dtype == torch.float64:
            return _Float64()
        if self.state_dtype == torch.int64:
            return _Fixed(self.frac_bits) if reversible else _FixedSTE(self.frac_bits)
        return _NATIVE

    def _deterministic(self) -> bool:
        return self.state_dtype is not None if self.deterministic is None else bool(self.deterministic)

    def _split(self, s: torch.Tensor):
        if s.dim() <= self.dim or s.shape[self.dim] % 2:
            raise ValueError(f"x: expected an even size along dim {self.dim} (two coupling halves), "
                             f"got shape {tuple(s.shape)}")
        return s.chunk(2, dim=self.dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the state's arithmetic (float64, int64 fixed point, or ``x`` itself)."""
        return self._codec(True).encode(x)

    def decode(self, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A state back in ``dtype``."""
        return self._codec(True).decode(s, dtype)

    @torch.no_grad()
    def forward_state(self, s: torch.Tensor, *cond, dtype: torch.dtype = torch.float32, _codec=None) -> torch.Tensor:
        """The stack on an encoded state (no autograd): what the reversible forward computes."""
        codec = _codec or self._codec(True)
        with _deterministic_scope(s.device, self._deterministic()):
            s1, s2 = self._split(s)
            for blk in self.blocks:
                s1, s2 = blk.forward_state(s1, s2, cond, codec, dtype, _noop)
        return torch.cat([s1, s2], dim=self.dim)

    @torch.no_grad()
    def inverse_state(self, s: torch.Tensor, *cond, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The input state rebuilt from the output state, block by block: what the backward does."""
        codec = self._codec(True)
        with _deterministic_scope(s.device, self._deterministic()):
            s1, s2 = self._split(s)
            for blk in reversed(self.blocks):
                s1, s2 = blk.inverse_state(s1, s2, cond, codec, dtype)
        return torch.cat([s1, s2], dim=self.dim)

    @torch.no_grad()
    def inverse(self, y: torch.Tensor, *cond) -> torch.Tensor:
        """The input rebuilt from an output ``y`` (in ``y``'s dtype)."""
        return self.decode(self.inverse_state(self.encode(y), *cond, dtype=y.dtype), y.dtype)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *cond) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        self._split(x)
        # the parameters that take gradients, per block (also handed to each block's autograd node)
        locs = [[] for _ in self.blocks]
        per_block = ([_trainable_params(blk, loc) for blk, loc in zip(self.blocks, locs)] if torch.is_grad_enabled()
                     else [])
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(isinstance(c, torch.Tensor) and c.requires_grad for c in cond) or any(per_block))
        if not needs_grad:
            codec = self._codec(True)
            s = self.forward_state(codec.encode(x), *cond, dtype=x.dtype, _codec=codec)
            return codec.finish(codec.decode(s, x.dtype))
        if not self.reversible:
            return self._plain(x, cond)
        chain = _Chain(self, cond, x)
        chain.locs = locs  # where each block's parameters were found (checked again in the backward)
        tensors = [cond[i] for i in chain.slots]
        s1, s2 = _Enter.apply(chain, x)
        for k, bp in enumerate(per_block):
            s1, s2 = _Block.apply(chain, k, len(bp), s1, s2, *tensors, *bp)
        return _Exit.apply(chain, s1, s2)

    def _plain(self, x, cond):
        codec = self._codec(reversible=False)
        s1, s2 = self._split(codec.encode(x))
        for blk in self.blocks:
            s1, s2 = blk.forward_state(s1, s2, cond, codec, x.dtype, _noop)
        return codec.decode(torch.cat([s1, s2], dim=self.dim), x.dtype)
