"""``stablesr evaluate``: score restored images against ground truth, the way SR papers do.

    stablesr evaluate --sr OUT_DIR --gt HR_DIR [--lq LR_DIR] [--crop-border 4] [--metrics psnr,ssim,lpips]
                      [--out REPORT_DIR]

Files are paired by name (stem, extension ignored; ``--strip`` removes suffixes such as ``_HR`` / ``_LR4`` / ``x4``
first). Every requested metric is computed per image and averaged; with ``--lq`` the LQ inputs also get a *bicubic
baseline* row (LQ bicubic-upscaled to the GT size, same metrics) and the SR3 ``consistency`` metric can be computed.
The report names the evaluation protocol, because the field uses two incompatible ones: 128->512 center crops
(StableSR, SeeSR, OSEDiff test sets) vs full-size images (ResShift, SinSR, PASD); it is inferred from the image sizes
unless ``--protocol`` says it. Outputs: a table on the terminal, ``metrics.csv``, ``metrics.json`` and a
self-contained ``report.html`` with side-by-side zoomable crops (LQ / bicubic / SR / GT) of each image.

Missing pairs are listed, never a crash; an SR/GT size mismatch or an unreadable file is a per-file error (exit code
1 when any happened).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import metrics as M
from .image_io import IMAGE_EXTENSIONS, ImageLoadError, load_image

__all__ = [
    "EvaluationReport",
    "add_evaluate_parser",
    "cmd_evaluate",
    "evaluate_folders",
    "format_table",
    "infer_protocol",
    "pair_folders",
    "write_csv",
    "write_html",
    "write_json",
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
        rows: per-image dicts: ``name``, ``method`` ("sr" or "bicubic"), ``width``, ``height`` and one value per
            metric (``None`` where it could not be computed, e.g. ``consistency`` without an LQ file).
        means: ``{"sr": {metric: mean}, "bicubic": {...}}`` (bicubic only with LQ files); set metrics (FID) appear
            only here. ``counts``: images averaged per method.
        protocol: see [`infer_protocol`], plus ``crop_border`` and the color space of PSNR/SSIM.
        metrics: metric names in order; backends: ``{metric: "builtin" | "torchmetrics" | "pyiqa"}``.
        missing: unpaired files (see [`pair_folders`]); errors: ``(file name, message)`` per failed pair.
        paths: ``{name: {"sr": Path, "gt": Path, "lq": Path | None}}`` for the HTML report.
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


def _parse_metrics(text: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower().replace("-", "") for m in (text.split(",") if isinstance(text, str) else text)]
    aliases = {"psnry": "psnr", "ssimy": "ssim", "psnrrgb": "psnr_rgb", "ssimrgb": "ssim_rgb", "clip_iqa": "clipiqa",
               "clipiqa+": "clipiqa", "maniqapipal": "maniqa"}
    out = []
    for n in names:
        if not n:
            continue
        n = aliases.get(n, n)
        if n not in M.METRICS:
            raise ValueError(f"unknown metric '{n}'; choose from {', '.join(M.METRICS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no metrics given")
    return out


def _bicubic_up(lq: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The bicubic baseline: PIL bicubic (a = -0.5, Matlab-like kernel), rounded to 8 bits like a saved file."""
    return lq.resize(size, Image.Resampling.BICUBIC)


def _fr_nr_values(img: Image.Image, gt: Image.Image, lq: Image.Image | None, names: Sequence[str],
                  loaded: dict[str, M.ImageMetric], crop_border: int) -> dict[str, float | None]:
    values: dict[str, float | None] = {}
    for name in names:
        if name == "psnr":
            values[name] = M.psnr(img, gt, crop_border, y_channel=True)
        elif name == "ssim":
            values[name] = M.ssim(img, gt, crop_border, y_channel=True)
        elif name == "psnr_rgb":
            values[name] = M.psnr(img, gt, crop_border, y_channel=False)
        elif name == "ssim_rgb":
            values[name] = M.ssim(img, gt, crop_border, y_channel=False)
        elif name == "consistency":
            if lq is None:
                values[name] = values["consistency_mse"] = None
            else:
                values.update(M.consistency(img, lq))
        elif M.METRICS[name].kind == "fr":
            values[name] = loaded[name](img, gt)
        elif M.METRICS[name].kind == "nr":
            values[name] = loaded[name](img)
    return values


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
                     backend: str = "auto", progress: bool = False) -> EvaluationReport:
    """Score every SR image of ``sr_dir`` against the same-named GT of ``gt_dir`` (see the module docstring).

    Args:
        sr_dir, gt_dir, lq_dir: folders; ``lq_dir`` adds the bicubic baseline and enables ``consistency``.
        metrics: names or a comma-separated string (see [`stablesr.metrics.METRICS`]).
        crop_border: pixels dropped on each side for PSNR/SSIM (BasicSR convention; 4 is common at x4, pyiqa's
            default is 0: state it when comparing with published numbers).
        protocol: "auto", "crops" or "full" (only names the protocol in the report).
        strip: name suffixes removed before pairing (e.g. ``("_HR", "_LR4")``).
        device / backend: for the learned metrics ("auto", "torchmetrics" or "pyiqa").

    Raises:
        `MetricUnavailableError`: a requested learned metric cannot be loaded (checked before any work).
        `FileNotFoundError`: a folder does not exist.
    """
    names = _parse_metrics(metrics)
    if "consistency" in names and not lq_dir:
        raise ValueError("the consistency metric compares the SR image with its LQ input: pass --lq")
    backends: dict[str, str] = {}
    loaded: dict[str, M.ImageMetric] = {}
    for n in names:  # load every learned metric before any work: fail fast with the install hint
        if M.METRICS[n].backends == ("builtin",):
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
    iterator = pairing.pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="evaluating", unit="img", leave=False)
    for name, sr_path, gt_path, lq_path in iterator:
        try:
            sr = load_image(sr_path).rgb
            gt = load_image(gt_path).rgb
            lq = load_image(lq_path).rgb if lq_path else None
            if sr.size != gt.size:
                raise ValueError(f"size mismatch: SR {sr_path.name} is {sr.width}x{sr.height}, GT {gt_path.name} is "
                                 f"{gt.width}x{gt.height}")
            sr_row = {"name": name, "method": "sr", "width": sr.width, "height": sr.height}
            sr_row.update(_fr_nr_values(sr, gt, lq, per_image, loaded, crop_border))
            new_rows = [sr_row]
            if lq is not None:
                bic = _bicubic_up(lq, gt.size)
                bic_row = {"name": name, "method": "bicubic", "width": bic.width, "height": bic.height}
                bic_row.update(_fr_nr_values(bic, gt, lq, per_image, loaded, crop_border))
                new_rows.append(bic_row)
        except (ImageLoadError, ValueError, OSError) as err:
            errors.append((name, str(err)))
            continue
        rows.extend(new_rows)
        gt_sizes.append(gt.size)
        if lq is not None:
            lq_sizes.append(lq.size)
        ok_pairs.append((name, sr_path, gt_path, lq_path))
        paths[name] = {"sr": sr_path, "gt": gt_path, "lq": lq_path}

    columns = [c for n in per_image for c in ((n, "consistency_mse") if n == "consistency" else (n,))]
    means: dict[str, dict[str, float | None]] = {}
    counts: dict[str, int] = {}
    for method in ("sr", "bicubic"):
        method_rows = [r for r in rows if r["method"] == method]
        if not method_rows:
            continue
        means[method] = {c: _mean([r.get(c) for r in method_rows]) for c in columns}
        counts[method] = len(method_rows)
    if "fid" in names and len(ok_pairs) >= 2:
        gts = [p[2] for p in ok_pairs]
        means["sr"]["fid"] = M.compute_fid([p[1] for p in ok_pairs], gts, device, backend)
        with_lq = [p for p in ok_pairs if p[3] is not None]
        if len(with_lq) >= 2:
            def make(i, pairs=with_lq):
                gt_img = load_image(pairs[i][2]).rgb
                return _bicubic_up(load_image(pairs[i][3]).rgb, gt_img.size)

            means["bicubic"]["fid"] = M.compute_fid(_LazyImages(len(with_lq), make), [p[2] for p in with_lq],
                                                    device, backend)
    elif "fid" in names:
        errors.append(("fid", "FID needs at least 2 evaluated pairs"))

    proto = infer_protocol(gt_sizes, lq_sizes if len(lq_sizes) == len(gt_sizes) else [], protocol)
    proto.update(crop_border=crop_border,
                 color_space="PSNR/SSIM on Y (ITU-R BT.601, BasicSR/MATLAB convention); psnr_rgb/ssim_rgb on RGB")
    settings = {"sr_dir": str(sr_dir), "gt_dir": str(gt_dir), "lq_dir": str(lq_dir) if lq_dir else None,
                "strip": list(strip), "device": device}
    return EvaluationReport(rows=rows, means=means, counts=counts, protocol=proto, metrics=names, backends=backends,
                            missing=pairing.missing, errors=errors, paths=paths, settings=settings)


# ----------------------------------------------------------------------------------------------------------------------
# Output: terminal table, CSV, JSON
# ----------------------------------------------------------------------------------------------------------------------


def _columns(report: EvaluationReport) -> list[str]:
    cols = []
    for n in report.metrics:
        cols.append(n)
        if n == "consistency":
            cols.append("consistency_mse")
    return cols


def _fmt(value, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "nan"
        if column == "consistency_mse":
            return f"{value:.3e}"
        if column.startswith(("psnr", "consistency", "fid", "musiq")):
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def protocol_line(report: EvaluationReport) -> str:
    p = report.protocol
    scale = f", scale x{p['scale']:g}" if p.get("scale") else ""
    return (f"protocol: {p['description']} [{p['source']}]{scale}; crop border {p['crop_border']} px; "
            "PSNR/SSIM on Y (BT.601)")


def format_table(report: EvaluationReport, max_name: int = 28) -> str:
    """The terminal table: one line per image (SR), then the SR mean and the bicubic mean."""
    cols = [c for c in _columns(report) if c != "consistency_mse"]
    set_cols = [c for c in cols if M.METRICS.get(c) and M.METRICS[c].kind == "set"]
    arrows = {c: ("↑" if M.METRICS[c].higher_is_better else "↓") for c in cols}
    header = ["image"] + [f"{c}{arrows[c]}" for c in cols]
    lines = []
    body = []
    for r in report.rows:
        if r["method"] != "sr":
            continue
        body.append([r["name"][:max_name]] + ["" if c in set_cols else _fmt(r.get(c), c) for c in cols])
    for method, label in (("sr", "mean SR"), ("bicubic", "mean bicubic")):
        if method in report.means:
            body.append([f"{label} ({report.counts[method]})"] + [_fmt(report.means[method].get(c), c) for c in cols])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(row[0].ljust(widths[0]) if i == 0 else row[i].rjust(widths[i])  # noqa: E731
                                    for i in range(len(row))) if row else ""
    lines.append(protocol_line(report))
    lines.append(fmt_row(header))
    lines.append("-" * len(lines[-1]))
    n_images = sum(1 for r in report.rows if r["method"] == "sr")
    for i, row in enumerate(body):
        if i == n_images:
            lines.append("-" * len(lines[1]))
        lines.append(fmt_row(row))
    lines.extend(_missing_lines(report))
    for name, msg in report.errors:
        lines.append(f"error: {name}: {msg}")
    for w in report.protocol.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _missing_lines(report: EvaluationReport, limit: int = 10) -> list[str]:
    labels = {"sr_without_gt": "SR files without a GT file", "gt_without_sr": "GT files without an SR file",
              "lq_missing": "pairs without an LQ file (no bicubic row / consistency for them)",
              "lq_without_pair": "LQ files without an SR/GT pair", "duplicates": "duplicate names"}
    lines = []
    for key, label in labels.items():
        items = report.missing.get(key) or []
        if items:
            shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
            lines.append(f"missing: {len(items)} {label}: {shown}")
    return lines


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def write_csv(report: EvaluationReport, path: str | Path) -> Path:
    """Per-image rows (``method`` sr / bicubic), then ``MEAN`` rows per method (FID only there)."""
    path = Path(path)
    cols = _columns(report)
    set_cols = [c for c in cols if M.METRICS.get(c) and M.METRICS[c].kind == "set"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "method", "width", "height"] + cols)
        for r in report.rows:
            writer.writerow([r["name"], r["method"], r["width"], r["height"]]
                            + ["" if c in set_cols or r.get(c) is None else repr(float(r[c])) for c in cols])
        for method, values in report.means.items():
            writer.writerow(["MEAN", method, "", ""] + ["" if values.get(c) is None else repr(float(values[c]))
                                                        for c in cols])
    return path


def report_dict(report: EvaluationReport) -> dict[str, Any]:
    return _json_value({
        "protocol": report.protocol,
        "metrics": {n: {"label": M.METRICS[n].label, "higher_is_better": M.METRICS[n].higher_is_better,
                        "backend": report.backends.get(n)} for n in report.metrics},
        "settings": report.settings,
        "mean": report.means,
        "count": report.counts,
        "per_image": report.rows,
        "missing": report.missing,
        "errors": [{"name": n, "error": e} for n, e in report.errors],
    })


def write_json(report: EvaluationReport, path: str | Path) -> Path:
    """The whole report; non-finite numbers (PSNR of identical images) are written as the strings "inf" / "nan"."""
    path = Path(path)
    path.write_text(json.dumps(report_dict(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# HTML report
# ----------------------------------------------------------------------------------------------------------------------


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _window_sums(values: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, list[int], list[int]]:
    h, w = values.shape
    integral = np.pad(values.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = list(range(0, h - size + 1, stride)) or [0]
    xs = list(range(0, w - size + 1, stride)) or [0]
    if ys[-1] != h - size:
        ys.append(max(0, h - size))
    if xs[-1] != w - size:
        xs.append(max(0, w - size))
    sums = np.array([[integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
                      for x in xs] for y in ys])
    return sums, ys, xs


def pick_crops(sr: Image.Image, gt: Image.Image, size: int = 128, count: int = 2) -> list[tuple[str, tuple]]:
    """Crop boxes worth looking at: where SR differs most from GT, then the most detailed GT region elsewhere."""
    size = min(size, sr.width, sr.height)
    y_sr, y_gt = M.rgb_to_y(M.to_array(sr)), M.rgb_to_y(M.to_array(gt))
    err = np.abs(y_sr - y_gt)
    gy, gx = np.gradient(y_gt)
    detail = np.hypot(gx, gy)
    boxes: list[tuple[str, tuple]] = []
    for label, score in (("largest SR-GT difference", err), ("most GT detail", detail)):
        sums, ys, xs = _window_sums(score, size, max(1, size // 4))
        for idx in np.argsort(sums, axis=None)[::-1]:
            y, x = ys[idx // len(xs)], xs[idx % len(xs)]
            box = (x, y, x + size, y + size)
            overlap = any(min(b[2], box[2]) - max(b[0], box[0]) > size // 2 and
                          min(b[3], box[3]) - max(b[1], box[1]) > size // 2 for _, b in boxes)
            if not overlap:
                boxes.append((label, box))
                break
        if len(boxes) >= count:
            break
    return boxes


_HTML_STYLE = """
:root { --z: 2; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #f3f3f3; }
.crops { display: flex; flex-wrap: wrap; gap: 6px; margin: .3em 0 1em; cursor: zoom-in; }
.crops.big { --zz: 2; cursor: zoom-out; }
figure { margin: 0; }
figure img { width: calc(var(--z) * var(--zz, 1) * var(--w) * 1px); image-rendering: pixelated;
             image-rendering: crisp-edges; border: 1px solid #999; display: block; }
figcaption { font-size: 12px; text-align: center; }
.controls { position: sticky; top: 0; background: #fff; padding: .4em 0; border-bottom: 1px solid #ddd; }
.warn { color: #a00; }
"""

_HTML_SCRIPT = """
const z = document.getElementById('zoom'), zl = document.getElementById('zoomlabel');
z.addEventListener('input', () => { document.documentElement.style.setProperty('--z', z.value);
                                      zl.textContent = z.value + 'x'; });
document.querySelectorAll('.crops').forEach(c => c.addEventListener('click', () => c.classList.toggle('big')));
"""


def write_html(report: EvaluationReport, path: str | Path, max_images: int = 20, crop_size: int = 128,
               crops_per_image: int = 2) -> Path:
    """A self-contained HTML report: protocol, the metric table, and per image side-by-side crops (LQ nearest-
    upscaled, bicubic, SR, GT) embedded as PNG data URIs, zoomable (slider; click a row of crops to double it)."""
    path = Path(path)
    esc = html.escape
    cols = [c for c in _columns(report) if c != "consistency_mse"]
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>stablesr evaluation</title>",
           f"<style>{_HTML_STYLE}</style></head><body>", "<h1>stablesr evaluation</h1>",
           f"<p>{esc(protocol_line(report))}</p>"]
    out.append("<p>SR: <code>{}</code> &nbsp; GT: <code>{}</code>{}</p>".format(
        esc(str(report.settings.get("sr_dir"))), esc(str(report.settings.get("gt_dir"))),
        f" &nbsp; LQ: <code>{esc(str(report.settings['lq_dir']))}</code>" if report.settings.get("lq_dir") else ""))
    out.append("<p>" + ", ".join(f"{esc(n)} ({'higher' if M.METRICS[n].higher_is_better else 'lower'} is better; "
                                 f"{esc(report.backends.get(n, ''))})" for n in report.metrics) + "</p>")
    for w in report.protocol.get("warnings", []):
        out.append(f"<p class='warn'>warning: {esc(w)}</p>")
    out.append("<table><tr><th>image</th><th>method</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for r in report.rows:
        out.append(f"<tr><td><a href='#img-{esc(r['name'])}'>{esc(r['name'])}</a></td><td>{r['method']}</td>"
                   + "".join(f"<td>{_fmt(r.get(c), c) if M.METRICS[c].kind != 'set' else ''}</td>" for c in cols)
                   + "</tr>")
    for method, values in report.means.items():
        out.append(f"<tr class='mean'><td>mean ({report.counts[method]})</td><td>{method}</td>"
                   + "".join(f"<td>{_fmt(values.get(c), c)}</td>" for c in cols) + "</tr>")
    out.append("</table>")
    for line in _missing_lines(report, limit=50):
        out.append(f"<p class='warn'>{esc(line)}</p>")
    for name, msg in report.errors:
        out.append(f"<p class='warn'>error: {esc(name)}: {esc(msg)}</p>")

    out.append("<div class='controls'>zoom <input id='zoom' type='range' min='1' max='8' step='1' value='2'> "
               "<span id='zoomlabel'>2x</span> &nbsp; (click a row of crops to double it)</div>")
    names = list(report.paths)
    for name in names[:max_images]:
        p = report.paths[name]
        try:
            sr, gt = load_image(p["sr"]).rgb, load_image(p["gt"]).rgb
            lq = load_image(p["lq"]).rgb if p.get("lq") else None
        except (ImageLoadError, OSError) as err:
            out.append(f"<p class='warn'>{esc(name)}: {esc(str(err))}</p>")
            continue
        sr_row = next((r for r in report.rows if r["name"] == name and r["method"] == "sr"), {})
        summary = ", ".join(f"{c} {_fmt(sr_row.get(c), c)}" for c in cols if c in sr_row)
        out.append(f"<h3 id='img-{esc(name)}'>{esc(name)} "
                   f"<small>({sr.width}x{sr.height}; {esc(summary)})</small></h3>")
        panels = []
        if lq is not None:
            panels.append(("LQ (nearest)", lq.resize(gt.size, Image.Resampling.NEAREST)))
            panels.append(("bicubic", _bicubic_up(lq, gt.size)))
        panels += [("SR", sr), ("GT", gt)]
        for label, box in pick_crops(sr, gt, crop_size, crops_per_image):
            out.append(f"<div class='crops' title='{esc(label)}, box {box}'>")
            for title, img in panels:
                crop = img.crop(box)
                out.append(f"<figure><img style='--w:{crop.width}' src='{_png_data_uri(crop)}' alt='{esc(title)}'>"
                           f"<figcaption>{esc(title)}</figcaption></figure>")
            out.append(f"<figure><figcaption>{esc(label)}<br>x {box[0]}-{box[2]}, y {box[1]}-{box[3]}"
                       "</figcaption></figure></div>")
    if len(names) > max_images:
        out.append(f"<p>crops shown for the first {max_images} of {len(names)} images (--html-max-images)</p>")
    out.append(f"<script>{_HTML_SCRIPT}</script></body></html>")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def add_evaluate_parser(subparsers) -> None:
    """Register ``stablesr evaluate`` on an ``argparse`` sub-parser collection."""
    e = subparsers.add_parser(
        "evaluate", help="score restored images against ground truth (PSNR/SSIM on Y, LPIPS, ...)",
        description="Pair SR and GT files by name, compute metrics per image and on average, and write a table, CSV, "
                    "JSON and an HTML report with zoomable crops.")
    e.add_argument("--sr", required=True, help="folder of restored images")
    e.add_argument("--gt", required=True, help="folder of ground-truth images (same names)")
    e.add_argument("--lq", help="folder of the LQ inputs: adds a bicubic baseline row and allows 'consistency'")
    e.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help="comma-separated: psnr,ssim (Y channel), psnr_rgb,ssim_rgb, consistency (needs --lq), and "
                        "learned ones needing torchmetrics or pyiqa: lpips,dists,fid,clipiqa,musiq,maniqa,niqe "
                        f"(default {','.join(DEFAULT_METRICS)})")
    e.add_argument("--crop-border", type=int, default=4, help="pixels ignored on each side for PSNR/SSIM (default 4)")
    e.add_argument("--protocol", choices=("auto", "crops", "full"), default="auto",
                   help="name the protocol in the report (default: inferred from the sizes: 512x512 GT = crops)")
    e.add_argument("--strip", default="", help="comma-separated name suffixes removed before pairing, e.g. _HR,_LR4")
    e.add_argument("--out", help="report folder (default: SR folder name + '_eval' next to it)")
    e.add_argument("--metric-backend", choices=("auto", "torchmetrics", "pyiqa"), default="auto",
                   help="library for learned metrics (auto: torchmetrics, else pyiqa)")
    e.add_argument("--device", default="cpu", help="device for learned metrics (cpu, cuda, ...)")
    e.add_argument("--html-max-images", type=int, default=20, help="images with crops in report.html (default 20)")
    e.add_argument("--crop-size", type=int, default=128, help="crop size in the HTML report (default 128)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    """Run ``stablesr evaluate``; exit code 0, 1 when a pair failed (size mismatch, unreadable file), 2 for a usage
    error (printed without a traceback, also under ``python -m stablesr.cli``)."""
    from .cli import CLIError

    try:
        return _cmd_evaluate(args)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_evaluate(args) -> int:
    from .cli import CLIError

    strip = [s for s in (args.strip or "").split(",") if s]
    try:
        report = evaluate_folders(args.sr, args.gt, args.lq, args.metrics, args.crop_border, args.protocol, strip,
                                  args.device, args.metric_backend, progress=not args.quiet)
    except (M.MetricUnavailableError, ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    if not report.rows and not report.errors:
        print("\n".join(_missing_lines(report)), file=sys.stderr)
        raise CLIError(f"no SR/GT pairs with the same name in {args.sr} and {args.gt}")
    out = Path(args.out) if args.out else Path(args.sr).resolve().parent / (Path(args.sr).resolve().name + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(report))
    written = [write_csv(report, out / "metrics.csv"), write_json(report, out / "metrics.json"),
               write_html(report, out / "report.html", args.html_max_images, args.crop_size)]
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if report.errors else 0
