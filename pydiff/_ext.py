"""Loads the compiled extension ``pydiff._C`` (C++ CPU kernels, and CUDA kernels when built).

Without it pydiff still imports and runs on the Triton and pure-torch backends; one warning says so.
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (the extension links against torch)

_C = None
LOAD_ERROR: str | None = None

if os.environ.get("PYDIFF_DISABLE_EXT", "0") == "1":
    LOAD_ERROR = "disabled by PYDIFF_DISABLE_EXT=1"
else:
    try:
        if os.environ.get("PYDIFF_SIMULATE_NO_EXT", "0") == "1":  # tests: behave as if never built
            raise ImportError("simulated: pydiff was installed without a compiler (PYDIFF_SIMULATE_NO_EXT=1)")
        from pydiff import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # no compiler at install time, or an ABI mismatch
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

if _C is None and os.environ.get("PYDIFF_DISABLE_EXT", "0") != "1":
    warnings.warn(
        "pydiff: the compiled extension pydiff._C is not available "
        f"({LOAD_ERROR}); the 'cpu' and 'cuda' backends are off, and pydiff runs on the "
        "'triton' and 'torch' backends. Reinstall with a C++ compiler (and nvcc for CUDA) to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_kernels() -> bool:
    return _C is not None


_HAS_CUDA = _C is not None and bool(_C.built_with_cuda())


def has_cuda_kernels() -> bool:
    return _HAS_CUDA


def cuda_archs() -> str:
    return _C.cuda_archs() if _C is not None else ""
