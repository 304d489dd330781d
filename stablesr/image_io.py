"""Image input/output shared by the StableSR pipeline and the command line.

Everything that touches image files or converts between image containers lives here:

- [`load_image`] reads one file robustly (any common Pillow mode, EXIF orientation, ICC profiles, 16-bit sources,
  CMYK JPEGs, multi-frame files) and turns every failure into an [`ImageLoadError`] that names the file, the problem
  and, when there is one, the fix. [`decode_image_bytes`] decodes a file held in memory (a tar shard member) through
  the same code.
- [`save_image`] writes atomically (temporary file in the same folder, `fsync`, `os.replace`), never overwrites by
  accident and re-attaches alpha, ICC profile and EXIF where the format can hold them.
- [`iter_image_files`] expands files, folders and glob patterns into the list of images to process.

Pillow's global switches are respected: `ImageFile.LOAD_TRUNCATED_IMAGES` is never turned on (a truncated file is an
error, never a silently grey-padded image), and the decompression-bomb guard is this module's own `max_pixels` limit
(default [`MAX_IMAGE_PIXELS`]) rather than Pillow's process-wide one.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import struct
import threading
from collections.abc import Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from .file_utils import atomic_write
from .image_processor import ALPHA_MODES, HIGH_DEPTH_MODES, high_depth_to_l, icc_color_space, split_rgb_alpha

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "SAVE_EXTENSIONS",
    "ImageLoadError",
    "LoadedImage",
    "decode_image_bytes",
    "iter_image_files",
    "load_image",
    "save_image",
]

MAX_IMAGE_PIXELS: int = 16384 * 16384
"""Default pixel limit (width * height) of [`load_image`]; larger files are refused as possible decompression bombs.
Raise it per call with `load_image(path, max_pixels=...)` or globally by assigning this module attribute."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""Lower-case suffixes that [`iter_image_files`] picks up from folders and glob patterns."""

_SAVE_FORMATS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
SAVE_EXTENSIONS: frozenset[str] = frozenset(_SAVE_FORMATS)
"""Suffixes [`save_image`] can write; the format is picked from the suffix."""

_ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
_ICC_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})
_EXIF_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})
# Modes written as they are; anything else is converted to RGB (or RGBA when it carries alpha) first.
_SAVE_MODES: dict[str, frozenset[str]] = {
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}),
    "JPEG": frozenset({"L", "RGB", "CMYK"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
    "TIFF": frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"}),
    "BMP": frozenset({"1", "L", "P", "RGB"}),
}

# Raw modes with 16 bits per sample (Pillow decodes them to 8-bit modes); packed 16-bit pixels such as BMP's
# "BGR;16" (5-6-5) deliberately do not match.
_RAWMODE_16BIT = re.compile(r"(?:L|LA|RGB|RGBA|RGBX|CMYK|YCbCr|I);16[BLN]?S?")
_GLOB_MAGIC = re.compile(r"[*?[]")
_ORIENTATION_TAG = 0x0112
_EXIF_PREFIX = b"Exif\x00\x00"
_JPEG_QUALITY = 95
_WEBP_QUALITY = 95

# Guards the short windows in which Pillow's process-wide switches are changed (see `_pillow_globals`).
_PIL_GLOBALS_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image file could not be loaded.

    The message always names the file and the problem, plus the fix when there is one, e.g.
    `cannot load image 'photo.png': the file is empty (0 bytes). Fix: re-export or re-download it.`

    Args:
        path (`str` or `os.PathLike`): The file that failed.
        problem (`str`): What is wrong with it.
        fix (`str`, *optional*): What the user can do about it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str | None = None):
        super().__init__(os.fspath(path), problem, fix)
        self.path = Path(path)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        msg = f"cannot load image '{self.path}': {self.problem}"
        if self.fix:
            msg += f". Fix: {self.fix}"
        return msg


@dataclass
class LoadedImage:
    """An image file decoded by [`load_image`], ready for the pipeline.

    Attributes:
        rgb (`PIL.Image.Image`): Mode `"RGB"`, 8 bits per channel, EXIF orientation already applied (upright).
        alpha (`PIL.Image.Image` or `None`): Mode `"L"` transparency of the same size as `rgb` (0 = transparent), or
            `None` when the file has none. Restore it separately with [`upscale_alpha`] + [`save_image`].
        mode (`str`): The Pillow mode of the file as decoded (e.g. `"P"`, `"I;16"`, `"CMYK"`).
        icc_profile (`bytes` or `None`): ICC profile describing `rgb`'s colours: the file's own RGB profile, the sRGB
            profile when a CMYK/Lab file was colour-managed into sRGB, or `None` (treat as sRGB).
        exif (`bytes` or `None`): The file's EXIF block (`b"Exif\\x00\\x00"` + TIFF structure) with the orientation
            tag reset to 1, because the pixels are already upright. `None` when the file has no EXIF (TIFF files keep
            their tags in the image structure itself; those are not carried over).
        bit_depth (`int`): 8, or 16 when the file stores more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer
            or float TIFF). `rgb` is always 8-bit.
        path (`pathlib.Path`): The file that was read.
        format (`str` or `None`): Pillow's format name, e.g. `"PNG"`, `"JPEG"`, `"MPO"`.
    """

    rgb: Image.Image
    alpha: Image.Image | None
    mode: str
    icc_profile: bytes | None
    exif: bytes | None
    bit_depth: int
    path: Path
    format: str | None

    @property
    def size(self) -> tuple[int, int]:
        """`(width, height)` of the upright image."""
        return self.rgb.size


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def _pillow_globals(**values: Any):
    """Temporarily set module attributes of PIL.Image / PIL.ImageFile (`MAX_IMAGE_PIXELS`, `LOAD_TRUNCATED_IMAGES`).

    Pillow only offers these as process-wide switches. They are changed for as short a time as possible (header
    parsing) under a lock so that concurrent `load_image` calls cannot interleave their changes.
    """
    targets = {"MAX_IMAGE_PIXELS": Image, "LOAD_TRUNCATED_IMAGES": ImageFile}
    with _PIL_GLOBALS_LOCK:
        saved = {name: getattr(targets[name], name) for name in values}
        try:
            for name, value in values.items():
                setattr(targets[name], name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(targets[name], name, value)


def _bomb_fix(limit: int, needed: int | None = None) -> str:
    target = f"max_pixels={needed}" if needed else f"max_pixels larger than {limit}"
    return (
        f"if you trust this file, raise the limit with load_image(path, {target}) or set "
        "stablesr.image_io.MAX_IMAGE_PIXELS (CLI: --max-pixels); otherwise downscale it first"
    )


def _sniff_problem(path: Path, data: bytes | None = None) -> tuple[str, str | None]:
    """Explain why Pillow could not identify a file (or the in-memory `data` of one), from its first bytes."""
    if data is not None:
        head = data[:512]
    else:
        try:
            with open(path, "rb") as fh:
                head = fh.read(512)
        except OSError:
            head = b""
    fix = "check that it really is an image (re-export it as PNG or JPEG)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc", b"ftypmsf1"):
        return (
            "it is a HEIF/AVIF file, which this Pillow build cannot decode",
            "convert it to PNG/JPEG, or install a Pillow plugin such as pillow-heif",
        )
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return "it is a text file, not an image (Pillow cannot identify it)", fix
    return "not a recognised image format or the data is corrupt (Pillow cannot identify it)", fix


def _rawmodes(im: Image.Image) -> list[str]:
    modes = []
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, str):
            modes.append(args)
        elif isinstance(args, tuple) and args and isinstance(args[0], str):
            modes.append(args[0])
    return modes


def _source_bit_depth(im: Image.Image) -> int:
    """8 or 16 (= more than 8 bits per sample); must be called before `load()`, which clears the tile list."""
    if im.mode in HIGH_DEPTH_MODES:
        return 16
    if any(_RAWMODE_16BIT.fullmatch(rawmode) for rawmode in _rawmodes(im)):
        return 16
    tags = getattr(im, "tag_v2", None)  # TIFF
    if tags is not None:
        bits = tags.get(258)  # BitsPerSample
        bits = bits if isinstance(bits, tuple) else (bits,)
        if any(isinstance(b, int) and b > 8 for b in bits):
            return 16
    return 8



def _reset_orientation_raw(data: bytes) -> bytes | None:
    """Set the IFD0 orientation tag of a raw EXIF block to 1 in place, keeping every other byte (maker notes use
    absolute offsets, which a re-serialisation could break). Returns `None` when the block cannot be patched."""
    body = data[len(_EXIF_PREFIX) :] if data.startswith(_EXIF_PREFIX) else data
    try:
        order = {b"II": "<", b"MM": ">"}[body[:2]]
        if struct.unpack(order + "H", body[2:4])[0] != 42:
            return None
        ifd = struct.unpack(order + "I", body[4:8])[0]
        (count,) = struct.unpack(order + "H", body[ifd : ifd + 2])
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, typ, n = struct.unpack(order + "HHI", body[entry : entry + 8])
            if tag == _ORIENTATION_TAG:
                if typ != 3 or n != 1:  # SHORT, one value
                    return None
                body = body[: entry + 8] + struct.pack(order + "H", 1) + b"\x00\x00" + body[entry + 12 :]
                break
    except (KeyError, struct.error):
        return None
    return _EXIF_PREFIX + body


def _upright_exif(raw_exif: bytes | None, upright: Image.Image, label: str) -> bytes | None:
    """The EXIF block to hand on, with orientation 1 (the pixels are already transposed)."""
    has_text_exif = "Raw profile type exif" in upright.info
    if raw_exif is None and not has_text_exif:
        return None
    if raw_exif is not None:
        patched = _reset_orientation_raw(raw_exif)
        if patched is not None:
            return patched
    try:
        exif = upright.getexif()
        if _ORIENTATION_TAG in exif or raw_exif is not None:
            exif[_ORIENTATION_TAG] = 1
        return exif.tobytes() if len(exif) else None
    except Exception as e:  # malformed EXIF: better none than one that rotates the image a second time
        logger.warning("%s: dropping EXIF that could not be rewritten (%s)", label, e)
        return None


_warned_truncated_flag = False


def _decode(fh: IO[bytes], path: Path, limit: int, data: bytes | None = None) -> LoadedImage:
    """Decode an open image file (or a `BytesIO` of `data`) named `path` in messages; see [`load_image`]."""
    global _warned_truncated_flag
    label = str(path)
    try:
        # Pillow's own guard would refuse or warn at its smaller default limit; ours replaces it.
        with _pillow_globals(MAX_IMAGE_PIXELS=None):
            im = Image.open(fh)
    except UnidentifiedImageError as e:
        problem, fix = _sniff_problem(path, data)
        raise ImageLoadError(path, problem, fix) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"exceeds Pillow's pixel limit ({e})", _bomb_fix(limit)) from e
    except Exception as e:
        raise ImageLoadError(path, f"corrupt image header ({type(e).__name__}: {e})", "re-export it") from e

    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid image size {width}x{height}", "re-export it")
    if width * height > limit:
        raise ImageLoadError(
            path,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {limit} pixels "
            "(possible decompression bomb)",
            _bomb_fix(limit, width * height),
        )
    try:
        n_frames = getattr(im, "n_frames", 1) or 1
    except Exception as e:  # counting frames reads the whole file; a damaged later frame must not stop us here
        logger.debug("%s: could not count frames (%s)", label, e)
        n_frames = 1
        with suppress(Exception):
            im.seek(0)
    if n_frames > 1:
        if im.format == "MPO":
            logger.debug("%s: MPO file with %d images; using the first", label, n_frames)
        else:
            logger.warning("%s: %s file has %d frames; using only the first frame", label, im.format, n_frames)
    fmt = im.format
    bit_depth = _source_bit_depth(im)
    raw_exif = im.info.get("exif")
    raw_exif = bytes(raw_exif) if isinstance(raw_exif, (bytes, bytearray)) and raw_exif else None

    try:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Someone turned on Pillow's lenient mode process-wide; never let it hide a truncated input.
            if not _warned_truncated_flag:
                logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; load_image ignores it")
                _warned_truncated_flag = True
            with _pillow_globals(LOAD_TRUNCATED_IMAGES=False):
                im.load()
        else:
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"exceeds Pillow's pixel limit ({e})", _bomb_fix(limit)) from e
    except MemoryError as e:
        raise ImageLoadError(path, f"not enough memory to decode {width}x{height} pixels") from e
    except Exception as e:
        text = str(e)
        if "truncated" in text.lower() or isinstance(e, EOFError):
            problem = f"the file is truncated ({type(e).__name__}: {text})"
        else:
            problem = f"corrupt image data ({type(e).__name__}: {text})"
        raise ImageLoadError(path, problem, "re-download or re-export it; it cannot be decoded completely") from e

    mode = im.mode
    icc = im.info.get("icc_profile") or None
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception as e:
        logger.warning("%s: unreadable EXIF (%s); orientation not applied and EXIF dropped", label, e)
        upright, raw_exif = im, None
    exif = _upright_exif(raw_exif, upright, label)
    try:
        rgb, alpha, icc = split_rgb_alpha(upright, icc, label)
    except ValueError as e:
        raise ImageLoadError(path, str(e), "convert it to an 8-bit RGB PNG or JPEG") from e
    except Exception as e:
        raise ImageLoadError(path, f"mode {mode!r} could not be converted to RGB ({type(e).__name__}: {e})") from e

    return LoadedImage(
    rgb=rgb,
    alpha=alpha,
    mode=mode,
    icc_profile=icc,
    exif=exif,
    bit_depth=bit_depth,
    path=path,
    format=fmt,
    )


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> LoadedImage:
    """Load an image file as upright 8-bit RGB plus optional alpha, keeping its colour profile and EXIF.

    Handles the Pillow modes `1`, `L`, `LA`, `P` (with or without transparency), `RGB`, `RGBA`, `CMYK` (colour-managed
    into sRGB with the embedded ICC profile when LittleCMS is available, plain conversion otherwise), `I;16*` / `I`
    (16-bit grayscale, scaled with rounding: 65535 -> 255), `F`, `LAB`, `YCbCr`, `HSV`. The EXIF orientation (1-8) is
    applied. Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) give their first frame with a warning; the
    extra images of MPO files (phone JPEGs with depth maps or previews) are dropped silently.

    16-bit RGB(A) and gray+alpha files open in Pillow as 8-bit `RGB`/`RGBA` keeping the high byte of each sample
    (floor(v / 256), at most one level below exact rounding); `bit_depth` is still reported as 16.

    Args:
        path (`str` or `os.PathLike`): The file to read.
        max_pixels (`int`, *optional*): Refuse images with more than this many pixels (width * height) as possible
            decompression bombs, before decoding them. Defaults to [`MAX_IMAGE_PIXELS`] (16384 * 16384).

    Returns:
        [`LoadedImage`]: `rgb` (PIL `RGB`), `alpha` (PIL `L` or `None`), `mode`, `icc_profile`, `exif`, `bit_depth`,
        `path`, `format`.

    Raises:
        [`ImageLoadError`]: (a `ValueError`) naming the file, for a missing file, a directory, an empty file, a file
        that is not an image, corrupt or truncated data, an image above the pixel limit, or an unsupported mode.
    """
    path = Path(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if limit <= 0:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels!r}")

    if not path.exists():
        if path.is_symlink():
            raise ImageLoadError(path, "it is a broken symbolic link", "point the link at an existing file")
        raise ImageLoadError(path, "no such file", "check the path and its spelling")
    if path.is_dir():
        raise ImageLoadError(
            path, "it is a directory, not an image file", "pass a file, or expand the folder with iter_image_files"
        )
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    try:
        empty = path.stat().st_size == 0
        fh = None if empty else open(path, "rb")  # closed by the `with fh` below
    except PermissionError as e:
        raise ImageLoadError(path, "permission denied", "check the file's read permissions") from e
    except OSError as e:
        raise ImageLoadError(path, f"cannot be opened ({e.strerror or e})") from e
    if fh is None:
        raise ImageLoadError(path, "the file is empty (0 bytes)", "re-export or re-download it")

    with fh:
        return _decode(fh, path, limit)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: int | None = None) -> LoadedImage:
    """Decode an image file held in memory (e.g. a tar shard member) exactly as [`load_image`] decodes a file.

    Same modes, EXIF orientation, ICC handling, 16-bit scaling, pixel limit and errors as [`load_image`]; `name` only
    labels messages and becomes [`LoadedImage`]`.path`.

    Args:
        data (`bytes`): The encoded file (PNG, JPEG, ...).
        name (`str`): What to call it in messages, e.g. `"shard-000003.tar:000042.gt.png"`.
        max_pixels (`int`, *optional*): As in [`load_image`].

    Raises:
        [`ImageLoadError`]: naming `name`, for empty data, data that is not an image, corrupt or truncated data, an
        image above the pixel limit, or an unsupported mode.
    """
    path = Path(name)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if limit <= 0:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels!r}")
    if not data:
        raise ImageLoadError(path, "the data is empty (0 bytes)", "re-export or re-download it")
    data = bytes(data)
    return _decode(io.BytesIO(data), path, limit, data)


# ----------------------------------------------------------------------------------------------------------------------
# Tensors and in-memory inputs
# ----------------------------------------------------------------------------------------------------------------------



# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _icc_matches(profile: bytes, mode: str) -> bool:
    space = icc_color_space(profile)
    if space == "RGB":
        return mode in ("RGB", "RGBA", "P")
    if space == "GRAY":
        return mode in ("1", "L", "LA", "I;16", "I", "F")
    if space == "CMYK":
        return mode == "CMYK"
    return False


def save_image(
    img: Image.Image,
    path: str | os.PathLike[str],
    *,
    alpha: Image.Image | None = None,
    icc_profile: bytes | None = None,
    exif: bytes | Image.Exif | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an image atomically, in the format given by the file suffix.

    The image is written to a hidden temporary file in the destination folder, flushed and `fsync`ed, then moved into
    place (`os.replace`), so readers never see a half-written file; the temporary file is removed on any failure.
    Missing parent folders are created. JPEG and WebP are written at quality 95 (JPEG with 4:4:4 chroma), TIFF with
    deflate compression when Pillow has libtiff.

    Args:
        img (`PIL.Image.Image`): The image. Modes the format cannot store are converted to `RGB` (or `RGBA`).
        path (`str` or `os.PathLike`): Destination; suffix one of `.png .jpg .jpeg .webp .tif .tiff .bmp`.
        alpha (`PIL.Image.Image`, *optional*): Mode `"L"` transparency of the same size as `img` (see
            [`upscale_alpha`]); the file is then written as RGBA. Only for PNG, WebP and TIFF.
        icc_profile (`bytes`, *optional*): ICC profile to embed (PNG, JPEG, WebP, TIFF). Skipped with a warning when
            the format cannot hold one or the profile's colour space does not match the image.
        exif (`bytes` or `PIL.Image.Exif`, *optional*): EXIF block to embed (PNG, JPEG, WebP, TIFF), e.g.
            [`LoadedImage`]`.exif`, whose orientation is already 1.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing file. Without it an existing file is
            left untouched and `FileExistsError` is raised (checked again at the final rename where the file system
            supports hard links, so a file created meanwhile is not clobbered either).

    Returns:
        `pathlib.Path`: The written path.

    Raises:
        `ValueError`: unsupported suffix, alpha for a format without alpha (JPEG, BMP), or an alpha of the wrong mode or
            size. `FileExistsError`: the file exists and `overwrite` is False. `IsADirectoryError`: `path` is a folder.
            [`~stablesr.file_utils.DiskFullError`]: no room to write the file (nothing is left behind; a batch should
            stop, the next file would fail the same way).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = _SAVE_FORMATS.get(suffix)
    if fmt is None:
        raise ValueError(
            f"cannot save '{path}': unsupported file extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(_SAVE_FORMATS))}"
        )
    if not isinstance(img, Image.Image):
        raise TypeError(f"save_image expects a PIL.Image.Image, got {type(img).__name__}")

    out = img
    if alpha is not None:
        if fmt not in _ALPHA_FORMATS:
            raise ValueError(
                f"cannot save '{path}': {fmt} cannot store an alpha channel; save as .png or .webp to keep it, "
                "or pass alpha=None to drop it"
            )
        if not isinstance(alpha, Image.Image) or alpha.mode != "L":
            raise ValueError(f"cannot save '{path}': alpha must be a PIL image of mode 'L'")
        if alpha.size != img.size:
            raise ValueError(
                f"cannot save '{path}': alpha size {alpha.size} != image size {img.size}; resize it with upscale_alpha"
            )
        out = img.convert("RGB")  # always a copy, so putalpha does not touch the caller's image
        out.putalpha(alpha)
    elif _has_alpha(img) and fmt not in _ALPHA_FORMATS:
        raise ValueError(
            f"cannot save '{path}': the image has an alpha channel (mode {img.mode}) that {fmt} cannot store; "
            "save as .png or .webp, or drop the alpha with img.convert('RGB')"
        )
    if out.mode not in _SAVE_MODES[fmt]:
        if out.mode in HIGH_DEPTH_MODES:  # Pillow's own conversion would clip 16-bit values at 255
            out = high_depth_to_l(out, str(path))
        out = out.convert("RGBA" if _has_alpha(out) else "RGB")

    params: dict[str, Any] = {}
    if fmt == "JPEG":
        params.update(quality=_JPEG_QUALITY, subsampling=0)
    elif fmt == "WEBP":
        params.update(quality=_WEBP_QUALITY)
    elif fmt == "TIFF" and features.check("libtiff"):
        params.update(compression="tiff_deflate")
    if icc_profile:
        if fmt not in _ICC_FORMATS:
            logger.warning("%s: %s cannot embed an ICC profile; it is dropped", path, fmt)
        elif not _icc_matches(icc_profile, out.mode):
            logger.warning(
                "%s: ICC profile colour space %r does not match image mode %s; it is dropped",
                path,
                icc_color_space(icc_profile),
                out.mode,
            )
        else:
            params["icc_profile"] = bytes(icc_profile)
    if exif is not None and len(exif):
        if fmt not in _EXIF_FORMATS:
            logger.warning("%s: %s cannot embed EXIF; it is dropped", path, fmt)
        else:
            data = exif.tobytes() if isinstance(exif, Image.Exif) else bytes(exif)
            params["exif"] = data if data.startswith(_EXIF_PREFIX) else _EXIF_PREFIX + data

    if path.is_dir():
        raise IsADirectoryError(f"cannot save '{path}': it is a directory; give a file name with an image extension")
    with atomic_write(path, "wb", overwrite=overwrite) as fh:
        out.save(fh, format=fmt, **params)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Input expansion
# ----------------------------------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _folder_images(folder: Path, recursive: bool, skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = []
    for p in candidates:
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue  # hidden files and folders (.DS_Store, ._x.jpg, .git) are never inputs
        if _is_image_name(p) and p.is_file():
            images.append(p)
        elif skipped is not None and p.is_file():
            kind = f"'{p.suffix.lower()}'" if p.suffix else "no extension"
            skipped.append((p, f"not a supported image type ({kind})"))
        elif skipped is not None and p.is_dir() and not recursive:
            skipped.append((p, "a sub-folder (pass --recursive to look inside)"))
    return images


def iter_image_files(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    skipped: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of image files.

    - An existing **file** is included whatever its extension (so [`load_image`] can report a bad one by name).
    - A **folder** contributes the files with an image extension (case-insensitive: png jpg jpeg webp bmp tif tiff
      gif), only its top level unless `recursive=True`. Hidden files (starting with ".", e.g. macOS "._x.jpg") are
      skipped.
    - A **glob pattern** (`*`, `?`, `[...]`) contributes the matching files with an image extension; matched folders
      are not descended into (name the folder itself). With `recursive=True`, `**` matches across folders.

    Args:
        inputs (`str`, `os.PathLike` or a sequence of them): What the user named.
        recursive (`bool`, *optional*, defaults to `False`): Descend into sub-folders of folder inputs and let `**`
            match across folders in patterns.
        skipped (`list`, *optional*): When given, ``(path, reason)`` is appended for every visible entry of a folder
            input or pattern match that is not taken (unsupported file types such as `.svg`, sub-folders without
            `recursive`), so callers can say what was left out and why. Hidden files are never listed.

    Returns:
        `list[pathlib.Path]`: Sorted by path string; duplicates (the same file reached twice) kept once, in the
        spelling first met.

    Raises:
        `FileNotFoundError`: naming the input, for a path that does not exist, a pattern that matches no image file, or
            a folder that contains no image file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[str, Path] = {}

    def add(p: Path) -> None:
        key = os.path.normcase(os.path.realpath(p))
        found.setdefault(key, p)

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            add(path)
        elif path.is_dir():
            images = _folder_images(path, recursive, skipped)
            if not images:
                where = "or its sub-folders " if recursive else ""
                hint = "" if recursive else "; use recursive=True (CLI: --recursive) to look into sub-folders"
                raise FileNotFoundError(
                    f"folder '{text}' {where}contains no image files "
                    f"({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}){hint}"
                )
            for p in images:
                add(p)
        elif _GLOB_MAGIC.search(text):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=recursive)]
            files = [m for m in matches if m.is_file() and _is_image_name(m)]
            if skipped is not None:
                skipped.extend((m, f"not a supported image type ('{m.suffix.lower()}')" if m.suffix else
                                "not a supported image type (no extension)")
                               for m in matches if m.is_file() and not _is_image_name(m) and not m.name.startswith("."))
            if not files:
                extra = f" ({len(matches)} matches, none an image file)" if matches else ""
                raise FileNotFoundError(f"pattern '{text}' matches no image files{extra}")
            for p in files:
                add(p)
        else:
            raise FileNotFoundError(f"input '{text}' does not exist")
    return sorted(found.values(), key=str)
