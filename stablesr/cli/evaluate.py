"""``stablesr evaluate``: score restored images against ground truth and write the reports.

    stablesr evaluate --sr OUT_DIR --gt HR_DIR [--lq LR_DIR] [--crop-border 4] [--metrics psnr,ssim,lpips]
                      [--out REPORT_DIR] [--baseline realesrgan --baseline-weights RealESRGAN_x4plus.pth]

Scoring is [`stablesr.evaluate.evaluate_folders`]; the table, ``metrics.csv``, ``metrics.json`` and the
self-contained ``report.html`` come from [`stablesr.reports`]. With ``--baseline realesrgan`` every LQ file is also
upscaled by Real-ESRGAN (outputs saved in ``REPORT_DIR/realesrgan/``) and scored as its own row. Exit code 0, 1 when
a pair failed (size mismatch, unreadable file), 2 for a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..evaluate import DEFAULT_METRICS
from .common import CLIError


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
    add_baseline_arguments(e, needs="--lq")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)


BASELINES = ("realesrgan",)


def add_baseline_arguments(parser, needs: str | None = None) -> None:
    """``--baseline``, ``--baseline-weights`` and ``--baseline-tile`` (shared with ``stablesr fidelity-curve``)."""
    extra = f" (needs {needs})" if needs else ""
    parser.add_argument("--baseline", choices=BASELINES,
                        help=f"also upscale every LQ input with a learned baseline and score it as its own row{extra}; "
                             "realesrgan needs --baseline-weights")
    parser.add_argument("--baseline-weights", metavar="PATH",
                        help="Real-ESRGAN RRDBNet weights: RealESRGAN_x4plus.pth (params_ema / params, loaded with "
                             "torch.load(weights_only=True)) or .safetensors; x2/x4 models, any block count")
    parser.add_argument("--baseline-tile", type=int, default=512,
                        help="Real-ESRGAN tile size in LQ pixels, 10 px of context around each (0 = whole image; "
                             "default 512)")


def baseline_from_args(args, device: str, needs: tuple[str, object] | None = None):
    """The baseline the options ask for (a [`stablesr.models.rrdbnet.RealESRGANUpscaler`]) or `None`.

    Args:
        needs: ``(option, value)`` that ``--baseline`` requires besides its weights, e.g. ``("--lq", args.lq)``.

    Raises:
        `CLIError`: a missing option, or weights that cannot be loaded.
    """
    if args.baseline is None:
        if args.baseline_weights:
            raise CLIError("--baseline-weights is only used with --baseline realesrgan")
        return None
    if not args.baseline_weights:
        raise CLIError(f"--baseline {args.baseline} needs --baseline-weights PATH (e.g. RealESRGAN_x4plus.pth from "
                       "the Real-ESRGAN releases)")
    if needs is not None and not needs[1]:
        raise CLIError(f"--baseline {args.baseline} needs {needs[0]}: the baseline upscales the LQ inputs")
    if args.baseline_tile < 0:
        raise CLIError(f"--baseline-tile must be >= 0, got {args.baseline_tile}")
    from ..models.rrdbnet import RealESRGANUpscaler, RRDBNetLoadError

    try:
        return RealESRGANUpscaler.from_file(args.baseline_weights, device=device, tile_size=args.baseline_tile)
    except (FileNotFoundError, RRDBNetLoadError) as err:
        raise CLIError(f"--baseline-weights: {err}") from None


def cmd_evaluate(args) -> int:
    from ..distributed import launched_processes, process_device
    from ..evaluate import evaluate_folders
    from ..metrics import MetricUnavailableError
    from ..reports import format_table, missing_lines, write_csv, write_html, write_json

    # Under `accelerate launch` each process scores its share of the pairs; the main process writes the reports.
    processes = launched_processes(args.device)
    args.device, device_warning = process_device(args.device, processes)
    if device_warning and processes.is_main:
        print(f"warning: {device_warning}", file=sys.stderr)
    strip = [s for s in (args.strip or "").split(",") if s]
    sr_dir = Path(args.sr).resolve()
    out = Path(args.out) if args.out else sr_dir.parent / (sr_dir.name + "_eval")
    baseline = baseline_from_args(args, args.device, needs=("--lq", args.lq))
    try:
        report = evaluate_folders(args.sr, args.gt, args.lq, args.metrics, args.crop_border, args.protocol, strip,
                                  args.device, args.metric_backend, progress=not args.quiet, baseline=baseline,
                                  baseline_dir=out / baseline.key if baseline is not None else None,
                                  processes=processes)
    except MetricUnavailableError as err:
        raise CLIError(str(err)) from None
    if not report.rows and not report.errors:
        print("\n".join(missing_lines(report)), file=sys.stderr)
        raise CLIError(f"no SR/GT pairs with the same name in {args.sr} and {args.gt}")
    if not processes.is_main:  # every process has the gathered rows; the main one writes the reports
        return 1 if report.errors else 0
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(report))
    written = [write_csv(report, out / "metrics.csv"), write_json(report, out / "metrics.json"),
               write_html(report, out / "report.html", args.html_max_images, args.crop_size)]
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if report.errors else 0
