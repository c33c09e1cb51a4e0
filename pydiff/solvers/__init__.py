"""Per-sampler steppers over the fused solver-step op: float64 coefficients on the host, history
as a list of tensors, one kernel per model evaluation.  Each takes the options of the matching
diffusers scheduler (or ``from_config(scheduler.config)``)."""
from pydiff.solvers.ddim import DDIMInverseSolver, DDIMSolver
from pydiff.solvers.ddpm import DDPMSolver
from pydiff.solvers.dpmpp import DPMSolverPPSolver
from pydiff.solvers.edict import EDICTSolver
from pydiff.solvers.euler import EulerSolver, HeunSolver
from pydiff.solvers.flow import FlowEulerSolver
from pydiff.solvers.plms import PLMSSolver
from pydiff.solvers.unipc import UniPCSolver

__all__ = ["DDIMInverseSolver", "DDIMSolver", "DDPMSolver", "DPMSolverPPSolver", "EDICTSolver", "EulerSolver",
           "FlowEulerSolver", "HeunSolver", "PLMSSolver", "UniPCSolver"]
