#!/usr/bin/env python
"""Generate StableSR stage-2 (CFW) training data with a stage-1 StableSRPipeline (thin CLI over stablesr.cfw_data).

Official recipe (IceClear/StableSR ``scripts/generate_vqgan_data.py``): 512 crops of DIV8K + DF2K_OST + FFHQ, degraded
on the fly with the stage-1 degradations, 200 respaced DDPM steps from ``x_T = q_sample(z_LQ, 999)``, seed 10000.

    # clean HQ images, degraded on the fly (official):
    python scripts/generate_cfw_data.py --pretrained_model_name_or_path stablesr-sd21 \\
        --hq_dir DF2K_OST/HR --num_per_image 10 --output_dir cfw_data
    # or paired data, matched by file stem:
    python scripts/generate_cfw_data.py --pretrained_model_name_or_path stablesr-sd21 \\
        --hq_dir pairs/hq --lq_dir pairs/lq --output_dir cfw_data
    # one shard per GPU (sample i goes to process i % N); re-run the same command to resume:
    accelerate launch --num_processes 8 scripts/generate_cfw_data.py ...
    # or shard by hand across machines:
    python scripts/generate_cfw_data.py ... --num_shards 4 --shard_index 0
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from stablesr.cfw_data import generate_cfw_data, list_sources
from stablesr.degradation import DegradationConfig
from stablesr.loading import LONG_DTYPE_NAMES, resolve_device, torch_dtype
from stablesr.schedulers import DETERMINISTIC_SCHEDULERS, deterministic_scheduler

logger = logging.getLogger("generate_cfw_data")



def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Stage-1 StableSRPipeline folder.")
    parser.add_argument("--hq_dir", required=True, help="Folder of ground-truth (clean) images.")
    parser.add_argument(
        "--lq_dir",
        default=None,
        help="Folder of LQ images matched to --hq_dir by file stem; omit to degrade on the fly.",
    )
    parser.add_argument("--output_dir", required=True, help="Dataset root (inputs/ gts/ latents/ samples/).")
    parser.add_argument(
        "--degradation_config",
        default=None,
        help="Degradation table YAML (e.g. configs/degradation/stablesr.yaml); default: DegradationConfig(), the same.",
    )
    parser.add_argument("--gt_size", type=int, default=512, help="GT crop side (official 512); 0 = whole images.")
    parser.add_argument(
        "--num_per_image", type=int, default=1, help="Degraded versions per HQ image (on-the-fly mode)."
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Only the first N sample indices.")
    parser.add_argument("--num_inference_steps", type=int, default=200, help="Sampling steps (official 200).")
    parser.add_argument("--start", choices=("lq", "noise"), default="lq", help="x_T from the LQ latent (official).")
    parser.add_argument("--scheduler", choices=("model",) + DETERMINISTIC_SCHEDULERS, default="model",
                        help="model = the model's own (official DDPM); a deterministic one (trailing spacing, from "
                             "t=999) makes teacher results for train/train_distill.py --teacher_data.")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="Samples sampled at once (needs a deterministic --scheduler); same results up to rounding.")
    parser.add_argument("--seed", type=int, default=10000, help="Base seed (official README: 10000).")
    parser.add_argument("--num_shards", type=int, default=None, help="Default: accelerate's number of processes.")
    parser.add_argument("--shard_index", type=int, default=None, help="Default: accelerate's process index.")
    parser.add_argument("--skip_samples", action="store_true", help="Do not write samples/ (decoded check images).")
    parser.add_argument("--device", default=None, help="Default: accelerate's device for this process.")
    parser.add_argument("--dtype", choices=LONG_DTYPE_NAMES, default="float32", help="Pipeline weights dtype.")
    args = parser.parse_args(input_args)

    if (args.num_shards is None) != (args.shard_index is None):
        parser.error("give both --num_shards and --shard_index, or neither (then accelerate's processes shard)")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in [0, {args.num_shards - 1}], got {args.shard_index}")
    if args.gt_size < 0:
        parser.error(f"--gt_size must be >= 0, got {args.gt_size}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.batch_size > 1 and args.scheduler == "model":
        parser.error("--batch_size above 1 needs a deterministic sampler: add --scheduler dpmsolver (or ddim, unipc); "
                     "the model's own DDPM draws noise at every step per sample")
    if args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if args.lq_dir is not None and args.degradation_config is not None:
        parser.error("--degradation_config only applies without --lq_dir (on-the-fly degradation)")
    return args


def main(args: argparse.Namespace):
    from stablesr import StableSRPipeline

    if args.num_shards is None:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU itself (set by `accelerate launch --cpu`).
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or args.device == "cpu")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and state.num_processes == 1:
            raise RuntimeError(
                f"launched as {world_size} processes but accelerate sees each as a single process, so every one would "
                "make every sample. Without GPUs set ACCELERATE_USE_CPU=1, or shard with --num_shards/--shard_index"
            )
        num_shards, shard_index, device = state.num_processes, state.process_index, args.device or state.device
    else:
        state = None
        num_shards, shard_index = args.num_shards, args.shard_index
        device = resolve_device(args.device or "auto")

    sources = list_sources(args.hq_dir, args.lq_dir, args.num_per_image)
    degradation_config = DegradationConfig.from_yaml(args.degradation_config) if args.degradation_config else None
    pipeline = StableSRPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=torch_dtype(args.dtype))
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler != "model":
        pipeline.scheduler = deterministic_scheduler(args.scheduler, pipeline.scheduler.config)
    logger.info(f"shard {shard_index}/{num_shards} on {device}: {len(sources)} samples in total")

    report = generate_cfw_data(
        pipeline,
        args.output_dir,
        sources,
        degradation_config=degradation_config,
        gt_size=args.gt_size or None,
        num_inference_steps=args.num_inference_steps,
        start=args.start,
        seed=args.seed,
        num_shards=num_shards,
        shard_index=shard_index,
        save_samples=not args.skip_samples,
        max_samples=args.max_samples,
        sampler=None if args.scheduler == "model" else args.scheduler,
        batch_size=args.batch_size,
    )
    logger.info(
        f"shard {shard_index}/{num_shards}: {len(report.generated)} generated, {len(report.skipped)} already done, "
        f"{len(report.failed)} failed (non-finite latents)"
    )
    if state is not None:
        state.wait_for_everyone()
    return report


if __name__ == "__main__":
    from stablesr.file_utils import DiskFullError

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        report = main(parse_args())
    except DiskFullError as err:  # every further sample would fail the same way
        logger.error(f"stopped: {err}. Rerun the same command after freeing space (finished samples are skipped)")
        sys.exit(1)
    sys.exit(0)
