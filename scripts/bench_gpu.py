"""GPU benchmark in ONE run (< 8 minutes on one H200-class GPU): restore speed and memory per step count and dtype,
training throughput, --compile and --offload. Full-size architecture, seeded random weights (built on the GPU).

Sections, in this order, each with its own time limit and skipped when the global ``--budget`` would be exceeded
(every section catches its own errors, prints them and the run goes on):

1. ``restore``: a 512x512 image restored at x4 (2048x2048 output: 49 latent tiles of 64 at overlap 32, tile batch
   4, CFW w=0.5, VAE tiles of 1024 px) at 200 (official DDPM), 20 (DPM-Solver++), 4 and 1 steps (DDPM; 4 = the
   turbo model's default), in fp16 and in bf16, after one untimed warm-up restore per dtype. Wall seconds and peak
   memory (``torch.cuda.max_memory_allocated``). A restore still sampling after ``--restore-limit`` seconds is
   stopped and its row extrapolated (encode + median step x steps + decode of the 20-step run), labelled so.
2. ``train``: stage-1 training (``train/train_sft.py``'s pieces: ``synthesize_batch`` with the on-GPU Real-ESRGAN
   degradation and VAE encodes, time-aware encoder + SFT trainable in fp32, frozen UNet and VAE in bf16 under bf16
   autocast as accelerate's mixed precision, AdamW), 512 px, batch 6, without and with gradient checkpointing:
   samples/s and peak memory.
3. ``distill``: the student step of ``train/train_distill.py`` (1-step student at t = 999, LoRA rank 16 on the UNet
   via its ``add_lora``, encoder + SFT trainable, trajectory loss against precomputed teacher latents as with
   ``--teacher_data``; the teacher's own sampling is not included), batch 6, with and without gradient
   checkpointing. HOOK: to time the whole script instead, run ``train_distill.main`` on a small ``--teacher_data``
   folder here (see ``distill_section``).
4. ``compile``: ``stablesr.acceleration.compile_pipeline`` on the bf16 pipeline: compile time (first call) and the
   time of one 4-tile step, eager vs compiled.
5. ``offload``: a 1-step 512 px restore with ``enable_offload(pipe, "model")`` and ``"sequential"`` vs none: wall
   seconds, peak memory and the largest output difference (the hooks on the GPU, checked here).

Prints markdown tables. ``--smoke`` runs every section with tiny models and sizes on the CPU (a dry run of the
script's code; its numbers mean nothing).

Run::

    python scripts/bench_gpu.py                       # ~6-7 minutes on an H200
    python scripts/bench_gpu.py --sections restore train --budget 300
    python scripts/bench_gpu.py --smoke               # CPU dry run, ~2-4 minutes
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "train"))

SECTIONS = ("restore", "train", "distill", "compile", "offload")
RESTORE_RUNS = ((200, "ddpm"), (20, "dpmsolver"), (4, "ddpm"), (1, "ddpm"))


@dataclass
class Config:
    device: str
    smoke: bool
    image: int  # input side of the restore section
    upscale: float
    resolution: int  # training crop
    batch: int
    restore_limit: float
    train_seconds: float


# --------------------------------------------------------------------------------------------------------- models
def build_pipeline(cfg: Config, dtype: torch.dtype):
    """Full-size StableSR (SD 2.1-base UNet, default encoder, SFT, SD VAE + CFW), or tiny parts with --smoke."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from stablesr.models.cfw import CFWAdapter
    from stablesr.models.prompt_embedding import PromptEmbedding
    from stablesr.models.sft import SFTAdapter
    from stablesr.models.time_aware_encoder import TimeAwareEncoder
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline
    from stablesr.schedulers import StableSRDDPMScheduler

    torch.manual_seed(0)
    with torch.device(cfg.device):  # initialise on the GPU: seconds instead of minutes on the CPU
        if cfg.smoke:
            unet = UNet2DConditionModel(
                sample_size=16, block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, use_linear_projection=True,
            )
            encoder = TimeAwareEncoder(model_channels=32, channel_mult=(1, 2), out_channels=32, num_res_blocks=1,
                                       attention_resolutions=(2,))
            vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
            context = 32
        else:
            from bench_cfw_decode import VAE_CONFIG
            from bench_step import sd21_base_unet

            unet, encoder, vae, context = sd21_base_unet(), TimeAwareEncoder(), AutoencoderKL(**VAE_CONFIG), 1024
        sft = SFTAdapter.from_unet(unet, cond_channels=encoder.config.out_channels)
        cfw = CFWAdapter.from_vae(vae)
        embedding = PromptEmbedding.from_tensor(torch.randn(1, 77, context))
    pipe = StableSRPipeline(vae=vae, unet=unet, time_aware_encoder=encoder, sft_adapter=sft,
                            scheduler=StableSRDDPMScheduler(), cfw_adapter=cfw, prompt_embedding=embedding)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def test_image(size: int):
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(max(size // 8, 2), max(size // 8, 2), 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((size, size), PIL.Image.Resampling.BICUBIC)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.startswith("cuda") else "-"


# -------------------------------------------------------------------------------------------------------- sections
class _Stop(Exception):
    pass


def timed_restore(pipe, cfg: Config, steps: int, scheduler: str) -> dict:
    """One restore: wall seconds per phase and per step; sampling stopped after cfg.restore_limit seconds."""
    from stablesr.schedulers import scheduler_from_name

    pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    phases, step_times, mark = {}, [], [0.0]

    def wrap(name):
        method = getattr(pipe, name)

        def timed(*args, **kwargs):
            sync(cfg.device)
            start = time.perf_counter()
            if name == "denoise":
                mark[0] = start
            try:
                return method(*args, **kwargs)
            finally:
                sync(cfg.device)
                phases[name] = time.perf_counter() - start

        return timed

    def callback(i, t, latents):
        sync(cfg.device)
        now = time.perf_counter()
        step_times.append(now - mark[0])
        mark[0] = now
        if now - begin > cfg.restore_limit and i + 1 < steps:
            raise _Stop

    for name in ("encode_condition", "denoise", "decode_latents"):
        setattr(pipe, name, wrap(name))
    reset_peak(cfg.device)
    begin = time.perf_counter()
    complete = True
    try:
        pipe(test_image(cfg.image), upscale=cfg.upscale, num_inference_steps=steps, callback=callback,
             generator=torch.Generator().manual_seed(0))
    except _Stop:
        complete = False
    finally:
        for name in ("encode_condition", "denoise", "decode_latents"):
            pipe.__dict__.pop(name, None)
    sync(cfg.device)
    return {"steps": steps, "scheduler": scheduler, "complete": complete, "wall": time.perf_counter() - begin,
            "encode": phases.get("encode_condition", 0.0), "decode": phases.get("decode_latents"),
            "step": statistics.median(step_times) if step_times else float("nan"), "steps_done": len(step_times),
            "peak": peak_gib(cfg.device)}


def restore_section(cfg: Config, pipes: dict, rows: list) -> None:
    for name in ("fp16", "bf16"):
        pipe = pipes[name]()
        timed_restore(pipe, cfg, 1, "ddpm")  # warm-up: kernels, allocator
        results = [timed_restore(pipe, cfg, steps, scheduler) for steps, scheduler in RESTORE_RUNS]
        decodes = [r["decode"] for r in results if r["decode"] is not None]
        for r in results:
            total = r["wall"]
            if not r["complete"]:
                total = r["encode"] + r["step"] * r["steps"] + (statistics.median(decodes) if decodes else 0.0)
            label = "" if r["complete"] else f" (extrapolated from {r['steps_done']} steps)"
            rows.append((name, f"{r['steps']} {r['scheduler']}", f"{total:.1f}{label}", f"{r['step']:.3f}",
                         f"{r['encode']:.1f}", f"{r['decode']:.1f}" if r["decode"] is not None else "-", r["peak"]))
            print(f"  restore {name} {r['steps']} {r['scheduler']}: {total:.1f}s{label}, peak {r['peak']} GiB",
                  flush=True)


def train_parts(cfg: Config, base, lora: bool):
    """Trainable copies (fp32 encoder + SFT, LoRA), frozen UNet/VAE in the compute dtype, SFT attached."""
    weight_dtype = torch.float32 if cfg.smoke else torch.bfloat16
    unet = copy.deepcopy(base.unet).to(dtype=weight_dtype)
    vae = copy.deepcopy(base.vae).to(dtype=weight_dtype)
    encoder = copy.deepcopy(base.time_aware_encoder).float().requires_grad_(True).train()
    sft = copy.deepcopy(base.sft_adapter).float().requires_grad_(True).train()
    sft.attach(unet)
    trainable = list(encoder.parameters()) + list(sft.parameters())
    if lora:
        from diffusers.training_utils import cast_training_params
        from train_distill import add_lora

        add_lora(unet, 16, None)
        cast_training_params([unet], dtype=torch.float32)
        trainable += [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    return unet, vae, encoder, sft, trainable, weight_dtype


def measure_steps(cfg: Config, step, seconds: float) -> tuple[float, int]:
    """Seconds per step (median) over ``seconds`` of steps after two warm-up steps."""
    for _ in range(2):
        step()
    sync(cfg.device)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 2:
        t0 = time.perf_counter()
        step()
        sync(cfg.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _train_throughput(cfg: Config, base, checkpointing: bool, lora: bool, make_step) -> tuple[float, int, str]:
    """(seconds per step, steps timed, peak GiB) of ``make_step(parts)``'s step on fresh trainable copies."""
    unet, vae, encoder, sft, trainable, weight_dtype = train_parts(cfg, base, lora=lora)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        encoder.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    embeds = base.prompt_embedding().to(cfg.device, weight_dtype).expand(cfg.batch, -1, -1)
    autocast = torch.autocast(cfg.device.split(":")[0], dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    forward = make_step(unet, vae, encoder, sft, embeds, weight_dtype, autocast)

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(cfg.device)
    seconds, count = measure_steps(cfg, step, cfg.train_seconds)
    return seconds, count, peak_gib(cfg.device)


def train_section(cfg: Config, pipes: dict, rows: list) -> None:
    from train_sft import synthesize_batch

    from stablesr.degradation import DegradationConfig, RealESRGANDegradation
    from stablesr.training_utils import make_generator, per_sample_randn, sample_generators

    base = pipes["fp32_parts"]()
    config = DegradationConfig()
    config.gt_size = None  # the batch is already a crop of --resolution (as train_sft.py does)
    degradation = RealESRGANDegradation(config)
    scheduler = base.scheduler
    counter = [0]

    def make_step(unet, vae, encoder, sft, embeds, weight_dtype, autocast):
        def forward():  # train_sft.py's compute_loss on a random batch
            counter[0] += 1
            gt = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution, device=cfg.device)
            batch = {"gt": gt, "has_lq": torch.zeros(cfg.batch, dtype=torch.bool)}
            gens = sample_generators(0, "bench", counter[0], positions=range(cfg.batch))
            inputs = synthesize_batch(batch, degradation, make_generator(0, "deg", counter[0]), vae, gens, cfg.device)
            t = torch.randint(0, 1000, (cfg.batch,), device=cfg.device)
            noise = per_sample_randn(gens, inputs.z_gt.shape[1:], cfg.device)
            noisy = scheduler.add_noise(inputs.z_gt, noise, t)
            with autocast:
                sft.set_condition(encoder(inputs.z_lq, t).features)
                pred = unet(noisy.to(weight_dtype), t, encoder_hidden_states=embeds).sample
            return F.mse_loss(pred.float(), noise.float())

        return forward

    for checkpointing in (False, True):
        seconds, count, peak = _train_throughput(cfg, base, checkpointing, False, make_step)
        rows.append(("stage 1 (train_sft)", f"{cfg.resolution}", cfg.batch, "yes" if checkpointing else "no",
                     f"{cfg.batch / seconds:.2f}", f"{seconds:.3f}", count, peak))
        print(f"  train gc={checkpointing}: {cfg.batch / seconds:.2f} samples/s, peak {peak} GiB", flush=True)
        reset_peak(cfg.device)


def distill_section(cfg: Config, pipes: dict, rows: list) -> None:
    # HOOK (whole-script throughput): build a small --teacher_data folder with scripts/generate_cfw_data.py and
    # time train_distill.main(train_distill.parse_args([...])) here; this section times its student step alone.
    from train_distill import student_scheduler

    base = pipes["fp32_parts"]()
    scheduler = student_scheduler(base.scheduler.config)
    latent = cfg.resolution // base.vae_scale_factor

    def make_step(unet, vae, encoder, sft, embeds, weight_dtype, autocast):
        def forward():  # the 1-step student's trajectory loss against precomputed teacher latents
            z_lq = torch.randn(cfg.batch, 4, latent, latent, device=cfg.device)
            x_t = torch.randn_like(z_lq)
            target = torch.randn_like(z_lq)
            t = torch.full((cfg.batch,), 999, device=cfg.device, dtype=torch.long)
            with autocast:
                sft.set_condition(encoder(z_lq, t).features)
                out = unet(x_t.to(weight_dtype), t, encoder_hidden_states=embeds).sample
            x0 = scheduler.predict_original_sample(out.float(), t, x_t.float())
            return F.mse_loss(x0, target)

        return forward

    for checkpointing in (False, True):
        seconds, count, peak = _train_throughput(cfg, base, checkpointing, True, make_step)
        rows.append(("distill student (train_distill, LoRA 16)", f"{cfg.resolution}", cfg.batch,
                     "yes" if checkpointing else "no", f"{cfg.batch / seconds:.2f}", f"{seconds:.3f}", count, peak))
        print(f"  distill gc={checkpointing}: {cfg.batch / seconds:.2f} samples/s, peak {peak} GiB", flush=True)
        reset_peak(cfg.device)


def compile_section(cfg: Config, pipes: dict, rows: list) -> None:
    from stablesr.acceleration import compile_pipeline

    pipe = pipes["bf16"]()
    latent = pipe.default_tile_size
    x = torch.randn(4, 4, latent, latent, device=cfg.device)
    lq = torch.randn_like(x)
    t = torch.full((4,), 500, device=cfg.device)
    embeds = pipe.get_prompt_embeds(None, cfg.device, pipe.unet.dtype)

    def step():
        with pipe.sft_adapter.attached(pipe.unet):
            pipe.predict_model_output(x, t, lq, embeds, latent, latent // 2, tile_batch_size=4)

    eager, _ = measure_steps(cfg, step, 5)
    # The smoke run checks the wiring with dynamo's tracing only (inductor's CPU code generation takes minutes).
    backend = "eager" if cfg.smoke else "inductor"
    compile_pipeline(pipe, backend=backend)
    start = time.perf_counter()
    step()
    sync(cfg.device)
    first = time.perf_counter() - start
    compiled, _ = measure_steps(cfg, step, 5)
    rows.append((f"{'bf16' if not cfg.smoke else 'fp32'}, 4 tiles of {latent}, {backend}", f"{first:.0f}", f"{eager:.3f}", f"{compiled:.3f}", f"{eager / compiled:.2f}x"))
    print(f"  compile: first call {first:.0f}s, {eager:.3f} -> {compiled:.3f} s/step", flush=True)


def offload_section(cfg: Config, pipes: dict, rows: list) -> None:
    from stablesr.acceleration import enable_offload

    size = cfg.image // 4  # x4 -> the native size: one tile
    results = {}
    for mode in ("none", "model", "sequential"):
        pipe = pipes["bf16_fresh"]()
        if mode != "none":
            pipe.to("cpu")
            enable_offload(pipe, mode, cfg.device)
        reset_peak(cfg.device)
        sync(cfg.device)
        start = time.perf_counter()
        out = pipe(test_image(size), upscale=4, num_inference_steps=1, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        sync(cfg.device)
        results[mode] = out.float().cpu()
        diff = (results[mode] - results["none"]).abs().max().item()
        rows.append((mode, f"{time.perf_counter() - start:.1f}", peak_gib(cfg.device), f"{diff:.1e}"))
        print(f"  offload {mode}: peak {peak_gib(cfg.device)} GiB, max diff {diff:.1e}", flush=True)
        del pipe


# ------------------------------------------------------------------------------------------------------------ main
def table(title: str, header: tuple, rows: list) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU (a dry run)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--restore-limit", type=float, default=30.0,
                        help="seconds of one restore before it is stopped and extrapolated (default 30)")
    args = parser.parse_args()

    start = time.perf_counter()
    if args.smoke:
        cfg = Config("cpu", True, 64, 4.0, 64, 2, restore_limit=5.0, train_seconds=2.0)
        torch.set_num_threads(2)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke for the CPU dry run")
        cfg = Config("cuda", False, 512, 4.0, 512, 6, restore_limit=args.restore_limit, train_seconds=15.0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    cache: dict = {}

    def cached(key, make):
        def get():
            if key not in cache:
                for other in [k for k in cache if k != key]:  # one model set on the GPU at a time
                    del cache[other]
                reset_peak(cfg.device)
                cache[key] = make()
            return cache[key]

        return get

    fp16 = torch.float32 if cfg.smoke else torch.float16  # CPU float16 is emulated: the smoke run uses float32
    bf16 = torch.float32 if cfg.smoke else torch.bfloat16
    pipes = {
        "fp16": cached("fp16", lambda: build_pipeline(cfg, fp16)),
        "bf16": cached("bf16", lambda: build_pipeline(cfg, bf16)),
        "bf16_fresh": lambda: build_pipeline(cfg, bf16),
        "fp32_parts": cached("fp32", lambda: build_pipeline(cfg, torch.float32)),
    }
    # (section, function, header, title, seconds it needs at least)
    plan = {
        "restore": (restore_section, ("dtype", "steps", "restore s", "s/step", "encode s", "decode s", "peak GiB"),
                    f"{cfg.image}px x{cfg.upscale:g} restores (full-size model, random weights)", 60),
        "train": (train_section, ("training", "px", "batch", "grad. ckpt", "samples/s", "s/step", "steps",
                                  "peak GiB"), "training throughput", 40),
        "distill": (distill_section, ("training", "px", "batch", "grad. ckpt", "samples/s", "s/step", "steps",
                                      "peak GiB"), "distillation student step", 40),
        "compile": (compile_section, ("setting", "compile s (first call)", "eager s/step", "compiled s/step",
                                      "speed-up"), "regional torch.compile", 120),
        "offload": (offload_section, ("offload", "restore s", "peak GiB", "max |diff| vs none"),
                    "CPU offload (1-step 512 px restore, bf16)", 30),
    }
    results = []
    for name in [s for s in SECTIONS if s in args.sections]:
        function, header, title, needs = plan[name]
        left = args.budget - (time.perf_counter() - start)
        if left < needs and not cfg.smoke:
            print(f"[{name}] skipped: {left:.0f}s of the budget left, it needs ~{needs}s", flush=True)
            continue
        print(f"[{name}] ({left:.0f}s of the budget left)", flush=True)
        rows: list = []
        section_start = time.perf_counter()
        try:
            function(cfg, pipes, rows)
        except Exception:  # report and go on with the next section
            traceback.print_exc()
            rows.append(("ERROR (see the traceback above)",) + ("",) * (len(header) - 1))
        print(f"[{name}] took {time.perf_counter() - section_start:.0f}s", flush=True)
        results.append((title, header, rows))
        if name in ("train", "distill"):
            cache.clear()
    for title, header, rows in results:
        table(title, header, rows)
    print(f"\ntotal {time.perf_counter() - start:.0f}s" + (" (smoke run on the CPU: tiny models)" if cfg.smoke else ""))


if __name__ == "__main__":
    main()
