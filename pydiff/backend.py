"""Backend choice: ``cuda``, ``triton``, ``cpu`` (C++), ``torch`` (pure-torch reference), ``auto``.

``auto`` (the default) takes, for CUDA tensors, the CUDA kernels when they were built for this GPU,
else Triton; for CPU tensors the C++ kernels when built, else the torch reference.  Force one
globally with :func:`set_backend` or the ``PYDIFF_BACKEND`` environment variable, for a block with
:func:`use_backend`, or per call with the ``backend=`` keyword of each op.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from pydiff import _ext

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
#: the backends whose ops are the compiled extension's, which validate their own arguments in C++
COMPILED = ("cuda", "cpu")
_state = {"backend": os.environ.get("PYDIFF_BACKEND") or "auto"}  # (unset or empty: auto)
if _state["backend"] not in BACKENDS:
    raise ValueError(f"PYDIFF_BACKEND: expected one of {BACKENDS}, got {_state['backend']!r}")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (one of ``BACKENDS``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager that sets the default backend for the block."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors on a GPU, and CPU tensors only under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run tensors on ``device``."""
    out = []
    if device.type == "cuda" and _ext.has_cuda_kernels():
        out.append("cuda")
    if triton_usable(device):
        out.append("triton")
    if device.type == "cpu" and _ext.has_cpu_kernels():
        out.append("cpu")
    out.append("torch")
    return out


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def resolve_tensor(backend: str | None, t: torch.Tensor) -> str:
    """``resolve(backend, t.device)`` (no ``auto_triton``) for the calls on every op's hot path: a CPU
    or CUDA tensor whose compiled kernels are built is answered from ``t.is_cpu`` / ``t.is_cuda``
    (~0.03 us) without reading ``t.device`` (~0.2 us; resolve took 0.4-0.6 us in all), else by resolve."""
    name = _state["backend"] if backend is None else backend
    if t.is_cuda and (name == "auto" or name == "cuda") and _ext.has_cuda_kernels():
        return "cuda"
    if t.is_cpu and (name == "auto" or name == "cpu") and _ext.has_cpu_kernels():
        return "cpu"
    return resolve(backend, t.device)


def resolve(backend: str | None, device: torch.device, *, auto_triton: bool = False) -> str:
    """The backend a call runs on; raises if a forced backend cannot run on ``device``.

    ``auto_triton``: under ``auto``, CUDA tensors go to Triton when it is installed (an op whose
    Triton kernel is the faster one there), else as usual; except while ``torch.compile`` traces,
    where the registered custom op (CUDA kernel, with its fake kernel) keeps the graph whole (the
    Triton launchers are plain Python that Dynamo would break the graph on)."""
    name = _state["backend"] if backend is None else backend
    if name == "auto":
        if device.type == "cuda":
            if auto_triton and triton_available() and not (_ext.has_cuda_kernels() and _compiling()):
                return "triton"
            return "cuda" if _ext.has_cuda_kernels() else ("triton" if triton_available() else "torch")
        return "cpu" if (device.type == "cpu" and _ext.has_cpu_kernels()) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return name
    # the common forced choices without building the list (this runs on every op call)
    if name == "cpu" and device.type == "cpu" and _ext.has_cpu_kernels():
        return name
    if name == "cuda" and device.type == "cuda" and _ext.has_cuda_kernels():
        return name
    if name not in available_backends(device):
        why = {
            "cuda": "needs CUDA tensors and the CUDA kernels built into pydiff._C",
            "cpu": "needs CPU tensors and the compiled extension pydiff._C",
            "triton": "needs triton and CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)",
        }[name]
        raise RuntimeError(f"backend: {name!r} cannot run tensors on {device}: it {why}")
    return name
