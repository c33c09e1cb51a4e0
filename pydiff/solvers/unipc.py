"""UniPC (unified predictor-corrector, B(h) variants) on the fused solver step, one call per step.

Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"
(NeurIPS 2023, arXiv:2302.04867).  With ``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s0``,
``r_k = (lambda_{s_k} - lambda_s0) / h`` and the data predictions ``M`` of the steps so far, the
predictor UniP-p is (predict_x0)::

    x_t = sigma_t / sigma_s0 * x_s0 - alpha_t (e^-h - 1) M_s0 - alpha_t B(h) sum_k rho^p_k (M_sk - M_s0) / r_k

with ``B(h) = -h`` (bh1) or ``e^-h - 1`` (bh2) and ``rho^p`` from the small order conditions
``R rho = b`` (solved in float64 on the host).  The corrector UniC-p re-does the last step with the
new model output ``M_t`` as an extra node (``rho^c``).  Since the predictor and the corrector of the
same step share ``sigma_t / sigma_s0 * x_s0 - alpha_t (e^-h - 1) M_s0``, the corrected sample is the
predicted one plus a correction::

    x_t^c = x_t + alpha_t B(h) [sum_k (rho^p_k - rho^c_k) (M_sk - M_s0) / r_k - rho^c_last (M_t - M_s0)]

so one ``pydiff.ops.solver_step`` per step does the corrector (on the returned sample ``x_t``) and
the next predictor together, reading ``x``, the model output(s) and up to ``solver_order`` past
``M`` and writing the next sample and ``M_t`` (``d`` of the op, the history entry).

The base ``x_t`` of the correction is the sample this stepper returned last.  When the caller passes
that very tensor back (a plain sampling loop) it is ``x``; when the caller passes another tensor
(e.g. inpainting blends the latents between steps) the returned one is read as an extra history
entry, as diffusers uses its saved sample: the two agree either way.  (Modifying the returned tensor
*in place* between steps changes the corrector's base, unlike diffusers.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pydiff.ops.solver import StepCoeffs, solver_step
from pydiff.solvers._common import eps_coeffs, x0_coeffs, check_num_inference_steps
from pydiff.solvers.dpmpp import (ConfiguredSolver, alpha_sigma, check_finite, exponential_sigmas,
                                  guidance_args, karras_sigmas, log_snr, sigma_to_t, spaced_timesteps,
                                  stretch_to_terminal, time_shift, vp_alphas_cumprod, vp_sigmas, with_guidance)
from pydiff.solvers._common import Eval, sigma_x0

__all__ = ["UniPCSolver"]


class UniPCSolver(ConfiguredSolver):
    """UniPC multistep sampler, matching diffusers' ``UniPCMultistepScheduler``.

    Config: the keys of ``UniPCMultistepScheduler`` (num_train_timesteps, beta_*, trained_betas,
    solver_order 1-3, prediction_type epsilon / v_prediction / sample / flow_prediction, predict_x0,
    solver_type bh1 / bh2, lower_order_final, disable_corrector, use_karras_sigmas,
    use_exponential_sigmas, use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type,
    shift_terminal, sigma_min, sigma_max, timestep_spacing, steps_offset, final_sigmas_type,
    rescale_betas_zero_snr).  Not supported (NotImplementedError): thresholding, solver_p,
    use_beta_sigmas.

    ``step(model_output, x, model_uncond=, guidance_scale=, guidance_rescale=)`` -> the next sample.
    """

    _defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
        final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False,
        time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None)

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c.solver_type in ("midpoint", "heun", "logrho"):
            c["solver_type"] = "bh2"
        if c.solver_type not in ("bh1", "bh2"):
            raise NotImplementedError(f"solver_type={c.solver_type!r} is not supported (expected bh1 or bh2)")
        if c.thresholding:
            self._unsupported("thresholding", "dynamic thresholding needs a per-sample quantile of x0")
        if c.solver_p is not None:
            self._unsupported("solver_p", "an external predictor scheduler cannot be fused")
        if c.use_beta_sigmas:
            self._unsupported("use_beta_sigmas")
        if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if not 1 <= int(c.solver_order) <= 3:
            raise NotImplementedError(f"solver_order={c.solver_order!r} is not supported (expected 1, 2 or 3)")
        if c.prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise ValueError(f"prediction_type={c.prediction_type!r}: expected epsilon, v_prediction, sample "
                             "or flow_prediction")
        if c.prediction_type == "flow_prediction" and not c.predict_x0:
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True")
        if c.shift_terminal is not None and not c.use_flow_sigmas:
            raise ValueError("shift_terminal: only supported with use_flow_sigmas=True")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={c.final_sigmas_type!r}: expected 'zero' or 'sigma_min'")
        if c.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"timestep_spacing={c.timestep_spacing!r}: expected linspace, leading or trailing")
        self.predict_x0 = bool(c.predict_x0)
        c["disable_corrector"] = self.disable_corrector = list(c.disable_corrector or [])
        self.alphas_cumprod = vp_alphas_cumprod(c)  # float32, as diffusers
        self._train_sigmas = vp_sigmas(self.alphas_cumprod)
        self._plan: list = []
        self._hist: list = []
        self._last_out = None

    # ---------------------------------------------------------------- schedule
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None) -> None:
        check_num_inference_steps(num_inference_steps)
        c = self.config
        N = c.num_train_timesteps
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu: must be passed when use_dynamic_shifting=True")
        if sigmas is not None:
            if not c.use_flow_sigmas:
                raise ValueError("sigmas: custom sigmas need use_flow_sigmas=True")
            num_inference_steps = len(sigmas)
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps (or sigmas)")
        n = int(num_inference_steps)
        ts = spaced_timesteps(c.timestep_spacing, n, N, N, c.steps_offset)
        last = None
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            base = np.asarray(sigmas) if sigmas is not None else self._train_sigmas
            log_sig = np.log(base)
            fs = np.flip(base)
            smin = c.sigma_min if c.sigma_min is not None else float(fs[-1])
            smax = c.sigma_max if c.sigma_max is not None else float(fs[0])
            if c.use_karras_sigmas:
                sig = karras_sigmas(smin, smax, n)
                if c.use_flow_sigmas:
                    sig = sig / (sig + 1)
                    ts = (sig * N).copy()
                else:
                    ts = sigma_to_t(sig, log_sig).round()
            else:
                sig = exponential_sigmas(smin, smax, n)
                ts = sigma_to_t(sig, log_sig)
            last = sig[-1]
        elif c.use_flow_sigmas:
            sig = np.asarray(sigmas) if sigmas is not None else np.linspace(1, 1 / N, n + 1)[:-1]
            if c.use_dynamic_shifting:
                sig = time_shift(c.time_shift_type, mu, sig)
            else:
                sig = c.flow_shift * sig / (1 + (c.flow_shift - 1) * sig)
            if c.shift_terminal:
                sig = stretch_to_terminal(sig, c.shift_terminal)
            sig = np.array(sig, copy=True)
            if np.fabs(sig[0] - 1) < 1e-6:  # keeps log(alpha) finite at the first step
                sig[0] -= 1e-6
            ts = (sig * N).copy()
            last = sig[-1]
        else:
            base = np.asarray(sigmas) if sigmas is not None else self._train_sigmas
            sig = np.interp(ts, np.arange(0, len(base)), base)
            a0 = torch.from_numpy(self.alphas_cumprod[:1])
            last = float((((1 - a0) / a0) ** 0.5)[0])
        last = last if c.final_sigmas_type == "sigma_min" else 0.0
        sig32 = np.concatenate([sig, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sig32)
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(self.timesteps)
        self._sig64 = sig32.astype(np.float64)
        self._plan = self._build(self._sig64)
        self._hist = []
        self._last_out = None
        self._step_index = None
        self._begin_index = None

    def _rebuild(self, begin: int) -> None:
        self._plan = self._build(self._sig64, begin)

    def _orders(self, n: int, begin: int = 0) -> list:
        c = self.config  # warm-up: at most (steps taken so far) + 1
        return [min(min(c.solver_order, n - i) if c.lower_order_final else c.solver_order,
                    min(max(i - begin, 0), c.solver_order) + 1) for i in range(n)]

    def _uni(self, s0: int, order: int, corrector: bool):
        """The step s0 -> s0 + 1 of the given order: ``(A, pred, corr)`` with the predictor
        ``x_{s0+1} = A x^c_{s0} + sum_k pred[k] M_{s0-k}`` (k = 0..order-1) and, with ``corrector``,
        the UniC correction ``x^c_{s0+1} = x_{s0+1} + sum_k corr[k] M_{s0+1-k}`` (k = 0..order)."""
        t = s0 + 1
        al, sg, lam = self._al, self._sg, self._lam
        with np.errstate(all="ignore"):
            h = lam[t] - lam[s0]
            hh = -h if self.predict_x0 else h
            hphi1 = np.expm1(hh)
            Bh = hh if self.config.solver_type == "bh1" else np.expm1(hh)
            if self.predict_x0:
                A, scale = sg[t] / sg[s0], al[t]
            else:
                A, scale = al[t] / al[s0], sg[t]
            pred = np.zeros(order)
            # scale * h_phi_1; for eps prediction onto sigma_t = 0 take the finite limit alpha_t sigma_s0 / alpha_s0
            pred[0] = -(al[t] * sg[s0] / al[s0] - sg[t] if (not self.predict_x0 and sg[t] == 0) else scale * hphi1)
            rks = np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0])
            R = np.stack([rks ** j for j in range(order)])
            b, hphik, fact = [], hphi1 / hh - 1, 1
            for j in range(1, order + 1):
                b.append(hphik * fact / Bh)
                fact *= j + 1
                hphik = hphik / hh - 1 / fact
            b = np.array(b)
            rp = np.array([0.5]) if order == 2 else (np.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else np.zeros(0))
            S = scale * Bh
            for k in range(1, order):  # - S rho_p (M_k - M_0) / r_k
                pred[k] -= S * rp[k - 1] / rks[k - 1]
                pred[0] += S * rp[k - 1] / rks[k - 1]
            if not corrector:
                return A, pred, None
            rc = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
            corr = np.zeros(order + 1)  # on M_t, M_s0, M_s0-1, ...
            corr[0] -= S * rc[-1]
            corr[1] += S * rc[-1]
            for k in range(1, order):
                w = S * (rp[k - 1] - rc[k - 1]) / rks[k - 1]
                corr[k + 1] += w
                corr[1] -= w
            return A, pred, corr

    def _build(self, sig: np.ndarray, begin: int = 0) -> list:
        c = self.config
        n = len(sig) - 1
        self._al, self._sg = alpha_sigma(sig, c.use_flow_sigmas)
        self._lam = log_snr(self._al, self._sg)
        orders = self._orders(n, begin)
        plan = []
        for i in range(n):
            p = orders[i]
            use_corr = i > begin and (i - 1) not in self.disable_corrector
            A, pred, _ = self._uni(i, p, False)
            # lag coefficients (lag 0 = M_i = d) of x_{i+1} = A * x^c + sum pred[k] M_{i-k}
            lag = np.zeros(c.solver_order + 1)
            lag[:p] += pred
            if use_corr:
                pc = orders[i - 1]
                _, _, corr = self._uni(i - 1, pc, True)  # x^c = x_i + sum corr[k] M_{i-k}
                lag[:pc + 1] += A * corr
            K = max(p - 1, orders[i - 1] if use_corr else 0)  # past M read: predictor lags 1..p-1, corrector 1..pc
            if self.predict_x0:
                if c.prediction_type == "flow_prediction":
                    px, pm = 1.0, -float(sig[i])
                else:
                    px, pm = x0_coeffs(c.prediction_type, self._al[i], self._sg[i])
            else:
                px, pm = eps_coeffs(c.prediction_type, self._al[i], self._sg[i])
            hist_c = [float(lag[k]) for k in range(K, 0, -1)]  # oldest first
            direct = StepCoeffs(history=K).set(px=px, pm=pm).out(0, x=A, d=lag[0], h=hist_c).out(1, d=1.0)
            check_finite(type(self).__name__, direct, i)
            via = None
            if use_corr:  # the base x_i^pred read as history entry 0, x used only for the conversion
                via = StepCoeffs(history=K + 1).set(px=px, pm=pm).out(0, d=lag[0], h=[A] + hist_c).out(1, d=1.0)
                via = via.tolist()
            plan.append((K, use_corr, direct.tolist(), via))
        return plan

    # ---------------------------------------------------------------- step
    def eval_plan(self, n: int, opts: dict) -> tuple:
        """The evaluation plan of ``n`` steps (see ``_SolverBase.eval_plan``)."""
        self.set_timesteps(n)
        ts = self.timesteps.tolist()
        evals = []
        for i in range(len(ts)):
            K, _use_corr, direct, _via = self._plan[i]  # a plain loop passes the returned sample back: "direct"
            evals.append(Eval(t=float(ts[i]), in_div=1.0, x0=sigma_x0(self.config, self._sig64[i]), coeffs=list(direct),
                              reads=tuple(f"h{j}" for j in range(i - K, i)), write=f"h{i}"))
        return evals, 1.0

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, model_uncond: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0, noise: Optional[torch.Tensor] = None,
             generator=None, backend: Optional[str] = None) -> torch.Tensor:
        """Corrector (UniC, for the previous step) and predictor (UniP) in one fused call.

        ``model_output``: the model's prediction at ``x`` (the conditional branch under CFG; with
        ``model_uncond`` the op forms ``u + g (c - u)``, and guidance rescale with
        ``guidance_rescale > 0``).  UniPC is deterministic: ``noise`` and ``generator`` are ignored.
        """
        i = self._next_index()
        K, use_corr, direct, via = self._plan[i]
        g, row_scale = guidance_args(model_output, model_uncond, guidance_scale, guidance_rescale, backend)
        hist = self._hist[len(self._hist) - K:] if K else []
        coeffs = direct
        if use_corr and x is not self._last_out:
            if self._last_out is None:
                raise RuntimeError("UniPCSolver: the corrector needs the previous step's output; "
                                   "call step() from the first timestep after set_timesteps()")
            hist, coeffs = [self._last_out] + hist, via
        x_next, entry = solver_step(x, model_output, model_uncond, hist, None, coeffs=with_guidance(coeffs, g),
                                    row_scale=row_scale, backend=backend)
        self._hist = (self._hist + [entry])[-self.config.solver_order:]
        self._last_out = x_next
        self._step_index = i + 1
        return x_next
