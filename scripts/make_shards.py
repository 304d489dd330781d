#!/usr/bin/env python
"""Pack a folder of HQ images (optionally with a matching LQ folder) into webdataset-style tar shards.

Each sample becomes consecutive tar members ``{key}.{ext}`` (HQ only) or ``{key}.gt.{ext}`` + ``{key}.lq.{ext}``
(paired, matched by name stem). Files are stored as they are (no re-encoding). Shards are written as
``{prefix}-{index:06d}.tar`` atomically (``stablesr.file_utils.atomic_write_path``: a hidden temporary file, fsynced
and renamed into place), so a crash never leaves a truncated shard.
Read them with ``stablesr.data.TarShardDataset`` or a ``{type: shards, urls: "{prefix}-{000000..000099}.tar"}``
data source.

    python scripts/make_shards.py --hq_dir /data/DIV2K_HR --output_dir /data/shards --samples_per_shard 1000
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tarfile
from pathlib import Path

from stablesr.file_utils import atomic_write_path
from stablesr.image_io import iter_image_files


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def make_shards(
    hq_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    lq_dir: str | os.PathLike | None = None,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    shuffle_seed: int | None = 0,
) -> list[Path]:
    """Write the shards; returns their paths. ``shuffle_seed=None`` keeps sorted order (else a seeded shuffle, so
    neighbouring files, often near-duplicates, land in different shards)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    hq_root = Path(hq_dir)
    hq = {str(p.relative_to(hq_root).with_suffix("")): p for p in iter_image_files(hq_root, recursive=True)}
    pairs: list[tuple[Path, Path | None]]
    if lq_dir is not None:
        lq_root = Path(lq_dir)
        lq = {str(p.relative_to(lq_root).with_suffix("")): p for p in iter_image_files(lq_root, recursive=True)}
        keys = sorted(set(hq) & set(lq))
        if not keys:
            raise ValueError(f"no file stem of {lq_dir} matches one of {hq_dir}")
        missing = len(set(hq) ^ set(lq))
        if missing:
            print(f"warning: {missing} file(s) without a partner are left out", file=sys.stderr)
        pairs = [(hq[k], lq[k]) for k in keys]
    else:
        pairs = [(hq[k], None) for k in sorted(hq)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pairs)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard_index, start in enumerate(range(0, len(pairs), samples_per_shard)):
        path = out / f"{prefix}-{shard_index:06d}.tar"
        with atomic_write_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for n, (gt_path, lq_path) in enumerate(pairs[start : start + samples_per_shard]):
                key = f"{start + n:09d}"  # no dots: the key ends at the first dot of a member name
                gt_ext = gt_path.suffix.lower().lstrip(".")
                if lq_path is None:
                    _add(tar, f"{key}.{gt_ext}", gt_path.read_bytes())
                else:
                    _add(tar, f"{key}.gt.{gt_ext}", gt_path.read_bytes())
                    _add(tar, f"{key}.lq.{lq_path.suffix.lower().lstrip('.')}", lq_path.read_bytes())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hq_dir", required=True, help="Folder of HQ (GT) images, searched recursively.")
    parser.add_argument("--lq_dir", default=None, help="Optional folder of matching LQ images (paired shards).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--seed", type=int, default=0, help="Shuffle seed; -1 keeps sorted order.")
    args = parser.parse_args(argv)
    shards = make_shards(args.hq_dir, args.output_dir, args.lq_dir, args.samples_per_shard, args.prefix,
                         None if args.seed < 0 else args.seed)
    last = len(shards) - 1
    print(f"wrote {len(shards)} shard(s) to {args.output_dir}: use urls: \"{args.output_dir}/{args.prefix}-"
          f"{{000000..{last:06d}}}.tar\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
