"""Peak memory (RSS) of 4x restores at growing sizes: is it bounded by the image buffers (a flat curve per pixel)?

Uses the official tiny test model (``stablesr-tiny`` fixture: same topology as StableSR, tiny widths), converted once
with ``convert_stablesr_checkpoint`` into a temporary folder. Each restore runs in a FRESH child process (this script
with ``--child``) so that every peak is its own: 4x upscales of 256^2, 512^2 and 1024^2 inputs (1024^2, 2048^2,
4096^2 outputs) with CFW on (``fidelity_weight=0.5``), the wavelet color fix, the default aggregation tile (the UNet
sample size: 64 latent = 512 px, overlap 32) and ``vae_tile_size`` 1024 (default) and 512.

The child reads ``VmRSS`` after loading the pipeline (the baseline) and ``VmHWM`` (peak RSS) at the end. It also
resets the peak (``/proc/self/clear_refs`` = 5) at the entry of the three phases of ``__call__`` (LQ encode, denoise,
decode) by wrapping the pipeline's own methods on the instance, so each phase reports the transient memory it adds
above the RSS at its entry.

Printed table, one row per restore:

* ``out``: output size; ``vae``: vae_tile_size; ``wall s`` / ``cpu s``: wall and process CPU seconds of ``pipe(...)``;
* ``peak``: VmHWM of the child (MB); ``base``: RSS after loading the model (MB); ``peak-base``;
* ``img-est``: the image buffers' size estimate, ``IMAGE_BYTES_PER_PIXEL`` x output pixels (see below);
  ``excess`` = peak - base - img-est;
* ``B/px``: (peak - base) / output pixels;
* ``enc MB``/``den MB``/``dec MB``: transient MB added above the phase's entry RSS by the encode, denoise and decode
  phases; ``dec-img`` = dec MB - img-est: flat (does not grow with the image) when the decode is bounded by its tiles
  plus the image buffers;
* ``cpu s enc/den/dec``: process CPU seconds of the three phases.

The peak is the larger of the denoise phase (constant: tile-sized activations) and the decode phase (tile-sized
activations + image buffers), plus the buffers held across phases (the upsampled LQ image, 12 B/px).

Run (the 4096^2 restore alone is ~12 minutes / 20 CPU-minutes on 2 idle cores, see scripts/README.md)::

    .venv/bin/python scripts/bench_memory.py [--steps 1] [--tile-overlap 0] [--sizes 256 512 1024]
        [--vae-tiles 1024 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import reset_peak, status_kb  # scripts/proc_memory.py (this folder)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO.parent / "shared" / "reference" / "stablesr-tiny"

# Output-sized buffers per output pixel, measured as the growth of peak - base from 2048^2 to 4096^2 outputs (tiny
# model, VAE tile 1024, after the wavelet color fix went to row strips): ~75 B/px. They are the upsampled LQ image held
# across the phases (12 B/px float32 RGB), the tiled decode's float32 accumulator, weight sum and normalised result
# (28 B/px), the color-fixed copy (12 B/px) and the float -> uint8 output conversion (~15 B/px).
IMAGE_BYTES_PER_PIXEL = 75


def child(args) -> None:
    import numpy as np
    import PIL.Image
    import torch

    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    torch.set_num_threads(args.threads)
    pipe = StableSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    # Smooth random content (a blurred noise field), so the tiny model sees an image-like input.
    small = rng.integers(0, 256, size=(args.size // 16, args.size // 16, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(small).resize((args.size, args.size), PIL.Image.Resampling.BICUBIC)
    base_kb = status_kb("VmRSS")

    phases: dict[str, float] = {}
    phase_cpu: dict[str, float] = {}
    peaks_before_reset: list[int] = []
    can_reset = reset_peak()

    def wrap(name):
        method = getattr(pipe, name)

        def wrapper(*a, **k):
            entry = status_kb("VmRSS")
            # Keep the process-wide peak: clear_refs lowers VmHWM, so remember the max seen before the reset.
            peaks_before_reset.append(status_kb("VmHWM"))
            reset_peak()
            cpu = time.process_time()
            out = method(*a, **k)
            phase_cpu[name] = time.process_time() - cpu
            phases[name] = (status_kb("VmHWM") - entry) / 1024
            peaks_before_reset.append(status_kb("VmHWM"))
            return out

        setattr(pipe, name, wrapper)

    if can_reset:
        for name in ("encode_condition", "denoise", "decode_latents"):
            wrap(name)
    start, cpu = time.perf_counter(), time.process_time()
    result = pipe(
        image,
        upscale=4,
        num_inference_steps=args.steps,
        fidelity_weight=0.5,
        color_fix="wavelet",
        vae_tile_size=args.vae_tile,
        tile_overlap=args.tile_overlap,
        generator=torch.Generator().manual_seed(0),
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = result.images[0]
    peak_kb = max([status_kb("VmHWM")] + peaks_before_reset)
    print(json.dumps({
        "input": args.size, "output": list(out.size), "vae_tile": args.vae_tile, "steps": args.steps,
        "seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak_kb / 1024, "base_mb": base_kb / 1024,
        "phases": phases, "phase_cpu": phase_cpu, "peak_reset": can_reset,
    }))


def convert(model_dir: Path, reference: Path) -> None:
    import torch

    from stablesr.conversion import convert_stablesr_checkpoint

    # The tiny checkpoint has no text encoder; any (1, 77, 64) context works as the stored prompt embedding.
    convert_stablesr_checkpoint(
        reference / "stablesr_tiny.ckpt",
        reference / "vqgan_cfw_tiny.ckpt",
        model_dir,
        original_config=reference / "config.yaml",
        prompt_embeds=torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(0)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help="converted pipeline folder (default: convert the fixture)")
    parser.add_argument("--reference", type=Path, default=Path(os.environ.get("STABLESR_REFERENCE_DIR",
                                                                              DEFAULT_REFERENCE)))
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vae-tile", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="input sides (4x upscaled)")
    parser.add_argument("--vae-tiles", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (memory does not depend on it)")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help="aggregation tile overlap in latent pixels (default: the pipeline's, half the tile)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "stablesr-tiny"
            convert(model, args.reference)
        print(f"model: {args.model or 'stablesr-tiny fixture, converted'}; 4x upscale, fidelity_weight 0.5, wavelet "
              f"color fix, {args.steps} step(s), aggregation tile 64 latent (512 px) overlap "
              f"{'32 (default)' if args.tile_overlap is None else args.tile_overlap}, threads "
              f"{args.threads}; image-buffer estimate = {IMAGE_BYTES_PER_PIXEL} B x output pixels",
              flush=True)
        header = (f"{'out':>11} {'vae':>5} {'wall s':>7} {'cpu s':>7} {'peak MB':>8} {'base MB':>8} {'peak-base':>9} "
                  f"{'img-est':>8} {'excess':>7} {'B/px':>6} {'enc MB':>7} {'den MB':>7} {'dec MB':>7} {'dec-img':>7} "
                  f"{'cpu s enc/den/dec':>19}")
        print(header)
        print("-" * len(header), flush=True)
        nan = float("nan")
        for vae_tile in args.vae_tiles:
            for size in args.sizes:
                cmd = [sys.executable, __file__, "--child", "--model", str(model), "--size", str(size),
                       "--vae-tile", str(vae_tile), "--steps", str(args.steps), "--threads", str(args.threads)]
                if args.tile_overlap is not None:
                    cmd += ["--tile-overlap", str(args.tile_overlap)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode or not lines:
                    print(f"child failed for input {size}, vae tile {vae_tile} (rc {proc.returncode}):\n"
                          f"{proc.stderr[-3000:]}", flush=True)
                    continue
                r = json.loads(lines[-1])
                w, h = r["output"]
                pixels = w * h
                est = IMAGE_BYTES_PER_PIXEL * pixels / 2**20
                grown = r["peak_mb"] - r["base_mb"]
                ph, pc = r["phases"], r["phase_cpu"]
                names = ("encode_condition", "denoise", "decode_latents")
                cpu_split = "/".join(f"{pc.get(n, nan):.0f}" for n in names)
                print(f"{f'{w}x{h}':>11} {vae_tile:>5} {r['seconds']:>7.1f} {r['cpu_seconds']:>7.1f} "
                      f"{r['peak_mb']:>8.0f} {r['base_mb']:>8.0f} {grown:>9.0f} {est:>8.0f} {grown - est:>7.0f} "
                      f"{grown * 2**20 / pixels:>6.1f} {ph.get(names[0], nan):>7.0f} {ph.get(names[1], nan):>7.0f} "
                      f"{ph.get(names[2], nan):>7.0f} {ph.get(names[2], nan) - est:>7.0f} {cpu_split:>19}", flush=True)
    print(f"total wall time {time.perf_counter() - wall:.0f}s")


if __name__ == "__main__":
    main()
