"""Working canvas of thin inputs before and after the canvas bound (issue: thin inputs blew up the canvas).

For each case it prints the output size, the canvas of the old rule (short side scaled to the native size, long side
without limit) and of the bounded rule (`stablesr.image_processor.working_canvas`), their areas, the number of
aggregation tiles, and the measured seconds of a 1-step restore with the bounded canvas. The old canvas is not run
(at full size it takes about an hour): its time is estimated as the measured time scaled by the area ratio (every
stage, VAE, UNet tiles and color fix, grows with the area), and labelled so.

    .venv/bin/python scripts/bench_canvas.py --model path/to/converted   # default: the stablesr-tiny fixture

Without ``--model`` the stablesr-tiny fixture (``../shared/reference/stablesr-tiny``) is converted first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stablesr.image_processor import working_canvas
from stablesr.tiling import tile_grid

CASES = [((3, 200), 2.0), ((60, 4000), 4.0), ((96, 128), 4.0)]


def old_canvas(height: int, width: int, upscale: float, native: int, multiple: int) -> tuple[int, int]:
    out_h, out_w = max(1, round(height * upscale)), max(1, round(width * upscale))
    scale = max(1.0, native / min(out_h, out_w))
    work_h, work_w = round(out_h * scale), round(out_w * scale)
    return work_h + (-work_h) % multiple, work_w + (-work_w) % multiple


def load(model: str | None):
    from stablesr import StableSRPipeline

    if model:
        return StableSRPipeline.from_pretrained(model)
    from safetensors.torch import load_file

    from stablesr.conversion import convert_stablesr_checkpoint

    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "stablesr-tiny"
    cases = load_file(str(ref / "cases.safetensors"))
    pipe, _ = convert_stablesr_checkpoint(ref / "stablesr_tiny.ckpt", ref / "vqgan_cfw_tiny.ckpt",
                                          original_config=ref / "config.yaml", prompt_embeds=cases["c8.context"][:1])
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="converted folder (default: the stablesr-tiny fixture)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    native, multiple, factor = pipe.native_size, pipe.canvas_multiple, pipe.vae_scale_factor
    tile = pipe.default_tile_size
    print(f"native {native} px, canvas multiple {multiple}, aggregation tile {tile} latent px, 1 DDPM step")
    print(f"{'input':>10} {'x':>4} {'output':>11} | {'old canvas':>12} {'old MP':>7} {'tiles':>5} | "
          f"{'new canvas':>11} {'new MP':>7} {'tiles':>5} | {'area ratio':>10} {'new s':>7} {'old s (est.)':>12}",
          flush=True)
    for (h, w), up in CASES:
        new = working_canvas((h, w), up, native, multiple)
        oh, ow = old_canvas(h, w, up, native, multiple)
        old_tiles = len(tile_grid(oh // factor, ow // factor, tile, tile // 2))
        new_tiles = len(tile_grid(new.padded_size[0] // factor, new.padded_size[1] // factor, tile, tile // 2))
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory():
            out = pipe(image, upscale=up, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        assert out.images[0].size == (new.output_size[1], new.output_size[0])
        estimate = seconds * (oh * ow) / new.area
        print(f"{w:>5}x{h:<4} {up:>4g} {new.output_size[1]:>6}x{new.output_size[0]:<4} | {ow:>6}x{oh:<5} "
              f"{oh * ow / 1e6:>7.2f} {old_tiles:>5} | {new.padded_size[1]:>5}x{new.padded_size[0]:<5} "
              f"{new.area / 1e6:>7.2f} {new_tiles:>5} | {oh * ow / new.area:>10.1f} {seconds:>7.1f} "
              f"{estimate:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
