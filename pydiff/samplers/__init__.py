"""Complete sampling loops over a user's model, one fused solver step per model evaluation.

    from pydiff.samplers import sample
    x = sample(model, (4, 4, 64, 64), "dpmpp_2m", steps=25, guidance_scale=7.5, cond=emb, uncond=null_emb,
               generator=torch.Generator("cuda").manual_seed(0), device="cuda")

``model(x, t, cond) -> prediction`` (see :mod:`pydiff.samplers.loop` for the exact convention).
Samplers: ``ddim``, ``ddpm``, ``dpmpp_2m``, ``dpmpp_3m``, ``dpmpp_2m_sde``, ``plms``, ``euler``,
``heun``, ``unipc``, ``flow_euler``; their coefficients come from the steppers of
:mod:`pydiff.solvers` (diffusers parity), arranged by :func:`build_plan` into a fixed program that
can also run from a float64 device coefficient table and be captured, model included, in one CUDA
graph (:class:`CudaGraphSampler`, :func:`capture_sampling_loop`).
"""
from pydiff.samplers.graph import CudaGraphSampler, capture_sampling_loop
from pydiff.samplers.loop import SamplingLoop, draw_noise, sample
from pydiff.samplers.plan import SAMPLERS, Eval, Plan, build_plan, pad_coeffs, resolve_sampler

__all__ = ["CudaGraphSampler", "Eval", "Plan", "SAMPLERS", "SamplingLoop", "available_samplers", "build_plan",
           "capture_sampling_loop", "draw_noise", "pad_coeffs", "resolve_sampler", "sample"]


def available_samplers() -> list:
    """Names accepted by :func:`sample` (aliases such as ``dpm++2m`` also work)."""
    return sorted(SAMPLERS)
