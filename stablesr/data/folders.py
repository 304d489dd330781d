"""Map-style datasets over image folders: HQ images (degraded in the training step), paired LQ/GT folders, mixtures.

Every random choice of an item (crop position, flip, substitute for a bad file) is drawn from a generator seeded by
``(seed, epoch, index)``, so items do not depend on the number of workers or processes, and a resumed run sees the
same data as an uninterrupted one. Bad files (unreadable, corrupt, too small) are validated lazily: the first time
one is met it is logged once, counted, and another sample is returned instead; the counters are shared by all
DataLoader workers of a process (see [`ImageFolderBase.skip_summary`]).
"""

from __future__ import annotations

import bisect
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.utils import logging
from torch.utils.data import Dataset

from ..image_io import iter_image_files
from .common import (
    BadSampleError,
    _check_scale,
    _check_size,
    _check_small_images,
    _crop_hq,
    _crop_paired,
    _rng,
    _SkipLog,
    read_image,
)

logger = logging.get_logger(__name__)

__all__ = ["HQImageDataset", "ImageFolderBase", "MixedDataset", "PairedImageDataset"]


class ImageFolderBase(Dataset):
    """Shared machinery of the folder datasets: epoch-seeded randomness and lazy bad-file substitution."""

    name = "dataset"

    def __init__(self, size: int, gt_size: int, seed: int, use_hflip: bool, max_tries: int = 100):
        if not isinstance(gt_size, int) or gt_size < 1:
            raise ValueError(f"gt_size must be a positive integer (pixels), got {gt_size!r}")
        self.gt_size = gt_size
        self.seed = seed
        self.use_hflip = use_hflip
        self.max_tries = max_tries
        self.epoch = 0
        self._skip_log = _SkipLog(size, self.name)

    def _set_filters(self, min_pixels: int, min_file_kb: float, small_images: str) -> None:
        """The per-file filters of the folder datasets (see [`HQImageDataset`]); validated before any file is read."""
        _check_small_images(small_images)
        self.min_pixels = int(min_pixels)
        self.min_file_kb = float(min_file_kb)
        self.small_images = small_images

    def set_epoch(self, epoch: int) -> None:
        """Make crops/flips depend on the epoch (called by the training loop before each epoch)."""
        self.epoch = int(epoch)

    def _load(self, index: int, rng: random.Random) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} of {n} samples")
        rng = _rng(self.seed, self.epoch, index)
        candidate = index
        for _ in range(self.max_tries):
            if not self._skip_log.is_bad(candidate):
                try:
                    item = self._load(candidate, rng)
                except BadSampleError as err:
                    self._skip_log.report(candidate, str(err))
                else:
                    if candidate != index:
                        self._skip_log.count_replacement()
                    return item
            candidate = rng.randrange(n)
        raise RuntimeError(
            f"{self.name}: {self.max_tries} bad samples in a row starting at {self._describe(index)}; "
            f"{self._skip_log.num_bad_files} of {n} files are unusable. Check the data folders and size filters"
        )

    def skip_summary(self) -> str:
        """One line: how many files were found bad and how many draws were replaced (this process and its workers)."""
        log = self._skip_log
        return f"{self.name}: {log.num_bad_files} bad file(s) of {len(self)}, {log.num_skips} sample(s) replaced"

    @property
    def num_bad_files(self) -> int:
        return self._skip_log.num_bad_files


def _check_bytes(path: Path, min_file_kb: float) -> None:
    if min_file_kb:
        try:
            size_kb = os.path.getsize(path) / 1024
        except OSError as err:
            raise BadSampleError(f"cannot stat {path}: {err}") from err
        if size_kb < min_file_kb:
            raise BadSampleError(f"{path} is {size_kb:.1f} KB, below min_file_kb={min_file_kb}")


class HQImageDataset(ImageFolderBase):
    """Random ``gt_size`` crops (+ horizontal flips) of high-quality images; the LQ is synthesised in the train step.

    Args:
        roots: folder(s), file(s) or glob pattern(s) of HQ images (searched recursively).
        gt_size: crop side in pixels (512 official).
        face_roots: optional folder(s) of face images; the first ``num_face`` of them (sorted) are added, as the
            official ``face_gt_path`` / ``num_face`` (10000 FFHQ images for the 512 model).
        num_face: how many face images to add (``None`` = all).
        use_hflip: random horizontal flip (official: yes; no rotations).
        min_pixels: skip images with fewer pixels (official 384 * 384); 0 = off.
        min_file_kb: skip files smaller than this many KB (official 100); 0 = off.
        small_images: "pad" (official: reflect-pad to the crop size) or "skip" images smaller than ``gt_size``.
        seed: base seed of the per-item randomness.
    """

    name = "hq"

    def __init__(
        self,
        roots: str | os.PathLike | Sequence[str | os.PathLike],
        gt_size: int,
        face_roots: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        num_face: int | None = None,
        use_hflip: bool = True,
        min_pixels: int = 0,
        min_file_kb: float = 0,
        small_images: str = "pad",
        seed: int = 0,
    ):
        self._set_filters(min_pixels, min_file_kb, small_images)
        self.paths = list(iter_image_files(roots, recursive=True))
        if face_roots:
            faces = list(iter_image_files(face_roots, recursive=True))
            self.paths += faces if num_face is None else faces[: int(num_face)]
        super().__init__(len(self.paths), gt_size, seed, use_hflip)

    def __len__(self) -> int:
        return len(self.paths)

    def _describe(self, index: int) -> str:
        return str(self.paths[index])

    def _load(self, index: int, rng: random.Random) -> dict[str, torch.Tensor]:
        path = self.paths[index]
        _check_bytes(path, self.min_file_kb)
        image = read_image(path)
        _check_size(image, str(path), self.min_pixels, self.gt_size, self.small_images)
        return {"gt": _crop_hq(image, self.gt_size, rng, self.use_hflip)}


def _stem_map(files: Sequence[Path], root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        key = str(f.relative_to(root).with_suffix("")) if f.is_relative_to(root) else f.stem
        if key in out:
            raise ValueError(f"two files with the same name stem '{key}' in {root}: {out[key].name} and {f.name}")
        out[key] = f
    return out


class PairedImageDataset(ImageFolderBase):
    """Aligned crops of real (LQ, GT) pairs, matched by file name stem (relative path without extension).

    Args:
        lq_root / gt_root: folders of low- and high-quality images. Files without a partner are listed once in a
            warning and ignored.
        gt_size: GT crop side; the LQ crop is ``gt_size / scale`` at the same position.
        scale: GT size / LQ size. A pair of other sizes raises ``ValueError`` naming both files.
        lq_suffix: a suffix to strip from LQ stems before matching (e.g. "x4" for DIV2K's ``0001x4.png``).
        use_hflip, min_pixels, min_file_kb, small_images, seed: as [`HQImageDataset`] (filters apply to the GT).
    """

    name = "paired"

    def __init__(
        self,
        lq_root: str | os.PathLike,
        gt_root: str | os.PathLike,
        gt_size: int,
        scale: int = 4,
        lq_suffix: str = "",
        use_hflip: bool = True,
        min_pixels: int = 0,
        min_file_kb: float = 0,
        small_images: str = "pad",
        seed: int = 0,
    ):
        self._set_filters(min_pixels, min_file_kb, small_images)
        if not isinstance(scale, int) or scale < 1 or gt_size % scale:
            raise ValueError(f"scale must be a positive integer dividing gt_size={gt_size}, got {scale!r}")
        lq_root, gt_root = Path(lq_root), Path(gt_root)
        lq = _stem_map(iter_image_files(lq_root, recursive=True), lq_root)
        if lq_suffix:
            lq = {(k[: -len(lq_suffix)] if k.endswith(lq_suffix) else k): v for k, v in lq.items()}
        gt = _stem_map(iter_image_files(gt_root, recursive=True), gt_root)
        keys = sorted(set(lq) & set(gt))
        unmatched = sorted(set(lq) ^ set(gt))
        if not keys:
            raise ValueError(
                f"no LQ/GT pairs: none of the {len(lq)} file stems in {lq_root} matches one of the {len(gt)} in "
                f"{gt_root} (pairs are matched by name without extension; see lq_suffix)"
            )
        if unmatched:
            logger.warning(f"paired data: {len(unmatched)} file(s) without a partner are ignored, e.g. {unmatched[:5]}")
        self.pairs = [(lq[k], gt[k]) for k in keys]
        self.scale = scale
        super().__init__(len(self.pairs), gt_size, seed, use_hflip)

    def __len__(self) -> int:
        return len(self.pairs)

    def _describe(self, index: int) -> str:
        return str(self.pairs[index][1])

    def _load(self, index: int, rng: random.Random) -> dict[str, torch.Tensor]:
        lq_path, gt_path = self.pairs[index]
        _check_bytes(gt_path, self.min_file_kb)
        lq, gt = read_image(lq_path), read_image(gt_path)
        _check_scale(lq, gt, self.scale, str(lq_path), str(gt_path))
        _check_size(gt, str(gt_path), self.min_pixels, self.gt_size, self.small_images)
        lq_crop, gt_crop = _crop_paired(lq, gt, self.gt_size, self.scale, rng, self.use_hflip)
        return {"lq": lq_crop, "gt": gt_crop}


# ---------------------------------------------------------------------------------------------------------------------
# Map-style weighted mixture
# ---------------------------------------------------------------------------------------------------------------------


class MixedDataset(Dataset):
    """Weighted mixture of map-style datasets with a deterministic, per-epoch allocation.

    The ``length`` indices are split into one contiguous block per source, sized in proportion to ``weights``;
    index ``k`` of block ``j`` maps through a per-epoch permutation of source ``j`` (cycled when the block is longer
    than the source). With the training sampler shuffling the indices on top, every epoch draws each source in
    exactly its share and covers small sources evenly.

    Args:
        datasets: map-style datasets with ``set_epoch``.
        weights: relative sampling weights (need not sum to 1).
        length: indices per epoch (default: the sum of the source lengths).
        seed: seed of the per-epoch permutations.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], length: int | None = None, seed: int = 0):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.length = int(length) if length is not None else sum(len(d) for d in datasets)
        total = sum(self.weights)
        sizes = [math.floor(self.length * w / total) for w in self.weights]
        # Hand the rounding remainder to the largest fractional parts.
        rest = self.length - sum(sizes)
        order = sorted(range(len(sizes)), key=lambda j: self.length * self.weights[j] / total - sizes[j], reverse=True)
        for j in order[:rest]:
            sizes[j] += 1
        self.block_sizes = sizes
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.seed = seed
        self.epoch = 0
        self._perms: dict[int, list[int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._perms = {}
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[int, int]:
        """(source, index in that source) of a mixture index, for this epoch."""
        j = bisect.bisect_right(self.offsets, index) - 1
        k = index - self.offsets[j]
        if j not in self._perms:
            perm = list(range(len(self.datasets[j])))
            _rng(self.seed, "mix", self.epoch, j).shuffle(perm)
            self._perms[j] = perm
        perm = self._perms[j]
        return j, perm[k % len(perm)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a mixture of {self.length}")
        j, k = self.locate(index)
        return self.datasets[j][k]

    def skip_summary(self) -> str:
        return "; ".join(d.skip_summary() for d in self.datasets if hasattr(d, "skip_summary"))
