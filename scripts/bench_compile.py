"""What ``--compile`` (regional ``torch.compile``, ``stablesr.acceleration.compile_pipeline``) buys: compile time and
the time of one denoising step, compiled vs eager, in ONE run.

A step is ``pipe.predict_model_output(...)`` on one tile with the SFT layers attached (time-aware encoder + SFT +
UNet), as (b) in ``bench_step.py``. Model sizes (``--model``), seeded random weights:

* ``small`` (default): the SD 2.x UNet layout at 0.4x the widths (block_out_channels 128, 256, 512, 512, head
  width 64; same blocks, attention and SFT placement, so the same number of compiled graphs) and the time-aware
  encoder at a quarter of its width;
* ``full``: the full-size SD 2.1-base UNet (as ``bench_step.py``) and the default encoder;
* ``tiny``: a tiny UNet (block_out_channels 32, 64), for a quick check.

Measured: ``--steps`` eager steps (median), then ``compile_pipeline(pipe, backend=...)`` and the first compiled
step (its time minus an eager step = compile time), then ``--steps`` compiled steps (median), wall and process CPU
seconds, the speed-up, the largest difference between compiled and eager outputs, and whether another tile size
recompiled (``torch._dynamo`` counters).

Run::

    .venv/bin/python scripts/bench_compile.py                      # small model, 64x64 latent, inductor
    .venv/bin/python scripts/bench_compile.py --model full --steps 3
    .venv/bin/python scripts/bench_compile.py --backend aot_eager  # tracing only, no code generation
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

TIMESTEP = 500


def build(model: str, device: str, dtype: torch.dtype):
    from bench_step import build_pipeline, sd21_base_unet
    from diffusers import UNet2DConditionModel

    from stablesr.models.sft import SFTAdapter
    from stablesr.models.time_aware_encoder import TimeAwareEncoder

    torch.manual_seed(0)
    if model == "full":
        unet, encoder, context = sd21_base_unet(), TimeAwareEncoder(), 1024
    elif model == "small":
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(128, 256, 512, 512), attention_head_dim=(2, 4, 8, 8),
            cross_attention_dim=256, use_linear_projection=True, layers_per_block=2,
        )
        encoder = TimeAwareEncoder(model_channels=64, channel_mult=(1, 1, 2, 2), out_channels=64)
        context = 256
    else:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1, norm_num_groups=32, use_linear_projection=True,
        )
        encoder = TimeAwareEncoder(model_channels=32, channel_mult=(1, 2), out_channels=32, num_res_blocks=1,
                                   attention_resolutions=(2,))
        context = 32
    sft = SFTAdapter.from_unet(unet, cond_channels=encoder.config.out_channels)
    pipe = build_pipeline(unet.eval(), encoder.eval(), sft.eval(), torch.randn(1, 77, context))
    return pipe.to(device=device, dtype=dtype)


class Step:
    def __init__(self, pipe, latent: int, device: str):
        gen = torch.Generator().manual_seed(0)
        self.pipe, self.latent, self.device = pipe, latent, device
        self.x = torch.randn(1, 4, latent, latent, generator=gen).to(device)
        self.lq = torch.randn(1, 4, latent, latent, generator=gen).to(device)
        self.t = torch.tensor([TIMESTEP], device=device)
        self.ctx = pipe.get_prompt_embeds(None, device, pipe.unet.dtype)

    @torch.no_grad()
    def __call__(self, latent: int | None = None):
        latent = latent or self.latent
        x, lq = self.x[..., :latent, :latent], self.lq[..., :latent, :latent]
        with self.pipe.sft_adapter.attached(self.pipe.unet):  # a new attach per step, as per __call__
            start, cpu = time.perf_counter(), time.process_time()
            out = self.pipe.predict_model_output(x, self.t, lq, self.ctx, latent, latent // 2)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return (time.perf_counter() - start, time.process_time() - cpu), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "small", "full"), default="small")
    parser.add_argument("--latent", type=int, default=64, help="tile side in latent pixels (64 = 512 px)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, max-autotune, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--static", action="store_true",
                        help="dynamic=False: graphs specialised to the tile shape (recompiles for other tile sizes)")
    args = parser.parse_args()

    from torch._dynamo.utils import counters

    from stablesr.acceleration import compile_pipeline

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = build(args.model, args.device, dtype)
    step = Step(pipe, args.latent, args.device)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads; model "
          f"{args.model} (UNet {params:.0f}M params), latent {args.latent}; backend {args.backend}, mode "
          f"{args.mode}, dynamic={not args.static}; load average {os.getloadavg()[0]:.1f}", flush=True)

    step()  # warm-up
    eager = [step() for _ in range(args.steps)]
    eager_out = eager[-1][1]
    eager_wall = statistics.median(t[0][0] for t in eager)
    eager_cpu = statistics.median(t[0][1] for t in eager)
    print(f"eager step: {eager_wall:.3f}s wall, {eager_cpu:.3f}s cpu (median of {args.steps})", flush=True)

    counters.clear()
    blocks = compile_pipeline(pipe, mode=args.mode, backend=args.backend, dynamic=not args.static)
    (first_wall, first_cpu), _ = step()
    print(f"compiled {blocks} blocks; first compiled step {first_wall:.1f}s wall ({first_cpu:.1f}s cpu): compile "
          f"time ~{first_wall - eager_wall:.1f}s wall; {counters['stats']['unique_graphs']} graphs", flush=True)
    compiled = [step() for _ in range(args.steps)]
    comp_wall = statistics.median(t[0][0] for t in compiled)
    comp_cpu = statistics.median(t[0][1] for t in compiled)
    diff = (compiled[-1][1].float() - eager_out.float()).abs().max().item()
    scale = eager_out.float().abs().max().item()
    graphs = counters["stats"]["unique_graphs"]
    (other_wall, _), _ = step(args.latent - 8)
    recompiled = counters["stats"]["unique_graphs"] - graphs
    print(f"compiled step: {comp_wall:.3f}s wall, {comp_cpu:.3f}s cpu (median of {args.steps}); max |compiled - "
          f"eager| = {diff:.2e} (max |eager| {scale:.2e}); a {args.latent - 8}-latent tile: {other_wall:.1f}s, "
          f"{recompiled} new graphs", flush=True)
    print("\n| model | device, dtype | backend | compile s | eager s/step | compiled s/step | speed-up (wall / cpu) "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.model}, latent {args.latent} | {args.device}, {args.dtype} | {args.backend}"
          f"{', static' if args.static else ''} | "
          f"{first_wall - eager_wall:.0f} | {eager_wall:.2f} | {comp_wall:.2f} | {eager_wall / comp_wall:.2f}x / "
          f"{eager_cpu / comp_cpu:.2f}x | {diff:.1e} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
