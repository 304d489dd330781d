"""Config-driven construction of the training dataset ([`build_dataset`]) and batching ([`collate_samples`])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from .common import _seed
from .folders import HQImageDataset, MixedDataset, PairedImageDataset
from .shards import MixedIterableDataset, TarShardDataset

__all__ = ["SOURCE_TYPES", "build_dataset", "collate_samples"]

SOURCE_TYPES = ("hq", "paired", "shards")
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
