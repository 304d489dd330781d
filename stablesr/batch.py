"""Planning a batch of outputs: every input gets its own output names, decided before any work starts.

Two inputs must never write the same output file: ``photo.bmp`` and ``photo.webp`` in one folder would both become
``OUT/photo.png``, camera exports (``IMG_0001.JPG`` next to ``IMG_0001.HEIC``) and ``--recursive`` runs over folders
with repeated names likewise, and derived names can collide too (``cat.png`` restored with ``--fidelity-sweep 0.5``
writes ``cat_w0.50.png``, which is also the plain output of an input named ``cat_w0.50.jpg``).

[`output_names`] gives each input a base name: its stem where that is unique, otherwise a longer name that still
reads well, chosen in steps until nothing collides: the stem plus the input's extension (``photo_bmp``,
``photo_webp``), then the parent folder too (``a_photo_bmp``), then the whole relative path, and as a last resort a
number in input order. Names are compared case-insensitively (macOS and Windows file systems ignore case). The rule
depends only on the set of inputs, so a rerun over the same inputs plans the same names and skips what is done.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = ["output_names"]


def _candidates(src: Path) -> list[str]:
    ext = src.suffix.lower().lstrip(".")
    stem = src.stem
    with_ext = f"{stem}_{ext}" if ext else stem
    parts = [p for p in src.parent.parts if p not in (os.sep, "", ".", "..") and not p.endswith(":\\")]
    names = [stem, with_ext]
    if parts:
        names.append(f"{parts[-1]}_{with_ext}")
        names.append("_".join([*parts, with_ext]))
    return names


def output_names(files: Sequence[Path], tags: Sequence[str] = ("",)) -> dict[Path, str]:
    """A collision-free output base name for every input file.

    Args:
        files: the input files (each listed once).
        tags: the suffixes appended to the base name for each output of one input, e.g. ``["", "_w0.25",
            "_compare"]``; all of them take part in the collision check.

    Returns:
        ``{input: base name}``; the outputs of an input are ``base + tag + extension`` for every tag.
    """
    levels = {src: 0 for src in files}
    names: dict[Path, str] = {}
    for _ in range(8):
        names = {}
        for src in files:
            options = _candidates(src)
            level = levels[src]
            names[src] = options[level] if level < len(options) else f"{options[-1]}_{list(files).index(src) + 1}"
        owners: dict[str, set[Path]] = defaultdict(set)
        for src, name in names.items():
            for tag in tags:
                owners[(name + tag).casefold()].add(src)
        clashing = {src for group in owners.values() if len(group) > 1 for src in group}
        if not clashing:
            return names
        for src in clashing:
            levels[src] += 1
    raise RuntimeError(f"could not find distinct output names for {len(files)} inputs")
