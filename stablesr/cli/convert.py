"""``stablesr convert``: official StableSR checkpoints -> a diffusers pipeline folder."""

from __future__ import annotations

import time

from ..loading import DTYPES


def add_convert_parser(subparsers) -> None:
    c = subparsers.add_parser("convert", help="convert official StableSR checkpoints to a diffusers folder")
    c.add_argument("checkpoint", help="stablesr_000117.ckpt / stablesr_768v_000139.ckpt / stablesr_turbo.ckpt")
    c.add_argument("--cfw", help="vqgan_cfw_00011.ckpt")
    c.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument("--config", help="official YAML (default: infer the architecture from tensor shapes)")
    c.add_argument("--prediction-type", choices=("eps", "v"), default=None,
                   help="default: the YAML, else the checkpoint's metadata, else a guess from the file name (warned)")
    c.add_argument("--default-steps", type=int, default=None, help="default steps stored (4 for turbo, else 200)")
    c.add_argument("--text-encoder", help="CLIP text encoder (folder or Hub id) when the checkpoint has none")
    c.add_argument("--text-encoder-subfolder", default="text_encoder")
    c.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from ..conversion import convert_stablesr_checkpoint
    from ..loading import torch_dtype

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
        dtype=torch_dtype(args.dtype),
        overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0
