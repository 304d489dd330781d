"""Weight-free metrics against their definitions and against scikit-image; the clear error of learned metrics."""

import math
import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stablesr import metrics as M

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_color = pytest.importorskip("skimage.color")

# Stated tolerances of the second opinion: both compute in float64 with the same window, so they agree to
# rounding error; the bounds leave a wide margin.
PSNR_TOL_DB = 1e-8
SSIM_TOL = 1e-8


def _synthetic_set():
    """A fixed set of (name, sr, gt) uint8 RGB pairs with typical SR distortions."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:72, 0:88]
    gt = np.stack([128 + 90 * np.sin(xx / 6.0), 128 + 90 * np.cos(yy / 5.0), 128 + 60 * np.sin((xx + yy) / 9.0)], -1)
    gt = np.clip(gt + rng.normal(0, 12, gt.shape), 0, 255).astype(np.uint8)
    gt_pil = Image.fromarray(gt)
    noisy = np.clip(gt + rng.normal(0, 10, gt.shape), 0, 255).astype(np.uint8)
    blurred = np.asarray(gt_pil.filter(ImageFilter.GaussianBlur(1.2)))
    bicubic = np.asarray(gt_pil.resize((22, 18), Image.Resampling.BICUBIC).resize((88, 72), Image.Resampling.BICUBIC))
    shifted = np.roll(gt, 1, axis=1)
    tinted = np.clip(gt.astype(int) + np.array([12, -6, 3]), 0, 255).astype(np.uint8)
    return [(n, sr, gt) for n, sr in (("noise", noisy), ("blur", blurred), ("bicubic", bicubic), ("shift", shifted),
                                      ("tint", tinted))]


def test_psnr_identical_is_inf_and_ssim_identical_is_one():
    img = _synthetic_set()[0][2]
    assert M.psnr(img, img) == math.inf
    assert M.psnr(img, img, y_channel=False) == math.inf
    assert M.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(img, img, y_channel=False) == pytest.approx(1.0, abs=1e-12)


def test_known_mse_gives_known_psnr():
    gt = np.full((32, 32, 3), 100, np.uint8)
    sr = gt + np.uint8(10)  # every channel off by 10 -> RGB MSE 100
    assert M.mse(sr, gt) == pytest.approx(100.0)
    assert M.psnr(sr, gt, y_channel=False) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)  # 28.1308 dB
    # On Y the same offset is scaled by (65.481 + 128.553 + 24.966) / 255 = 219 / 255.
    assert M.psnr(sr, gt) == pytest.approx(10 * math.log10(255**2 / (10 * 219 / 255) ** 2), abs=1e-10)


def test_y_channel_matches_formula_and_skimage():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    expected = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    np.testing.assert_allclose(M.rgb_to_y(rgb), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(M.rgb_to_y(rgb), skimage_color.rgb2ycbcr(rgb)[..., 0], rtol=0, atol=1e-10)
    assert M.rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
    assert M.rgb_to_y(np.full((1, 1, 3), 255.0))[0, 0] == pytest.approx(235.0)


@pytest.mark.parametrize("crop_border", [0, 4])
def test_agrees_with_scikit_image(crop_border):
    worst_psnr = worst_ssim = 0.0
    for _, sr, gt in _synthetic_set():
        c = crop_border
        sl = (slice(c, -c or None), slice(c, -c or None))
        y_sr, y_gt = M.rgb_to_y(sr)[sl], M.rgb_to_y(gt)[sl]
        ref_psnr_y = skimage_metrics.peak_signal_noise_ratio(y_gt, y_sr, data_range=255)
        ref_ssim_y = skimage_metrics.structural_similarity(y_gt, y_sr, gaussian_weights=True, sigma=1.5,
                                                           use_sample_covariance=False, data_range=255)
        ref_psnr_rgb = skimage_metrics.peak_signal_noise_ratio(gt[sl], sr[sl], data_range=255)
        ref_ssim_rgb = skimage_metrics.structural_similarity(
            gt[sl].astype(np.float64), sr[sl].astype(np.float64), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255, channel_axis=2)
        worst_psnr = max(worst_psnr, abs(M.psnr(sr, gt, c) - ref_psnr_y),
                         abs(M.psnr(sr, gt, c, y_channel=False) - ref_psnr_rgb))
        worst_ssim = max(worst_ssim, abs(M.ssim(sr, gt, c) - ref_ssim_y),
                         abs(M.ssim(sr, gt, c, y_channel=False) - ref_ssim_rgb))
    assert worst_psnr < PSNR_TOL_DB, worst_psnr
    assert worst_ssim < SSIM_TOL, worst_ssim


def test_crop_border():
    gt = np.full((40, 40, 3), 120, np.uint8)
    sr = gt.copy()
    sr[:4] = 0  # damage only inside a 4-pixel border
    sr[:, -3:] = 255
    assert M.psnr(sr, gt, crop_border=0) < 20
    assert M.psnr(sr, gt, crop_border=4) == math.inf
    assert M.ssim(sr, gt, crop_border=4) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, (2, 30, 34, 3)).astype(np.uint8)
    assert M.psnr(a, b, crop_border=3) == pytest.approx(M.psnr(a[3:-3, 3:-3], b[3:-3, 3:-3]))
    with pytest.raises(ValueError, match="crop_border"):
        M.psnr(a, b, crop_border=15)
    with pytest.raises(ValueError, match="size mismatch"):
        M.psnr(a, b[:-1])


def test_pil_inputs_match_arrays():
    _, sr, gt = _synthetic_set()[1]
    assert M.psnr(Image.fromarray(sr), Image.fromarray(gt), 4) == M.psnr(sr, gt, 4)
    assert M.ssim(Image.fromarray(sr), Image.fromarray(gt)) == M.ssim(sr, gt)


def test_consistency_of_downsample_consistent_image_is_high():
    _, _, gt = _synthetic_set()[0]
    hr = Image.fromarray(gt)
    lq = hr.resize((22, 18), Image.Resampling.BICUBIC)  # the LQ is exactly the bicubic downsample of the "SR"
    good = M.consistency(hr, lq)
    assert good["consistency"] > 45, good
    assert good["consistency_mse"] < 1e-4
    unrelated = Image.fromarray(np.roll(gt, 9, axis=(0, 1)))
    bad = M.consistency(unrelated, lq)
    assert bad["consistency"] < good["consistency"] - 20, (good, bad)
    # float downsample (no 8-bit rounding of the LQ) is exact up to float32 resampling error
    lq_float = M.bicubic_resize(hr, (22, 18))
    assert M.consistency(hr, lq_float)["consistency"] > 80


# ----------------------------------------------------------------------------------------------------------------------
# Learned metrics: clear errors, no downloads here
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_package_names_metric_and_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    with pytest.raises(M.MetricUnavailableError) as info:
        M.load_metric("lpips")
    msg = str(info.value)
    assert "'lpips'" in msg and "torchmetrics" in msg and "pyiqa" in msg and "first use" in msg
    assert info.value.metric == "lpips"
    with pytest.raises(M.MetricUnavailableError, match="musiq.*pip install pyiqa.*non-commercial"):
        M.load_metric("musiq")
    with pytest.raises(M.MetricUnavailableError, match="fid"):
        M.compute_fid([np.zeros((8, 8, 3))] * 2, [np.zeros((8, 8, 3))] * 2)


def _fake_torchmetrics(monkeypatch, lpips_cls):
    tm = types.ModuleType("torchmetrics")
    image = types.ModuleType("torchmetrics.image")
    lpip = types.ModuleType("torchmetrics.image.lpip")
    lpip.LearnedPerceptualImagePatchSimilarity = lpips_cls
    tm.image, image.lpip = image, lpip
    for name, mod in (("torchmetrics", tm), ("torchmetrics.image", image), ("torchmetrics.image.lpip", lpip)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_offline_weights_download_is_a_clear_error(monkeypatch):
    class OfflineLPIPS:
        def __init__(self, *args, **kwargs):
            raise OSError("We couldn't connect to 'https://download.pytorch.org' (offline mode is enabled)")

    _fake_torchmetrics(monkeypatch, OfflineLPIPS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # the test command sets both; check the first
    with pytest.raises(M.MetricUnavailableError) as info:
        M.load_metric("lpips")
    msg = str(info.value)
    assert "'lpips'" in msg and "torchmetrics" in msg and "download" in msg and "first use" in msg
    assert "HF_HUB_OFFLINE=1 is set" in msg
    assert isinstance(info.value.__cause__, OSError)


def test_backend_choice_and_wrapping(monkeypatch):
    import torch

    calls = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net_type, normalize):
            super().__init__()
            calls.append((net_type, normalize))

        def forward(self, a, b):
            assert a.shape == b.shape and a.shape[1] == 3 and float(a.max()) <= 1.0
            return (a - b).abs().mean()

        def reset(self):
            calls.append("reset")

    _fake_torchmetrics(monkeypatch, FakeLPIPS)
    metric = M.load_metric("lpips")
    assert metric.backend == "torchmetrics" and calls == [("alex", True)]
    img = np.full((8, 8, 3), 255, np.uint8)
    assert metric(img, np.zeros_like(img)) == pytest.approx(1.0)
    assert calls[-1] == "reset", "state is reset after every image"

    # torchmetrics missing -> pyiqa (with the field's metric names)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    created = []
    fake = types.ModuleType("pyiqa")
    fake.create_metric = lambda name, device, as_loss: created.append(name) or (lambda *t: torch.tensor([0.25]))
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    assert M.load_metric("lpips").backend == "pyiqa"
    assert M.load_metric("maniqa")(img) == pytest.approx(0.25)
    assert created == ["lpips", "maniqa-pipal"]
    with pytest.raises(ValueError, match="not available from 'torchmetrics'"):
        M.load_metric("niqe", backend="torchmetrics")
    with pytest.raises(ValueError, match="unknown metric"):
        M.load_metric("nope")
