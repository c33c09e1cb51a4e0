"""Inversion and editing: DDIM inversion, EDICT, edit-friendly DDPM inversion and Direct Inversion.

Every function here runs a user's model through the fused solver step (:func:`pydiff.solver_step`),
one op call per model evaluation, with the coefficients of the per-sampler steppers
(:mod:`pydiff.solvers`) computed in float64 on the host, so no loop synchronises with the host.

The model
---------
``model(x, t, cond) -> eps``: ``x`` is the sample ``[B, ...]``, ``t`` the timestep as a 0-d int64
tensor on x's device (an element of the scheduler's ``timesteps``), ``cond`` whatever conditioning
the model takes (a text embedding, class labels, ``None``, ...); it returns the epsilon prediction
shaped and typed like ``x`` (or v / x0 when the config's ``prediction_type`` says so: DDIM, DDPM
and Direct Inversion follow it; EDICT takes epsilon only).  It must be deterministic: exact
inversion rebuilds its input only if the model gives bit-identical outputs for bit-identical inputs.

Classifier-free guidance: pass ``uncond`` (the unconditional conditioning) and ``guidance_scale``
``g``; the op forms ``u + g (c - u)`` with ``c = model(x, t, cond)`` and ``u = model(x, t,
uncond)``.  With ``cfg_batch=True`` (``cond`` and ``uncond`` tensors with a batch dimension) the two
branches run as one call ``model(cat([x, x]), t, cat([uncond, cond]))``.

Schedules
---------
``config`` is a diffusers scheduler config (``pipe.scheduler.config``) or a dict of the DDIM /
DDPM scheduler keys; ``**overrides`` change single keys.  Unless given, ``clip_sample`` is False
here (clipping the x0 estimate is not invertible).  The same config must be used for inversion
and for reconstruction / editing.

What is here
------------
* :func:`ddim_invert` -> :class:`DDIMInversion` (latents, ``reconstruct()``, ``reconstruction_error()``:
  DDIM inversion is approximate and says by how much); :func:`ddim_sample`.
* :func:`edict_invert` / :func:`edict_generate` (Wallace et al. 2022, mixing p = 0.93): exact
  inversion, both orders, on the coupled pair held as :class:`EDICTLatents` ``(y, d = y - x)``.
* :func:`ddpm_invert` -> :class:`DDPMInversion` (Huberman-Spiegelglas et al. 2023): the noise maps
  ``z_t``; ``replay()`` rebuilds the input with the same condition and edits with another.
* :func:`direct_inversion_offsets`, :func:`direct_inversion_edit` (Ju et al. 2023): per-step
  offsets that keep the source branch on the inversion trajectory while the target branch edits.

Measured reconstruction errors (fp32 unless said; tests/test_inversion.py records them): EDICT
<= 1e-6 both orders without guidance on the test denoiser (25 steps), 6e-7 (generate -> invert)
and 6e-6 (invert -> generate) on a random UNet (10 steps), 1e-15 in float64; edit-friendly DDPM
~1e-9; Direct Inversion's source branch 0; DDIM inversion 0.04-0.2 (it is not exact).

Precision
---------
float32, float16 and bfloat16 tensors run through the fused kernels (which compute in fp32).
float64 tensors (inputs and model) run through the float64 evaluation of the op's reference
formula (:func:`pydiff.reference.solver.solver_step_ref` with ``compute_dtype=float64``):
``pydiff.solver_step`` rejects float64 tensors, and its ``torch`` backend computes in fp32.
:func:`relative_error` is ``max |a - b| / max |b|`` (float64), the measure every reconstruction
error here reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.reference.solver import HEAD, ROW, solver_step_ref
from pydiff.solvers._common import clip_range
from pydiff.solvers.ddim import DDIMInverseSolver, DDIMSolver
from pydiff.solvers.ddpm import DDPMSolver
from pydiff.solvers.edict import EDICTSolver

__all__ = ["DDIMInversion", "DDPMInversion", "DirectInversionEdit", "EDICTInversion", "EDICTLatents", "ZERO_VARIANCE",
           "ddim_invert", "ddim_sample", "ddpm_invert", "ddpm_replay", "direct_inversion_edit",
           "direct_inversion_offsets", "edict_generate", "edict_invert", "relative_error"]

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max |ref|`` in float64 (a host sync: call it after a loop, not inside)."""
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    if x.shape != ref.shape:
        raise ValueError(f"relative_error: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    den = ref.abs().max()
    return ((x - ref).abs().max() / den).item() if den > 0 else (x - ref).abs().max().item()


class _Guided:
    """Evaluates ``model(x, t, cond)`` with classifier-free guidance; returns ``(cond_out, uncond_out)``."""

    def __init__(self, model: Model, cond, uncond, guidance_scale: float, cfg_batch: bool,
                 model_dtype: Optional[torch.dtype] = None):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, cond) -> eps, got {type(model).__name__}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale}")
        if uncond is None and g != 1.0:
            raise ValueError(f"guidance_scale={g}: classifier-free guidance needs uncond (the unconditional "
                             "conditioning); pass it, or leave guidance_scale at 1.0")
        if cfg_batch and uncond is not None and g != 1.0:
            if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)):
                raise TypeError("cfg_batch=True: cond and uncond must be tensors (they are concatenated along dim 0)")
            self.both = torch.cat([uncond, cond])
        else:
            self.both = None
        self.model, self.cond, self.uncond = model, cond, uncond
        self.g = g if uncond is not None else 1.0
        self.guided = uncond is not None and g != 1.0
        self.model_dtype = model_dtype  # the model sees x in this dtype (a wider state, e.g. EDICT's)

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        if self.model_dtype is not None and x.dtype != self.model_dtype:
            c, u = self._eval(x.to(self.model_dtype), t)
            return c.to(x.dtype), (None if u is None else u.to(x.dtype))
        return self._eval(x, t)

    def _eval(self, x: torch.Tensor, t: torch.Tensor):
        if not self.guided:
            return self._check(self.model(x, t, self.cond), x), None
        if self.both is not None:
            xx = torch.cat([x, x])
            u, c = self._check(self.model(xx, t, self.both), xx).chunk(2)
            return c, u
        return self._check(self.model(x, t, self.cond), x), self._check(self.model(x, t, self.uncond), x)

    @staticmethod
    def _check(out, x):
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            what = (f"{type(out).__name__}" if not isinstance(out, torch.Tensor)
                    else f"shape {tuple(out.shape)}, dtype {out.dtype}")
            raise TypeError(f"model: expected an eps tensor of shape {tuple(x.shape)} and dtype {x.dtype} "
                            f"(the sample's), got {what}")
        return out if out.is_contiguous() else out.contiguous()


def _step(coeffs: StepCoeffs, x, cond_out=None, uncond_out=None, history=(), noise=None, *, g=1.0, clip=None,
          backend=None, second: bool = False):
    """One fused step ``(out0, out1)`` with guidance scale ``g``; the second output is written only
    with ``second=True`` (the steppers' rows also write the x0 estimate, which these loops do not
    read).  float64 tensors use the float64 evaluation of the reference formula (the op itself takes
    fp32 / fp16 / bf16 only)."""
    v = list(coeffs.v)
    v[0] = float(g)
    wh = bool(second)
    if x.dtype == torch.float64:
        lo, hi = (float("-inf"), float("inf")) if clip is None else (float(clip[0]), float(clip[1]))
        return solver_step_ref(x, cond_out, uncond_out, list(history), noise, None, v, lo, hi,
                               compute_dtype=torch.float64, write_history=wh)
    return solver_step(x, cond_out, uncond_out, list(history), noise, coeffs=v, clip=clip, backend=backend,
                       write_history=wh)


def _config(config, overrides) -> dict:
    cfg = {} if config is None else dict(config)
    cfg.setdefault("clip_sample", False)
    cfg.update(overrides)
    return cfg


def _check_sample(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name}: expected a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected [B, ...], got a 0-d tensor")


def _clip(solver) -> Optional[tuple]:
    return clip_range(solver.config)


def _on(ts: torch.Tensor, device) -> torch.Tensor:
    """Host timesteps on ``device``: one non-blocking copy from pinned memory for CUDA (no host sync)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ts.pin_memory().to(device, non_blocking=True)
    return ts.to(device)


def _ddim_rows(solver: DDIMSolver) -> List[StepCoeffs]:
    """Deterministic (eta = 0) DDIM coefficient rows of a stepper after ``set_timesteps``."""
    return solver.coefficient_rows(0.0, False)


def _ddim_solver(steps: int, config, overrides=None) -> DDIMSolver:
    s = DDIMSolver.from_config(_config(config, overrides or {}))
    s.set_timesteps(steps)  # host timesteps: moved to the device once, with _on
    return s


def _ddim_loop(g: _Guided, x, rows, ts, clip, *, backend=None, trajectory=None):
    for i in range(len(rows)):
        c, u = g(x, ts[i])
        x, _ = _step(rows[i], x, c, u, g=g.g, clip=clip, backend=backend)
        if trajectory is not None:
            trajectory.append(x)
    return x


# ----------------------------------------------------------------------------------------------
# DDIM inversion
# ----------------------------------------------------------------------------------------------
@dataclass
class DDIMInversion:
    """Result of :func:`ddim_invert`.

    ``latents[k]`` is the sample at noise level ``k`` (``latents[0]`` the input, ``latents[-1]``
    = :attr:`noise` the fully inverted latent at ``timesteps[0]``); ``latents[k]`` for ``k >= 1``
    sits at timestep ``timesteps[-k]`` (``timesteps`` descending, as DDIM sampling visits them).
    DDIM inversion is only approximate (it evaluates the model at ``x_t`` to step away from it);
    :meth:`reconstruction_error` reports how far sampling back from :attr:`noise` lands.
    """

    latents: List[torch.Tensor]
    timesteps: torch.Tensor
    config: dict
    model: Model = field(repr=False)
    cond: Any = field(default=None, repr=False)
    uncond: Any = field(default=None, repr=False)
    guidance_scale: float = 1.0
    cfg_batch: bool = False
    backend: Optional[str] = None
    _recon: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def steps(self) -> int:
        return len(self.latents) - 1

    def reconstruct(self, model: Optional[Model] = None, *, cond=..., uncond=..., guidance_scale=None,
                    trajectory: Optional[list] = None) -> torch.Tensor:
        """DDIM sampling (eta = 0) from :attr:`noise` with the inversion's schedule; by default the
        inversion's model, conditioning and guidance (pass others to edit)."""
        same = model is None and cond is ... and uncond is ... and guidance_scale is None
        g = _Guided(self.model if model is None else model, self.cond if cond is ... else cond,
                    self.uncond if uncond is ... else uncond,
                    self.guidance_scale if guidance_scale is None else guidance_scale, self.cfg_batch)
        s = _ddim_solver(self.steps, self.config)
        out = _ddim_loop(g, self.noise, _ddim_rows(s), self.timesteps, _clip(s), backend=self.backend,
                         trajectory=trajectory)
        if same:
            self._recon = out
        return out

    def reconstruction_error(self) -> float:
        """``relative_error(reconstruct(), latents[0])``: how exact this DDIM inversion is."""
        if self._recon is None:
            self.reconstruct()
        return relative_error(self._recon, self.latents[0])


def ddim_invert(model: Model, x0: torch.Tensor, steps: int = 50, *, cond=None, uncond=None,
                guidance_scale: float = 1.0, cfg_batch: bool = False, config=None, backend: Optional[str] = None,
                **overrides) -> DDIMInversion:
    """DDIM inversion (Song et al. 2021; Dhariwal & Nichol 2021, eq. 13; diffusers
    ``DDIMInverseScheduler``): run the deterministic DDIM update toward noise::

        x_{t'} = sqrt(a_{t'}) x0(x_t) + sqrt(1 - a_{t'}) eps(x_t, t'),   x0(x_t) = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)

    with the model evaluated at the next (noisier) timestep as diffusers does.  ``x0`` is the clean
    sample (e.g. a VAE latent) ``[B, ...]``.  Returns a :class:`DDIMInversion` holding every latent;
    its ``reconstruct()`` samples back with :class:`pydiff.solvers.DDIMSolver` on the same schedule,
    and ``reconstruction_error()`` says how close that lands (DDIM inversion is not exact).
    """
    _check_sample("x0", x0)
    g = _Guided(model, cond, uncond, guidance_scale, cfg_batch)
    cfg = _config(config, overrides)
    inv = DDIMInverseSolver.from_config(cfg)
    inv.set_timesteps(steps)
    fwd = _ddim_solver(steps, cfg)  # the sampling schedule reconstruction will use
    if not torch.equal(inv.timesteps.flip(0), fwd.timesteps):
        raise ValueError(f"config: DDIM inversion visits {inv.timesteps.tolist()} but DDIM sampling "
                         f"{fwd.timesteps.tolist()} (reversed) for this config")
    ts = _on(inv.timesteps, x0.device)
    clip = _clip(inv)
    latents = [x0]
    x = x0
    for i in range(steps):
        t = ts[i]
        c, u = g(x, t)
        x, _ = _step(inv.step_row(i), x, c, u, g=g.g, clip=clip, backend=backend)
        latents.append(x)
    return DDIMInversion(latents, _on(fwd.timesteps, x0.device), cfg, model, cond, uncond, float(guidance_scale),
                         cfg_batch, backend)


def ddim_sample(model: Model, x: torch.Tensor, steps: int = 50, *, cond=None, uncond=None,
                guidance_scale: float = 1.0, cfg_batch: bool = False, config=None, backend: Optional[str] = None,
                trajectory: Optional[list] = None, **overrides) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) from ``x`` at the first timestep, one fused step per
    model call; ``trajectory`` (a list) collects every intermediate sample."""
    _check_sample("x", x)
    g = _Guided(model, cond, uncond, guidance_scale, cfg_batch)
    s = _ddim_solver(steps, config, overrides)
    return _ddim_loop(g, x, _ddim_rows(s), _on(s.timesteps, x.device), _clip(s), backend=backend,
                      trajectory=trajectory)


# ----------------------------------------------------------------------------------------------
# Rows derived from a stepper's row
# ----------------------------------------------------------------------------------------------
def _derive(row: StepCoeffs, *, scale: float = 1.0, z: Optional[float] = None,
            target: Optional[float] = None) -> StepCoeffs:
    """A single-output row ``scale * (row's output 0 without its noise term) + z * noise
    (+ target * h_new)``, with the row's guidance / prediction head (so the same clamp applies)."""
    k = row.k
    b = len(HEAD)
    rx, rm, rd, re, rz = row.v[b:b + len(ROW)]
    hs = [scale * c for c in row.v[b + len(ROW):b + len(ROW) + k]]
    new = StepCoeffs(history=k + (target is not None))
    new.v[:b] = row.v[:b]
    new.out(0, x=scale * rx, m=scale * rm, d=scale * rd, e=scale * re, z=0.0 if z is None else z,
            h=hs + ([target] if target is not None else []))
    return new


def _noise_coeff(row: StepCoeffs) -> float:
    return row.v[len(HEAD) + ROW.index("z")]


# ----------------------------------------------------------------------------------------------
# EDICT
# ----------------------------------------------------------------------------------------------
def _edict_solver(steps: int, mixing: float, config, overrides=None) -> EDICTSolver:
    cfg = _config(config, overrides or {})
    cfg["mixing_coeff"] = float(mixing)
    s = EDICTSolver.from_config(cfg)
    s.set_timesteps(steps)  # host timesteps
    return s


class _EDICTRows:
    """Coefficient rows of EDICT in the ``(y, d = y - x)`` form, for one schedule and guidance."""

    def __init__(self, s: EDICTSolver, g: float, guided: bool):
        p = float(s.config.mixing_coeff)
        q = 1.0 - p
        pp = p * p
        k = (q + pp) / pp                      # x_i = y' - k d'
        n, T = s.num_inference_steps, s.config.num_train_timesteps
        h = 3 if guided else 2                 # history: [y, c_y(, u_y)] / [c_x(, u_x), y]
        wc, wu = (g, 1.0 - g) if guided else (1.0, 0.0)
        self.start = StepCoeffs(history=1).out(0, x=1.0, h=[-k])
        self.gen, self.inv = [], []
        for t in s.timesteps.tolist():
            prev = t - T // n
            A = float(s.alphas_cumprod[t])
            Ap = float(s.alphas_cumprod[prev]) if prev >= 0 else s.final_alpha_cumprod
            a = math.sqrt(Ap / A)
            b = math.sqrt(1.0 - Ap) - a * math.sqrt(1.0 - A)
            g1 = StepCoeffs(history=1).out(0, x=a, m=b, h=[-a])
            # x: d, m: eps(x_i), h: [y, eps(y) (cond, uncond)].  D = a d + b (eps(x_i) - eps(y)),
            # y' = x_i + (q + p^2) D = a y + (q + p^2) b eps(x_i) + p q (b eps(y) - a d),  d' = p^2 D.
            # y' is formed from y, not from the rounded x_i: x_i's rounding only reaches the model input.
            yh = [p * q * b * wc, p * q * b * wu][:h - 1]
            dh = [-b * wc, -b * wu][:h - 1]
            g2 = (StepCoeffs(history=h).out(0, x=-p * q * a, m=(q + pp) * b, h=[a] + yh)
                  .out(1, x=pp * a, m=pp * b, h=[0.0] + [pp * c for c in dh]))
            i1 = StepCoeffs(history=1).out(0, x=1.0 / a, m=-b / a, h=[q / (p * a)])
            ih = [-b / a * wc, -b / a * wu][:h - 1]   # d = d' / (p^2 a) + (b / a)(m_y - m_x)
            i2 = StepCoeffs(history=h).out(0, x=1.0 / (pp * a), m=b / a, h=ih + [0.0])
            i2.out(1, x=-k / (pp * a), m=-k * b / a, h=[-k * c for c in ih] + [1.0])
            self.gen.append((g1, g2))
            self.inv.append((i1, i2))
        self.inv.reverse()


def _edict_generate(g: _Guided, y, d, s: EDICTSolver, backend=None):
    rows = _EDICTRows(s, g.g, g.guided)
    ts = _on(s.timesteps, y.device)
    for i, (g1, g2) in enumerate(rows.gen):
        t = ts[i]
        cy, uy = g(y, t)
        xi, _ = _step(g1, y, cy, uy, [d], g=g.g, backend=backend)
        cx, ux = g(xi, t)
        hist = [y, cy] + ([uy] if g.guided else [])
        y, d = _step(g2, d, cx, ux, hist, g=g.g, backend=backend, second=True)
    return y, d


def _edict_invert(g: _Guided, y, d, s: EDICTSolver, backend=None):
    rows = _EDICTRows(s, g.g, g.guided)
    ts = _on(s.inverse_timesteps, y.device)
    xi, _ = _step(rows.start, y, None, None, [d], backend=backend)
    for j, (i1, i2) in enumerate(rows.inv):
        t = ts[j]
        cx, ux = g(xi, t)
        y_new, _ = _step(i1, y, cx, ux, [d], g=g.g, backend=backend)
        cy, uy = g(y_new, t)
        hist = [cx] + ([ux] if g.guided else []) + [y_new]
        d, xi = _step(i2, d, cy, uy, hist, g=g.g, backend=backend, second=j + 1 < len(rows.inv))
        y = y_new
    return y, d


@dataclass
class EDICTLatents:
    """EDICT's coupled pair ``(x, y)``, held as ``y`` and ``d = y - x``.

    Why: EDICT's inverse step amplifies the difference ``x - y`` by ``1 / p^2`` per step (the
    mixing contracts it by ``p^2``: 1.16x per step, 1430x over 50 steps at p = 0.93).  Stored as
    two fp32 tensors, x and y each carry rounding errors of the size of ``eps |x|``, which feed that
    mode every step; stored as its own tensor, ``d`` carries errors relative to ``|d|``, which after
    generation is ~1e-3 of ``|x|``.  Measured on a small random UNet, fp32, Stable Diffusion's
    schedule, generation then inversion: 5e-7 (25 steps) and 1.5e-6 (50 steps) instead of 7e-6 and
    3e-4 with the pair stored as ``(x, y)`` (:class:`pydiff.solvers.EDICTSolver`).  After an
    *inversion* ``d`` grows to ``|x|`` (the inverse amplifies it), so inversion then generation is
    no better than the ``(x, y)`` form (1e-5 at 25 steps, 1.3-3e-5 at 50 against 0.7-1.3e-5):
    there the fp32 rounding noise of the model itself, evaluated at recomputed inputs that differ
    in the last bits, dominates.  Build one from a tensor (``x = y``, ``d = 0``) or a pair with
    :meth:`of`.
    """

    y: torch.Tensor
    d: torch.Tensor
    #: the dtype the model is evaluated in when it differs from the pair's (a float64 state of an fp32
    #: model: ``state_dtype`` of :func:`edict_invert`); carried along, so the latents of one run go
    #: straight into the next
    model_dtype: Optional[torch.dtype] = None

    @property
    def x(self) -> torch.Tensor:
        return self.y - self.d

    @classmethod
    def of(cls, latents) -> "EDICTLatents":
        """From an :class:`EDICTLatents`, a tensor (both sequences equal) or a pair ``(x, y)``."""
        if isinstance(latents, EDICTLatents):
            return latents
        if isinstance(latents, torch.Tensor):
            _check_sample("latents", latents)
            return cls(latents, torch.zeros_like(latents))
        if isinstance(latents, (tuple, list)) and len(latents) == 2:
            x, y = latents
            _check_sample("latents[0]", x)
            _check_sample("latents[1]", y)
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
                raise ValueError("latents: x and y must share shape, dtype and device")
            return cls(y, y - x)
        raise TypeError(f"latents: expected a tensor, a pair (x, y) or EDICTLatents, got {type(latents).__name__}")

    def error_to(self, other: "EDICTLatents") -> float:
        """``max(relative_error(x, other.x), relative_error(y, other.y))``, x formed in float64."""
        ox = other.y.double() - other.d.double()
        return max(relative_error(self.y.double() - self.d.double(), ox), relative_error(self.y, other.y))


@dataclass
class EDICTInversion:
    """Result of :func:`edict_invert`: ``latents`` is the inverted pair at the noisiest timestep;
    :meth:`reconstruct` generates back from it (the exact inverse of the inversion)."""

    input: EDICTLatents
    latents: EDICTLatents
    timesteps: torch.Tensor
    config: dict
    model: Model = field(repr=False)
    cond: Any = field(default=None, repr=False)
    uncond: Any = field(default=None, repr=False)
    guidance_scale: float = 1.0
    cfg_batch: bool = False
    backend: Optional[str] = None
    model_dtype: Optional[torch.dtype] = None
    _recon: Optional[EDICTLatents] = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def reconstruct(self, model: Optional[Model] = None, *, cond=..., uncond=..., guidance_scale=None) -> EDICTLatents:
        """EDICT generation from :attr:`latents`; by default with the inversion's model, conditioning
        and guidance (then it rebuilds :attr:`input`), else an edit."""
        same = model is None and cond is ... and uncond is ... and guidance_scale is None
        g = _Guided(self.model if model is None else model, self.cond if cond is ... else cond,
                    self.uncond if uncond is ... else uncond,
                    self.guidance_scale if guidance_scale is None else guidance_scale, self.cfg_batch,
                    model_dtype=self.model_dtype)
        s = _edict_solver(self.steps, self.config["mixing_coeff"], self.config)
        out = EDICTLatents(*_edict_generate(g, self.latents.y, self.latents.d, s, backend=self.backend),
                           self.model_dtype)
        if same:
            self._recon = out
        return out

    def reconstruction_error(self) -> float:
        """Relative error (max over x and y) of :meth:`reconstruct` against :attr:`input`."""
        if self._recon is None:
            self.reconstruct()
        return self._recon.error_to(self.input)


def _edict_state(lat: "EDICTLatents", state_dtype: Optional[torch.dtype]):
    """(latents in the state dtype, the dtype the model sees or None) for ``state_dtype``."""
    if state_dtype is not None and state_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state_dtype: expected torch.float32 or torch.float64, got {state_dtype}")
    if state_dtype is None or state_dtype == lat.y.dtype:
        return lat, lat.model_dtype
    mdt = lat.model_dtype if lat.model_dtype is not None else lat.y.dtype
    return EDICTLatents(lat.y.to(state_dtype), lat.d.to(state_dtype), mdt), mdt


def edict_invert(model: Model, x0, steps: int = 50, *, mixing: float = 0.93, cond=None, uncond=None,
                 guidance_scale: float = 1.0, cfg_batch: bool = False, config=None, backend: Optional[str] = None,
                 state_dtype: Optional[torch.dtype] = None, **overrides) -> EDICTInversion:
    """EDICT exact inversion (Wallace, Gokul, Naik 2022, "EDICT: Exact Diffusion Inversion via Coupled
    Transformations", eq. 12-13), from the clean pair up to the noisiest timestep.

    ``x0``: a tensor ``[B, ...]`` (both sequences start equal), a pair ``(x, y)`` or
    :class:`EDICTLatents` (e.g. the output of :func:`edict_generate`).  With ``a_t = sqrt(A[t'] /
    A[t])``, ``b_t = sqrt(1 - A[t']) - a_t sqrt(1 - A[t])`` (t' the less noisy neighbour), ``p =
    mixing`` and ``q = 1 - p``, each step undoes a generation step::

        y_i = (y' - q x') / p;   x_i = (x' - q y_i) / p
        y   = (y_i - b_t eps(x_i, t)) / a_t;   x = (x_i - b_t eps(y, t)) / a_t

    computed on the pair held as ``(y, d = y - x)`` (see :class:`EDICTLatents`)::

        x_i = y' - (q + p^2) / p^2 d'                               (fused into the previous step)
        y   = (y' + q / p d' - b_t eps(x_i)) / a_t                  one op call
        d   = (d' / p^2 + b_t (eps(y) - eps(x_i))) / a_t, next x_i   one op call

    Exact in exact arithmetic; in floating point :meth:`EDICTInversion.reconstruction_error`
    reports how close generation lands.  fp32, Stable Diffusion's schedule: ~5e-7 on the test
    denoiser (25 steps), ~6e-6 on a random UNet (10 steps); with guidance 3 on the UNet ~7e-5
    (the fp32 rounding noise of the model, evaluated at recomputed inputs, amplified by the guided
    update).  float64 tensors: ~1e-14.  Classifier-free guidance: ``eps = u + g (c - u)`` wherever
    eps appears.  Two op calls per step plus one to start.

    ``state_dtype=torch.float64`` with an fp32 (fp16, bf16) model: the pair is held and updated in
    float64 (the reference formula on the host's or GPU's float64 units, not the fused op) while the
    model still sees its own dtype.  EDICT's exactness needs only that the inverse recomputes the
    same model inputs, which a float64 state gives back to the last bit of the model dtype, so the
    guided fp32 round trips that miss 1e-5 in an fp32 state (above) land near 1e-12; the pair
    (``latents``) comes back in float64.
    """
    lat, mdt = _edict_state(EDICTLatents.of(x0), state_dtype)
    g = _Guided(model, cond, uncond, guidance_scale, cfg_batch, model_dtype=mdt)
    s = _edict_solver(steps, mixing, config, overrides)
    out = EDICTLatents(*_edict_invert(g, lat.y, lat.d, s, backend=backend), mdt)
    return EDICTInversion(lat, out, _on(s.timesteps, lat.y.device), dict(s.config), model, cond, uncond,
                          float(guidance_scale), cfg_batch, backend, mdt)


def edict_generate(model: Model, latents, steps: int = 50, *, mixing: float = 0.93, cond=None, uncond=None,
                   guidance_scale: float = 1.0, cfg_batch: bool = False, config=None, backend: Optional[str] = None,
                   state_dtype: Optional[torch.dtype] = None, **overrides) -> EDICTLatents:
    """EDICT generation (Wallace et al. 2022, eq. 8-11) from ``latents`` (a tensor: both sequences
    start equal; a pair ``(x, y)``; or :class:`EDICTLatents`)::

        x_i = a_t x + b_t eps(y, t);   y_i = a_t y + b_t eps(x_i, t)
        x'  = p x_i + q y_i;           y'  = p y_i + q x'

    held as ``(y, d = y - x)``: ``x_i = a_t (y - d) + b_t eps(y)`` (one op call), then
    ``D = a_t d + b_t (eps(x_i) - eps(y))``, ``y' = x_i + (q + p^2) D``, ``d' = p^2 D`` (one op
    call).  Returns the final :class:`EDICTLatents` (``.x`` and ``.y`` are the paper's pair); pass it
    to :func:`edict_invert` to recover ``latents``.  ``state_dtype``: as in :func:`edict_invert`
    (float64: the pair in float64, the model in the latents' dtype).
    """
    lat, mdt = _edict_state(EDICTLatents.of(latents), state_dtype)
    g = _Guided(model, cond, uncond, guidance_scale, cfg_batch, model_dtype=mdt)
    s = _edict_solver(steps, mixing, config, overrides)
    return EDICTLatents(*_edict_generate(g, lat.y, lat.d, s, backend=backend), mdt)


# ----------------------------------------------------------------------------------------------
# Edit-friendly DDPM inversion
# ----------------------------------------------------------------------------------------------
#: A step whose posterior standard deviation is below this has (numerically) no noise: its map
#: holds the residual ``x_next - mu`` and enters with weight 1.
ZERO_VARIANCE = 1e-8


@dataclass
class DDPMInversion:
    """Result of :func:`ddpm_invert`.

    ``noise_maps[i]`` is ``z`` of sampling step ``i`` (``timesteps[i]`` to the next level) and
    ``weights[i]`` its coefficient (the posterior standard deviation, or 1 for the final step into
    ``alphas_cumprod = 1``, whose map is the residual); ``latents[i]`` is the sample at
    ``timesteps[i]`` (``latents[0] = x_T``) and ``latents[-1]`` the rebuilt input.
    """

    x0: torch.Tensor
    noise_maps: List[torch.Tensor]
    latents: List[torch.Tensor]
    weights: List[float]
    timesteps: torch.Tensor
    config: dict
    model: Model = field(repr=False)
    cond: Any = field(default=None, repr=False)
    uncond: Any = field(default=None, repr=False)
    guidance_scale: float = 1.0
    cfg_batch: bool = False
    backend: Optional[str] = None
    _recon: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.noise_maps)

    def replay(self, model: Optional[Model] = None, *, cond=..., uncond=..., guidance_scale=None, skip: int = 0,
               trajectory: Optional[list] = None) -> torch.Tensor:
        """Run DDPM from ``latents[skip]`` with the extracted noise maps (``skip`` steps skipped,
        the paper's T_skip).  With the inversion's model and conditioning this rebuilds ``x0``;
        with another condition (or guidance) it edits."""
        if not 0 <= skip < self.steps:
            raise ValueError(f"skip: expected 0..{self.steps - 1}, got {skip}")
        g = _Guided(self.model if model is None else model, self.cond if cond is ... else cond,
                    self.uncond if uncond is ... else uncond,
                    self.guidance_scale if guidance_scale is None else guidance_scale, self.cfg_batch)
        s = _ddpm_solver(self.steps, self.config)
        clip = _clip(s)
        x = self.latents[skip]
        ts = self.timesteps
        for i in range(skip, self.steps):
            c, u = g(x, ts[i])
            x, _ = _step(_derive(s.step_row(i), z=self.weights[i]), x, c, u, noise=self.noise_maps[i], g=g.g,
                         clip=clip, backend=self.backend)
            if trajectory is not None:
                trajectory.append(x)
        return x

    def reconstruct(self) -> torch.Tensor:
        """:meth:`replay` with the inversion's model and conditioning (cached)."""
        if self._recon is None:
            self._recon = self.replay()
        return self._recon

    def reconstruction_error(self) -> float:
        """``relative_error(reconstruct(), x0)``."""
        return relative_error(self.reconstruct(), self.x0)


def _ddpm_solver(steps: int, config, overrides=None) -> DDPMSolver:
    s = DDPMSolver.from_config(_config(config, overrides or {}))
    s.set_timesteps(steps)  # host timesteps
    return s


def ddpm_invert(model: Model, x0: torch.Tensor, steps: int = 50, *, cond=None, uncond=None,
                guidance_scale: float = 1.0, cfg_batch: bool = False, config=None, generator=None,
                backend: Optional[str] = None, **overrides) -> DDPMInversion:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli 2023, "An Edit Friendly
    DDPM Noise Space: Inversion and Manipulations", eq. 4-5).

    Schedule: :class:`pydiff.solvers.DDPMSolver` (the DDPM posterior, equal to DDIM with eta = 1).
    The levels ``x_t = sqrt(A_t) x0 + sqrt(1 - A_t) eps_t`` are drawn with *independent* noise
    ``eps_t`` (from ``generator``); then, for each step ``t -> t'`` of the sampler::

        mu_t = sqrt(A_t') beta_t / (1 - A_t) x0(x_t) + sqrt(alpha_t) (1 - A_t') / (1 - A_t) x_t
        z_t  = (x_t' - mu_t) / sigma_t                       one op call (solve the DDPM step for z)
        x_t' = mu_t + sigma_t z_t                            one op call (the exact replay value)

    The second call makes the stored trajectory bit-identical to what :meth:`DDPMInversion.replay`
    computes (the paper's "correction to avoid error accumulation"), so replaying with the same
    model rebuilds ``x0`` to the rounding of the last step.  The final step into
    ``alphas_cumprod = 1`` has no noise (sigma = 0): its map is the residual ``x0 - mu`` with
    weight 1 (see ``ZERO_VARIANCE``).  ``x0``: ``[B, ...]``.  Three op calls per step (draw the
    next level, solve for z, form the replay value); :meth:`DDPMInversion.replay` makes one.
    Memory: the ``steps`` noise maps and latents are kept (replay with ``skip`` starts from them).
    """
    _check_sample("x0", x0)
    g = _Guided(model, cond, uncond, guidance_scale, cfg_batch)
    s = _ddpm_solver(steps, config, overrides)
    ts_host = s.timesteps.tolist()
    ts = _on(s.timesteps, x0.device)
    clip = _clip(s)
    n = len(ts_host)
    from pydiff.solvers.ddim import randn_like_diffusers

    def level(i):
        a = float(s.alphas_cumprod[ts_host[i]])
        e = randn_like_diffusers(x0.shape, generator, x0.device, x0.dtype)
        out, _ = _step(StepCoeffs().out(0, x=math.sqrt(a), z=math.sqrt(1.0 - a)), x0, noise=e, backend=backend)
        return out

    x = level(0)
    latents, maps, weights = [x], [], []
    for i in range(n):
        row = s.step_row(i)
        w = _noise_coeff(row)
        w = w if w > ZERO_VARIANCE else 1.0
        c, u = g(x, ts[i])
        nxt = level(i + 1) if i + 1 < n else x0
        z, _ = _step(_derive(row, scale=-1.0 / w, target=1.0 / w), x, c, u, [nxt], g=g.g, clip=clip, backend=backend)
        x, _ = _step(_derive(row, z=w), x, c, u, noise=z, g=g.g, clip=clip, backend=backend)
        maps.append(z)
        weights.append(w)
        latents.append(x)
    return DDPMInversion(x0, maps, latents, weights, ts, _config(config, overrides), model, cond, uncond,
                         float(guidance_scale), cfg_batch, backend)


def ddpm_replay(model: Model, inversion: DDPMInversion, *, cond=..., uncond=..., guidance_scale=None,
                skip: int = 0) -> torch.Tensor:
    """:meth:`DDPMInversion.replay` as a function (edit: pass another ``cond``)."""
    return inversion.replay(model, cond=cond, uncond=uncond, guidance_scale=guidance_scale, skip=skip)


# ----------------------------------------------------------------------------------------------
# Direct Inversion
# ----------------------------------------------------------------------------------------------
@dataclass
class DirectInversionEdit:
    """Result of :func:`direct_inversion_edit`: the source branch (which rebuilds the inverted
    input), the target branch (the edit) and the per-step offsets added to the source branch."""

    source: torch.Tensor
    target: torch.Tensor
    offsets: List[torch.Tensor]


def _di_rows(inv: DDIMInversion):
    s = _ddim_solver(inv.steps, inv.config)
    rows = _ddim_rows(s)
    return (rows, [_derive(r, scale=-1.0, target=1.0) for r in rows], [_derive(r, z=1.0) for r in rows],
            inv.timesteps, _clip(s))


def direct_inversion_offsets(model: Model, inversion: DDIMInversion, *, cond=..., uncond=..., guidance_scale=None,
                             cfg_batch=None) -> List[torch.Tensor]:
    """Direct Inversion's offsets (Ju et al. 2023, "Direct Inversion: Boosting Diffusion-based Editing
    with 3 Lines of Code", Algorithm 1): for each DDIM sampling step ``i`` of the source branch,
    started at ``inversion.noise``::

        o_i = z*_{i+1} - DDIM(src_i, eps(src_i, t_i));   src_{i+1} = DDIM(src_i, eps) + o_i

    where ``z*`` are the inversion latents (``inversion.latents`` read backwards), so the source
    branch follows the inversion trajectory.  By default the source branch uses the inversion's
    conditioning and guidance.  Two op calls per step."""
    g = _Guided(model, inversion.cond if cond is ... else cond, inversion.uncond if uncond is ... else uncond,
                inversion.guidance_scale if guidance_scale is None else guidance_scale,
                inversion.cfg_batch if cfg_batch is None else cfg_batch)
    rows, solve, plus, ts, clip = _di_rows(inversion)
    n = inversion.steps
    src = inversion.noise
    offsets = []
    for i in range(n):
        c, u = g(src, ts[i])
        o, _ = _step(solve[i], src, c, u, [inversion.latents[n - 1 - i]], g=g.g, clip=clip, backend=inversion.backend)
        src, _ = _step(plus[i], src, c, u, noise=o, g=g.g, clip=clip, backend=inversion.backend)
        offsets.append(o)
    return offsets


def direct_inversion_edit(model: Model, inversion: DDIMInversion, target_cond, *, source_cond=..., uncond=...,
                          guidance_scale=None, offsets: Optional[Sequence[torch.Tensor]] = None,
                          batch_branches: bool = False, cfg_batch=None) -> DirectInversionEdit:
    """Edit with Direct Inversion (Ju et al. 2023): two DDIM branches from ``inversion.noise``, the
    source branch (``source_cond``, default the inversion's ``cond``) and the target branch
    (``target_cond``), both with ``uncond`` and ``guidance_scale`` (default the inversion's).
    After every step the source branch gets the offset ``o_i`` that puts it back on the inversion
    trajectory (computed on the fly when ``offsets`` is None: same values as
    :func:`direct_inversion_offsets`), so it rebuilds the input exactly while the target branch
    runs plain DDIM toward the edit.  (In the paper the target branch also reads the source branch's
    attention, e.g. prompt-to-prompt; a model that couples the branches gets both in one call with
    ``batch_branches=True``: ``model(cat([src, tgt]), t, cat([source_cond, target_cond]))``.)

    Per step: one op call for the offset (unless given), one for each branch.
    """
    cfg_batch = inversion.cfg_batch if cfg_batch is None else cfg_batch
    scond = inversion.cond if source_cond is ... else source_cond
    unc = inversion.uncond if uncond is ... else uncond
    gs = inversion.guidance_scale if guidance_scale is None else guidance_scale
    n = inversion.steps
    if offsets is not None:
        if len(offsets) != n:
            raise ValueError(f"offsets: expected {n} tensors (one per step), got {len(offsets)}")
        ref = inversion.latents[0]
        for i, o in enumerate(offsets):
            if not isinstance(o, torch.Tensor) or o.shape != ref.shape or o.dtype != ref.dtype \
                    or o.device != ref.device:
                got = (f"{tuple(o.shape)} {o.dtype} on {o.device}" if isinstance(o, torch.Tensor)
                       else type(o).__name__)
                raise ValueError(f"offsets[{i}]: expected shape {tuple(ref.shape)} {ref.dtype} on {ref.device} "
                                 f"(the inverted latents'), got {got}")
    if batch_branches:
        if not (isinstance(scond, torch.Tensor) and isinstance(target_cond, torch.Tensor)):
            raise TypeError("batch_branches=True: source_cond and target_cond must be tensors")
        if unc is not None and not isinstance(unc, torch.Tensor):
            raise TypeError("batch_branches=True: uncond must be a tensor")
        both = _Guided(model, torch.cat([scond, target_cond]), None if unc is None else torch.cat([unc, unc]), gs,
                       cfg_batch)
        gsrc = gtgt = both
    else:
        gsrc = _Guided(model, scond, unc, gs, cfg_batch)
        gtgt = _Guided(model, target_cond, unc, gs, cfg_batch)
    rows, solve, plus, ts, clip = _di_rows(inversion)
    be = inversion.backend
    src = tgt = inversion.noise
    offs = []
    for i in range(n):
        t = ts[i]
        if batch_branches:
            c, u = both(torch.cat([src, tgt]), t)
            (cs, ct), (us, ut) = c.chunk(2), ((None, None) if u is None else u.chunk(2))
        else:
            cs, us = gsrc(src, t)
            ct, ut = gtgt(tgt, t)
        if offsets is None:
            o, _ = _step(solve[i], src, cs, us, [inversion.latents[n - 1 - i]], g=gsrc.g, clip=clip, backend=be)
        else:
            o = offsets[i]
        src, _ = _step(plus[i], src, cs, us, noise=o, g=gsrc.g, clip=clip, backend=be)
        tgt, _ = _step(rows[i], tgt, ct, ut, g=gtgt.g, clip=clip, backend=be)
        offs.append(o)
    return DirectInversionEdit(src, tgt, offs)
