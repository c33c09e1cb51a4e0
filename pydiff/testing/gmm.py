"""An analytic ground-truth diffusion model: a Gaussian mixture whose exact denoiser is closed-form.

Data ``x0 ~ sum_k w_k N(mu_k, S_k)`` in ``D`` dimensions (a 2-D toy or an image-sized ``3 x 8 x 8``
one).  Under the forward process ``x_t = alpha x0 + sigma eps`` (VP: ``alpha^2 + sigma^2 = 1``,
diffusers' ``alphas_cumprod``; flow matching: ``alpha = 1 - sigma``) each component stays Gaussian::

    x_t | k  ~ N(alpha mu_k, alpha^2 S_k + sigma^2 I)
    p(k | x_t)  ∝  w_k N(x_t; alpha mu_k, alpha^2 S_k + sigma^2 I)                  (responsibilities)
    E[x0 | x_t, k] = mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (x_t - alpha mu_k)
    E[x0 | x_t]    = sum_k p(k | x_t) E[x0 | x_t, k]                              (the exact denoiser)

With ``S_k = U_k diag(lam_k) U_k^T`` every matrix above is diagonal in ``U_k``'s basis, so the
denoiser costs ``O(B K D)`` (diagonal ``S_k``) or ``O(B K D^2)`` (full ``S_k``).  Everything is
computed in float64.  From ``x0_hat = E[x0 | x_t]`` the exact model outputs follow:
``eps = (x_t - alpha x0_hat) / sigma``, ``v = alpha eps - sigma x0_hat`` and the flow velocity
``E[eps - x0 | x_t] = (x_t - x0_hat) / sigma``.

Accuracy of a sampler is then the distance of its samples to the true distribution:
:meth:`GaussianMixture.sliced_wasserstein` is the sliced 2-Wasserstein distance between the
samples and the *exact* mixture (each 1-D projection of a Gaussian mixture is a 1-D Gaussian
mixture whose quantile function is evaluated numerically), so only the generated samples carry
Monte-Carlo noise; :meth:`sw_floor` measures that noise on exact samples of the same size.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

__all__ = ["GaussianMixture", "Schedule"]

_LOG2PI = math.log(2.0 * math.pi)


class Schedule:
    """Map a diffusers timestep ``t`` to ``(alpha, sigma)`` on the device, without host syncs.

    ``kind='vp'``: diffusers' ``alphas_cumprod`` (built in float32 as diffusers builds it) with
    ``sigma_ve(t) = sqrt((1 - abar) / abar)`` interpolated linearly in ``t`` (what diffusers'
    Euler / Heun do for fractional timesteps), ``alpha = 1 / sqrt(1 + sigma_ve^2)``,
    ``sigma = sigma_ve alpha``.  ``kind='flow'``: ``sigma = t / num_train_timesteps``,
    ``alpha = 1 - sigma`` (diffusers' flow-matching timesteps).
    """

    def __init__(self, kind: str = "vp", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear"):
        if kind not in ("vp", "flow"):
            raise ValueError(f"kind: expected 'vp' or 'flow', got {kind!r}")
        self.kind, self.T = kind, int(num_train_timesteps)
        self._cfg = dict(num_train_timesteps=self.T)
        if kind == "vp":
            self._cfg.update(beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)
        if kind == "vp":
            from pydiff.solvers._common import SolverConfig
            from pydiff.solvers.ddim import train_alphas_cumprod

            ac = train_alphas_cumprod(SolverConfig(num_train_timesteps=self.T, beta_start=beta_start, beta_end=beta_end,
                                              beta_schedule=beta_schedule))
            ac32 = torch.from_numpy(ac).float()
            self.alphas_cumprod = ac
            self._sig = (((1 - ac32) / ac32) ** 0.5).double()  # float32 values, as diffusers' sigma tables
        self._cache = {}

    def scheduler_config(self) -> dict:
        """The diffusers scheduler config keys of this schedule: pass it as ``scheduler_config=`` so
        the sampler's noise levels match the model's (samplers' own defaults differ, e.g. Heun's
        betas are 0.00085..0.012)."""
        return dict(self._cfg)

    def _table(self, device):
        if device not in self._cache:
            self._cache[device] = self._sig.to(device)
        return self._cache[device]

    def alpha_sigma(self, t: torch.Tensor):
        """float64 ``(alpha, sigma)`` tensors shaped like ``t``."""
        t = t.double()
        if self.kind == "flow":
            s = t / self.T
            return 1.0 - s, s
        tab = self._table(t.device)
        tc = t.clamp(0, self.T - 1)
        lo = tc.floor().clamp(max=self.T - 2)
        w = tc - lo
        lo = lo.long()
        s = tab[lo] * (1 - w) + tab[lo + 1] * w
        a = 1.0 / torch.sqrt(1.0 + s * s)
        return a, s * a


class GaussianMixture:
    """A Gaussian mixture ``sum_k w_k N(mu_k, S_k)`` with the exact denoiser of its diffusion.

    Args:
        means: ``[K, D]``.
        weights: ``[K]`` (normalised here; default uniform).
        stds: ``[K, D]`` per-dimension standard deviations (diagonal ``S_k``), or
        covs: ``[K, D, D]`` full covariances (eigendecomposed once).
        event_shape: the shape of one sample (default ``(D,)``), e.g. ``(3, 8, 8)``.
    """

    def __init__(self, means, weights=None, stds=None, covs=None, event_shape=None):
        mu = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        if mu.dim() != 2:
            raise ValueError(f"means: expected [K, D], got {tuple(mu.shape)}")
        K, D = mu.shape
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(np.asarray(weights),
                                                                                        dtype=torch.float64)
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights: expected {K} non-negative numbers with a positive sum")
        if (stds is None) == (covs is None):
            raise ValueError("pass exactly one of stds ([K, D]) and covs ([K, D, D])")
        if stds is not None:
            sd = torch.as_tensor(np.asarray(stds), dtype=torch.float64).expand(K, D).clone()
            if (sd <= 0).any():
                raise ValueError("stds: expected positive values")
            self.lam, self.U = sd ** 2, None
        else:
            S = torch.as_tensor(np.asarray(covs), dtype=torch.float64)
            if S.shape != (K, D, D):
                raise ValueError(f"covs: expected [K, D, D] = [{K}, {D}, {D}], got {tuple(S.shape)}")
            lam, U = torch.linalg.eigh(0.5 * (S + S.transpose(1, 2)))
            if (lam <= 0).any():
                raise ValueError("covs: expected positive definite matrices")
            self.lam, self.U = lam, U
        self.mu, self.w, self.K, self.D = mu, w / w.sum(), K, D
        self.logw = torch.log(self.w)
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape: {self.event_shape} does not hold {D} values")
        self._dev = {}
        self._quantile_cache = {}

    # ------------------------------------------------------------------ ready-made mixtures
    @classmethod
    def toy_2d(cls, k: int = 8, radius: float = 1.0, std_major: float = 0.1, std_minor: float = 0.04):
        """``k`` anisotropic Gaussians on a ring (tangentially stretched), weights 1, 2, ..., k."""
        ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], 1)
        covs = []
        for a in ang.tolist():
            tang = torch.tensor([-math.sin(a), math.cos(a)], dtype=torch.float64)
            rad = torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)
            covs.append(std_major ** 2 * torch.outer(tang, tang) + std_minor ** 2 * torch.outer(rad, rad))
        return cls(means, weights=torch.arange(1, k + 1, dtype=torch.float64), covs=torch.stack(covs))

    @classmethod
    def toy_image(cls, shape=(3, 8, 8), k: int = 6, seed: int = 0):
        """``k`` smooth random colour images in about [-1, 1] with per-pixel stds in [0.05, 0.25]."""
        g = torch.Generator().manual_seed(seed)
        C, H, W = shape
        coarse = torch.rand((k, C, 3, 3), generator=g, dtype=torch.float64) * 1.6 - 0.8
        means = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=True)
        stds = 0.05 + 0.2 * torch.rand((k, C, H, W), generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(means.reshape(k, -1), weights=weights, stds=stds.reshape(k, -1), event_shape=shape)

    # ------------------------------------------------------------------ exact quantities
    def _on(self, device):
        device = torch.device(device)
        if device not in self._dev:
            self._dev[device] = tuple(None if t is None else t.to(device) for t in (self.mu, self.lam, self.U, self.logw))
        return self._dev[device]

    def mean(self) -> torch.Tensor:
        return (self.w[:, None] * self.mu).sum(0)

    def covariance(self) -> torch.Tensor:
        if self.U is None:
            S = torch.diag_embed(self.lam)
        else:
            S = self.U @ torch.diag_embed(self.lam) @ self.U.transpose(1, 2)
        m = self.mean()
        second = (self.w[:, None, None] * (S + self.mu[:, :, None] * self.mu[:, None, :])).sum(0)
        return second - torch.outer(m, m)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32, device="cpu"):
        """``n`` exact samples ``[n, *event_shape]``."""
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn((n, self.D), generator=generator, dtype=torch.float64)
        z = z * self.lam[k].sqrt()
        if self.U is not None:
            z = torch.einsum("nkd,nd->nk", self.U[k], z)
        x = self.mu[k] + z
        return x.reshape((n,) + self.event_shape).to(device=device, dtype=dtype)

    def _per_component(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, weights=None):
        """(log p(x_t, k) [B, K], E[x0 | x_t, k] [B, K, D]) in float64."""
        mu, lam, U, logw = self._on(x.device)
        B = x.shape[0]
        xf = x.reshape(B, -1).double()
        if xf.shape[1] != self.D:
            raise ValueError(f"x: expected {self.D} values per sample ({self.event_shape}), got {tuple(x.shape)}")
        a = alpha.double().reshape(B, 1, 1)
        s2 = (sigma.double() ** 2).reshape(B, 1, 1)
        var = a * a * lam[None] + s2                             # [B, K, D] in the component's eigenbasis
        diff = xf[:, None, :] - a * mu[None]                     # [B, K, D]
        z = diff if U is None else torch.einsum("bkd,kde->bke", diff, U)
        if weights is not None:
            lw = torch.log(weights.double().clamp_min(0) / weights.double().sum(-1, keepdim=True))
        else:
            lw = logw[None]
        logp = lw - 0.5 * (torch.log(var).sum(-1) + (z * z / var).sum(-1) + self.D * _LOG2PI)
        corr = a * lam[None] / var * z
        if U is not None:
            corr = torch.einsum("bke,kde->bkd", corr, U)
        return logp, mu[None] + corr

    def log_prob_t(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """float64 ``log p_t(x)`` of the noised marginal, ``[B]``."""
        alpha, sigma = self._bcast(x, alpha), self._bcast(x, sigma)
        return torch.logsumexp(self._per_component(x, alpha, sigma)[0], dim=-1)

    @staticmethod
    def _bcast(x, v):
        v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
        return v.expand(x.shape[0]) if v.dim() == 0 else v

    def posterior_mean(self, x: torch.Tensor, alpha, sigma, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact denoiser ``E[x0 | x_t = x]`` for ``x_t = alpha x0 + sigma eps`` (float64 math),
        in x's dtype and shape.  ``alpha``, ``sigma``: numbers or ``[B]`` tensors.  ``weights``:
        optional per-sample mixture weights ``[B, K]`` (a class-conditional model)."""
        alpha, sigma = self._bcast(x, alpha), self._bcast(x, sigma)
        if x.device.type == "cpu" and bool((alpha == alpha[0]).all()) and bool((sigma == sigma[0]).all()):
            x0 = self._posterior_mean_shared(x, float(alpha[0]), float(sigma[0]), weights)  # a sampler's batch
        else:
            logp, means = self._per_component(x, alpha, sigma, weights)
            r = torch.softmax(logp, dim=-1)
            x0 = (r[:, :, None] * means).sum(1)
        return x0.reshape(x.shape).to(x.dtype)

    def _posterior_mean_shared(self, x, a: float, s: float, weights):
        """The same for one noise level shared by the batch, with matmuls instead of [B, K, D]
        temporaries (CPU only: checking that the level is shared reads device values)::

            q_k = sum_d (y_d - a mu'_kd)^2 / var_kd,  y = U_k^T x,  var = a^2 lam + s^2
            E[x0 | x] = sum_k r_k (mu_k + U_k (g_k * (y - a mu'_k))),  g = a lam / var
        """
        mu, lam, U, logw = self._on(x.device)
        B = x.shape[0]
        xf = x.reshape(B, -1).double()
        if xf.shape[1] != self.D:
            raise ValueError(f"x: expected {self.D} values per sample ({self.event_shape}), got {tuple(x.shape)}")
        var = a * a * lam + s * s                                 # [K, D]
        iv = 1.0 / var
        g = a * lam * iv
        lw = logw[None] if weights is None else torch.log(
            weights.double().clamp_min(0) / weights.double().sum(-1, keepdim=True))
        if U is None:
            q = (xf * xf) @ iv.T - (2 * a) * (xf @ (mu * iv).T) + (a * a) * (mu * mu * iv).sum(1)
            r = torch.softmax(lw - 0.5 * (torch.log(var).sum(1) + q), dim=-1)
            return r @ (mu * (1 - a * g)) + (r @ g) * xf
        K, D = self.K, self.D
        y = (xf @ U.permute(1, 0, 2).reshape(D, K * D)).reshape(B, K, D)   # U_k^T x
        mup = torch.einsum("kd,kde->ke", mu, U)                            # U_k^T mu_k
        z = y - a * mup
        q = (z * z * iv).sum(-1)
        r = torch.softmax(lw - 0.5 * (torch.log(var).sum(1) + q), dim=-1)
        w = (r[:, :, None] * g[None] * z).reshape(B, K * D)                # sum_k U_k (...)
        return r @ mu + w @ U.permute(0, 2, 1).reshape(K * D, D)

    # ------------------------------------------------------------------ model callables
    def model(self, prediction_type: str = "epsilon", schedule: Optional[Schedule] = None, **schedule_kwargs):
        """``f(x, t, cond=None) -> prediction``: the exact model, in the call convention of
        :func:`pydiff.samplers.sample` (diffusers timesteps).  ``prediction_type``: ``epsilon``,
        ``v_prediction``, ``sample`` or ``flow_prediction`` (the last with a flow schedule, made by
        default for it).  ``cond``: None, or per-sample mixture weights ``[B, K]``."""
        if schedule is None:
            schedule = Schedule("flow" if prediction_type == "flow_prediction" else "vp", **schedule_kwargs)
        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise ValueError(f"prediction_type: unknown {prediction_type!r}")
        if (prediction_type == "flow_prediction") != (schedule.kind == "flow"):
            raise ValueError(f"prediction_type={prediction_type!r} does not fit a {schedule.kind!r} schedule")

        def f(x, t, cond=None):
            t = torch.as_tensor(t, device=x.device)
            if t.dim() == 0:
                t = t.expand(x.shape[0])
            a, s = schedule.alpha_sigma(t)
            x0 = self.posterior_mean(x, a, s, cond).double()
            shp = (-1,) + (1,) * (x.dim() - 1)
            a, s, xd = a.reshape(shp), s.reshape(shp), x.double()
            if prediction_type == "sample":
                out = x0
            elif prediction_type == "flow_prediction":
                out = (xd - x0) / s
            else:
                eps = (xd - a * x0) / s
                out = eps if prediction_type == "epsilon" else a * eps - s * x0
            return out.to(x.dtype)

        f.schedule = schedule
        f.prediction_type = prediction_type
        f.scheduler_config = schedule.scheduler_config()
        return f

    def denoiser(self):
        """k-diffusion style ``D(x, sigma, cond=None) -> E[x0 | x]`` for ``x = x0 + sigma eps`` (VE)."""

        def d(x, sigma, cond=None, **_):
            s = torch.as_tensor(sigma, device=x.device).double()
            if s.dim() == 0:
                s = s.expand(x.shape[0])
            a = 1.0 / torch.sqrt(1.0 + s * s)
            xv = x.double() * a.reshape((-1,) + (1,) * (x.dim() - 1))
            return self.posterior_mean(xv, a, s * a, cond).to(x.dtype)

        return d

    # ------------------------------------------------------------------ distances
    def _projections(self, n_proj: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        th = torch.randn((n_proj, self.D), generator=g, dtype=torch.float64)
        return th / th.norm(dim=1, keepdim=True)

    def _projected_quantiles(self, n: int, n_proj: int, seed: int, grid: int = 8192) -> torch.Tensor:
        """Exact quantiles ``Q_j((i + 1/2) / n)`` of each 1-D projection ``[n_proj, n]`` (cached)."""
        key = (n, n_proj, seed, grid)
        if key in self._quantile_cache:
            return self._quantile_cache[key]
        th = self._projections(n_proj, seed)                                    # [P, D]
        m = th @ self.mu.T                                                      # [P, K]
        if self.U is None:
            v = (th * th) @ self.lam.T                                          # [P, K]
        else:
            v = (torch.einsum("pd,kde->pke", th, self.U) ** 2 * self.lam[None]).sum(-1)
        s = v.sqrt()
        lo = (m - 12 * s).min(1).values[:, None]
        hi = (m + 12 * s).max(1).values[:, None]
        y = lo + (hi - lo) * torch.linspace(0, 1, grid, dtype=torch.float64)[None]   # [P, G]
        cdf = (self.w[None, None, :] * torch.special.ndtr((y[:, :, None] - m[:, None, :]) / s[:, None, :])).sum(-1)
        cdf = torch.cummax(cdf, dim=1).values.contiguous()
        u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(n_proj, n).contiguous()
        j = torch.searchsorted(cdf, u).clamp(1, grid - 1)
        c0, c1 = cdf.gather(1, j - 1), cdf.gather(1, j)
        y0, y1 = y.gather(1, j - 1), y.gather(1, j)
        q = y0 + (y1 - y0) * ((u - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
        self._quantile_cache[key] = (th, q)
        return th, q

    @torch.no_grad()
    def sliced_wasserstein(self, samples: torch.Tensor, n_proj: int = 64, seed: int = 0) -> float:
        """Sliced 2-Wasserstein distance between ``samples`` ``[n, *event_shape]`` and the exact
        mixture: ``sqrt(mean_j W2^2(theta_j . samples, theta_j . X))`` over ``n_proj`` fixed random
        directions, each 1-D W2 from the sorted projections against the exact quantiles at
        ``(i + 1/2) / n``.  Non-finite samples give ``inf``."""
        x = samples.reshape(samples.shape[0], -1).double().cpu()
        if not torch.isfinite(x).all():
            return float("inf")
        th, q = self._projected_quantiles(x.shape[0], n_proj, seed)
        proj = torch.sort(x @ th.T, dim=0).values.T                             # [P, n]
        return float(((proj - q) ** 2).mean().sqrt())

    def sw_floor(self, n: int, n_proj: int = 64, seed: int = 0, reps: int = 5, sample_seed: int = 1234):
        """Mean and standard deviation of :meth:`sliced_wasserstein` over ``reps`` sets of ``n``
        exact samples: the Monte-Carlo floor a perfect sampler reaches with ``n`` samples."""
        g = torch.Generator().manual_seed(sample_seed)
        vals = [self.sliced_wasserstein(self.sample(n, g, torch.float64), n_proj, seed) for _ in range(reps)]
        return float(np.mean(vals)), float(np.std(vals))

    @torch.no_grad()
    def moment_error(self, samples: torch.Tensor) -> float:
        """``|mean - mu| + |cov - S|_F`` of the samples against the exact moments (a cruder metric)."""
        x = samples.reshape(samples.shape[0], -1).double().cpu()
        m = x.mean(0)
        c = torch.cov(x.T).reshape(self.D, self.D)
        return float((m - self.mean()).norm() + (c - self.covariance()).norm())
