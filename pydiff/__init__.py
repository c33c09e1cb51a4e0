"""pydiff: performance kernels for diffusion models.

Families: fused solver steps (``pydiff.ops.solver_step`` and the per-sampler steppers in
``pydiff.solvers``); more families land in later releases.
"""
from pydiff.ops import _library  # noqa: F401  (defines torch.ops.pydiff.* and loads pydiff._C)
from pydiff import _ext
from pydiff.backend import available_backends, get_backend, set_backend, use_backend
from pydiff.ops import StepCoeffs, cfg_rescale, solver_step

__version__ = "0.1.0"
__all__ = ["StepCoeffs", "available_backends", "cfg_rescale", "get_backend", "set_backend", "solver_step",
           "use_backend", "__version__"]


def build_info() -> dict:
    """What this install was built with."""
    return {"version": __version__, "cpu_kernels": _ext.has_cpu_kernels(), "cuda_kernels": _ext.has_cuda_kernels(),
            "cuda_archs": _ext.cuda_archs(), "extension_error": _ext.LOAD_ERROR}
