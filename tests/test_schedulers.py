"""Respaced DDPM scheduler: parity with the official schedule / sampler (cases c7, c8, c9) and diffusers plumbing.

Parity tolerance: 1e-4 relative to max|reference| (+1e-5 absolute), the `assert_close_rel` default. In practice the
tables and steps are bit-identical to the official float32 values on CPU.
"""

import pytest
import torch
from conftest import assert_close_rel, collected_numbers, key_numbers, prediction_type_of
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from stablesr.schedulers import RESPACED_TABLE_NAMES, StableSRDDPMScheduler, space_timesteps

# Read from the fixture's tensor names at collection time (stablesr-tiny values when the folder is missing: the
# tests then skip / fail through tiny_ref_dir). test_all_c7_keys_covered checks them against the loaded vectors.
C7_STEPS_PATTERN = r"c7\.s(\d+)\.timesteps"
C7_TIE_PATTERN = r"c7\.timesteps_n(\d+)"
C8_STEP_PATTERN = r"c8\.step(\d+)\.x_out"
C7_STEPS = collected_numbers(C7_STEPS_PATTERN, [4, 50, 200])
C7_TIE_N = collected_numbers(C7_TIE_PATTERN, [21, 23, 45])
C8_STEPS = collected_numbers(C8_STEP_PATTERN, range(4))
# n for which the official float accumulation is documented (cases.md) to give 499 where round(i * stride) gives 500.
DOCUMENTED_TIE_N = (21, 23, 45)
BASE_TABLES = ["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"]


@pytest.fixture
def scheduler():
    return StableSRDDPMScheduler()


@pytest.fixture
def case_scheduler(ref_config):
    """The scheduler of the fixture's model: its prediction type (config.yaml parameterization: eps or v). The schedule
    itself is the default one, which the official sampling scripts re-register explicitly (linear, 1000 steps,
    0.00085 .. 0.0120) whatever the config says."""
    return StableSRDDPMScheduler(prediction_type=prediction_type_of(ref_config))


def test_fixture_parameterization_is_consistent(case_meta, ref_prediction_type):
    """The parameterization of the sampling cases (cases.json meta) is the one of the fixture's config.yaml."""
    for case in ("c8", "c9"):
        assert prediction_type_of({"model": {"params": case_meta[case]}}) == ref_prediction_type, case


def _batch_size(tiny_cases, case):
    return tiny_cases[f"{case}.x_T"].shape[0]


# ---------------------------------------------------------------------------------------------------------------------
# space_timesteps


@pytest.mark.parametrize("n", C7_TIE_N)
def test_space_timesteps_tie_cases(tiny_cases, n):
    expected = tiny_cases[f"c7.timesteps_n{n}"].tolist()
    assert space_timesteps(1000, n) == expected
    assert space_timesteps(1000, [n]) == expected
    assert space_timesteps(1000, str(n)) == expected
    if n in DOCUMENTED_TIE_N:
        assert 499 in expected and 500 not in expected
        # the naive rounding of i * stride differs, which is the point of these cases
        naive = sorted({round(i * 999 / (n - 1)) for i in range(n)})
        assert naive != expected


@pytest.mark.parametrize("n", C7_STEPS)
def test_space_timesteps_c7(tiny_cases, n):
    assert space_timesteps(1000, n) == tiny_cases[f"c7.s{n}.timesteps"].tolist()


def test_space_timesteps_known_grids():
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    grid200 = space_timesteps(1000, 200)
    assert len(grid200) == 200 and grid200[:3] == [0, 5, 10] and grid200[-2:] == [994, 999]
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 1000) == list(range(1000))
    # several sections, and the DDIM-paper integer stride
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert len(space_timesteps(300, [10, 15, 20])) == 45
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))


@pytest.mark.parametrize("bad", [0, -3, 1001, [0], [600, 600], "ddim999"])
def test_space_timesteps_invalid(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


# ---------------------------------------------------------------------------------------------------------------------
# tables (case c7)


@pytest.mark.parametrize("name", BASE_TABLES)
def test_base1000_tables(tiny_cases, scheduler, name):
    expected = tiny_cases[f"c7.base1000.{name}"]
    actual = getattr(scheduler, name)
    assert actual.dtype == torch.float32
    assert_close_rel(actual, expected, name=f"c7.base1000.{name}")


@pytest.mark.parametrize("n", C7_STEPS)
def test_respaced_tables(tiny_cases, scheduler, n):
    scheduler.set_timesteps(n)
    expected_t = tiny_cases[f"c7.s{n}.timesteps"]
    assert scheduler.timesteps.dtype == torch.int64
    assert torch.equal(scheduler.timesteps, expected_t.flip(0))
    assert torch.equal(scheduler.ori_timesteps, expected_t)
    assert set(scheduler.respaced) == set(RESPACED_TABLE_NAMES)
    for name in RESPACED_TABLE_NAMES:
        actual = scheduler.respaced[name]
        assert actual.dtype == torch.float32
        assert_close_rel(actual, tiny_cases[f"c7.s{n}.{name}"], name=f"c7.s{n}.{name}")


def test_all_c7_keys_covered(tiny_cases, case_meta):
    """Guards against new c7 vectors silently going untested."""
    # the parametrizations above were read from this very fixture (not a fallback) and agree with its meta
    assert C7_STEPS == key_numbers(tiny_cases, C7_STEPS_PATTERN)
    assert C7_TIE_N == key_numbers(tiny_cases, C7_TIE_PATTERN)
    assert C8_STEPS == key_numbers(tiny_cases, C8_STEP_PATTERN)
    assert sorted(case_meta["c7"]["steps"]) == C7_STEPS
    covered = {f"c7.base1000.{k}" for k in BASE_TABLES}
    covered |= {f"c7.timesteps_n{n}" for n in C7_TIE_N}
    for n in C7_STEPS:
        covered |= {f"c7.s{n}.timesteps"} | {f"c7.s{n}.{k}" for k in RESPACED_TABLE_NAMES}
    assert {k for k in tiny_cases if k.startswith("c7.")} == covered


def test_custom_timesteps_same_tables(scheduler):
    scheduler.set_timesteps(4)
    expected = {k: v.clone() for k, v in scheduler.respaced.items()}
    scheduler.set_timesteps(timesteps=[999, 666, 333, 0])
    assert scheduler.timesteps.tolist() == [999, 666, 333, 0]
    for name in RESPACED_TABLE_NAMES:
        assert torch.equal(scheduler.respaced[name], expected[name]), name


def test_non_official_spacing_uses_timestep_spacing():
    official = StableSRDDPMScheduler()
    plain = StableSRDDPMScheduler(official_respacing=False)  # timestep_spacing="linspace"
    official.set_timesteps(21)
    plain.set_timesteps(21)
    assert 499 in official.timesteps.tolist() and 500 in plain.timesteps.tolist()
    official.set_timesteps(50)
    plain.set_timesteps(50)
    assert torch.equal(official.timesteps, plain.timesteps)
    for name in RESPACED_TABLE_NAMES:
        assert torch.equal(official.respaced[name], plain.respaced[name])


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, True])
def test_invalid_num_inference_steps(scheduler, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(n)


@pytest.mark.parametrize("timesteps", [[0, 333], [1000, 10], [999, -1], []])
def test_invalid_custom_timesteps(scheduler, timesteps):
    with pytest.raises(ValueError):
        scheduler.set_timesteps(timesteps=timesteps)


def test_set_timesteps_argument_errors(scheduler):
    with pytest.raises(ValueError):
        scheduler.set_timesteps()
    with pytest.raises(ValueError):
        scheduler.set_timesteps(4, timesteps=[999, 0])


# ---------------------------------------------------------------------------------------------------------------------
# start latent x_T (cases c8, c9)


@pytest.mark.parametrize(("case", "lr_key"), [("c8", "c8.init_latent"), ("c9", "c9.lr_latent")])
def test_lq_start_latents(tiny_cases, case_meta, case_scheduler, case, lr_key):
    scheduler = case_scheduler
    lr, noise, expected = tiny_cases[lr_key], tiny_cases[f"{case}.xT_noise"], tiny_cases[f"{case}.x_T"]
    assert_close_rel(scheduler.lq_start_latents(lr, noise), expected, name=f"{case}.x_T (lq_start_latents)")
    # x_T = q_sample at the last training timestep (t = [999] * B for the 1000-step schedule)
    t = torch.full((lr.shape[0],), scheduler.config.num_train_timesteps - 1, dtype=torch.int64)
    assert_close_rel(scheduler.add_noise(lr, noise, t), expected, name=f"{case}.x_T (add_noise)")
    # independent of any respacing
    scheduler.set_timesteps(case_meta[case]["ddpm_steps"])
    assert_close_rel(scheduler.lq_start_latents(lr, noise), expected, name=f"{case}.x_T after set_timesteps")


def test_lq_start_latents_draws_noise(scheduler):
    lr = torch.randn(1, 4, 8, 8)
    a = scheduler.lq_start_latents(lr, generator=torch.Generator().manual_seed(3))
    b = scheduler.lq_start_latents(lr, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == lr.shape


# ---------------------------------------------------------------------------------------------------------------------
# sampling steps (cases c8, c9)


def test_c8_step_timesteps(tiny_cases, case_meta, case_scheduler):
    scheduler = case_scheduler
    meta = case_meta["c8"]
    scheduler.set_timesteps(meta["ddpm_steps"])
    assert scheduler.ori_timesteps.tolist() == meta["ori_timesteps"]
    assert len(C8_STEPS) == meta["ddpm_steps"]
    batch = _batch_size(tiny_cases, "c8")
    for s, t in enumerate(scheduler.timesteps.tolist()):
        assert tiny_cases[f"c8.step{s}.t_orig"].tolist() == [t] * batch
        assert scheduler.respaced_index(t).item() == tiny_cases[f"c8.step{s}.t_index"][0].item()
        assert tiny_cases[f"c8.step{s}.t_index"].tolist() == [meta["ddpm_steps"] - 1 - s] * batch


@pytest.mark.parametrize("s", C8_STEPS)
def test_c8_step(tiny_cases, case_meta, case_scheduler, s):
    scheduler = case_scheduler
    scheduler.set_timesteps(case_meta["c8"]["ddpm_steps"])
    p = f"c8.step{s}."
    x_in, model_out, noise = tiny_cases[p + "x_in"], tiny_cases[p + "model_out"], tiny_cases[p + "noise"]
    for timestep in (tiny_cases[p + "t_orig"], int(scheduler.timesteps[s])):  # per-sample batch and scalar
        out = scheduler.step(model_out, timestep, x_in, variance_noise=noise)
        assert_close_rel(out.pred_original_sample, tiny_cases[p + "pred_x0"], name=p + "pred_x0")
        assert_close_rel(out.prev_sample, tiny_cases[p + "x_out"], name=p + "x_out")
        mean, _, log_variance = scheduler.q_posterior(out.pred_original_sample, x_in, timestep)
        assert_close_rel(mean, tiny_cases[p + "model_mean"], name=p + "model_mean")
        assert_close_rel(log_variance, tiny_cases[p + "model_log_variance"], name=p + "model_log_variance")


def test_c8_chain_is_consistent(tiny_cases, case_meta):
    steps = case_meta["c8"]["ddpm_steps"]
    assert key_numbers(tiny_cases, C8_STEP_PATTERN) == list(range(steps))
    assert torch.equal(tiny_cases["c8.step0.x_in"], tiny_cases["c8.x_T"])
    for s in range(steps - 1):
        assert torch.equal(tiny_cases[f"c8.step{s + 1}.x_in"], tiny_cases[f"c8.step{s}.x_out"])
    assert torch.equal(tiny_cases[f"c8.step{steps - 1}.x_out"], tiny_cases["c8.samples"])


def test_c9_canvas_step(tiny_cases, case_meta, case_scheduler):
    scheduler = case_scheduler
    scheduler.set_timesteps(case_meta["c9"]["ddpm_steps"])
    t = tiny_cases["c9.step.t_orig"]
    assert scheduler.respaced_index(t).tolist() == tiny_cases["c9.step.t_index"].tolist()
    x_T = tiny_cases["c9.x_T"]
    out = scheduler.step(tiny_cases["c9.step.model_out"], t, x_T, variance_noise=tiny_cases["c9.step.noise"])
    assert_close_rel(out.pred_original_sample, tiny_cases["c9.step.pred_x0"], name="c9.step.pred_x0")
    assert_close_rel(out.prev_sample, tiny_cases["c9.step.x_out"], name="c9.step.x_out")
    mean, _, log_variance = scheduler.q_posterior(out.pred_original_sample, x_T, t)
    assert_close_rel(mean, tiny_cases["c9.step.model_mean"], name="c9.step.model_mean")
    assert_close_rel(log_variance, tiny_cases["c9.step.model_log_variance"], name="c9.step.model_log_variance")
    assert_close_rel(out.prev_sample, tiny_cases["c9.full.step0.x_out"], name="c9.full.step0.x_out")


def test_generator_noise_and_last_step(scheduler):
    scheduler.set_timesteps(4)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = scheduler.step(eps, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = scheduler.step(eps, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(a, b)
    # same noise passed explicitly
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, scheduler.step(eps, 999, x, variance_noise=noise).prev_sample)
    # last step: the posterior mean, no noise
    out = scheduler.step(eps, 0, x, generator=torch.Generator().manual_seed(0))
    mean, _, _ = scheduler.q_posterior(out.pred_original_sample, x, 0)
    assert torch.equal(out.prev_sample, mean)
    with pytest.raises(ValueError):
        scheduler.step(eps, 999, x, generator=torch.Generator(), variance_noise=noise)


def test_step_rejects_unknown_timestep(scheduler):
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    for bad in (500, 1000, -1):
        with pytest.raises(ValueError):
            scheduler.step(x, bad, x)


def test_step_without_set_timesteps_uses_full_chain(scheduler):
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    out = scheduler.step(eps, 500, x, variance_noise=noise)
    full = StableSRDDPMScheduler()
    full.set_timesteps(1000)
    assert torch.equal(out.prev_sample, full.step(eps, 500, x, variance_noise=noise).prev_sample)


def test_v_prediction_recovers_x0():
    scheduler = StableSRDDPMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (999, 489, 20):
        tt = torch.tensor([t, t])
        x_t = scheduler.add_noise(x0, noise, tt)
        v = scheduler.get_velocity(x0, noise, tt)
        pred = scheduler.step(v, t, x_t, variance_noise=torch.zeros_like(x0)).pred_original_sample
        assert_close_rel(pred, x0, name=f"v-pred x0 at t={t}")


def test_matches_stock_ddpm_custom_timesteps(tiny_cases, case_meta, case_scheduler):
    """Sanity: diffusers' DDPMScheduler on the same timesteps is algebraically the same sampler."""
    scheduler = case_scheduler
    steps = case_meta["c8"]["ddpm_steps"]
    scheduler.set_timesteps(steps)
    stock = DDPMScheduler.from_config(scheduler.config)
    stock.set_timesteps(timesteps=scheduler.timesteps.tolist())
    s = min(1, steps - 1)  # a middle step where there is one (666 of [999, 666, 333, 0])
    t = int(scheduler.timesteps[s])
    x, eps = tiny_cases[f"c8.step{s}.x_in"], tiny_cases[f"c8.step{s}.model_out"]
    ours = scheduler.step(eps, t, x, variance_noise=torch.zeros_like(x)).prev_sample
    # stock adds its own noise at t > 0: compare the mean part through pred_x0 instead
    ref = stock.step(eps, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
    assert_close_rel(scheduler.step(eps, t, x).pred_original_sample, ref, rtol=1e-3, name="stock pred_x0")
    assert ours.shape == x.shape


def test_half_precision_keeps_dtype(scheduler):
    scheduler.set_timesteps(4)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out16 = scheduler.step(eps.half(), 666, x.half(), variance_noise=torch.zeros_like(x).half())
    out32 = scheduler.step(eps, 666, x, variance_noise=torch.zeros_like(x))
    assert out16.prev_sample.dtype == torch.float16
    assert_close_rel(out16.prev_sample, out32.prev_sample, rtol=2e-3, name="fp16 step")


def test_defaults_and_identity_scaling(scheduler):
    cfg = scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (
        1000,
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (cfg.variance_type, cfg.clip_sample, cfg.prediction_type) == ("fixed_small", False, "epsilon")
    assert cfg.official_respacing is True and cfg.timestep_spacing in ("linspace", "leading", "trailing")
    assert scheduler.init_noise_sigma == 1.0
    x = torch.randn(1, 4, 8, 8)
    assert scheduler.scale_model_input(x, 999) is x


# ---------------------------------------------------------------------------------------------------------------------
# diffusers config plumbing


@pytest.mark.parametrize(
    "cls", [DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler]
)
def test_other_schedulers_from_config(scheduler, cls):
    """Config plumbing only; what the other samplers compute is checked against closed forms in
    test_oracles_sampling.py."""
    other = cls.from_config(scheduler.config)
    # the StableSR schedule must carry over (not the other class's defaults)
    assert other.config.beta_schedule == "scaled_linear"
    assert other.config.beta_start == 0.00085 and other.config.beta_end == 0.012
    assert other.config.prediction_type == "epsilon"
    torch.testing.assert_close(other.alphas_cumprod, scheduler.alphas_cumprod, rtol=1e-5, atol=1e-6)
    other.set_timesteps(20)
    assert len(other.timesteps) == 20
    x = torch.randn(1, 4, 8, 8)
    t = other.timesteps[0]
    other.step(torch.randn_like(x), t, other.scale_model_input(x * other.init_noise_sigma, t))
    # and back: the hidden official_respacing flag survives the round trip
    back = StableSRDDPMScheduler.from_config(other.config)
    assert back.config.official_respacing is True
    assert back.config.beta_schedule == "scaled_linear"


def test_from_config_of_v_model():
    scheduler = StableSRDDPMScheduler(prediction_type="v_prediction")
    assert DPMSolverMultistepScheduler.from_config(scheduler.config).config.prediction_type == "v_prediction"


def test_save_load_round_trip(tmp_path, scheduler, tiny_cases):
    scheduler = StableSRDDPMScheduler(prediction_type="v_prediction", official_respacing=True)
    scheduler.save_pretrained(tmp_path)
    loaded = StableSRDDPMScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(scheduler.config)
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    n = max(key_numbers(tiny_cases, C7_STEPS_PATTERN))  # 200 in stablesr-tiny
    loaded.set_timesteps(n)
    assert torch.equal(loaded.ori_timesteps, tiny_cases[f"c7.s{n}.timesteps"])
    # a stock scheduler can read the saved file too
    assert DDIMScheduler.from_pretrained(tmp_path).config.prediction_type == "v_prediction"


def test_official_spacing_alias_is_not_stored():
    scheduler = StableSRDDPMScheduler(timestep_spacing="official", official_respacing=False)
    assert scheduler.config.timestep_spacing == "linspace" and scheduler.config.official_respacing is True
    scheduler.set_timesteps(21)
    assert 499 in scheduler.timesteps.tolist()
    other = DDIMScheduler.from_config(scheduler.config)
    other.set_timesteps(20)  # would raise if "official" had been stored
