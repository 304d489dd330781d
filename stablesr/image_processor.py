"""In-memory image conversions: PIL images, numpy arrays and torch tensors, alpha, padding and the working canvas.

This module owns every conversion between image containers (diffusers calls its equivalent ``image_processor``); it
never touches files (that is [`stablesr.image_io`]). Shapes, ranges and rounding are documented per function:

- [`split_rgb_alpha`]: any Pillow mode (palette, 16-bit, float, CMYK, Lab, ...) -> 8-bit `RGB` + `L` alpha or None.
- [`as_rgb_alpha_list`]: what the pipeline accepts (PIL / numpy / torch / lists) -> ``(RGB image, alpha)`` pairs.
  This is where the alpha channel is split off, once; [`attach_alpha`] puts it back on the result, once.
- [`to_tensor`] / [`from_tensor`]: PIL <-> (B, C, H, W) float in [-1, 1], exact for 8-bit images.
- [`pad_to`]: reflect-101 padding of tensors to at least a size (BasicSR's ``cv2.BORDER_REFLECT_101``).
- [`working_canvas`]: output size, sampled size and padded size for an input size and an upscale factor.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # LittleCMS is optional in Pillow builds.
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "Canvas",
    "SplitImage",
    "as_pil_list",
    "as_rgb_alpha_list",
    "alpha_from_tensor",
    "alpha_to_tensor",
    "attach_alpha",
    "from_tensor",
    "pad_to",
    "split_rgb_alpha",
    "to_tensor",
    "upscale_alpha",
    "working_canvas",
]

HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"} | HIGH_DEPTH_MODES
)


# ----------------------------------------------------------------------------------------------------------------------
# Pillow modes -> 8-bit RGB + alpha
# ----------------------------------------------------------------------------------------------------------------------


def icc_color_space(profile: bytes | None) -> str | None:
    """The data colour space of an ICC profile header: `"RGB"`, `"GRAY"`, `"CMYK"`, `"Lab"`, ... or `None`."""
    if not profile or len(profile) < 128:
        return None
    return profile[16:20].decode("ascii", "replace").strip()


_SRGB_PROFILE_BYTES: bytes | None = None


def srgb_profile_bytes() -> bytes:
    global _SRGB_PROFILE_BYTES
    if _SRGB_PROFILE_BYTES is None:
        _SRGB_PROFILE_BYTES = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _SRGB_PROFILE_BYTES


def uint16_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 as floor(v * 255 / 65535 + 0.5), exactly, in integer arithmetic."""
    v = arr.astype(np.uint64)
    return ((v * 510 + 65535) // 131070).astype(np.uint8)


def _float01_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map [0, 1] to 0..255 as floor(clip(x, 0, 1) * 255 + 0.5) (round half up)."""
    return np.floor(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def high_depth_to_l(im: Image.Image, label: str) -> Image.Image:
    """Convert an `I;16*`, `I` or `F` image to 8-bit `L` with a correct (not clipping) scale.

    - `I;16*`: 0..65535 -> 0..255 (rounded).
    - `I` (32-bit int): values within 0..65535 are treated as 16-bit; anything else is stretched min..max with a
      warning (Pillow's own `convert("L")` clips at 255, which would turn most 16-bit images white).
    - `F` (float): within [0, 1] -> x * 255; within [0, 255] -> 8-bit values; within [0, 65535] -> 16-bit values;
      otherwise stretched min..max with a warning. NaN becomes 0 and +-inf are clipped, with a warning.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray(uint16_to_uint8(arr), mode="L")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        logger.warning("%s: image contains NaN/inf samples; NaN -> 0, inf clipped", label)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 0.0
        lo = float(finite.min()) if finite.size else 0.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return Image.fromarray(_float01_to_uint8(arr), mode="L")
    if im.mode == "F" and lo >= 0.0 and hi <= 255.0:
        return Image.fromarray(_float01_to_uint8(arr / 255.0), mode="L")
    if lo >= 0.0 and hi <= 65535.0:
        return Image.fromarray(_float01_to_uint8(arr / 65535.0), mode="L")
    logger.warning(
        "%s: %s samples span %g..%g, outside any standard range; stretching min..max to 0..255", label, im.mode, lo, hi
    )
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(_float01_to_uint8(scaled), mode="L")


def split_rgb_alpha(
    im: Image.Image, icc_profile: bytes | None, label: str
) -> tuple[Image.Image, Image.Image | None, bytes | None]:
    """Convert any supported Pillow image to (`RGB` image, `L` alpha or None, ICC profile valid for the RGB image).

    Raises `ValueError` for modes that cannot be converted.
    """
    mode = im.mode
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {mode!r}")
    space = icc_color_space(icc_profile)

    if mode in HIGH_DEPTH_MODES:
        gray = high_depth_to_l(im, label)
        alpha = None
        transparency = im.info.get("transparency")
        if isinstance(transparency, int) and not isinstance(transparency, bool):  # 16-bit grayscale PNG tRNS
            alpha = Image.fromarray(np.where(np.asarray(im) == transparency, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB"), alpha, icc_profile if space == "RGB" else None

    if mode == "CMYK":
        if icc_profile is not None and space == "CMYK" and ImageCms is not None:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
                dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
                rgb = ImageCms.profileToProfile(
                    im, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
                )
                return rgb, None, srgb_profile_bytes()
            except (ImageCms.PyCMSError, OSError, ValueError) as e:
                logger.warning(
                    "%s: could not apply the embedded CMYK ICC profile (%s); using a plain conversion", label, e
                )
        elif icc_profile is not None:
            logger.warning(
                "%s: CMYK image with an ICC profile of colour space %r%s; using a plain CMYK->RGB conversion",
                label,
                space,
                "" if ImageCms is not None else " and no LittleCMS support in Pillow",
            )
        return im.convert("RGB"), None, None

    if mode == "LAB":
        if ImageCms is None:
            raise ValueError("Lab images need Pillow's LittleCMS support (PIL.ImageCms), which is not available")
        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(im, transform), None, srgb_profile_bytes()

    if mode == "La":  # premultiplied; Pillow can only un-premultiply it to LA
        im = im.convert("LA")
        mode = "LA"

    keep_icc = icc_profile if space == "RGB" and mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA") else None
    if icc_profile is not None and keep_icc is None:
        logger.debug("%s: dropping ICC profile of colour space %r that does not describe RGB data", label, space)
    if mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A"), keep_icc
    return (im if mode == "RGB" else im.convert("RGB")), None, keep_icc


# ----------------------------------------------------------------------------------------------------------------------
# Tensors and in-memory inputs
# ----------------------------------------------------------------------------------------------------------------------


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float tensor in [-1, 1].

    `L`, `RGB` and `RGBA` images keep their 1, 3 or 4 channels; any other mode is converted to `RGB` first (`RGBA`
    when it has transparency). Values map as `v / 127.5 - 1` (0 -> -1, 255 -> 1).

    Args:
        img (`PIL.Image.Image`): The image, `(W, H)` pixels.

    Returns:
        `torch.Tensor`: Shape `(1, C, H, W)`, dtype `float32`, range [-1, 1], on the CPU.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"to_tensor expects a PIL.Image.Image, got {type(img).__name__}")
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if img.mode in ALPHA_MODES or "transparency" in img.info else "RGB")
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    tensor = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    return tensor / 127.5 - 1.0


_CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def from_tensor(t: torch.Tensor) -> list[Image.Image]:
    """Convert a batch of images in [-1, 1] back to PIL images.

    Values are clamped to [-1, 1] and quantised with round-half-up: `floor((x + 1) * 127.5 + 0.5)`, so
    `from_tensor(to_tensor(img))` reproduces every 8-bit image exactly.

    Args:
        t (`torch.Tensor`): Shape `(B, C, H, W)` (or `(C, H, W)`), floating point, range [-1, 1], with C = 1
            (-> `L`), 3 (-> `RGB`) or 4 (-> `RGBA`). Any device and float dtype.

    Returns:
        `list[PIL.Image.Image]`: `B` images of `W x H` pixels.

    Raises:
        `ValueError`: for a wrong shape or dtype, or NaN values (often an fp16 overflow upstream).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"from_tensor expects a torch.Tensor, got {type(t).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] not in _CHANNEL_MODES:
        raise ValueError(f"from_tensor expects shape (B, C, H, W) with C in 1, 3, 4, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"from_tensor expects a floating point tensor in [-1, 1], got dtype {t.dtype}")
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(t).any():
        raise ValueError("from_tensor got NaN values (often an fp16 overflow in the VAE; try float32 or bfloat16)")
    q = torch.floor((t.clamp(-1.0, 1.0) + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    arr = q.permute(0, 2, 3, 1).numpy()
    mode = _CHANNEL_MODES[arr.shape[-1]]
    return [Image.fromarray(a[:, :, 0] if mode == "L" else a, mode=mode) for a in arr]


def _float_range_hint(lo: float, hi: float) -> str:
    if lo < 0.0 and lo >= -1.0 - 1e-3 and hi <= 1.0 + 1e-3:
        return " (looks like [-1, 1]: use (x + 1) / 2)"
    if lo >= 0.0 and hi <= 255.0:
        return " (looks like 0..255: divide by 255 or cast to uint8)"
    return ""


def _array_to_pils(arr: np.ndarray, source: str) -> list[Image.Image]:
    """(B, H, W, C) array -> list of RGB / RGBA images. Checks dtype and range."""
    if arr.size == 0:
        raise ValueError(f"{source}: empty image array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        u8 = arr
    elif arr.dtype == np.uint16:
        u8 = uint16_to_uint8(arr)
    elif arr.dtype == np.bool_:
        u8 = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        f = arr.astype(np.float32)
        if not np.isfinite(f).all():
            raise ValueError(f"{source}: float image contains NaN or inf values")
        lo, hi = float(f.min()), float(f.max())
        tol = 1e-3
        if lo < -tol or hi > 1.0 + tol:
            raise ValueError(
                f"{source}: float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                + _float_range_hint(lo, hi)
            )
        u8 = _float01_to_uint8(f)
    else:
        raise ValueError(
            f"{source}: unsupported dtype {arr.dtype}; use uint8 (0..255), uint16 (0..65535) or float in [0, 1]"
        )
    channels = u8.shape[-1]
    if channels == 1:
        u8 = np.repeat(u8, 3, axis=-1)
    elif channels == 2:  # gray + alpha
        u8 = np.concatenate([np.repeat(u8[..., :1], 3, axis=-1), u8[..., 1:]], axis=-1)
    mode = "RGBA" if u8.shape[-1] == 4 else "RGB"
    return [Image.fromarray(np.ascontiguousarray(a), mode=mode) for a in u8]


def _numpy_to_pils(arr: np.ndarray) -> list[Image.Image]:
    shape = tuple(arr.shape)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        if arr.shape[-1] not in (1, 2, 3, 4):
            hint = ""
            if arr.shape[0] in (1, 3, 4):
                hint = "; it looks channels-first (C, H, W): use arr.transpose(1, 2, 0)"
            raise ValueError(f"numpy image of shape {shape} must be (H, W), (H, W, C) or (B, H, W, C), C in 1-4{hint}")
        arr = arr[None]
    elif arr.ndim == 4:
        if arr.shape[-1] not in (1, 2, 3, 4):
            hint = ""
            if arr.shape[1] in (1, 3, 4):
                hint = "; it looks channels-first (B, C, H, W): use arr.transpose(0, 2, 3, 1)"
            raise ValueError(f"numpy image batch of shape {shape} must be (B, H, W, C) with C in 1-4{hint}")
    else:
        raise ValueError(f"numpy image of shape {shape} must be (H, W), (H, W, C) or (B, H, W, C)")
    return _array_to_pils(arr, f"numpy image of shape {shape}")


def _torch_to_pils(t: torch.Tensor) -> list[Image.Image]:
    shape = tuple(t.shape)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        if t.shape[0] not in (1, 2, 3, 4):
            hint = ""
            if t.shape[-1] in (1, 3, 4):
                hint = "; it looks channels-last (H, W, C): use t.permute(2, 0, 1)"
            raise ValueError(f"torch image of shape {shape} must be (C, H, W) or (B, C, H, W), C in 1-4{hint}")
        t = t[None]
    elif t.ndim == 4:
        if t.shape[1] not in (1, 2, 3, 4):
            hint = ""
            if t.shape[-1] in (1, 3, 4):
                hint = "; it looks channels-last (B, H, W, C): use t.permute(0, 3, 1, 2)"
            raise ValueError(f"torch image batch of shape {shape} must be (B, C, H, W) with C in 1-4{hint}")
    else:
        raise ValueError(f"torch image of shape {shape} must be (C, H, W) or (B, C, H, W)")
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.to(torch.float32)
    elif t.dtype not in (torch.uint8, torch.bool):
        raise ValueError(f"torch image of shape {shape}: unsupported dtype {t.dtype}; use float in [0, 1] or uint8")
    return _array_to_pils(t.permute(0, 2, 3, 1).numpy(), f"torch image of shape {shape}")


def _pil_to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "RGBA"):
        return img
    try:
        rgb, alpha, _ = split_rgb_alpha(img, None, "PIL image")
    except ValueError as e:
        raise ValueError(f"PIL image: {e}") from e
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def as_pil_list(image: Any) -> list[Image.Image]:
    """Normalise the image inputs accepted by the pipeline to a list of `RGB` / `RGBA` PIL images.

    Accepted inputs (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA; gray becomes RGB, alpha is kept as RGBA):

    - `PIL.Image.Image` in any supported mode (16-bit and float modes are scaled as in [`load_image`]; no EXIF
      transpose is applied to in-memory images), or a list/tuple of any of these inputs (flattened in order).
    - `numpy.ndarray` channels-last: `(H, W)`, `(H, W, C)` or `(B, H, W, C)`; dtype `uint8` (0..255), `uint16`
      (0..65535, rounded to 8 bits), `bool`, or float in [0, 1].
    - `torch.Tensor` channels-first: `(C, H, W)` or `(B, C, H, W)` (also `(H, W)`); float in [0, 1], `uint8` or `bool`.

    Floats are quantised with round-half-up, `floor(x * 255 + 0.5)`; values up to 1e-3 outside [0, 1] are clipped.

    Returns:
        `list[PIL.Image.Image]`: One image per input image (per batch element).

    Raises:
        `ValueError`: for an empty input, a wrong shape (with a hint when the layout looks transposed), an unsupported
            dtype, or float values outside [0, 1] (with a hint when they look like [-1, 1] or 0..255).
        `TypeError`: for any other input type.
    """
    if isinstance(image, Image.Image):
        return [_pil_to_rgb_or_rgba(image)]
    if isinstance(image, np.ndarray):
        return _numpy_to_pils(image)
    if isinstance(image, torch.Tensor):
        return _torch_to_pils(image)
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("got an empty list of images")
        out: list[Image.Image] = []
        for item in image:
            if isinstance(item, (list, tuple)):
                raise TypeError("nested lists of images are not supported; pass a flat list")
            out.extend(as_pil_list(item))
        return out
    raise TypeError(
        f"unsupported image input of type {type(image).__name__}; pass a PIL image, a numpy array, a torch tensor "
        "or a list of them"
    )


def upscale_alpha(alpha: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize an alpha channel with bicubic interpolation, for re-attaching it to a super-resolved image.

    Pillow's 8-bit bicubic resampling clamps the overshoot of the cubic kernel to [0, 255], so sharp transparency
    edges stay within range.

    Args:
        alpha (`PIL.Image.Image`): Mode `"L"` transparency mask.
        size (`tuple[int, int]`): Target `(width, height)`, e.g. the output image's `.size`.

    Returns:
        `PIL.Image.Image`: Mode `"L"`, `size` pixels.
    """
    if not isinstance(alpha, Image.Image) or alpha.mode != "L":
        got = alpha.mode if isinstance(alpha, Image.Image) else type(alpha).__name__
        raise ValueError(f"upscale_alpha expects a PIL image of mode 'L', got {got!r}")
    width, height = (int(s) for s in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"upscale_alpha: size must be positive (width, height), got {tuple(size)}")
    if (width, height) == alpha.size:
        return alpha.copy()
    return alpha.resize((width, height), Image.Resampling.BICUBIC)



def _split_pil_batch(images: list[Image.Image]) -> list[tuple[Image.Image, Image.Image | None]]:
    out = []
    for img in images:
        if img.mode == "RGBA":
            out.append((img.convert("RGB"), img.getchannel("A")))
        else:
            out.append((img, None))
    return out


@dataclass(frozen=True)
class SplitImage:
    """An image whose alpha channel is already split off: ``rgb`` (PIL `RGB`) and ``alpha`` (PIL `L` or None).

    The pipeline accepts it (as it accepts [`stablesr.image_io.LoadedImage`]) without splitting again.
    """

    rgb: Image.Image
    alpha: Image.Image | None = None


def as_rgb_alpha_list(image: Any) -> list[tuple[Image.Image, Image.Image | None]]:
    """Normalise pipeline inputs to ``(rgb, alpha)`` pairs: the one place where an alpha channel is split off.

    Accepts everything [`as_pil_list`] accepts, plus already split images: any object with ``rgb`` (PIL `RGB`) and
    ``alpha`` (PIL `L` or None) attributes, such as [`stablesr.image_io.LoadedImage`], or a list of them.

    Returns:
        `list[tuple[PIL.Image.Image, PIL.Image.Image | None]]`: `RGB` image and `L` alpha (None when opaque).
    """
    if hasattr(image, "rgb") and hasattr(image, "alpha") and isinstance(image.rgb, Image.Image):
        if image.rgb.mode != "RGB":
            raise ValueError(f"an image with .rgb and .alpha needs .rgb of mode 'RGB', got {image.rgb.mode!r}")
        if image.alpha is not None and (image.alpha.mode != "L" or image.alpha.size != image.rgb.size):
            raise ValueError("an image's .alpha must be a mode 'L' image of the same size as its .rgb")
        return [(image.rgb, image.alpha)]
    if isinstance(image, (list, tuple)) and image and all(hasattr(i, "rgb") for i in image):
        return [pair for item in image for pair in as_rgb_alpha_list(item)]
    return _split_pil_batch(as_pil_list(image))


def alpha_to_tensor(alpha: Image.Image) -> torch.Tensor:
    """A mode "L" alpha channel as a (1, 1, H, W) uint8 tensor (exact; see [`alpha_from_tensor`])."""
    if not isinstance(alpha, Image.Image) or alpha.mode != "L":
        got = alpha.mode if isinstance(alpha, Image.Image) else type(alpha).__name__
        raise ValueError(f"alpha must be a PIL image of mode 'L', got {got!r}")
    return torch.from_numpy(np.array(alpha, dtype=np.uint8))[None, None]


def alpha_from_tensor(alpha: torch.Tensor) -> Image.Image:
    """A (1, 1, H, W) or (H, W) uint8 alpha tensor as a mode "L" PIL image."""
    arr = alpha.detach().cpu().reshape(alpha.shape[-2:]).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="L")


def attach_alpha(image: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """The result image with the input's ``alpha`` (resized to it with [`upscale_alpha`]) attached: `RGBA`, or
    ``image`` itself when ``alpha`` is None. The one place where alpha is put back."""
    if alpha is None:
        return image
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    out.putalpha(upscale_alpha(alpha, out.size))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Padding and the working canvas
# ----------------------------------------------------------------------------------------------------------------------


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``image`` (..., H, W) at the bottom/right to at least ``height`` x ``width``.

    Reflection without repeating the edge (torch "reflect" = cv2.BORDER_REFLECT_101, as BasicSR pads crops), repeated
    when the padding is larger than the image; a side of one pixel cannot be reflected and is replicated instead.
    Sizes already large enough are left as they are (no cropping).
    """
    squeeze = image.ndim == 3
    if squeeze:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"pad_to expects (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    while image.shape[-2] < height or image.shape[-1] < width:
        pad_h = min(max(0, height - image.shape[-2]), image.shape[-2] - 1)
        pad_w = min(max(0, width - image.shape[-1]), image.shape[-1] - 1)
        if pad_h == 0 and pad_w == 0:  # a 1-pixel side cannot be reflected
            pad_h, pad_w = max(0, height - image.shape[-2]), max(0, width - image.shape[-1])
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
            break
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
    return image[0] if squeeze else image


CANVAS_AREA_FACTOR = 4
"""The sampled canvas never has more than this many times ``max(output area, native size ** 2)`` pixels."""


@dataclass(frozen=True)
class Canvas:
    """Where one image is sampled, all sizes as ``(height, width)`` in pixels.

    Attributes:
        output_size: the final image, ``round(upscale x input)`` per side.
        work_size: the bicubic-upsampled input the model samples (the output size, scaled up towards the model's
            native size; see [`working_canvas`]).
        padded_size: ``work_size`` padded at the bottom/right: to a multiple the UNet accepts, and for thin images
            up towards the native short side (reflection padding instead of scaling the long side without limit).
    """

    output_size: tuple[int, int]
    work_size: tuple[int, int]
    padded_size: tuple[int, int]

    @property
    def area(self) -> int:
        """Pixels sampled (of the padded canvas)."""
        return self.padded_size[0] * self.padded_size[1]


def _ceil_to(value: int, multiple: int) -> int:
    return value + (-value) % multiple


def working_canvas(input_size: tuple[int, int], upscale: float, native_size: int, multiple: int = 64) -> Canvas:
    """The canvas for an input of ``input_size`` (height, width) upscaled by ``upscale``.

    The one implementation of this arithmetic: the pipeline and the web UI's size limits call it.

    - Outputs whose short side reaches ``native_size`` (512 / 768) are sampled as they are (padded to ``multiple``).
    - Smaller outputs are scaled up until their short side is ``native_size`` and resized back after decoding, as
      long as that canvas stays within ``CANVAS_AREA_FACTOR x max(output area, native_size ** 2)`` pixels. Only
      strips reach that limit: small outputs more elongated than 4:1, or larger ones whose short side is below half
      the native size.
    - Thin outputs (banners, panorama strips) would blow up that way (a 400x6 output became a 34,176x512 canvas).
      They are scaled by at most what brings their long side to ``native_size``, and their short side is reached by
      reflection padding instead; where even that canvas would exceed the limit, the short side is padded only as
      far as the limit allows (at least to ``multiple``).

    The result size is exact in every case: the decoded canvas is cropped to ``work_size`` and resized to
    ``output_size``.

    Raises:
        ValueError: for a non-positive size or upscale, or an output so thin and long that even its smallest canvas
            (each side rounded up to ``multiple``) exceeds the limit.
    """
    height, width = (int(s) for s in input_size)
    if height < 1 or width < 1:
        raise ValueError(f"input size must be positive, got {height}x{width}")
    if not (isinstance(upscale, (int, float)) and upscale > 0 and math.isfinite(upscale)):
        raise ValueError(f"upscale must be a positive number, got {upscale!r}")
    out_h, out_w = max(1, round(height * upscale)), max(1, round(width * upscale))
    limit = CANVAS_AREA_FACTOR * max(out_h * out_w, native_size * native_size)

    def padded(work: tuple[int, int], short_target: int) -> tuple[int, int]:
        h, w = work
        if h <= w:
            return _ceil_to(max(h, short_target), multiple), _ceil_to(w, multiple)
        return _ceil_to(h, multiple), _ceil_to(max(w, short_target), multiple)

    # The rule for ordinary images: scale the short side up to the native size.
    scale = max(1.0, native_size / min(out_h, out_w))
    work = (round(out_h * scale), round(out_w * scale))
    canvas = Canvas((out_h, out_w), work, padded(work, 0))
    if canvas.area <= limit:
        return canvas

    # Thin images: scale at most until the long side is native, then pad the short side towards the native size.
    scale = max(1.0, min(native_size / min(out_h, out_w), native_size / max(out_h, out_w)))
    work = (round(out_h * scale), round(out_w * scale))
    short, long_padded = min(work), _ceil_to(max(work), multiple)
    target = native_size
    if _ceil_to(max(short, target), multiple) * long_padded > limit:
        target = (limit // long_padded) // multiple * multiple  # as far as the limit allows
    canvas = Canvas((out_h, out_w), work, padded(work, target))
    if canvas.area > limit:
        raise ValueError(
            f"an output of {out_w}x{out_h} pixels is too thin to restore: even its smallest canvas "
            f"({canvas.padded_size[1]}x{canvas.padded_size[0]}) is more than {CANVAS_AREA_FACTOR}x the larger of "
            f"its area and {native_size}x{native_size}. Crop it into shorter pieces, or upscale it more"
        )
    return canvas
