"""Op wrappers: argument checks, backend choice, and the ``torch.ops.pydiff`` registrations."""
from pydiff.ops.solver import MAX_HISTORY, StepCoeffs, cfg_rescale, solver_step

__all__ = ["MAX_HISTORY", "StepCoeffs", "cfg_rescale", "solver_step"]
