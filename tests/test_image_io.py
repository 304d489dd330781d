"""Tests of stablesr.image_io on a corpus of image files built in tmp_path (plus scikit-image's bundled photos)."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from stablesr import image_io, image_processor
from stablesr.image_io import ImageLoadError, iter_image_files, load_image, save_image
from stablesr.image_processor import as_pil_list, from_tensor, to_tensor, upscale_alpha

skdata = pytest.importorskip("skimage.data")

# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


@functools.cache
def _bundled(name: str) -> np.ndarray:
    arr = getattr(skdata, name)()
    arr.flags.writeable = False
    return arr


def _photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A bundled scikit-image photo as uint8 (H, W, 3) or (H, W), optionally resized to (W, H)."""
    arr = _bundled(name)
    if size is not None:
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR))
    return arr


def _asym(h: int = 48, w: int = 64) -> np.ndarray:
    """A (H, W, 3) uint8 image of 16-px blocks whose every flip/rotation differs (JPEG-friendly: flat blocks)."""
    ys, xs = np.mgrid[0:h, 0:w] // 16
    arr = np.stack([(ys * 80) % 256, (xs * 60) % 256, ((ys * 3 + xs) * 37) % 256], axis=-1).astype(np.uint8)
    arr[:16, :16] = (255, 255, 255)  # a marker in one corner only
    return arr


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A minimal PNG written by hand (for what Pillow cannot write: 16-bit RGB, absurd sizes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"")
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _same_profile(a: bytes, b: bytes) -> bool:
    """ICC profiles equal but for the header's creation time (bytes 24-35) and profile ID (84-99): LittleCMS stamps
    the current time into profiles it creates, so two built in different seconds differ there."""
    def strip(p: bytes) -> bytes:
        return p[:24] + p[36:84] + p[100:]

    return a is not None and b is not None and len(a) == len(b) and strip(a) == strip(b)


def _cmyk_icc() -> bytes:
    """A minimal hand-made ICC v2 CMYK output profile (lut16 A2B0, CMYK -> Lab on a 2-point grid)."""
    from skimage.color import rgb2lab

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    grid = []
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        lab = rgb2lab(np.array([[[(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)]]], dtype=np.float64))
        light, a, b = lab[0, 0]
        grid += [round(light / 100 * 0xFF00), round((a + 128) * 256), round((b + 128) * 256)]
    lut = b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut += struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 0xFFFF] * 4)
    lut += struct.pack(f">{len(grid)}H", *grid) + struct.pack(">6H", *[0, 0xFFFF] * 3)
    desc = b"desc" + bytes(4) + struct.pack(">I", 10) + b"test CMYK\0" + bytes(78)
    d50 = s15(0.9642) + s15(1.0) + s15(0.8249)
    tags = [
        (b"desc", desc),
        (b"wtpt", b"XYZ " + bytes(4) + d50),
        (b"cprt", b"text" + bytes(4) + b"none\0"),
        (b"A2B0", lut),
    ]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    header = struct.pack(">I", offset + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
    header = (header + bytes(12) + b"acsp" + bytes(28) + d50).ljust(128, b"\0")
    return header + struct.pack(">I", len(tags)) + table + data


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "stablesr-test"  # Make, to check other tags survive
    return exif.tobytes()


def _orientation_of(exif_bytes: bytes | None) -> int | None:
    if exif_bytes is None:
        return None
    exif = Image.Exif()
    exif.load(exif_bytes)
    return exif.get(0x0112)


# Display = f(stored), written from the EXIF specification's wording, independently of Pillow's transpose table.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # mirror horizontal
    3: lambda a: a[::-1, ::-1],  # rotate 180
    4: lambda a: a[::-1],  # mirror vertical
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirror horizontal and rotate 270 CW
    6: lambda a: np.rot90(a, -1),  # rotate 90 CW
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirror horizontal and rotate 90 CW
    8: lambda a: np.rot90(a, 1),  # rotate 270 CW
}


def _rgb(loaded) -> np.ndarray:
    assert loaded.rgb.mode == "RGB"
    return np.asarray(loaded.rgb)


# ----------------------------------------------------------------------------------------------------------------------
# Good corpus: each builder writes a file and returns (path, check(loaded))
# ----------------------------------------------------------------------------------------------------------------------


def _case_rgb_png(tmp):
    ref = _photo("astronaut")
    Image.fromarray(ref).save(p := tmp / "astronaut.png")

    def check(li):
        assert (li.mode, li.format, li.bit_depth, li.alpha) == ("RGB", "PNG", 8, None)
        np.testing.assert_array_equal(_rgb(li), ref)

    return p, check


def _case_rgba_png(tmp):
    ref = _photo("coffee", (96, 64))
    a = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1))
    Image.fromarray(np.dstack([ref, a]), "RGBA").save(p := tmp / "rgba.png")

    def check(li):
        assert li.mode == "RGBA" and li.alpha.mode == "L"
        np.testing.assert_array_equal(_rgb(li), ref)
        np.testing.assert_array_equal(np.asarray(li.alpha), a)

    return p, check


def _case_la_png(tmp):
    g = _photo("camera", (80, 60))
    a = np.full_like(g, 200)
    Image.fromarray(np.dstack([g, a]), "LA").save(p := tmp / "la.png")

    def check(li):
        assert li.mode == "LA"
        np.testing.assert_array_equal(_rgb(li), np.dstack([g] * 3))
        np.testing.assert_array_equal(np.asarray(li.alpha), a)

    return p, check


def _case_l_png(tmp):
    g = _photo("camera")
    Image.fromarray(g).save(p := tmp / "camera.png")

    def check(li):
        assert li.mode == "L" and li.alpha is None
        np.testing.assert_array_equal(_rgb(li), np.dstack([g] * 3))

    return p, check


def _case_1bit_png(tmp):
    bits = _photo("camera", (64, 48)) > 128
    Image.fromarray(bits).save(p := tmp / "bilevel.png")

    def check(li):
        assert li.mode == "1"
        np.testing.assert_array_equal(_rgb(li)[..., 0], np.where(bits, 255, 0))

    return p, check


def _case_p_png(tmp):
    ref = _photo("chelsea", (90, 60))
    Image.fromarray(ref).quantize(16).save(p := tmp / "palette.png")

    def check(li):
        assert li.mode == "P" and li.alpha is None
        assert np.abs(_rgb(li).astype(int) - ref).mean() < 20  # 16-colour quantisation

    return p, check


def _case_p_png_transparency(tmp):
    idx = (np.arange(40 * 30).reshape(30, 40) % 4).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    im.save(p := tmp / "palette_trns.png", transparency=3)

    def check(li):
        assert li.mode == "P" and li.alpha is not None
        np.testing.assert_array_equal(np.asarray(li.alpha), np.where(idx == 3, 0, 255))
        assert tuple(_rgb(li)[0, 1]) == (0, 255, 0)

    return p, check


def _case_gray16_png(tmp):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(values).save(p := tmp / "gray16.png")

    def check(li):
        assert li.bit_depth == 16 and li.mode.startswith("I")
        expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        np.testing.assert_array_equal(_rgb(li)[..., 1], expected)
        assert _rgb(li)[0, 3, 0] == 255 and _rgb(li)[0, 2, 0] == 128

    return p, check


def _case_rgb16_png(tmp):
    values = (np.arange(4 * 3 * 3).reshape(3, 4, 3) * 1800 + 17).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    (p := tmp / "rgb16.png").write_bytes(_raw_png(4, 3, 16, 2, rows))

    def check(li):
        # Pillow decodes 16-bit RGB to 8 bits (high byte); within one level of exact rounding.
        assert li.bit_depth == 16
        assert np.abs(_rgb(li).astype(int) - np.floor(values / 257.0 + 0.5)).max() <= 1

    return p, check


def _case_cmyk_jpeg(tmp):
    ref = _photo("chelsea", (120, 80))
    Image.fromarray(ref).convert("CMYK").save(p := tmp / "cmyk.jpg", quality=95)

    def check(li):
        assert li.mode == "CMYK" and li.icc_profile is None
        assert np.abs(_rgb(li).astype(int) - ref).mean() < 4

    return p, check


def _case_cmyk_jpeg_wrong_icc(tmp):
    ref = _photo("chelsea", (120, 80))
    Image.fromarray(ref).convert("CMYK").save(p := tmp / "cmyk_rgbicc.jpg", quality=95, icc_profile=_srgb_icc())

    def check(li):  # an RGB profile cannot describe CMYK data: plain conversion, profile not passed on
        assert li.mode == "CMYK" and li.icc_profile is None
        assert np.abs(_rgb(li).astype(int) - ref).mean() < 4

    return p, check


def _case_cmyk_jpeg_icc(tmp):
    patches = [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0), (0, 255, 0, 0)]  # white, black, cyan, magenta
    im = Image.new("CMYK", (64, 16))
    for i, colour in enumerate(patches):
        im.paste(colour, (16 * i, 0, 16 * i + 16, 16))
    im.save(p := tmp / "cmyk_icc.jpg", quality=95, icc_profile=_cmyk_icc())

    def check(li):  # colour-managed into sRGB, and the sRGB profile handed on instead of the CMYK one
        assert li.mode == "CMYK" and _same_profile(li.icc_profile, _srgb_icc())
        white, black, cyan, magenta = (_rgb(li)[8, 16 * i + 8].astype(int) for i in range(4))
        assert white.min() >= 245 and black.max() <= 10
        assert cyan[0] < 110 and cyan[1:].min() > 200 and magenta[1] < 110 and magenta[[0, 2]].min() > 200

    return p, check


def _case_icc_png(tmp):
    icc = _srgb_icc()
    Image.fromarray(_photo("coffee", (60, 40))).save(p := tmp / "icc.png", icc_profile=icc)

    def check(li):
        assert li.icc_profile == icc

    return p, check


def _case_animated_gif(tmp):
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(p := tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)

    def check(li):
        assert li.format == "GIF"
        assert tuple(_rgb(li)[5, 5]) == (255, 0, 0)

    return p, check


def _case_multipage_tiff(tmp):
    pages = [Image.fromarray(_photo("astronaut", (32, 32))), Image.new("RGB", (32, 32), (0, 0, 255))]
    pages[0].save(p := tmp / "pages.tiff", save_all=True, append_images=pages[1:])

    def check(li):
        assert li.format == "TIFF"
        np.testing.assert_array_equal(_rgb(li), np.asarray(pages[0]))

    return p, check


def _case_webp(tmp):
    ref = _photo("coffee", (90, 60))
    Image.fromarray(ref).save(p := tmp / "coffee.webp", lossless=True)

    def check(li):
        assert li.format == "WEBP"
        np.testing.assert_array_equal(_rgb(li), ref)

    return p, check


def _case_bmp(tmp):
    ref = _photo("chelsea", (50, 30))
    Image.fromarray(ref).save(p := tmp / "chelsea.bmp")

    def check(li):
        assert li.format == "BMP"
        np.testing.assert_array_equal(_rgb(li), ref)

    return p, check


def _case_tiff(tmp):
    ref = _photo("astronaut", (64, 64))
    Image.fromarray(ref).save(p := tmp / "astronaut.tif")

    def check(li):
        assert li.format == "TIFF" and li.bit_depth == 8
        np.testing.assert_array_equal(_rgb(li), ref)

    return p, check


def _case_float_tiff(tmp):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, "F").save(p := tmp / "float.tif")

    def check(li):
        assert li.mode == "F" and li.bit_depth == 16
        np.testing.assert_array_equal(_rgb(li)[0, :, 0], [0, 64, 128, 255])

    return p, check


def _case_lab_tiff(tmp):
    Image.new("LAB", (4, 4), (255, 128, 128)).save(p := tmp / "lab.tif")  # L=100, a=b=0: white

    def check(li):
        assert li.mode == "LAB" and li.icc_profile is not None
        assert _rgb(li).min() >= 250

    return p, check


def _case_jpeg_photo(tmp):
    ref = _photo("astronaut")
    Image.fromarray(ref).save(p := tmp / "astronaut.JPG", quality=95)

    def check(li):
        assert li.format == "JPEG" and li.exif is None and li.rgb.size == (512, 512)
        assert np.abs(_rgb(li).astype(int) - ref).mean() < 3

    return p, check


GOOD_CASES = {
    "rgb_png": _case_rgb_png,
    "rgba_png": _case_rgba_png,
    "la_png": _case_la_png,
    "l_png": _case_l_png,
    "1bit_png": _case_1bit_png,
    "p_png": _case_p_png,
    "p_png_transparency": _case_p_png_transparency,
    "gray16_png": _case_gray16_png,
    "rgb16_png": _case_rgb16_png,
    "cmyk_jpeg": _case_cmyk_jpeg,
    "cmyk_jpeg_wrong_icc": _case_cmyk_jpeg_wrong_icc,
    "cmyk_jpeg_icc": _case_cmyk_jpeg_icc,
    "icc_png": _case_icc_png,
    "animated_gif": _case_animated_gif,
    "multipage_tiff": _case_multipage_tiff,
    "webp": _case_webp,
    "bmp": _case_bmp,
    "tiff": _case_tiff,
    "float_tiff": _case_float_tiff,
    "lab_tiff": _case_lab_tiff,
    "jpeg_photo": _case_jpeg_photo,
}


@pytest.mark.parametrize("name", list(GOOD_CASES))
def test_load_good_corpus(name, tmp_path, caplog):
    path, check = GOOD_CASES[name](tmp_path)
    with caplog.at_level(logging.WARNING, logger="stablesr.image_io"):
        loaded = load_image(path)
    assert loaded.path == path and loaded.rgb.mode == "RGB"
    if loaded.alpha is not None:
        assert loaded.alpha.mode == "L" and loaded.alpha.size == loaded.rgb.size
    check(loaded)
    multi = name in ("animated_gif", "multipage_tiff")
    assert any("first frame" in r.getMessage() for r in caplog.records) == multi


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation(tmp_path, orientation, suffix):
    stored = _asym()
    path = tmp_path / f"orient{orientation}{suffix}"
    Image.fromarray(stored).save(path, exif=_exif_with_orientation(orientation), quality=95)
    loaded = load_image(path)
    expected = _ORIENT[orientation](stored)
    got = _rgb(loaded)
    assert got.shape == expected.shape
    if suffix == ".png":
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.abs(got.astype(int) - expected).mean() < 3
    assert _orientation_of(loaded.exif) == 1  # reset, so viewers do not rotate a second time
    exif = Image.Exif()
    exif.load(loaded.exif)
    assert exif[0x010F] == "stablesr-test"


# ----------------------------------------------------------------------------------------------------------------------
# Bad corpus: every one raises ImageLoadError naming the file
# ----------------------------------------------------------------------------------------------------------------------


def _bad_zero_bytes(tmp):
    (p := tmp / "empty.png").write_bytes(b"")
    return p, "empty"


def _bad_text_png(tmp):
    (p := tmp / "notes.png").write_text("this is not an image\n" * 10)
    return p, "text file"


def _bad_garbage(tmp):
    (p := tmp / "garbage.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p, "not a recognised image"


def _bad_truncated_png(tmp):
    Image.fromarray(_photo("coffee")).save(full := tmp / "full.png")
    data = full.read_bytes()
    (p := tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    return p, "truncated"


def _bad_truncated_jpeg(tmp):
    Image.fromarray(_photo("astronaut")).save(full := tmp / "full.jpg", quality=95)
    data = full.read_bytes()
    (p := tmp / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return p, "truncated"


def _bad_bomb_header(tmp):
    (p := tmp / "bomb.png").write_bytes(_raw_png(200_000, 200_000, 8, 2))
    return p, "max_pixels"


def _bad_directory(tmp):
    (p := tmp / "folder.png").mkdir()
    return p, "directory"


def _bad_missing(tmp):
    return tmp / "missing.png", "no such file"


def _bad_corrupt_idat(tmp):
    Image.fromarray(_photo("chelsea", (64, 48))).save(full := tmp / "ok.png")
    data = bytearray(full.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = b"\xff" * 40
    (p := tmp / "corrupt.png").write_bytes(bytes(data))
    return p, "corrupt"


BAD_CASES = {
    "zero_bytes": _bad_zero_bytes,
    "text_as_png": _bad_text_png,
    "garbage": _bad_garbage,
    "truncated_png": _bad_truncated_png,
    "truncated_jpeg": _bad_truncated_jpeg,
    "bomb_header": _bad_bomb_header,
    "directory": _bad_directory,
    "missing": _bad_missing,
    "corrupt_idat": _bad_corrupt_idat,
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_load_bad_corpus(name, tmp_path):
    path, needle = BAD_CASES[name](tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    msg = str(info.value)
    assert path.name in msg and needle in msg
    assert isinstance(info.value, ValueError) and info.value.path == path


def test_max_pixels_argument(tmp_path):
    Image.fromarray(_photo("camera")).save(path := tmp_path / "camera.png")
    with pytest.raises(ImageLoadError, match=r"camera\.png.*262144 pixels exceeds the limit of 1000.*max_pixels"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=512 * 512).rgb.size == (512, 512)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is restored


def test_unsupported_mode(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(path := tmp_path / "odd.png")
    monkeypatch.setattr(image_processor, "SUPPORTED_MODES", frozenset({"L"}))
    with pytest.raises(ImageLoadError, match=r"odd\.png.*unsupported image mode 'RGB'"):
        load_image(path)


def test_truncated_flag_is_ignored(tmp_path, monkeypatch):
    _bad_truncated_jpeg(tmp_path)
    monkeypatch.setattr(image_io.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(tmp_path / "truncated.jpg")
    assert image_io.ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_error_pickles(tmp_path):
    import pickle

    err = pickle.loads(pickle.dumps(ImageLoadError(tmp_path / "x.png", "broken", "fix it")))
    assert str(err) == f"cannot load image '{tmp_path / 'x.png'}': broken. Fix: fix it"


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_save_atomic_and_no_overwrite(tmp_path):
    img = Image.fromarray(_photo("chelsea", (64, 48)))
    target = tmp_path / "deep" / "er" / "out.png"
    assert save_image(img, target) == target  # creates parent folders
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_image(Image.new("RGB", (8, 8)), target)
    assert target.read_bytes() == before  # untouched
    save_image(Image.new("RGB", (8, 8)), target, overwrite=True)
    assert Image.open(target).size == (8, 8)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_save_failure_cleans_up(tmp_path, monkeypatch):
    def boom(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".bmp"])
def test_save_alpha_needs_alpha_format(tmp_path, suffix):
    with pytest.raises(ValueError, match=r"\.png or \.webp"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / f"a{suffix}", alpha=Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match=r"\.png or \.webp"):
        save_image(Image.new("RGBA", (8, 8)), tmp_path / f"b{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_bad_suffix_and_alpha_size(tmp_path):
    with pytest.raises(ValueError, match="unsupported file extension"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.gif")
    with pytest.raises(ValueError, match="upscale_alpha"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png", alpha=Image.new("L", (4, 4)))


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
def test_alpha_round_trip(tmp_path, suffix):
    path, _ = _case_rgba_png(tmp_path)
    loaded = load_image(path)
    size = (loaded.rgb.width * 2, loaded.rgb.height * 2)
    big = loaded.rgb.resize(size, Image.Resampling.BICUBIC)
    big_alpha = upscale_alpha(loaded.alpha, size)
    assert big_alpha.mode == "L" and big_alpha.size == size
    out = save_image(big, tmp_path / f"out{suffix}", alpha=big_alpha, icc_profile=None)
    back = load_image(out)
    assert back.alpha is not None and back.rgb.size == size
    if suffix != ".webp":  # WebP's default encoding is lossy
        np.testing.assert_array_equal(np.asarray(back.alpha), np.asarray(big_alpha))
        np.testing.assert_array_equal(_rgb(back), np.asarray(big))


def test_upscale_alpha_clamped():
    alpha = Image.fromarray(np.where(np.arange(64).reshape(8, 8) % 3, 255, 0).astype(np.uint8))
    big = np.asarray(upscale_alpha(alpha, (32, 32)))
    assert big.dtype == np.uint8 and big.shape == (32, 32) and big.min() == 0 and big.max() == 255
    with pytest.raises(ValueError, match="mode 'L'"):
        upscale_alpha(Image.new("RGB", (4, 4)), (8, 8))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tiff"])
def test_save_keeps_icc_and_exif(tmp_path, suffix):
    icc = _srgb_icc()
    out = save_image(
        Image.fromarray(_asym()), tmp_path / f"meta{suffix}", icc_profile=icc, exif=_exif_with_orientation(1)
    )
    back = load_image(out)
    assert back.icc_profile == icc
    with Image.open(out) as im:
        assert im.getexif().get(0x010F) == "stablesr-test"


def test_save_scales_16bit_for_8bit_formats(tmp_path):
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    back = load_image(save_image(img, tmp_path / "g.bmp"))
    np.testing.assert_array_equal(_rgb(back)[0, :, 0], [0, 128, 255])
    assert load_image(save_image(img, tmp_path / "g.png")).bit_depth == 16  # PNG keeps the 16 bits


def test_save_drops_icc_of_wrong_colour_space(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="stablesr.image_io"):
        out = save_image(Image.new("L", (8, 8)), tmp_path / "g.png", icc_profile=_srgb_icc())
    assert "does not match" in caplog.text
    with Image.open(out) as im:
        assert "icc_profile" not in im.info


# ----------------------------------------------------------------------------------------------------------------------
# Tensors and in-memory inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_tensor_round_trip_exact():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = Image.fromarray(np.dstack([values, values[::-1], values.T]))
    t = to_tensor(rgb)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    (back,) = from_tensor(t)
    assert back.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(back), np.asarray(rgb))
    photo = Image.fromarray(_photo("coffee", (64, 48)))
    np.testing.assert_array_equal(np.asarray(from_tensor(to_tensor(photo))[0]), np.asarray(photo))
    gray, rgba = Image.fromarray(values), Image.fromarray(np.dstack([values] * 4), "RGBA")
    assert to_tensor(gray).shape[1] == 1 and from_tensor(to_tensor(gray))[0].mode == "L"
    np.testing.assert_array_equal(np.asarray(from_tensor(to_tensor(rgba))[0]), np.asarray(rgba))


def test_from_tensor_rounding_and_clamp():
    t = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    imgs = from_tensor(t)
    assert len(imgs) == 2
    assert list(np.asarray(imgs[1])[0, :, 0]) == [0, 0, 128, 255, 255]  # 0.0 -> 127.5 rounds half up to 128
    with pytest.raises(ValueError, match="NaN"):
        from_tensor(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        from_tensor(torch.zeros(1, 5, 2, 2))


_GRAD = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize(
    ("value", "count", "mode", "first_px"),
    [
        (Image.new("L", (4, 3), 7), 1, "RGB", (7, 7, 7)),
        (Image.new("LA", (4, 3), (7, 9)), 1, "RGBA", (7, 7, 7, 9)),
        ([Image.new("RGB", (4, 3), (1, 2, 3)), Image.new("P", (4, 3))], 2, "RGB", (1, 2, 3)),
        (np.full((3, 4), 9, np.uint8), 1, "RGB", (9, 9, 9)),
        (np.full((3, 4, 1), 9, np.uint8), 1, "RGB", (9, 9, 9)),
        (np.full((3, 4, 3), 65535, np.uint16), 1, "RGB", (255, 255, 255)),
        (np.full((3, 4, 4), 0.5, np.float32), 1, "RGBA", (128, 128, 128, 128)),
        (np.zeros((5, 3, 4, 3), np.float64), 5, "RGB", (0, 0, 0)),
        (np.dstack([_GRAD] * 3), 1, "RGB", (0, 0, 0)),
        (torch.ones(3, 3, 4), 1, "RGB", (255, 255, 255)),
        (torch.full((2, 4, 3, 4), 0.5, dtype=torch.bfloat16), 2, "RGBA", (128, 128, 128, 128)),
        (torch.full((1, 1, 3, 4), 200, dtype=torch.uint8), 1, "RGB", (200, 200, 200)),
        ([torch.zeros(3, 3, 4), np.zeros((3, 4, 3), np.uint8)], 2, "RGB", (0, 0, 0)),
    ],
)
def test_as_pil_list(value, count, mode, first_px):
    imgs = as_pil_list(value)
    assert len(imgs) == count
    assert all(im.mode == mode and im.size == (4, 3) for im in imgs)
    assert imgs[0].getpixel((0, 0)) == first_px


def test_as_pil_list_float_rounding():
    (img,) = as_pil_list(np.dstack([_GRAD] * 3))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.floor(_GRAD * 255 + 0.5))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.zeros((3, 32, 32), np.uint8), r"channels-first.*transpose\(1, 2, 0\)"),
        (np.zeros((2, 3, 8, 8), np.float32), r"channels-first"),
        (np.zeros((2, 2, 2, 2, 3), np.uint8), r"must be"),
        (np.full((4, 4, 3), -0.5, np.float32), r"\[0, 1\].*\[-1, 1\]"),
        (np.full((4, 4, 3), 200.0, np.float32), r"0\.\.255"),
        (np.zeros((4, 4, 3), np.int64), r"unsupported dtype int64"),
        (np.zeros((0, 4, 3), np.uint8), r"empty"),
        (np.full((4, 4), np.nan, np.float32), r"NaN"),
        (torch.zeros(32, 32, 3), r"channels-last.*permute\(2, 0, 1\)"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), r"unsupported dtype"),
        (torch.full((3, 4, 4), 2.0), r"\[0, 1\]"),
        ([], r"empty list"),
    ],
)
def test_as_pil_list_errors(value, match):
    with pytest.raises(ValueError, match=match):
        as_pil_list(value)


def test_as_pil_list_type_error():
    with pytest.raises(TypeError, match="unsupported image input"):
        as_pil_list("photo.png")


# ----------------------------------------------------------------------------------------------------------------------
# Input expansion
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ["a.png", "B.JPG", "c.webp", "d.TIFF", "e.gif", "f.bmp", "g.jpeg", "h.tif", "sub/deep.png"]:
        (folder / name).write_bytes(b"x")
    for name in ["notes.txt", "model.ckpt", ".hidden.png", "._a.png"]:
        (folder / name).write_bytes(b"x")
    return folder


def test_iter_folder(mixed_folder):
    top = ["B.JPG", "a.png", "c.webp", "d.TIFF", "e.gif", "f.bmp", "g.jpeg", "h.tif"]
    assert [p.name for p in iter_image_files([str(mixed_folder)])] == top
    deep = iter_image_files([mixed_folder], recursive=True)
    assert mixed_folder / "sub" / "deep.png" in deep and len(deep) == len(top) + 1


def test_iter_glob_dedup_and_explicit(mixed_folder):
    pattern = str(mixed_folder / "*.png")
    got = iter_image_files([pattern, str(mixed_folder / "a.png"), str(mixed_folder), str(mixed_folder / "notes.txt")])
    names = [p.name for p in got]
    assert names.count("a.png") == 1 and "notes.txt" in names  # explicit file kept whatever its extension
    assert ".hidden.png" not in names and "deep.png" not in names
    assert names == sorted(names, key=lambda n: str(mixed_folder / n))
    assert [p.name for p in iter_image_files(str(mixed_folder / "**" / "*.png"), recursive=True)] == [
        "a.png",
        "deep.png",
    ]


@pytest.mark.parametrize("what", ["missing", "glob", "glob_non_image", "empty_folder"])
def test_iter_errors(tmp_path, mixed_folder, what):
    (tmp_path / "empty").mkdir()
    arg = {
        "missing": str(tmp_path / "nope.png"),
        "glob": str(tmp_path / "*.xyz"),
        "glob_non_image": str(mixed_folder / "*.txt"),
        "empty_folder": str(tmp_path / "empty"),
    }[what]
    with pytest.raises(FileNotFoundError) as info:
        iter_image_files([arg])
    assert arg in str(info.value)


def test_loader_reports_bad_file_from_iter(mixed_folder):
    (bad,) = iter_image_files([str(mixed_folder / "notes.txt")])
    with pytest.raises(ImageLoadError, match="notes.txt"):
        load_image(bad)
    assert os.path.exists(bad)
