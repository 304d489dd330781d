"""The fidelity curve: how the CFW weight w trades realism (w = 0) for fidelity (w = 1), measured.

Each image is sampled **once** (``output_type="latent"``); only the CFW decode is repeated per weight
([`StableSRPipeline.decode_latents`]), so a 5-point curve costs one sampling plus five VAE decodes. Per weight we
report PSNR / SSIM on Y (with ``crop_border``) and LPIPS (when torchmetrics or pyiqa can load it) against the ground
truth when there is one, and the SR3 ``consistency`` with the LQ input (no ground truth needed: bicubic-downsampled
output vs input, PSNR dB). Results: a table (CSV / JSON) and a PNG plot of the mean per weight (matplotlib when
installed, otherwise a small line plot drawn with PIL, so no extra dependency is needed).

    stablesr fidelity-curve photos/*.png --gt hr/ -o curve/ --weights 0,0.25,0.5,0.75,1 --steps 50
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import metrics as M

__all__ = ["DEFAULT_WEIGHTS", "FidelityCurve", "add_fidelity_curve_parser", "cmd_fidelity_curve", "fidelity_curve",
           "plot_curve"]

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
        images: ``{(image name, weight): PIL image}`` when ``keep_images=True``.
    """

    weights: list[float]
    metrics: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    images: dict[tuple[str, float], Image.Image] = field(default_factory=dict)

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
        sign = 1 if _higher_is_better(metric) else -1
        return max(rows, key=lambda r: sign * r[metric])["weight"]

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "weight"] + self.metrics)
            for r in self.rows + self.mean_rows():
                writer.writerow([r["image"], r["weight"]] + ["" if r.get(m) is None else repr(float(r[m]))
                                                             for m in self.metrics])
        return path

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return "inf" if v > 0 else "nan"
            return v

        return {
            "weights": self.weights,
            "metrics": {m: {"label": _label(m), "higher_is_better": _higher_is_better(m)} for m in self.metrics},
            "mean": [{k: clean(v) for k, v in r.items()} for r in self.mean_rows()],
            "per_image": [{k: clean(v) for k, v in r.items()} for r in self.rows],
            "best_weight": {m: self.best_weight(m) for m in self.metrics},
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    def plot(self, path: str | Path) -> Path:
        return plot_curve(self, path)


def _higher_is_better(column: str) -> bool:
    return False if column == "consistency_mse" else M.METRICS[column].higher_is_better


def _label(column: str) -> str:
    return "SR3 consistency: MSE ([0, 1] units) of bicubic-down(SR) vs LQ" if column == "consistency_mse" \
        else M.METRICS[column].label


def _as_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    from .image_io import load_image

    loaded = load_image(img)
    if loaded.alpha is not None:
        rgba = loaded.rgb.copy()
        rgba.putalpha(loaded.alpha)
        return rgba
    return loaded.rgb


def fidelity_curve(pipe, lq_images: Sequence[Any], gt_images: Sequence[Any] | None = None,
                   weights: Sequence[float] = DEFAULT_WEIGHTS, *, names: Sequence[str] | None = None,
                   metrics: Sequence[str] = DEFAULT_METRICS, crop_border: int = 4, upscale: float | None = None,
                   color_fix: str = "wavelet", vae_tile_size: int | None = 1024, vae_tile_overlap: int = 64,
                   metric_device: str = "cpu", metric_backend: str = "auto", keep_images: bool = False,
                   on_image=None, **pipe_kwargs) -> FidelityCurve:
    """Sample each LQ image once, decode it at every CFW weight, and measure each decode.

    Args:
        pipe: a [`StableSRPipeline`].
        lq_images: PIL images or paths.
        gt_images: ground truth aligned with ``lq_images`` (entries may be ``None``), or ``None``.
        weights: CFW weights in [0, 1].
        names: a name per image for the table (default: file stems, or ``image0``...).
        metrics: any of [`stablesr.metrics.METRICS`] that is per image: full-reference ones (psnr, ssim, lpips,
            dists, ...) need ground truth; ``consistency`` uses the LQ; no-reference ones (clipiqa, musiq, ...) need
            nothing. A learned metric that cannot be loaded is skipped with a note.
        crop_border: for PSNR/SSIM.
        upscale: output scale; default: GT size / LQ size when there is ground truth, else 4.
        color_fix, vae_tile_size, vae_tile_overlap: used for sampling and for every decode.
        on_image: ``on_image(name, weight, image)`` called for every decode (e.g. to save it).
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
        names = [Path(x).stem if not isinstance(x, Image.Image) else f"image{i}" for i, x in enumerate(lq_list)]
    names = list(names)

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
        if M.METRICS[m].backends != ("builtin",):
            try:
                loaded[m] = M.load_metric(m, metric_device, metric_backend)
            except M.MetricUnavailableError as err:
                notes.append(f"{m} skipped: {err}")
                logger.warning("%s skipped: %s", m, err)
                wanted.remove(m)
    columns = [c for m in wanted for c in ((m, "consistency_mse") if m == "consistency" else (m,))]

    rows: list[dict[str, Any]] = []
    images: dict[tuple[str, float], Image.Image] = {}
    for name, lq_src, gt_src in zip(names, lq_list, gt_list, strict=True):
        lq = _as_pil(lq_src)
        gt = _as_pil(gt_src).convert("RGB") if gt_src is not None else None
        if gt is None and has_gt:
            notes.append(f"{name}: no ground truth; only no-reference metrics and consistency")
        scale = upscale
        if scale is None:
            scale = gt.width / lq.width if gt is not None else 4.0
        out = pipe(lq, upscale=scale, color_fix=color_fix, vae_tile_size=vae_tile_size,
                   vae_tile_overlap=vae_tile_overlap, output_type="latent", **pipe_kwargs)
        latents, condition = out.latents[0], out.conditions[0]
        if gt is not None and tuple(reversed(condition.output_size)) != gt.size:
            h, w = condition.output_size
            raise ValueError(f"{name}: the output is {w}x{h} but the ground truth is {gt.width}x{gt.height}; "
                             f"pass upscale so that round(upscale x {lq.width}x{lq.height}) matches it")
        lq_rgb = lq.convert("RGB")
        for w in weights:
            img = pipe.decode_latents(latents, condition, w, color_fix, vae_tile_size, vae_tile_overlap)
            rgb = img.convert("RGB")
            row: dict[str, Any] = {"image": name, "weight": w}
            for m in wanted:
                spec = M.METRICS[m]
                if m == "psnr":
                    row[m] = M.psnr(rgb, gt, crop_border) if gt is not None else None
                elif m == "ssim":
                    row[m] = M.ssim(rgb, gt, crop_border) if gt is not None else None
                elif m == "psnr_rgb":
                    row[m] = M.psnr(rgb, gt, crop_border, y_channel=False) if gt is not None else None
                elif m == "ssim_rgb":
                    row[m] = M.ssim(rgb, gt, crop_border, y_channel=False) if gt is not None else None
                elif m == "consistency":
                    row.update(M.consistency(rgb, lq_rgb))
                elif spec.kind == "fr":
                    row[m] = loaded[m](rgb, gt) if gt is not None else None
                else:
                    row[m] = loaded[m](rgb)
            rows.append(row)
            if keep_images:
                images[(name, w)] = img
            if on_image is not None:
                on_image(name, w, img)
    return FidelityCurve(weights=weights, metrics=columns, rows=rows, notes=notes, images=images)


# ----------------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------------


_SHORT_LABELS = {"psnr": "PSNR-Y dB vs GT", "ssim": "SSIM-Y vs GT", "psnr_rgb": "PSNR-RGB dB vs GT",
                 "ssim_rgb": "SSIM-RGB vs GT", "consistency": "consistency dB vs LQ", "lpips": "LPIPS vs GT",
                 "dists": "DISTS vs GT", "clipiqa": "CLIP-IQA", "musiq": "MUSIQ", "maniqa": "MANIQA", "niqe": "NIQE"}


def _panels(curve: FidelityCurve) -> list[tuple[str, list[float], list[float]]]:
    means = curve.mean_rows()
    panels = []
    for m in curve.metrics:
        if m == "consistency_mse":
            continue
        pts = [(r["weight"], r[m]) for r in means if r.get(m) is not None and math.isfinite(r[m])]
        if pts:
            arrow = "higher is better" if M.METRICS[m].higher_is_better else "lower is better"
            panels.append((f"{_SHORT_LABELS.get(m, m)} ({arrow})", [p[0] for p in pts], [p[1] for p in pts]))
    return panels


def plot_curve(curve: FidelityCurve, path: str | Path) -> Path:
    """A PNG with one panel per metric: the mean over images against the CFW weight w."""
    path = Path(path)
    panels = _panels(curve)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_plot(panels, path, len({r["image"] for r in curve.rows}))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.2), squeeze=False)
    for ax, (title, xs, ys) in zip(axes[0], panels, strict=False):
        ax.plot(xs, ys, marker="o")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("CFW weight w (0 realism - 1 fidelity)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"StableSR fidelity curve (mean of {len({r['image'] for r in curve.rows})} image(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tick_label(v: float, step: float) -> str:
    decimals = max(0, min(6, 1 - math.floor(math.log10(step)))) if step > 0 else 3
    return f"{v:.{decimals}f}"


def _pil_plot(panels: list[tuple[str, list[float], list[float]]], path: Path, n_images: int) -> Path:
    """Line plots drawn with PIL (used when matplotlib is not installed)."""
    pw, ph, margin_l, margin_b, margin_t = 340, 260, 58, 42, 34
    width = max(1, len(panels)) * pw
    canvas = Image.new("RGB", (width, ph + 24), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((8, 4), f"StableSR fidelity curve (mean of {n_images} image(s))", fill="black", font=font)
    if not panels:
        draw.text((8, 40), "no metric could be computed", fill="black", font=font)
    for k, (title, xs, ys) in enumerate(panels):
        ox, oy = k * pw, 24
        x0, x1 = ox + margin_l, ox + pw - 28
        y0, y1 = oy + margin_t, oy + ph - margin_b
        draw.text((ox + 8, oy + 6), title[:52], fill="black", font=font)
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        lo, hi = min(ys), max(ys)
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
        pts = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=(31, 119, 180), width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def add_fidelity_curve_parser(subparsers) -> None:
    """Register ``stablesr fidelity-curve`` on an ``argparse`` sub-parser collection."""
    from .cli import DEFAULT_MODEL, DTYPES, SCHEDULERS

    f = subparsers.add_parser(
        "fidelity-curve", help="measure the CFW weight trade-off: sample once, decode at several w",
        description="Sample each input once, decode it at every fidelity weight, and report PSNR/SSIM/LPIPS against "
                    "ground truth (--gt) and consistency with the input, as a table and a plot.")
    f.add_argument("inputs", nargs="+", help="LQ image files, folders or glob patterns")
    f.add_argument("--gt", help="folder of ground-truth images with the same names (stems)")
    f.add_argument("-o", "--output", required=True, help="output folder (plot, CSV, JSON, optional images)")
    f.add_argument("--model", default=DEFAULT_MODEL, help="converted folder, official .ckpt, or Hub id")
    f.add_argument("--cfw", help="official vqgan_cfw .ckpt when --model is an official .ckpt")
    f.add_argument("--weights", default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
                   help="comma-separated CFW weights (default 0,0.25,0.5,0.75,1)")
    f.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    f.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm")
    f.add_argument("--upscale", type=float, default=None, help="default: GT size / input size, else 4")
    f.add_argument("--color-fix", choices=("wavelet", "adain", "none"), default="wavelet")
    f.add_argument("--tile-size", type=int, default=None, help="aggregation tile in latent pixels")
    f.add_argument("--tile-overlap", type=int, default=None)
    f.add_argument("--vae-tile-size", type=int, default=1024, help="tiled VAE tile in pixels (0 = never tile)")
    f.add_argument("--start", choices=("lq", "noise"), default="lq")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--device", default="auto")
    f.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    f.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help="per-image metrics (default psnr,ssim,lpips,consistency; lpips is skipped with a note when "
                        "torchmetrics/pyiqa cannot load it)")
    f.add_argument("--crop-border", type=int, default=4)
    f.add_argument("--metric-backend", choices=("auto", "torchmetrics", "pyiqa"), default="auto")
    f.add_argument("--save-images", action="store_true", help="also save every decode as images/NAME_w0.25.png")
    f.add_argument("--recursive", action="store_true")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_fidelity_curve)


def cmd_fidelity_curve(args) -> int:
    """Run ``stablesr fidelity-curve``; exit code 0, or 2 for a usage error (printed without a traceback, also under
    ``python -m stablesr.cli``, where the CLI's own error class is a different object)."""
    from .cli import CLIError

    try:
        return _cmd_fidelity_curve(args)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_fidelity_curve(args) -> int:
    import torch

    from .cli import CLIError, _make_scheduler, load_pipeline
    from .image_io import ImageLoadError, iter_image_files, save_image

    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise CLIError(f"fidelity weights must be in [0, 1], got {args.weights}")
    try:
        files = iter_image_files(args.inputs, recursive=args.recursive)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    gt_files: list[Path | None] = [None] * len(files)
    if args.gt:
        gt_dir = Path(args.gt)
        if not gt_dir.is_dir():
            raise CLIError(f"--gt folder '{gt_dir}' does not exist")
        index = {p.stem: p for p in iter_image_files(gt_dir)}
        gt_files = [index.get(f.stem) for f in files]
        missing = [f.name for f, g in zip(files, gt_files, strict=True) if g is None]
        if missing:
            print(f"no ground truth for {len(missing)} input(s): {', '.join(missing[:10])}", file=sys.stderr)
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metric_names if m not in M.METRICS]
    if unknown:
        raise CLIError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(M.METRICS)}")

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    pipe = load_pipeline(args.model, args.cfw, device, args.dtype)
    if args.scheduler != "ddpm":
        _make_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = out / "images"

    def save(name, w, img):
        if args.save_images:
            alpha = img.getchannel("A") if img.mode == "RGBA" else None
            save_image(img.convert("RGB"), image_dir / f"{name}_w{w:.2f}.png", alpha=alpha, overwrite=True)

    try:
        lq = [f for f in files]
        curve = fidelity_curve(
            pipe, lq, gt_files if args.gt else None, weights, names=[f.stem for f in files], metrics=metric_names,
            crop_border=args.crop_border, upscale=args.upscale, color_fix=args.color_fix,
            vae_tile_size=args.vae_tile_size or None, metric_backend=args.metric_backend,
            metric_device=device if device != "mps" else "cpu", on_image=save, num_inference_steps=args.steps,
            tile_size=args.tile_size, tile_overlap=args.tile_overlap, start=args.start,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
        )
    except (ImageLoadError, ValueError) as err:
        raise CLIError(str(err)) from None
    paths = [curve.write_csv(out / "fidelity_curve.csv"), curve.write_json(out / "fidelity_curve.json"),
             curve.plot(out / "fidelity_curve.png")]
    cols = [c for c in curve.metrics if c != "consistency_mse"]
    print("w      " + "  ".join(f"{c:>12s}" for c in cols))
    for r in curve.mean_rows():
        print(f"{r['weight']:<6g} " + "  ".join(f"{'-' if r[c] is None else f'{r[c]:.4f}':>12s}" for c in cols))
    for c in cols:
        best = curve.best_weight(c)
        if best is not None:
            print(f"best w for {c}: {best:g}")
    for note in curve.notes:
        print(f"note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths) + (f" and {image_dir}/" if args.save_images else ""))
    return 0
