"""Scoring restored images against ground truth, the way SR papers do (``stablesr evaluate``).

Files are paired by name (stem, extension ignored; ``strip`` removes suffixes such as ``_HR`` / ``_LR4`` / ``x4``
first). Every requested metric is computed per image and averaged; with LQ files the inputs also get a *bicubic
baseline* row (LQ bicubic-upscaled to the GT size, same metrics) and the SR3 ``consistency`` metric can be computed.
Optionally a learned baseline (Real-ESRGAN, [`stablesr.models.rrdbnet.RealESRGANUpscaler`]) upscales every LQ file too
and gets its own row.
The report names the evaluation protocol, because the field uses two incompatible ones: 128->512 center crops
(StableSR, SeeSR, OSEDiff test sets) vs full-size images (ResShift, SinSR, PASD); it is inferred from the image sizes
unless ``protocol`` says it.

Missing pairs are listed, never a crash; an SR/GT size mismatch or an unreadable file is a per-file error recorded in
the report. Rendering the report (terminal table, CSV, JSON, HTML) is [`stablesr.reports`]; the command line is
``stablesr evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import metrics as M
from .distributed import Processes
from .image_io import IMAGE_EXTENSIONS, ImageLoadError, load_image, save_image

__all__ = [
    "DEFAULT_METRICS",
    "EvaluationReport",
    "Pairing",
    "baseline_notes",
    "bicubic_baseline",
    "evaluate_folders",
    "infer_protocol",
    "pair_folders",
]

DEFAULT_METRICS = ("psnr", "ssim")
PROTOCOLS = {
    "crops-128-512": "128->512 center crops, x4 (StableSR / SeeSR / OSEDiff test sets: RealSR 100, DRealSR 93, "
                     "DIV2K-Val 3k)",
    "full": "full-size images (ResShift / SinSR / PASD style)",
}


# ----------------------------------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------------------------------


def _key(path: Path, strip: Sequence[str]) -> str:
    stem = path.stem
    for suffix in strip:
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem


def _index_folder(folder: str | Path, strip: Sequence[str], role: str) -> tuple[dict[str, Path], list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} folder '{folder}' does not exist or is not a folder")
    index: dict[str, Path] = {}
    duplicates = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith(".") or not p.is_file():
            continue
        key = _key(p, strip)
        if key in index:
            duplicates.append(f"{role}: '{p.name}' and '{index[key].name}' both pair as '{key}' (kept the first)")
            continue
        index[key] = p
    return index, duplicates


@dataclass
class Pairing:
    """Files paired by name. ``pairs``: (name, sr, gt, lq or None); ``missing``: lists of file names per reason."""

    pairs: list[tuple[str, Path, Path, Path | None]]
    missing: dict[str, list[str]]


def pair_folders(sr_dir, gt_dir, lq_dir=None, strip: Sequence[str] = ()) -> Pairing:
    """Pair SR, GT (and LQ) files by stem. Unpaired files are listed in ``missing`` (keys ``sr_without_gt``,
    ``gt_without_sr``, ``lq_missing`` (pairs without an LQ file), ``lq_without_pair``, ``duplicates``)."""
    sr, d1 = _index_folder(sr_dir, strip, "sr")
    gt, d2 = _index_folder(gt_dir, strip, "gt")
    lq, d3 = _index_folder(lq_dir, strip, "lq") if lq_dir else ({}, [])
    names = sorted(set(sr) & set(gt))
    missing = {
        "sr_without_gt": [sr[k].name for k in sorted(set(sr) - set(gt))],
        "gt_without_sr": [gt[k].name for k in sorted(set(gt) - set(sr))],
        "lq_missing": [k for k in names if lq_dir and k not in lq],
        "lq_without_pair": [lq[k].name for k in sorted(set(lq) - set(names))],
        "duplicates": d1 + d2 + d3,
    }
    return Pairing([(k, sr[k], gt[k], lq.get(k)) for k in names], missing)


# ----------------------------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------------------------


def infer_protocol(gt_sizes: Sequence[tuple[int, int]], lq_sizes: Sequence[tuple[int, int]] = (),
                   requested: str = "auto") -> dict[str, Any]:
    """Name the protocol: ``crops-128-512`` when every GT is 512x512 (and every LQ 128x128), else ``full``;
    ``requested`` ("crops-128-512" / "crops" or "full") overrides, with a warning when the sizes disagree."""
    crops = bool(gt_sizes) and all(s == (512, 512) for s in gt_sizes) and all(s == (128, 128) for s in lq_sizes)
    warnings = []
    if requested in ("auto", None):
        name, source = ("crops-128-512" if crops else "full"), "inferred from the image sizes"
    else:
        name = "crops-128-512" if requested.startswith("crops") else "full"
        source = "--protocol"
        if name == "crops-128-512" and not crops:
            warnings.append("--protocol crops but not every GT image is 512x512 (or LQ 128x128)")
        if name == "full" and crops:
            warnings.append("--protocol full but every GT is 512x512 (and LQ 128x128): these look like the crop sets")
    # lq_sizes is empty without --lq
    scales = {round(g[0] / q[0], 3) for g, q in zip(gt_sizes, lq_sizes, strict=False) if q[0]}
    scale = scales.pop() if len(scales) == 1 else None
    return {"name": name, "description": PROTOCOLS[name], "source": source, "scale": scale, "warnings": warnings}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """Everything ``stablesr evaluate`` reports.

    Attributes:
        rows: per-image dicts: ``name``, ``method`` ("sr", "bicubic" or a learned baseline's key such as
            "realesrgan"), ``width``, ``height`` and one value per metric (``None`` where it could not be computed,
            e.g. ``consistency`` without an LQ file).
        means: ``{"sr": {metric: mean}, "bicubic": {...}, "realesrgan": {...}}`` (baselines only with LQ files); set
            metrics (FID) appear only here. ``counts``: images averaged per method.
        protocol: see [`infer_protocol`], plus ``crop_border`` and the color space of PSNR/SSIM.
        metrics: metric names in order; backends: ``{metric: "builtin" | "torchmetrics" | "pyiqa"}``.
        missing: unpaired files (see [`pair_folders`]); errors: ``(file name, message)`` per failed pair.
        paths: ``{name: {"sr": Path, "gt": Path, "lq": Path | None}}`` for the HTML report, plus the learned
            baseline's saved output under its key (e.g. ``"realesrgan"``) when it was written to a folder.
        settings: folders and options; ``settings["baseline"]`` describes the learned baseline (``label``, weights,
            model, tiling, output folder). notes: remarks for the reader (e.g. baseline outputs that were resized).
    """

    rows: list[dict[str, Any]]
    means: dict[str, dict[str, float]]
    counts: dict[str, int]
    protocol: dict[str, Any]
    metrics: list[str]
    backends: dict[str, str]
    missing: dict[str, list[str]]
    errors: list[tuple[str, str]] = field(default_factory=list)
    paths: dict[str, dict[str, Path | None]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def method_label(self, method: str) -> str:
        """The display name of a ``method`` key: the learned baseline's label ("Real-ESRGAN"), else the key."""
        baseline = self.settings.get("baseline") or {}
        return baseline.get("label", method) if method == baseline.get("name") else method


def bicubic_baseline(lq: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The bicubic baseline: PIL bicubic (a = -0.5, Matlab-like kernel), rounded to 8 bits like a saved file."""
    return lq.resize(size, Image.Resampling.BICUBIC)


class _LazyImages(Sequence):
    """A list of images produced on demand (so FID over thousands of bicubic images does not hold them all)."""

    def __init__(self, n: int, make):
        self._n, self._make = n, make

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._make(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._make(i % self._n)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    if any(math.isinf(v) for v in values):
        return math.inf
    return float(np.mean(values))


def evaluate_folders(sr_dir, gt_dir, lq_dir=None, metrics: str | Sequence[str] = DEFAULT_METRICS,
                     crop_border: int = 4, protocol: str = "auto", strip: Sequence[str] = (), device: str = "cpu",
                     backend: str = "auto", progress: bool = False, baseline=None,
                     baseline_dir: str | Path | None = None, processes: Processes | None = None) -> EvaluationReport:
    """Score every SR image of ``sr_dir`` against the same-named GT of ``gt_dir`` (see the module docstring).

    Args:
        sr_dir, gt_dir, lq_dir: folders; ``lq_dir`` adds the bicubic baseline and enables ``consistency``.
        metrics: names or a comma-separated string (see [`stablesr.metrics.METRICS`]).
        crop_border: pixels dropped on each side for PSNR/SSIM (BasicSR convention; 4 is common at x4, pyiqa's
            default is 0: state it when comparing with published numbers).
        protocol: "auto", "crops" or "full" (only names the protocol in the report).
        strip: name suffixes removed before pairing (e.g. ``("_HR", "_LR4")``).
        device / backend: for the learned metrics ("auto", "torchmetrics" or "pyiqa").
        baseline: a learned baseline run on every LQ file, e.g. a
            [`stablesr.models.rrdbnet.RealESRGANUpscaler`] (anything with ``key``, ``label``,
            ``upscale(lq, (width, height)) -> (image, note or None)`` and ``describe()``); needs ``lq_dir``. Its
            rows have ``method == baseline.key``.
        baseline_dir: folder where the baseline's outputs are saved as ``NAME.png`` (the HTML report shows their
            crops and FID reads them); without it they are not kept (FID then runs the baseline again).
        processes: a [`stablesr.distributed.Processes`] to share the pairs among (``accelerate launch``): each process
            scores its share ([`Processes.share`]), the per-image rows are gathered, and every process returns the
            same rows and means as one process would. FID needs every image's features, so it is computed by the main
            process only (the other processes' ``means`` have no ``fid``). All processes must call it.

    Raises:
        `MetricUnavailableError`: a requested learned metric cannot be loaded (checked before any work).
        `FileNotFoundError`: a folder does not exist.
    """
    names = M.parse_metric_names(metrics)
    if "consistency" in names and not lq_dir:
        raise ValueError("the consistency metric compares the SR image with its LQ input: pass --lq")
    if baseline is not None and not lq_dir:
        raise ValueError(f"the {baseline.label} baseline upscales the LQ inputs: pass --lq (lq_dir)")
    baseline_dir = Path(baseline_dir) if baseline is not None and baseline_dir is not None else None
    resized: list[tuple[str, str]] = []  # (name, note) of baseline outputs resized to the GT size
    backends: dict[str, str] = {}
    loaded: dict[str, M.ImageMetric] = {}
    for n in names:  # load every learned metric before any work: fail fast with the install hint
        if not M.METRICS[n].learned:
            backends[n] = "builtin"
        elif n == "fid":
            backends[n] = M.fid_backend(backend)
        else:
            loaded[n] = M.load_metric(n, device, backend)
            backends[n] = loaded[n].backend
    per_image = [n for n in names if M.METRICS[n].kind != "set"]
    pairing = pair_folders(sr_dir, gt_dir, lq_dir, strip)
    rows: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    paths: dict[str, dict[str, Path | None]] = {}
    gt_sizes, lq_sizes = [], []
    ok_pairs = []
    processes = processes or Processes()
    # Per pair, in pairing order: (index, name, results or None, error message or None); gathered from every process.
    records: list[tuple[int, str, dict[str, Any] | None, str | None]] = []
    iterator = [(i, *pairing.pairs[i]) for i in processes.share(len(pairing.pairs))]  # every pair with one process
    if progress and processes.is_local_main:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="evaluating", unit="img", leave=False)
    for i, name, sr_path, gt_path, lq_path in iterator:
        base_path, note = None, None
        try:
            sr = load_image(sr_path).rgb
            gt = load_image(gt_path).rgb
            lq = load_image(lq_path).rgb if lq_path else None
            if sr.size != gt.size:
                raise ValueError(f"size mismatch: SR {sr_path.name} is {sr.width}x{sr.height}, GT {gt_path.name} is "
                                 f"{gt.width}x{gt.height}")
            sr_row = {"name": name, "method": "sr", "width": sr.width, "height": sr.height}
            sr_row.update(M.compute_image_metrics(sr, gt, lq, per_image, crop_border=crop_border, loaded=loaded))
            new_rows = [sr_row]
            if lq is not None:
                bic = bicubic_baseline(lq, gt.size)
                bic_row = {"name": name, "method": "bicubic", "width": bic.width, "height": bic.height}
                bic_row.update(M.compute_image_metrics(bic, gt, lq, per_image, crop_border=crop_border,
                                                       loaded=loaded))
                new_rows.append(bic_row)
                if baseline is not None:
                    base, note = baseline.upscale(lq, gt.size)
                    base_row = {"name": name, "method": baseline.key, "width": base.width, "height": base.height}
                    base_row.update(M.compute_image_metrics(base, gt, lq, per_image, crop_border=crop_border,
                                                            loaded=loaded))
                    new_rows.append(base_row)
                    base_path = (save_image(base, baseline_dir / f"{name}.png", overwrite=True)
                                 if baseline_dir is not None else None)
        except (ImageLoadError, ValueError, OSError) as err:
            records.append((i, name, None, str(err)))
            continue
        entry: dict[str, Path | None] = {"sr": sr_path, "gt": gt_path, "lq": lq_path}
        if baseline is not None and lq is not None and base_path is not None:
            entry[baseline.key] = base_path
        records.append((i, name, {"rows": new_rows, "gt_size": gt.size, "lq_size": lq.size if lq is not None else None,
                                  "paths": entry, "note": note if baseline is not None and lq is not None else None},
                        None))
    for i, name, result, message in sorted(processes.gather(records), key=lambda record: record[0]):
        if result is None:
            errors.append((name, message))
            continue
        rows.extend(result["rows"])
        gt_sizes.append(result["gt_size"])
        if result["lq_size"] is not None:
            lq_sizes.append(result["lq_size"])
        ok_pairs.append(pairing.pairs[i])
        paths[name] = result["paths"]
        if result["note"]:
            resized.append((name, result["note"]))

    columns = M.metric_columns(per_image)
    means: dict[str, dict[str, float | None]] = {}
    counts: dict[str, int] = {}
    for method in ("sr", "bicubic") + ((baseline.key,) if baseline is not None else ()):
        method_rows = [r for r in rows if r["method"] == method]
        if not method_rows:
            continue
        means[method] = {c: _mean([r.get(c) for r in method_rows]) for c in columns}
        counts[method] = len(method_rows)
    if "fid" in names and len(ok_pairs) >= 2 and processes.is_main:
        gts = [p[2] for p in ok_pairs]
        means["sr"]["fid"] = M.compute_fid([p[1] for p in ok_pairs], gts, device, backend)
        with_lq = [p for p in ok_pairs if p[3] is not None]
        if len(with_lq) >= 2:
            def make(i, pairs=with_lq):
                gt_img = load_image(pairs[i][2]).rgb
                return bicubic_baseline(load_image(pairs[i][3]).rgb, gt_img.size)

            means["bicubic"]["fid"] = M.compute_fid(_LazyImages(len(with_lq), make), [p[2] for p in with_lq],
                                                    device, backend)
            if baseline is not None:
                def make_baseline(i, pairs=with_lq):
                    saved = paths[pairs[i][0]].get(baseline.key)
                    if saved is not None:
                        return load_image(saved).rgb
                    gt_img = load_image(pairs[i][2]).rgb
                    return baseline.upscale(load_image(pairs[i][3]).rgb, gt_img.size)[0]

                means[baseline.key]["fid"] = M.compute_fid(_LazyImages(len(with_lq), make_baseline),
                                                           [p[2] for p in with_lq], device, backend)
    elif "fid" in names and len(ok_pairs) < 2:
        errors.append(("fid", "FID needs at least 2 evaluated pairs"))

    proto = infer_protocol(gt_sizes, lq_sizes if len(lq_sizes) == len(gt_sizes) else [], protocol)
    proto.update(crop_border=crop_border,
                 color_space="PSNR/SSIM on Y (ITU-R BT.601, BasicSR/MATLAB convention); psnr_rgb/ssim_rgb on RGB")
    settings = {"sr_dir": str(sr_dir), "gt_dir": str(gt_dir), "lq_dir": str(lq_dir) if lq_dir else None,
                "strip": list(strip), "device": device}
    notes: list[str] = []
    if baseline is not None:
        settings["baseline"] = dict(baseline.describe(), output_dir=str(baseline_dir) if baseline_dir else None)
        notes.extend(baseline_notes(baseline, resized, sum(1 for r in rows if r["method"] == baseline.key)))
    return EvaluationReport(rows=rows, means=means, counts=counts, protocol=proto, metrics=names, backends=backends,
                            missing=pairing.missing, errors=errors, paths=paths, settings=settings, notes=notes)


def baseline_notes(baseline, resized: Sequence[tuple[str, str]], count: int) -> list[str]:
    """Report notes for a learned baseline: what ran (weights, model, tiling) and which outputs were resized.

    Args:
        baseline: the baseline (see [`evaluate_folders`]); ``resized``: ``(image name, note)`` for every output the
            baseline resized to the requested size; ``count``: images the baseline upscaled.
    """
    info = baseline.describe()
    model = info.get("model") or {}
    arch = (f"RRDBNet x{model['scale']}, {model['num_block']} blocks, {model['num_feat']} features"
            if {"scale", "num_block", "num_feat"} <= set(model) else "")
    tiling = (f"tiles of {info['tile_size']} px + {info['tile_pad']} px context" if info.get("tile_size")
              else "no tiling")
    weights = Path(info["weights"]).name if info.get("weights") else "in-memory model"
    notes = [f"{baseline.label} baseline: {weights}" + (f" ({arch})" if arch else "") + f", {tiling}, "
             f"{count} image(s)"]
    if resized:
        name, note = resized[0]
        notes.append(f"{baseline.label}: the output was resized to the requested size for {len(resized)} of {count} "
                     f"image(s), e.g. {name}: {note}")
    return notes
