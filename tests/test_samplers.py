"""pydiff.samplers (complete sampling loops, coefficient-table path, CUDA graphs) and
pydiff.kdiffusion (k-diffusion style functional samplers).

CPU: every sampler's loop equals the stepper driven by hand (bitwise), the device-table path equals
the host-coefficient path (bitwise), end-to-end parity with diffusers' scheduler loops, CFG
batching, prediction types, generators, x0 trajectories, progress, errors; k-diffusion samplers
against a float64 plain-torch transcription of k-diffusion's published algorithms (<= 1e-5).
GPU (skipped without CUDA): a whole loop under ``torch.cuda.set_sync_debug_mode("error")`` and a
complete loop captured in one CUDA graph equal to eager.
"""
import math

import pytest
import torch

import pydiff

from pydiff import kdiffusion as K
from pydiff.samplers import CudaGraphSampler, available_samplers, build_plan, pad_coeffs, sample
from pydiff.samplers.plan import make_stepper
from pydiff.reference.solver import num_coeffs, solver_step_ref
from pydiff.testing.gmm import GaussianMixture

ALL = ["ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "plms", "euler", "heun", "unipc", "flow_euler"]
SHAPE = (2, 4, 6, 6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


class LinModel:
    """A small nonlinear stand-in model ``tanh(W x) * (1 + t / 1000) (+ cond)`` that counts calls."""

    def __init__(self, seed=0, channels=4):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(channels, channels, generator=g) * 0.4
        self.calls, self.batches = 0, []

    def __call__(self, x, t, cond=None):
        self.calls += 1
        self.batches.append(x.shape[0])
        W = self.W.to(x.device)
        y = torch.tanh(torch.einsum("ij,bj...->bi...", W, x)) * (1 + t.float() / 1000).reshape(-1, 1, 1, 1)
        return y if cond is None else y + cond


def _cond(seed=3, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.2, torch.zeros(shape)


def _rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


# ------------------------------------------------------------------------------------------------
# plan / loop against the steppers
# ------------------------------------------------------------------------------------------------
CASES = [("ddim", {}), ("ddim", {"eta": 0.7}), ("ddpm", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}),
         ("dpmpp_2m_sde", {}), ("plms", {}), ("euler", {}), ("euler", {"s_churn": 2.0}), ("heun", {}),
         ("unipc", {}), ("unipc", {"solver_order": 3}), ("flow_euler", {}), ("dpmpp_2m", {"sigmas": "karras"}),
         ("ddim", {"prediction_type": "v_prediction"}), ("heun", {"clip_sample": True}),
         ("euler", {"timestep_spacing": "trailing"}), ("ddim", {"clip_sample": True})]


def _stepper_loop(name, opts, model, noise, g, cond, uncond, steps, gen):
    opts = dict(opts)
    st, step_opts = make_stepper(name, prediction_type=opts.pop("prediction_type", None),
                                 timestep_spacing=opts.pop("timestep_spacing", None), sigmas=opts.pop("sigmas", None),
                                 **opts)
    st.set_timesteps(steps)
    x = noise * st.init_noise_sigma
    for t in st.timesteps:
        xin = st.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), float(t))
        c, u = model(xin, tt, cond), model(xin, tt, uncond)
        kw = dict(step_opts)
        if name not in ("heun", "plms"):
            kw["generator"] = gen
        x = st.step(c, x, model_uncond=u, guidance_scale=g, **kw)
    return x


@pytest.mark.parametrize("name,opts", CASES, ids=lambda v: str(v))
def test_loop_equals_stepper_and_table_equals_host(name, opts):
    """The plan-driven loop reproduces the stepper driven by hand bit for bit (CFG, generator noise),
    and the float64 coefficient-table path (device step counter) equals the host-coefficient path."""
    model = LinModel()
    cond, uncond = _cond()
    steps, g = 7, 4.0
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref = _stepper_loop(name, opts, model, noise, g, cond, uncond, steps, torch.Generator().manual_seed(2))
    outs = []
    for use_table in (False, True):
        out = sample(model, noise, name, steps, guidance_scale=g, cond=cond, uncond=uncond, cfg_batched=False,
                     generator=torch.Generator().manual_seed(2), progress=False, use_table=use_table, **opts)
        outs.append(out)
    assert torch.isfinite(ref).all()
    assert torch.equal(outs[0], ref), f"loop vs stepper: {_rel(outs[0], ref):.2e}"
    assert torch.equal(outs[1], outs[0]), f"table vs host: {_rel(outs[1], outs[0]):.2e}"


def test_pad_coeffs_and_table_layout():
    """Zero-padded history entries in front leave the step unchanged (reference op, float64)."""
    g = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    hist = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    v = [((i * 7) % 11 - 5) / 3.0 for i in range(num_coeffs(2))]
    padded = pad_coeffs(v, 2, 5)
    assert len(padded) == num_coeffs(5)
    zeros = [torch.zeros_like(x)] * 3
    a = solver_step_ref(x, c, u, hist, None, None, v)
    b = solver_step_ref(x, c, u, zeros + hist, None, None, padded)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    plan = build_plan("dpmpp_3m", 6)
    tab = plan.table(guidance_scale=3.0)
    assert tab.shape == (6, num_coeffs(plan.max_history)) and plan.max_history == 2
    assert (tab[:, 0] == 3.0).all()
    assert [e.k for e in plan.evals] == [0, 1, 2, 2, 1, 0]  # warm-up, 3rd order, lower_order_final (n < 15)
    with pytest.raises(ValueError):
        pad_coeffs(v, 3, 4)


# ------------------------------------------------------------------------------------------------
# end-to-end parity with diffusers' loops
# ------------------------------------------------------------------------------------------------
DIFFUSERS = [("ddim", "DDIMScheduler", {"clip_sample": False}), ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
             ("euler", "EulerDiscreteScheduler", {}), ("heun", "HeunDiscreteScheduler", {}),
             ("unipc", "UniPCMultistepScheduler", {}), ("plms", "PNDMScheduler", {"skip_prk_steps": True}),
             ("flow_euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
             ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                          "prediction_type": "v_prediction"})]


@pytest.mark.parametrize("name,cls,cfg", DIFFUSERS, ids=lambda v: str(v))
def test_matches_diffusers_pipeline_loop(name, cls, cfg):
    """sample() gives the samples of a diffusers-style loop (scale_model_input, batched CFG, step)
    with the matching diffusers scheduler: max relative difference <= 1e-5 over 25 steps (fp32)."""
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, cls)(**cfg)
    model = LinModel(seed=5)
    cond, uncond = _cond(seed=6)
    g, steps = 5.0, 25
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    sched.set_timesteps(steps)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model(torch.cat([xin, xin]), t.float().expand(2 * SHAPE[0]), torch.cat([uncond, cond]))
        u, c = out.chunk(2)
        x = sched.step(u + g * (c - u), t, x).prev_sample
    ours = sample(model, noise, name, steps, guidance_scale=g, cond=cond, uncond=uncond, progress=False,
                  scheduler_config=sched.config)
    assert _rel(ours, x) <= 1e-5, f"{name}: {_rel(ours, x):.2e}"


# ------------------------------------------------------------------------------------------------
# guidance, prediction types, generators, trajectory, progress, errors
# ------------------------------------------------------------------------------------------------
def test_cfg_batched_and_two_calls_agree():
    cond, uncond = _cond()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    m1, m2 = LinModel(), LinModel()
    a = sample(m1, noise, "dpmpp_2m", 6, guidance_scale=3.0, cond=cond, uncond=uncond, cfg_batched=True,
               progress=False)
    b = sample(m2, noise, "dpmpp_2m", 6, guidance_scale=3.0, cond=cond, uncond=uncond, cfg_batched=False,
               progress=False)
    assert m1.calls == 6 and set(m1.batches) == {2 * SHAPE[0]}
    assert m2.calls == 12 and set(m2.batches) == {SHAPE[0]}
    assert _rel(a, b) <= 1e-6
    m3 = LinModel()  # no guidance: one call per evaluation on the plain batch
    sample(m3, noise, "dpmpp_2m", 6, cond=cond, progress=False)
    assert m3.calls == 6 and set(m3.batches) == {SHAPE[0]}
    # dict conditioning is concatenated leaf by leaf
    seen = []

    def dmodel(x, t, cond):
        seen.append(cond["emb"].shape[0])
        return x * 0.1 + cond["emb"]

    sample(dmodel, noise, "ddim", 3, guidance_scale=2.0, cond={"emb": cond}, uncond={"emb": uncond}, progress=False)
    assert seen == [4, 4, 4]


def test_guidance_rescale_matches_stepper():
    model = LinModel()
    cond, uncond = _cond()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = sample(model, noise, "ddim", 5, guidance_scale=6.0, guidance_rescale=0.7, cond=cond, uncond=uncond,
                 progress=False)
    st, _ = make_stepper("ddim")
    st.set_timesteps(5)
    x = noise
    for t in st.timesteps:
        tt = torch.full((2,), float(t))
        x = st.step(model(x, tt, cond), x, model_uncond=model(x, tt, uncond), guidance_scale=6.0,
                    guidance_rescale=0.7)
    assert torch.equal(out, x)


def test_prediction_types_agree_on_the_exact_model():
    """The exact GMM model in epsilon, v and x0 form drives the same DDIM / DPM-Solver++ trajectory."""
    gm = GaussianMixture.toy_image()
    noise = torch.randn((8,) + gm.event_shape, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "dpmpp_2m", "unipc"):
        outs = {}
        for pred in ("epsilon", "v_prediction", "sample"):
            m = gm.model(pred)
            outs[pred] = sample(m, noise, name, 10, prediction_type=pred, progress=False,
                                timestep_spacing="trailing", scheduler_config=m.scheduler_config)
        assert _rel(outs["v_prediction"], outs["epsilon"]) <= 1e-4, name
        assert _rel(outs["sample"], outs["epsilon"]) <= 1e-3, name


def test_generator_reproducibility():
    model = LinModel()
    for name in ("ddpm", "dpmpp_2m_sde", "euler"):
        kw = {"s_churn": 1.0} if name == "euler" else {}
        run = lambda seed: sample(model, SHAPE, name, 6, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                  progress=False, **kw)
        a, b, c = run(0), run(0), run(1)
        assert torch.equal(a, b) and not torch.equal(a, c), name
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    a = sample(model, SHAPE, "ddpm", 4, generator=gens, progress=False)
    gens = [torch.Generator().manual_seed(s) for s in (0, 5)]
    b = sample(model, SHAPE, "ddpm", 4, generator=gens, progress=False)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # one generator per sample


def test_x0_trajectory():
    gm = GaussianMixture.toy_2d()
    m = gm.model("epsilon")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for name, evals in (("ddim", 8), ("heun", 15), ("plms", 9), ("flow_euler", 8)):
        mod = gm.model("flow_prediction") if name == "flow_euler" else m
        cfg = {} if name == "flow_euler" else dict(scheduler_config=m.scheduler_config)
        x, traj = sample(mod, noise, name, 8, progress=False, return_x0_trajectory=True, **cfg)
        assert len(traj) == evals and all(t.shape == x.shape for t in traj)
        assert (traj[-1] - x).abs().max() < 0.05, name  # the last x0 estimate is close to the sample
        _, traj_t = sample(mod, noise, name, 8, progress=False, return_x0_trajectory=True, use_table=True, **cfg)
        assert all(torch.equal(a, b) for a, b in zip(traj, traj_t))
    # the x0 estimates are the exact posterior means at the visited points
    seen = []
    x, traj = sample(m, noise, "ddim", 4, progress=False, return_x0_trajectory=True, timestep_spacing="trailing",
                     callback=lambda d: seen.append(d["i"]), scheduler_config=m.scheduler_config)
    assert seen == [0, 1, 2, 3]
    a = math.sqrt(m.schedule.alphas_cumprod[999])
    x0 = gm.posterior_mean(noise.double(), a, math.sqrt(1 - a * a))
    assert (traj[0].double() - x0).abs().max() < 1e-3


@pytest.mark.parametrize("name,opts", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_hallucination_score_matches_stored_trajectory(name, opts, backend):
    """The per-sample x0 variance accumulated inside the step kernels equals the variance of the
    stored x0 trajectory over the same window, and tracking leaves the sample unchanged."""
    if backend not in pydiff.available_backends(torch.device("cpu")):
        pytest.skip(f"backend {backend} not available here")
    model = LinModel()
    cond, uncond = _cond()
    steps, g = 7, 4.0
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance_scale=g, cond=cond, uncond=uncond, progress=False, backend=backend, **opts)
    x, traj = sample(model, noise, name, steps, generator=torch.Generator().manual_seed(2),
                     return_x0_trajectory=True, **kw)
    win = min(4, len(traj))
    for use_table in (False, True):
        x2, score = sample(model, noise, name, steps, generator=torch.Generator().manual_seed(2),
                           hallucination_window=win, use_table=use_table, **kw)
        assert torch.equal(x2, x), "tracking changed the sample"
        last = torch.stack([t.double() for t in traj[-win:]])
        clip = opts.get("clip_sample", False)
        if clip:  # the tracked x0 is the step's clamped estimate
            last = last.clamp(-1.0, 1.0)
        want = last.var(dim=0, unbiased=False).flatten(1).mean(dim=1)
        assert score.shape == (SHAPE[0],) and score.dtype == torch.float64
        assert (want > 0).all()
        torch.testing.assert_close(score, want, rtol=2e-4, atol=1e-9)


def test_hallucination_score_separates_modes_and_checks_args():
    # the sample stuck between two modes varies more over the last steps than one near a mode
    gm = GaussianMixture.toy_2d()
    m = gm.model("epsilon")
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    x, score = sample(m, noise, "ddim", 20, progress=False, hallucination_window=20,
                      scheduler_config=m.scheduler_config)
    assert score.shape == (256,) and torch.isfinite(score).all() and (score >= 0).all()
    with pytest.raises(ValueError, match="track_x0_last"):
        sample(m, noise, "ddim", 5, progress=False, hallucination_window=6, scheduler_config=m.scheduler_config)
    from pydiff.ops.solver import solver_step, x0_variance
    xx = torch.randn(2, 3)
    with pytest.raises(TypeError, match="x0_stats"):
        solver_step(xx, xx, coeffs=[0.0] * 16, x0_stats=torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="x0_stats"):
        solver_step(xx, xx, coeffs=[0.0] * 16, x0_stats=torch.zeros(2, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="n:"):
        x0_variance(torch.zeros(2, 2, 3, dtype=torch.float64), 0)


def test_progress_bar(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real_import(name, *a, **k)

    model = LinModel()
    sample(model, SHAPE, "ddim", 3, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    sample(model, SHAPE, "ddim", 3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "ddim" in err


def test_spacing_and_sigma_options():
    assert available_samplers() == sorted(ALL)
    p = build_plan("ddim", 5, timestep_spacing="trailing")
    assert [e.t for e in p.evals] == [999.0, 799.0, 599.0, 399.0, 199.0]
    p = build_plan("ddim", 5, timestep_spacing="leading")
    assert [e.t for e in p.evals] == [800.0, 600.0, 400.0, 200.0, 0.0]
    p = build_plan("dpmpp_2m", 5, timestep_spacing="linspace")
    assert p.evals[0].t == 999.0
    pk, pe = build_plan("euler", 6, sigmas="karras"), build_plan("euler", 6, sigmas="exponential")
    assert pk.evals[0].t == pe.evals[0].t and pk.evals[2].t != pe.evals[2].t
    assert len(build_plan("heun", 6).evals) == 11 and len(build_plan("plms", 6).evals) == 7
    model = LinModel()
    a = sample(model, SHAPE, "dpmpp_2m", 5, karras=True, generator=torch.Generator().manual_seed(0), progress=False)
    b = sample(model, SHAPE, "dpmpp_2m", 5, sigmas="karras", generator=torch.Generator().manual_seed(0),
               progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(sampler="nope"), ValueError, "unknown 'nope'"),
    (dict(sampler="ddim", sigmas="karras"), ValueError, "no sigma schedule option"),
    (dict(sampler="dpmpp_2m", sigmas="beta"), ValueError, "expected 'karras', 'exponential'"),
    (dict(sampler="flow_euler", prediction_type="epsilon"), ValueError, "velocity model"),
    (dict(sampler="ddim", not_a_key=1), TypeError, "unknown option"),
    (dict(sampler="ddim", guidance_rescale=0.5), ValueError, "needs classifier-free guidance"),
    (dict(sampler="ddim", steps=0), ValueError, "steps: expected an int >= 1"),
    (dict(sampler="ddim", eta=-1.0), ValueError, "eta"),
])
def test_bad_arguments(kw, exc, msg):
    kw = dict(kw)
    with pytest.raises(exc, match=msg):
        sample(LinModel(), SHAPE, kw.pop("sampler"), kw.pop("steps", 4), progress=False, **kw)


def test_model_output_forms():
    """Model outputs as diffusers output objects or tuples are unwrapped; fp16 outputs are cast."""
    class Out:
        def __init__(self, s):
            self.sample = s

    a = sample(lambda x, t, c: Out(x * 0.1), SHAPE, "ddim", 3, generator=torch.Generator().manual_seed(0),
               progress=False)
    b = sample(lambda x, t, c: (x * 0.1,), SHAPE, "ddim", 3, generator=torch.Generator().manual_seed(0),
               progress=False)
    c = sample(lambda x, t, c: (x * 0.1).half(), SHAPE, "ddim", 3, generator=torch.Generator().manual_seed(0),
               progress=False)
    assert torch.equal(a, b) and _rel(c, a) < 1e-2


# ------------------------------------------------------------------------------------------------
# k-diffusion API: float64 transcription of k-diffusion's published algorithms
# ------------------------------------------------------------------------------------------------
def _kref(name, model, x, sigmas, noise=None, **kw):
    """Plain float64 torch following k_diffusion/sampling.py line by line."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda s: s.log().neg()  # noqa: E731
    n = len(sigmas) - 1
    if name in ("euler", "heun"):
        s_churn, s_noise = kw.get("s_churn", 0.0), kw.get("s_noise", 1.0)
        for i in range(n):
            gamma = min(s_churn / n, 2 ** 0.5 - 1) if 0.0 <= sigmas[i] <= float("inf") else 0.0
            sigma_hat = sigmas[i] * (gamma + 1)
            if gamma > 0:
                x = x + noise() * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
            den = model(x, sigma_hat * s_in)
            d = (x - den) / sigma_hat
            dt = sigmas[i + 1] - sigma_hat
            if name == "euler" or sigmas[i + 1] == 0:
                x = x + d * dt
            else:
                x2 = x + d * dt
                den2 = model(x2, sigmas[i + 1] * s_in)
                d2 = (x2 - den2) / sigmas[i + 1]
                x = x + (d + d2) / 2 * dt
        return x
    if name == "euler_ancestral":
        eta = kw.get("eta", 1.0)
        for i in range(n):
            den = model(x, sigmas[i] * s_in)
            up = min(sigmas[i + 1], eta * (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2)
                                           / sigmas[i] ** 2) ** 0.5)
            down = (sigmas[i + 1] ** 2 - up ** 2) ** 0.5
            x = x + (x - den) / sigmas[i] * (down - sigmas[i])
            if sigmas[i + 1] > 0:
                x = x + noise() * up
        return x
    if name == "dpmpp_2m":
        old = None
        for i in range(n):
            den = model(x, sigmas[i] * s_in)
            t, tn = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = tn - t
            if old is None or sigmas[i + 1] == 0:
                x = (sigma_fn(tn) / sigma_fn(t)) * x - (-h).expm1() * den
            else:
                r = (t - t_fn(sigmas[i - 1])) / h
                x = (sigma_fn(tn) / sigma_fn(t)) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * old)
            old = den
        return x
    if name == "dpmpp_2m_sde":
        eta, solver_type = kw.get("eta", 1.0), kw.get("solver_type", "midpoint")
        old = h_last = h = None
        for i in range(n):
            den = model(x, sigmas[i] * s_in)
            if sigmas[i + 1] == 0:
                x = den
            else:
                t, s = -sigmas[i].log(), -sigmas[i + 1].log()
                h = s - t
                eta_h = eta * h
                x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * den
                if old is not None:
                    r = h_last / h
                    if solver_type == "heun":
                        x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (den - old)
                    else:
                        x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (den - old)
                if eta:
                    x = x + noise() * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
            old, h_last = den, h
        return x
    if name == "dpmpp_3m_sde":
        eta = kw.get("eta", 1.0)
        d_1 = d_2 = h = h_1 = h_2 = None
        for i in range(n):
            den = model(x, sigmas[i] * s_in)
            if sigmas[i + 1] == 0:
                x = den
            else:
                t, s = -sigmas[i].log(), -sigmas[i + 1].log()
                h = s - t
                h_eta = h * (eta + 1)
                x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * den
                if h_2 is not None:
                    r0, r1 = h_1 / h, h_2 / h
                    d1_0 = (den - d_1) / r0
                    d1_1 = (d_1 - d_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_2 = h_eta.neg().expm1() / h_eta + 1
                    phi_3 = phi_2 / h_eta - 0.5
                    x = x + phi_2 * d1 - phi_3 * d2
                elif h_1 is not None:
                    r = h_1 / h
                    x = x + (h_eta.neg().expm1() / h_eta + 1) * (den - d_1) / r
                if eta:
                    x = x + noise() * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
            d_1, d_2 = den, d_1
            h_1, h_2 = h, h_1
        return x
    raise KeyError(name)


KD = [("euler", {}), ("euler", {"s_churn": 4.0}), ("heun", {}), ("heun", {"s_churn": 4.0}),
      ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5}), ("dpmpp_2m", {}), ("dpmpp_2m_sde", {}),
      ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}), ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.0})]


@pytest.mark.parametrize("name,kw", KD, ids=lambda v: str(v))
@pytest.mark.parametrize("sched", ["karras", "exponential"])
def test_kdiffusion_matches_float64_reference(name, kw, sched):
    gm = GaussianMixture.toy_image()
    den = gm.denoiser()
    n = 12
    sigmas = (K.get_sigmas_karras if sched == "karras" else K.get_sigmas_exponential)(n, 0.02, 80.0)
    x = torch.randn((4,) + gm.event_shape, generator=torch.Generator().manual_seed(0)) * 80.0
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(2 * n)]

    def sampler_from(lst, dtype):
        it = iter(lst)
        return lambda *a: next(it).to(dtype)

    churn = "s_churn" in kw
    ref = _kref(name, den, x.double(), sigmas.double(), noise=sampler_from(noises, torch.float64), **kw)
    fn = getattr(K, f"sample_{name}")
    seen = []
    cb = lambda d: seen.append((d["i"], d["denoised"].shape))  # noqa: E731
    if churn:  # Euler / Heun churn noise comes from a generator: give the reference the same draws
        g = torch.Generator().manual_seed(9)
        draws = [torch.randn(x.shape, generator=g) for _ in range(n)]
        ref = _kref(name, den, x.double(), sigmas.double(), noise=sampler_from(draws, torch.float64), **kw)
        out = fn(den, x, sigmas, callback=cb, disable=True, generator=torch.Generator().manual_seed(9), **kw)
    elif name == "euler" or name == "heun" or name == "dpmpp_2m":
        out = fn(den, x, sigmas, callback=cb, disable=True, **kw)
    else:
        out = fn(den, x, sigmas, callback=cb, disable=True, noise_sampler=sampler_from(noises, torch.float32), **kw)
    assert [i for i, _ in seen] == list(range(n))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-5, f"{name}: {_rel(out, ref):.2e}"


def test_kdiffusion_schedules_and_helpers():
    s = K.get_sigmas_karras(5, 0.1, 10.0, rho=7.0)
    ramp = torch.linspace(0, 1, 5)
    exp = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1], exp) and s[-1] == 0 and len(s) == 6
    e = K.get_sigmas_exponential(4, 0.1, 10.0)
    assert torch.allclose(e[:-1], torch.tensor([10.0, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1]), rtol=1e-6) and e[-1] == 0
    assert K.get_ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    down, up = K.get_ancestral_step(2.0, 1.0)
    assert abs(down ** 2 + up ** 2 - 1.0) < 1e-12
    x, d = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(K.to_d(x, torch.tensor([2.0, 4.0]), d), torch.tensor([[0.5] * 3, [0.25] * 3]))
    # extra_args reach the model; a generator makes the stochastic samplers reproducible
    got = []

    def model(x, sigma, cond=None):
        got.append(cond)
        return x * 0.5

    x = torch.randn(2, 3, 4, 4)
    K.sample_euler(model, x, K.get_sigmas_karras(3, 0.1, 5.0), extra_args={"cond": "c"}, disable=True)
    assert got == ["c"] * 3
    a = K.sample_dpmpp_2m_sde(model, x, K.get_sigmas_karras(4, 0.1, 5.0), disable=True,
                              generator=torch.Generator().manual_seed(0))
    b = K.sample_dpmpp_2m_sde(model, x, K.get_sigmas_karras(4, 0.1, 5.0), disable=True,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="solver_type"):
        K.sample_dpmpp_2m_sde(model, x, K.get_sigmas_karras(4, 0.1, 5.0), solver_type="rk4", disable=True)
    with pytest.raises(TypeError, match="float32"):
        K.sample_euler(model, x.double(), K.get_sigmas_karras(4, 0.1, 5.0), disable=True)


def test_kdiffusion_one_fused_step_per_evaluation(monkeypatch):
    """Every update is one pydiff.solver_step call per model evaluation (churn noise adds one)."""
    import pydiff.kdiffusion as kd

    calls = []
    real = kd.solver_step
    monkeypatch.setattr(kd, "solver_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    evals = []

    def model(x, sigma):
        evals.append(1)
        return x * 0.3

    x = torch.randn(2, 4)
    sig = K.get_sigmas_karras(6, 0.1, 5.0)
    for fn in (K.sample_euler, K.sample_heun, K.sample_dpmpp_2m, K.sample_euler_ancestral):
        calls.clear()
        evals.clear()
        fn(model, x, sig, disable=True)
        assert len(calls) == len(evals) - (1 if fn is K.sample_dpmpp_2m else 0), fn.__name__  # last: x = D


# ------------------------------------------------------------------------------------------------
# GPU: no host sync, CUDA graph capture
# ------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")


class TinyNet(torch.nn.Module):
    """conv - time-conditioned scale/shift - SiLU - conv, plus the conditioning; capturable."""

    def __init__(self, ch=4, hidden=32):
        super().__init__()
        self.inp = torch.nn.Conv2d(ch, hidden, 3, padding=1)
        self.temb = torch.nn.Linear(16, 2 * hidden)
        self.out = torch.nn.Conv2d(hidden, ch, 3, padding=1)
        torch.nn.init.normal_(self.out.weight, std=0.02)

    def forward(self, x, t, cond=None):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, device=x.device) / 8)
        ang = t.float()[:, None] * freqs[None]
        e = self.temb(torch.cat([ang.sin(), ang.cos()], 1))
        scale, shift = e.chunk(2, dim=1)
        h = self.inp(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        y = self.out(torch.nn.functional.silu(h))
        return y if cond is None else y + cond


def _gpu_setup(seed=0, shape=(2, 4, 16, 16)):
    torch.manual_seed(seed)
    model = TinyNet().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(seed)
    cond = torch.randn(shape, device="cuda", generator=g) * 0.1
    uncond = torch.zeros(shape, device="cuda")
    return model, cond, uncond, shape


@cuda
@pytest.mark.parametrize("name", ALL)
def test_gpu_whole_loop_without_host_sync(name):
    """A complete sample() call (tables, noise, model, every fused step) under sync debug mode
    'error': any host synchronisation raises."""
    model, cond, uncond, shape = _gpu_setup()
    kw = dict(guidance_scale=4.0, cond=cond, uncond=uncond, device="cuda", progress=False)
    with torch.no_grad():
        sample(model, shape, name, 6, generator=torch.Generator("cuda").manual_seed(0), **kw)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for use_table in (False, True):
                out = sample(model, shape, name, 8, generator=torch.Generator("cuda").manual_seed(1),
                             use_table=use_table, guidance_rescale=0.5 if name == "ddim" else 0.0, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()


@cuda
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun", "plms", "euler", "flow_euler"])
def test_gpu_cuda_graph_replay_equals_eager(name):
    model, cond, uncond, shape = _gpu_setup()
    noise = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    kw = dict(guidance_scale=4.0, cond=cond, uncond=uncond)
    with torch.no_grad():
        eager = sample(model, noise, name, 10, progress=False, **kw)
        eager_table = sample(model, noise, name, 10, progress=False, use_table=True, **kw)
        gs = CudaGraphSampler(model, shape, name, 10, **kw)
        out = gs(noise)
        again = gs(noise)
    assert torch.equal(out, again)
    assert _rel(out, eager_table) <= 1e-6, f"graph vs eager (table): {_rel(out, eager_table):.2e}"
    assert _rel(out, eager) <= 1e-5, f"graph vs eager: {_rel(out, eager):.2e}"
    # a new guidance scale without recapture
    with torch.no_grad():
        gs.set_guidance_scale(2.0)
        out2 = gs(noise)
        eager2 = sample(model, noise, name, 10, progress=False, **dict(kw, guidance_scale=2.0))
    assert _rel(out2, eager2) <= 1e-5


@cuda
@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "ddpm"])
def test_gpu_cuda_graph_stochastic_matches_eager_with_generator(name):
    """Step noise is drawn inside the graph from the registered CUDA generator: same seed, same
    samples as eager; each replay draws new noise."""
    model, cond, uncond, shape = _gpu_setup()
    g = torch.Generator("cuda")
    kw = dict(guidance_scale=3.0, cond=cond, uncond=uncond)
    with torch.no_grad():
        gs = CudaGraphSampler(model, shape, name, 8, generator=g, **kw)
        g.manual_seed(11)
        eager = sample(model, shape, name, 8, generator=g, device="cuda", progress=False, **kw)
        g.manual_seed(11)
        out = gs()
        out_next = gs()
    assert _rel(out, eager) <= 1e-5, f"{_rel(out, eager):.2e}"
    assert not torch.equal(out, out_next)


@cuda
def test_gpu_cuda_graph_with_diffusers_unet_and_x0_trajectory():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).cuda().eval()
    model = lambda x, t, cond: unet(x, t).sample  # noqa: E731
    shape = (2, 4, 16, 16)
    noise = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager, traj = sample(model, noise, "dpmpp_2m", 8, progress=False, use_table=True, return_x0_trajectory=True)
        gs = CudaGraphSampler(model, shape, "dpmpp_2m", 8, return_x0_trajectory=True)
        out, gtraj = gs(noise)
    assert _rel(out, eager) <= 1e-5
    assert len(gtraj) == 8 and all(_rel(a, b) <= 1e-5 for a, b in zip(gtraj, traj))
