"""Op wrappers: argument checks, backend choice, and the ``torch.ops.pydiff`` registrations."""
from pydiff.ops import invertible, quant, sampling  # noqa: F401  (registers fakes and autograd)
from pydiff.ops.solver import MAX_HISTORY, StepCoeffs, cfg_rescale, solver_step

__all__ = ["MAX_HISTORY", "StepCoeffs", "cfg_rescale", "solver_step"]
