"""Streaming data: webdataset-style tar shards, and weighted interleaving of streams.

Shards hold samples as consecutive ``{key}.{ext}`` members (HQ only) or ``{key}.gt.{ext}`` + ``{key}.lq.{ext}`` (pairs),
read with the standard-library ``tarfile``; ``scripts/make_shards.py`` packs a folder into such shards. Members are
decoded by [`~stablesr.image_io.decode_image_bytes`], the same code as the folder datasets' files, and cropped by the
same helpers. Streams split themselves over ranks and DataLoader workers, skip whole batches without decoding on
resume, and replace a bad sample by the previous good one so that resume arithmetic stays exact.
"""

from __future__ import annotations

import ctypes
import glob
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence

import torch
from diffusers.utils import logging
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..image_io import IMAGE_EXTENSIONS
from .common import (
    BadSampleError,
    _check_scale,
    _check_size,
    _check_small_images,
    _crop_hq,
    _crop_paired,
    _rng,
    decode_image,
)

logger = logging.get_logger(__name__)

__all__ = ["MixedIterableDataset", "TarShardDataset", "expand_shard_urls", "iter_tar_samples"]


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
        gt = decode_image(fields[gt_name], f"{key}.{gt_name}")
        _check_size(gt, f"sample '{key}'", self.min_pixels, self.gt_size, self.small_images)
        lq_name = next((f for f in fields if f.startswith("lq.")), None)
        if lq_name is None:
            return {"gt": _crop_hq(gt, self.gt_size, rng, self.use_hflip)}
        lq = decode_image(fields[lq_name], f"{key}.{lq_name}")
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
