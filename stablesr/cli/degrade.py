"""``stablesr degrade``: synthetic LQ/HQ pairs (Real-ESRGAN second-order degradation) for inspection."""

from __future__ import annotations


def add_degrade_parser(subparsers) -> None:
    d = subparsers.add_parser("degrade", help="write synthetic LQ/HQ pairs (Real-ESRGAN degradations) for inspection")
    d.add_argument("hq_dir")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--config", help="degradation YAML (default: StableSR's; see configs/degradation/)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-per-image", type=int, default=1)
    d.add_argument("--crop", type=int, default=None)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_degrade)


def cmd_degrade(args) -> int:
    from ..degradation import DegradationConfig, degrade_folder

    config = DegradationConfig.from_yaml(args.config) if args.config else DegradationConfig()
    pairs = degrade_folder(args.hq_dir, args.output, config, seed=args.seed, num_per_image=args.num_per_image,
                           crop=args.crop, overwrite=args.overwrite)
    print(f"wrote {len(pairs)} LQ/HQ pair(s) to {args.output}")
    return 0
