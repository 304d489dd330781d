"""``stablesr restore``: restore and upscale image files, folders and glob patterns."""

from __future__ import annotations

import sys
from pathlib import Path

from ..color import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX
from .common import CLIError, add_model_arguments, parse_weights, pipeline_from_args

OUTPUT_FORMATS = ("png", "jpg", "webp", "tif")
_ALPHA_SUFFIXES = (".png", ".webp", ".tif", ".tiff")


def add_restore_parser(subparsers) -> None:
    r = subparsers.add_parser("restore", help="restore / super-resolve images", description="Restore and upscale images.")
    r.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    r.add_argument("-o", "--output", required=True, help="output folder")
    add_model_arguments(r, scheduler=True)
    r.add_argument("--upscale", type=float, default=4.0, help="output size = round(upscale x input) (default 4)")
    r.add_argument("--fidelity", type=float, default=0.5, help="CFW weight w: 0 realism .. 1 fidelity (default 0.5)")
    r.add_argument("--fidelity-sweep", default="", help="comma-separated extra weights decoded from ONE sampling, "
                                                      "saved as NAME_w0.25.png ...")
    r.add_argument("--max-pass-upscale", type=float, default=4.0,
                   help="larger --upscale runs as chained passes of at most this factor (x8 = x4 then x2; StableSR "
                        "is trained for x4); 0 = always one pass (default 4)")
    r.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 200 official)")
    r.add_argument("--color-fix", choices=COLOR_FIX_METHODS, default=DEFAULT_COLOR_FIX)
    r.add_argument("--tile-size", type=int, default=None, help="aggregation tile in latent pixels (64 / 96)")
    r.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in latent pixels (default tile/2)")
    r.add_argument("--vae-tile-size", type=int, default=1024, help="tiled VAE tile in pixels (0 = never tile)")
    r.add_argument("--start", choices=("lq", "noise"), default="lq", help="initial latent (official canvas: lq)")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--format", default="png", choices=OUTPUT_FORMATS, help="output format")
    r.add_argument("--compare", action="store_true", help="also save LQ|SR side by side as NAME_compare")
    r.add_argument("--overwrite", action="store_true", help="redo files whose outputs exist")
    r.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    r.add_argument("--max-pixels", type=int, default=None, help="refuse larger inputs (decompression-bomb guard)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_restore)


def _side_by_side(lq, sr):
    from PIL import Image

    lq_up = lq.convert("RGB").resize(sr.size, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (sr.width * 2, sr.height))
    canvas.paste(lq_up, (0, 0))
    canvas.paste(sr.convert("RGB"), (sr.width, 0))
    return canvas


def cmd_restore(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..cascade import cascade_upscale
    from ..image_io import ImageLoadError, iter_image_files, load_image, save_image

    try:
        files = iter_image_files(args.inputs, recursive=args.recursive)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    outdir = Path(args.output)
    suffix = "." + args.format.lstrip(".")
    sweep = parse_weights(args.fidelity_sweep, "--fidelity-sweep") if args.fidelity_sweep else []
    parse_weights(str(args.fidelity), "--fidelity")
    keeps_alpha = suffix in _ALPHA_SUFFIXES

    def targets(src: Path) -> list[Path]:
        paths = [outdir / f"{src.stem}{suffix}"]
        paths += [outdir / f"{src.stem}_w{w:.2f}{suffix}" for w in sweep]
        if args.compare:
            paths.append(outdir / f"{src.stem}_compare{suffix}")
        return paths

    todo = [f for f in files if args.overwrite or not all(p.exists() for p in targets(f))]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"skipping {skipped} file(s) whose outputs exist (pass --overwrite to redo them)", file=sys.stderr)
    if not todo:
        print(f"nothing to do: {len(files)} done, 0 failed")
        return 0

    pipe = pipeline_from_args(args)
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)
    vae_tile_size = args.vae_tile_size or None

    failures, done = [], 0
    bar = tqdm(todo, desc="restoring", unit="img", disable=args.quiet)
    for src in bar:
        bar.set_postfix_str(src.name)
        try:
            loaded = load_image(src, max_pixels=args.max_pixels)  # RGB + alpha, split once
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            out = cascade_upscale(
                pipe,
                loaded,
                upscale=args.upscale,
                max_pass_upscale=args.max_pass_upscale,
                num_inference_steps=args.steps,
                fidelity_weight=args.fidelity,
                color_fix=args.color_fix,
                tile_size=args.tile_size,
                tile_overlap=args.tile_overlap,
                vae_tile_size=vae_tile_size,
                start=args.start,
                generator=generator,
                output_type="latent" if sweep else "pil",
            )
            paths = targets(src)
            if sweep:
                latents, cond = out.latents[0], out.conditions[0]
                results = [pipe.decode_latents(latents, cond, w, args.color_fix, vae_tile_size)
                           for w in [args.fidelity] + sweep]
            else:
                results = [out.images[0]]
            # Results carry the input's alpha (attached once, by the pipeline); formats without alpha drop it.
            for result, path in zip(results, paths, strict=False):  # paths has one more (--compare) entry
                save_image(result if keeps_alpha else result.convert("RGB"), path, icc_profile=loaded.icc_profile,
                           exif=loaded.exif, overwrite=True)
            if args.compare:
                save_image(_side_by_side(loaded.rgb, results[0]), paths[-1], overwrite=True)
            done += 1
        except (ImageLoadError, ValueError, OSError, RuntimeError) as err:
            failures.append((src, err))
            tqdm.write(f"error: {src}: {err}", file=sys.stderr)
    print(f"{done} restored, {skipped} skipped, {len(failures)} failed; outputs in {outdir}")
    for src, err in failures:
        print(f"  failed: {src}: {err}", file=sys.stderr)
    return 1 if failures else 0
