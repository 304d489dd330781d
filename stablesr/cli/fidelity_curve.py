"""``stablesr fidelity-curve``: sample each input once, decode it at several CFW weights, and measure each decode.

The work is [`stablesr.fidelity_curve.fidelity_curve`]; this module turns options into that call and writes
``fidelity_curve.csv``, ``fidelity_curve.json``, ``fidelity_curve.png`` (and ``images/NAME_w0.25.png`` with
``--save-images``) into the output folder. ``--baseline realesrgan --baseline-weights RealESRGAN_x4plus.pth`` adds
Real-ESRGAN on the same inputs as a table row and a reference line in the plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..color import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX
from ..fidelity_curve import DEFAULT_METRICS, DEFAULT_WEIGHTS
from .common import CLIError, add_model_arguments, parse_weights, pipeline_from_args
from .evaluate import add_baseline_arguments, baseline_from_args


def add_fidelity_curve_parser(subparsers) -> None:
    """Register ``stablesr fidelity-curve`` on an ``argparse`` sub-parser collection."""
    f = subparsers.add_parser(
        "fidelity-curve", help="measure the CFW weight trade-off: sample once, decode at several w",
        description="Sample each input once, decode it at every fidelity weight, and report PSNR/SSIM/LPIPS against "
                    "ground truth (--gt) and consistency with the input, as a table and a plot.")
    f.add_argument("inputs", nargs="+", help="LQ image files, folders or glob patterns")
    f.add_argument("--gt", help="folder of ground-truth images with the same names (stems)")
    f.add_argument("-o", "--output", required=True, help="output folder (plot, CSV, JSON, optional images)")
    add_model_arguments(f, scheduler=True)
    f.add_argument("--weights", default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
                   help="comma-separated CFW weights (default 0,0.25,0.5,0.75,1)")
    f.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    f.add_argument("--upscale", type=float, default=None, help="default: GT size / input size, else 4")
    f.add_argument("--color-fix", choices=COLOR_FIX_METHODS, default=DEFAULT_COLOR_FIX)
    f.add_argument("--tile-size", type=int, default=None, help="aggregation tile in latent pixels")
    f.add_argument("--tile-overlap", type=int, default=None)
    f.add_argument("--vae-tile-size", type=int, default=1024, help="tiled VAE tile in pixels (0 = never tile)")
    f.add_argument("--start", choices=("lq", "noise"), default="lq")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help="per-image metrics (default psnr,ssim,lpips,consistency; lpips is skipped with a note when "
                        "torchmetrics/pyiqa cannot load it)")
    f.add_argument("--crop-border", type=int, default=4)
    f.add_argument("--metric-backend", choices=("auto", "torchmetrics", "pyiqa"), default="auto")
    f.add_argument("--save-images", action="store_true", help="also save every decode as images/NAME_w0.25.png")
    add_baseline_arguments(f)
    f.add_argument("--recursive", action="store_true")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_fidelity_curve)


def _ground_truth(gt: str, files: list[Path], report: bool = True) -> list[Path | None]:
    """The file of ``gt`` with each input's stem, or None (listed on stderr when ``report``)."""
    from ..image_io import iter_image_files

    gt_dir = Path(gt)
    if not gt_dir.is_dir():
        raise CLIError(f"--gt folder '{gt_dir}' does not exist")
    index = {p.stem: p for p in iter_image_files(gt_dir)}
    gt_files = [index.get(f.stem) for f in files]
    missing = [f.name for f, g in zip(files, gt_files, strict=True) if g is None]
    if missing and report:
        print(f"no ground truth for {len(missing)} input(s): {', '.join(missing[:10])}", file=sys.stderr)
    return gt_files


def cmd_fidelity_curve(args) -> int:
    from .. import metrics as M
    from ..distributed import file_seed, launched_processes, process_device
    from ..fidelity_curve import fidelity_curve
    from ..image_io import ImageLoadError, iter_image_files, save_image

    # Under `accelerate launch` each process samples its share of the inputs; the main process writes the report.
    processes = launched_processes(args.device)
    weights = parse_weights(args.weights, "--weights")
    if not weights:
        raise CLIError(f"fidelity weights must be in [0, 1], got {args.weights}")
    try:
        files = iter_image_files(args.inputs, recursive=args.recursive)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    gt_files = _ground_truth(args.gt, files, report=processes.is_main) if args.gt else None
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metric_names if m not in M.METRICS]
    if unknown:
        raise CLIError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(M.METRICS)}")

    device, device_warning = process_device(args.device, processes)
    if device_warning and processes.is_main:
        print(f"warning: {device_warning}", file=sys.stderr)
    args.device = device
    baseline = baseline_from_args(args, device)
    with processes.local_main_first():  # one process per machine converts and caches a model first
        pipe = pipeline_from_args(args)
    if pipe.cfw_adapter is None:
        raise CLIError(
            f"{args.model} has no CFW, so every fidelity weight decodes to the same image and the curve is flat. "
            "With an official .ckpt pass --cfw vqgan_cfw_00011.ckpt"
        )
    pipe.set_progress_bar_config(leave=False, disable=args.quiet or not processes.is_local_main)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = out / "images"

    def save(name, w, img):
        if args.save_images:
            save_image(img, image_dir / f"{name}_w{w:.2f}.png", overwrite=True)  # keeps an alpha channel

    try:
        curve = fidelity_curve(
            pipe, files, gt_files, weights, names=[f.stem for f in files], metrics=metric_names,
            crop_border=args.crop_border, upscale=args.upscale, color_fix=args.color_fix,
            vae_tile_size=args.vae_tile_size or None, metric_backend=args.metric_backend,
            metric_device=device if device != "mps" else "cpu", on_image=save, num_inference_steps=args.steps,
            tile_size=args.tile_size, tile_overlap=args.tile_overlap, start=args.start, baseline=baseline,
            seeds=[file_seed(args.seed, f.name) for f in files], processes=processes,
        )
    except (ImageLoadError, ValueError) as err:
        raise CLIError(str(err)) from None
    if not processes.is_main:  # every process has the whole table; the main one reports it
        return 0
    paths = [curve.write_csv(out / "fidelity_curve.csv"), curve.write_json(out / "fidelity_curve.json"),
             curve.plot(out / "fidelity_curve.png")]
    cols = [c for c in curve.metrics if c != "consistency_mse"]
    print("w      " + "  ".join(f"{c:>12s}" for c in cols))
    for r in curve.mean_rows():
        print(f"{r['weight']:<6g} " + "  ".join(f"{'-' if r[c] is None else f'{r[c]:.4f}':>12s}" for c in cols))
    reference = curve.baseline_mean()
    if reference is not None:
        print(f"{curve.baseline['label']}: " + "  ".join(
            f"{c} {'-' if reference[c] is None else f'{reference[c]:.4f}'}" for c in cols))
    for c in cols:
        best = curve.best_weight(c)
        if best is not None:
            print(f"best w for {c}: {best:g}")
    for note in curve.notes:
        print(f"note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths) + (f" and {image_dir}/" if args.save_images else ""))
    return 0
