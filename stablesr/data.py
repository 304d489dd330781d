"""Training data for StableSR: HQ folders (degraded on the fly), paired LQ/HQ folders, tar shards, and mixtures.

Items are dicts of float tensors in [0, 1]:

* HQ-only sources give ``{"gt": (3, gt_size, gt_size)}``; the training step synthesises the LQ with
  :class:`~stablesr.degradation.RealESRGANDegradation` (official StableSR recipe).
* Paired sources give ``{"lq": (3, gt_size / scale, gt_size / scale), "gt": (3, gt_size, gt_size)}`` with the two crops
  taken at the same place (real degraded data; not possible in the official code, StableSR#55/#75).

Every random choice of an item (crop position, flip, substitute for a bad file) is drawn from a generator seeded by
``(seed, epoch, index)``, so items do not depend on the number of workers or processes, and a resumed run sees the
same data as an uninterrupted one. Bad files (unreadable, corrupt, too small) are validated lazily: the first time
one is met it is logged once, counted, and another sample is returned instead; the counters are shared by all
DataLoader workers of a process (see :meth:`ImageFolderBase.skip_summary`).

Large corpora are read from webdataset-style tar shards (``{key}.{ext}`` members, or ``{key}.gt.{ext}`` +
``{key}.lq.{ext}`` for pairs) with :class:`TarShardDataset`, a standard-library ``tarfile`` reader that splits shards
across ranks and workers. ``scripts/make_shards.py`` packs a folder into such shards.

Official filters (IceClear/StableSR ``basicsr/data/realesrgan_dataset.py`` @398ee93): images under 384x384 pixels or
100 KB are skipped, images smaller than the crop are reflect-padded, crops are random, flips horizontal only. Here the
size filters are configurable and off by default (``min_pixels``, ``min_file_kb``).
"""

from __future__ import annotations

import bisect
import ctypes
import glob
import hashlib
import io
import math
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .image_io import IMAGE_EXTENSIONS, ImageLoadError, iter_image_files, load_image

logger = logging.get_logger(__name__)

__all__ = [
    "BadSampleError",
    "HQImageDataset",
    "MixedDataset",
    "MixedIterableDataset",
    "PairedImageDataset",
    "TarShardDataset",
    "build_dataset",
    "collate_samples",
    "expand_shard_urls",
]

SMALL_IMAGE_MODES = ("pad", "skip")
SOURCE_TYPES = ("hq", "paired", "shards")


class BadSampleError(ValueError):
    """A training sample that cannot be used (unreadable, corrupt or too small); it is skipped, never fatal."""


# ---------------------------------------------------------------------------------------------------------------------
# Seeding, decoding, cropping
# ---------------------------------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _rng(*parts) -> random.Random:
    return random.Random(_seed(*parts))


def _to_array(img: Image.Image) -> np.ndarray:
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    """(H, W, 3) uint8 from encoded image bytes (EXIF orientation applied)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(ImageOps.exif_transpose(img))
    except Exception as err:  # PIL raises many types for broken files
        raise BadSampleError(f"cannot decode {name}: {type(err).__name__}: {err}") from err


def _load_file(path: Path) -> np.ndarray:
    try:
        return _to_array(load_image(path).rgb)
    except (ImageLoadError, OSError) as err:
        raise BadSampleError(str(err)) from err


def _pad_to(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad (bottom/right, as BasicSR's ``cv2.BORDER_REFLECT_101``) to at least ``height`` x ``width``."""
    pad_h, pad_w = max(0, height - arr.shape[0]), max(0, width - arr.shape[1])
    if not (pad_h or pad_w):
        return arr
    mode = "reflect" if min(arr.shape[:2]) > 1 else "edge"
    return np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def _crop_hq(arr: np.ndarray, gt_size: int, rng: random.Random, use_hflip: bool) -> torch.Tensor:
    arr = _pad_to(arr, gt_size, gt_size)
    top = rng.randint(0, arr.shape[0] - gt_size)
    left = rng.randint(0, arr.shape[1] - gt_size)
    crop = arr[top : top + gt_size, left : left + gt_size]
    if use_hflip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _to_tensor(crop)


def _check_scale(lq: np.ndarray, gt: np.ndarray, scale: int, lq_name: str, gt_name: str) -> None:
    lh, lw = lq.shape[:2]
    gh, gw = gt.shape[:2]
    if (gh, gw) != (lh * scale, lw * scale):
        raise ValueError(
            f"scale mismatch in paired data: GT '{gt_name}' is {gw}x{gh} px but LQ '{lq_name}' is {lw}x{lh} px; "
            f"with scale={scale} the GT must be exactly {lw * scale}x{lh * scale}. Fix the pair or the source's "
            "'scale' setting"
        )


def _crop_paired(
    lq: np.ndarray, gt: np.ndarray, gt_size: int, scale: int, rng: random.Random, use_hflip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops: the LQ crop of side ``gt_size / scale`` at (top, left) and the GT crop at scale x (top, left)."""
    lq_size = gt_size // scale
    lq = _pad_to(lq, lq_size, lq_size)
    gt = _pad_to(gt, lq.shape[0] * scale, lq.shape[1] * scale)
    top = rng.randint(0, lq.shape[0] - lq_size)
    left = rng.randint(0, lq.shape[1] - lq_size)
    lq_crop = lq[top : top + lq_size, left : left + lq_size]
    gt_crop = gt[top * scale : (top + lq_size) * scale, left * scale : (left + lq_size) * scale]
    if use_hflip and rng.random() < 0.5:
        lq_crop, gt_crop = lq_crop[:, ::-1], gt_crop[:, ::-1]
    return _to_tensor(lq_crop), _to_tensor(gt_crop)


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


def _check_small_images(small_images: str) -> None:
    if small_images not in SMALL_IMAGE_MODES:
        raise ValueError(f"small_images must be one of {SMALL_IMAGE_MODES}, got {small_images!r}")


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


def _check_size(arr: np.ndarray, path: Path, min_pixels: int, gt_size: int, small: str) -> None:
    h, w = arr.shape[:2]
    if min_pixels and h * w < min_pixels:
        raise BadSampleError(f"{path} is {w}x{h} px, below min_pixels={min_pixels}")
    if small == "skip" and (h < gt_size or w < gt_size):
        raise BadSampleError(f"{path} is {w}x{h} px, smaller than the {gt_size} px crop (small_images='skip')")


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
        arr = _load_file(path)
        _check_size(arr, path, self.min_pixels, self.gt_size, self.small_images)
        return {"gt": _crop_hq(arr, self.gt_size, rng, self.use_hflip)}


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
        lq, gt = _load_file(lq_path), _load_file(gt_path)
        _check_scale(lq, gt, self.scale, str(lq_path), str(gt_path))
        _check_size(gt, gt_path, self.min_pixels, self.gt_size, self.small_images)
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


# ---------------------------------------------------------------------------------------------------------------------
# Streaming: tar shards
# ---------------------------------------------------------------------------------------------------------------------


def expand_shard_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace ranges (``shard-{000..099}.tar``) and glob patterns into a sorted list of shard files."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [os.fspath(urls)]
    out: list[str] = []
    for url in urls:
        pending = [os.fspath(url)]
        expanded = []
        while pending:
            item = pending.pop()
            m = re.search(r"\{(\d+)\.\.(\d+)\}", item)
            if not m:
                expanded.append(item)
                continue
            lo, hi = m.group(1), m.group(2)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                pending.append(item[: m.start()] + str(i).zfill(width) + item[m.end() :])
        for item in sorted(expanded):
            matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            missing = [p for p in matches if not os.path.isfile(p)]
            if not matches or missing:
                raise FileNotFoundError(f"shard(s) not found: {missing[:5] or item}")
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no shards matched {list(urls)}")
    return out


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the base name, the rest is the field."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) for each sample of a tar shard, members grouped by key in file order."""
    key, fields = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, field = _split_key(member.name)
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            f = tar.extractfile(member)
            fields[field] = f.read() if f is not None else b""
    if key is not None:
        yield key, fields


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker_slot(rank: int | None, world_size: int | None) -> tuple[int, int, int, int]:
    """(rank, world_size, worker_id, num_workers) of the calling DataLoader worker."""
    if rank is None or world_size is None:
        rank, world_size = _default_rank_world()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker, workers


class _LazySample:
    """A sample whose decoding is deferred, so that skipping (resume) costs no decode."""

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable[[], dict[str, torch.Tensor]], name: str):
        self.fn, self.name = fn, name


class _StreamBase(IterableDataset):
    """An IterableDataset of lazy samples split over (rank, worker), infinite or one pass per epoch."""

    def __init__(self, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0
        self.batch_size = 1
        # Shared with the DataLoader workers, like the folder datasets' skip log.
        self._num_bad = multiprocessing.get_context().Value(ctypes.c_long, 0, lock=True)

    @property
    def num_bad(self) -> int:
        """Bad samples met so far by this process and its DataLoader workers (each replaced by another one)."""
        return int(self._num_bad.value)

    def skip_summary(self) -> str:
        parts = [f"{type(self).__name__}: {self.num_bad} bad sample(s) replaced"]
        for child in getattr(self, "sources", []):
            inner = getattr(child, "dataset", child)
            if hasattr(inner, "skip_summary") and inner is not child:
                parts.append(inner.skip_summary())
        return "; ".join(parts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resume(self, batches: int, batch_size: int) -> None:
        """Skip the first ``batches`` batches of ``batch_size`` (as consumed through a DataLoader) without decoding.

        The DataLoader takes whole batches from its workers in turn, so worker ``w`` of ``W`` skips
        ``batches // W + (w < batches % W)`` of its own batches.
        """
        self.skip_batches, self.batch_size = int(batches), int(batch_size)

    def lazy_samples(self, slot: tuple[int, int, int, int]) -> Iterator[_LazySample]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        slot = _worker_slot(self.rank, self.world_size)
        _, _, worker, workers = slot
        skip_batches = self.skip_batches // workers + (1 if worker < self.skip_batches % workers else 0)
        to_skip = skip_batches * self.batch_size
        last_good, pending, warned = None, 0, set()
        for sample in self.lazy_samples(slot):
            if to_skip > 0:
                to_skip -= 1
                continue
            try:
                item = sample.fn()
            except BadSampleError as err:
                with self._num_bad.get_lock():
                    self._num_bad.value += 1
                if sample.name not in warned:  # once per sample and worker, not once per pass
                    warned.add(sample.name)
                    logger.warning(f"shards: skipping bad sample {sample.name} ({err}); another sample is used instead")
                if last_good is None:
                    pending += 1  # emitted in its place as soon as a good sample arrives
                else:
                    yield last_good
                continue
            last_good = item
            for _ in range(pending + 1):
                yield item
            pending = 0


class TarShardDataset(_StreamBase):
    """Samples from webdataset-style tar shards, split across ranks and DataLoader workers.

    Each shard holds samples as consecutive members named ``{key}.{ext}`` (HQ only) or ``{key}.gt.{ext}`` and
    ``{key}.lq.{ext}`` (paired). With at least as many shards as (ranks x workers), shards are dealt out round-robin
    to the global worker slots; with fewer, every slot reads all shards and keeps every N-th sample. ``infinite``
    streams (recommended for training: every rank then yields the same number of batches, so DDP never waits on a
    rank that ran out) re-deal reshuffled shards pass after pass; finite ones stop after one pass per epoch.

    Args:
        urls: shard paths, glob patterns or brace ranges (``/data/shard-{0000..0099}.tar``).
        gt_size: crop side; paired samples also need ``scale``.
        scale: GT / LQ size of paired samples.
        use_hflip: random horizontal flips.
        shuffle_buffer: samples held for in-stream shuffling (0 = off).
        infinite: cycle forever (see above).
        min_pixels / small_images: as [`HQImageDataset`].
        seed: base seed; rank, worker, pass and sample number are mixed in.
        rank / world_size: override the distributed rank (default: torch.distributed, else $RANK/$WORLD_SIZE).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        gt_size: int,
        scale: int = 4,
        use_hflip: bool = True,
        shuffle_buffer: int = 64,
        infinite: bool = False,
        min_pixels: int = 0,
        small_images: str = "pad",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(seed, rank, world_size)
        _check_small_images(small_images)
        self.urls = expand_shard_urls(urls)
        self.gt_size = gt_size
        self.scale = scale
        self.use_hflip = use_hflip
        self.shuffle_buffer = int(shuffle_buffer)
        self.infinite = infinite
        self.min_pixels = int(min_pixels)
        self.small_images = small_images

    def assigned(self, rank: int, world_size: int, worker: int, workers: int, pass_index: int = 0):
        """(shards, sample_stride, sample_offset) read by one global worker slot in a pass."""
        shards = list(self.urls)
        _rng(self.seed, "shards", self.epoch, pass_index).shuffle(shards)
        slots, slot = world_size * workers, rank * workers + worker
        if len(shards) >= slots:
            return shards[slot::slots], 1, 0
        return shards, slots, slot

    def _decode(self, key: str, fields: dict[str, bytes], rng: random.Random) -> dict[str, torch.Tensor]:
        gt_field = "gt." if any(f.startswith("gt.") for f in fields) else ""
        gt_name = next((f for f in fields if f.startswith(gt_field) and f.rpartition(".")[2] in _IMAGE_EXTS), None)
        if gt_name is None:
            raise BadSampleError(f"sample '{key}' has no image member (fields {sorted(fields)})")
        gt = _decode_bytes(fields[gt_name], f"{key}.{gt_name}")
        h, w = gt.shape[:2]
        if self.min_pixels and h * w < self.min_pixels:
            raise BadSampleError(f"sample '{key}' is {w}x{h} px, below min_pixels={self.min_pixels}")
        if self.small_images == "skip" and min(h, w) < self.gt_size:
            raise BadSampleError(f"sample '{key}' is {w}x{h} px, smaller than the {self.gt_size} px crop")
        lq_name = next((f for f in fields if f.startswith("lq.")), None)
        if lq_name is None:
            return {"gt": _crop_hq(gt, self.gt_size, rng, self.use_hflip)}
        lq = _decode_bytes(fields[lq_name], f"{key}.{lq_name}")
        _check_scale(lq, gt, self.scale, f"{key}.{lq_name}", f"{key}.{gt_name}")
        lq_crop, gt_crop = _crop_paired(lq, gt, self.gt_size, self.scale, rng, self.use_hflip)
        return {"lq": lq_crop, "gt": gt_crop}

    def lazy_samples(self, slot) -> Iterator[_LazySample]:
        rank, world, worker, workers = slot
        counter = 0
        pass_index = 0
        while True:
            shards, stride, offset = self.assigned(rank, world, worker, workers, pass_index)
            if not shards:
                raise ValueError(f"no shard for rank {rank} worker {worker}")
            buffer: list[tuple[str, dict[str, bytes]]] = []
            shuffle_rng = _rng(self.seed, "buffer", self.epoch, pass_index, rank, worker)

            def emit(sample):
                nonlocal counter
                key, fields = sample
                rng = _rng(self.seed, "item", self.epoch, rank, worker, counter)
                counter += 1
                return _LazySample(lambda: self._decode(key, fields, rng), key)

            for shard in shards:
                for n, sample in enumerate(iter_tar_samples(shard)):
                    if n % stride != offset:
                        continue
                    if self.shuffle_buffer <= 1:
                        yield emit(sample)
                        continue
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        i = shuffle_rng.randrange(len(buffer))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield emit(buffer.pop())
            shuffle_rng.shuffle(buffer)
            for sample in buffer:
                yield emit(sample)
            if not self.infinite:
                return
            pass_index += 1


class _MapStream(_StreamBase):
    """A map-style dataset as an infinite stream of this (rank, worker)'s share of per-pass permutations."""

    def __init__(self, dataset: Dataset, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__(seed, rank, world_size)
        self.dataset = dataset

    def lazy_samples(self, slot) -> Iterator[_LazySample]:
        rank, world, worker, workers = slot
        slots, me = world * workers, rank * workers + worker
        pass_index = 0
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch * 100003 + pass_index)
            perm = list(range(len(self.dataset)))
            _rng(self.seed, "stream", self.epoch, pass_index).shuffle(perm)
            for i in perm[me::slots]:
                yield _LazySample(lambda i=i: self.dataset[i], f"index {i}")
            pass_index += 1


class MixedIterableDataset(_StreamBase):
    """Weighted interleaving of streams (tar shards and/or map-style datasets), drawn per sample with a seeded RNG.

    Infinite: map-style sources are cycled; finite shard sources drop out when exhausted and the stream ends when
    every finite source is done and no infinite one remains.
    """

    def __init__(
        self,
        sources: Sequence[Dataset],
        weights: Sequence[float],
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(seed, rank, world_size)
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(weights)} weights")
        self.sources = [s if isinstance(s, _StreamBase) else _MapStream(s, seed) for s in sources]
        self.weights = [float(w) for w in weights]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for s in self.sources:
            s.set_epoch(epoch)

    def lazy_samples(self, slot) -> Iterator[_LazySample]:
        rank, world, worker, workers = slot
        iters = [s.lazy_samples(slot) for s in self.sources]
        weights = list(self.weights)
        rng = _rng(self.seed, "mixstream", self.epoch, rank, worker)
        while any(w > 0 for w in weights):
            j = rng.choices(range(len(iters)), weights=weights)[0]
            try:
                yield next(iters[j])
            except StopIteration:
                weights[j] = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Config-driven construction and batching
# ---------------------------------------------------------------------------------------------------------------------

_COMMON_KEYS = {"type", "weight"}
_SOURCE_KEYS = {
    "hq": {"roots", "face_roots", "num_face", "use_hflip", "min_pixels", "min_file_kb", "small_images"},
    "paired": {"lq_root", "gt_root", "scale", "lq_suffix", "use_hflip", "min_pixels", "min_file_kb", "small_images"},
    "shards": {"urls", "scale", "use_hflip", "shuffle_buffer", "infinite", "min_pixels", "small_images"},
}


def build_dataset(
    config: dict[str, Any], gt_size: int | None = None, seed: int = 0, infinite_streams: bool = True
) -> Dataset:
    """Build the training dataset from a config mapping (the YAML of ``--train_data_config``).

    Schema::

        gt_size: 512            # crop side (the training script's --resolution overrides it)
        sources:
          - {type: hq, roots: [/data/DIV2K_HR, /data/OST], weight: 1.0, face_roots: /data/FFHQ, num_face: 10000}
          - {type: paired, lq_root: /data/real/LQ, gt_root: /data/real/HQ, scale: 4, weight: 0.3}
          - {type: shards, urls: "/data/shards/hq-{0000..0127}.tar", weight: 1.0}

    Returns the single source itself, a [`MixedDataset`] of map-style sources, or (when any source is ``shards``)
    a [`MixedIterableDataset`] / [`TarShardDataset`]. Unknown keys raise ``ValueError`` naming the source.
    """
    if not isinstance(config, dict) or "sources" not in config:
        raise ValueError(f"data config must be a mapping with a 'sources' list, got {config!r}")
    size = int(gt_size if gt_size is not None else config.get("gt_size", 512))
    unknown_top = set(config) - {"sources", "gt_size", "length"}
    if unknown_top:
        raise ValueError(f"unknown data config key(s) {sorted(unknown_top)}; allowed: sources, gt_size, length")
    sources = config["sources"]
    if not isinstance(sources, list) or not sources:
        raise ValueError("data config 'sources' must be a non-empty list")
    built, weights = [], []
    for i, src in enumerate(sources):
        if not isinstance(src, dict) or src.get("type") not in SOURCE_TYPES:
            raise ValueError(f"sources[{i}] needs a 'type' in {SOURCE_TYPES}, got {src!r}")
        kind = src["type"]
        extra = set(src) - _COMMON_KEYS - _SOURCE_KEYS[kind]
        if extra:
            raise ValueError(
                f"sources[{i}] ({kind}): unknown key(s) {sorted(extra)}; allowed: {sorted(_SOURCE_KEYS[kind] | _COMMON_KEYS)}"
            )
        kwargs = {k: v for k, v in src.items() if k not in _COMMON_KEYS}
        src_seed = _seed(seed, "source", i) & 0x7FFFFFFF
        if kind == "hq":
            ds = HQImageDataset(gt_size=size, seed=src_seed, **kwargs)
        elif kind == "paired":
            ds = PairedImageDataset(gt_size=size, seed=src_seed, **kwargs)
        else:
            kwargs.setdefault("infinite", infinite_streams)
            ds = TarShardDataset(gt_size=size, seed=src_seed, **kwargs)
        built.append(ds)
        weights.append(float(src.get("weight", 1.0)))
    if len(built) == 1 and (config.get("length") is None or isinstance(built[0], IterableDataset)):
        return built[0]
    if any(isinstance(d, IterableDataset) for d in built):
        return MixedIterableDataset(built, weights, seed=seed)
    return MixedDataset(built, weights, length=config.get("length"), seed=seed)


def collate_samples(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch items of HQ-only and paired sources together.

    Returns ``{"gt": (B, 3, H, W), "has_lq": (B,) bool}`` plus ``"lq": (B, 3, h, w)`` when any item is paired
    (zeros where ``has_lq`` is False; the training step degrades those GTs on the fly).
    """
    gt = torch.stack([it["gt"] for it in items])
    has_lq = torch.tensor(["lq" in it for it in items], dtype=torch.bool)
    batch = {"gt": gt, "has_lq": has_lq}
    if has_lq.any():
        shapes = {tuple(it["lq"].shape) for it in items if "lq" in it}
        if len(shapes) != 1:
            raise ValueError(
                f"paired samples in one batch have different LQ sizes {sorted(shapes)}: use the same scale for all "
                "paired sources"
            )
        shape = shapes.pop()
        batch["lq"] = torch.stack([it["lq"] if "lq" in it else gt.new_zeros(shape) for it in items])
    return batch
