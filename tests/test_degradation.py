"""Tests for stablesr.degradation: config schema, sampling/apply split, every random branch, the operations."""

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stablesr import degradation as deg
from stablesr.degradation import (
    KERNEL_TYPES,
    RESIZE_MODES,
    DegradationConfig,
    KernelConfig,
    RealESRGANDegradation,
    SincConfig,
    StageConfig,
    add_noise,
    apply,
    blur_kernels,
    degrade_folder,
    filter2d,
    jpeg_compress,
    sample_params,
    sinc_kernels,
    usm_sharp,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "degradation"
SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors: OpenMP thread hand-offs cost more than they save, badly so on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(batch: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth random images with edges, in [0, 1], on 8-bit levels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, size // 8, size // 8, generator=g)
    img = F.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    img[..., size // 3 : size // 2, :] = 0.9
    return (img * 255).round() / 255


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _config(stage: dict | None = None, stage2: dict | None = None, **top) -> DegradationConfig:
    base = DegradationConfig(gt_size=None)
    stages = [
        dataclasses.replace(base.stages[0], **(stage or {})),
        dataclasses.replace(base.stages[1], **(stage2 or {})),
    ]
    return dataclasses.replace(base, stages=stages, **{"gt_size": None, **top})


# ---------------------------------------------------------------------------------------------------------------- #
# Config
# ---------------------------------------------------------------------------------------------------------------- #


def test_defaults_equal_stablesr_yaml():
    assert DegradationConfig.from_yaml(CONFIG_DIR / "stablesr.yaml") == DegradationConfig()


@pytest.mark.parametrize("name", ["stablesr.yaml", "realesrgan_x4plus.yaml"])
def test_yaml_round_trip(name, tmp_path):
    config = DegradationConfig.from_yaml(CONFIG_DIR / name)
    config.to_yaml(tmp_path / "out.yaml")
    assert DegradationConfig.from_yaml(tmp_path / "out.yaml") == config
    assert DegradationConfig.from_dict(config.to_dict()) == config


def test_realesrgan_table_values():
    config = DegradationConfig.from_yaml(CONFIG_DIR / "realesrgan_x4plus.yaml")
    first, second = config.stages
    assert first.resize_range == (0.15, 1.5) and second.resize_range == (0.3, 1.2)
    assert first.noise_range == (1, 30) and second.noise_range == (1, 25)
    assert first.jpeg_range == second.jpeg_range == (30, 95)
    assert second.blur_prob == 0.8 and first.kernel.sigma_range == (0.2, 3.0)
    assert config.round_lq and config.no_degradation_prob == 0


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("stages", 1, "kernel", "sigma_range"), [1.0, 0.2], "stages[1].kernel.sigma_range"),
        (("stages", 0, "kernel", "kernel_prob"), [0.5, 0.5, 0, 0, 0, 0.5], "stages[0].kernel.kernel_prob"),
        (("stages", 0, "kernel", "kernel_list"), ["iso", "box", "aniso", "x", "y", "z"], "kernel.kernel_list"),
        (("stages", 0, "kernel", "kernel_size_range"), [6, 21], "stages[0].kernel.kernel_size_range"),
        (("stages", 0, "kernel", "betag_range"), [1.5, 4.0], "stages[0].kernel.betag_range"),
        (("stages", 1, "jpeg_range"), [30, 120], "stages[1].jpeg_range"),
        (("stages", 1, "resize_modes"), ["nearest"], "stages[1].resize_modes"),
        (("stages", 0, "resize_prob"), [0.2, 0.7], "stages[0].resize_prob"),
        (("stages", 0, "blur_prob"), 1.5, "stages[0].blur_prob"),
        (("stages", 1, "noise_range"), "1, 12", "stages[1].noise_range"),
        (("stages", 1, "blur_prob2"), 0.5, "blur_prob2"),
        (("stages", 0, "kernel", "sigma2"), 0.5, "stages[0].kernel"),
        (("resize_prob2",), [0.3, 0.4, 0.3], "resize_prob2"),
        (("stages",), [], "stages"),
        (("final_sinc", "cutoff_range"), [0.2, 1.5], "final_sinc.cutoff_range"),
        (("sinc_before_jpeg_prob",), -0.1, "sinc_before_jpeg_prob"),
        (("gt_size",), 510, "gt_size"),
        (("scale",), 0, "scale"),
        (("use_usm",), "yes", "use_usm"),
    ],
)
def test_bad_config_names_key(path, value, message):
    data = DegradationConfig().to_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError) as err:
        DegradationConfig.from_dict(data)
    assert message in str(err.value)


def test_bad_config_message_states_allowed_range():
    with pytest.raises(ValueError, match=r"jpeg_range must be a \[low, high\] pair with 1.0 <= low <= high <= 100.0"):
        _config(stage2={"jpeg_range": (50.0, 101.0)})


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        DegradationConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------------------------- #
# Determinism, shapes, ranges
# ---------------------------------------------------------------------------------------------------------------- #


def test_same_seed_is_bit_identical():
    gt = _images(3)
    module = RealESRGANDegradation(_config())
    lq_a, target_a = module(gt, _gen(7))
    lq_b, target_b = module(gt, _gen(7))
    assert torch.equal(lq_a, lq_b) and torch.equal(target_a, target_b)


def test_different_seeds_differ():
    gt = _images(3)
    module = RealESRGANDegradation(_config())
    outputs = [module(gt, _gen(seed))[0] for seed in range(3)]
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_apply_is_deterministic_given_params():
    config = _config()
    gt = _images(2)
    params = sample_params(config, 2, _gen(3))
    torch.manual_seed(123)
    first = apply(gt, params, config)
    torch.rand(100)  # global RNG state must not matter
    assert torch.equal(first, apply(gt, params, config))


def test_output_shapes_and_range():
    gt = _images(2)
    lq, target = RealESRGANDegradation(_config())(gt, _gen(0))
    assert lq.shape == (2, 3, SIZE // 4, SIZE // 4) and target.shape == gt.shape
    assert lq.dtype == torch.float32 and 0 <= lq.min() and lq.max() <= 1
    assert 0 <= target.min() and target.max() <= 1


def test_realesrgan_table_runs_on_small_images_and_rounds():
    config = dataclasses.replace(DegradationConfig.from_yaml(CONFIG_DIR / "realesrgan_x4plus.yaml"), gt_size=None)
    for seed in range(3):  # strong downscales of a 64 px crop exercise the small-image padding fallback
        lq, _ = RealESRGANDegradation(config)(_images(2), _gen(seed))
        assert lq.shape == (2, 3, 16, 16)
        assert torch.equal(lq, (lq * 255).round() / 255)


def test_paired_crop_to_gt_size():
    config = _config(gt_size=32)
    gt = _images(2, size=SIZE)
    lq, target = RealESRGANDegradation(config)(gt, _gen(5))
    assert lq.shape == (2, 3, 8, 8) and target.shape == (2, 3, 32, 32)
    params = sample_params(config, 2, _gen(5))
    full_lq = apply(gt, params, config)
    full_target = usm_sharp(gt)
    for i in range(2):
        top = min(int(float(params.crop[i, 0]) * (16 - 8 + 1)), 8)
        left = min(int(float(params.crop[i, 1]) * (16 - 8 + 1)), 8)
        assert torch.equal(lq[i], full_lq[i, :, top : top + 8, left : left + 8])
        assert torch.equal(target[i], full_target[i, :, 4 * top : 4 * top + 32, 4 * left : 4 * left + 32])


def test_input_validation():
    config = _config()
    with pytest.raises(ValueError, match="multiples of scale"):
        apply(_images(1, size=62), sample_params(config, 1, _gen()), config)
    with pytest.raises(ValueError, match="batch size"):
        apply(_images(2), sample_params(config, 3, _gen()), config)


# ---------------------------------------------------------------------------------------------------------------- #
# Kernels
# ---------------------------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("kernel_type", KERNEL_TYPES)
def test_each_kernel_type(kernel_type):
    kernel_cfg = KernelConfig(kernel_list=(kernel_type,), kernel_prob=(1.0,), sinc_prob=0.0, sigma_range=(0.5, 3.0))
    params = sample_params(_config({"kernel": kernel_cfg}), 64, _gen(1))
    stage = params.stages[0]
    assert stage.kernel_type == [kernel_type] * 64
    kernels = stage.kernel
    assert kernels.shape == (64, 21, 21)
    torch.testing.assert_close(kernels.sum((-2, -1)), torch.ones(64, dtype=torch.float64))
    sizes = stage.kernel_size
    assert bool(((sizes % 2 == 1) & (sizes >= 7) & (sizes <= 21)).all())
    assert len(set(sizes.tolist())) > 3
    for kernel, size in zip(kernels, sizes.tolist(), strict=True):
        pad = (21 - size) // 2
        inside = torch.zeros_like(kernel, dtype=torch.bool)
        inside[pad : 21 - pad, pad : 21 - pad] = True
        assert bool((kernel[~inside] == 0).all()) and bool((kernel[inside] >= 0).all())
        assert torch.allclose(kernel, kernel.flip(0, 1))  # point symmetric for every family
        if kernel_type.endswith("_iso") or kernel_type == "iso":
            assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0))
    if "aniso" in kernel_type:
        assert not all(torch.allclose(k, k.T, atol=1e-6) for k in kernels)


def test_gaussian_kernel_matches_closed_form():
    sigma = torch.tensor([1.3])
    kernel = blur_kernels(
        torch.tensor([9]), sigma, sigma, torch.tensor([0.7]), torch.ones(1), torch.tensor([False]), 9
    )
    ax = torch.arange(9, dtype=torch.float64) - 4
    expected = torch.exp(-(ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2) / (2 * 1.3**2))
    torch.testing.assert_close(kernel[0], expected / expected.sum())


def test_sinc_kernels():
    config = _config({"kernel": KernelConfig(sinc_prob=1.0)})
    stage = sample_params(config, 32, _gen(2)).stages[0]
    assert stage.kernel_type == ["sinc"] * 32
    torch.testing.assert_close(stage.kernel.sum((-2, -1)), torch.ones(32, dtype=torch.float64))
    for kernel in stage.kernel:
        assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0))
    # a sinc at Nyquist cutoff is (almost) a delta; a low cutoff has negative side lobes
    nyquist = sinc_kernels(torch.tensor([21]), torch.tensor([torch.pi]), 21)[0]
    assert nyquist[10, 10] == nyquist.max() and nyquist[10, 10] > 0.7
    assert sinc_kernels(torch.tensor([21]), torch.tensor([torch.pi / 5]), 21)[0].min() < 0


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_final_sinc_branch(prob):
    params = sample_params(_config(final_sinc_prob=prob), 16, _gen(4))
    delta = torch.zeros(21, 21, dtype=torch.float64)
    delta[10, 10] = 1
    is_delta = [torch.equal(k, delta) for k in params.final_sinc]
    assert all(is_delta) if prob == 0 else not any(is_delta)
    assert bool(params.final_sinc_applied.all()) == (prob == 1)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_blur_prob_branch(prob):
    params = sample_params(_config(stage2={"blur_prob": prob}), 16, _gen(4))
    types = params.stages[1].kernel_type
    assert (types == ["none"] * 16) == (prob == 0)
    assert ("none" in types) == (prob == 0)


# ---------------------------------------------------------------------------------------------------------------- #
# Resize, noise, JPEG, order, no-degradation, USM
# ---------------------------------------------------------------------------------------------------------------- #


@pytest.fixture
def interpolate_calls(monkeypatch):
    calls = []
    original = F.interpolate

    def spy(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        calls.append((tuple(x.shape[-2:]), tuple(out.shape[-2:]), kwargs.get("mode")))
        return out

    monkeypatch.setattr(deg.F, "interpolate", spy)
    return calls


@pytest.mark.parametrize("choice", ["up", "down", "keep"])
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_resize_branches(choice, mode, interpolate_calls):
    probs = {"up": (1.0, 0.0, 0.0), "down": (0.0, 1.0, 0.0), "keep": (0.0, 0.0, 1.0)}[choice]
    config = _config({"resize_prob": probs, "resize_modes": (mode,)}, {"resize_prob": probs, "resize_modes": (mode,)})
    params = sample_params(config, 2, _gen(6))
    for stage, (low, high) in zip(params.stages, [(0.3, 1.5), (0.6, 1.2)], strict=True):
        assert stage.resize == choice and stage.resize_mode == mode
        expected = {"up": (1.0, high), "down": (low, 1.0), "keep": (1.0, 1.0)}[choice]
        assert expected[0] <= stage.resize_scale <= expected[1]
    gt = _images(2)
    interpolate_calls.clear()
    apply(gt, params, config)
    (in1, out1, mode1), (in2, out2, mode2) = interpolate_calls[:2]
    assert mode1 == mode2 == mode
    assert in1 == (SIZE, SIZE)
    assert out1 == (int(SIZE * params.stages[0].resize_scale),) * 2
    assert out2 == (int(SIZE / 4 * params.stages[1].resize_scale),) * 2
    compare = {"up": int.__ge__, "down": int.__le__, "keep": int.__eq__}[choice]
    assert compare(out1[0], SIZE) and compare(out2[0], SIZE // 4)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_final_resize_mode(mode, interpolate_calls):
    config = _config(final_resize_modes=(mode,))
    params = sample_params(config, 2, _gen(0))
    assert params.final_resize_mode == mode
    gt = _images(2)
    interpolate_calls.clear()
    apply(gt, params, config)
    finals = [call for call in interpolate_calls if call[1] == (SIZE // 4, SIZE // 4) and call[2] == mode]
    assert finals


@pytest.mark.parametrize("gaussian_prob", [0.0, 1.0])
@pytest.mark.parametrize("gray_prob", [0.0, 1.0])
def test_noise_branch_flags(gaussian_prob, gray_prob):
    stage = {"gaussian_noise_prob": gaussian_prob, "gray_noise_prob": gray_prob}
    params = sample_params(_config(stage, stage), 8, _gen(1))
    for s in params.stages:
        assert bool((s.gaussian == bool(gaussian_prob)).all()) and bool((s.gray_noise == bool(gray_prob)).all())


def test_gaussian_noise_strength_and_gray():
    x = torch.full((2, 3, 128, 128), 0.5)
    sigma = torch.tensor([5.0, 20.0])
    color = add_noise(
        x, torch.ones(2, dtype=torch.bool), sigma, torch.zeros(2), torch.zeros(2, dtype=torch.bool), torch.arange(2)
    )
    gray = add_noise(
        x, torch.ones(2, dtype=torch.bool), sigma, torch.zeros(2), torch.ones(2, dtype=torch.bool), torch.arange(2)
    )
    for i in range(2):
        assert abs(float((color[i] - x[i]).std() * 255) - float(sigma[i])) < 0.05 * float(sigma[i])
        assert torch.equal(gray[i, 0], gray[i, 1]) and torch.equal(gray[i, 1], gray[i, 2])
        assert not torch.equal(color[i, 0], color[i, 1])


def test_poisson_noise_strength_and_gray():
    ramp = torch.linspace(0, 1, 256).view(1, 1, 1, 256).expand(2, 3, 128, 256).contiguous()
    scale = torch.tensor([0.5, 2.0])
    flags = torch.zeros(2, dtype=torch.bool)
    out = add_noise(ramp, flags, torch.zeros(2), scale, flags, torch.arange(2))
    # 256 distinct levels -> 256 photon levels: noise variance = x / 256 * scale^2 before clamping
    mid = (slice(None), slice(None), slice(None), slice(64, 192))
    for i in range(2):
        expected = float((ramp[i][mid[1:]] / 256).mean()) * float(scale[i]) ** 2
        measured = float((out[i][mid[1:]] - ramp[i][mid[1:]]).var())
        assert abs(measured / expected - 1) < 0.1
    gray = add_noise(ramp, flags, torch.zeros(2), scale, ~flags, torch.arange(2))
    assert torch.equal(gray[:, 0], gray[:, 1])


def test_noise_depends_only_on_seed():
    x = _images(2)
    args = (torch.tensor([True, False]), torch.tensor([10.0, 10.0]), torch.ones(2), torch.zeros(2, dtype=torch.bool))
    a = add_noise(x, *args, torch.tensor([3, 4]))
    b = add_noise(x, *args, torch.tensor([3, 5]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_jpeg_quality_and_shape():
    x = _images(2, size=60)  # not a multiple of 16: padded internally
    lossy = jpeg_compress(x, torch.tensor([20.0, 20.0]))
    fine = jpeg_compress(x, torch.tensor([95.0, 95.0]))
    assert lossy.shape == x.shape and 0 <= lossy.min() and lossy.max() <= 1
    assert ((fine - x) ** 2).mean() < ((lossy - x) ** 2).mean()
    assert torch.isfinite(jpeg_compress(x, 100.0)).all()
    # batching with per-sample qualities equals one call per sample
    mixed = jpeg_compress(x, torch.tensor([20.0, 95.0]))
    torch.testing.assert_close(mixed[0], lossy[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], fine[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("quality", [50, 90])
def test_jpeg_error_comparable_to_libjpeg(quality):
    x = _images(1, size=64, seed=3)
    buf = io.BytesIO()
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    pil = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ratio = float(((jpeg_compress(x, float(quality)) - x) ** 2).mean() / ((pil - x) ** 2).mean())
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("jpeg_prob_range", [(60.0, 60.0), (95.0, 95.0)])
def test_stage_jpeg_quality_is_drawn_from_range(jpeg_prob_range):
    params = sample_params(_config({"jpeg_range": jpeg_prob_range}), 4, _gen())
    assert bool((params.stages[0].jpeg_quality == jpeg_prob_range[0]).all())


@pytest.mark.parametrize("sinc_first", [True, False])
def test_final_order_coin(sinc_first, monkeypatch):
    config = _config(stage2={"resize_prob": (1.0, 0.0, 0.0), "resize_range": (0.6, 1.2)})
    config = dataclasses.replace(config, sinc_before_jpeg_prob=1.0 if sinc_first else 0.0)
    params = sample_params(config, 2, _gen(9))
    assert bool((params.sinc_before_jpeg == sinc_first).all())
    jpeg_inputs = []
    original = deg.jpeg_compress

    def spy(x, quality):
        jpeg_inputs.append(tuple(x.shape[-2:]))
        return original(x, quality)

    monkeypatch.setattr(deg, "jpeg_compress", spy)
    params.stages[1].resize_scale = 1.2  # make the stage-2 size differ from the LQ size
    lq = apply(_images(2), params, config)
    last = jpeg_inputs[-1]
    assert (last == (SIZE // 4, SIZE // 4)) == sinc_first
    # mixed coins in one batch equal the two pure batches
    mixed = dataclasses.replace(params, sinc_before_jpeg=torch.tensor([True, False]))
    other = dataclasses.replace(params, sinc_before_jpeg=torch.tensor([not sinc_first] * 2))
    lq_mixed, lq_other = apply(_images(2), mixed, config), apply(_images(2), other, config)
    first_lq, second_lq = (lq, lq_other) if sinc_first else (lq_other, lq)
    torch.testing.assert_close(lq_mixed[0], first_lq[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(lq_mixed[1], second_lq[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("round_lq", [False, True])
def test_no_degradation_gives_downsampled_gt(round_lq):
    config = _config(no_degradation_prob=1.0, round_lq=round_lq)
    gt = _images(2)
    lq, target = RealESRGANDegradation(config)(gt, _gen(0))
    expected = F.avg_pool2d(usm_sharp(gt), 4)
    if round_lq:
        expected = (expected * 255).round() / 255
    torch.testing.assert_close(lq, expected, rtol=0, atol=1e-6)
    assert not torch.equal(RealESRGANDegradation(_config(no_degradation_prob=0.0))(gt, _gen(0))[0], lq)


def test_no_degradation_is_per_sample():
    config = _config()
    params = sample_params(config, 2, _gen(0))
    params.no_degradation = torch.tensor([True, False])
    gt = _images(2)
    lq = apply(gt, params, config)
    torch.testing.assert_close(lq[0], F.avg_pool2d(usm_sharp(gt), 4)[0])
    assert not torch.allclose(lq[1], F.avg_pool2d(usm_sharp(gt), 4)[1], atol=1e-3)


def test_return_replaced_flags_the_no_degradation_samples():
    gt = _images(4)
    lq, target, replaced = RealESRGANDegradation(_config(no_degradation_prob=1.0))(gt, _gen(0), return_replaced=True)
    assert replaced.dtype == torch.bool and replaced.tolist() == [True] * 4
    _, _, none = RealESRGANDegradation(_config(no_degradation_prob=0.0))(gt, _gen(0), return_replaced=True)
    assert none.tolist() == [False] * 4
    # Half and half: the flags are exactly the samples whose LQ is the clean downsampled target.
    lq, target, replaced = RealESRGANDegradation(_config(no_degradation_prob=0.5))(_images(16), _gen(3),
                                                                                      return_replaced=True)
    clean = torch.isclose(lq, F.avg_pool2d(target, 4), atol=1e-6).flatten(1).all(dim=1)
    assert 0 < int(replaced.sum()) < 16 and torch.equal(clean, replaced)


@pytest.mark.parametrize("use_usm", [False, True])
def test_usm_switch(use_usm):
    gt = _images(2)
    config = _config(use_usm=use_usm)
    lq, target = RealESRGANDegradation(config)(gt, _gen(0))
    if use_usm:
        assert torch.equal(target, usm_sharp(gt)) and not torch.equal(target, gt)
    else:
        assert torch.equal(target, gt)
    params = sample_params(config, 2, _gen(0))
    assert torch.equal(lq, apply(gt, params, config))


def test_usm_matches_2d_filter_and_properties():
    gt = _images(2)
    flat = torch.full((1, 3, SIZE, SIZE), 0.3)
    assert torch.allclose(usm_sharp(flat), flat)
    sharp = usm_sharp(gt)
    assert 0 <= sharp.min() and sharp.max() <= 1
    g = deg._cv2_gaussian_1d(51)
    blur = filter2d(gt, torch.outer(g, g).float())  # BasicSR applies the 2D outer-product kernel
    residual = gt - blur
    mask = filter2d((residual.abs() * 255 > 10).float(), torch.outer(g, g).float())
    expected = mask * (gt + 0.5 * residual).clamp(0, 1) + (1 - mask) * gt
    torch.testing.assert_close(sharp, expected, rtol=0, atol=1e-4)


def test_filter2d_identity_and_per_sample():
    x = _images(3)
    delta = torch.zeros(3, 5, 5)
    delta[:, 2, 2] = 1
    assert torch.equal(filter2d(x, delta), x)
    kernels = sample_params(_config(), 3, _gen(0)).stages[0].kernel.float()
    batched = filter2d(x, kernels)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], filter2d(x[i : i + 1], kernels[i]))


def test_sample_params_stream_is_branch_independent():
    # forcing one probability must not shift the random draws of unrelated choices
    a = sample_params(_config(), 4, _gen(11))
    b = sample_params(_config(stage2={"gaussian_noise_prob": 1.0}), 4, _gen(11))
    assert torch.equal(a.stages[0].kernel, b.stages[0].kernel)
    assert torch.equal(a.stages[1].jpeg_quality, b.stages[1].jpeg_quality)
    assert torch.equal(a.final_sinc, b.final_sinc)


def test_sinc_config_defaults():
    assert SincConfig().kernel_size_range == (7, 21)
    assert StageConfig().blur_prob == 1.0


# ---------------------------------------------------------------------------------------------------------------- #
# Folder export
# ---------------------------------------------------------------------------------------------------------------- #


def _write_png(path: Path, img: torch.Tensor) -> None:
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def test_degrade_folder(tmp_path, caplog):
    hq = tmp_path / "hq_in"
    hq.mkdir()
    _write_png(hq / "a.png", _images(1, size=64)[0])
    _write_png(hq / "b.png", _images(1, size=50, seed=1)[0])
    (hq / "broken.png").write_bytes(b"not an image")
    (hq / "notes.txt").write_text("ignored")
    config = _config()
    with caplog.at_level(logging.WARNING):
        written = degrade_folder(hq, tmp_path / "out", config, seed=1)
    assert [p[0].name for p in written] == ["a.png", "b.png"]
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING and "broken.png" in r.message]
    assert len([r for r in caplog.records if "broken.png" in r.message]) == 1
    lq = np.asarray(Image.open(tmp_path / "out" / "lq" / "b.png"))
    hq_out = np.asarray(Image.open(tmp_path / "out" / "hq" / "b.png"))
    assert hq_out.shape == (48, 48, 3) and lq.shape == (12, 12, 3)  # mod-cropped to the scale
    assert not list((tmp_path / "out").rglob("*.tmp"))

    # existing pairs are kept unless overwrite
    before = (tmp_path / "out" / "lq" / "a.png").read_bytes()
    assert degrade_folder(hq, tmp_path / "out", config, seed=2) == []
    assert (tmp_path / "out" / "lq" / "a.png").read_bytes() == before
    assert len(degrade_folder(hq, tmp_path / "out", config, seed=2, overwrite=True)) == 2

    # reproducible per seed, several versions per image, crops
    again = degrade_folder(hq, tmp_path / "again", config, seed=1)
    assert (tmp_path / "again" / "lq" / "a.png").read_bytes() == before
    assert len(again) == 2
    multi = degrade_folder(hq, tmp_path / "multi", config, seed=1, num_per_image=2, crop=56)
    assert sorted(p[1].name for p in multi) == ["a_0.png", "a_1.png", "b_0.png", "b_1.png"]
    assert np.asarray(Image.open(multi[0][1])).shape == (56, 56, 3)
    assert np.asarray(Image.open(multi[0][0])).shape == (14, 14, 3)
