"""The ``stablesr`` command line: restore, convert, degrade, evaluate, fidelity-curve (and ui with the ui extra)."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "Iceclear/StableSR"
# The official release on the Hub is a pair of Lightning checkpoints, converted once and cached.
HUB_FILES = {"Iceclear/StableSR": ("stablesr_000117.ckpt", "vqgan_cfw_00011.ckpt")}
SCHEDULERS = ("ddpm", "ddim", "dpmsolver", "unipc", "euler")  # built by schedulers.scheduler_from_name
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

logger = logging.getLogger("stablesr")


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def _cache_dir() -> Path:
    base = os.environ.get("STABLESR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stablesr"
    )
    return Path(base)


def load_pipeline(model: str, cfw: str | None = None, device: str = "cpu", dtype: str = "fp32"):
    """A StableSRPipeline from a converted folder, an official .ckpt (+ CFW .ckpt), or a Hub id."""
    import torch

    from .conversion import convert_stablesr_checkpoint
    from .pipelines.pipeline_stablesr import StableSRPipeline

    torch_dtype = getattr(torch, DTYPES[dtype])
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CLIError(f"{path} is a folder but not a converted StableSR model (no model_index.json); "
                           "convert the official checkpoints with `stablesr convert`")
        pipe = StableSRPipeline.from_pretrained(path, dtype=torch_dtype)
    elif path.is_file():
        pipe, _ = convert_stablesr_checkpoint(path, cfw)
        pipe = pipe.to(dtype=torch_dtype)
    elif path.suffix in (".ckpt", ".safetensors", ".pt", ".pth") or model.startswith((".", "/")):
        raise CLIError(f"model {model} does not exist")
    else:
        pipe = _pipeline_from_hub(model, torch_dtype)
    return pipe.to(device)


def _pipeline_from_hub(repo_id: str, torch_dtype):
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .conversion import convert_stablesr_checkpoint, save_pipeline_atomically
    from .pipelines.pipeline_stablesr import StableSRPipeline

    cached = _cache_dir() / "converted" / repo_id.replace("/", "--")
    if (cached / "model_index.json").is_file():
        return StableSRPipeline.from_pretrained(cached, dtype=torch_dtype)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        if repo_id in HUB_FILES:
            ckpt_name, cfw_name = HUB_FILES[repo_id]
            logger.info(f"downloading the official StableSR weights from {repo_id} (once; ~7.5 GB)")
            ckpt = hf_hub_download(repo_id, ckpt_name)
            cfw = hf_hub_download(repo_id, cfw_name)
            pipe, report = convert_stablesr_checkpoint(ckpt, cfw)
            save_pipeline_atomically(pipe, cached)
            logger.info(f"converted and cached in {cached}\n{report.summary()}")
            return StableSRPipeline.from_pretrained(cached, dtype=torch_dtype)
        files = list_repo_files(repo_id)
        if "model_index.json" not in files:
            raise CLIError(f"{repo_id} is not a converted StableSR model on the Hub (no model_index.json)")
        return StableSRPipeline.from_pretrained(repo_id, dtype=torch_dtype)
    except (LocalEntryNotFoundError, OSError) as err:
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise CLIError(
            f"cannot fetch {repo_id} from the Hugging Face Hub{hint}: {err}. Connect to the internet once, or pass "
            "--model with a converted folder or the official .ckpt files (`stablesr convert` makes the folder)"
        ) from None


def _make_scheduler(pipe, name: str):
    from .schedulers import scheduler_from_name

    pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)


def _output_path(outdir: Path, src: Path, suffix: str, tag: str = "") -> Path:
    return outdir / f"{src.stem}{tag}{suffix}"


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

    from .cascade import cascade_upscale
    from .image_io import ImageLoadError, iter_image_files, load_image, save_image

    try:
        files = iter_image_files(args.inputs, recursive=args.recursive)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    outdir = Path(args.output)
    suffix = "." + args.format.lstrip(".")
    sweep = [float(w) for w in args.fidelity_sweep.split(",")] if args.fidelity_sweep else []
    for w in sweep + [args.fidelity]:
        if not 0 <= w <= 1:
            raise CLIError(f"fidelity weights must be in [0, 1], got {w}")

    def targets(src: Path) -> list[Path]:
        paths = [_output_path(outdir, src, suffix)]
        paths += [_output_path(outdir, src, suffix, f"_w{w:.2f}") for w in sweep]
        if args.compare:
            paths.append(_output_path(outdir, src, suffix, "_compare"))
        return paths

    todo = [f for f in files if args.overwrite or not all(p.exists() for p in targets(f))]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"skipping {skipped} file(s) whose outputs exist (pass --overwrite to redo them)", file=sys.stderr)
    if not todo:
        print(f"nothing to do: {len(files)} done, 0 failed")
        return 0

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cpu" and args.dtype == "fp16":
        print("warning: fp16 on CPU is slow or unsupported; use --dtype bf16 or fp32", file=sys.stderr)
    pipe = load_pipeline(args.model, args.cfw, device, args.dtype)
    if device.startswith("cuda"):
        try:  # memory-efficient attention for the UNet and VAE when xformers is installed (extra: stablesr[xformers])
            import xformers  # noqa: F401

            pipe.enable_xformers_memory_efficient_attention()
        except ImportError:
            pass  # PyTorch SDPA (the default) is used
    if args.scheduler != "ddpm":
        _make_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)

    failures, done = [], 0
    bar = tqdm(todo, desc="restoring", unit="img", disable=args.quiet)
    for src in bar:
        bar.set_postfix_str(src.name)
        try:
            loaded = load_image(src, max_pixels=args.max_pixels)
            image = loaded.rgb.copy()
            if loaded.alpha is not None:
                image.putalpha(loaded.alpha)
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            out = cascade_upscale(
                pipe,
                image,
                upscale=args.upscale,
                max_pass_upscale=args.max_pass_upscale,
                num_inference_steps=args.steps,
                fidelity_weight=args.fidelity,
                color_fix=args.color_fix,
                tile_size=args.tile_size,
                tile_overlap=args.tile_overlap,
                vae_tile_size=args.vae_tile_size or None,
                start=args.start,
                generator=generator,
                output_type="latent" if sweep else "pil",
            )
            paths = targets(src)
            if sweep:
                latents, cond = out.latents[0], out.conditions[0]
                results = [pipe.decode_latents(latents, cond, w, args.color_fix, args.vae_tile_size or None)
                           for w in [args.fidelity] + sweep]
            else:
                results = [out.images[0]]
            meta = dict(icc_profile=loaded.icc_profile, exif=loaded.exif, overwrite=True)
            # paths has one more entry (the --compare image) than results when --compare is on
            for result, path in zip(results, paths, strict=False):
                alpha = result.getchannel("A") if result.mode == "RGBA" else None
                save_image(result.convert("RGB"), path, alpha=alpha if suffix in (".png", ".webp", ".tif", ".tiff")
                           else None, **meta)
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


def cmd_convert(args) -> int:
    import torch

    from .conversion import convert_stablesr_checkpoint

    text_encoder = None
    if args.text_encoder:
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(args.text_encoder, subfolder=args.text_encoder_subfolder)
    start = time.perf_counter()
    _, report = convert_stablesr_checkpoint(
        args.checkpoint,
        args.cfw,
        args.output,
        original_config=args.config,
        prediction_type=args.prediction_type,
        default_num_inference_steps=args.default_steps,
        text_encoder=text_encoder,
        dtype=getattr(torch, DTYPES[args.dtype]),
        overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_degrade(args) -> int:
    from .degradation import DegradationConfig, degrade_folder

    config = DegradationConfig.from_yaml(args.config) if args.config else DegradationConfig()
    pairs = degrade_folder(args.hq_dir, args.output, config, seed=args.seed, num_per_image=args.num_per_image,
                           crop=args.crop, overwrite=args.overwrite)
    print(f"wrote {len(pairs)} LQ/HQ pair(s) to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablesr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("restore", help="restore / super-resolve images", description="Restore and upscale images.")
    r.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    r.add_argument("-o", "--output", required=True, help="output folder")
    r.add_argument("--model", default=DEFAULT_MODEL,
                   help="converted folder, official .ckpt, or Hub id (default: the official release, converted and "
                        "cached on first use)")
    r.add_argument("--cfw", help="official vqgan_cfw .ckpt when --model is an official .ckpt")
    r.add_argument("--upscale", type=float, default=4.0, help="output size = round(upscale x input) (default 4)")
    r.add_argument("--fidelity", type=float, default=0.5, help="CFW weight w: 0 realism .. 1 fidelity (default 0.5)")
    r.add_argument("--fidelity-sweep", default="", help="comma-separated extra weights decoded from ONE sampling, "
                                                      "saved as NAME_w0.25.png ...")
    r.add_argument("--max-pass-upscale", type=float, default=4.0,
                   help="larger --upscale runs as chained passes of at most this factor (x8 = x4 then x2; StableSR "
                        "is trained for x4); 0 = always one pass (default 4)")
    r.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 200 official)")
    r.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm", help="ddpm = official respaced DDPM")
    r.add_argument("--color-fix", choices=("wavelet", "adain", "none"), default="wavelet")
    r.add_argument("--tile-size", type=int, default=None, help="aggregation tile in latent pixels (64 / 96)")
    r.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in latent pixels (default tile/2)")
    r.add_argument("--vae-tile-size", type=int, default=1024, help="tiled VAE tile in pixels (0 = never tile)")
    r.add_argument("--start", choices=("lq", "noise"), default="lq", help="initial latent (official canvas: lq)")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    r.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    r.add_argument("--format", default="png", choices=("png", "jpg", "webp", "tif"), help="output format")
    r.add_argument("--compare", action="store_true", help="also save LQ|SR side by side as NAME_compare")
    r.add_argument("--overwrite", action="store_true", help="redo files whose outputs exist")
    r.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    r.add_argument("--max-pixels", type=int, default=None, help="refuse larger inputs (decompression-bomb guard)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_restore)

    c = sub.add_parser("convert", help="convert official StableSR checkpoints to a diffusers folder")
    c.add_argument("checkpoint", help="stablesr_000117.ckpt / stablesr_768v_000139.ckpt / stablesr_turbo.ckpt")
    c.add_argument("--cfw", help="vqgan_cfw_00011.ckpt")
    c.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument("--config", help="official YAML (default: infer the architecture from tensor shapes)")
    c.add_argument("--prediction-type", choices=("eps", "v"), default=None, help="default: YAML or file name")
    c.add_argument("--default-steps", type=int, default=None, help="default steps stored (4 for turbo, else 200)")
    c.add_argument("--text-encoder", help="CLIP text encoder (folder or Hub id) when the checkpoint has none")
    c.add_argument("--text-encoder-subfolder", default="text_encoder")
    c.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("degrade", help="write synthetic LQ/HQ pairs (Real-ESRGAN degradations) for inspection")
    d.add_argument("hq_dir")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--config", help="degradation YAML (default: StableSR's; see configs/degradation/)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-per-image", type=int, default=1)
    d.add_argument("--crop", type=int, default=None)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_degrade)

    from .evaluate import add_evaluate_parser
    from .fidelity_curve import add_fidelity_curve_parser

    add_evaluate_parser(sub)
    add_fidelity_curve_parser(sub)

    from .webui import add_ui_parser

    add_ui_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Re-import so that `python -m stablesr.cli` uses the same module (and CLIError class) as the submodules.
    from stablesr.cli import main as _main

    sys.exit(_main())
