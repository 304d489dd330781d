"""Training data for StableSR: HQ folders (degraded on the fly), paired LQ/HQ folders, tar shards, and mixtures.

Items are dicts of float tensors in [0, 1]:

* HQ-only sources give ``{"gt": (3, gt_size, gt_size)}``; the training step synthesises the LQ with
  :class:`~stablesr.degradation.RealESRGANDegradation` (official StableSR recipe).
* Paired sources give ``{"lq": (3, gt_size / scale, gt_size / scale), "gt": (3, gt_size, gt_size)}`` with the two crops
  taken at the same place (real degraded data; not possible in the official code, StableSR#55/#75).

Modules (one concern each):

* ``folders``: map-style [`HQImageDataset`], [`PairedImageDataset`] and their weighted [`MixedDataset`].
* ``shards``: [`TarShardDataset`] (webdataset-style tar shards, split across ranks and workers) and
  [`MixedIterableDataset`]; ``scripts/make_shards.py`` packs a folder into such shards.
* ``common``: what both share: seeding, decoding through [`~stablesr.image_io`] (so 16-bit, ICC, CMYK and EXIF
  are handled identically for files and shard members), crops padded by [`~stablesr.image_processor.pad_to`], the
  bad-sample log.
* ``build``: [`build_dataset`] from the ``--train_data_config`` YAML, and [`collate_samples`].

Official filters (IceClear/StableSR ``basicsr/data/realesrgan_dataset.py`` @398ee93): images under 384x384 pixels or
100 KB are skipped, images smaller than the crop are reflect-padded, crops are random, flips horizontal only. Here the
size filters are configurable and off by default (``min_pixels``, ``min_file_kb``).
"""

from .build import SOURCE_TYPES, build_dataset, collate_samples
from .common import SMALL_IMAGE_MODES, BadSampleError
from .folders import HQImageDataset, ImageFolderBase, MixedDataset, PairedImageDataset
from .shards import MixedIterableDataset, TarShardDataset, expand_shard_urls, iter_tar_samples

__all__ = [
    "SMALL_IMAGE_MODES",
    "SOURCE_TYPES",
    "BadSampleError",
    "HQImageDataset",
    "ImageFolderBase",
    "MixedDataset",
    "MixedIterableDataset",
    "PairedImageDataset",
    "TarShardDataset",
    "build_dataset",
    "collate_samples",
    "expand_shard_urls",
    "iter_tar_samples",
]
