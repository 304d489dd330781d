"""What the number of sampling steps costs: one whole 128x128 -> 512x512 (x4) restore per setting, full-size model.

Builds the full-size architecture with seeded random weights (SD 2.1-base ``UNet2DConditionModel`` as in
``bench_step.py``, the default ``TimeAwareEncoder``, ``SFTAdapter.from_unet``, the SD VAE (128, 256, 512, 512) with
``CFWAdapter.from_vae``), fp32 on the CPU, and runs ONE restore per setting, in this order:

* 1 step and 4 steps (the turbo model's default) with the official respaced DDPM scheduler;
* 50 DPM-Solver++ steps;
* 200 DDPM steps (the official default).

The x4 output of a 128-px input is 512 px = a 64x64 latent = ONE aggregation tile, so each step is one encoder + UNet
call. Every restore is the full ``pipe(image, upscale=4)`` call (VAE encode, sampling, CFW decode at w=0.5, wavelet
color fix); the encode and decode phases are timed by wrapping the pipeline's own ``encode_condition`` /
``decode_latents`` on the instance, each step by the pipeline's ``callback``.

Prints, per setting, wall and process-CPU seconds of the restore, of its encode / sampling / decode phases and of a
step (median), and the ratios to the 200-step restore. On a shared machine the wall times depend on the load; the CPU
times much less (the number to compare, as in ``bench_step.py``). Random weights cost the same time as
trained ones (same shapes, same kernels); only the output image is meaningless.

Time budget: a restore that is still sampling after ``--max-minutes`` (default 75) is stopped, and its row is then
**extrapolated** (labelled so): encode + median step x steps + the decode time measured in the other restores. Prefer
a real measurement (run it on an idle machine, or raise ``--max-minutes``).

Run (heavy: ~40 minutes on 2 idle cores, a full-size step is ~9 s; start it in the background)::

    nice -n 19 .venv/bin/python scripts/bench_steps.py > bench_steps.txt 2>&1 &
    .venv/bin/python scripts/bench_steps.py --runs 1:ddpm 4:ddpm       # only some settings
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_RUNS = ("1:ddpm", "4:ddpm", "50:dpmsolver", "200:ddpm")
REFERENCE_RUN = "200:ddpm"


def full_size_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0, cfw: bool = True):
    """The full-size StableSR architecture with seeded random weights (SD 2.1-base UNet, default time-aware encoder,
    SFT for every resnet, SD VAE + CFW adapter, official DDPM scheduler, a random (1, 77, 1024) prompt embedding)."""
    from bench_cfw_decode import VAE_CONFIG  # scripts/ (this folder)
    from bench_step import sd21_base_unet
    from diffusers import AutoencoderKL

    from stablesr.models.cfw import CFWAdapter
    from stablesr.models.prompt_embedding import PromptEmbedding
    from stablesr.models.sft import SFTAdapter
    from stablesr.models.time_aware_encoder import TimeAwareEncoder
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline
    from stablesr.schedulers import StableSRDDPMScheduler

    torch.manual_seed(seed)
    unet = sd21_base_unet()
    vae = AutoencoderKL(**VAE_CONFIG)
    pipe = StableSRPipeline(
        vae=vae,
        unet=unet,
        time_aware_encoder=TimeAwareEncoder(),
        sft_adapter=SFTAdapter.from_unet(unet),
        scheduler=StableSRDDPMScheduler(),
        cfw_adapter=CFWAdapter.from_vae(vae) if cfw else None,
        prompt_embedding=PromptEmbedding.from_tensor(torch.randn(1, 77, 1024)),
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def test_image(size: int, seed: int = 0):
    """A smooth random RGB image (a bicubic-enlarged noise field), so the input looks image-like."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(size // 8, 2), max(size // 8, 2), 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((size, size), PIL.Image.Resampling.BICUBIC)


class _OverBudget(Exception):
    pass


class _Clock:
    """Wall and process-CPU seconds since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed_restore(pipe, image, steps: int, scheduler: str, upscale: float, max_seconds: float, **kwargs) -> dict:
    """One ``pipe(image, ...)`` call timed by phase (wall and process CPU seconds); stops sampling when it has run
    ``max_seconds`` of wall time (then ``complete`` is False and there is no decode time)."""
    from stablesr.schedulers import scheduler_from_name

    pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    phases: dict[str, tuple[float, float]] = {}
    step_times: list[tuple[float, float]] = []
    last: list[_Clock] = []

    def wrap(name):
        method = getattr(pipe, name)

        def timed(*args, **kw):
            clock = _Clock()
            if name == "denoise":
                last[:] = [_Clock()]
            try:
                return method(*args, **kw)
            finally:
                phases[name] = clock.elapsed()

        return timed

    total = _Clock()

    def callback(i, t, latents):
        step_times.append(last[0].elapsed())
        last[:] = [_Clock()]
        if total.elapsed()[0] > max_seconds and i + 1 < steps:
            raise _OverBudget

    for name in ("encode_condition", "denoise", "decode_latents"):
        setattr(pipe, name, wrap(name))
    complete = True
    try:
        pipe(image, upscale=upscale, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             callback=callback, **kwargs)
    except _OverBudget:
        complete = False
    finally:
        for name in ("encode_condition", "denoise", "decode_latents"):
            del pipe.__dict__[name]
    wall, cpu = total.elapsed()
    return {
        "steps": steps,
        "scheduler": scheduler,
        "complete": complete,
        "wall": wall,
        "cpu": cpu,
        "encode": phases.get("encode_condition", (0.0, 0.0)),
        "decode": phases.get("decode_latents") if complete else None,
        "step_times": step_times,
    }


def _median(values):
    return statistics.median(values) if values else float("nan")


def summarise(results: list[dict]) -> None:
    """Print the table: per setting, wall (w) and process CPU (c) seconds; extrapolated rows are labelled."""
    decodes = [r["decode"] for r in results if r["decode"] is not None]
    decode_estimate = tuple(_median([d[k] for d in decodes]) for k in (0, 1))
    for row in results:
        row["median_step"] = tuple(_median([s[k] for s in row["step_times"]]) for k in (0, 1))
        if row["complete"]:
            row["total"] = (row["wall"], row["cpu"])
        else:
            row["total"] = tuple(row["encode"][k] + row["median_step"][k] * row["steps"] + decode_estimate[k]
                                 for k in (0, 1))
    reference = next((r for r in results if r["spec"] == REFERENCE_RUN), None)
    print("\n| setting | restore s (wall / cpu) | encode s | s/step, median | sampling s | decode s | "
          "vs 200 DDPM (wall / cpu) |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        label = f"{row['steps']} {row['scheduler']}"
        if row["complete"]:
            sampling = tuple(sum(s[k] for s in row["step_times"]) for k in (0, 1))
            decode = f"{row['decode'][0]:.0f} / {row['decode'][1]:.0f}"
        else:
            sampling = tuple(row["median_step"][k] * row["steps"] for k in (0, 1))
            decode = f"{decode_estimate[0]:.0f} / {decode_estimate[1]:.0f} (est.)"
        mark = "" if row["complete"] else f" (extrapolated from {len(row['step_times'])} steps)"
        ratio = (f"{row['total'][0] / reference['total'][0]:.4f} / {row['total'][1] / reference['total'][1]:.4f}"
                 if reference else "-")
        print(f"| {label} | {row['total'][0]:.0f} / {row['total'][1]:.0f}{mark} | {row['encode'][0]:.1f} / "
              f"{row['encode'][1]:.1f} | {row['median_step'][0]:.2f} / {row['median_step'][1]:.2f} | "
              f"{sampling[0]:.0f} / {sampling[1]:.0f} | {decode} | {ratio} |")
    if any(not r["complete"] for r in results):
        print("\nrows marked (extrapolated) were stopped by --max-minutes: encode + median step x steps + the median "
              "decode time of the complete runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                        help="STEPS:SCHEDULER settings, run in this order (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="input side in pixels (x4 output)")
    parser.add_argument("--upscale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=75.0,
                        help="stop a restore still sampling after this many minutes of wall time and extrapolate its "
                             "row from its median step")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = full_size_pipeline()
    image = test_image(args.size)
    canvas = pipe.working_canvas(args.size, args.size, args.upscale)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; full-size random weights; "
          f"{args.size}px -> {canvas.output_size[0]}px (latent {canvas.padded_size[0] // 8}, tile "
          f"{pipe.default_tile_size}); built in {time.perf_counter() - start:.0f}s; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    results = []
    for spec in args.runs:
        steps_text, _, scheduler = spec.partition(":")
        steps, scheduler = int(steps_text), scheduler or "ddpm"
        print(f"\n{steps} {scheduler} step(s): running (load average {os.getloadavg()[0]:.1f}) ...", flush=True)
        row = timed_restore(pipe, image, steps, scheduler, args.upscale, args.max_minutes * 60)
        row["spec"] = f"{steps}:{scheduler}"
        results.append(row)
        wall_step = _median([s[0] for s in row["step_times"]])
        cpu_step = _median([s[1] for s in row["step_times"]])
        state = "complete" if row["complete"] else f"STOPPED after {len(row['step_times'])} steps (over budget)"
        decode = f", decode {row['decode'][0]:.1f}/{row['decode'][1]:.1f}s" if row["decode"] is not None else ""
        print(f"  {state} (wall/cpu): restore {row['wall']:.1f}/{row['cpu']:.1f}s, encode {row['encode'][0]:.1f}/"
              f"{row['encode'][1]:.1f}s, median step {wall_step:.2f}/{cpu_step:.2f}s{decode}; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    summarise(results)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f}s, load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
