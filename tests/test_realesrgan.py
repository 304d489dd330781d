"""The Real-ESRGAN baseline: our RRDBNet against BasicSR's on recorded vectors, the checkpoint loader, tiled
inference, and the baseline rows of ``stablesr evaluate`` and ``stablesr fidelity-curve``.

The vectors ``tests/fixtures/rrdbnet_basicsr_x{4,2,1}.safetensors`` were recorded from BasicSR's own
``basicsr/archs/rrdbnet_arch.py`` by ``tests/fixtures/make_rrdbnet_vector.py`` (the BasicSR commit is in their
metadata); BasicSR itself is not installed here.
"""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stablesr import metrics as M
from stablesr.cli import main
from stablesr.models.rrdbnet import (
    RRDB,
    RealESRGANUpscaler,
    RRDBNet,
    RRDBNetLoadError,
    load_rrdbnet,
    rrdbnet_config_from_state_dict,
    rrdbnet_upscale,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vector(scale: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, {"input", "output"}, metadata) of the BasicSR vector at ``scale``."""
    path = FIXTURES / f"rrdbnet_basicsr_x{scale}.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state_dict = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
    return state_dict, {"input": tensors["input"], "output": tensors["output"]}, metadata


def _pth(state_dict, path: Path, key: str | None = "params_ema") -> Path:
    torch.save({key: state_dict} if key else state_dict, path)
    return path


def _tiny_model(scale: int) -> RRDBNet:
    model = RRDBNet(scale=scale, num_feat=8, num_block=2, num_grow_ch=4)
    model.load_state_dict(_vector(scale)[0])
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Equality with BasicSR
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_matches_basicsr_rrdbnet(scale, tmp_path):
    state_dict, io, metadata = _vector(scale)
    assert re.fullmatch(r"[0-9a-f]{40}", metadata["basicsr_commit"]), "the fixture names the BasicSR commit"
    recorded = json.loads(metadata["config"])
    model = load_rrdbnet(_pth(state_dict, tmp_path / "model.pth"))  # the loader users go through
    assert model.config == {"in_channels": recorded["num_in_ch"], "out_channels": recorded["num_out_ch"],
                            "scale": recorded["scale"], "num_feat": recorded["num_feat"],
                            "num_block": recorded["num_block"], "num_grow_ch": recorded["num_grow_ch"]}
    assert io["output"].shape[-2:] == tuple(s * scale for s in io["input"].shape[-2:])
    with torch.no_grad():
        out = model(io["input"])
    err = (out - io["output"]).abs().max().item()
    assert err <= TOLERANCE, f"x{scale}: max |ours - BasicSR| = {err:.2e}"
    # the inference helper on a whole image is the model, clamped
    whole = rrdbnet_upscale(model, io["input"], tile_size=None)
    assert (whole - io["output"].clamp(0, 1)).abs().max().item() <= TOLERANCE


def _swap_up_convs(model):
    sd = model.state_dict()
    for suffix in ("weight", "bias"):
        sd[f"conv_up1.{suffix}"], sd[f"conv_up2.{suffix}"] = sd[f"conv_up2.{suffix}"], sd[f"conv_up1.{suffix}"]
    model.load_state_dict(sd)


@pytest.mark.parametrize("perturbation", ["swap conv_up1/conv_up2", "RRDB without rdb3", "RDB residual x0.25"])
def test_the_vector_catches_a_wrong_forward(perturbation, monkeypatch):
    """The comparison above is sensitive: each of these small mistakes moves the output far beyond the tolerance."""
    state_dict, io, _ = _vector(4)
    model = _tiny_model(4)
    if perturbation.startswith("swap"):
        _swap_up_convs(model)
    elif perturbation.startswith("RRDB"):
        monkeypatch.setattr(RRDB, "forward", lambda self, x: self.rdb2(self.rdb1(x)) * 0.2 + x)
    else:
        from stablesr.models import rrdbnet

        def rdb_forward(self, x, residual_scale=0.25):
            features = [x]
            for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
                features.append(torch.nn.functional.leaky_relu(conv(torch.cat(features, 1)), 0.2))
            return self.conv5(torch.cat(features, 1)) * residual_scale + x

        monkeypatch.setattr(rrdbnet.ResidualDenseBlock, "forward", rdb_forward)
    with torch.no_grad():
        err = (model(io["input"]) - io["output"]).abs().max().item()
    assert err > 100 * TOLERANCE, f"{perturbation}: only {err:.2e} off"


def test_cfw_keeps_the_old_block_names():
    from stablesr.models import cfw, rrdbnet

    assert cfw.RRDB is rrdbnet.RRDB and cfw.ResidualDenseBlock is rrdbnet.ResidualDenseBlock
    block = cfw.CFWFusionBlock(32, num_rrdb=1, growth_channels=8)
    assert "encode_enc_2.0.rdb3.conv5.weight" in block.state_dict(), "official CFW parameter names unchanged"


def test_x4plus_config_is_inferred_from_shapes():
    with torch.device("meta"):
        x4plus = RRDBNet()
        anime = RRDBNet(num_block=6)
        x2plus = RRDBNet(scale=2)
    assert rrdbnet_config_from_state_dict(x4plus.state_dict()) == {
        "in_channels": 3, "out_channels": 3, "scale": 4, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    assert rrdbnet_config_from_state_dict(anime.state_dict())["num_block"] == 6
    assert rrdbnet_config_from_state_dict(x2plus.state_dict())["scale"] == 2
    keys = list(x4plus.state_dict())
    for key in ("conv_first.weight", "body.0.rdb1.conv1.weight", "body.22.rdb3.conv5.bias", "conv_body.weight",
                "conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.weight"):
        assert key in keys
    assert len(keys) == 2 * (6 + 23 * 3 * 5), "6 convs + 23 x 3 x 5 dense-block convs: 702 tensors"


# ----------------------------------------------------------------------------------------------------------------------
# Tiled inference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale,size,tile", [(4, (24, 100), 20), (2, (21, 37), 12), (1, (22, 35), 12)])
def test_tiles_equal_the_whole_image_when_the_context_covers_the_receptive_field(scale, size, tile):
    """The tiny net sees 32 convs at the unshuffled resolution (+ a little after upsampling): with that much context
    every tile is exact. x4: the middle tiles' context (36 px each side) is smaller than the image, so the tiles are
    really cut out; x2 / x1: odd sizes exercise the pixel-unshuffle padding and the tile bookkeeping."""
    model = _tiny_model(scale)
    multiple = {4: 1, 2: 2, 1: 4}[scale]
    lq = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(scale))
    whole = rrdbnet_upscale(model, lq, tile_size=None)
    assert whole.shape == (1, 3, size[0] * scale, size[1] * scale) and 0 <= whole.min() and whole.max() <= 1
    tiled = rrdbnet_upscale(model, lq, tile_size=tile, tile_pad=36 * multiple)
    assert (tiled - whole).abs().max().item() <= TOLERANCE
    seams = rrdbnet_upscale(model, lq, tile_size=tile, tile_pad=2)
    assert seams.shape == whole.shape and (seams - whole).abs().max().item() > 1e-3, "small context: seams differ"


def test_upscaler_resizes_to_the_requested_size():
    model = _tiny_model(4)
    upscaler = RealESRGANUpscaler(model, tile_size=None)
    lq = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    native, note = upscaler.upscale(lq, (32, 24))
    assert native.size == (32, 24) and native.mode == "RGB" and note is None
    expected = rrdbnet_upscale(model, torch.from_numpy(np.asarray(lq, np.float32) / 255).permute(2, 0, 1)[None])
    assert np.array_equal(np.asarray(native), expected[0].mul(255).round().byte().permute(1, 2, 0).numpy())
    half, note = upscaler.upscale(lq, (16, 12))
    assert half.size == (16, 12) and "x4 model's 32x24 output was resized to 16x12" in note
    assert np.array_equal(np.asarray(half), np.asarray(native.resize((16, 12), Image.Resampling.BICUBIC)))


# ----------------------------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------------------------


class NotATensor:  # module level, so that torch.save can pickle it
    pass


def test_loader_prefers_params_ema_then_params_then_a_bare_dict(tmp_path):
    state_dict, io, _ = _vector(4)
    other = {k: v + 0.01 for k, v in state_dict.items()}
    torch.save({"params": other, "params_ema": state_dict}, tmp_path / "both.pth")
    with torch.no_grad():
        out = load_rrdbnet(tmp_path / "both.pth")(io["input"])
        assert (out - io["output"]).abs().max() <= TOLERANCE, "params_ema wins"
        out = load_rrdbnet(_pth(other, tmp_path / "params.pth", "params"))(io["input"])
        assert (out - io["output"]).abs().max() > 1e-3, "params is used when there is no params_ema"
        out = load_rrdbnet(_pth(state_dict, tmp_path / "bare.pth", None))(io["input"])
        assert (out - io["output"]).abs().max() <= TOLERANCE
        save_file(state_dict, str(tmp_path / "model.safetensors"))
        out = load_rrdbnet(tmp_path / "model.safetensors")(io["input"])
        assert (out - io["output"]).abs().max() <= TOLERANCE, ".safetensors accepted"


def test_loader_errors(tmp_path):
    state_dict, _, _ = _vector(4)
    with pytest.raises(FileNotFoundError, match="RealESRGAN_x4plus"):
        load_rrdbnet(tmp_path / "nope.pth")

    no_hr = {k: v for k, v in state_dict.items() if not k.startswith("conv_hr.")}
    with pytest.raises(RRDBNetLoadError, match=r"missing 2 key\(s\): conv_hr.weight, conv_hr.bias"):
        load_rrdbnet(_pth(no_hr, tmp_path / "no_hr.pth"))
    no_block = {k: v for k, v in state_dict.items() if k != "body.1.rdb2.conv3.bias"}
    with pytest.raises(RRDBNetLoadError, match=r"body\.1\.rdb2\.conv3\.bias"):
        load_rrdbnet(_pth(no_block, tmp_path / "no_block.pth"))
    extra = dict(state_dict, **{"conv_extra.weight": torch.zeros(1)})
    with pytest.raises(RRDBNetLoadError, match=r"unexpected 1 key\(s\): conv_extra.weight"):
        load_rrdbnet(_pth(extra, tmp_path / "extra.pth"))
    wrong = dict(state_dict, **{"conv_body.weight": torch.zeros(8, 8, 1, 1)})
    with pytest.raises(RRDBNetLoadError, match="shape mismatch.*conv_body.weight"):
        load_rrdbnet(_pth(wrong, tmp_path / "wrong.pth"))
    srvgg = {"body.0.weight": torch.zeros(64, 3, 3, 3), "body.0.bias": torch.zeros(64)}
    with pytest.raises(RRDBNetLoadError, match="not an RRDBNet.*SRVGGNetCompact"):
        load_rrdbnet(_pth(srvgg, tmp_path / "srvgg.pth"))
    torch.save({"net_g": state_dict}, tmp_path / "other_key.pth")
    with pytest.raises(RRDBNetLoadError, match="no 'params_ema' or 'params' entry.*net_g"):
        load_rrdbnet(tmp_path / "other_key.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RRDBNetLoadError, match="not a readable PyTorch checkpoint"):
        load_rrdbnet(tmp_path / "garbage.pth")
    (tmp_path / "short.pth").write_bytes(b"junk")
    with pytest.raises(RRDBNetLoadError, match="not a readable PyTorch checkpoint"):
        load_rrdbnet(tmp_path / "short.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(RRDBNetLoadError, match="not a readable .safetensors"):
        load_rrdbnet(tmp_path / "garbage.safetensors")


@pytest.mark.parametrize("content", ["a class object next to the weights", "a whole pickled module"])
def test_pickles_with_code_are_refused(content, tmp_path):
    state_dict, _, _ = _vector(4)
    path = tmp_path / "pickled.pth"
    if content.startswith("a class"):
        torch.save({"params_ema": state_dict, "extra": NotATensor()}, path)
    else:
        torch.save(_tiny_model(4), path)
    with pytest.raises(RRDBNetLoadError, match=r"weights_only=True\) refuses \(Unsupported global.*never unpickles"):
        load_rrdbnet(path)


# ----------------------------------------------------------------------------------------------------------------------
# stablesr evaluate --baseline realesrgan
# ----------------------------------------------------------------------------------------------------------------------


def _photo(width, height, seed=0):
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    arr = np.stack([128 + 90 * np.sin(xx / 3.0), 128 + 90 * np.cos(yy / 4.0), 128 + 50 * np.sin((xx + yy) / 5.0)], -1)
    return Image.fromarray(np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random x4 RRDBNet (the BasicSR vector's weights) saved as Real-ESRGAN saves it."""
    return _pth(_vector(4)[0], tmp_path_factory.mktemp("weights") / "tiny_x4.pth")


def _folders(root: Path, gt_size, lq_size, count=3):
    for d in ("sr", "gt", "lq"):
        (root / d).mkdir(parents=True)
    for i in range(count):
        gt = _photo(*gt_size, seed=i)
        gt.save(root / "gt" / f"img{i}.png")
        gt.resize(lq_size, Image.Resampling.BICUBIC).save(root / "lq" / f"img{i}.png")
        noisy = np.asarray(gt, dtype=int) + np.random.default_rng(10 + i).integers(-6, 7, (gt_size[1], gt_size[0], 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "sr" / f"img{i}.png")
    return root


def _direct(weights_path, lq_path, size):
    """The baseline image computed here, without the evaluate code: model -> 8 bits -> PIL bicubic if resized."""
    model = load_rrdbnet(weights_path)
    lq = torch.from_numpy(np.asarray(Image.open(lq_path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]
    out = rrdbnet_upscale(model, lq)[0].mul(255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(out)
    return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)


def test_evaluate_adds_a_realesrgan_row(weights, tmp_path, capsys):
    root = _folders(tmp_path / "x4", (32, 24), (8, 6))
    out = tmp_path / "report"
    code = main(["evaluate", "--sr", str(root / "sr"), "--gt", str(root / "gt"), "--lq", str(root / "lq"),
                 "--metrics", "psnr,ssim,psnr_rgb,consistency", "--out", str(out), "--baseline", "realesrgan",
                 "--baseline-weights", str(weights), "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "mean SR (3)" in stdout and "mean bicubic (3)" in stdout and "mean Real-ESRGAN (3)" in stdout
    assert "note: Real-ESRGAN baseline: tiny_x4.pth (RRDBNet x4, 2 blocks, 8 features)" in stdout

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    base_rows = [r for r in rows if r["method"] == "realesrgan" and r["name"] != "MEAN"]
    assert [r["name"] for r in base_rows] == ["img0", "img1", "img2"]
    assert [r["method"] for r in rows if r["name"] == "MEAN"] == ["sr", "bicubic", "realesrgan"]
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["baseline"]["label"] == "Real-ESRGAN"
    assert report["settings"]["baseline"]["model"]["scale"] == 4
    assert not any("resized" in n for n in report["notes"]), "x4 model for an x4 request: no resize"
    values = []
    for i in range(3):
        gt = Image.open(root / "gt" / f"img{i}.png")
        lq = Image.open(root / "lq" / f"img{i}.png")
        direct = _direct(weights, root / "lq" / f"img{i}.png", gt.size)
        saved = Image.open(out / "realesrgan" / f"img{i}.png")
        assert np.array_equal(np.asarray(saved), np.asarray(direct)), "the saved output is the model's output"
        row = next(r for r in report["per_image"] if r["name"] == f"img{i}" and r["method"] == "realesrgan")
        assert row["psnr"] == pytest.approx(M.psnr(direct, gt, 4))
        assert row["ssim"] == pytest.approx(M.ssim(direct, gt, 4))
        assert row["psnr_rgb"] == pytest.approx(M.psnr(direct, gt, 4, y_channel=False))
        assert row["consistency"] == pytest.approx(M.compute_image_metrics(direct, gt, lq, ["consistency"])
                                                   ["consistency"])
        assert float(base_rows[i]["psnr"]) == pytest.approx(row["psnr"])
        bicubic = next(r for r in report["per_image"] if r["name"] == f"img{i}" and r["method"] == "bicubic")
        assert bicubic["psnr"] != row["psnr"]
        values.append(row["psnr"])
    assert report["mean"]["realesrgan"]["psnr"] == pytest.approx(np.mean(values))

    page = (out / "report.html").read_text()
    assert "<td>Real-ESRGAN</td>" in page
    crops = page.count("alt='bicubic'")
    assert crops >= 3 and page.count("alt='Real-ESRGAN'") == crops, "a Real-ESRGAN crop next to every bicubic one"


def test_evaluate_baseline_for_an_x2_request_is_resized(weights, tmp_path, capsys):
    root = _folders(tmp_path / "x2", (16, 12), (8, 6), count=2)
    out = tmp_path / "report"
    assert main(["evaluate", "--sr", str(root / "sr"), "--gt", str(root / "gt"), "--lq", str(root / "lq"),
                 "--crop-border", "0", "--out", str(out), "--baseline", "realesrgan", "--baseline-weights",
                 str(weights), "--baseline-tile", "0", "-q"]) == 0
    assert "output was resized to the requested size for 2 of 2 image(s)" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert any("x4 model's 32x24 output was resized to 16x12" in n for n in report["notes"])
    direct = _direct(weights, root / "lq" / "img0.png", (16, 12))
    row = next(r for r in report["per_image"] if r["name"] == "img0" and r["method"] == "realesrgan")
    assert row["width"] == 16 and row["psnr"] == pytest.approx(M.psnr(direct, Image.open(root / "gt" / "img0.png")))
    assert "note: " in (out / "report.html").read_text()


def test_evaluate_baseline_fid_reads_the_saved_outputs(weights, tmp_path, monkeypatch):
    from stablesr.evaluate import evaluate_folders

    seen = []

    def fake_fid(sr_images, gt_images, device="cpu", backend="auto"):
        seen.append([np.asarray(M.to_array(img)) for img in sr_images])
        return float(len(seen))

    monkeypatch.setattr(M, "fid_backend", lambda backend="auto": "stub")
    monkeypatch.setattr(M, "compute_fid", fake_fid)
    root = _folders(tmp_path / "fid", (32, 24), (8, 6), count=2)
    upscaler = RealESRGANUpscaler.from_file(weights)
    report = evaluate_folders(root / "sr", root / "gt", root / "lq", "psnr,fid", baseline=upscaler,
                              baseline_dir=tmp_path / "out")
    assert set(report.means) == {"sr", "bicubic", "realesrgan"} and report.means["realesrgan"]["fid"] == 3.0
    for i in range(2):
        direct = _direct(weights, root / "lq" / f"img{i}.png", (32, 24))
        assert np.array_equal(seen[2][i], M.to_array(direct)), "FID of the baseline is computed on its outputs"
    with pytest.raises(ValueError, match="pass --lq"):
        evaluate_folders(root / "sr", root / "gt", None, "psnr", baseline=upscaler)


def test_evaluate_baseline_option_errors(weights, tmp_path, capsys):
    root = _folders(tmp_path / "e", (32, 24), (8, 6), count=1)
    base = ["evaluate", "--sr", str(root / "sr"), "--gt", str(root / "gt"), "--out", str(tmp_path / "r"), "-q"]
    (tmp_path / "bad.pth").write_bytes(b"junk")
    cases = [
        (["--lq", str(root / "lq"), "--baseline", "realesrgan"], "needs --baseline-weights"),
        (["--baseline", "realesrgan", "--baseline-weights", str(weights)], "needs --lq"),
        (["--lq", str(root / "lq"), "--baseline-weights", str(weights)], "only used with --baseline"),
        (["--lq", str(root / "lq"), "--baseline", "realesrgan", "--baseline-weights", str(tmp_path / "bad.pth")],
         "--baseline-weights: "),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists(), "nothing written on a usage error"


# ----------------------------------------------------------------------------------------------------------------------
# stablesr fidelity-curve --baseline realesrgan
# ----------------------------------------------------------------------------------------------------------------------


def test_fidelity_curve_gets_the_baseline(small_pipeline_dir, weights, tmp_path, monkeypatch, capsys):
    """The tiny 128-px pipeline, 2 steps, x2 (so the x4 model's output is resized): the baseline is a row of the
    CSV / JSON with the metrics of its output, and a dashed red line in the plot."""
    import stablesr.cli.common
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    monkeypatch.setattr(stablesr.cli.common, "load_pipeline", lambda *args, **kwargs: pipe)
    lq_dir, gt_dir, out = tmp_path / "lq", tmp_path / "gt", tmp_path / "curve"
    lq_dir.mkdir()
    gt_dir.mkdir()
    gt = _photo(64, 48)
    gt.save(gt_dir / "photo.png")
    gt.resize((32, 24), Image.Resampling.BICUBIC).save(lq_dir / "photo.png")
    assert main(["fidelity-curve", str(lq_dir / "photo.png"), "--gt", str(gt_dir), "-o", str(out),
                 "--model", "unused", "--weights", "0,1", "--steps", "2", "--device", "cpu",
                 "--metrics", "psnr,ssim,consistency", "--baseline", "realesrgan", "--baseline-weights",
                 str(weights), "-q"]) == 0
    captured = capsys.readouterr()
    assert "Real-ESRGAN: psnr" in captured.out and "resized" in captured.err

    direct = _direct(weights, lq_dir / "photo.png", (64, 48))
    table = json.loads((out / "fidelity_curve.json").read_text())
    baseline = table["baseline"]
    assert baseline["label"] == "Real-ESRGAN" and baseline["settings"]["model"]["scale"] == 4
    assert baseline["per_image"][0]["psnr"] == pytest.approx(M.psnr(direct, gt, 4))
    assert baseline["mean"]["ssim"] == pytest.approx(M.ssim(direct, gt, 4))
    assert table["weights"] == [0.0, 1.0] and len(table["per_image"]) == 2, "the curve itself is unchanged"

    rows = list(csv.DictReader(open(out / "fidelity_curve.csv")))
    assert [(r["image"], r["method"]) for r in rows] == [("photo", "stablesr")] * 2 + [("MEAN", "stablesr")] * 2 + [
        ("photo", "realesrgan"), ("MEAN", "realesrgan")]
    assert float(rows[-1]["psnr"]) == pytest.approx(M.psnr(direct, gt, 4)) and rows[-1]["weight"] == ""

    plot = np.asarray(Image.open(out / "fidelity_curve.png").convert("RGB"))
    assert (plot == (214, 39, 40)).all(-1).sum() > 50, "the baseline reference line is drawn"
