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
    r.add_argument("--tile-overlap", type=int, default=None,
                   help="tile overlap in latent pixels (default tile/2; tile/4 on CPU, ~half the tiles)")
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


def _default_tile_overlap(pipe, args) -> int | None:
    """``--tile-overlap``, or on a CPU a quarter of the tile (the pipeline's default is half): at 2048^2 that is 25
    tiles per step instead of 49, for the CPU's hours-long UNet time; the Gaussian blending still spans 128 px."""
    if args.tile_overlap is not None or pipe._execution_device.type != "cpu":
        return args.tile_overlap
    return (args.tile_size or pipe.default_tile_size) // 4


def _start_estimate(pipe, sources, args, tile_overlap, vae_tile_size, fidelity):
    """Time the first steps and print ``estimated ~N min ...`` once when the whole run will take over a minute."""
    from PIL import Image
    from tqdm.auto import tqdm

    from ..acceleration import RestoreEstimator, restore_work

    works = []
    for src in sources:
        try:
            with Image.open(src) as im:  # the header only
                width, height = im.size
            works.append(restore_work(pipe, height, width, args.upscale, args.steps, args.tile_size, tile_overlap,
                                      vae_tile_size=vae_tile_size, fidelity_weight=fidelity,
                                      max_pass_upscale=args.max_pass_upscale or None))
        except Exception:  # unreadable or refused inputs fail later with their own message; no estimate for them
            continue
    return RestoreEstimator(pipe, works, lambda seconds, text: tqdm.write(text, file=sys.stderr)).start()


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
    from ..distributed import FileOutcome, count_outcomes, file_seed, launched_processes, process_device
    from ..file_utils import DiskFullError, remove_stale_temporaries
    from ..image_io import ImageLoadError, iter_image_files, load_image, save_image

    # Under `accelerate launch` every process plans the same list and restores its own share of it (one device per
    # process); notes and the summary are printed once, by the main process.
    processes = launched_processes(args.device)
    main = processes.is_main
    skipped_inputs: list[tuple[Path, str]] = []
    try:
        files = iter_image_files(args.inputs, recursive=args.recursive, skipped=skipped_inputs)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    if skipped_inputs and main:
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
    if renamed and main:
        print(f"{len(renamed)} input(s) share an output name with another input; they are written as:",
              file=sys.stderr)
        for src in renamed:
            print(f"  {src} -> {names[src]}{suffix}", file=sys.stderr)

    def targets(src: Path) -> list[Path]:
        return [outdir / f"{names[src]}{tag}{suffix}" for tag in tags]

    def is_done(src: Path) -> bool:
        return not args.overwrite and all(p.exists() for p in targets(src))

    # The share depends only on the planned list, never on which outputs exist, so processes that look at the output
    # folder at different moments (or a rerun) agree on who owns which file; each process skips its own done files.
    done_before = {i for i in processes.share(len(files)) if is_done(files[i])}
    outcomes = [FileOutcome(i, "skipped") for i in sorted(done_before)]
    todo = [i for i in processes.share(len(files)) if i not in done_before]
    if main:
        skipped = sum(is_done(f) for f in files)
        if skipped:
            print(f"skipping {skipped} file(s) whose outputs exist (pass --overwrite to redo them)", file=sys.stderr)

    args.device, device_warning = process_device(args.device, processes)
    if device_warning and main:
        print(f"warning: {device_warning}", file=sys.stderr)
    pipe = None
    with processes.local_main_first():  # one process per machine converts and caches a model first
        if todo:
            pipe = pipeline_from_args(args)
    if pipe is not None:
        if pipe.cfw_adapter is None:  # the stock decoder: the fidelity weight cannot change anything
            if sweep:
                raise CLIError(
                    f"--fidelity-sweep needs a model with CFW, but {args.model} has none, so every output would be "
                    "the same image. With an official .ckpt pass --cfw vqgan_cfw_00011.ckpt, or drop --fidelity-sweep"
                )
            if args.fidelity is not None and main:
                print(f"warning: {args.model} has no CFW, so --fidelity has no effect (pass --cfw with the official "
                      "vqgan_cfw .ckpt to get the fidelity control)", file=sys.stderr)
        pipe.set_progress_bar_config(leave=False, disable=args.quiet or not processes.is_local_main)
    vae_tile_size = args.vae_tile_size or None
    tile_overlap = args.tile_overlap
    estimator = None
    if pipe is not None:
        tile_overlap = _default_tile_overlap(pipe, args)
        if main and not args.quiet:
            estimator = _start_estimate(pipe, [files[i] for i in todo], args, tile_overlap, vae_tile_size, fidelity)

    stopped = None
    bar = tqdm(todo, desc="restoring", unit="img", disable=args.quiet or not processes.is_local_main)
    for i in bar:
        src = files[i]
        if stopped is not None:  # a full disk stopped this process's share
            outcomes.append(FileOutcome(i, "not_attempted"))
            continue
        bar.set_postfix_str(src.name)
        try:
            loaded = load_image(src, max_pixels=args.max_pixels)  # RGB + alpha, split once
            # Seeded per file (from --seed and the file name), never per process or batch position: a file restores
            # the same alone, in any batch and on any number of processes.
            generator = torch.Generator(device="cpu").manual_seed(file_seed(args.seed, src.name))
            out = cascade_upscale(
                pipe,
                loaded,
                upscale=args.upscale,
                max_pass_upscale=args.max_pass_upscale,
                num_inference_steps=args.steps,
                fidelity_weight=fidelity,
                color_fix=args.color_fix,
                tile_size=args.tile_size,
                tile_overlap=tile_overlap,
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
            outcomes.append(FileOutcome(i, "done"))
        except DiskFullError as err:  # every further file would fail the same way: stop the share cleanly
            stopped = err
            outcomes.append(FileOutcome(i, "stopped", str(err)))
        except (ImageLoadError, ValueError, OSError, RuntimeError) as err:
            outcomes.append(FileOutcome(i, "failed", str(err)))
            tqdm.write(f"error: {src}: {err}", file=sys.stderr)
    bar.close()
    if estimator is not None:
        estimator.stop()

    outcomes = sorted(processes.gather(outcomes), key=lambda o: o.index)  # every process's, on every process
    counts = count_outcomes(outcomes)
    if main:
        _print_summary(outcomes, counts, files, outdir, processes.count)
    return 1 if counts["failed"] or counts["stopped"] else 0


def _print_summary(outcomes, counts, files: list[Path], outdir: Path, num_processes: int) -> None:
    """The one summary of a batch (printed by the main process, over the outcomes of every process)."""
    if not counts["done"] and not counts["failed"] and not counts["stopped"] and not counts["not_attempted"]:
        print(f"nothing to do: {len(files)} done, 0 failed")
        return
    stopped = [o for o in outcomes if o.status == "stopped"]
    by = f" by {num_processes} processes" if num_processes > 1 else ""
    print(f"{counts['done']} restored{by}, {counts['skipped']} skipped, {counts['failed']} failed"
          + (f", {len(stopped)} stopped by a full disk, {counts['not_attempted']} not attempted" if stopped else "")
          + f"; outputs in {outdir}")
    for o in outcomes:
        if o.status == "failed":
            print(f"  failed: {files[o.index]}: {o.message}", file=sys.stderr)
    for o in stopped:
        print(f"error: stopped: {o.message}. {counts['not_attempted']} file(s) not attempted; rerun the same command "
              "after freeing space (finished files are skipped)", file=sys.stderr)
