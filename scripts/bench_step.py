"""Cost of one StableSR denoising step relative to a bare Stable Diffusion UNet step (CPU, full-size architecture).

Builds the full-size architecture with random weights (SD 2.1-base ``UNet2DConditionModel``, the default
``TimeAwareEncoder`` and ``SFTAdapter.from_unet``), fp32, batch 1, a 64x64 latent, and measures in ONE run:

(a) a bare UNet step: ``unet(x, t, encoder_hidden_states=ctx)`` with no SFT attached;
(b) a pipeline step: ``pipe.predict_model_output(...)`` with the SFT layers attached (time-aware encoder + SFT + UNet;
    tile 64, so a single tile);
(e) the time-aware encoder alone (to split (b) - (a) into encoder and SFT parts).

The calls are interleaved (order a, b, e then e, b, a, ...) after one warm-up (the FLOP-counting pass), and the
medians are reported. The FLOPs of the same calls are counted with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention, including the fused CPU attention kernel that torch's counter has no
formula for; GroupNorm and elementwise ops are not counted, so a time ratio above the FLOP
ratio means time going into uncounted, memory-bound work or into slow kernels). Printed:

* time ratio (b)/(a) (median of the per-round ratios, which cancels drift) next to the FLOP ratio and the gap in %;
* a per-component table: GFLOP, seconds, GFLOP/s for UNet, encoder, SFT (+ glue);
* fp32 vs bf16 time of the pipeline step (models cast with ``.to(torch.bfloat16)``) and whether the CPU has native
  bf16 (AVX512-BF16 / AMX). Without native bf16 every bf16 matmul/conv is emulated and a full 64x64 bf16 step would
  take tens of minutes, so the comparison then runs on a small latent (``--bf16-latent``, default 8) and says so.

With ``--profile`` it also profiles one (a) and one (b) call with ``torch.profiler`` and prints the operators whose
self CPU time grows the most from (a) to (b) (where the extra time goes).

Run (~2 minutes on 2 idle cores, the fp32 UNet step is ~8.5 s; 15-20 minutes when the machine is loaded)::

    .venv/bin/python scripts/bench_step.py [--pairs 3] [--threads 2] [--profile] [--skip-bf16]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from stablesr.models.prompt_embedding import PromptEmbedding
from stablesr.models.sft import SFTAdapter
from stablesr.models.time_aware_encoder import TimeAwareEncoder
from stablesr.pipelines.pipeline_stablesr import StableSRPipeline
from stablesr.schedulers import StableSRDDPMScheduler

TIMESTEP = 500


def sd21_base_unet() -> UNet2DConditionModel:
    """SD 2.1-base UNet layout (865.9M parameters), random weights."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    )


def tiny_vae() -> AutoencoderKL:
    """Not used by the step; only there so that the pipeline can be built (scale factor 8 like SD)."""
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    )


def build_pipeline(unet, encoder, sft, embeds) -> StableSRPipeline:
    return StableSRPipeline(
        vae=tiny_vae(),
        unet=unet,
        time_aware_encoder=encoder,
        sft_adapter=sft,
        scheduler=StableSRDDPMScheduler(),
        prompt_embedding=PromptEmbedding.from_tensor(embeds),
    )



def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FlopCounterMode has formulas for the CUDA SDPA kernels but not for the fused CPU one that SDPA picks for
# the UNet's and the encoder's attention here: without this entry their attention counts as 0 FLOPs.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}

class StepBench:
    """The three measured calls of one pipeline (a: bare UNet, b: pipeline step, e: encoder alone)."""

    def __init__(self, pipe: StableSRPipeline, latent: int, seed: int = 0):
        self.pipe = pipe
        dtype = pipe.unet.dtype
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(1, 4, latent, latent, generator=gen)
        self.lq = torch.randn(1, 4, latent, latent, generator=gen)
        self.t = torch.tensor([TIMESTEP])
        self.ctx = pipe.get_prompt_embeds(None, "cpu", dtype)
        self.latent = latent

    @torch.no_grad()
    def bare_unet(self):
        unet = self.pipe.unet
        assert not self.pipe.sft_adapter.is_attached(), "the bare UNet step must run without SFT"
        return unet(self.x.to(unet.dtype), self.t, encoder_hidden_states=self.ctx).sample

    @torch.no_grad()
    def pipeline_step(self):
        # Attach/detach happen once per __call__ in the pipeline, not per step: kept out of the timed region.
        return self.pipe.predict_model_output(self.x, self.t, self.lq, self.ctx, self.latent, self.latent // 2)

    @torch.no_grad()
    def encoder(self):
        enc = self.pipe.time_aware_encoder
        return enc(self.lq.to(enc.dtype), self.t).features

    def run(self, name: str):
        """Time one call: ((wall seconds, process CPU seconds), output)."""
        sft, unet = self.pipe.sft_adapter, self.pipe.unet
        if name == "b":
            sft.attach(unet)
        try:
            start, cpu = time.perf_counter(), time.process_time()
            out = {"a": self.bare_unet, "b": self.pipeline_step, "e": self.encoder}[name]()
            seconds = (time.perf_counter() - start, time.process_time() - cpu)
        finally:
            if name == "b":
                sft.detach(unet)
        return seconds, out

    def flops(self, name: str) -> tuple[int, float]:
        """(FLOPs, seconds) of one call under FlopCounterMode (this also serves as the warm-up)."""
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            seconds, out = self.run(name)
        first = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(first.float()).all():
            print(f"  warning: non-finite output in call {name}")
        return counter.get_total_flops(), seconds[0]


def cpu_bf16_support() -> tuple[bool, str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
    capability = torch.backends.cpu.get_cpu_capability()
    if native:
        return True, f"native bf16 ({', '.join(native)}; torch CPU capability {capability})"
    return False, (
        f"NO native bf16 instructions (torch CPU capability {capability}; no avx512_bf16/amx_bf16/avx_ne_convert): "
        "bf16 matmuls/convs are emulated"
    )


def interleaved(bench: StepBench, names: list[str], pairs: int):
    """Wall and process-CPU seconds of each call, rounds alternating the order."""
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(pairs):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            (w, c), _ = bench.run(name)
            wall[name].append(w)
            cpu[name].append(c)
        timings = "  ".join(f"{n}={wall[n][-1]:.2f}/{cpu[n][-1]:.2f}" for n in names)
        print(f"  round {round_index + 1} (wall/cpu s): {timings}  load {os.getloadavg()[0]:.1f}", flush=True)
    return wall, cpu


def profile_extra(bench: StepBench, top: int = 25) -> None:
    """Profile (a) and (b) once and print the ops whose self CPU time grows most from (a) to (b)."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for name in ("a", "b"):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            bench.run(name)
        agg = {}
        for evt in prof.key_averages():
            agg[evt.key] = (evt.self_cpu_time_total / 1e6, evt.count)
        totals[name] = agg
    keys = set(totals["a"]) | set(totals["b"])
    rows = []
    for key in keys:
        ta, ca = totals["a"].get(key, (0.0, 0))
        tb, cb = totals["b"].get(key, (0.0, 0))
        rows.append((tb - ta, key, ta, ca, tb, cb))
    rows.sort(reverse=True)
    sum_a = sum(v[0] for v in totals["a"].values())
    sum_b = sum(v[0] for v in totals["b"].values())
    print(f"\nprofile: self CPU total a={sum_a:.2f}s b={sum_b:.2f}s (extra {sum_b - sum_a:.2f}s); top extra ops:")
    print(f"  {'op':<42}{'extra s':>9}{'a s':>9}{'a calls':>9}{'b s':>9}{'b calls':>9}")
    for extra, key, ta, ca, tb, cb in rows[:top]:
        print(f"  {key[:41]:<42}{extra:>9.3f}{ta:>9.3f}{ca:>9d}{tb:>9.3f}{cb:>9d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3,
                        help="interleaved measurement rounds after the warm-up (0: FLOP count only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--bf16-latent", type=int, default=None,
                        help="latent side of the bf16 comparison (default: --latent with native bf16, else 8)")
    parser.add_argument("--bf16-pairs", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="profile where the extra time of (b) goes")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    torch.manual_seed(0)
    unet = sd21_base_unet().eval()
    encoder = TimeAwareEncoder().eval()
    sft = SFTAdapter.from_unet(unet).eval()
    embeds = torch.randn(1, 77, 1024)
    pipe = build_pipeline(unet, encoder, sft, embeds)
    n_params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
                (("unet", unet), ("encoder", encoder), ("sft", sft))}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, batch 1, latent "
          f"{args.latent}x{args.latent}; params (M): " + ", ".join(f"{k} {v:.1f}" for k, v in n_params.items()))
    print(f"built in {time.perf_counter() - wall:.1f}s")

    bench = StepBench(pipe, args.latent)
    print("warm-up + FLOP count (FlopCounterMode):", flush=True)
    flops, warm = {}, {}
    for name in ("a", "b", "e"):
        flops[name], warm[name] = bench.flops(name)
        print(f"  {name}: {flops[name] / 1e9:.1f} GFLOP ({warm[name]:.2f}s)", flush=True)

    if args.pairs > 0:
        print(f"timing, {args.pairs} interleaved rounds (load average at start {os.getloadavg()[0]:.1f}):", flush=True)
        wall_times, cpu_times = interleaved(bench, ["a", "b", "e"], args.pairs)
        flop_ratio = flops["b"] / flops["a"]
        f_sft = flops["b"] - flops["a"] - flops["e"]
        for label, times in (("wall", wall_times), ("process CPU", cpu_times)):
            med = {n: statistics.median(v) for n, v in times.items()}
            round_ratios = [b / a for a, b in zip(times["a"], times["b"], strict=True)]
            time_ratio = statistics.median(round_ratios)
            gap = (time_ratio / flop_ratio - 1) * 100
            t_sft = med["b"] - med["a"] - med["e"]
            print(f"\n[{label} time, medians]\ncomponent          GFLOP   share  seconds   share  GFLOP/s")
            for name, f, t in (
                ("UNet (a)", flops["a"], med["a"]),
                ("encoder (e)", flops["e"], med["e"]),
                ("SFT+glue (b-a-e)", f_sft, t_sft),
                ("pipeline step (b)", flops["b"], med["b"]),
            ):
                rate = f / t / 1e9 if t > 0 else float("nan")
                print(f"{name:<17}{f / 1e9:>7.1f} {f / flops['b']:>7.1%} {t:>8.2f} {t / med['b']:>7.1%} {rate:>8.1f}")
            print(f"per-round {label} time ratios b/a: {', '.join(f'{r:.3f}' for r in round_ratios)}")
            print(f"{label.upper()} TIME ratio (b)/(a) = {time_ratio:.3f}   FLOP ratio (encoder+SFT+UNet)/UNet = "
                  f"{flop_ratio:.3f}   gap = {gap:+.1f}%  ({'within' if abs(gap) <= 5 else 'OUTSIDE'} the 5% goal)")

    if not args.skip_bf16:
        native, note = cpu_bf16_support()
        latent = args.bf16_latent or (args.latent if native else 8)
        print(f"\nbf16: {note}")
        if latent != args.latent:
            print(f"  -> fp32 vs bf16 compared on a {latent}x{latent} latent pipeline step (b) (a full {args.latent}x"
                  f"{args.latent} bf16 step would take tens of minutes here); pass --bf16-latent to change")
        pipe16 = build_pipeline(copy.deepcopy(unet).to(torch.bfloat16), copy.deepcopy(encoder).to(torch.bfloat16),
                                copy.deepcopy(sft).to(torch.bfloat16), embeds)
        b32 = StepBench(pipe, latent) if latent != args.latent else bench
        b16 = StepBench(pipe16, latent)
        b32.run("b")
        b16.run("b")  # warm-up
        t32, t16 = [], []
        for round_index in range(args.bf16_pairs):
            order = (b32, b16) if round_index % 2 == 0 else (b16, b32)
            for bb in order:
                (w, c), _ = bb.run("b")
                (t32 if bb is b32 else t16).append((w, c))
            print(f"  round {round_index + 1} (wall/cpu s): fp32={t32[-1][0]:.2f}/{t32[-1][1]:.2f} "
                  f"bf16={t16[-1][0]:.2f}/{t16[-1][1]:.2f}", flush=True)
        ratio_wall = statistics.median(x[0] for x in t16) / statistics.median(x[0] for x in t32)
        ratio_cpu = statistics.median(x[1] for x in t16) / statistics.median(x[1] for x in t32)
        print(f"bf16/fp32 pipeline-step time ratio ({latent}x{latent} latent): wall {ratio_wall:.2f}, "
              f"process CPU {ratio_cpu:.2f}")

    if args.profile:
        profile_extra(bench)
    print(f"\ntotal wall time {time.perf_counter() - wall:.0f}s")


if __name__ == "__main__":
    main()
