"""The README's main command (`stablesr restore`) end to end on real photos with the tiny converted model."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from stablesr.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()[60:108, 150:214]).save(d / "cat.png")  # 64x48, non-square
    rgba = Image.fromarray(data.astronaut()[::8, ::8]).convert("RGBA")  # 64x64
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 16:48] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "astro_alpha.png")
    coffee = Image.fromarray(data.coffee()[::10, ::10])  # 60x40
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display: the upright image is 40 wide, 60 tall
    coffee.save(d / "coffee_rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(data.camera()[::8, ::8]).save(d / "camera_gray.png")  # L mode
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return d


def test_restore_folder_end_to_end(photos, small_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["restore", str(photos), "-o", str(out), "--model", str(small_pipeline_dir), "--steps", "2",
                 "--upscale", "2", "-q"])
    err = capsys.readouterr().err
    assert code == 1, "a failed file must make the exit code non-zero"
    assert "broken.png" in err
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    assert sizes == {
        "cat.png": (128, 96),
        "astro_alpha.png": (128, 128),
        "coffee_rotated.png": (80, 120),  # EXIF orientation applied before upscaling
        "camera_gray.png": (128, 128),
    }
    restored = Image.open(out / "astro_alpha.png")
    assert restored.mode == "RGBA"
    a = np.asarray(restored.getchannel("A"))
    assert a[64, 64] == 255 and a[2, 2] == 0, "alpha upscaled and re-attached"
    assert not list(out.glob(".*")), "no temporary files left"

    # Second run: existing outputs are kept (not overwritten), and nothing is redone.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(["restore", str(photos / "cat.png"), "-o", str(out), "--model", str(small_pipeline_dir),
                 "--steps", "2", "-q"])
    assert code == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_fidelity_sweep_and_compare(photos, small_pipeline_dir, tmp_path):
    out = tmp_path / "sweep"
    code = main(["restore", str(photos / "cat.png"), "-o", str(out), "--model", str(small_pipeline_dir),
                 "--steps", "2", "--upscale", "2", "--fidelity-sweep", "0,1", "--compare", "-q"])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cat.png", "cat_compare.png", "cat_w0.00.png", "cat_w1.00.png"]
    w0 = np.asarray(Image.open(out / "cat_w0.00.png"), dtype=float)
    w1 = np.asarray(Image.open(out / "cat_w1.00.png"), dtype=float)
    assert np.abs(w0 - w1).mean() > 0.5, "the fidelity weight changes the decode"
    assert Image.open(out / "cat_compare.png").size == (256, 96)


def test_console_entry_point_and_errors(photos, small_pipeline_dir, tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, "-m", "stablesr.cli", "restore", str(photos / "camera_gray.png"), "-o", str(out),
         "--model", str(small_pipeline_dir), "--steps", "1", "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(out / "camera_gray.png").size == (256, 256)  # 4x default
    # Clear errors, exit code 2, no traceback.
    bad = subprocess.run([sys.executable, "-m", "stablesr.cli", "restore", str(tmp_path / "nope.png"), "-o",
                          str(out)], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "nope.png" in bad.stderr and "Traceback" not in bad.stderr
    offline = subprocess.run(
        [sys.executable, "-m", "stablesr.cli", "restore", str(photos / "cat.png"), "-o", str(tmp_path / "o2"),
         "--model", "someone/not-cached-model"],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "STABLESR_CACHE": str(tmp_path / "cache")},
    )
    assert offline.returncode == 2 and "--model" in offline.stderr and "Traceback" not in offline.stderr
