"""Hostile or odd inputs: colliding output names, thin images, unsupported files, fidelity without CFW."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablesr.batch import output_names
from stablesr.cli import main
from stablesr.image_io import iter_image_files
from stablesr.image_processor import CANVAS_AREA_FACTOR, working_canvas


def _old_canvas(height, width, upscale, native, multiple=64):
    """The rule before the bound: scale the short side up to native, whatever that does to the long side."""
    out_h, out_w = max(1, round(height * upscale)), max(1, round(width * upscale))
    scale = max(1.0, native / min(out_h, out_w))
    work_h, work_w = round(out_h * scale), round(out_w * scale)
    return (work_h + (-work_h) % multiple) * (work_w + (-work_w) % multiple)


# --------------------------------------------------------------------------------------------------- output names
def test_inputs_that_share_a_stem_get_distinct_names():
    files = [Path("in/photo.bmp"), Path("in/photo.webp"), Path("in/cat.png")]
    names = output_names(files)
    assert names == {Path("in/photo.bmp"): "photo_bmp", Path("in/photo.webp"): "photo_webp", Path("in/cat.png"): "cat"}
    # case-insensitive file systems: IMG_0001.JPG and img_0001.png are one name there
    names = output_names([Path("IMG_0001.JPG"), Path("img_0001.png")])
    assert len({n.casefold() for n in names.values()}) == 2
    # the same stem and extension in two folders (--recursive)
    names = output_names([Path("a/x.png"), Path("b/x.png"), Path("b/x.jpg")])
    assert len(set(names.values())) == 3 and names[Path("b/x.jpg")] == "x_jpg"
    # independent of the order the inputs come in (reruns plan the same names)
    shuffled = [Path("a/x.png"), Path("b/x.jpg"), Path("b/x.png")]
    assert output_names(shuffled) == names


def test_sweep_and_compare_suffixes_take_part_in_the_check():
    files = [Path("cat.png"), Path("cat_w0.50.jpg"), Path("dog_compare.png"), Path("dog.png")]
    tags = ["", "_w0.50", "_compare"]
    names = output_names(files, tags)
    outputs = [(names[f] + t).casefold() for f in files for t in tags]
    assert len(outputs) == len(set(outputs)), names
    assert output_names(files) == {f: f.stem for f in files}, "without the suffixes nothing collides"


def test_restore_keeps_both_results_of_colliding_inputs(small_pipeline_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(a).save(src / "photo.bmp")
    Image.fromarray(255 - a).save(src / "photo.webp", lossless=True)
    (src / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    out = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out), "--model", str(small_pipeline_dir), "--steps", "1", "--upscale", "2",
            "-q"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["photo_bmp.png", "photo_webp.png"]
    assert "photo.bmp -> photo_bmp.png" in err and "photo.webp -> photo_webp.png" in err
    assert "drawing.svg: not a supported image type ('.svg')" in err, "skipped inputs are listed with the reason"
    first = np.asarray(Image.open(out / "photo_bmp.png"), dtype=float)
    second = np.asarray(Image.open(out / "photo_webp.png"), dtype=float)
    assert np.abs(first - second).mean() > 20, "two different results, neither overwritten by the other"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 0  # rerun: the same names are planned, both are done, nothing is redone
    assert "skipping 2 file(s) whose outputs exist" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_skipped_entries_are_reported_by_iter_image_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    skipped = []
    files = iter_image_files(tmp_path, skipped=skipped)
    assert [f.name for f in files] == ["a.png"]
    reasons = {p.name: why for p, why in skipped}
    assert reasons == {"notes.txt": "not a supported image type ('.txt')",
                       "sub": "a sub-folder (pass --recursive to look inside)"}


# -------------------------------------------------------------------------------------------------------- canvas
@pytest.mark.parametrize("native", [128, 512, 768])
def test_canvas_area_is_bounded_and_the_output_exact(native):
    """Bound: canvas area <= CANVAS_AREA_FACTOR x max(output area, native^2), for any shape that is accepted."""
    rng = random.Random(native)
    shapes = [(3, 200, 2.0), (60, 4000, 4.0), (1, 1, 4.0), (1, 5000, 1.0), (7, 9000, 1.5), (4000, 60, 4.0)]
    shapes += [(rng.randint(1, 3000), rng.randint(1, 3000), rng.choice([1.0, 1.5, 2.0, 3.3, 4.0, 8.0]))
               for _ in range(400)]
    shapes += [(rng.randint(1, 12), rng.randint(500, 20000), rng.choice([1.0, 2.0, 4.0])) for _ in range(200)]
    refused = 0
    for h, w, up in shapes:
        try:
            canvas = working_canvas((h, w), up, native, 64)
        except ValueError as err:
            # refused only when even the smallest canvas the UNet accepts (each side rounded up to 64) is too big
            out_h, out_w = max(1, round(h * up)), max(1, round(w * up))
            smallest = (-(-out_h // 64) * 64) * (-(-out_w // 64) * 64)
            assert smallest > CANVAS_AREA_FACTOR * max(out_h * out_w, native * native), (h, w, up)
            assert "too thin" in str(err) and "Crop it" in str(err)
            refused += 1
            continue
        out_h, out_w = canvas.output_size
        assert (out_h, out_w) == (max(1, round(h * up)), max(1, round(w * up)))
        assert canvas.area <= CANVAS_AREA_FACTOR * max(out_h * out_w, native * native), (h, w, up, canvas)
        ph, pw = canvas.padded_size
        assert ph % 64 == 0 and pw % 64 == 0 and canvas.work_size[0] <= ph and canvas.work_size[1] <= pw
        assert min(canvas.work_size) >= min(out_h, out_w) and max(canvas.work_size) >= max(out_h, out_w)
    assert refused < len(shapes) // 4


def test_ordinary_images_keep_the_official_canvas():
    for h, w, up in [(128, 128, 4), (96, 128, 4), (48, 64, 2), (300, 100, 1), (720, 1280, 4), (100, 400, 1)]:
        canvas = working_canvas((h, w), up, 512, 64)
        assert canvas.area == _old_canvas(h, w, up, 512), (h, w, up)
        assert canvas.padded_size[0] >= 512 and canvas.padded_size[1] >= 512


def test_thin_strips_before_and_after():
    # 200x3 at x2: a 34,176x512 canvas before (7,280x the output), native^2 now.
    assert _old_canvas(3, 200, 2, 512) == 512 * 34176
    strip = working_canvas((3, 200), 2, 512, 64)
    assert strip.output_size == (6, 400) and strip.padded_size == (512, 512)
    # 4000x60 (a panorama strip) at x4: 34,176x512 before, 16,000x512 now (the short side padded, not scaled).
    assert _old_canvas(60, 4000, 4, 512) == 512 * 34176
    pano = working_canvas((60, 4000), 4, 512, 64)
    assert pano.output_size == (240, 16000) and pano.padded_size == (512, 16000)


def test_thin_input_restores_fast_and_exact(small_pipeline_dir):
    from stablesr import StableSRPipeline

    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    strip = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3, 200, 3), dtype=np.uint8))
    out = pipe(strip, upscale=2, num_inference_steps=1, output_type="latent")
    condition = out.conditions[0]
    assert condition.output_size == (6, 400)
    sampled = tuple(condition.lq_image.shape[-2:])
    assert sampled == working_canvas((3, 200), 2, pipe.native_size, 64).padded_size
    assert sampled[0] * sampled[1] <= CANVAS_AREA_FACTOR * max(6 * 400, pipe.native_size**2)  # was 8,576 x 128
    image = pipe.decode_latents(out.latents[0], condition, 0.5)
    assert image.size == (400, 6)


# ----------------------------------------------------------------------------------------------- no CFW, no knob
@pytest.fixture(scope="module")
def no_cfw_model(small_pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nocfw") / "model"
    shutil.copytree(small_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["cfw_adapter"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "cfw_adapter")
    return folder


def test_fidelity_sweep_without_cfw_is_refused(no_cfw_model, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (90, 120, 30)).save(img)
    code = main(["restore", str(img), "-o", str(tmp_path / "o"), "--model", str(no_cfw_model), "--steps", "1",
                 "--fidelity-sweep", "0,1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "--fidelity-sweep needs a model with CFW" in err and "--cfw" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    code = main(["restore", str(img), "-o", str(tmp_path / "o"), "--model", str(no_cfw_model), "--steps", "1",
                 "--fidelity", "0.8", "-q"])
    err = capsys.readouterr().err
    assert code == 0 and "no CFW, so --fidelity has no effect" in err


def test_readme_says_which_torch_build_setup_installs():
    """The set-up installs what pip's index offers for torch==2.13.0; the README must not promise a CPU build."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    setup = (root / "scripts" / "setup.sh").read_text()
    assert "with the CPU build of torch" not in readme
    assert "TORCH_PIP_ARGS" in readme and "${TORCH_PIP_ARGS:-}" in setup
    assert "CUDA build" in readme and "CPU-only machine" in readme
