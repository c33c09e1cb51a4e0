"""Integrations of pydiff's kernels with other libraries.

``pydiff.integrations.diffusers``: drop-in replacements for diffusers' schedulers (DDIM, DDPM,
DPM-Solver++, Euler, Heun, PNDM, UniPC, flow-matching Euler) whose ``step`` is one fused pydiff
kernel.  Imported on demand, so pydiff itself does not need diffusers.
"""
__all__ = ["diffusers"]
