"""Fused solver step: ``torch.ops.pydiff.solver_step`` and its Python wrapper.

One kernel per sampler step reads the sample, the model output(s), the history entries and the
noise once and writes the next sample and the new history entry once.  The formula is defined in
:mod:`pydiff.reference.solver`; :class:`StepCoeffs` builds its coefficient vector by name.

Backends: ``cuda`` (csrc/solver/solver_step_cuda.cu), ``triton`` (triton_kernels/solver.py),
``cpu`` (csrc/solver/solver_step_cpu.cpp) and ``torch`` (the reference, computed in fp32).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.compiler import is_compiling as _is_compiling

from pydiff import _ext, backend as _backend
from pydiff.ops._library import lib  # noqa: F401  (defines the schemas)
from pydiff.reference.solver import HEAD, ROW, cfg_rescale_ref, num_coeffs, solver_step_ref

#: Most history entries one step can read (PLMS reads 3 eps + 1 sample; UniPC-3 reads 3 + 1).
MAX_HISTORY = 6
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: float64 tensors are accepted too and run on the torch backend, computing in float64 (exact
#: inversion tests and references); the compiled kernels take the three dtypes above.
ALL_DTYPES = FLOAT_DTYPES + (torch.float64,)


class StepCoeffs:
    """Builds the flat float64 coefficient vector of one step by name.

    >>> c = StepCoeffs(history=1)
    >>> c.set(px=1 / a, pm=-s / a)                    # d = x0 = (x - s * eps) / a
    >>> c.out(0, x=r, d=-a_t * (math.exp(-h) - 1) * (1 + 1 / (2 * q)), h=[...])
    >>> c.out(1, d=1.0)                               # history entry = x0
    >>> c.tolist()

    Unset coefficients are 0, except ``g`` (guidance scale) which defaults to 1.
    """

    __slots__ = ("k", "v")

    def __init__(self, history: int = 0):
        if not 0 <= history <= MAX_HISTORY:
            raise ValueError(f"history: expected 0..{MAX_HISTORY} entries, got {history}")
        self.k = history
        self.v = [0.0] * num_coeffs(history)
        self.v[0] = 1.0

    def set(self, **kw: float) -> "StepCoeffs":
        for name, val in kw.items():
            if name not in HEAD:
                raise KeyError(f"StepCoeffs.set: unknown coefficient {name!r}; expected one of {HEAD}")
            self.v[HEAD.index(name)] = float(val)
        return self

    def out(self, row: int, h: Sequence[float] = (), **kw: float) -> "StepCoeffs":
        if row not in (0, 1):
            raise ValueError(f"row: expected 0 (next sample) or 1 (history entry), got {row}")
        base = len(HEAD) + row * (len(ROW) + self.k)
        for name, val in kw.items():
            if name not in ROW:
                raise KeyError(f"StepCoeffs.out: unknown term {name!r}; expected one of {ROW} or h=[...]")
            self.v[base + ROW.index(name)] = float(val)
        if len(h) > self.k:
            raise ValueError(f"h: {len(h)} history coefficients for {self.k} history entries")
        for i, val in enumerate(h):
            self.v[base + len(ROW) + i] = float(val)
        return self

    def tolist(self) -> list:
        return list(self.v)

    def __repr__(self) -> str:
        return f"StepCoeffs(history={self.k}, {self.v})"


def _check_same(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (the shape of x), got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def check_solver_step_args(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                           clip_lo, clip_hi) -> None:
    """Raise a clear exception for bad input; shared by every backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ALL_DTYPES:
        raise TypeError(f"x: expected dtype float32, float16, bfloat16 (or float64 on the torch backend), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (batch first), got a 0-d tensor")
    _check_same("model_cond", model_cond, x)
    _check_same("model_uncond", model_uncond, x)
    _check_same("noise", noise, x)
    if model_uncond is not None and model_cond is None:
        raise ValueError("model_uncond: given without model_cond (pass the conditional output as model_cond)")
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history: expected a list or tuple of tensors, got {type(history).__name__}")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"history: expected at most {MAX_HISTORY} entries, got {len(history)}")
    for i, h in enumerate(history):
        if h is None:
            raise TypeError(f"history[{i}]: expected a tensor, got None")
        _check_same(f"history[{i}]", h, x)
    n = num_coeffs(len(history))
    if coeff_table is None:
        if len(coeffs) != n:
            raise ValueError(f"coeffs: expected {n} values for {len(history)} history entries, got {len(coeffs)}")
        if not all(map(math.isfinite, coeffs)):
            i = next(i for i, c in enumerate(coeffs) if not math.isfinite(c))
            raise ValueError(f"coeffs[{i}]: expected a finite coefficient, got {coeffs[i]}")
        if step is not None:
            raise ValueError("step: only used with coeff_table")
    else:
        if len(coeffs) != 0:
            raise ValueError("coeffs: pass either coeffs or coeff_table, not both")
        if not isinstance(coeff_table, torch.Tensor) or coeff_table.dtype != torch.float64 or coeff_table.dim() != 2:
            raise TypeError("coeff_table: expected a 2-D float64 tensor [steps, coeffs]")
        if coeff_table.shape[1] != n or coeff_table.shape[0] < 1:
            raise ValueError(f"coeff_table: expected shape [steps >= 1, {n}] for {len(history)} history entries, "
                             f"got {tuple(coeff_table.shape)}")
        if coeff_table.device != x.device:
            raise ValueError(f"coeff_table: expected device {x.device}, got {coeff_table.device}")
        if step is None or not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
            raise TypeError("step: expected a one-element int64 tensor (the device-side step counter)")
        if step.device != x.device:
            raise ValueError(f"step: expected device {x.device}, got {step.device}")
    if row_scale is not None:
        if not isinstance(row_scale, torch.Tensor) or row_scale.dtype != torch.float32:
            raise TypeError("row_scale: expected a float32 tensor of shape [batch]")
        if row_scale.shape != (x.shape[0],):
            raise ValueError(f"row_scale: expected shape ({x.shape[0]},), got {tuple(row_scale.shape)}")
        if row_scale.device != x.device:
            raise ValueError(f"row_scale: expected device {x.device}, got {row_scale.device}")
    if math.isnan(clip_lo) or math.isnan(clip_hi):
        raise ValueError(f"clip: expected numbers, got ({clip_lo}, {clip_hi})")


def _torch_impl(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo, clip_hi,
                write_history=True, x0_stats=None):
    if coeff_table is not None:
        idx = step.reshape(1).clamp(0, coeff_table.shape[0] - 1)
        coeffs = coeff_table.index_select(0, idx)[0]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return solver_step_ref(x, model_cond, model_uncond, history, noise, row_scale, coeffs, clip_lo, clip_hi,
                           compute_dtype=cd, write_history=write_history, x0_stats=x0_stats)


def _triton_impl(*args, x0_stats=None):
    from pydiff.triton_kernels.solver import solver_step_triton

    return solver_step_triton(*args, x0_stats=x0_stats)


def _track_torch(*args):
    return _torch_impl(*args[:-1], x0_stats=args[-1])


def _track_triton(*args):
    return _triton_impl(*args[:-1], x0_stats=args[-1])


@torch.library.register_fake("pydiff::solver_step", lib=lib)
def _solver_step_fake(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                      clip_lo, clip_hi, write_history=True):
    if not _same_device(x, model_cond, model_uncond, history, noise, row_scale, coeff_table, step):
        # reached in eager mode when a meta tensor is mixed with real ones (the dispatcher picks Meta)
        check_solver_step_args(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                               clip_lo, clip_hi)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if write_history else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), h


@torch.library.register_fake("pydiff::solver_step_track", lib=lib)
def _solver_step_track_fake(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                            clip_lo, clip_hi, write_history, x0_stats):
    return _solver_step_fake(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                             clip_lo, clip_hi, write_history)


@torch.library.register_fake("pydiff::cfg_rescale", lib=lib)
def _cfg_rescale_fake(model_cond, model_uncond, guidance, phi):
    return model_cond.new_empty((model_cond.shape[0],), dtype=torch.float32)


if not _ext.has_cpu_kernels():
    # No compiled extension: the op still exists, backed by the reference (CPU) and Triton (CUDA).
    lib.impl("solver_step", _torch_impl, "CPU")
    lib.impl("solver_step", lambda *a: (_triton_impl if _backend.triton_available() else _torch_impl)(*a), "CUDA")
    lib.impl("solver_step_track", _track_torch, "CPU")
    lib.impl("solver_step_track", lambda *a: (_track_triton if _backend.triton_available() else _track_torch)(*a),
             "CUDA")
    lib.impl("cfg_rescale", cfg_rescale_ref, "CPU")
    lib.impl("cfg_rescale", cfg_rescale_ref, "CUDA")


def solver_step(
    x: torch.Tensor,
    model_cond: Optional[torch.Tensor] = None,
    model_uncond: Optional[torch.Tensor] = None,
    history: Sequence[torch.Tensor] = (),
    noise: Optional[torch.Tensor] = None,
    *,
    coeffs: Sequence[float] | StepCoeffs = (),
    coeff_table: Optional[torch.Tensor] = None,
    step: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    clip: Optional[tuple] = None,
    backend: Optional[str] = None,
    check: bool = True,
    write_history: Optional[bool] = None,
    x0_stats: Optional[torch.Tensor] = None,
):
    """One fused solver step.  See :mod:`pydiff.reference.solver` for the formula.

    Args:
        x: current sample ``[B, ...]``, float32/float16/bfloat16.
        model_cond: model output (the conditional branch under CFG), shape and dtype of x.
        model_uncond: unconditional model output; with it, ``m = u + g * (c - u)``.
        history: up to 6 history entries, each shaped like x.
        noise: optional noise, shaped like x.
        coeffs: ``16 + 2 * len(history)`` float64 coefficients (or a :class:`StepCoeffs`), computed
            on the host: they travel as kernel arguments, so the step never syncs with the host.
        coeff_table, step: alternatively a float64 device table ``[steps, 16 + 2K]`` and a
            one-element int64 device tensor; the kernel reads row ``step`` (clamped to the table).
        row_scale: optional float32 ``[B]`` per-sample factor on m (guidance rescale).
        clip: optional ``(lo, hi)`` clamp of ``d`` (the x0 estimate for ``clip_sample``).
        backend: ``cuda``, ``triton``, ``cpu``, ``torch`` or ``auto`` (default: the global choice).
        check: validate the arguments in Python.  ``False`` skips only what the compiled ops (``cpu``,
            ``cuda``) check again themselves; the ``triton`` and ``torch`` backends always check.
        write_history: write the second output; by default only when its coefficient row is not all
            zero (or a coefficient table is used). When not written it is an empty tensor.
        x0_stats: optional float64 ``[2, *x.shape]`` contiguous tensor, updated in place inside the
            same kernel: ``x0_stats[0] += d``, ``x0_stats[1] += d**2`` with ``d`` the step's x0
            estimate (``px x + pm m``, clamped); see :func:`x0_variance`.  Runs as
            ``torch.ops.pydiff.solver_step_track``.

    Returns:
        ``(x_next, history_entry)``, both shaped like x, in x's dtype (history_entry empty when not
        written).
    """
    if isinstance(coeffs, StepCoeffs):
        coeffs = coeffs.v
    elif type(coeffs) is not list:
        coeffs = list(coeffs)
    if clip is None:
        clip_lo, clip_hi = _NEG_INF, _INF
    else:
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise TypeError(f"clip: expected a (lo, hi) pair of numbers or None, got {clip!r}")
        clip_lo, clip_hi = float(clip[0]), float(clip[1])
    if type(history) is not list:
        if not isinstance(history, (list, tuple)):
            raise TypeError(f"history: expected a list or tuple of tensors, got {type(history).__name__}")
        history = list(history)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float64:
        if (_backend.get_backend() if backend is None else backend) not in ("auto", "torch"):
            raise TypeError(f"x: float64 runs on the 'torch' backend only (computing in float64), not {backend!r}")
        name = "torch"
    else:
        name = _backend.resolve_tensor(backend, x)
    direct = _direct if name in _COMPILED and not _is_compiling() else None
    if direct is not None and x0_stats is None:
        # The compiled kernel without torch.ops' dispatcher (see _direct): it returns NotImplemented,
        # having done nothing, unless every tensor is a plain torch.Tensor on x's device, so when it
        # runs, the check below would not have run either (the op validates the rest with the same
        # messages); write_history=None is resolved by it the same way as below.
        out = direct(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo,
                     clip_hi, write_history)
        if out is not NotImplemented:
            return out
    if name not in _COMPILED or (check and not _same_device(x, model_cond, model_uncond, history, noise, row_scale,
                                                            coeff_table, step)):
        # The compiled ops validate everything else themselves, with the same messages; what they cannot
        # see is a tensor on another device (the dispatcher would pick a kernel by it), so that is
        # checked here, and a failure re-runs the full check for its message.  The Triton and torch
        # backends have no checks of their own: check=False does not skip them there.
        check_solver_step_args(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
                               clip_lo, clip_hi)
    if write_history is None:
        base = len(HEAD) + len(ROW) + len(history)
        write_history = coeff_table is not None or any(coeffs[base:])  # any nonzero (or NaN) coefficient
    args = (x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo, clip_hi,
            bool(write_history))
    if x0_stats is not None:
        if check or name not in _COMPILED:
            check_x0_stats(x0_stats, x)
        if name in ("cuda", "cpu"):
            if direct is not None:
                out = direct(*args, x0_stats)
                if out is not NotImplemented:
                    return out
            return torch.ops.pydiff.solver_step_track(*args, x0_stats)
        return (_track_triton if name == "triton" else _track_torch)(*args, x0_stats)
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.solver_step(*args)
    if name == "triton":
        return _triton_impl(*args)
    return _torch_impl(*args)


_COMPILED = _backend.COMPILED

#: ``pydiff._C.solver_step_direct`` (csrc/bindings/module.cpp): the C++ bodies of
#: ``torch.ops.pydiff.solver_step`` / ``solver_step_track`` called from Python without the dispatcher,
#: whose boxed parsing of the 12-argument schema was most of a call's host time.  128-element tensors,
#: per call: torch.ops 3.9 us, the direct call 1.15 us; pydiff.solver_step 5.2 -> 1.8 us (check=False)
#: and 5.8 -> 1.8 us (check=True: the device check is done in C++) on a 2-core CPU box; on an H100
#: host with CUDA tensors 16-18 -> 10 us (dispatcher path, same run, vs direct path).  It
#: returns NotImplemented, and the call goes through torch.ops, whenever the dispatcher would do more
#: than call the CPU / CUDA kernel: tensor subclasses (FakeTensor, ...), a tensor requiring grad under
#: grad mode, dispatch / function modes, functorch transforms, jit tracing, the profiler, tensors on
#: different devices, unusual argument types.  Not used while torch.compile / export trace
#: (``is_compiling``: Dynamo must see the op).  None without the compiled extension (or an old build).
_direct = getattr(_ext._C, "solver_step_direct", None) if _ext._C is not None else None
_NEG_INF, _INF = float("-inf"), float("inf")


def _same_device(x, model_cond, model_uncond, history, noise, row_scale, coeff_table, step) -> bool:
    """Every tensor argument is a tensor on x's device (the fast pre-dispatch check)."""
    dev = x.device
    for t in (model_cond, model_uncond, noise, row_scale, coeff_table, step):
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != dev):
            return False
    for h in history:
        if not isinstance(h, torch.Tensor) or h.device != dev:
            return False
    return True


def check_x0_stats(x0_stats, x) -> None:
    if not isinstance(x0_stats, torch.Tensor):
        raise TypeError(f"x0_stats: expected a torch.Tensor, got {type(x0_stats).__name__}")
    if x0_stats.dtype != torch.float64:
        raise TypeError(f"x0_stats: expected dtype float64, got {x0_stats.dtype}")
    if tuple(x0_stats.shape) != (2,) + tuple(x.shape):
        raise ValueError(f"x0_stats: expected shape {(2,) + tuple(x.shape)} ([2, *x.shape]), got "
                         f"{tuple(x0_stats.shape)}")
    if not x0_stats.is_contiguous():
        raise ValueError("x0_stats: expected a contiguous tensor (it is updated in place)")
    if x0_stats.device != x.device:
        raise ValueError(f"x0_stats: expected device {x.device}, got {x0_stats.device}")


def x0_stats_like(x: torch.Tensor) -> torch.Tensor:
    """A zeroed float64 ``[2, *x.shape]`` accumulator for ``solver_step(..., x0_stats=)``."""
    return torch.zeros((2,) + tuple(x.shape), dtype=torch.float64, device=x.device)


def x0_variance(x0_stats: torch.Tensor, n: int, per_sample: bool = True) -> torch.Tensor:
    """Variance of the x0 estimate over the ``n`` tracked steps from the running sums.

    ``var = S2 / n - (S1 / n)**2`` per element (float64, clamped at 0); with ``per_sample`` the mean
    over all elements of each sample: the hallucination score of Aithal et al. 2024 ("Understanding
    Hallucinations in Diffusion Models through Mode Interpolation"), float64 ``[B]``.
    """
    if n < 1:
        raise ValueError(f"n: expected the number of tracked steps (>= 1), got {n}")
    mean = x0_stats[0] / n
    var = (x0_stats[1] / n - mean * mean).clamp_min(0.0)
    return var.flatten(1).mean(dim=1) if per_sample else var


def cfg_rescale(model_cond: torch.Tensor, model_uncond: torch.Tensor, guidance: float, phi: float,
                *, backend: Optional[str] = None) -> torch.Tensor:
    """Per-sample guidance-rescale factor ``r[b]`` (float32 ``[B]``) to pass as ``row_scale``.

    ``r[b] = phi * std(c[b]) / std(u[b] + g (c[b] - u[b])) + (1 - phi)`` (Lin et al. 2023), with
    sums accumulated in float64.  One read of both model outputs.
    """
    for name, t in (("model_cond", model_cond), ("model_uncond", model_uncond)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_same("model_uncond", model_uncond, model_cond)
    if model_cond.dtype not in FLOAT_DTYPES:
        raise TypeError(f"model_cond: expected dtype float32, float16 or bfloat16, got {model_cond.dtype}")
    if model_cond.dim() < 2 or model_cond.shape[0] < 1 or model_cond[0].numel() < 2:
        raise ValueError(f"model_cond: expected [B >= 1, ...] with at least 2 elements per sample, got "
                         f"{tuple(model_cond.shape)}")
    if not (isinstance(guidance, (int, float)) and isinstance(phi, (int, float))):
        raise TypeError(f"guidance, phi: expected numbers, got {type(guidance).__name__}, {type(phi).__name__}")
    if not (math.isfinite(guidance) and math.isfinite(phi)):
        raise ValueError(f"guidance, phi: expected finite numbers, got {guidance}, {phi}")
    name = _backend.resolve(backend, model_cond.device)
    if name in ("cuda", "cpu"):
        return torch.ops.pydiff.cfg_rescale(model_cond, model_uncond, float(guidance), float(phi))
    if name == "triton":
        from pydiff.triton_kernels.solver import cfg_rescale_triton

        return cfg_rescale_triton(model_cond, model_uncond, float(guidance), float(phi))
    return cfg_rescale_ref(model_cond, model_uncond, guidance, phi)
