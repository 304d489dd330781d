"""``stablesr evaluate`` end to end on a small synthetic folder (no model, no learned metrics)."""

import csv
import json
import sys

import numpy as np
import pytest
from PIL import Image

from stablesr import metrics as M
from stablesr.cli import main
from stablesr.evaluate import evaluate_folders, infer_protocol


def _run(argv):
    return main(["evaluate"] + argv)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for d in ("sr", "gt", "lq"):
        (root / d).mkdir()
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:64, 0:96]
    for i in range(3):
        gt = np.stack([128 + 100 * np.sin(xx / (5 + i)), 128 + 100 * np.cos(yy / 7), 128 + 60 * np.sin((xx + yy) / 9)],
                      -1)
        gt = np.clip(gt + rng.normal(0, 5, gt.shape), 0, 255).astype(np.uint8)
        gt_img = Image.fromarray(gt)
        gt_img.save(root / "gt" / f"img{i}.png")
        gt_img.resize((24, 16), Image.Resampling.BICUBIC).save(root / "lq" / f"img{i}_LR4.png")
        sr = np.clip(gt.astype(int) + rng.integers(-8, 9, gt.shape), 0, 255).astype(np.uint8)
        Image.fromarray(sr).save(root / "sr" / f"img{i}.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "sr" / "orphan.png")  # no GT
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(root / "gt" / "nosr.png")  # no SR
    Image.fromarray(np.zeros((60, 96, 3), np.uint8)).save(root / "sr" / "wrongsize.png")
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(root / "gt" / "wrongsize.png")
    return root


def test_evaluate_end_to_end(folders, tmp_path, capsys):
    out = tmp_path / "report"
    code = _run(["--sr", str(folders / "sr"), "--gt", str(folders / "gt"), "--lq", str(folders / "lq"),
                 "--strip", "_LR4", "--metrics", "psnr,ssim,psnr_rgb,consistency", "--out", str(out), "-q"])
    stdout = capsys.readouterr().out
    assert code == 1, "a size mismatch is a per-file error: non-zero exit, but the others are evaluated"
    assert "protocol: full-size images" in stdout and "scale x4" in stdout and "crop border 4" in stdout
    assert "mean SR (3)" in stdout and "mean bicubic (3)" in stdout
    assert "orphan.png" in stdout and "nosr.png" in stdout, "missing pairs are listed"
    assert "size mismatch" in stdout and "wrongsize" in stdout

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    sr_rows = [r for r in rows if r["method"] == "sr" and r["name"] != "MEAN"]
    bic_rows = [r for r in rows if r["method"] == "bicubic" and r["name"] != "MEAN"]
    assert [r["name"] for r in sr_rows] == ["img0", "img1", "img2"] and len(bic_rows) == 3
    assert {r["method"] for r in rows if r["name"] == "MEAN"} == {"sr", "bicubic"}

    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"]["name"] == "full" and report["protocol"]["crop_border"] == 4
    assert report["missing"]["sr_without_gt"] == ["orphan.png"]
    assert report["missing"]["gt_without_sr"] == ["nosr.png"]
    assert report["errors"][0]["name"] == "wrongsize"
    # the CSV/JSON values are the metrics of the files
    sr0, gt0 = Image.open(folders / "sr" / "img0.png"), Image.open(folders / "gt" / "img0.png")
    per0 = next(r for r in report["per_image"] if r["name"] == "img0" and r["method"] == "sr")
    assert per0["psnr"] == pytest.approx(M.psnr(sr0, gt0, 4))
    assert per0["ssim"] == pytest.approx(M.ssim(sr0, gt0, 4))
    assert float(sr_rows[0]["psnr"]) == pytest.approx(per0["psnr"])
    bic0 = Image.open(folders / "lq" / "img0_LR4.png").resize((96, 64), Image.Resampling.BICUBIC)
    bic_json = next(r for r in report["per_image"] if r["name"] == "img0" and r["method"] == "bicubic")
    assert bic_json["psnr"] == pytest.approx(M.psnr(bic0, gt0, 4))
    assert report["mean"]["sr"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in sr_rows]))
    assert report["mean"]["bicubic"]["consistency"] > 35, "bicubic up then down is close to the LQ"

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 * 4, "side-by-side crops (LQ, bicubic, SR, GT) per image"
    assert "id='zoom'" in page and "image-rendering: pixelated" in page
    assert "full-size images" in page and "orphan.png" in page
    assert "http" not in page.replace("http-equiv", ""), "self-contained: no external resources"


def test_identical_images_and_crops_protocol(tmp_path, capsys):
    for d in ("sr", "gt"):
        (tmp_path / d).mkdir()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    img.save(tmp_path / "gt" / "a.png")
    img.save(tmp_path / "sr" / "a.png")
    code = _run(["--sr", str(tmp_path / "sr"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "r"),
                 "--html-max-images", "0", "-q"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "128->512 center crops" in stdout and "inf" in stdout
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["per_image"][0]["psnr"] == "inf" and report["mean"]["sr"]["ssim"] == pytest.approx(1.0)
    assert report["protocol"]["name"] == "crops-128-512"


def test_protocol_inference():
    assert infer_protocol([(512, 512)] * 3, [(128, 128)] * 3)["name"] == "crops-128-512"
    full = infer_protocol([(2040, 1356)], [(510, 339)])
    assert full["name"] == "full" and full["scale"] == 4.0
    forced = infer_protocol([(2040, 1356)], [], "crops")
    assert forced["name"] == "crops-128-512" and forced["source"] == "--protocol" and forced["warnings"]


def test_unavailable_learned_metric_is_a_clear_cli_error(folders, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    base = ["--sr", str(folders / "sr"), "--gt", str(folders / "gt")]
    for metrics, message in (("psnr,lpips", "metric 'lpips' is unavailable"), ("consistency", "pass --lq"),
                             ("psnr,foo", "unknown metric 'foo'")):
        assert _run(base + ["--metrics", metrics]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert "torchmetrics" in str(M.MetricUnavailableError("lpips", 'pip install "torchmetrics[image]"', "x"))


def test_no_pairs(tmp_path, capsys):
    (tmp_path / "sr").mkdir()
    (tmp_path / "gt").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "sr" / "x.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "gt" / "y.png")
    assert _run(["--sr", str(tmp_path / "sr"), "--gt", str(tmp_path / "gt")]) == 2
    assert "no SR/GT pairs" in capsys.readouterr().err
    report = evaluate_folders(tmp_path / "sr", tmp_path / "gt", crop_border=0)
    assert report.rows == [] and report.missing["sr_without_gt"] == ["x.png"]


def test_fid_is_a_folder_level_metric(folders, tmp_path, monkeypatch, capsys):
    """FID goes through the library (a stand-in here: no weights are downloaded in tests); it is reported for the
    whole set only, for SR and for the bicubic baseline."""
    import types

    import torch

    seen = {"real": 0, "fake": 0}

    class FakeFID:
        def __init__(self, feature, normalize):
            assert feature == 2048 and normalize is False
            self.means = {True: [], False: []}

        def to(self, device):
            return self

        def update(self, images, real):
            assert images.dtype == torch.uint8 and images.shape[:2] == (1, 3)
            seen["real" if real else "fake"] += 1
            self.means[real].append(images.float().mean())

        def compute(self):
            return torch.tensor(abs(float(np.mean(self.means[True]) - np.mean(self.means[False]))))

    tm, image, fid = (types.ModuleType(n) for n in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid"))
    fid.FrechetInceptionDistance = FakeFID
    tm.image, image.fid = image, fid
    for mod in (tm, image, fid, types.ModuleType("torch_fidelity")):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    out = tmp_path / "r"
    _run(["--sr", str(folders / "sr"), "--gt", str(folders / "gt"), "--lq", str(folders / "lq"), "--strip", "_LR4",
          "--metrics", "psnr,fid", "--out", str(out), "--html-max-images", "1", "-q"])
    assert "fid↓" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["fid"]["backend"] == "torchmetrics"
    assert report["mean"]["sr"]["fid"] >= 0 and report["mean"]["bicubic"]["fid"] >= 0
    assert seen == {"real": 6, "fake": 6}, "3 GT + 3 SR images, then 3 GT + 3 bicubic images"
    assert all("fid" not in r for r in report["per_image"])
    mean_rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["name"] == "MEAN"]
    assert all(r["fid"] for r in mean_rows) and all(not r["fid"] for r in csv.DictReader(open(out / "metrics.csv"))
                                                    if r["name"] != "MEAN")
