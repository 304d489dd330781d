"""The fidelity curve: how the CFW weight w trades realism (w = 0) for fidelity (w = 1), measured.

Each image is sampled **once** (``output_type="latent"``); only the CFW decode is repeated per weight
([`StableSRPipeline.decode_latents`]), so a 5-point curve costs one sampling plus five VAE decodes. Per weight we
report PSNR / SSIM on Y (with ``crop_border``) and LPIPS (when torchmetrics or pyiqa can load it) against the ground
truth when there is one, and the SR3 ``consistency`` with the LQ input (no ground truth needed: bicubic-downsampled
output vs input, PSNR dB). Results: a table (CSV / JSON) and a PNG plot of the mean per weight (matplotlib when
installed, otherwise a small line plot drawn with PIL, so no extra dependency is needed); every file is written
atomically. A learned baseline (Real-ESRGAN, [`stablesr.models.rrdbnet.RealESRGANUpscaler`]) can be measured on the
same inputs at the same output size: it is a table row and a dashed horizontal reference line in every panel. The
command line is ``stablesr fidelity-curve``:

    stablesr fidelity-curve photos/*.png --gt hr/ -o curve/ --weights 0,0.25,0.5,0.75,1 --steps 50
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import metrics as M
from .color import DEFAULT_COLOR_FIX
from .distributed import Processes
from .file_utils import atomic_write_path
from .image_io import load_image, save_image
from .image_processor import as_rgb_alpha_list
from .reports import json_safe, write_csv_rows, write_json_data

__all__ = ["DEFAULT_METRICS", "DEFAULT_WEIGHTS", "FidelityCurve", "fidelity_curve", "plot_curve"]

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_METRICS = ("psnr", "ssim", "lpips", "consistency")


@dataclass
class FidelityCurve:
    """The result of [`fidelity_curve`].

    Attributes:
        weights: the CFW weights decoded.
        metrics: metric columns present in ``rows`` (those that could be computed).
        rows: one dict per (image, weight): ``image``, ``weight`` and one value per metric (``None`` where it does
            not apply, e.g. PSNR for an image without ground truth).
        notes: why a metric was skipped (e.g. LPIPS not installed), images without ground truth.
        images: ``{(image name, weight): PIL image}`` when ``keep_images=True`` (with several ``processes``: only
            the images this process sampled).
        baseline: the learned baseline's results, or `None`: ``name`` (its key, e.g. "realesrgan"), ``label``,
            ``settings`` (weights, model, tiling) and ``rows`` (one dict per image: ``image`` and the metrics).
    """

    weights: list[float]
    metrics: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    images: dict[tuple[str, float], Image.Image] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None

    def baseline_mean(self) -> dict[str, Any] | None:
        """The learned baseline's mean of each metric over the images that have it (and ``n``), or `None`."""
        if self.baseline is None:
            return None
        rows = self.baseline["rows"]
        mean: dict[str, Any] = {"image": "MEAN", "n": len(rows)}
        for m in self.metrics:
            vals = [r[m] for r in rows if r.get(m) is not None]
            mean[m] = (math.inf if any(math.isinf(v) for v in vals) else float(np.mean(vals))) if vals else None
        return mean

    def mean_rows(self) -> list[dict[str, Any]]:
        """One row per weight: the mean of each metric over the images that have it (and ``n``, how many)."""
        out = []
        for w in self.weights:
            rows = [r for r in self.rows if r["weight"] == w]
            row: dict[str, Any] = {"image": "MEAN", "weight": w, "n": len(rows)}
            for m in self.metrics:
                vals = [r[m] for r in rows if r.get(m) is not None]
                row[m] = (math.inf if any(math.isinf(v) for v in vals) else float(np.mean(vals))) if vals else None
            out.append(row)
        return out

    def best_weight(self, metric: str) -> float | None:
        """The weight with the best mean ``metric`` (direction from the metric registry)."""
        rows = [r for r in self.mean_rows() if r.get(metric) is not None]
        if not rows:
            return None
        sign = 1 if M.column_spec(metric).higher_is_better else -1
        return max(rows, key=lambda r: sign * r[metric])["weight"]

    def write_csv(self, path: str | Path) -> Path:
        """Per-(image, weight) rows, then one ``MEAN`` row per weight; written atomically. With a learned baseline a
        last ``method`` column is added ("stablesr", or the baseline's key on its per-image and ``MEAN`` rows, whose
        ``weight`` is empty)."""
        def cells(r):
            return ["" if r.get(m) is None else repr(float(r[m])) for m in self.metrics]

        if self.baseline is None:
            rows = [["image", "weight"] + self.metrics]
            rows += [[r["image"], r["weight"]] + cells(r) for r in self.rows + self.mean_rows()]
            return write_csv_rows(rows, path)
        key = self.baseline["name"]
        rows = [["image", "weight"] + self.metrics + ["method"]]
        rows += [[r["image"], r["weight"]] + cells(r) + ["stablesr"] for r in self.rows + self.mean_rows()]
        rows += [[r["image"], ""] + cells(r) + [key] for r in self.baseline["rows"] + [self.baseline_mean()]]
        return write_csv_rows(rows, path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; non-finite numbers become the strings "inf" / "-inf" / "nan"."""
        specs = {m: M.column_spec(m) for m in self.metrics}
        return json_safe({
            "weights": self.weights,
            "metrics": {m: {"label": s.label, "higher_is_better": s.higher_is_better} for m, s in specs.items()},
            "mean": self.mean_rows(),
            "per_image": self.rows,
            "best_weight": {m: self.best_weight(m) for m in self.metrics},
            "notes": self.notes,
            **({} if self.baseline is None else {"baseline": {
                "name": self.baseline["name"], "label": self.baseline["label"],
                "settings": self.baseline.get("settings", {}), "mean": self.baseline_mean(),
                "per_image": self.baseline["rows"]}}),
        })

    def write_json(self, path: str | Path) -> Path:
        """[`to_dict`] as indented JSON, written atomically."""
        return write_json_data(self.to_dict(), path)

    def plot(self, path: str | Path) -> Path:
        return plot_curve(self, path)


def _open(image: Any) -> Any:
    """A path is loaded (RGB + alpha, as the pipeline accepts it); any other image is returned as it is."""
    return load_image(image) if isinstance(image, (str, os.PathLike)) else image


def _rgb(image: Any) -> Image.Image:
    """The RGB view of an input, as the pipeline sees it (for sizes and metrics)."""
    return as_rgb_alpha_list(image)[0][0]


def fidelity_curve(pipe, lq_images: Sequence[Any], gt_images: Sequence[Any] | None = None,
                   weights: Sequence[float] = DEFAULT_WEIGHTS, *, names: Sequence[str] | None = None,
                   metrics: Sequence[str] = DEFAULT_METRICS, crop_border: int = 4, upscale: float | None = None,
                   color_fix: str = DEFAULT_COLOR_FIX, vae_tile_size: int | None = 1024, vae_tile_overlap: int = 64,
                   metric_device: str = "cpu", metric_backend: str = "auto", keep_images: bool = False,
                   on_image=None, baseline=None, seeds: Sequence[int] | None = None,
                   processes: Processes | None = None, **pipe_kwargs) -> FidelityCurve:
    """Sample each LQ image once, decode it at every CFW weight, and measure each decode.

    Args:
        pipe: a [`StableSRPipeline`].
        lq_images: images as the pipeline accepts them (PIL, numpy, torch, [`stablesr.image_io.LoadedImage`]) or
            paths; they are passed to the pipeline as they are (an alpha channel is split off and re-attached there).
        gt_images: ground truth aligned with ``lq_images`` (entries may be ``None``), or ``None``.
        weights: CFW weights in [0, 1].
        names: a name per image for the table (default: file stems for paths, else ``image0``...).
        metrics: any of [`stablesr.metrics.METRICS`] that is per image: full-reference ones (psnr, ssim, lpips,
            dists, ...) need ground truth; ``consistency`` uses the LQ; no-reference ones (clipiqa, musiq, ...) need
            nothing. A learned metric that cannot be loaded is skipped with a note.
        crop_border: for PSNR/SSIM.
        upscale: output scale; default: GT size / LQ size when there is ground truth, else 4.
        color_fix, vae_tile_size, vae_tile_overlap: used for sampling and for every decode.
        on_image: ``on_image(name, weight, image)`` called for every decode (e.g. to save it).
        baseline: a learned baseline measured on the same inputs at the pipeline's output size, e.g. a
            [`stablesr.models.rrdbnet.RealESRGANUpscaler`] (see [`stablesr.evaluate.evaluate_folders`]); its rows
            are ``FidelityCurve.baseline["rows"]``.
        seeds: one seed per image: image ``i`` is sampled with ``torch.Generator().manual_seed(seeds[i])``, so its
            numbers do not depend on the other images or their order (instead of one shared ``generator``).
        processes: a [`stablesr.distributed.Processes`] to share the images among (``accelerate launch``): each
            process samples its share ([`Processes.share`]) and every process returns the whole table, the same as
            one process's (this needs ``seeds`` rather than a shared ``generator``). All processes must call it.
        **pipe_kwargs: passed to the pipeline call (``num_inference_steps``, ``generator``, ``tile_size``, ...).

    Returns:
        [`FidelityCurve`].
    """
    weights = [float(w) for w in weights]
    if not weights:
        raise ValueError("give at least one fidelity weight")
    for w in weights:
        if not 0 <= w <= 1:
            raise ValueError(f"fidelity weights must be in [0, 1], got {w}")
    for key in ("output_type", "fidelity_weight", "return_dict"):
        if key in pipe_kwargs:
            raise ValueError(f"{key} is set by fidelity_curve; do not pass it")
    lq_list = list(lq_images)
    gt_list = list(gt_images) if gt_images is not None else [None] * len(lq_list)
    if len(gt_list) != len(lq_list):
        raise ValueError(f"got {len(gt_list)} ground-truth images for {len(lq_list)} inputs")
    if names is None:
        names = [Path(x).stem if isinstance(x, (str, os.PathLike)) else f"image{i}" for i, x in enumerate(lq_list)]
    names = list(names)
    processes = processes or Processes()
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(lq_list):
            raise ValueError(f"got {len(seeds)} seeds for {len(lq_list)} inputs; pass one per image")
        if pipe_kwargs.get("generator") is not None:
            raise ValueError("pass either seeds (one per image) or a generator, not both")
    elif processes.count > 1 and pipe_kwargs.get("generator") is not None:
        raise ValueError("a shared generator gives each process other random numbers than one process would; "
                         "pass seeds (one per image) instead")

    notes: list[str] = []
    has_gt = any(g is not None for g in gt_list)
    wanted = []
    for m in metrics:
        spec = M.METRICS.get(m)
        if spec is None:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(M.METRICS)}")
        if spec.kind == "set":
            raise ValueError(f"{m} is a set metric; the fidelity curve reports per-image metrics")
        if spec.kind == "fr" and not has_gt:
            continue
        wanted.append(m)
    loaded: dict[str, M.ImageMetric] = {}
    for m in list(wanted):
        if M.METRICS[m].learned:
            try:
                loaded[m] = M.load_metric(m, metric_device, metric_backend)
            except M.MetricUnavailableError as err:
                notes.append(f"{m} skipped: {err}")
                logger.warning("%s skipped: %s", m, err)
                wanted.remove(m)
    columns = M.metric_columns(wanted)

    images: dict[tuple[str, float], Image.Image] = {}
    # Per image, in the order of the inputs: (index, rows, notes, baseline row or None, (name, resize note) or None).
    records: list[tuple[int, list[dict[str, Any]], list[str], dict[str, Any] | None, tuple[str, str] | None]] = []
    failed: list[tuple[int, str]] = []
    error: Exception | None = None
    for i in processes.share(len(lq_list)):  # every image with one process
        name, lq_src, gt_src = names[i], lq_list[i], gt_list[i]
        image_rows, image_notes, base_row, resized_note = [], [], None, None
        try:
            lq = _open(lq_src)
            lq_rgb = _rgb(lq)
            gt = _rgb(_open(gt_src)) if gt_src is not None else None
            if gt is None and has_gt:
                image_notes.append(f"{name}: no ground truth; only no-reference metrics and consistency")
            scale = upscale
            if scale is None:
                scale = gt.width / lq_rgb.width if gt is not None else 4.0
            if seeds is not None:
                pipe_kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seeds[i])
            out = pipe(lq, upscale=scale, color_fix=color_fix, vae_tile_size=vae_tile_size,
                       vae_tile_overlap=vae_tile_overlap, output_type="latent", **pipe_kwargs)
            latents, condition = out.latents[0], out.conditions[0]
            if gt is not None and tuple(reversed(condition.output_size)) != gt.size:
                h, w = condition.output_size
                raise ValueError(f"{name}: the output is {w}x{h} but the ground truth is {gt.width}x{gt.height}; "
                                 f"pass upscale so that round(upscale x {lq_rgb.width}x{lq_rgb.height}) matches it")
            for w in weights:
                img = pipe.decode_latents(latents, condition, w, color_fix, vae_tile_size, vae_tile_overlap)
                row: dict[str, Any] = {"image": name, "weight": w}
                row.update(M.compute_image_metrics(img, gt, lq_rgb, wanted, crop_border=crop_border, loaded=loaded))
                image_rows.append(row)
                if keep_images:
                    images[(name, w)] = img
                if on_image is not None:
                    on_image(name, w, img)
            if baseline is not None:
                out_h, out_w = condition.output_size
                base, note = baseline.upscale(lq_rgb, (out_w, out_h))
                base_row = {"image": name}
                base_row.update(M.compute_image_metrics(base, gt, lq_rgb, wanted, crop_border=crop_border,
                                                        loaded=loaded))
                resized_note = (name, note) if note else None
        except (ValueError, OSError) as err:
            if processes.count == 1:
                raise
            error = err  # raised below on every process, instead of leaving the others waiting in the gather
            failed.append((i, str(err)))
            break
        records.append((i, image_rows, image_notes, base_row, resized_note))
    if processes.count > 1:
        records, failed = processes.gather(records), processes.gather(failed)
        if failed:
            first = min(failed)  # the error one process would have stopped at
            raise error if error is not None and str(error) == first[1] else ValueError(first[1])
    records.sort(key=lambda record: record[0])
    rows = [row for record in records for row in record[1]]
    notes += [note for record in records for note in record[2]]
    baseline_rows = [record[3] for record in records if record[3] is not None]
    resized = [record[4] for record in records if record[4] is not None]
    baseline_result = None
    if baseline is not None:
        from .evaluate import baseline_notes

        notes.extend(baseline_notes(baseline, resized, len(baseline_rows)))
        baseline_result = {"name": baseline.key, "label": baseline.label, "settings": baseline.describe(),
                           "rows": baseline_rows}
    return FidelityCurve(weights=weights, metrics=columns, rows=rows, notes=notes, images=images,
                         baseline=baseline_result)


# ----------------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------------


def _panels(curve: FidelityCurve) -> list[tuple[str, list[float], list[float], float | None]]:
    """(title, weights, means, the learned baseline's mean or None) per plotted metric."""
    means = curve.mean_rows()
    reference = curve.baseline_mean() or {}
    panels = []
    for m in curve.metrics:
        if m == "consistency_mse":
            continue
        pts = [(r["weight"], r[m]) for r in means if r.get(m) is not None and math.isfinite(r[m])]
        if pts:
            spec = M.column_spec(m)
            arrow = "higher is better" if spec.higher_is_better else "lower is better"
            ref = reference.get(m)
            ref = ref if ref is not None and math.isfinite(ref) else None
            panels.append((f"{spec.short_label or m} ({arrow})", [p[0] for p in pts], [p[1] for p in pts], ref))
    return panels


def plot_curve(curve: FidelityCurve, path: str | Path) -> Path:
    """A PNG with one panel per metric: the mean over images against the CFW weight w, and the learned baseline's
    mean as a dashed horizontal line when there is one (written atomically)."""
    path = Path(path)
    panels = _panels(curve)
    label = curve.baseline["label"] if curve.baseline else None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_plot(panels, path, len({r["image"] for r in curve.rows}), label)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.2), squeeze=False)
    for ax, (title, xs, ys, ref) in zip(axes[0], panels, strict=False):
        ax.plot(xs, ys, marker="o", label="StableSR")
        if ref is not None:
            ax.axhline(ref, linestyle="--", color="tab:red", label=label)
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("CFW weight w (0 realism - 1 fidelity)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"StableSR fidelity curve (mean of {len({r['image'] for r in curve.rows})} image(s))", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_write_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _tick_label(v: float, step: float) -> str:
    decimals = max(0, min(6, 1 - math.floor(math.log10(step)))) if step > 0 else 3
    return f"{v:.{decimals}f}"


def _pil_plot(panels: list[tuple[str, list[float], list[float], float | None]], path: Path, n_images: int,
              baseline_label: str | None = None) -> Path:
    """Line plots drawn with PIL (used when matplotlib is not installed); a baseline is a dashed red line."""
    pw, ph, margin_l, margin_b, margin_t = 340, 260, 58, 42, 34
    width = max(1, len(panels)) * pw
    canvas = Image.new("RGB", (width, ph + 24), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((8, 4), f"StableSR fidelity curve (mean of {n_images} image(s))", fill="black", font=font)
    if not panels:
        draw.text((8, 40), "no metric could be computed", fill="black", font=font)
    for k, (title, xs, ys, ref) in enumerate(panels):
        ox, oy = k * pw, 24
        x0, x1 = ox + margin_l, ox + pw - 28
        y0, y1 = oy + margin_t, oy + ph - margin_b
        draw.text((ox + 8, oy + 6), title[:52], fill="black", font=font)
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        lo, hi = min(ys + ([ref] if ref is not None else [])), max(ys + ([ref] if ref is not None else []))
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * max(abs(lo), 1e-3) * 0.01 - 1e-6, hi + 0.5 * max(abs(hi), 1e-3) * 0.01 + 1e-6
        pad = 0.08 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        xmin, xmax = min(0.0, min(xs)), max(1.0, max(xs))

        def px(x, xmin=xmin, xmax=xmax, x0=x0, x1=x1):
            return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

        def py(y, lo=lo, hi=hi, y0=y0, y1=y1):
            return y1 - (y - lo) / (hi - lo) * (y1 - y0)

        for i in range(5):  # y grid and labels
            v = lo + (hi - lo) * i / 4
            yy = py(v)
            draw.line([x0, yy, x1, yy], fill=(225, 225, 225))
            draw.text((ox + 4, yy - 6), _tick_label(v, (hi - lo) / 4), fill=(60, 60, 60), font=font)
        for x in sorted(set(xs) | {xmin, xmax}):  # x ticks
            xx = px(x)
            draw.line([xx, y1, xx, y1 + 4], fill=(60, 60, 60))
            draw.text((xx - 8, y1 + 6), f"{x:g}", fill=(60, 60, 60), font=font)
        draw.text((x0 + 20, y1 + 22), "CFW weight w (0 realism - 1 fidelity)", fill=(60, 60, 60), font=font)
        if ref is not None:  # dashed horizontal reference line, labelled at its left end
            yy = py(ref)
            for xa in range(int(x0), int(x1), 8):
                draw.line([xa, yy, min(xa + 4, x1), yy], fill=(214, 39, 40), width=1)
            draw.text((x0 + 4, yy - 12), (baseline_label or "baseline")[:24], fill=(214, 39, 40), font=font)
        pts = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=(31, 119, 180), width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    return save_image(canvas, path, overwrite=True)
