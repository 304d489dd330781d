"""Sampling oracles: the pipeline with every scheduler against closed forms and a hand-written scheduler loop.

The UNet's forward is replaced by a known model-output function (with one tile: ``tile_size`` covers the latent), so
the pipeline's loop (``scale_model_input``, the timesteps handed to the model, the step arguments, the start latent)
is checked against

* a closed form: a model that predicts the exact noise of a known x0 must bring every sampler to x0;
* a hand-written loop over the bare scheduler, on a model whose samplers disagree (they must disagree);
* the start latent written out from the schedule, for ``start="lq"`` and ``start="noise"``;

and the bare schedulers (as ``scheduler_from_name`` builds them from the StableSR config) are checked against the
exact probability-flow solution for Gaussian data. The training schedule is written out here (scaled_linear, 1000
steps, 0.00085 .. 0.012), not taken from the schedulers under test.
"""

import pytest
import torch
from conftest import assert_close_rel
from PIL import Image
from skimage import data

from stablesr.pipelines.pipeline_stablesr import StableSRPipeline
from stablesr.schedulers import SCHEDULERS, StableSRDDPMScheduler, scheduler_from_name


@pytest.fixture(scope="module")
def pipe(small_pipeline_dir):
    p = StableSRPipeline.from_pretrained(small_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    return p


def photo() -> Image.Image:
    """32 x 32 -> x2 = 64 px, sampled on the smallest canvas (the 128 px native size): a 16 x 16 latent."""
    return Image.fromarray(data.astronaut()[100:228:4, 150:278:4])


TRAIN_ABAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
NON_DDPM = ("ddim", "dpmsolver", "unipc", "euler")


def _abar(timestep: torch.Tensor) -> torch.Tensor:
    """abar_t (B, 1, 1, 1) at integer training timesteps (every step count used here gives integer timesteps)."""
    t = timestep.double()
    assert torch.equal(t, t.round()), f"the oracle needs integer timesteps, got {t.tolist()}"
    return TRAIN_ABAR[t.long()].view(-1, 1, 1, 1)


def _as_prediction(eps, x0, abar, prediction_type):
    if prediction_type == "epsilon":
        return eps
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0  # v


def exact_noise_model(x0: torch.Tensor, prediction_type: str):
    """A perfect denoiser for a single known clean latent ``x0``: at (x_t, t) it predicts the exact noise
    (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (or the matching v). Every sampler must then end at x0."""

    def predict(latents, timestep):
        abar = _abar(timestep)
        eps = (latents.double() - abar.sqrt() * x0) / (1 - abar).sqrt()
        return _as_prediction(eps, x0, abar, prediction_type).float()

    return predict


def gaussian_data_model(mu: torch.Tensor, s: float):
    """The exact eps-predictor E[eps | x_t] for data x0 ~ N(mu, s^2 I): sqrt(1-abar) (x_t - sqrt(abar) mu) /
    (abar s^2 + 1 - abar). Not constant along a trajectory, so every sampler discretises it differently."""

    def predict(latents, timestep):
        abar = _abar(timestep)
        return ((1 - abar).sqrt() * (latents.double() - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)).float()

    return predict


def _replace_unet(pipe, monkeypatch, predict):
    """The UNet returns ``predict(sample, timestep)`` (the time-aware encoder and SFT layers still run)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(sample, timestep, *args, **kwargs):
        return UNet2DConditionOutput(sample=predict(sample, timestep).to(sample.dtype))

    monkeypatch.setattr(pipe.unet, "forward", forward)


def _latent_shape(pipe, image):
    """Shape of the LQ latent the pipeline samples for ``image`` at upscale 2 (its padded working canvas / 8)."""
    height, width = pipe.working_canvas(image.height, image.width, 2).padded_size
    return (1, pipe.vae.config.latent_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def _with_scheduler(pipe, monkeypatch, name):
    monkeypatch.setattr(pipe, "scheduler", scheduler_from_name(name, pipe.scheduler.config))
    return pipe.scheduler


@pytest.mark.parametrize("name", SCHEDULERS)
def test_exact_noise_model_recovers_x0(pipe, monkeypatch, name):
    """Closed form: with a model that predicts the exact noise of a known x0, every scheduler's run through the
    pipeline ends at x0. Bound 1e-4 relative L2; measured <= 5e-6 (DDIM; the others ~4e-7..1.3e-6). A pipeline
    that skipped Euler's scale_model_input misses by 2.5e-2 (checked on a scratch copy)."""
    prediction_type = pipe.scheduler.config.prediction_type
    _with_scheduler(pipe, monkeypatch, name)
    x0 = torch.randn(_latent_shape(pipe, photo()), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _replace_unet(pipe, monkeypatch, exact_noise_model(x0, prediction_type))
    out = pipe(photo(), upscale=2, num_inference_steps=4, output_type="latent", tile_size=64,
               generator=torch.Generator().manual_seed(0))
    latents = out.latents[0].double()
    assert latents.shape == x0.shape
    error = ((latents - x0).norm() / x0.norm()).item()
    print(f"{name}: |x_final - x0| / |x0| = {error:.2e}")
    assert error <= 1e-4


def test_pipeline_loop_equals_bare_scheduler_loop(pipe, monkeypatch):
    """Each non-DDPM scheduler, run by the pipeline on a known model (Gaussian data, 10 steps), gives exactly what a
    hand-written loop over the bare scheduler gives (measured: bit-identical), and the four samplers really are
    different ones: pairwise relative L2 differences >= 1e-3 (measured 4.4e-3 DPM-Solver++ vs UniPC, 3.3e-2 ..
    1.3e-1 for the other pairs; a pipeline without Euler's scale_model_input fails here too). How close each comes
    to the exact solution is test_ode_samplers_converge_to_the_exact_flow."""
    if pipe.scheduler.config.prediction_type != "epsilon":
        pytest.skip("the Gaussian-data model predicts eps")
    shape = _latent_shape(pipe, photo())
    mu = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = gaussian_data_model(mu, 0.5)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    _replace_unet(pipe, monkeypatch, model)
    results = {}
    for name in NON_DDPM:
        scheduler = _with_scheduler(pipe, monkeypatch, name)
        start = x_T * scheduler.init_noise_sigma
        out = pipe(photo(), upscale=2, num_inference_steps=10, latents=start, output_type="latent", tile_size=64,
                   generator=torch.Generator().manual_seed(0)).latents[0]
        bare = scheduler_from_name(name, scheduler.config)
        bare.set_timesteps(10)
        x = start.clone()
        for t in bare.timesteps:
            x = bare.step(model(bare.scale_model_input(x, t), t.reshape(1)), t, x).prev_sample
        torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6, msg=f"{name}: pipeline vs bare scheduler loop")
        results[name] = x.double()
    for i, a in enumerate(NON_DDPM):
        for b in NON_DDPM[i + 1 :]:
            diff = ((results[a] - results[b]).norm() / results[b].norm()).item()
            print(f"{a} vs {b}: relative L2 difference {diff:.2e}")
            assert diff >= 1e-3, (a, b)


def _capture_start(pipe, monkeypatch):
    """Records the pipeline's LQ latent, its random draws and the latent handed to the denoising loop."""
    from stablesr.pipelines import pipeline_stablesr

    seen = {"draws": []}
    draw, encode, denoise = pipeline_stablesr.randn_tensor, pipe.encode_condition, pipe.denoise

    def recording_draw(*args, **kwargs):
        seen["draws"].append(draw(*args, **kwargs))
        return seen["draws"][-1]

    def recording_encode(*args, **kwargs):
        out = encode(*args, **kwargs)
        seen["lq_latents"] = out[0] if isinstance(out, tuple) else out  # (latents, CFW features) when asked for
        return out

    def recording_denoise(latents, *args, **kwargs):
        seen["start"], seen["draws_before_loop"] = latents.clone(), len(seen["draws"])
        return denoise(latents, *args, **kwargs)

    monkeypatch.setattr(pipeline_stablesr, "randn_tensor", recording_draw)
    monkeypatch.setattr(pipe, "encode_condition", recording_encode)
    monkeypatch.setattr(pipe, "denoise", recording_denoise)
    _replace_unet(pipe, monkeypatch, lambda sample, timestep: torch.zeros_like(sample))
    return seen


@pytest.mark.parametrize("name", ["ddpm", "dpmsolver", "euler"])
def test_start_latent_lq_versus_noise(pipe, monkeypatch, name):
    """start="lq": x_T = sqrt(abar_999) z_lq + sqrt(1 - abar_999) n (variance-preserving schedulers) or
    z_lq + sigma_999 n (Euler, sigma = sqrt((1 - abar) / abar)); start="noise": x_T = n * init_noise_sigma, which
    is 1, or for Euler sigma_999 with "linspace"/"trailing" spacing (the StableSR config's) and sqrt(sigma_999^2 + 1)
    otherwise. n is the pipeline's draw after the LQ encode; formulas written out from the schedule in float64,
    bound 1e-6 relative (measured <= 4e-7)."""
    scheduler = _with_scheduler(pipe, monkeypatch, name)
    seen = _capture_start(pipe, monkeypatch)
    abar = TRAIN_ABAR[999]
    sigma = ((1 - abar) / abar).sqrt()
    starts = {}
    for start in ("lq", "noise"):
        seen["draws"].clear()
        pipe(photo(), upscale=2, num_inference_steps=4, start=start, output_type="latent", tile_size=64,
             generator=torch.Generator().manual_seed(3))
        assert seen["draws_before_loop"] == 2  # the posterior sample of the LQ encode, then the start noise
        noise, lq = seen["draws"][-1].double(), seen["lq_latents"].double()
        if start == "noise":
            if name != "euler":
                expected = noise
            elif scheduler.config.timestep_spacing in ("linspace", "trailing"):
                expected = noise * sigma
            else:
                expected = noise * (sigma**2 + 1).sqrt()
        elif name == "euler":
            expected = lq + sigma * noise
        else:
            expected = abar.sqrt() * lq + (1 - abar).sqrt() * noise
        assert_close_rel(seen["start"], expected, rtol=1e-6, atol=1e-6, name=f"{name} start={start} x_T")
        starts[start] = seen["start"]
    # same generator, same noise: the two starts differ by the LQ-latent term only
    assert not torch.allclose(starts["lq"], starts["noise"], atol=1e-3)




# ---------------------------------------------------------------------------------------------------------------------
# The bare schedulers against the exact probability-flow solution

DDIM_LINSPACE_REASON = (
    "diffusers' DDIMScheduler steps from t to t - 1000 // n, which is not the next timestep of the 'linspace' "
    "spacing that the StableSR scheduler config carries (999, 990, 981, ... for 112 steps), so DDIM built by "
    "scheduler_from_name does not converge: 6.7e-2 at 10 steps, 6.4e-2 at 112, 2.4e-1 at 334 ('leading' spacing: "
    "1.5e-1, 1.7e-2, 5.6e-3)"
)


@pytest.mark.parametrize(
    "name",
    [pytest.param("ddim", marks=pytest.mark.xfail(reason=DDIM_LINSPACE_REASON, strict=True)), "dpmsolver", "unipc",
     "euler"],
)
def test_ode_samplers_converge_to_the_exact_flow(name):
    """Data x0 ~ N(mu, s^2 I) has Gaussian marginals N(sqrt(abar) mu, abar s^2 + 1 - abar) and a linear
    probability-flow ODE, which maps x_T to mu + s (x_T - sqrt(abar_T) mu) / sqrt(abar_T s^2 + 1 - abar_T) at the
    end (abar = 1). Each deterministic sampler, built by ``scheduler_from_name`` from the StableSR config and fed
    the exact eps-prediction, must approach that solution: <= 3 % relative L2 at 112 steps and >= 5x closer than
    at 10 steps. Measured (10 -> 112 steps): DPM-Solver++ 1.3e-1 -> 1.1e-2, UniPC 1.3e-1 -> 1.1e-2, Euler
    1.6e-1 -> 2.0e-2 (step counts with integer timesteps for every scheduler)."""
    base = StableSRDDPMScheduler()
    shape = (1, 4, 16, 24)
    mu = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s = 0.5
    model = gaussian_data_model(mu, s)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    errors = {}
    for steps in (10, 112):
        scheduler = scheduler_from_name(name, base.config)
        scheduler.set_timesteps(steps)
        abar_T = TRAIN_ABAR[int(scheduler.timesteps[0])]
        exact = mu + s * (x_T.double() - abar_T.sqrt() * mu) / (abar_T * s**2 + 1 - abar_T).sqrt()
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t.reshape(1)), t, x).prev_sample
        errors[steps] = ((x.double() - exact).norm() / exact.norm()).item()
    print(f"{name}: relative L2 to the exact flow {errors[10]:.2e} (10 steps) -> {errors[112]:.2e} (112 steps)")
    assert errors[112] <= 0.03
    assert errors[10] >= 5 * errors[112]
