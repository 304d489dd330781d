"""Real-ESRGAN second-order degradation, batched in torch, as used to train StableSR.

The pipeline follows Real-ESRGAN's ``RealESRGANModel.feed_data`` (xinntao/Real-ESRGAN @a4abfb2) and StableSR's
``LatentDiffusionSRTextWT.get_input`` (IceClear/StableSR ldm/models/diffusion/ddpm.py @398ee93); the individual
operations follow BasicSR (XPixelGroup/BasicSR @8d56e3a: ``basicsr/data/degradations.py``,
``basicsr/data/realesrgan_dataset.py``, ``basicsr/utils/img_process_util.py``, ``basicsr/utils/diffjpeg.py``):

    gt --USM?--> src --[stage 1: blur -> resize -> noise -> JPEG]--> --[stage 2: blur? -> resize -> noise]-->
        coin: (resize to gt/scale + sinc -> JPEG) or (JPEG -> resize to gt/scale + sinc) --> clamp (round) --> lq

Randomness is split from computation: :func:`sample_params` draws every random choice from one ``torch.Generator``
into a :class:`DegradationParams`; :func:`apply` is deterministic given those params (pixel noise comes from per-sample
seeds stored in the params). Everything runs on the device of the input tensor; nothing calls ``.cuda()``.

What is drawn per sample and what per batch: blur kernels, the second blur coin, noise kind / strength / gray flag,
JPEG quality, the final-order coin and the no-degradation flag are per sample (the official code draws the coins once
per batch; drawing them per sample keeps each image's marginal distribution and adds diversity within a batch).
The resize choice, scale and interpolation mode are per batch, as in the official code, because the whole batch must
share one tensor size between the stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers.utils import logging
from torch import nn

from .file_utils import atomic_write_text, remove_stale_temporaries
from .image_io import ImageLoadError, iter_image_files, load_image, save_image
from .image_processor import pad_to

logger = logging.get_logger(__name__)

__all__ = [
    "KERNEL_TYPES",
    "RESIZE_MODES",
    "DegradationConfig",
    "DegradationParams",
    "KernelConfig",
    "RealESRGANDegradation",
    "SincConfig",
    "StageConfig",
    "StageParams",
    "add_noise",
    "apply",
    "blur_kernels",
    "degrade_folder",
    "filter2d",
    "jpeg_compress",
    "sample_params",
    "sinc_kernels",
    "usm_sharp",
]

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
_ANISOTROPIC = ("aniso", "generalized_aniso", "plateau_aniso")
_GENERALIZED = ("generalized_iso", "generalized_aniso")
_PLATEAU = ("plateau_iso", "plateau_aniso")
# BasicSR's RealESRGANDataset uses `sinc_cutoff_range_large` from this kernel size on (hard-coded there too).
_SINC_LARGE_KERNEL_SIZE = 13


# --------------------------------------------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------------------------------------------- #


@dataclass
class KernelConfig:
    """Random blur kernel of one stage (BasicSR ``random_mixed_kernels`` + the sinc branch of ``RealESRGANDataset``).

    Args:
        kernel_list: Kernel families to draw from, a subset of :data:`KERNEL_TYPES`.
        kernel_prob: Probability of each entry of ``kernel_list``; must sum to 1.
        kernel_size_range: Inclusive ``[min, max]`` odd kernel side in pixels; the side is drawn uniformly among the
            odd sizes in this range. Kernels are zero-padded to ``max``.
        sigma_range: Gaussian standard deviation in pixels, drawn independently for both axes of anisotropic kernels.
        betag_range: Shape exponent of generalized Gaussian kernels. Half the draws are uniform in ``[low, 1]``,
            half in ``[1, high]``, so the range must contain 1.
        betap_range: Shape exponent of plateau kernels, drawn like ``betag_range``.
        sinc_prob: Probability of a circular low-pass (2D sinc) kernel instead of the families above.
        sinc_cutoff_range: Sinc cutoff in units of pi rad/pixel for kernels smaller than 13 pixels.
        sinc_cutoff_range_large: Sinc cutoff in units of pi rad/pixel for kernels of 13 pixels or more.
    """

    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_size_range: tuple[int, int] = (7, 21)
    sigma_range: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 2.0)
    betap_range: tuple[float, float] = (1.0, 1.5)
    sinc_prob: float = 0.1
    sinc_cutoff_range: tuple[float, float] = (1 / 3, 1.0)
    sinc_cutoff_range_large: tuple[float, float] = (1 / 5, 1.0)

    def __post_init__(self):
        _tuplify(self)

    def validate(self, prefix: str = "") -> None:
        _check_choices(self.kernel_list, KERNEL_TYPES, prefix + "kernel_list")
        _check_probs(self.kernel_prob, prefix + "kernel_prob", n=len(self.kernel_list))
        _check_range(self.kernel_size_range, prefix + "kernel_size_range", low=1, integer=True, odd=True)
        _check_range(self.sigma_range, prefix + "sigma_range", low=1e-6)
        _check_range(self.betag_range, prefix + "betag_range", low=1e-6, contains=1.0)
        _check_range(self.betap_range, prefix + "betap_range", low=1e-6, contains=1.0)
        _check_prob(self.sinc_prob, prefix + "sinc_prob")
        _check_range(self.sinc_cutoff_range, prefix + "sinc_cutoff_range", low=1e-6, high=1.0)
        _check_range(self.sinc_cutoff_range_large, prefix + "sinc_cutoff_range_large", low=1e-6, high=1.0)


@dataclass
class SincConfig:
    """The final sinc filter applied with the last resize (BasicSR ``RealESRGANDataset``: ``sinc_kernel``).

    Args:
        kernel_size_range: Inclusive ``[min, max]`` odd kernel side in pixels, drawn among the odd sizes.
        cutoff_range: Cutoff in units of pi rad/pixel.
    """

    kernel_size_range: tuple[int, int] = (7, 21)
    cutoff_range: tuple[float, float] = (1 / 3, 1.0)

    def __post_init__(self):
        _tuplify(self)

    def validate(self, prefix: str = "") -> None:
        _check_range(self.kernel_size_range, prefix + "kernel_size_range", low=1, integer=True, odd=True)
        _check_range(self.cutoff_range, prefix + "cutoff_range", low=1e-6, high=1.0)


def _stage1_defaults() -> StageConfig:
    return StageConfig()


def _stage2_defaults() -> StageConfig:
    return StageConfig(
        kernel=KernelConfig(sigma_range=(0.2, 1.0)),
        blur_prob=0.5,
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.6, 1.2),
        noise_range=(1.0, 12.0),
        poisson_scale_range=(0.05, 1.0),
        jpeg_range=(60.0, 100.0),
    )


@dataclass
class StageConfig:
    """One degradation stage: blur -> resize -> noise -> JPEG. Defaults are StableSR's first stage.

    The first stage resizes relative to the input (GT) size; every later stage resizes relative to the target LQ
    size ``gt / scale``, as Real-ESRGAN's second stage does. The last stage's JPEG is combined with the final
    resize + sinc filter (see :class:`DegradationConfig`).

    Args:
        kernel: Blur kernel distribution.
        blur_prob: Probability that a sample is blurred in this stage (Real-ESRGAN: 1 for the first stage).
        resize_prob: Probabilities of ``[up, down, keep]``.
        resize_range: ``[low, high]`` scale factor; "up" draws from ``[1, high]``, "down" from ``[low, 1]``.
        resize_modes: Interpolation modes (torch ``F.interpolate`` names), one drawn uniformly per batch.
        gaussian_noise_prob: Probability of Gaussian noise; otherwise Poisson noise.
        noise_range: Gaussian noise standard deviation on the 0..255 scale.
        poisson_scale_range: Multiplier of the Poisson (shot) noise.
        gray_noise_prob: Probability that the noise is the same on all three channels.
        jpeg_range: JPEG quality, drawn as a continuous value as BasicSR's DiffJPEG does.
    """

    kernel: KernelConfig = field(default_factory=KernelConfig)
    blur_prob: float = 1.0
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.3, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)

    def __post_init__(self):
        if isinstance(self.kernel, dict):
            self.kernel = _from_dict(KernelConfig, self.kernel, "kernel.")
        _tuplify(self)

    def validate(self, prefix: str = "") -> None:
        if not isinstance(self.kernel, KernelConfig):
            raise ValueError(f"{prefix}kernel must be a KernelConfig or a mapping, got {type(self.kernel).__name__}")
        self.kernel.validate(prefix + "kernel.")
        _check_prob(self.blur_prob, prefix + "blur_prob")
        _check_probs(self.resize_prob, prefix + "resize_prob", n=3)
        _check_range(self.resize_range, prefix + "resize_range", low=1e-3, contains=1.0)
        _check_choices(self.resize_modes, RESIZE_MODES, prefix + "resize_modes")
        _check_prob(self.gaussian_noise_prob, prefix + "gaussian_noise_prob")
        _check_range(self.noise_range, prefix + "noise_range", low=0.0)
        _check_range(self.poisson_scale_range, prefix + "poisson_scale_range", low=0.0)
        _check_prob(self.gray_noise_prob, prefix + "gray_noise_prob")
        _check_range(self.jpeg_range, prefix + "jpeg_range", low=1.0, high=100.0)


@dataclass
class DegradationConfig:
    """The full two-stage degradation. Defaults equal ``configs/degradation/stablesr.yaml`` (StableSR 512).

    Args:
        scale: Super-resolution factor; the LQ is ``(H / scale, W / scale)``. H and W must be multiples of it.
        stages: The degradation stages, in order (two in Real-ESRGAN and StableSR).
        final_sinc_prob: Probability of the final sinc filter (otherwise an identity kernel).
        final_sinc: Distribution of the final sinc filter.
        final_resize_modes: Interpolation modes of the final resize to ``gt / scale``, one drawn per batch.
        sinc_before_jpeg_prob: Probability of "[resize back + sinc] then JPEG" for the last stage; otherwise
            "JPEG then [resize back + sinc]". Real-ESRGAN uses a fair coin.
        use_usm: Sharpen the GT with unsharp masking first; the sharpened GT is both the degradation source and the
            returned target (StableSR 512 and Real-ESRGAN x4plus).
        usm_radius: USM Gaussian kernel side in pixels (made odd).
        usm_weight: USM residual weight.
        usm_threshold: USM mask threshold on the 0..255 scale.
        no_degradation_prob: Probability that a sample's LQ is the clean downsampled GT (StableSR 512: 0.01).
        gt_size: Side of the paired random crop taken after degradation by :class:`RealESRGANDegradation`, or
            ``None``. Inputs not larger than this are returned whole.
        round_lq: Round the LQ to 8-bit levels. Real-ESRGAN does; StableSR's ``get_input`` only clamps.
    """

    scale: int = 4
    stages: list[StageConfig] = field(default_factory=lambda: [_stage1_defaults(), _stage2_defaults()])
    final_sinc_prob: float = 0.8
    final_sinc: SincConfig = field(default_factory=SincConfig)
    final_resize_modes: tuple[str, ...] = RESIZE_MODES
    sinc_before_jpeg_prob: float = 0.5
    use_usm: bool = True
    usm_radius: int = 50
    usm_weight: float = 0.5
    usm_threshold: float = 10.0
    no_degradation_prob: float = 0.01
    gt_size: int | None = 512
    round_lq: bool = False

    def __post_init__(self):
        if isinstance(self.final_sinc, dict):
            self.final_sinc = _from_dict(SincConfig, self.final_sinc, "final_sinc.")
        if isinstance(self.stages, (list, tuple)):
            self.stages = [
                _from_dict(StageConfig, s, f"stages[{i}].") if isinstance(s, dict) else s
                for i, s in enumerate(self.stages)
            ]
        _tuplify(self)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid key (with its path) and its allowed values."""
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive integer, got {self.scale!r}")
        if not isinstance(self.stages, list) or len(self.stages) < 1:
            raise ValueError(f"stages must be a non-empty list of stage mappings, got {self.stages!r}")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, StageConfig):
                raise ValueError(f"stages[{i}] must be a StageConfig or a mapping, got {type(stage).__name__}")
            stage.validate(f"stages[{i}].")
        _check_prob(self.final_sinc_prob, "final_sinc_prob")
        if not isinstance(self.final_sinc, SincConfig):
            raise ValueError(f"final_sinc must be a SincConfig or a mapping, got {type(self.final_sinc).__name__}")
        self.final_sinc.validate("final_sinc.")
        _check_choices(self.final_resize_modes, RESIZE_MODES, "final_resize_modes")
        _check_prob(self.sinc_before_jpeg_prob, "sinc_before_jpeg_prob")
        if not isinstance(self.use_usm, bool):
            raise ValueError(f"use_usm must be true or false, got {self.use_usm!r}")
        if isinstance(self.usm_radius, bool) or not isinstance(self.usm_radius, int) or self.usm_radius < 1:
            raise ValueError(f"usm_radius must be a positive integer (pixels), got {self.usm_radius!r}")
        _check_number(self.usm_weight, "usm_weight", low=0.0)
        _check_number(self.usm_threshold, "usm_threshold", low=0.0, high=255.0)
        _check_prob(self.no_degradation_prob, "no_degradation_prob")
        if self.gt_size is not None and (
            isinstance(self.gt_size, bool)
            or not isinstance(self.gt_size, int)
            or self.gt_size < self.scale
            or self.gt_size % self.scale
        ):
            raise ValueError(
                f"gt_size must be null or a positive multiple of scale={self.scale}, got {self.gt_size!r}"
            )
        if not isinstance(self.round_lq, bool):
            raise ValueError(f"round_lq must be true or false, got {self.round_lq!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DegradationConfig:
        """Build from a plain mapping (the YAML schema); unknown keys raise ``ValueError``."""
        return _from_dict(cls, config, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DegradationConfig:
        """Load a degradation table such as ``configs/degradation/stablesr.yaml``."""
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of degradation settings at the top level, got {data!r}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of lists and scalars (YAML/JSON-able), the inverse of :meth:`from_dict`."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _tuplify(obj) -> None:
    # YAML gives lists; tuples keep configs hashable-looking and make `==` after a round trip independent of that.
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list) and f.name != "stages":
            setattr(obj, f.name, tuple(value))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _from_dict(cls, config, prefix: str):
    where = prefix.rstrip(".") or "the degradation config"
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a mapping, got {config!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed keys: {allowed}")
    kwargs = dict(config)
    if cls is DegradationConfig:
        return cls(**kwargs)  # nested dicts are converted with their paths in __post_init__
    if cls is StageConfig and "kernel" in kwargs:
        kwargs["kernel"] = _from_dict(KernelConfig, kwargs["kernel"], prefix + "kernel.")
    return cls(**kwargs)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_number(value, path: str, low: float | None = None, high: float | None = None) -> None:
    if not _is_number(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{path} must be a number {bounds}, got {value!r}")


def _check_prob(value, path: str) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{path} must be a probability in [0, 1], got {value!r}")


def _check_probs(value, path: str, n: int | None = None) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_number(v) and v >= 0 for v in value)
    if ok and n is not None:
        ok = len(value) == n
    if not ok or abs(sum(value) - 1.0) > 1e-6:
        count = f"{n} " if n is not None else ""
        raise ValueError(f"{path} must be a list of {count}non-negative probabilities summing to 1, got {value!r}")


def _check_range(
    value,
    path: str,
    low: float | None = None,
    high: float | None = None,
    contains: float | None = None,
    integer: bool = False,
    odd: bool = False,
) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
    if ok:
        lo, hi = value
        ok = lo <= hi and (low is None or lo >= low) and (high is None or hi <= high)
        ok = ok and (contains is None or lo <= contains <= hi)
        ok = ok and (not integer or all(isinstance(v, int) for v in value))
        ok = ok and (not odd or all(v % 2 == 1 for v in value))
    if not ok:
        rules = [f"{low if low is not None else '-inf'} <= low <= high <= {high if high is not None else 'inf'}"]
        if contains is not None:
            rules.append(f"low <= {contains} <= high")
        if integer:
            rules.append("integers")
        if odd:
            rules.append("both odd")
        raise ValueError(f"{path} must be a [low, high] pair with {', '.join(rules)}; got {value!r}")


def _check_choices(value, allowed: Sequence[str], path: str) -> None:
    if not isinstance(value, (list, tuple)) or not value or any(v not in allowed for v in value):
        raise ValueError(f"{path} must be a non-empty list with entries from {list(allowed)}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------------------------------------------- #


def _grid(pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Same centred coordinates as BasicSR mesh_grid: x runs along columns, y along rows.
    ax = torch.arange(pad_to, dtype=torch.float64) - pad_to // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _support_mask(kernel_size: torch.Tensor, pad_to: int) -> torch.Tensor:
    xx, yy = _grid(pad_to)
    half = (kernel_size.to(torch.float64) // 2).view(-1, 1, 1)
    return (xx.abs() <= half) & (yy.abs() <= half)


def blur_kernels(
    kernel_size: torch.Tensor,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: torch.Tensor,
    plateau: torch.Tensor,
    pad_to: int,
) -> torch.Tensor:
    """Bivariate (generalized / plateau) Gaussian kernels, one per sample, zero-padded to ``pad_to``.

    With ``Q = [x, y] S^-1 [x, y]^T`` and ``S = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``, the kernel is
    ``exp(-Q^beta / 2)`` (``beta = 1`` is the ordinary Gaussian) or ``1 / (1 + Q^beta)`` where ``plateau``, normalized
    to sum 1 over its ``kernel_size x kernel_size`` support (BasicSR ``bivariate_Gaussian``,
    ``bivariate_generalized_Gaussian``, ``bivariate_plateau``).

    Args:
        kernel_size: (B,) odd sizes <= ``pad_to``.
        sigma_x, sigma_y: (B,) standard deviations in pixels.
        theta: (B,) rotation in radians.
        beta: (B,) shape exponents (> 0).
        plateau: (B,) bool, plateau family instead of the (generalized) Gaussian one.
        pad_to: Odd output side.

    Returns:
        (B, pad_to, pad_to) float64 kernels, each summing to 1.
    """
    xx, yy = _grid(pad_to)
    sx2, sy2 = (sigma_x.double() ** 2).view(-1, 1, 1), (sigma_y.double() ** 2).view(-1, 1, 1)
    c, s = torch.cos(theta.double()).view(-1, 1, 1), torch.sin(theta.double()).view(-1, 1, 1)
    s11 = c * c * sx2 + s * s * sy2
    s12 = c * s * (sx2 - sy2)
    s22 = s * s * sx2 + c * c * sy2
    det = s11 * s22 - s12 * s12
    quad = (s22 * xx * xx - 2 * s12 * xx * yy + s11 * yy * yy) / det
    quad = quad.pow(beta.double().view(-1, 1, 1))
    kernel = torch.where(plateau.view(-1, 1, 1), 1.0 / (quad + 1.0), torch.exp(-0.5 * quad))
    kernel = kernel * _support_mask(kernel_size, pad_to)
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def sinc_kernels(kernel_size: torch.Tensor, cutoff: torch.Tensor, pad_to: int) -> torch.Tensor:
    """Circularly symmetric low-pass (2D sinc) kernels (BasicSR ``circular_lowpass_kernel``).

    ``k(r) = w J1(w r) / (2 pi r)`` with the limit ``w^2 / (4 pi)`` at ``r = 0``, normalized to sum 1 over the
    ``kernel_size x kernel_size`` support.

    Args:
        kernel_size: (B,) odd sizes <= ``pad_to``.
        cutoff: (B,) cutoff frequency ``w`` in rad/pixel (pi is Nyquist).
        pad_to: Odd output side.

    Returns:
        (B, pad_to, pad_to) float64 kernels, each summing to 1.
    """
    xx, yy = _grid(pad_to)
    r = torch.sqrt(xx * xx + yy * yy)
    w = cutoff.double().view(-1, 1, 1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r == 0, w * w / (4 * math.pi), kernel)
    kernel = kernel * _support_mask(kernel_size, pad_to)
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def _delta(batch: int, pad_to: int) -> torch.Tensor:
    kernel = torch.zeros(batch, pad_to, pad_to, dtype=torch.float64)
    kernel[:, pad_to // 2, pad_to // 2] = 1.0
    return kernel


def _trim(kernel: torch.Tensor) -> torch.Tensor:
    # Kernels are zero-padded to the largest size; dropping rings that are zero for the whole batch gives the same
    # convolution (reflect padding of a pixel does not depend on the pad width) at a fraction of the cost.
    k = kernel.shape[-1]
    nonzero = kernel.abs().amax(dim=0) > 0
    rows = torch.nonzero(nonzero.any(dim=1)).flatten()
    cols = torch.nonzero(nonzero.any(dim=0)).flatten()
    if rows.numel() == 0:
        return kernel
    half = k // 2
    ring = int(max(half - rows.min(), rows.max() - half, half - cols.min(), cols.max() - half))
    return kernel[:, half - ring : half + ring + 1, half - ring : half + ring + 1]


# --------------------------------------------------------------------------------------------------------------- #
# Image operations
# --------------------------------------------------------------------------------------------------------------- #


def _pad(img: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    # BasicSR filter2D reflect-pads; torch's reflect needs pad < size, which tiny intermediate images (strong
    # downscale of a small crop) can violate, where BasicSR would crash. Fall back to edge replication there.
    h, w = img.shape[-2:]
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(img, (pad_w, pad_w, pad_h, pad_h), mode=mode)


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate each image with its own kernel, reflect-padded to keep the size (BasicSR ``filter2D``).

    Args:
        img: (B, C, H, W) images.
        kernel: (B, k, k) per-sample kernels or (k, k) / (1, k, k) for the whole batch, ``k`` odd.

    Returns:
        (B, C, H, W) filtered images (not clamped).
    """
    b, c, h, w = img.shape
    if kernel.dim() == 2:
        kernel = kernel[None]
    k = kernel.shape[-1]
    if k % 2 == 0 or kernel.shape[-2] != k:
        raise ValueError(f"kernel must be square with an odd side, got shape {tuple(kernel.shape)}")
    kernel = kernel.to(device=img.device, dtype=img.dtype)
    padded = _pad(img, k // 2, k // 2)
    if kernel.shape[0] == 1:
        out = F.conv2d(padded.reshape(b * c, 1, *padded.shape[-2:]), kernel.view(1, 1, k, k))
    elif kernel.shape[0] == b:
        weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)
        out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c)
    else:
        raise ValueError(f"kernel batch {kernel.shape[0]} does not match image batch {b}")
    return out.view(b, c, h, w)


def _cv2_gaussian_1d(size: int) -> torch.Tensor:
    # cv2.getGaussianKernel(size, 0): sigma derived from the size, float64, normalized. USMSharp uses its outer
    # product as a 2D kernel; applying it separably gives the same result up to float32 summation order.
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _banded(g1d: torch.Tensor, n_out: int) -> torch.Tensor:
    # (n_out + k - 1, n_out) matrix M with M[i + j, i] = g[j], so x_padded @ M correlates rows with g.
    k = g1d.numel()
    out = torch.arange(n_out, device=g1d.device)
    matrix = g1d.new_zeros(n_out + k - 1, n_out)
    for j in range(k):
        matrix[out + j, out] = g1d[j]
    return matrix


def _separable_filter(img: torch.Tensor, g1d: torch.Tensor) -> torch.Tensor:
    b, c, h, w = img.shape
    k = g1d.numel()
    g1d = g1d.to(device=img.device, dtype=img.dtype)
    x = _pad(img, k // 2, k // 2).reshape(b * c, h + 2 * (k // 2), w + 2 * (k // 2))
    if max(h, w) <= 1024:
        # Single-channel convolutions with a 51-tap kernel are slow on CPU (oneDNN); a banded matmul does the same
        # sums ~5x faster at training crop sizes. Its cost grows with the side, so large images use convolutions.
        return (_banded(g1d, h).T @ (x @ _banded(g1d, w))).view(b, c, h, w)
    x = F.conv2d(x.unsqueeze(1), g1d.view(1, 1, k, 1))
    x = F.conv2d(x, g1d.view(1, 1, 1, k))
    return x.view(b, c, h, w)


def usm_sharp(img: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking with a soft threshold mask (BasicSR ``USMSharp`` semantics).

    ``out = m * clip(img + weight * (img - blur), 0, 1) + (1 - m) * img`` where ``m`` is the Gaussian-blurred binary
    mask ``|img - blur| * 255 > threshold``; the Gaussian is cv2's default for a ``radius``-pixel kernel.

    Args:
        img: (B, C, H, W) in [0, 1].
        radius: Gaussian kernel side in pixels (made odd).
        weight: Residual weight.
        threshold: Mask threshold on the 0..255 scale.

    Returns:
        (B, C, H, W) in [0, 1].
    """
    if radius % 2 == 0:
        radius += 1
    g1d = _cv2_gaussian_1d(radius)
    blur = _separable_filter(img, g1d)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = _separable_filter(mask, g1d)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# JPEG: why a torch re-implementation of BasicSR's DiffJPEG and not PIL/libjpeg per image.
# StableSR and Real-ESRGAN were trained with DiffJPEG, whose artifacts differ from libjpeg's in ways that change the
# distribution: the quality is continuous and the table scale is neither floored nor clamped to [1, 255] (at q=95 the
# luma DC step is 1.6 vs libjpeg's 2), the luma table is applied transposed, chroma is upsampled by pixel repetition
# (libjpeg decodes with "fancy" triangular upsampling), borders are zero-padded to 16 px (libjpeg replicates edges)
# and the output is not rounded to 8 bits. Matching DiffJPEG reproduces the training distribution (the benchmark
# script checks it against DiffJPEG: max difference ~1e-4); it also stays batched on the input's device, where PIL
# would need a GPU -> CPU -> GPU round trip per image and integer qualities.

# Standard JPEG (ITU T.81 Annex K) quantization tables in natural order: row = vertical frequency.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)


def _dct_matrix() -> torch.Tensor:
    u = torch.arange(8, dtype=torch.float64).view(8, 1)
    x = torch.arange(8, dtype=torch.float64).view(1, 8)
    mat = torch.cos((2 * x + 1) * u * math.pi / 16) * 0.5
    mat[0] *= 1 / math.sqrt(2)
    return mat  # orthonormal: mat @ mat.T == I


def _quality_to_factor(quality: torch.Tensor) -> torch.Tensor:
    # libjpeg's quality scaling, but continuous and without libjpeg's flooring / clamping of the scaled table, as in
    # BasicSR DiffJPEG. Quality 100 would give a zero table; a tiny floor makes it (nearly) lossless instead of NaN.
    factor = torch.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality) / 100.0
    return factor.clamp_min(1e-6)


def _jpeg_channel(channel: torch.Tensor, table: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    b, h, w = channel.shape
    dct = _dct_matrix()
    # 2D DCT of each row-major flattened 8x8 block as one (N, 64) x (64, 64) product: kron(C, C) vec(B) = vec(C B C^T).
    basis = torch.kron(dct, dct).to(device=channel.device, dtype=channel.dtype)
    blocks = (channel - 128).view(b, h // 8, 8, w // 8, 8).transpose(2, 3).reshape(b, -1, 64)
    coeffs = blocks @ basis.T
    step = (table.reshape(1, 1, 64).to(device=channel.device, dtype=channel.dtype)) * factor.view(b, 1, 1)
    coeffs = torch.round(coeffs / step) * step
    blocks = (coeffs @ basis).view(b, h // 8, w // 8, 8, 8)
    return blocks.transpose(2, 3).reshape(b, h, w) + 128


def jpeg_compress(img: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
    """Batched JPEG round trip in torch with BasicSR ``DiffJPEG(differentiable=False)`` semantics.

    Steps: zero-pad to a multiple of 16, RGB -> YCbCr (JFIF), 2x2 average chroma subsampling (4:2:0), 8x8 DCT,
    quantization with the standard tables scaled by the (continuous) quality, rounding, dequantization, inverse DCT,
    nearest chroma upsampling, YCbCr -> RGB, clamp. The quantization tables are indexed transposed relative to
    the standard (row = horizontal frequency), exactly as DiffJPEG does, so the artifact statistics match the
    official StableSR / Real-ESRGAN training.

    Args:
        img: (B, 3, H, W) RGB in [0, 1].
        quality: (B,) or scalar JPEG quality in [1, 100], may be fractional.

    Returns:
        (B, 3, H, W) in [0, 1] (not rounded to 8-bit levels, as in DiffJPEG).
    """
    b, _, h, w = img.shape
    dtype = img.dtype if img.dtype in (torch.float32, torch.float64) else torch.float32
    quality = torch.as_tensor(quality, dtype=dtype, device=img.device).expand(b)
    factor = _quality_to_factor(quality)
    x = F.pad(img.to(dtype), (0, (-w) % 16, 0, (-h) % 16)) * 255
    r, g, bl = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128
    cb = F.avg_pool2d(cb.unsqueeze(1), 2).squeeze(1)
    cr = F.avg_pool2d(cr.unsqueeze(1), 2).squeeze(1)
    luma_table = torch.tensor(_LUMA_TABLE, dtype=dtype).T
    chroma_table = torch.tensor(_CHROMA_TABLE, dtype=dtype).T
    y = _jpeg_channel(y, luma_table, factor)
    cb = _jpeg_channel(cb, chroma_table, factor).repeat_interleave(2, -2).repeat_interleave(2, -1) - 128
    cr = _jpeg_channel(cr, chroma_table, factor).repeat_interleave(2, -2).repeat_interleave(2, -1) - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return (rgb.clamp(0, 255) / 255)[..., :h, :w].to(img.dtype)


def _rgb_to_gray(img: torch.Tensor) -> torch.Tensor:
    # torchvision rgb_to_grayscale weights (used by BasicSR's Poisson gray noise).
    return (0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]).to(img.dtype)


def _poisson_noise(base: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # BasicSR generate_poisson_noise_pt: quantize to 8-bit, use 2^ceil(log2(#distinct levels)) photon levels.
    base = (base * 255).round().clamp(0, 255) / 255
    levels = torch.bincount((base * 255).round().long().flatten(), minlength=256).count_nonzero()
    vals = torch.exp2(torch.ceil(torch.log2(levels.to(base.dtype))))
    return torch.poisson(base * vals, generator=generator) / vals - base


def add_noise(
    img: torch.Tensor,
    gaussian: torch.Tensor,
    sigma: torch.Tensor,
    poisson_scale: torch.Tensor,
    gray: torch.Tensor,
    seed: torch.Tensor,
) -> torch.Tensor:
    """Add per-sample Gaussian or Poisson noise and clamp (BasicSR ``random_add_{gaussian,poisson}_noise_pt``).

    Gaussian: ``N(0, (sigma / 255)^2)`` per pixel. Poisson: the image is quantized to 8-bit levels, ``L`` is
    ``2^ceil(log2(#distinct levels))`` and the noise is ``(Poisson(x L) / L - x) * poisson_scale``. Gray noise is one
    field shared by the three channels (from the luma for Poisson). BasicSR draws a single gray Gaussian field for
    the whole batch; here each sample gets its own, which leaves each image's distribution unchanged.

    Args:
        img: (B, C, H, W) in [0, 1].
        gaussian: (B,) bool, Gaussian (True) or Poisson (False).
        sigma: (B,) Gaussian standard deviation on the 0..255 scale.
        poisson_scale: (B,) Poisson noise multiplier.
        gray: (B,) bool, channel-shared noise.
        seed: (B,) int seeds; the noise of sample i depends only on ``seed[i]`` and its image.

    Returns:
        (B, C, H, W) in [0, 1].
    """
    b, c, h, w = img.shape
    noise = torch.empty_like(img)
    for i in range(b):
        generator = torch.Generator(device=img.device)
        generator.manual_seed(int(seed[i]))
        is_gray = bool(gray[i])
        if bool(gaussian[i]):
            shape = (1, 1 if is_gray else c, h, w)
            n = torch.randn(shape, generator=generator, device=img.device, dtype=img.dtype)
            n = n * (float(sigma[i]) / 255.0)
        else:
            base = _rgb_to_gray(img[i : i + 1]) if is_gray else img[i : i + 1]
            n = _poisson_noise(base, generator) * float(poisson_scale[i])
        noise[i] = n[0].expand(c, h, w)
    return (img + noise).clamp(0, 1)


def _add_noise(img: torch.Tensor, stage: StageParams) -> torch.Tensor:
    return add_noise(img, stage.gaussian, stage.noise_sigma, stage.poisson_scale, stage.gray_noise, stage.noise_seed)


# --------------------------------------------------------------------------------------------------------------- #
# Sampling and application
# --------------------------------------------------------------------------------------------------------------- #


@dataclass
class StageParams:
    """Random choices of one stage for a batch of B samples (CPU tensors).

    Attributes:
        kernel: (B, k, k) float64 blur kernels; an identity (delta) kernel where the sample is not blurred.
        kernel_type: B names: a :data:`KERNEL_TYPES` entry, ``"sinc"`` or ``"none"`` (not blurred).
        kernel_size: (B,) support side of each kernel (1 for ``"none"``).
        resize: ``"up"``, ``"down"`` or ``"keep"`` for the whole batch.
        resize_scale: Scale factor for the whole batch (1 for ``"keep"``).
        resize_mode: Interpolation mode for the whole batch.
        gaussian: (B,) bool, Gaussian (True) or Poisson (False) noise.
        noise_sigma: (B,) Gaussian sigma on the 0..255 scale.
        poisson_scale: (B,) Poisson noise multiplier.
        gray_noise: (B,) bool, channel-shared noise.
        noise_seed: (B,) int64 seeds of the per-sample pixel noise.
        jpeg_quality: (B,) float JPEG quality.
    """

    kernel: torch.Tensor
    kernel_type: list[str]
    kernel_size: torch.Tensor
    resize: str
    resize_scale: float
    resize_mode: str
    gaussian: torch.Tensor
    noise_sigma: torch.Tensor
    poisson_scale: torch.Tensor
    gray_noise: torch.Tensor
    noise_seed: torch.Tensor
    jpeg_quality: torch.Tensor


@dataclass
class DegradationParams:
    """All random choices for a batch; :func:`apply` is deterministic given these.

    Attributes:
        stages: One :class:`StageParams` per configured stage.
        final_sinc: (B, k, k) float64 final sinc kernels (delta where not applied).
        final_sinc_applied: (B,) bool.
        final_resize_mode: Interpolation mode of the final resize, whole batch.
        sinc_before_jpeg: (B,) bool, True for "[resize back + sinc] then JPEG" in the last stage.
        no_degradation: (B,) bool, LQ replaced by the clean downsampled GT.
        crop: (B, 2) uniform numbers in [0, 1) locating the paired crop (top, left).
    """

    stages: list[StageParams]
    final_sinc: torch.Tensor
    final_sinc_applied: torch.Tensor
    final_resize_mode: str
    sinc_before_jpeg: torch.Tensor
    no_degradation: torch.Tensor
    crop: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.no_degradation.shape[0]


class _Draws:
    """Uniform draws from one generator, always in the same order and amount, so forcing one branch's probability
    does not shift the random stream of the other branches."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, device=self.device).cpu().double()
        return low + (high - low) * u

    def seeds(self, n: int) -> torch.Tensor:
        return torch.randint(0, 2**62, (n,), generator=self.generator, device=self.device).cpu()


def _categorical(u: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    edges = torch.tensor(probs, dtype=torch.float64).cumsum(0)[:-1] / sum(probs)
    return (u.view(-1, 1) >= edges.view(1, -1)).sum(dim=1)


def _pick(mask: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.where(mask, torch.tensor(float(a), dtype=torch.float64), torch.tensor(float(b), dtype=torch.float64))


def _odd_sizes(size_range: tuple[int, int]) -> torch.Tensor:
    return torch.arange(size_range[0], size_range[1] + 1, 2)


def _sample_kernels(cfg: KernelConfig, blur_prob: float, batch: int, draws: _Draws):
    sizes = _odd_sizes(cfg.kernel_size_range)
    kernel_size = sizes[(draws.uniform(batch) * len(sizes)).long().clamp_max(len(sizes) - 1)]
    is_sinc = draws.uniform(batch) < cfg.sinc_prob
    u_cut = draws.uniform(batch)
    type_index = _categorical(draws.uniform(batch), cfg.kernel_prob)
    u_sx, u_sy, u_theta = draws.uniform(batch), draws.uniform(batch), draws.uniform(batch)
    u_branch, u_beta = draws.uniform(batch), draws.uniform(batch)
    blurred = draws.uniform(batch) < blur_prob

    names = [cfg.kernel_list[i] for i in type_index.tolist()]
    aniso = torch.tensor([n in _ANISOTROPIC for n in names])
    generalized = torch.tensor([n in _GENERALIZED for n in names])
    plateau = torch.tensor([n in _PLATEAU for n in names])
    lo, hi = cfg.sigma_range
    sigma_x = lo + (hi - lo) * u_sx
    sigma_y = torch.where(aniso, lo + (hi - lo) * u_sy, sigma_x)
    theta = torch.where(aniso, math.pi * (2 * u_theta - 1), torch.zeros_like(u_theta))
    beta_lo = _pick(plateau, cfg.betap_range[0], cfg.betag_range[0])
    beta_hi = _pick(plateau, cfg.betap_range[1], cfg.betag_range[1])
    lower = u_branch < 0.5
    beta = torch.where(lower, beta_lo + (1 - beta_lo) * u_beta, 1 + (beta_hi - 1) * u_beta)
    beta = torch.where(generalized | plateau, beta, torch.ones_like(beta))

    large = kernel_size >= _SINC_LARGE_KERNEL_SIZE
    c_lo = _pick(large, cfg.sinc_cutoff_range_large[0], cfg.sinc_cutoff_range[0])
    c_hi = _pick(large, cfg.sinc_cutoff_range_large[1], cfg.sinc_cutoff_range[1])
    cutoff = math.pi * (c_lo + (c_hi - c_lo) * u_cut)

    pad_to = cfg.kernel_size_range[1]
    kernel = torch.where(
        is_sinc.view(-1, 1, 1),
        sinc_kernels(kernel_size, cutoff, pad_to),
        blur_kernels(kernel_size, sigma_x, sigma_y, theta, beta, plateau, pad_to),
    )
    kernel = torch.where(blurred.view(-1, 1, 1), kernel, _delta(batch, pad_to))
    flags = zip(names, is_sinc.tolist(), blurred.tolist(), strict=True)
    kernel_type = [("sinc" if sinc else name) if keep else "none" for name, sinc, keep in flags]
    kernel_size = torch.where(blurred, kernel_size, torch.ones_like(kernel_size))
    return kernel, kernel_type, kernel_size


def _sample_stage(cfg: StageConfig, batch: int, draws: _Draws) -> StageParams:
    kernel, kernel_type, kernel_size = _sample_kernels(cfg.kernel, cfg.blur_prob, batch, draws)
    choice = ("up", "down", "keep")[int(_categorical(draws.uniform(1), cfg.resize_prob))]
    u_scale = float(draws.uniform(1))
    if choice == "up":
        scale = 1 + (cfg.resize_range[1] - 1) * u_scale
    elif choice == "down":
        scale = cfg.resize_range[0] + (1 - cfg.resize_range[0]) * u_scale
    else:
        scale = 1.0
    mode = cfg.resize_modes[min(int(float(draws.uniform(1)) * len(cfg.resize_modes)), len(cfg.resize_modes) - 1)]
    return StageParams(
        kernel=kernel,
        kernel_type=kernel_type,
        kernel_size=kernel_size,
        resize=choice,
        resize_scale=scale,
        resize_mode=mode,
        gaussian=draws.uniform(batch) < cfg.gaussian_noise_prob,
        noise_sigma=draws.uniform(batch, *cfg.noise_range),
        poisson_scale=draws.uniform(batch, *cfg.poisson_scale_range),
        gray_noise=draws.uniform(batch) < cfg.gray_noise_prob,
        noise_seed=draws.seeds(batch),
        jpeg_quality=draws.uniform(batch, *cfg.jpeg_range),
    )


def sample_params(
    config: DegradationConfig, batch_size: int, generator: torch.Generator | None = None
) -> DegradationParams:
    """Draw every random choice of the degradation for a batch.

    Args:
        config: The degradation table.
        batch_size: Number of samples B.
        generator: Source of randomness, on any device (draws are copied to CPU). ``None`` uses torch's global RNG.
            The same generator state gives identical params, and :func:`apply` then gives bit-identical outputs on
            the same device.

    Returns:
        :class:`DegradationParams` holding CPU tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    draws = _Draws(generator)
    stages = [_sample_stage(stage, batch_size, draws) for stage in config.stages]
    sizes = _odd_sizes(config.final_sinc.kernel_size_range)
    applied = draws.uniform(batch_size) < config.final_sinc_prob
    size = sizes[(draws.uniform(batch_size) * len(sizes)).long().clamp_max(len(sizes) - 1)]
    lo, hi = config.final_sinc.cutoff_range
    cutoff = math.pi * draws.uniform(batch_size, lo, hi)
    pad_to = config.final_sinc.kernel_size_range[1]
    final_sinc = torch.where(applied.view(-1, 1, 1), sinc_kernels(size, cutoff, pad_to), _delta(batch_size, pad_to))
    modes = config.final_resize_modes
    final_mode = modes[min(int(float(draws.uniform(1)) * len(modes)), len(modes) - 1)]
    return DegradationParams(
        stages=stages,
        final_sinc=final_sinc,
        final_sinc_applied=applied,
        final_resize_mode=final_mode,
        sinc_before_jpeg=draws.uniform(batch_size) < config.sinc_before_jpeg_prob,
        no_degradation=draws.uniform(batch_size) < config.no_degradation_prob,
        crop=draws.uniform(2 * batch_size).view(batch_size, 2),
    )


def _blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    kernel = _trim(kernel)
    if kernel.shape[-1] == 1 and bool((kernel == 1).all()):
        return img
    return filter2d(img, kernel)


def _check_image(gt: torch.Tensor, scale: int) -> None:
    if gt.dim() != 4 or gt.shape[1] != 3 or not gt.is_floating_point():
        raise ValueError(f"gt must be a float (B, 3, H, W) tensor in [0, 1], got {tuple(gt.shape)} {gt.dtype}")
    if gt.shape[-2] % scale or gt.shape[-1] % scale:
        raise ValueError(f"gt height and width {tuple(gt.shape[-2:])} must be multiples of scale={scale}")


def _degrade(src: torch.Tensor, params: DegradationParams, config: DegradationConfig) -> torch.Tensor:
    b, _, h, w = src.shape
    if params.batch_size != b:
        raise ValueError(f"params are for batch size {params.batch_size}, but the images have batch size {b}")
    if len(params.stages) != len(config.stages):
        raise ValueError(f"params have {len(params.stages)} stages but the config has {len(config.stages)}")
    lq_size = (h // config.scale, w // config.scale)
    out = src
    last = len(config.stages) - 1
    for index, stage in enumerate(params.stages):
        out = _blur(out, stage.kernel)
        # Stage 1 resizes by a factor of the current size; later stages to a size relative to gt / scale
        # (Real-ESRGAN feed_data). Same F.interpolate calls, so 'area'/'bicubic' sample positions match.
        if index == 0:
            out = F.interpolate(out, scale_factor=stage.resize_scale, mode=stage.resize_mode)
        else:
            size = (int(h / config.scale * stage.resize_scale), int(w / config.scale * stage.resize_scale))
            out = F.interpolate(out, size=size, mode=stage.resize_mode)
        out = _add_noise(out, stage)
        if index != last:
            out = jpeg_compress(out.clamp(0, 1), stage.jpeg_quality)
            continue

        # Real-ESRGAN groups [resize back + sinc] and orders it before or after the last JPEG; other orders
        # (e.g. sinc, JPEG, resize) produced twisted lines in their experiments.
        def resize_sinc(x, kernel):
            return _blur(F.interpolate(x, size=lq_size, mode=params.final_resize_mode), kernel)

        first = params.sinc_before_jpeg
        quality = stage.jpeg_quality
        result = out.new_empty(b, out.shape[1], *lq_size)
        for order in (True, False):
            idx = torch.nonzero(first == order).flatten()
            if idx.numel() == 0:
                continue
            x = out[idx.to(out.device)]
            if order:
                x = jpeg_compress(resize_sinc(x, params.final_sinc[idx]).clamp(0, 1), quality[idx])
            else:
                x = resize_sinc(jpeg_compress(x.clamp(0, 1), quality[idx]), params.final_sinc[idx])
            result[idx.to(out.device)] = x
        out = result
    return out


def apply(
    gt: torch.Tensor, params: DegradationParams, config: DegradationConfig, gt_usm: torch.Tensor | None = None
) -> torch.Tensor:
    """Degrade a batch deterministically with pre-drawn params.

    Args:
        gt: (B, 3, H, W) float in [0, 1]; H and W multiples of ``config.scale``.
        params: From :func:`sample_params` with the same batch size.
        config: The table the params were drawn from.
        gt_usm: Optional precomputed ``usm_sharp(gt)`` (used as the source when ``config.use_usm``).

    Returns:
        lq: (B, 3, H / scale, W / scale) in [0, 1], float32 unless ``gt`` is float64; rounded to 8-bit levels if
        ``config.round_lq``. Samples flagged ``params.no_degradation`` (or whose degradation produced NaN, which
        StableSR also replaces) get the area-downsampled (sharpened) GT instead. StableSR substitutes the GT after
        upsampling the LQ back to GT size, so a training script that wants parity uses the target itself as the
        upsampled LQ for those samples (`RealESRGANDegradation(..., return_replaced=True)` says which; that is
        what `train/train_sft.py` does).
    """
    return _apply(gt, params, config, gt_usm)[0]


def _apply(
    gt: torch.Tensor, params: DegradationParams, config: DegradationConfig, gt_usm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_image(gt, config.scale)
    dtype = torch.float64 if gt.dtype == torch.float64 else torch.float32
    gt = gt.to(dtype)
    if config.use_usm:
        src = gt_usm.to(dtype) if gt_usm is not None else _usm(gt, config)
    else:
        src = gt
    lq = _degrade(src, params, config).clamp(0, 1)
    b = gt.shape[0]
    clean = F.interpolate(src, size=lq.shape[-2:], mode="area")
    bad = _replaced(lq, params)
    lq = torch.where(bad.view(b, 1, 1, 1), clean, lq)
    if config.round_lq:
        lq = (lq * 255).round().clamp(0, 255) / 255
    return lq, bad


def _replaced(degraded: torch.Tensor, params: DegradationParams) -> torch.Tensor:
    """(B,) bool: the samples [`apply`] replaces by the clean GT (drawn ``no_degradation`` or a NaN in the result).

    StableSR draws the no-degradation coin once per batch (``random.random() < no_degradation_prob`` in
    ``get_input``); we draw it per sample, which keeps the expected fraction and decouples it from the batch size.
    """
    return torch.isnan(degraded).flatten(1).any(dim=1) | params.no_degradation.to(degraded.device)


def _usm(gt: torch.Tensor, config: DegradationConfig) -> torch.Tensor:
    return usm_sharp(gt, config.usm_radius, config.usm_weight, config.usm_threshold)


def _paired_crop(lq: torch.Tensor, gt: torch.Tensor, crop: torch.Tensor, gt_size: int, scale: int):
    lq_size = gt_size // scale
    h, w = lq.shape[-2:]
    lq_out, gt_out = [], []
    for i in range(lq.shape[0]):
        top = min(int(float(crop[i, 0]) * (h - lq_size + 1)), h - lq_size)
        left = min(int(float(crop[i, 1]) * (w - lq_size + 1)), w - lq_size)
        lq_out.append(lq[i, :, top : top + lq_size, left : left + lq_size])
        gt_out.append(gt[i, :, top * scale : (top + lq_size) * scale, left * scale : (left + lq_size) * scale])
    return torch.stack(lq_out), torch.stack(gt_out)


class RealESRGANDegradation(nn.Module):
    """Parameter-free module synthesizing (LQ, target) training pairs on the device of its input.

    Example::

        degrade = RealESRGANDegradation(DegradationConfig.from_yaml("configs/degradation/stablesr.yaml"))
        generator = torch.Generator(device=gt.device).manual_seed(0)
        lq, gt_usm = degrade(gt, generator)

    Args:
        config: The degradation table; defaults to StableSR 512.
    """

    def __init__(self, config: DegradationConfig | None = None):
        super().__init__()
        self.config = config if config is not None else DegradationConfig()

    @torch.no_grad()
    def forward(
        self, gt: torch.Tensor, generator: torch.Generator | None = None, return_replaced: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """
        Args:
            gt: (B, 3, H, W) float in [0, 1], H and W multiples of ``scale``.
            generator: Source of all randomness (any device); ``None`` uses torch's global RNG.

        Returns:
            lq: (B, 3, h, w) in [0, 1] with ``h = min(H, gt_size) / scale``.
            gt_usm: (B, 3, scale * h, scale * w) training target in [0, 1]: the USM-sharpened GT if
                ``config.use_usm`` (else the GT), cropped at the same location as ``lq``.
            replaced: only with ``return_replaced=True``: (B,) bool, the samples whose ``lq`` is the clean
                downsampled target (no-degradation draw or NaN); StableSR trains those with the target itself as
                the upsampled LQ.
        """
        config = self.config
        _check_image(gt, config.scale)
        params = sample_params(config, gt.shape[0], generator)
        gt = gt.to(torch.float64 if gt.dtype == torch.float64 else torch.float32)
        target = _usm(gt, config) if config.use_usm else gt
        lq, replaced = _apply(gt, params, config, gt_usm=target)
        if config.gt_size is not None and max(gt.shape[-2:]) > config.gt_size:
            if min(gt.shape[-2:]) < config.gt_size:
                raise ValueError(f"gt {tuple(gt.shape[-2:])} is smaller than gt_size={config.gt_size} on one side")
            lq, target = _paired_crop(lq, target, params.crop, config.gt_size, config.scale)
        if return_replaced:
            return lq.contiguous(), target.contiguous(), replaced
        return lq.contiguous(), target.contiguous()

    def extra_repr(self) -> str:
        return f"scale={self.config.scale}, stages={len(self.config.stages)}, use_usm={self.config.use_usm}"


# --------------------------------------------------------------------------------------------------------------- #
# Folder export
# --------------------------------------------------------------------------------------------------------------- #


def _seed_for(seed: int, name: str, index: int) -> int:
    # Derived from the file name, not its position, so adding files does not change the pairs of the others.
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _to_pil(img: torch.Tensor):
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image, rounded."""
    from PIL import Image

    array = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def degrade_folder(
    hq_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: DegradationConfig | None = None,
    seed: int = 0,
    num_per_image: int = 1,
    crop: int | None = None,
    overwrite: bool = False,
) -> list[tuple[Path, Path]]:
    """Write LQ/HQ pairs for every image of a folder, for inspection.

    Writes ``out_dir/lq/NAME.png`` and ``out_dir/hq/NAME.png`` (``NAME_k`` with ``k = 0..num_per_image-1`` when
    more than one pair per image). HQ is the training target (USM-sharpened when ``config.use_usm``), mod-cropped to
    a multiple of ``scale``. Pairs are reproducible per file name and ``seed``. Images are read by
    [`~stablesr.image_io.load_image`] (EXIF orientation, ICC, 16-bit) and written by [`~stablesr.image_io.save_image`]
    (atomically), HQ first. Unreadable files are skipped with a warning; an existing pair is kept unless
    ``overwrite``, and half a pair (left by a killed run) is made again, so a rerun completes an interrupted one with
    the same files. Do not run two of these on one ``out_dir`` at the same time.

    Args:
        hq_dir: Folder of clean images (the top level; the extensions of [`~stablesr.image_io.IMAGE_EXTENSIONS`]).
        out_dir: Output root.
        config: Degradation table (StableSR 512 by default). Its ``gt_size`` is ignored here; use ``crop``.
        seed: Base seed.
        num_per_image: Number of degraded versions per image.
        crop: Side of a random square crop (multiple of ``scale``) taken before degradation; images smaller than
            it are reflect-padded first. ``None`` degrades the whole image.
        overwrite: Replace existing outputs.

    Returns:
        The (lq_path, hq_path) pairs written.
    """
    config = config if config is not None else DegradationConfig()
    if num_per_image < 1:
        raise ValueError(f"num_per_image must be >= 1, got {num_per_image}")
    if crop is not None and (crop < config.scale or crop % config.scale):
        raise ValueError(f"crop must be None or a positive multiple of scale={config.scale}, got {crop}")
    hq_dir, out_dir = Path(hq_dir), Path(out_dir)
    (out_dir / "lq").mkdir(parents=True, exist_ok=True)
    (out_dir / "hq").mkdir(parents=True, exist_ok=True)
    try:
        paths = iter_image_files(hq_dir)
    except FileNotFoundError:
        if not hq_dir.is_dir():
            raise
        paths = []  # a folder without images: nothing to write
    written = []
    for path in paths:
        try:
            array = np.asarray(load_image(path).rgb, dtype=np.float32) / 255.0
        except (ImageLoadError, OSError) as err:
            logger.warning(f"skipping unreadable image {path}: {err}")
            continue
        image = torch.from_numpy(array).permute(2, 0, 1)[None]
        for k in range(num_per_image):
            name = path.stem if num_per_image == 1 else f"{path.stem}_{k}"
            lq_path, hq_path = out_dir / "lq" / f"{name}.png", out_dir / "hq" / f"{name}.png"
            if not overwrite and lq_path.exists() and hq_path.exists():
                logger.info(f"keeping existing pair {name} (pass overwrite=True to replace it)")
                continue
            # Half a pair is what a killed run leaves (HQ is written first): make both again (same seed, same
            # files), and drop the hidden temporaries such a run left for them.
            for out_path in (lq_path, hq_path):
                remove_stale_temporaries(out_path.parent, out_path.name)
            generator = torch.Generator().manual_seed(_seed_for(seed, path.name, k))
            gt = image
            if crop is not None:
                gt = pad_to(gt, crop, crop)
                h, w = gt.shape[-2:]
                u = torch.rand(2, generator=generator, dtype=torch.float64)
                top, left = int(u[0] * (h - crop + 1)), int(u[1] * (w - crop + 1))
                gt = gt[..., top : top + crop, left : left + crop]
            h, w = gt.shape[-2:]
            gt = gt[..., : h - h % config.scale, : w - w % config.scale]
            if gt.shape[-1] == 0 or gt.shape[-2] == 0:
                logger.warning(f"skipping {path}: smaller than the scale factor {config.scale}")
                break
            params = sample_params(config, 1, generator)
            target = _usm(gt, config) if config.use_usm else gt
            lq = apply(gt, params, config, gt_usm=target)
            save_image(_to_pil(target[0]), hq_path, overwrite=True)
            save_image(_to_pil(lq[0]), lq_path, overwrite=True)
            written.append((lq_path, hq_path))
    return written
