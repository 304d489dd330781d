"""The one per-image metric dispatch (`compute_image_metrics`) and the column registry that evaluate and the fidelity
curve share (no learned metric is downloaded: a stand-in `ImageMetric` is used)."""

import math

import numpy as np
import pytest
from PIL import Image

from stablesr import metrics as M


def _images():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    sr = np.clip(gt.astype(int) + rng.integers(-6, 7, gt.shape), 0, 255).astype(np.uint8)
    lq = Image.fromarray(gt).resize((16, 12), Image.Resampling.BICUBIC)
    return Image.fromarray(sr), Image.fromarray(gt), lq


def test_builtin_metrics_match_the_functions():
    sr, gt, lq = _images()
    names = ["psnr", "ssim", "psnr_rgb", "ssim_rgb", "consistency"]
    values = M.compute_image_metrics(sr, gt, lq, names, crop_border=4)
    assert list(values) == ["psnr", "ssim", "psnr_rgb", "ssim_rgb", "consistency_mse", "consistency"]
    assert set(values) == set(M.metric_columns(names))
    assert values["psnr"] == M.psnr(sr, gt, 4) and values["ssim"] == M.ssim(sr, gt, 4)
    assert values["psnr_rgb"] == M.psnr(sr, gt, 4, y_channel=False)
    assert values["ssim_rgb"] == M.ssim(sr, gt, 4, y_channel=False)
    assert values["consistency"] == M.consistency(sr, lq)["consistency"]
    rgba = sr.copy()
    rgba.putalpha(128)
    assert M.compute_image_metrics(rgba, gt, lq, names, crop_border=4) == values, "alpha is ignored"


def test_missing_references_give_none_for_every_column():
    sr, gt, lq = _images()
    values = M.compute_image_metrics(sr, None, None, ["psnr", "ssim_rgb", "consistency"])
    assert values == {"psnr": None, "ssim_rgb": None, "consistency": None, "consistency_mse": None}
    assert math.isfinite(M.compute_image_metrics(sr, None, lq, ["consistency"])["consistency"])


def test_learned_metrics_go_through_the_loaded_ones():
    sr, gt, _ = _images()
    seen = []

    def fake(*tensors):
        seen.append(len(tensors))
        return float(len(tensors))

    loaded = {"lpips": M.ImageMetric("lpips", "stub", fake, "cpu"),
              "niqe": M.ImageMetric("niqe", "stub", fake, "cpu")}
    values = M.compute_image_metrics(sr, gt, None, ["lpips", "niqe"], loaded=loaded)
    assert values == {"lpips": 2.0, "niqe": 1.0} and seen == [2, 1], "full reference gets (sr, gt), no reference (sr)"
    assert M.compute_image_metrics(sr, None, None, ["lpips", "niqe"], loaded=loaded) == {"lpips": None, "niqe": 1.0}
    with pytest.raises(ValueError, match="load_metric"):
        M.compute_image_metrics(sr, gt, None, ["lpips"])
    with pytest.raises(ValueError, match="set metric"):
        M.compute_image_metrics(sr, gt, None, ["fid"])
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_image_metrics(sr, gt, None, ["nope"])


def test_registry_columns_and_names():
    assert M.metric_columns(["psnr", "consistency", "fid"]) == ["psnr", "consistency", "consistency_mse", "fid"]
    mse = M.column_spec("consistency_mse")
    assert mse.higher_is_better is False and "MSE" in mse.label
    assert M.column_spec("psnr") is M.METRICS["psnr"] and M.METRICS["psnr"].short_label == "PSNR-Y dB vs GT"
    assert not M.METRICS["ssim"].learned and M.METRICS["lpips"].learned and M.METRICS["fid"].learned
    assert "consistency_mse" not in M.METRICS, "extra columns are not selectable metrics"
    with pytest.raises(KeyError):
        M.column_spec("nope")
    assert M.parse_metric_names("PSNR-Y, ssim_rgb,psnr,clip_iqa") == ["psnr", "ssim_rgb", "clipiqa"]
    with pytest.raises(ValueError, match="unknown metric 'foo'"):
        M.parse_metric_names("psnr,foo")
    with pytest.raises(ValueError, match="no metrics"):
        M.parse_metric_names(" , ")
