"""What the folder datasets and the tar shards share: seeding, decoding through `image_io`, crops, bad-sample log.

Images are held as (3, H, W) uint8 tensors until the crop, which turns into float32 in [0, 1] (``v / 255``).
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import random
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image

from ..image_io import ImageLoadError, decode_image_bytes, load_image
from ..image_processor import pad_to

logger = logging.get_logger(__name__)

SMALL_IMAGE_MODES = ("pad", "skip")


class BadSampleError(ValueError):
    """A training sample that cannot be used (unreadable, corrupt or too small); it is skipped, never fatal."""


# ---------------------------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _rng(*parts) -> random.Random:
    return random.Random(_seed(*parts))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding: files and shard members both through image_io (EXIF, ICC, 16-bit, CMYK handled identically)
# ---------------------------------------------------------------------------------------------------------------------


def _as_tensor(rgb: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 view of an 8-bit RGB image."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 of an image file, as [`~stablesr.image_io.load_image`] decodes it."""
    try:
        return _as_tensor(load_image(path).rgb)
    except (ImageLoadError, OSError) as err:
        raise BadSampleError(str(err)) from err


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """(3, H, W) uint8 of an image file held in memory, decoded exactly as [`read_image`] decodes a file."""
    try:
        return _as_tensor(decode_image_bytes(data, name).rgb)
    except (ImageLoadError, OSError) as err:
        raise BadSampleError(str(err)) from err


# ---------------------------------------------------------------------------------------------------------------------
# Checks and crops
# ---------------------------------------------------------------------------------------------------------------------


def _check_small_images(small_images: str) -> None:
    if small_images not in SMALL_IMAGE_MODES:
        raise ValueError(f"small_images must be one of {SMALL_IMAGE_MODES}, got {small_images!r}")


def _check_size(image: torch.Tensor, name: str, min_pixels: int, gt_size: int, small: str) -> None:
    """Apply the ``min_pixels`` and ``small_images="skip"`` filters to a decoded (3, H, W) image."""
    h, w = image.shape[-2:]
    if min_pixels and h * w < min_pixels:
        raise BadSampleError(f"{name} is {w}x{h} px, below min_pixels={min_pixels}")
    if small == "skip" and (h < gt_size or w < gt_size):
        raise BadSampleError(f"{name} is {w}x{h} px, smaller than the {gt_size} px crop (small_images='skip')")


def _check_scale(lq: torch.Tensor, gt: torch.Tensor, scale: int, lq_name: str, gt_name: str) -> None:
    lh, lw = lq.shape[-2:]
    gh, gw = gt.shape[-2:]
    if (gh, gw) != (lh * scale, lw * scale):
        raise ValueError(
            f"scale mismatch in paired data: GT '{gt_name}' is {gw}x{gh} px but LQ '{lq_name}' is {lw}x{lh} px; "
            f"with scale={scale} the GT must be exactly {lw * scale}x{lh * scale}. Fix the pair or the source's "
            "'scale' setting"
        )


def _to_float(crop: torch.Tensor) -> torch.Tensor:
    return crop.float().div_(255.0)


def _crop_hq(image: torch.Tensor, gt_size: int, rng: random.Random, use_hflip: bool) -> torch.Tensor:
    """A random ``gt_size`` crop (+ horizontal flip) of a (3, H, W) uint8 image, reflect-padded first when smaller."""
    image = pad_to(image, gt_size, gt_size)
    top = rng.randint(0, image.shape[-2] - gt_size)
    left = rng.randint(0, image.shape[-1] - gt_size)
    crop = image[:, top : top + gt_size, left : left + gt_size]
    if use_hflip and rng.random() < 0.5:
        crop = crop.flip(-1)
    return _to_float(crop)


def _crop_paired(
    lq: torch.Tensor, gt: torch.Tensor, gt_size: int, scale: int, rng: random.Random, use_hflip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops: the LQ crop of side ``gt_size / scale`` at (top, left) and the GT crop at scale x (top, left)."""
    lq_size = gt_size // scale
    lq = pad_to(lq, lq_size, lq_size)
    gt = pad_to(gt, lq.shape[-2] * scale, lq.shape[-1] * scale)
    top = rng.randint(0, lq.shape[-2] - lq_size)
    left = rng.randint(0, lq.shape[-1] - lq_size)
    lq_crop = lq[:, top : top + lq_size, left : left + lq_size]
    gt_crop = gt[:, top * scale : (top + lq_size) * scale, left * scale : (left + lq_size) * scale]
    if use_hflip and rng.random() < 0.5:
        lq_crop, gt_crop = lq_crop.flip(-1), gt_crop.flip(-1)
    return _to_float(lq_crop), _to_float(gt_crop)


# ---------------------------------------------------------------------------------------------------------------------
# Bad-file bookkeeping shared by the DataLoader workers of one process
# ---------------------------------------------------------------------------------------------------------------------


class _SkipLog:
    """One flag per file plus a skip counter, in shared memory so every DataLoader worker sees them.

    A file is logged the first time any worker finds it bad; later hits are only counted. The arrays are inherited
    by (forked or spawned) DataLoader workers; separate training processes (ranks) keep their own.
    """

    def __init__(self, size: int, name: str):
        ctx = multiprocessing.get_context()
        self.name = name
        self.flags = ctx.Array(ctypes.c_bool, max(size, 1), lock=True)
        self.skips = ctx.Value(ctypes.c_long, 0, lock=True)

    def report(self, index: int, reason: str) -> None:
        """Flag a bad file (logged the first time)."""
        with self.flags.get_lock():
            first = not self.flags[index]
            self.flags[index] = True
        if first:
            logger.warning(f"{self.name}: skipping bad sample ({reason}); another sample is used instead")

    def count_replacement(self) -> None:
        with self.skips.get_lock():
            self.skips.value += 1

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[index])

    @property
    def num_bad_files(self) -> int:
        with self.flags.get_lock():
            return int(sum(self.flags[:]))

    @property
    def num_skips(self) -> int:
        return int(self.skips.value)
