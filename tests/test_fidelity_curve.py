"""Fidelity curve (one sampling, many CFW decodes) and cascaded upscaling, on the tiny pipeline and on stubs."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from stablesr.cascade import cascade_upscale, plan_cascade
from stablesr.cli import main
from stablesr.fidelity_curve import fidelity_curve
from stablesr.image_processor import as_rgb_alpha_list
from stablesr.pipelines.pipeline_stablesr import RestorationCondition, StableSRPipeline, StableSRPipelineOutput


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a small shared CPU, two threads spin against each other (the tiny model runs ~10x
    slower with 2 threads than with 1 on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def counted_pipe(small_pipeline_dir, one_thread):
    """The tiny 128-px pipeline with its sampling loop (``denoise``) and decodes counted."""
    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.calls = {"denoise": 0, "decode": 0}
    denoise, decode = pipe.denoise, pipe.decode_latents

    def counted_denoise(*args, **kwargs):
        pipe.calls["denoise"] += 1
        return denoise(*args, **kwargs)

    def counted_decode(*args, **kwargs):
        pipe.calls["decode"] += 1
        return decode(*args, **kwargs)

    pipe.denoise, pipe.decode_latents = counted_denoise, counted_decode
    return pipe


def _photo(width, height, seed=0):
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    arr = np.stack([128 + 90 * np.sin(xx / 3.0), 128 + 90 * np.cos(yy / 4.0), 128 + 50 * np.sin((xx + yy) / 5.0)], -1)
    return Image.fromarray(np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8))


def test_fidelity_curve_cli_samples_once(counted_pipe, tmp_path, monkeypatch, capsys):
    """`stablesr fidelity-curve` on one 64x48 image, 2 steps, 2 weights: ONE sampling, two different decodes."""
    import stablesr.cli.common

    monkeypatch.setattr(stablesr.cli.common, "load_pipeline", lambda *args, **kwargs: counted_pipe)
    lq_dir, gt_dir, out = tmp_path / "lq", tmp_path / "gt", tmp_path / "curve"
    lq_dir.mkdir()
    gt_dir.mkdir()
    gt = _photo(128, 96)
    gt.save(gt_dir / "photo.png")
    gt.resize((64, 48), Image.Resampling.BICUBIC).save(lq_dir / "photo.png")

    argv = ["fidelity-curve", str(lq_dir / "photo.png"), "--gt", str(gt_dir), "-o", str(out), "--model", "unused",
            "--weights", "0,1", "--steps", "2", "--device", "cpu", "--save-images", "-q"]
    before = dict(counted_pipe.calls)
    assert main(argv) == 0
    assert counted_pipe.calls["denoise"] - before["denoise"] == 1, "sampled once for all weights"
    assert counted_pipe.calls["decode"] - before["decode"] == 2, "one CFW decode per weight"

    w0 = np.asarray(Image.open(out / "images" / "photo_w0.00.png"), dtype=float)
    w1 = np.asarray(Image.open(out / "images" / "photo_w1.00.png"), dtype=float)
    assert w0.shape == w1.shape == (96, 128, 3), "upscale inferred from GT size / LQ size"
    assert np.abs(w0 - w1).mean() > 0.5, "each weight gives a different output"

    plot = Image.open(out / "fidelity_curve.png")
    assert plot.format == "PNG" and plot.width > 300
    table = json.loads((out / "fidelity_curve.json").read_text())
    assert table["weights"] == [0.0, 1.0]
    per_image = table["per_image"]
    assert [r["weight"] for r in per_image] == [0.0, 1.0]
    for r in per_image:
        assert math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 and math.isfinite(r["consistency"])
    assert per_image[0]["psnr"] != per_image[1]["psnr"]
    from stablesr import metrics as M

    assert per_image[0]["psnr"] == pytest.approx(M.psnr(Image.fromarray(w0.astype(np.uint8)), gt, 4))
    rows = list(csv.DictReader(open(out / "fidelity_curve.csv")))
    assert [r["image"] for r in rows] == ["photo", "photo", "MEAN", "MEAN"]
    if "lpips" not in table["metrics"]:  # no torchmetrics/pyiqa here: skipped with a note, not an error
        assert any("lpips" in n for n in table["notes"])
        assert "lpips" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Stub pipeline: the bookkeeping of fidelity_curve and cascade_upscale without a model
# ----------------------------------------------------------------------------------------------------------------------


class StubPipe:
    """Mimics StableSRPipeline's sizes: output round(upscale x input); decode returns condition.output_size."""

    def __init__(self):
        self.calls = []
        self.decodes = []

    def __call__(self, image, upscale=4.0, output_type="pil", fidelity_weight=0.5, **kwargs):
        [(image, _)] = as_rgb_alpha_list(image)  # what the pipeline accepts, alpha split off as it does
        self.calls.append(dict(size=image.size, upscale=upscale, output_type=output_type, **kwargs))
        out = (max(1, round(image.height * upscale)), max(1, round(image.width * upscale)))
        # the condition is immutable: it carries the input's pixels (0..255) as its lq_image for the stub decode
        source = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        cond = RestorationCondition(source, out, out)
        latents = torch.full((1, 4, 2, 2), float(len(self.calls)))
        if output_type == "latent":
            return StableSRPipelineOutput(images=[latents], latents=[latents], conditions=[cond])
        return StableSRPipelineOutput(images=[self.decode_latents(latents, cond, fidelity_weight)],
                                      latents=[latents], conditions=[cond])

    def decode_latents(self, latents, condition, fidelity_weight=0.5, color_fix="wavelet", vae_tile_size=1024,
                       vae_tile_overlap=64, output_type="pil"):
        self.decodes.append((fidelity_weight, condition.output_size))
        h, w = condition.output_size
        source = Image.fromarray(condition.lq_image[0].permute(1, 2, 0).numpy().astype(np.uint8))
        img = source.resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float64) * (1 - 0.2 * fidelity_weight)  # w changes the decode
        return Image.fromarray(arr.astype(np.uint8))


def test_fidelity_curve_table_with_and_without_gt():
    pipe = StubPipe()
    gt = _photo(64, 48)
    lq = gt.resize((16, 12), Image.Resampling.BICUBIC)
    curve = fidelity_curve(pipe, [lq, lq], [gt, None], [0, 0.5, 1], names=["a", "b"], num_inference_steps=3,
                           keep_images=True)
    assert len(pipe.calls) == 2 and all(c["output_type"] == "latent" for c in pipe.calls)
    assert pipe.calls[0]["upscale"] == 4.0 and pipe.calls[0]["num_inference_steps"] == 3
    assert [d[0] for d in pipe.decodes] == [0.0, 0.5, 1.0] * 2
    assert [(r["image"], r["weight"]) for r in curve.rows] == [(n, w) for n in "ab" for w in (0.0, 0.5, 1.0)]
    assert curve.rows[0]["psnr"] is not None and curve.rows[3]["psnr"] is None, "no GT for b: no PSNR"
    assert all(r["consistency"] is not None for r in curve.rows)
    means = curve.mean_rows()
    assert [m["weight"] for m in means] == [0.0, 0.5, 1.0] and means[0]["n"] == 2
    assert curve.best_weight("psnr") == 0.0  # the stub darkens the image as w grows
    assert set(curve.images) == {(n, w) for n in "ab" for w in (0.0, 0.5, 1.0)}
    assert any("b: no ground truth" in n for n in curve.notes)
    with pytest.raises(ValueError, match="ground truth is 50x48"):
        fidelity_curve(StubPipe(), [lq], [gt.resize((50, 48))], [0.5], upscale=4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fidelity_curve(StubPipe(), [lq], weights=[1.5])


def test_plan_cascade():
    assert plan_cascade(4) == [4.0]
    assert plan_cascade(2.5) == [2.5]
    assert plan_cascade(8) == [4.0, 2.0]
    assert plan_cascade(16) == [4.0, 4.0]
    assert plan_cascade(32) == [4.0, 4.0, 2.0]
    assert plan_cascade(8, split="even") == pytest.approx([8 ** 0.5] * 2)
    assert plan_cascade(16, max_pass_upscale=None) == [16.0]
    assert plan_cascade(16, max_pass_upscale=0) == [16.0]
    for u in (5, 6.5, 8, 12, 16, 33):
        assert math.prod(plan_cascade(u)) == pytest.approx(u)
        assert max(plan_cascade(u)) <= 4 + 1e-9
    with pytest.raises(ValueError):
        plan_cascade(8, max_pass_upscale=1)


@pytest.mark.parametrize("size,upscale", [((24, 16), 8), ((23, 17), 6), ((37, 11), 16), ((19, 13), 5.3)])
def test_cascade_sizes_are_exact(size, upscale):
    pipe = StubPipe()
    out = cascade_upscale(pipe, Image.new("RGB", size, "gray"), upscale, num_inference_steps=2)
    expected = (round(size[0] * upscale), round(size[1] * upscale))
    assert out.images[0].size == expected
    assert len(pipe.calls) == len(plan_cascade(upscale))
    assert all(c["num_inference_steps"] == 2 for c in pipe.calls), "kwargs reach every pass"
    assert out.conditions[0].output_size == (expected[1], expected[0])


def test_cascade_single_pass_is_the_pipeline_call():
    pipe = StubPipe()
    out = cascade_upscale(pipe, Image.new("RGB", (10, 8)), 4, fidelity_weight=0.25, output_type="latent")
    assert len(pipe.calls) == 1 and pipe.calls[0]["upscale"] == 4 and pipe.calls[0]["output_type"] == "latent"
    assert pipe.decodes == [] and out.conditions[0].output_size == (32, 40)
    with pytest.raises(ValueError, match="latents"):
        cascade_upscale(StubPipe(), Image.new("RGB", (10, 8)), 8, latents=torch.zeros(1))


def test_cascade_x8_on_tiny_pipeline(counted_pipe):
    """x8 on a 24x16 image: exactly 192x128 pixels, in two pipeline passes (x4 then x2)."""
    before = dict(counted_pipe.calls)
    passes = []
    out = cascade_upscale(counted_pipe, _photo(24, 16), 8, num_inference_steps=1,
                          generator=torch.Generator().manual_seed(0),
                          pass_callback=lambda i, n, f, img: passes.append((i, n, f, img.size)))
    assert out.images[0].size == (192, 128)
    assert counted_pipe.calls["denoise"] - before["denoise"] == 2, "two sampling passes"
    assert passes == [(0, 2, 4.0, (96, 64))]


def test_fidelity_curve_passes_inputs_to_the_pipeline_as_they_are(tmp_path):
    """The pipeline splits an alpha channel itself: a PIL input reaches it unchanged, a path as the loaded file."""
    from stablesr.image_io import LoadedImage

    class RecordingPipe(StubPipe):
        def __call__(self, image, **kwargs):
            self.inputs.append(image)
            return super().__call__(image, **kwargs)

    rgba = _photo(16, 12)
    rgba.putalpha(200)
    rgba.save(tmp_path / "a.png")
    pipe = RecordingPipe()
    pipe.inputs = []
    curve = fidelity_curve(pipe, [rgba, tmp_path / "a.png"], weights=[0.5], metrics=["consistency"])
    assert pipe.inputs[0] is rgba
    assert isinstance(pipe.inputs[1], LoadedImage) and pipe.inputs[1].alpha is not None
    assert [r["image"] for r in curve.rows] == ["image0", "a"]
    assert curve.rows[0]["consistency"] == curve.rows[1]["consistency"], "the same pixels either way"
