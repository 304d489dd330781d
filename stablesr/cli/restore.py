"""``stablesr restore``: restore and upscale image files, folders and glob patterns."""

from __future__ import annotations

import sys
from pathlib import Path

from ..color import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX
from .common import CLIError, add_model_arguments, parse_weights, pipeline_from_args

OUTPUT_FORMATS = ("png", "jpg", "webp", "tif")
DEFAULT_FIDELITY = 0.5
_ALPHA_SUFFIXES = (".png", ".webp", ".tif", ".tiff")


def add_restore_parser(subparsers) -> None:
    r = subparsers.add_parser("restore", help="restore / super-resolve images", description="Restore and upscale images.")
    r.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    r.add_argument("-o", "--output", required=True, help="output folder")
    add_model_arguments(r, scheduler=True)
    r.add_argument("--upscale", type=float, default=4.0, help="output size = round(upscale x input) (default 4)")
    r.add_argument("--fidelity", type=float, default=None,
                   help=f"CFW weight w: 0 realism .. 1 fidelity (default {DEFAULT_FIDELITY})")
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

    from ..batch import output_names
    from ..cascade import cascade_upscale
    from ..file_utils import DiskFullError, remove_stale_temporaries
    from ..image_io import ImageLoadError, iter_image_files, load_image, save_image

    skipped_inputs: list[tuple[Path, str]] = []
    try:
        files = iter_image_files(args.inputs, recursive=args.recursive, skipped=skipped_inputs)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    if skipped_inputs:
        print(f"not restoring {len(skipped_inputs)} entr{'y' if len(skipped_inputs) == 1 else 'ies'} of the input "
              "folder(s):", file=sys.stderr)
        for path, why in skipped_inputs:
            print(f"  {path}: {why}", file=sys.stderr)
    outdir = Path(args.output)
    suffix = "." + args.format.lstrip(".")
    fidelity = DEFAULT_FIDELITY if args.fidelity is None else args.fidelity
    sweep = parse_weights(args.fidelity_sweep, "--fidelity-sweep") if args.fidelity_sweep else []
    parse_weights(str(fidelity), "--fidelity")
    keeps_alpha = suffix in _ALPHA_SUFFIXES

    # Every input gets its own output names, decided before any work (two inputs never write one file).
    tags = ["", *(f"_w{w:.2f}" for w in sweep), *(["_compare"] if args.compare else [])]
    names = output_names(files, tags)
    renamed = [src for src in files if names[src] != src.stem]
    if renamed:
        print(f"{len(renamed)} input(s) share an output name with another input; they are written as:",
              file=sys.stderr)
        for src in renamed:
            print(f"  {src} -> {names[src]}{suffix}", file=sys.stderr)

    def targets(src: Path) -> list[Path]:
        return [outdir / f"{names[src]}{tag}{suffix}" for tag in tags]

    todo = [f for f in files if args.overwrite or not all(p.exists() for p in targets(f))]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"skipping {skipped} file(s) whose outputs exist (pass --overwrite to redo them)", file=sys.stderr)
    if not todo:
        print(f"nothing to do: {len(files)} done, 0 failed")
        return 0

    pipe = pipeline_from_args(args)
    if pipe.cfw_adapter is None:  # the stock decoder: the fidelity weight cannot change anything
        if sweep:
            raise CLIError(
                f"--fidelity-sweep needs a model with CFW, but {args.model} has none, so every output would be the "
                "same image. With an official .ckpt pass --cfw vqgan_cfw_00011.ckpt, or drop --fidelity-sweep"
            )
        if args.fidelity is not None:
            print(f"warning: {args.model} has no CFW, so --fidelity has no effect (pass --cfw with the official "
                  "vqgan_cfw .ckpt to get the fidelity control)", file=sys.stderr)
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)
    vae_tile_size = args.vae_tile_size or None

    failures, done, stopped = [], 0, None
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
                fidelity_weight=fidelity,
                color_fix=args.color_fix,
                tile_size=args.tile_size,
                tile_overlap=args.tile_overlap,
                vae_tile_size=vae_tile_size,
                start=args.start,
                generator=generator,
                output_type="latent" if sweep else "pil",
            )
            paths = targets(src)
            for path in paths:  # hidden temporaries of a run that was killed while writing these outputs
                remove_stale_temporaries(outdir, path.name)
            if sweep:
                latents, cond = out.latents[0], out.conditions[0]
                results = [pipe.decode_latents(latents, cond, w, args.color_fix, vae_tile_size)
                           for w in [fidelity] + sweep]
            else:
                results = [out.images[0]]
            # Results carry the input's alpha (attached once, by the pipeline); formats without alpha drop it.
            for result, path in zip(results, paths, strict=False):  # paths has one more (--compare) entry
                save_image(result if keeps_alpha else result.convert("RGB"), path, icc_profile=loaded.icc_profile,
                           exif=loaded.exif, overwrite=True)
            if args.compare:
                save_image(_side_by_side(loaded.rgb, results[0]), paths[-1], overwrite=True)
            done += 1
        except DiskFullError as err:  # every further file would fail the same way: stop the batch cleanly
            stopped = err
            break
        except (ImageLoadError, ValueError, OSError, RuntimeError) as err:
            failures.append((src, err))
            tqdm.write(f"error: {src}: {err}", file=sys.stderr)
    bar.close()
    not_attempted = len(todo) - done - len(failures) - (1 if stopped else 0)
    print(f"{done} restored, {skipped} skipped, {len(failures)} failed"
          + (f", 1 stopped by a full disk, {not_attempted} not attempted" if stopped else "")
          + f"; outputs in {outdir}")
    for src, err in failures:
        print(f"  failed: {src}: {err}", file=sys.stderr)
    if stopped:
        print(f"error: stopped: {stopped}. {not_attempted} file(s) not attempted; rerun the same command after "
              "freeing space (finished files are skipped)", file=sys.stderr)
    return 1 if failures or stopped else 0
