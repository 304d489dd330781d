"""Color correction of super-resolved images against their low-resolution input.

StableSR's diffusion output can drift in color. The official scripts optionally pull the low-frequency color
information back from the (upsampled) low-resolution input, either with a per-channel AdaIN or with a 5-level
"a trous" wavelet decomposition. Both operate on images in ``[-1, 1]`` before the final clamp.

The wavelet decomposition is written with ``torch.nn.functional.conv2d`` rather than PyWavelets on purpose:
``pywt.swt2`` (the only undecimated transform there) always extends the signal periodically and has no replicate
mode, whereas the official blur pads by edge replication. With a blur support of about 63 pixels the wrap-around
changes most of a typical image, so PyWavelets cannot reproduce the official result; the conv version is exact.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["COLOR_FIX_METHODS", "DEFAULT_COLOR_FIX", "adain_color_fix", "color_fix", "wavelet_color_fix"]

COLOR_FIX_METHODS: tuple[str, ...] = ("wavelet", "adain", "none")
"""Allowed color-fix names (pipeline, CLI, web UI, fidelity curve all take them from here)."""
DEFAULT_COLOR_FIX = "wavelet"

# Number of a-trous levels (dilations 1, 2, 4, 8, 16) and the variance epsilon, both as in the official code.
_WAVELET_LEVELS = 5
_ADAIN_EPS = 1e-5
# Images above this many pixels get the wavelet fix in row strips of about _WAVELET_STRIP_PIXELS pixels.
_WAVELET_SINGLE_PASS_PIXELS = 4 * 2**20
_WAVELET_STRIP_PIXELS = 2**20


def _prepare(content: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates the pair and returns both as float32 with the reference at the content's spatial size."""
    if content.ndim != 4 or reference.ndim != 4:
        raise ValueError(
            f"content and reference must be 4-D (batch, channels, height, width) tensors, got shapes "
            f"{tuple(content.shape)} and {tuple(reference.shape)}"
        )
    if content.shape[1] != reference.shape[1]:
        raise ValueError(
            f"content has {content.shape[1]} channels but reference has {reference.shape[1]}; convert both images to "
            "the same channel layout first"
        )
    if reference.shape[0] not in (1, content.shape[0]):
        raise ValueError(
            f"reference batch size {reference.shape[0]} must be 1 or equal to the content batch size {content.shape[0]}"
        )
    if not content.is_floating_point() or not reference.is_floating_point():
        raise ValueError("content and reference must be floating point tensors in [-1, 1]")
    content = content.float()
    reference = reference.to(device=content.device, dtype=torch.float32)
    if reference.shape[-2:] != content.shape[-2:]:
        # The official scripts upsample the LR input bicubically before the color fix; do the same here so callers
        # may pass the raw LR image.
        reference = F.interpolate(reference, size=content.shape[-2:], mode="bicubic", align_corners=False)
    if reference.shape[0] != content.shape[0]:
        reference = reference.expand(content.shape[0], -1, -1, -1)
    return content, reference


def _wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """One a-trous level: depthwise 3x3 binomial blur with the given dilation and replicate padding."""
    channels = image.shape[1]
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device)
    kernel = (torch.outer(taps, taps) / 16.0).expand(channels, 1, 3, 3)
    # groups=channels makes the blur per channel for any channel count (the official kernel is fixed to 3 channels).
    padded = F.pad(image, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def _wavelet_decomposition(image: torch.Tensor, levels: int = _WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(high, low)`` with ``high = sum_i (img_i - blur_i(img_i))`` and ``low`` the last blur."""
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = _wavelet_blur(low, 2**level)
        # Accumulate level by level (instead of the telescoped ``image - low``) to keep the official rounding.
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(
    content: torch.Tensor, reference: torch.Tensor, strip_rows: int | None = None
) -> torch.Tensor:
    r"""
    Replaces the low-frequency band of `content` with that of `reference` (StableSR's "wavelet" color fix).

    Both images are split with 5 levels of an a-trous (undecimated) wavelet transform: a depthwise 3x3 binomial blur
    ``[1, 2, 1]^T [1, 2, 1] / 16`` with dilations 1, 2, 4, 8, 16 and replicate padding. The result is the sum of the
    content's high-frequency bands plus the reference's final low-pass band. Equal to the official
    `wavelet_reconstruction` for 3 channels; works for any channel count (e.g. gray or RGBA).

    Args:
        content (`torch.Tensor` of shape `(batch, channels, height, width)`):
            Super-resolved image(s), floating point, values in `[-1, 1]`.
        reference (`torch.Tensor` of shape `(batch or 1, channels, ref_height, ref_width)`):
            Color reference (the low-resolution input), values in `[-1, 1]`. If its spatial size differs from the
            content's, it is first resized to the content's size with bicubic interpolation.
        strip_rows (`int`, *optional*):
            Process the image in strips of this many rows (each with a 31-row margin, the transform's reach), so
            the ~8 image-sized temporaries of one pass become strip-sized; the result equals the one-pass result
            (up to float rounding in the convolutions). Default: one pass up to 4 MP, else strips of ~1 MP.

    Returns:
        `torch.Tensor` of shape `(batch, channels, height, width)` in the dtype of `content`. Computed in float32;
        values are not clamped and may slightly exceed `[-1, 1]`.
    """
    out_dtype = content.dtype
    content, reference = _prepare(content, reference)
    height, width = content.shape[-2:]
    if strip_rows is None:
        strip_rows = height if height * width <= _WAVELET_SINGLE_PASS_PIXELS else max(64, _WAVELET_STRIP_PIXELS // width)
    if strip_rows <= 0:
        raise ValueError(f"strip_rows must be positive, got {strip_rows}")
    if strip_rows >= height:
        content_high, _ = _wavelet_decomposition(content)
        _, reference_low = _wavelet_decomposition(reference)
        return (content_high + reference_low).to(out_dtype)
    # Row strips with a margin of the transform's reach: every kept row sees exactly the pixels (and, at the image
    # border, the replicate padding) it sees in one pass, so the temporaries are strip-sized.
    margin = 2**_WAVELET_LEVELS - 1
    out = torch.empty(content.shape, dtype=out_dtype, device=content.device)
    for y0 in range(0, height, strip_rows):
        y1 = min(height, y0 + strip_rows)
        a, b = max(0, y0 - margin), min(height, y1 + margin)
        content_high, _ = _wavelet_decomposition(content[..., a:b, :])
        _, reference_low = _wavelet_decomposition(reference[..., a:b, :])
        out[..., y0:y1, :] = (content_high + reference_low)[..., y0 - a : y1 - a, :]
    return out


def _channel_mean_std(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel mean and ``sqrt(unbiased variance + eps)`` over the spatial positions."""
    flat = image.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2, unbiased=True) + _ADAIN_EPS).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    r"""
    Matches the per-channel mean and standard deviation of `content` to those of `reference` (AdaIN color fix).

    For each image and channel: ``out = (x - mean(x)) / std(x) * std(ref) + mean(ref)`` where the statistics are over
    all pixels and ``std = sqrt(unbiased_variance + 1e-5)``, as in the official `adaptive_instance_normalization`.

    Args:
        content (`torch.Tensor` of shape `(batch, channels, height, width)`):
            Super-resolved image(s), floating point, values in `[-1, 1]`; at least 2 pixels.
        reference (`torch.Tensor` of shape `(batch or 1, channels, ref_height, ref_width)`):
            Color reference (the low-resolution input), values in `[-1, 1]`. If its spatial size differs from the
            content's, it is first resized to the content's size with bicubic interpolation.

    Returns:
        `torch.Tensor` of shape `(batch, channels, height, width)` in the dtype of `content`. Computed in float32;
        values are not clamped.
    """
    out_dtype = content.dtype
    content, reference = _prepare(content, reference)
    if content.shape[-2] * content.shape[-1] < 2:
        # The unbiased variance of a single pixel is undefined (the official code returns NaN).
        raise ValueError("adain_color_fix needs images with at least 2 pixels")
    content_mean, content_std = _channel_mean_std(content)
    reference_mean, reference_std = _channel_mean_std(reference)
    out = (content - content_mean) / content_std * reference_std + reference_mean
    return out.to(out_dtype)


def color_fix(
    content: torch.Tensor, reference: torch.Tensor, method: Literal["wavelet", "adain", "none"] | str = "wavelet"
) -> torch.Tensor:
    r"""
    Applies the named color correction of `content` towards `reference`.

    Args:
        content (`torch.Tensor` of shape `(batch, channels, height, width)`):
            Super-resolved image(s), values in `[-1, 1]`.
        reference (`torch.Tensor` of shape `(batch or 1, channels, ref_height, ref_width)`):
            Color reference in `[-1, 1]`; resized bicubically to the content's size when the sizes differ.
        method (`str`, defaults to `"wavelet"`):
            `"wavelet"` ([`wavelet_color_fix`]), `"adain"` ([`adain_color_fix`]) or `"none"` (returns `content`
            unchanged, without looking at `reference`).

    Returns:
        `torch.Tensor` of shape `(batch, channels, height, width)` in the dtype of `content`.
    """
    if method == "wavelet":
        return wavelet_color_fix(content, reference)
    if method == "adain":
        return adain_color_fix(content, reference)
    if method == "none":
        return content
    raise ValueError(
        f"unknown color fix method {method!r}; allowed values are {', '.join(map(repr, COLOR_FIX_METHODS))}"
    )
