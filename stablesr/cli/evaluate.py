"""``stablesr evaluate``: score restored images against ground truth and write the reports.

    stablesr evaluate --sr OUT_DIR --gt HR_DIR [--lq LR_DIR] [--crop-border 4] [--metrics psnr,ssim,lpips]
                      [--out REPORT_DIR]

Scoring is [`stablesr.evaluate.evaluate_folders`]; the table, ``metrics.csv``, ``metrics.json`` and the
self-contained ``report.html`` come from [`stablesr.reports`]. Exit code 0, 1 when a pair failed (size mismatch,
unreadable file), 2 for a usage error.
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
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from ..evaluate import evaluate_folders
    from ..metrics import MetricUnavailableError
    from ..reports import format_table, missing_lines, write_csv, write_html, write_json

    strip = [s for s in (args.strip or "").split(",") if s]
    try:
        report = evaluate_folders(args.sr, args.gt, args.lq, args.metrics, args.crop_border, args.protocol, strip,
                                  args.device, args.metric_backend, progress=not args.quiet)
    except MetricUnavailableError as err:
        raise CLIError(str(err)) from None
    if not report.rows and not report.errors:
        print("\n".join(missing_lines(report)), file=sys.stderr)
        raise CLIError(f"no SR/GT pairs with the same name in {args.sr} and {args.gt}")
    sr_dir = Path(args.sr).resolve()
    out = Path(args.out) if args.out else sr_dir.parent / (sr_dir.name + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(report))
    written = [write_csv(report, out / "metrics.csv"), write_json(report, out / "metrics.json"),
               write_html(report, out / "report.html", args.html_max_images, args.crop_size)]
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if report.errors else 0
