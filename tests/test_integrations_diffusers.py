"""The drop-in diffusers schedulers (pydiff.integrations.diffusers) against diffusers' own.

1. diffusers pipelines (DDPMPipeline, DDIMPipeline, and a generic DiffusionPipeline with the
   Stable Diffusion denoising loop) on a small random UNet2DModel give the same images with our
   scheduler as with theirs: max relative difference <= 1e-5 in fp32, all 8 schedulers.
2. A text-to-image style loop with classifier-free guidance on a small random UNet2DConditionModel
   (random encoder_hidden_states), ours vs theirs <= 1e-5, and the same with guidance fused into our
   step (``model_uncond=``).
3. Per-method parity: config, timesteps, sigmas, init_noise_sigma, order, scale_model_input,
   add_noise / scale_noise, step_index progression, pred_original_sample, img2img starts, and many
   config variants on a cheap stand-in model.
4. Unsupported options raise NotImplementedError naming the option.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

import pydiff.integrations.diffusers as P  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

NAMES = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
         "HeunDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"]
TOL = 1e-5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    diffusers.utils.logging.set_verbosity_error()
    yield


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def pair(name, **config):
    theirs = getattr(diffusers, name)(**config)
    return theirs, getattr(P, name).from_config(theirs.config)


# ------------------------------------------------------------------------------------------------
# small random models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def cond_unet():
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8).eval()


class LatentPipeline(DiffusionPipeline):
    """Unconditional pipeline with Stable Diffusion's denoising loop: timesteps from set_timesteps,
    init_noise_sigma, scale_model_input, and step(noise_pred, t, latents, **extra_step_kwargs) with
    eta / generator passed when the scheduler's step accepts them."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size=2, num_inference_steps=10, generator=None, eta=0.0):
        s = self.scheduler
        shape = (batch_size, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        latents = randn_tensor(shape, generator=generator)
        s.set_timesteps(num_inference_steps, device=latents.device)
        latents = latents * getattr(s, "init_noise_sigma", 1.0)
        params = set(inspect.signature(s.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        for t in self.progress_bar(s.timesteps):
            inp = s.scale_model_input(latents, t) if hasattr(s, "scale_model_input") else latents
            noise_pred = self.unet(inp, t).sample
            latents = s.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        return latents


PIPE_CONFIGS = {
    "DDIMScheduler": dict(clip_sample=False),  # clip_sample=True: see test_clip_sample_vs_float64
    "DDPMScheduler": {},
    "DPMSolverMultistepScheduler": dict(SD, algorithm_type="sde-dpmsolver++"),
    "EulerDiscreteScheduler": dict(SD),
    "HeunDiscreteScheduler": dict(SD),
    "PNDMScheduler": dict(SD),  # default skip_prk_steps=False: the pseudo Runge-Kutta warm-up
    "UniPCMultistepScheduler": dict(SD, solver_order=3),
    "FlowMatchEulerDiscreteScheduler": dict(shift=3.0),
}


# ------------------------------------------------------------------------------------------------
# 1. pipelines
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_same_images(unet, name):
    theirs, ours = pair(name, **PIPE_CONFIGS[name])
    outs = []
    for s in (theirs, ours):
        pipe = LatentPipeline(unet=unet, scheduler=s)
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(num_inference_steps=10, generator=torch.Generator().manual_seed(3), eta=0.3))
    assert torch.isfinite(outs[1]).all()
    assert rel(outs[1], outs[0]) <= TOL, f"{name}: {rel(outs[1], outs[0]):.2e}"


def test_ddpm_and_ddim_pipelines(unet):
    """diffusers' own DDPMPipeline and DDIMPipeline (eta > 0: noise drawn from the generator)."""
    for pipe_cls, name, kw in ((diffusers.DDPMPipeline, "DDPMScheduler", {}),
                               (diffusers.DDIMPipeline, "DDIMScheduler", dict(eta=0.5))):
        theirs, ours = pair(name, clip_sample=False)
        imgs = []
        for s in (theirs, ours):
            pipe = pipe_cls(unet=unet, scheduler=theirs)
            pipe.scheduler = s  # DDIMPipeline converts whatever it is given into diffusers' DDIMScheduler
            assert pipe.scheduler is s
            pipe.set_progress_bar_config(disable=True)
            imgs.append(pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(7),
                             output_type="np", **kw).images)
        assert rel(imgs[1], imgs[0]) <= TOL, f"{pipe_cls.__name__}: {rel(imgs[1], imgs[0]):.2e}"


# ------------------------------------------------------------------------------------------------
# 2. text-to-image style loop with classifier-free guidance
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                  "UniPCMultistepScheduler", "DDIMScheduler"])
def test_cfg_loop_conditional_unet(cond_unet, name):
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(2, 7, 32, generator=g)          # [uncond, cond] "text embeddings"
    start = torch.randn(1, 4, 8, 8, generator=g)
    cfg = dict(SD, steps_offset=1, clip_sample=False) if name == "DDIMScheduler" else dict(SD)
    theirs, ours = pair(name, **cfg)

    @torch.no_grad()
    def run(s, fused=False, steps=8, gs=7.5, phi=0.0):
        s.set_timesteps(steps)
        lat = start * getattr(s, "init_noise_sigma", 1.0)
        for t in s.timesteps:
            inp = s.scale_model_input(torch.cat([lat] * 2), t)
            u, c = cond_unet(inp, t, encoder_hidden_states=emb).sample.chunk(2)
            if fused:
                lat = s.step(c, t, lat, model_uncond=u, guidance_scale=gs, guidance_rescale=phi).prev_sample
            else:
                m = u + gs * (c - u)
                if phi:
                    r = c.std(dim=[1, 2, 3], keepdim=True) / m.std(dim=[1, 2, 3], keepdim=True)
                    m = phi * (m * r) + (1 - phi) * m
                lat = s.step(m, t, lat).prev_sample
        return lat

    ref = run(theirs)
    assert rel(run(ours), ref) <= TOL
    assert rel(run(ours, fused=True), ref) <= TOL
    ref_r = run(theirs, phi=0.7)
    assert rel(run(ours, fused=True, phi=0.7), ref_r) <= TOL


# ------------------------------------------------------------------------------------------------
# 3. per-method parity on a stand-in model
# ------------------------------------------------------------------------------------------------
_W = torch.randn(8, 8, generator=torch.Generator().manual_seed(5)) * 0.4


def standin(x, t, out_channels=None):
    """A fixed smooth 'denoiser' of x and t (output channels = input channels unless given)."""
    c = x.shape[1]
    oc = out_channels or c
    return torch.tanh(torch.einsum("oc,bchw->bohw", _W[:oc, :c], x) * 0.7 + 0.05 * torch.sin(torch.as_tensor(
        float(t) / 150.0)))


def trajectory(s, x, steps, *, set_kw=None, step_kw=None, seed=None, out_channels=None, check=None):
    """Run a sampling loop; returns the list of (prev_sample, pred_original_sample or None, step_index)."""
    s.set_timesteps(steps, **(set_kw or {})) if steps is not None else s.set_timesteps(**set_kw)
    x = x * getattr(s, "init_noise_sigma", 1.0)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    hist = []
    for t in s.timesteps:
        xi = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        kw = dict(step_kw or {})
        if gen is not None:
            kw["generator"] = gen
        out = s.step(standin(xi, t, out_channels), t, x, **kw)
        x = out.prev_sample
        hist.append((x, getattr(out, "pred_original_sample", None), getattr(s, "step_index", None)))
    return hist


def assert_same_trajectory(theirs_h, ours_h, what):
    assert len(theirs_h) == len(ours_h)
    for i, ((xt, x0t, it), (xo, x0o, io)) in enumerate(zip(theirs_h, ours_h)):
        assert torch.isfinite(xo).all(), f"{what}: step {i} not finite"
        if not torch.isfinite(xt).all():  # diffusers' NaN (UniPC bh1 onto sigma = 0): ours is the finite limit
            assert i == len(theirs_h) - 1, f"{what}: diffusers not finite before the last step"
            continue
        assert rel(xo, xt) <= TOL, f"{what}: step {i} prev_sample rel {rel(xo, xt):.2e}"
        if x0t is not None:
            assert x0o is not None and rel(x0o, x0t) <= TOL, f"{what}: step {i} pred_original_sample"
        assert io == it, f"{what}: step {i} step_index {io} != {it}"


X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))

# (scheduler, config, steps, set_timesteps kwargs, step kwargs, seed for a generator, model output channels)
CASES = [
    ("DDIMScheduler", {}, 10, {}, {}, None, None),
    ("DDIMScheduler", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False,
                           rescale_betas_zero_snr=True, set_alpha_to_one=False), 10, {}, {}, None, None),
    ("DDIMScheduler", dict(prediction_type="sample", timestep_spacing="linspace"), 7, {},
     dict(eta=1.0, use_clipped_model_output=True), 4, None),
    ("DDPMScheduler", dict(variance_type="fixed_large", prediction_type="v_prediction"), 10, {}, {}, 3, None),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", beta_schedule="squaredcos_cap_v2", clip_sample=False), 10,
     {}, {}, 3, None),
    ("DDPMScheduler", dict(beta_schedule="laplace", timestep_spacing="trailing"), 8, {}, {}, 3, None),
    ("DDPMScheduler", dict(beta_schedule="sigmoid"), None, dict(timesteps=[600, 420, 250, 100, 30, 0]), {}, 3, None),
    ("DDPMScheduler", dict(variance_type="learned_range"), 8, {}, {}, 3, 8),
    ("DDPMScheduler", dict(variance_type="learned"), 8, {}, {}, 3, "learned"),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, use_karras_sigmas=True), 12, {}, {}, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_type="heun"), 10, {}, {}, 9,
     None),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
     10, {}, {}, None, None),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
     10, {}, {}, None, None),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="deis", solver_type="bh2", euler_at_final=True,
                                         use_lu_lambdas=True, final_sigmas_type="sigma_min"), 9, {}, {}, None, None),
    ("DPMSolverMultistepScheduler", dict(SD), None, dict(timesteps=[999, 800, 500, 300, 100, 1]), {}, None, None),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1), 10, {},
     {}, None, None),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_type="continuous",
                                    final_sigmas_type="sigma_min", rescale_betas_zero_snr=True), 10, {}, {}, None,
     None),
    ("EulerDiscreteScheduler", dict(SD, use_exponential_sigmas=True, timestep_spacing="trailing"), 10, {},
     dict(s_churn=2.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.003), 6, None),
    ("EulerDiscreteScheduler", dict(SD, interpolation_type="log_linear"), 10, {}, {}, None, None),
    ("EulerDiscreteScheduler", dict(SD, interpolation_type="log_linear", use_karras_sigmas=True), 10, {}, {}, None,
     None),
    ("EulerDiscreteScheduler", dict(SD), None, dict(sigmas=[14.6, 7.0, 3.0, 1.0, 0.3, 0.03, 0.0]), {}, None, None),
    ("EulerDiscreteScheduler", dict(SD), None, dict(timesteps=[999, 850, 601, 400, 250.5, 100, 20]), {}, None, None),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction"), 8, {}, {}, None, None),
    ("HeunDiscreteScheduler", dict(beta_schedule="exp", clip_sample=True, clip_sample_range=2.0,
                                   prediction_type="sample", timestep_spacing="leading"), 8, {}, {}, None, None),
    ("HeunDiscreteScheduler", dict(SD), None, dict(timesteps=[999, 700, 400, 200, 50]), {}, None, None),
    ("HeunDiscreteScheduler", dict(SD, use_exponential_sigmas=True), 6, dict(num_train_timesteps=800), {}, None,
     None),
    ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1), 10, {}, {}, None, None),
    ("PNDMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing"), 10, {}, {}, None, None),
    ("PNDMScheduler", dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="linspace"), 9, {},
     {}, None, None),
    ("UniPCMultistepScheduler", dict(SD, solver_type="bh1", solver_order=3, disable_corrector=[0, 3]), 12, {}, {},
     None, None),
    ("UniPCMultistepScheduler", dict(predict_x0=False, use_karras_sigmas=True, final_sigmas_type="sigma_min"), 10,
     {}, {}, None, None),
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                     use_dynamic_shifting=True), 10, dict(mu=0.8), {}, None, None),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, shift_terminal=0.1), 10, dict(mu=1.1), {},
     None, None),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True, shift=2.0, use_karras_sigmas=True), 10, {}, {},
     8, None),
    ("FlowMatchEulerDiscreteScheduler", dict(invert_sigmas=True, time_shift_type="linear", use_dynamic_shifting=True),
     None, dict(sigmas=list(np.linspace(1.0, 0.05, 9)), mu=0.5), {}, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_trajectory_parity(case):
    name, config, steps, set_kw, step_kw, seed, oc = case
    theirs, ours = pair(name, **config)
    x = X
    if oc == "learned":  # learned variance: positive variances in the second half of the channels
        def model_channels(x_, t_):
            return torch.cat([standin(x_, t_), 0.01 + 0.02 * standin(x_, t_).abs()], dim=1)
        hist = []
        for s in (theirs, ours):
            s.set_timesteps(steps)
            xx, gen, h = x, torch.Generator().manual_seed(seed), []
            for t in s.timesteps:
                out = s.step(model_channels(xx, t), t, xx, generator=gen)
                xx = out.prev_sample
                h.append((xx, out.pred_original_sample, None))
            hist.append(h)
        assert_same_trajectory(hist[0], hist[1], name)
        return
    h_theirs = trajectory(theirs, x, steps, set_kw=set_kw, step_kw=step_kw, seed=seed, out_channels=oc)
    h_ours = trajectory(ours, x, steps, set_kw=set_kw, step_kw=step_kw, seed=seed, out_channels=oc)
    assert_same_trajectory(h_theirs, h_ours, f"{name} {config}")


def test_clip_sample_ill_conditioned_vs_float64(unet):
    """DDIM's default config (linear betas, clip_sample=True) forms x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    explicitly before the clamp, with sqrt(a) = 0.011 at the first timestep (900): fp32 rounding is
    amplified ~90x there, so two fp32 implementations that round differently end up ~1e-5..1e-4 apart
    (the <= 1e-5 pipeline criterion holds with clip_sample=False, test_pipeline_same_images).  What
    can be asked: ours is as close to a float64 run (diffusers' scheduler on float64 tensors, the
    UNet in float64) as diffusers' own fp32 run is."""
    import copy

    u64 = copy.deepcopy(unet).double()
    theirs, ours = pair("DDIMScheduler")
    start = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def run(s, model, dtype):
        s.set_timesteps(10)
        x = start.to(dtype)
        for t in s.timesteps:
            x = s.step(model(x, t).sample, t, x).prev_sample
        return x

    ref = run(copy.deepcopy(theirs), u64, torch.float64)
    e_theirs, e_ours = rel(run(theirs, unet, torch.float32), ref), rel(run(ours, unet, torch.float32), ref)
    print(f"DDIM clip_sample=True, 10 steps, vs float64: diffusers fp32 {e_theirs:.2e}, pydiff fp32 {e_ours:.2e}")
    assert e_ours <= 2 * e_theirs + 1e-6


def test_dpm_learned_variance_uses_first_three_channels():
    theirs, ours = pair("DPMSolverMultistepScheduler", variance_type="learned_range")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    h = [trajectory(s, x, 8, out_channels=6) for s in (theirs, ours)]
    assert_same_trajectory(h[0], h[1], "learned_range")


def _same(a, b, what):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        assert a.dtype == b.dtype, f"{what}: dtype {b.dtype} != {a.dtype}"
        assert a.shape == b.shape, f"{what}: shape {tuple(b.shape)} != {tuple(a.shape)}"
        assert a.device == b.device, f"{what}: device"
        assert rel(b, a) <= 1e-6 if a.numel() else True, f"{what}: values differ ({rel(b, a):.2e})"
    else:
        assert a == b or (isinstance(a, float) and abs(a - b) <= 1e-6 * abs(a)), f"{what}: {b} != {a}"


ATTRS = ["timesteps", "sigmas", "init_noise_sigma", "order", "num_inference_steps", "alphas_cumprod",
         "final_alpha_cumprod", "step_index", "begin_index"]


@pytest.mark.parametrize("name", NAMES)
def test_attributes_and_config(name, tmp_path):
    config = dict(PIPE_CONFIGS[name])
    theirs, ours = pair(name, **config)
    direct = getattr(P, name)(**config)
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert strip(ours.config) == strip(theirs.config) == strip(direct.config)
    assert type(ours.config) is type(theirs.config)
    # the same constructor, set_timesteps and step parameters (step adds keyword-only CFG extras)
    assert inspect.signature(type(ours).__init__).parameters.keys() == \
        inspect.signature(type(theirs).__init__).parameters.keys()
    assert inspect.signature(ours.set_timesteps).parameters.keys() == \
        inspect.signature(theirs.set_timesteps).parameters.keys()
    p_ours, p_theirs = inspect.signature(ours.step).parameters, inspect.signature(theirs.step).parameters
    assert list(p_ours)[:len(p_theirs)] == list(p_theirs)
    assert all(p_ours[k].default == p_theirs[k].default for k in p_theirs)
    for attr in ATTRS + ["set_begin_index", "scale_model_input", "add_noise", "scale_noise", "index_for_timestep"]:
        assert hasattr(ours, attr) == hasattr(theirs, attr), f"{name}.{attr}: present in one only"
    for attr in ATTRS:  # before set_timesteps
        if hasattr(theirs, attr):
            _same(getattr(theirs, attr), getattr(ours, attr), f"{name}.{attr} (initial)")
    for s in (theirs, ours):
        s.set_timesteps(12)
    for attr in ATTRS:
        if hasattr(theirs, attr):
            _same(getattr(theirs, attr), getattr(ours, attr), f"{name}.{attr}")
    # save / load: our config loads into theirs and back
    ours.save_config(tmp_path)
    again = getattr(P, name).from_pretrained(tmp_path)
    back = getattr(diffusers, name).from_pretrained(tmp_path)
    assert strip(again.config) == strip(back.config) == strip(theirs.config)
    assert len(ours) == len(theirs)
    comp = {c.__name__ for c in ours.compatibles}
    assert comp == {c.__name__ for c in theirs.compatibles}
    assert all(c.__module__ == P.__name__ for c in ours.compatibles if c.__name__ in P.__all__)


def test_pipeline_save_and_load_keeps_our_scheduler(unet, tmp_path):
    """A pipeline saved with our scheduler records it in model_index.json and loads it back."""
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = P.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    again = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is P.DPMSolverMultistepScheduler
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert strip(again.scheduler.config) == strip(pipe.scheduler.config)


def test_swap_between_schedulers():
    """from_config(<another scheduler>.config) keeps what diffusers keeps and drops the rest."""
    src = diffusers.DDIMScheduler(**SD, steps_offset=1, clip_sample=False)
    for name in NAMES:
        theirs, ours = getattr(diffusers, name).from_config(src.config), getattr(P, name).from_config(src.config)
        assert {k: v for k, v in dict(ours.config).items() if not k.startswith("_")} == \
            {k: v for k, v in dict(theirs.config).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_step_methods_and_index_progression(name):
    theirs, ours = pair(name, **PIPE_CONFIGS[name])
    g = torch.Generator().manual_seed(8)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for s in (theirs, ours):
        s.set_timesteps(10)
    ts = theirs.timesteps
    if name == "FlowMatchEulerDiscreteScheduler":
        pick = ts[[0, 4, 7]]
        _same(theirs.scale_noise(x, pick, noise), ours.scale_noise(x, pick, noise), "scale_noise")
    else:
        pick = ts[[1, 5, 8]]
        _same(theirs.add_noise(x, noise, pick), ours.add_noise(x, noise, pick), "add_noise (by value)")
    xs = [x.clone(), x.clone()]
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    for i, t in enumerate(ts):
        if hasattr(theirs, "scale_model_input"):  # the same input through both
            _same(theirs.scale_model_input(xs[0], t), ours.scale_model_input(xs[0], t), f"scale_model_input {i}")
        outs = []
        for k, s in enumerate((theirs, ours)):
            xi = s.scale_model_input(xs[k], t) if hasattr(s, "scale_model_input") else xs[k]
            kw = {"generator": gens[k]} if "generator" in inspect.signature(s.step).parameters else {}
            outs.append(s.step(standin(xi, t), t, xs[k], return_dict=False, **kw))
            xs[k] = outs[-1][0]
        assert isinstance(outs[1], tuple) and len(outs[1]) == len(outs[0])
        assert rel(xs[1], xs[0]) <= TOL, f"{name} step {i}"
        if hasattr(theirs, "step_index"):
            assert ours.step_index == theirs.step_index
        if name == "PNDMScheduler":
            assert ours.counter == theirs.counter
        if name == "HeunDiscreteScheduler":
            assert ours.state_in_first_order == theirs.state_in_first_order
        if hasattr(theirs, "step_index") and name != "FlowMatchEulerDiscreteScheduler" and i == 3:
            _same(theirs.add_noise(x, noise, pick), ours.add_noise(x, noise, pick), "add_noise mid-loop")


@pytest.mark.parametrize("name", NAMES)
def test_img2img_start(name):
    """Start part-way through the schedule as diffusers' img2img pipelines do: slice timesteps,
    set_begin_index where the scheduler has it, noise the input with add_noise / scale_noise."""
    theirs, ours = pair(name, **PIPE_CONFIGS[name])
    g = torch.Generator().manual_seed(12)
    image, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(10)
        start = 4 * s.order
        timesteps = s.timesteps[start:]
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(start)
        t0 = timesteps[:1].repeat(2)
        x = s.scale_noise(image, t0, noise) if hasattr(s, "scale_noise") else s.add_noise(image, noise, t0)
        gen = torch.Generator().manual_seed(2)
        for t in timesteps:
            xi = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            kw = {"generator": gen} if "generator" in inspect.signature(s.step).parameters else {}
            x = s.step(standin(xi, t), t, x, **kw).prev_sample
        outs.append(x)
    assert rel(outs[1], outs[0]) <= TOL


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler",
                                  "HeunDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_start_by_value_without_begin_index(name):
    """Without set_begin_index the first step finds its position from the timestep's value
    (timesteps passed as fresh tensors, not views of scheduler.timesteps)."""
    theirs, ours = pair(name, **PIPE_CONFIGS[name])
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(10)
        x, gen = X.clone(), torch.Generator().manual_seed(4)
        for t in s.timesteps.clone()[2 * s.order:].tolist():
            t = torch.tensor(t, dtype=s.timesteps.dtype)
            xi = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            kw = {"generator": gen} if "generator" in inspect.signature(s.step).parameters else {}
            x = s.step(standin(xi, t), t, x, **kw).prev_sample
        outs.append(x)
    assert rel(outs[1], outs[0]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_loop_reads_no_timestep_values(name, monkeypatch):
    """In a plain `for t in scheduler.timesteps` loop the schedule position comes from the tensor's
    storage offset: no timestep value is read (on a GPU that read is a host synchronisation)."""
    _, ours = pair(name, **PIPE_CONFIGS[name])
    ours.set_timesteps(6)
    ours.set_begin_index(0) if hasattr(ours, "set_begin_index") else None

    def no_read(t):
        raise AssertionError("a timestep value was read")

    monkeypatch.setattr(P, "_host_value", no_read)
    x = X.clone()
    for t in ours.timesteps:
        xi = ours.scale_model_input(x, t) if hasattr(ours, "scale_model_input") else x
        x = ours.step(standin(xi, t), t, x).prev_sample
    if hasattr(ours, "step_index"):
        ours.set_timesteps(6)  # no begin index: the first step's position comes from the view, still no read
        x = X.clone()
        for t in ours.timesteps[ours.order:]:
            xi = ours.scale_model_input(x, t) if hasattr(ours, "scale_model_input") else x
            x = ours.step(standin(xi, t), t, x).prev_sample
        assert ours.step_index == len(ours.timesteps)


@pytest.mark.parametrize("name", NAMES)
def test_fused_guidance_matches_pipeline_cfg(name):
    """step(cond, t, x, model_uncond=u, guidance_scale=g) == step(u + g (cond - u), t, x), every scheduler."""
    config = dict(PIPE_CONFIGS[name])
    if name == "DPMSolverMultistepScheduler":
        config["algorithm_type"] = "dpmsolver++"
    a, b = getattr(P, name)(**config), getattr(P, name)(**config)
    gs = 5.0
    xs = [X.clone(), X.clone()]
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    for s in (a, b):
        s.set_timesteps(8)
    for t in a.timesteps:
        for k, s in enumerate((a, b)):
            xi = s.scale_model_input(xs[k], t) if hasattr(s, "scale_model_input") else xs[k]
            c, u = standin(xi, t), standin(0.5 * xi, t)
            kw = {"generator": gens[k]} if "generator" in inspect.signature(s.step).parameters else {}
            if k == 0:
                xs[k] = s.step(u + gs * (c - u), t, xs[k], **kw).prev_sample
            else:
                xs[k] = s.step(c, t, xs[k], model_uncond=u, guidance_scale=gs, **kw).prev_sample
    assert rel(xs[1], xs[0]) <= TOL


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                  "FlowMatchEulerDiscreteScheduler", "PNDMScheduler"])
def test_half_precision_dtypes(name):
    """fp16 latents and model outputs: the same output dtype as diffusers, values close (fp16 rounding)."""
    config = dict(PIPE_CONFIGS[name])
    if name == "DPMSolverMultistepScheduler":
        config["algorithm_type"] = "dpmsolver++"  # deterministic
    theirs, ours = pair(name, **config)
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(6)
        x = X.half()
        for t in s.timesteps:
            xi = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            x = s.step(standin(xi.float(), t).half(), t, x).prev_sample
        outs.append(x)
    assert outs[1].dtype == outs[0].dtype
    assert rel(outs[1], outs[0]) <= 5e-3


def test_dpm_dynamic_shift_mu():
    theirs, ours = pair("DPMSolverMultistepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction",
                        use_dynamic_shifting=True)
    h = [trajectory(s, X, 8, set_kw=dict(mu=0.7)) for s in (theirs, ours)]
    assert_same_trajectory(h[0], h[1], "mu")
    assert ours.config.flow_shift == theirs.config.flow_shift


def test_ddpm_without_set_timesteps():
    theirs, ours = pair("DDPMScheduler")
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    outs = [s.step(standin(X, 500), 500, X, generator=g).prev_sample for s, g in zip((theirs, ours), gens)]
    assert rel(outs[1], outs[0]) <= TOL
    assert int(ours.previous_timestep(500)) == int(theirs.previous_timestep(500))


# ------------------------------------------------------------------------------------------------
# 4. unsupported options and bad use
# ------------------------------------------------------------------------------------------------
UNSUPPORTED = [
    ("DDIMScheduler", dict(thresholding=True), "thresholding"),
    ("DDPMScheduler", dict(thresholding=True), "thresholding"),
    ("DDPMScheduler", dict(variance_type="fixed_large_log"), "variance_type"),
    ("DPMSolverMultistepScheduler", dict(thresholding=True), "thresholding"),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True), "use_beta_sigmas"),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True), "use_beta_sigmas"),
    ("HeunDiscreteScheduler", dict(use_beta_sigmas=True), "use_beta_sigmas"),
    ("UniPCMultistepScheduler", dict(thresholding=True), "thresholding"),
    ("UniPCMultistepScheduler", dict(solver_p=diffusers.DDIMScheduler()), "solver_p"),
    ("UniPCMultistepScheduler", dict(use_beta_sigmas=True), "use_beta_sigmas"),
    ("FlowMatchEulerDiscreteScheduler", dict(use_beta_sigmas=True), "use_beta_sigmas"),
]


@pytest.mark.parametrize("name,config,word", UNSUPPORTED)
def test_unsupported_options_raise(name, config, word):
    with pytest.raises(NotImplementedError, match=rf"pydiff {name}: {word}=.* is not supported"):
        getattr(P, name)(**config)


def test_unsupported_log_linear_with_custom_timesteps():
    s = P.EulerDiscreteScheduler(interpolation_type="log_linear")
    with pytest.raises(NotImplementedError, match="interpolation_type"):
        s.set_timesteps(timesteps=[900, 500, 100])


def test_bad_use_raises_like_diffusers():
    with pytest.raises(TypeError):
        P.DDIMScheduler(not_an_option=1)
    with pytest.raises(ValueError, match="set_timesteps"):
        P.DDIMScheduler().step(X, 10, X)
    with pytest.raises(ValueError, match="set_timesteps"):
        P.DPMSolverMultistepScheduler().step(X, 10, X)
    s = P.EulerDiscreteScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(X, 3, X)
    d = P.DDIMScheduler()
    d.set_timesteps(5)
    with pytest.raises(IndexError, match="not one of the scheduler's timesteps"):
        d.step(X, 123, X)
    with pytest.raises(ValueError, match="only one of|Only one of"):
        P.EulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_loop_without_host_sync(name):
    """On a GPU the pipeline loop (scale_model_input + step) runs under
    torch.cuda.set_sync_debug_mode("error"): no step synchronises with the host.  Same results as
    diffusers' scheduler on the same device."""
    dev = torch.device("cuda")
    config = dict(PIPE_CONFIGS[name])
    if name == "DPMSolverMultistepScheduler":
        config["algorithm_type"] = "dpmsolver++"  # noise-free, so the two runs can be compared
    theirs, ours = pair(name, **config)
    W = _W[:4, :4].to(dev)

    def model(x, t):  # reads t on the device: the model must not synchronise either
        return torch.tanh(torch.einsum("oc,bchw->bohw", W, x) * 0.7 + 0.05 * torch.sin(t.float() / 150.0))

    outs = []
    for s in (theirs, ours):
        s.set_timesteps(10, device=dev)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(0)
        x = X.to(dev) * float(getattr(s, "init_noise_sigma", 1.0))
        gen = torch.Generator(device=dev).manual_seed(0)
        params = inspect.signature(s.step).parameters
        torch.cuda.synchronize()
        if s is ours:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in s.timesteps:
                xi = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                kw = {"generator": gen} if "generator" in params else {}
                x = s.step(model(xi, t), t, x, **kw).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs.append(x.cpu())
    assert rel(outs[1], outs[0]) <= TOL
