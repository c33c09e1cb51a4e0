"""Pure-torch references: what each op means, evaluated in float64 by default."""
from pydiff.reference.solver import cfg_rescale_ref, num_coeffs, solver_step_ref

__all__ = ["cfg_rescale_ref", "num_coeffs", "solver_step_ref"]
