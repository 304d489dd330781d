#!/usr/bin/env python
"""Distil a StableSR model into a 1- to 4-step model of the same architecture (the fidelity knob is kept).

Teacher: any StableSR pipeline folder (a converted official model, or one fine-tuned with ``train_sft.py``), frozen,
sampled with a deterministic solver (DPM-Solver++, 50 steps by default) from the official LQ start
``x_T = sqrt(acp_999) z_LQ + sqrt(1 - acp_999) eps``. Student: the same parts initialised from the teacher; the
time-aware encoder and the SFT layers train, the UNet trains through a LoRA (peft). It restores with the pipeline's
normal path: StableSR's DDPM scheduler with ``trailing`` spacing, whose one step from t = 999 returns the predicted
x0 exactly (K steps: t = 999, 999 - 1000/K, ...), stored in the folder with ``default_num_inference_steps = K``.
CFW acts in the decoder after sampling, so ``--fidelity`` works on the student unchanged.

Losses (each behind a weight):

- ``--traj_weight`` (default 1): trajectory regression (SinSR, Wang et al. 2024, "SinSR: Diffusion-Based Image
  Super-Resolution in a Single Step"): the student's x0 from ``x_T`` matches the teacher's deterministic multi-step
  result from the same ``x_T``. The target is the teacher's own map from noise to image, so the student copies the
  user's model rather than pulling towards the data; it needs no discriminator and no second network in memory
  when the teacher results are generated ahead of time. With K > 1 student steps the later steps start from the
  teacher result noised to their timestep (what the ancestral sampler feeds them), with the same target.
- ``--l2_weight`` / ``--lpips_weight`` (default 0): pixel losses against the ground truth through the frozen VAE
  decoder (OSEDiff's L2 + LPIPS). They pull the student towards the data instead of the teacher; they cost a VAE
  decoder backward pass.
- ``--dmd_weight`` (default 0, off): distribution matching (DMD, Yin et al. 2024; OSEDiff's VSD): the teacher is the
  real score, a LoRA on a frozen copy of it is the fake score, trained alternately on the student's outputs.

Teacher results come from one of two sources:

- ``--teacher_data DIR``: made ahead of time, resumable and sharded, by ``scripts/generate_cfw_data.py
  --pretrained_model_name_or_path TEACHER --scheduler dpmsolver --num_inference_steps 50 --skip_samples`` (the CFW
  data generator: ``inputs/`` the upsampled LQ, ``gts/``, ``latents/`` the teacher result). The student's ``x_T`` is
  rebuilt from the same per-sample seed, so it is the ``x_T`` the teacher started from.
- ``--train_data_config YAML`` (the data sources of ``train_sft.py``: HQ images degraded on the fly, real pairs,
  shards): the teacher samples each batch on the fly (slower; no disk).

Launch like ``train_sft.py``::

    accelerate launch --config_file configs/accelerate/single_gpu.yaml train/train_distill.py \
        --config configs/train_distill.yaml --pretrained_model_name_or_path ./stablesr-sft \
        --teacher_data ./distill-data --output_dir ./stablesr-1step
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import send_to_device
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_sft  # noqa: E402  (the data synthesis, LoRA files and loading of stage 1)

from stablesr.cfw_data import METADATA_FILE, CFWDataset, sample_seed  # noqa: E402
from stablesr.data import build_dataset, collate_samples  # noqa: E402
from stablesr.degradation import DegradationConfig, RealESRGANDegradation  # noqa: E402
from stablesr.file_utils import atomic_write_text  # noqa: E402
from stablesr.models.sft import SFTAdapter  # noqa: E402
from stablesr.models.time_aware_encoder import TimeAwareEncoder  # noqa: E402
from stablesr.pipelines.pipeline_stablesr import LORA_WEIGHT_NAME, StableSRPipeline, load_unet_lora  # noqa: E402
from stablesr.schedulers import DETERMINISTIC_SCHEDULERS, StableSRDDPMScheduler, deterministic_scheduler  # noqa: E402
from stablesr.training_utils import (  # noqa: E402
    TrainState,
    add_training_arguments,
    load_yaml,
    make_generator,
    parse_with_config,
    per_sample_randint,
    per_sample_randn,
    register_checkpoint_hooks,
    resolve_resume_path,
    sample_generators,
    save_checkpoint,
    start_training,
)

logger = get_logger(__name__)

SHARDING_UNSUPPORTED = train_sft.SHARDING_UNSUPPORTED


# ---------------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distil a StableSR model into a 1-4 step StableSR model.")
    parser.add_argument("--config", type=str, default=None, help="YAML of flag values (keys = flag names); CLI wins.")
    # teacher and student
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="The teacher: a StableSRPipeline folder (converted official model or a train_sft.py run). "
                             "The student starts as a copy of it.")
    parser.add_argument("--student_steps", type=int, default=1, help="Sampling steps of the student (1-4).")
    parser.add_argument("--teacher_steps", type=int, default=50, help="Steps of the teacher's deterministic sampler.")
    parser.add_argument("--teacher_scheduler", choices=DETERMINISTIC_SCHEDULERS, default="dpmsolver",
                        help="Deterministic sampler of the teacher (trailing spacing, so it starts at t=999 as the "
                             "student does).")
    parser.add_argument("--lora_rank", type=int, default=16, help="Rank of the student's UNet LoRA; 0 = UNet frozen.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    parser.add_argument("--full_unet", action="store_true",
                        help="Train every UNet weight instead of a LoRA (--lora_rank is then unused); the folder gets "
                             "the whole trained UNet. Generalises better from few teacher results on small models; "
                             "on SD 2.1 it needs ~14 GB more for AdamW in fp32.")
    parser.add_argument("--merge_lora", action="store_true",
                        help="Save the UNet with the LoRA merged in (no peft needed to load; a full UNet on disk).")
    # losses
    parser.add_argument("--traj_weight", type=float, default=1.0, help="Trajectory regression to the teacher result.")
    parser.add_argument("--l2_weight", type=float, default=0.0, help="Pixel L2 to the GT through the VAE decoder.")
    parser.add_argument("--lpips_weight", type=float, default=0.0, help="LPIPS to the GT through the VAE decoder.")
    parser.add_argument("--perceptual_net", choices=("vgg", "tiny"), default="vgg",
                        help="LPIPS backbone; 'tiny' is a small random net for tests only.")
    parser.add_argument("--lpips_weights", type=str, default=None,
                        help="LPIPS linear-layer weights (.pth / .safetensors); default: the lpips package's.")
    parser.add_argument("--dmd_weight", type=float, default=0.0,
                        help="Distribution matching (DMD/VSD) with a fake-score LoRA; 0 = off (default).")
    parser.add_argument("--fake_lora_rank", type=int, default=16, help="Rank of the fake-score LoRA (DMD).")
    parser.add_argument("--fake_learning_rate", type=float, default=None, help="Fake-score lr (default: --learning_rate).")
    parser.add_argument("--dmd_timestep_range", type=str, default="20,980", help="t range of the DMD loss.")
    # data
    parser.add_argument("--teacher_data", type=str, default=None,
                        help="Teacher results made ahead of time by scripts/generate_cfw_data.py (see the docstring).")
    parser.add_argument("--train_data_config", type=str, default=None,
                        help="Or: YAML of data sources as for train_sft.py; the teacher then samples on the fly.")
    parser.add_argument("--degradation_config", type=str, default=None, help="Degradation table (on-the-fly data).")
    parser.add_argument("--resolution", type=int, default=512, help="GT crop side (on-the-fly data).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--validation_teacher_data", type=str, default=None,
                        help="Held-out teacher results (a generate_cfw_data.py folder): the student's mean relative "
                             "L2 distance to them is measured before training, every --validation_steps and at the "
                             "end, logged as val/teacher_rel_l2 and written to teacher_distance.json.")
    add_training_arguments(parser, output_dir="stablesr-distilled", tracker_project_name="stablesr-distill")
    parser.set_defaults(train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-5, max_grad_norm=1.0,
                        checkpointing_steps=500, validation_steps=500, validation_num_inference_steps=None)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "train_distill.py")
    if not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required: the teacher StableSRPipeline folder")
    if bool(args.teacher_data) == bool(args.train_data_config):
        raise ValueError("pass exactly one of --teacher_data (teacher results made ahead of time) and "
                         "--train_data_config (data sources; the teacher samples on the fly)")
    for flag in ("teacher_data", "validation_teacher_data"):
        folder = getattr(args, flag)
        if folder and not (Path(folder) / METADATA_FILE).is_file():
            raise FileNotFoundError(f"--{flag} {folder}: no {METADATA_FILE}; make the folder with "
                                    "scripts/generate_cfw_data.py --scheduler dpmsolver --num_inference_steps 50")
    if not 1 <= args.student_steps <= 8:
        raise ValueError(f"--student_steps must be in [1, 8], got {args.student_steps}")
    if args.teacher_steps < 2:
        raise ValueError(f"--teacher_steps must be >= 2, got {args.teacher_steps}")
    if args.lora_rank < 0 or args.fake_lora_rank < 1:
        raise ValueError("--lora_rank must be >= 0 and --fake_lora_rank >= 1")
    if args.full_unet:
        if args.merge_lora:
            raise ValueError("--merge_lora has no LoRA to merge with --full_unet (the folder gets the whole UNet)")
        args.lora_rank = 0  # no LoRA: every UNet weight trains
    weights = (args.traj_weight, args.l2_weight, args.lpips_weight, args.dmd_weight)
    if min(weights) < 0 or max(weights) == 0:
        raise ValueError("the loss weights must be >= 0 and at least one of --traj_weight, --l2_weight, "
                         "--lpips_weight, --dmd_weight > 0")
    low, high = (int(v) for v in args.dmd_timestep_range.split(","))
    if not 0 <= low < high < 1000:
        raise ValueError(f"--dmd_timestep_range must be 'low,high' within [0, 1000), got {args.dmd_timestep_range}")
    args.dmd_timestep_range = (low, high)
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise ValueError("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    for path in args.validation_images or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--validation_images: {path} does not exist")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if args.report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ImportError("--report_to tensorboard needs `pip install tensorboard` (or pass --report_to none)")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def student_scheduler(teacher_config) -> StableSRDDPMScheduler:
    """The student's sampler: StableSR's DDPM (the teacher's training schedule and prediction type) with diffusers'
    ``trailing`` spacing, so 1 step is t = 999 -> x0 and K steps start at 999 (the official respacing would put one
    step at t = 0)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    config = {k: teacher_config[k] for k in keys if k in teacher_config}
    return StableSRDDPMScheduler(**config, official_respacing=False, timestep_spacing="trailing")


def lq_start_latents(vae, lq_image: torch.Tensor, generators, scheduler: StableSRDDPMScheduler, t_start: int):
    """``(z_LQ, x_T)`` of images in [-1, 1], with the random draws of [`StableSRPipeline.__call__`] per sample (its
    generator first draws the posterior noise of the LQ encode, then the start noise), so a teacher result made by
    the pipeline with that generator started from exactly this ``x_T``."""
    dist = vae.encode(lq_image.to(vae.dtype)).latent_dist
    shape = dist.mean.shape[1:]
    posterior_noise = per_sample_randn(generators, shape, lq_image.device)
    z_lq = (dist.mean.float() + dist.std.float() * posterior_noise) * vae.config.scaling_factor
    start_noise = per_sample_randn(generators, shape, lq_image.device)
    t = torch.full((z_lq.shape[0],), t_start, dtype=torch.long, device=z_lq.device)
    return z_lq.contiguous(), scheduler.add_noise(z_lq, start_noise, t).contiguous()


@torch.no_grad()
def teacher_results(teacher: StableSRPipeline, x_start: torch.Tensor, z_lq: torch.Tensor, steps: int) -> torch.Tensor:
    """The teacher's deterministic ``steps``-step result from ``x_start`` (one latent tile per image)."""
    embeds = teacher.get_prompt_embeds(None, z_lq.device, teacher.unet.dtype)
    teacher.scheduler.set_timesteps(steps, device=z_lq.device)
    size = max(z_lq.shape[-2:])
    if not teacher.sft_adapter.is_attached(teacher.unet):
        with teacher.sft_adapter.attached(teacher.unet):
            return teacher.denoise(x_start * teacher.scheduler.init_noise_sigma, z_lq, embeds, size, 0,
                                   tile_batch_size=z_lq.shape[0])
    return teacher.denoise(x_start * teacher.scheduler.init_noise_sigma, z_lq, embeds, size, 0,
                           tile_batch_size=z_lq.shape[0])


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ||a - b|| / ||b||."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)


@torch.no_grad()
def teacher_distance(pipeline: StableSRPipeline, teacher_data: str | os.PathLike, num_inference_steps: int,
                     batch_size: int = 8) -> torch.Tensor:
    """Per-sample relative L2 distance ``||student - teacher|| / ||teacher||`` between the latents `pipeline` samples
    in `num_inference_steps` steps and the teacher results of a [`~stablesr.cfw_data.generate_cfw_data`] folder, from
    the same start ``x_T`` (rebuilt from each sample's seed, see [`lq_start_latents`]). Runs the pipeline's own
    sampling loop (SFT attached, its scheduler); a stochastic multi-step scheduler draws its step noise from a
    generator seeded with the data seed."""
    dataset = TeacherDataset(teacher_data)
    if len(dataset) == 0:
        raise ValueError(f"{teacher_data} holds no finished teacher sample")
    data_seed = int(dataset.settings["seed"])
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_inference_steps)
    t_start = int(scheduler.timesteps[0])
    device = pipeline._execution_device
    embeds = pipeline.get_prompt_embeds(None, device, pipeline.unet.dtype)
    distances = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_teacher([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        gens = [torch.Generator().manual_seed(sample_seed(data_seed, int(i), "sample")) for i in batch["index"]]
        z_lq, x_start = lq_start_latents(pipeline.vae, batch["lq"].to(device), gens, scheduler, t_start)
        scheduler.set_timesteps(num_inference_steps, device=device)
        with pipeline.sft_adapter.attached(pipeline.unet):
            result = pipeline.denoise(x_start * scheduler.init_noise_sigma, z_lq, embeds, max(z_lq.shape[-2:]), 0,
                                      torch.Generator().manual_seed(data_seed), tile_batch_size=1)
        distances.append(relative_l2(result, batch["latents"].to(device)).cpu())
    return torch.cat(distances)


class TeacherDataset(torch.utils.data.Dataset):
    """A [`~stablesr.cfw_data.CFWDataset`] of teacher results plus each sample's index (its seeds)."""

    def __init__(self, root: str | os.PathLike):
        self.data = CFWDataset(root)
        self.settings = json.loads((Path(root) / METADATA_FILE).read_text())["settings"]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        return {"lq": item["lq"], "gt": item["gt"], "latents": item["latents"], "index": int(item["name"])}


def collate_teacher(items) -> dict:
    return {
        "lq": torch.stack([it["lq"] for it in items]),
        "gt": torch.stack([it["gt"] for it in items]),
        "latents": torch.stack([it["latents"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


# The student's LoRA reaches every layer that sees the noisy latent, as OSEDiff's does (attention, the resnets' first
# conv and shortcut, the transformer projections, the time embedding, conv_in/out), but not the resnets' conv2: SFT
# wraps those, and a LoRA inside the wrapper would not load into the stock UNet the pipeline attaches SFT to.
STUDENT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv_shortcut",
                        "time_emb_proj", "conv_in", "conv_out")


def add_lora(unet, rank: int, alpha: float | None, adapter_name: str = "default", targets=STUDENT_LORA_TARGETS):
    from peft import LoraConfig

    suffixes = tuple("." + t for t in targets)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
             and ".sft." not in n and ".base_layer" not in n and (n in targets or n.endswith(suffixes))]
    if not names:
        raise ValueError(f"no LoRA target module found in the UNet among {targets}")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=names), adapter_name=adapter_name)


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Distil; returns ``{"global_step", "losses"}`` (per-step total losses of this process's run)."""
    accelerator, output_dir = start_training(args, SHARDING_UNSUPPORTED)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 2. Teacher (frozen) and student (copies of its encoder/SFT + a UNet LoRA) ------------------------------------
    args.from_scratch = False
    parts = train_sft.load_components(args)
    teacher_config = parts.scheduler.config
    prediction_type = teacher_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    scheduler = student_scheduler(teacher_config)
    scheduler.set_timesteps(args.student_steps)
    student_timesteps = scheduler.timesteps.clone()
    t_start = int(student_timesteps[0])
    need_teacher = bool(args.train_data_config) or args.dmd_weight > 0
    teacher = None
    if need_teacher:
        teacher = StableSRPipeline(
            vae=parts.vae, unet=copy.deepcopy(parts.unet), time_aware_encoder=copy.deepcopy(parts.time_aware_encoder),
            sft_adapter=copy.deepcopy(parts.sft_adapter), scheduler=deterministic_scheduler(args.teacher_scheduler, teacher_config),
            prompt_embedding=parts.prompt_embedding,
        )
        teacher.set_progress_bar_config(disable=True)
        for module in (teacher.unet, teacher.time_aware_encoder, teacher.sft_adapter):
            module.requires_grad_(False).eval().to(device, dtype=weight_dtype)
        teacher.sft_adapter.attach(teacher.unet)  # for good: the fake-score LoRA (DMD) is added after it

    vae, unet, encoder, sft_adapter = parts.vae, parts.unet, parts.time_aware_encoder, parts.sft_adapter
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    parts.prompt_embedding.requires_grad_(False)
    encoder.requires_grad_(True)
    sft_adapter.requires_grad_(True)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    encoder.to(device)
    sft_adapter.to(device)
    sft_adapter.attach(unet)
    if args.full_unet:
        unet.requires_grad_(True)
    elif args.lora_rank:
        add_lora(unet, args.lora_rank, args.lora_alpha)
    cast_training_params([unet, encoder], dtype=torch.float32)
    trainable = [p for p in list(encoder.parameters()) + list(unet.parameters()) if p.requires_grad]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        encoder.enable_gradient_checkpointing()
        if args.l2_weight or args.lpips_weight:
            vae.enable_gradient_checkpointing()
    parts.prompt_embedding.to(device)
    unet_part = " + UNet" if args.full_unet else " + LoRA" if args.lora_rank else ""
    logger.info(f"trainable parameters: {sum(p.numel() for p in trainable) / 1e6:.2f}M (encoder + SFT{unet_part}); "
                f"student timesteps {student_timesteps.tolist()}")

    fake_unet = fake_module = fake_params = fake_optimizer = None
    if args.dmd_weight:
        # The fake score: a frozen copy of the teacher UNet (with the teacher's SFT/encoder) plus its own LoRA.
        fake_unet = fake_module = teacher.unet
        add_lora(fake_unet, args.fake_lora_rank, None, adapter_name="fake")
        cast_training_params([fake_unet], dtype=torch.float32)
        fake_params = [p for p in fake_unet.parameters() if p.requires_grad]
        fake_optimizer = torch.optim.AdamW(fake_params, lr=args.fake_learning_rate or args.learning_rate,
                                           betas=(args.adam_beta1, args.adam_beta2),
                                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    perceptual = None
    if args.lpips_weight:
        from stablesr.losses import build_perceptual_loss

        perceptual = build_perceptual_loss(args.perceptual_net, args.lpips_weights).to(device).eval()
        perceptual.requires_grad_(False)

    # 3. Checkpoint hooks: only the trainable parts (encoder, SFT, LoRAs, or the whole UNet) ----------------------------
    def save_unet_parts(model, folder):
        if model is fake_module:
            train_sft.save_lora(model, os.path.join(folder, "fake_lora"), adapter_name="fake")
            return
        sft_adapter.save_pretrained(os.path.join(folder, "sft_adapter"))
        if args.lora_rank:
            train_sft.save_lora(model, os.path.join(folder, "unet_lora"))
        if args.full_unet:  # the stock UNet's weights (the SFT layers are saved above)
            sft_adapter.detach(model)
            try:
                model.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
            finally:
                sft_adapter.attach(model)

    def load_unet_parts(model, folder):
        if model is fake_module:
            _load_named_lora(model, os.path.join(folder, "fake_lora"), "fake")
            return
        sft_adapter.load_state_dict(SFTAdapter.from_pretrained(os.path.join(folder, "sft_adapter")).state_dict())
        if args.lora_rank:
            train_sft.load_lora(model, os.path.join(folder, "unet_lora"))
        if args.full_unet:
            from safetensors.torch import load_file

            sft_adapter.detach(model)
            try:  # in place, so the optimizer keeps pointing at the same parameters
                model.load_state_dict(load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")))
            finally:
                sft_adapter.attach(model)

    def load_encoder(model, folder):
        model.load_state_dict(TimeAwareEncoder.from_pretrained(os.path.join(folder, "time_aware_encoder")).state_dict())

    register_checkpoint_hooks(
        accelerator,
        savers={TimeAwareEncoder: lambda m, d: m.save_pretrained(os.path.join(d, "time_aware_encoder")),
                UNet2DConditionModel: save_unet_parts},
        loaders={TimeAwareEncoder: load_encoder, UNet2DConditionModel: load_unet_parts},
    )

    # 4. Optimizer, data --------------------------------------------------------------------------------------------
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    degradation = None
    if args.teacher_data:
        dataset = TeacherDataset(args.teacher_data)
        data_seed = int(dataset.settings["seed"])
        collate = collate_teacher
    else:
        config = (DegradationConfig.from_yaml(args.degradation_config) if args.degradation_config
                  else DegradationConfig())
        config.gt_size = None
        degradation = RealESRGANDegradation(config)
        dataset = build_dataset(load_yaml(args.train_data_config), gt_size=args.resolution, seed=args.seed)
        collate = collate_samples
    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        if args.max_train_steps is None:
            raise ValueError("streaming (shards) data has no epoch length: set --max_train_steps")
        dataset.rank, dataset.world_size = accelerator.process_index, accelerator.num_processes
    train_dataloader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=not streaming,
                                  num_workers=args.dataloader_num_workers, collate_fn=collate, drop_last=True)

    num_batches = None if streaming else math.ceil(len(dataset) / accelerator.num_processes / args.train_batch_size)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(num_batches / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    prepared = [unet, encoder, optimizer, lr_scheduler] + ([] if streaming else [train_dataloader])
    if fake_unet is not None:
        prepared += [fake_unet, fake_optimizer]
    prepared = accelerator.prepare(*prepared)
    unet, encoder, optimizer, lr_scheduler = prepared[:4]
    rest = list(prepared[4:])
    if not streaming:
        train_dataloader = rest.pop(0)
    if fake_unet is not None:
        fake_unet, fake_optimizer = rest
        teacher.unet = fake_unet  # the same module: real score = adapters off, fake score = "fake" adapter on
    updates_per_epoch = None
    if not streaming:
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        if updates_per_epoch == 0:
            raise ValueError(f"the dataset ({len(dataset)} samples) is smaller than one global batch")
    num_train_epochs = 1 if streaming else math.ceil(args.max_train_steps / updates_per_epoch)

    train_state = TrainState(fingerprint={
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "dataset_length": None if streaming else len(dataset),
    })
    accelerator.register_for_checkpointing(train_state)
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    logger.info(f"distilling: {'streaming' if streaming else len(dataset)} samples, "
                f"{args.max_train_steps} optimizer steps, global batch "
                f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}")

    # 5. Resume ----------------------------------------------------------------------------------------------------
    global_step, first_epoch, resume_batches = 0, 0, 0
    resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"no checkpoint in {output_dir}; starting a new training run")
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = train_state.global_step
        if streaming:
            resume_batches = global_step * args.gradient_accumulation_steps
        else:
            first_epoch = global_step // updates_per_epoch
            resume_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    # 6. The loss ----------------------------------------------------------------------------------------------------
    rank, world = accelerator.process_index, accelerator.num_processes
    prompt_embeds = parts.prompt_embedding().to(device, dtype=weight_dtype)
    scaling = vae.config.scaling_factor
    timestep_table = student_timesteps.to(device)

    def student_x0(x_t, t, z_lq):
        features = encoder(z_lq, t).features
        sft_adapter.set_condition(features)
        out = unet(x_t.to(weight_dtype), t, encoder_hidden_states=prompt_embeds.expand(x_t.shape[0], -1, -1)).sample
        return scheduler.predict_original_sample(out.float(), t, x_t.float())

    def batch_inputs(batch, epoch, batch_index, gens):
        """(gt in [-1, 1], z_lq, x_T, teacher latents) of a batch."""
        if args.teacher_data:
            sample_gens = [torch.Generator().manual_seed(sample_seed(data_seed, int(i), "sample"))
                           for i in batch["index"]]
            lq = batch["lq"].to(device)
            with torch.no_grad():
                z_lq, x_start = lq_start_latents(vae, lq, sample_gens, scheduler, t_start)
            return batch["gt"].to(device).float(), z_lq, x_start, batch["latents"].to(device).float()
        with torch.no_grad():
            inputs = train_sft.synthesize_batch(
                batch, degradation, make_generator(args.seed, "degradation", epoch, batch_index, rank), vae, gens,
                device,
            )
            start_noise = per_sample_randn(gens, inputs.z_lq.shape[1:], device)
            t = torch.full((inputs.z_lq.shape[0],), t_start, dtype=torch.long, device=device)
            x_start = scheduler.add_noise(inputs.z_lq, start_noise, t)
            if fake_module is not None:  # the teacher is the real score: its UNet without the fake-score LoRA
                fake_module.disable_adapters()
            try:
                target = teacher_results(teacher, x_start, inputs.z_lq, args.teacher_steps).float()
            finally:
                if fake_module is not None:
                    fake_module.enable_adapters()
        return inputs.target * 2 - 1, inputs.z_lq, x_start, target

    def compute_losses(batch, epoch: int, batch_index: int) -> dict[str, torch.Tensor]:
        b = batch["gt"].shape[0]
        positions = [(batch_index * world + rank) * b + i for i in range(b)]
        gens = sample_generators(args.seed, "distill", epoch, positions=positions)
        gt, z_lq, x_start, target = batch_inputs(batch, epoch, batch_index, gens)
        # Which of the student's timesteps each sample trains (all at t_start for a 1-step student).
        with torch.no_grad():
            index = per_sample_randint(gens, 0, len(timestep_table), device)
            t = timestep_table[index]
            renoise = per_sample_randn(gens, z_lq.shape[1:], device)
            later = scheduler.add_noise(target, renoise, t)
            x_t = torch.where((index == 0).view(-1, 1, 1, 1), x_start, later)
        x0 = student_x0(x_t, t, z_lq)
        losses = {}
        if args.traj_weight:
            losses["traj"] = F.mse_loss(x0, target)
        if args.l2_weight or args.lpips_weight:
            image = vae.decode((x0 / scaling).to(weight_dtype)).sample.float()
            if args.l2_weight:
                losses["l2"] = F.mse_loss(image, gt)
            if args.lpips_weight:
                losses["lpips"] = perceptual(image, gt).mean()
        if args.dmd_weight:
            losses["dmd"] = dmd_loss(x0, z_lq, gens)
        total = sum(getattr(args, f"{name}_weight") * value for name, value in losses.items())
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}, "_x0": x0.detach(), "_z_lq": z_lq,
                "_gens": gens}

    def score(x_t, t, z_lq, fake: bool):
        """x0 of the teacher (real score) or of its fake-score LoRA at (x_t, t)."""
        model = accelerator.unwrap_model(fake_unet)
        if fake:
            model.enable_adapters()
            model.set_adapter("fake")
        else:
            model.disable_adapters()
        try:
            teacher.sft_adapter.set_condition(teacher.time_aware_encoder(z_lq.to(weight_dtype), t).features)
            out = fake_unet(x_t.to(weight_dtype), t,
                            encoder_hidden_states=prompt_embeds.expand(x_t.shape[0], -1, -1)).sample
        finally:
            model.enable_adapters()
        return out.float(), x0_at(out.float(), t, x_t.float())

    acp = scheduler.alphas_cumprod.to(device)

    def x0_at(out, t, x_t):
        """x0 from the model output at any training timestep (the 1000-step schedule; DMD's t are not the
        student's)."""
        a = acp[t].view(-1, 1, 1, 1)
        if prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out

    def dmd_t(gens):
        low, high = args.dmd_timestep_range
        return per_sample_randint(gens, low, high + 1, device)

    def dmd_loss(x0, z_lq, gens):
        """DMD's surrogate: its gradient wrt x0 is (x0_fake - x0_real) / mean|x0 - x0_real|."""
        with torch.no_grad():
            t = dmd_t(gens)
            noisy = scheduler.add_noise(x0.detach(), per_sample_randn(gens, x0.shape[1:], device), t)
            _, real = score(noisy, t, z_lq, fake=False)
            _, fake = score(noisy, t, z_lq, fake=True)
            norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((fake - real) / norm)
        return 0.5 * F.mse_loss(x0, (x0 - grad).detach(), reduction="mean")

    def fake_score_step(x0, z_lq, gens):
        """One diffusion-loss step of the fake-score LoRA on the student's (detached) outputs."""
        t = dmd_t(gens)
        noise = per_sample_randn(gens, x0.shape[1:], device)
        noisy = scheduler.add_noise(x0, noise, t)
        out, _ = score(noisy, t, z_lq, fake=True)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(out, target)
        accelerator.backward(loss)
        fake_optimizer.step()
        fake_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # 7. Training loop ------------------------------------------------------------------------------------------------
    history: list[float] = []
    if args.validation_teacher_data and global_step == 0 and accelerator.is_main_process:
        measure_teacher_distance(args, accelerator, parts, scheduler, unet, encoder, 0)  # the undistilled student
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    unet.train()
    encoder.train()
    logs: dict[str, float] = {}
    done = global_step >= args.max_train_steps
    for epoch in range(first_epoch, num_train_epochs):
        if done:
            break
        skip = resume_batches if epoch == first_epoch else 0
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if streaming:
            dataset.set_resume(skip, args.train_batch_size)
            loader = train_dataloader
        else:
            train_dataloader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for offset, batch in enumerate(loader):
            batch_index = skip + offset
            if streaming:
                batch = send_to_device(batch, device)
            with accelerator.accumulate(unet, encoder):
                out = compute_losses(batch, epoch, batch_index)
                for key, value in out.items():
                    if not key.startswith("_"):
                        gathered = accelerator.gather(value.detach().float().reshape(1)).mean().item()
                        logs[key] = logs.get(key, 0.0) + gathered / args.gradient_accumulation_steps
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and args.max_grad_norm and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if fake_optimizer is not None:
                logs["fake"] = logs.get("fake", 0.0) + fake_score_step(out["_x0"], out["_z_lq"], out["_gens"]).item()

            if accelerator.sync_gradients:
                global_step += 1
                train_state.global_step = global_step
                progress_bar.update(1)
                history.append(logs["loss"])
                accelerator.log({**logs, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}")
                logs = {}
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    if args.validation_images:
                        validate(args, accelerator, parts, scheduler, unet, encoder, global_step)
                    if args.validation_teacher_data and global_step < args.max_train_steps:
                        measure_teacher_distance(args, accelerator, parts, scheduler, unet, encoder, global_step)
                if global_step >= args.max_train_steps:
                    done = True
                    break
    progress_bar.close()
    if args.validation_teacher_data and accelerator.is_main_process:
        measure_teacher_distance(args, accelerator, parts, scheduler, unet, encoder, global_step)

    # 8. Save the student pipeline -----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_student(args, accelerator.unwrap_model(unet), accelerator.unwrap_model(encoder), sft_adapter, scheduler,
                     output_dir)
    accelerator.end_training()
    return {"global_step": global_step, "losses": history}


def _load_named_lora(unet, folder: str, adapter_name: str) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, LORA_WEIGHT_NAME))
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)


def _student_pipeline(args, unet, encoder, sft_adapter, scheduler) -> tuple[StableSRPipeline, object]:
    """A pipeline of the starting folder's stock parts with the student's encoder/SFT/scheduler (CPU, float32), and
    the starting folder's UNet (the caller adds the LoRA or saves it beside)."""
    base = train_sft.load_components(args, with_trainable=False)
    pipeline = StableSRPipeline(
        vae=base.vae,
        unet=base.unet,
        time_aware_encoder=copy.deepcopy(encoder).to("cpu", torch.float32),
        sft_adapter=copy.deepcopy(sft_adapter).to("cpu", torch.float32),
        scheduler=StableSRDDPMScheduler.from_config(scheduler.config),
        cfw_adapter=base.cfw_adapter,
        prompt_embedding=base.prompt_embedding,
        default_num_inference_steps=args.student_steps,
    )
    return pipeline, base


def save_student(args, unet, encoder, sft_adapter, scheduler, output_dir: Path) -> None:
    """The student as a StableSRPipeline folder: stock UNet + ``pytorch_lora_weights.safetensors`` (or, with
    ``--merge_lora``, the UNet with the LoRA merged), the student's encoder/SFT, its scheduler and default steps."""
    sft_adapter.detach(unet)
    pipeline, _ = _student_pipeline(args, unet, encoder, sft_adapter, scheduler)
    if args.full_unet:
        pipeline.unet.load_state_dict(unet.state_dict())
    if args.lora_rank and args.merge_lora:
        # Through the LoRA file, as StableSRPipeline.from_pretrained loads it, then merged into the weights.
        import tempfile

        with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
            train_sft.save_lora(unet, tmp)
            load_unet_lora(pipeline.unet, Path(tmp) / LORA_WEIGHT_NAME)
        pipeline.unet.fuse_lora(lora_scale=1.0)
        pipeline.unet.unload_lora()
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    if args.lora_rank and not args.merge_lora:
        train_sft.save_lora(unet, output_dir)
    elif (output_dir / LORA_WEIGHT_NAME).exists():
        (output_dir / LORA_WEIGHT_NAME).unlink()  # a LoRA of an earlier run in this folder would be loaded on top
    with open(output_dir / "training_args.json", "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in vars(args).items()}, f, indent=2, default=str)
    logger.info(f"saved the {args.student_steps}-step student to {output_dir}")


@contextlib.contextmanager
def _current_student(args, accelerator, parts, scheduler, unet, encoder):
    """The student as it is now, as a StableSRPipeline sharing the training modules (eval mode, SFT moved from the
    training UNet to the pipeline's attach/detach); training state restored on exit."""
    unet_u, encoder_u = accelerator.unwrap_model(unet), accelerator.unwrap_model(encoder)
    sft_adapter = parts.sft_adapter
    sft_adapter.detach(unet_u)
    was_training = (unet_u.training, encoder_u.training)
    unet_u.eval(), encoder_u.eval()
    try:
        pipe = StableSRPipeline(vae=parts.vae, unet=unet_u, time_aware_encoder=encoder_u, sft_adapter=sft_adapter,
                                scheduler=copy.deepcopy(scheduler), cfw_adapter=parts.cfw_adapter,
                                prompt_embedding=parts.prompt_embedding, default_num_inference_steps=args.student_steps)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            yield pipe
    finally:
        sft_adapter.attach(unet_u)
        unet_u.train(was_training[0]), encoder_u.train(was_training[1])


def validate(args, accelerator, parts, scheduler, unet, encoder, global_step: int) -> None:
    """Restore the validation images with the current student and save them under ``validation/step-N``."""
    from stablesr.image_io import load_image

    folder = Path(args.output_dir) / "validation" / f"step-{global_step}"
    folder.mkdir(parents=True, exist_ok=True)
    with _current_student(args, accelerator, parts, scheduler, unet, encoder) as pipe:
        for path in args.validation_images:
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            with accelerator.autocast():
                image = pipe(load_image(path).rgb, num_inference_steps=args.validation_num_inference_steps,
                             generator=generator).images[0]
            image.save(folder / f"{Path(path).stem}.png")


def measure_teacher_distance(args, accelerator, parts, scheduler, unet, encoder, global_step: int) -> float:
    """[`teacher_distance`] of the current student on ``--validation_teacher_data``: logged, printed and recorded in
    ``teacher_distance.json`` (one entry per optimizer step; earlier entries of a resumed run are kept)."""
    with _current_student(args, accelerator, parts, scheduler, unet, encoder) as pipe, accelerator.autocast():
        distances = teacher_distance(pipe, args.validation_teacher_data, args.student_steps)
    mean = distances.mean().item()
    accelerator.log({"val/teacher_rel_l2": mean}, step=global_step)
    logger.info(f"step {global_step}: mean relative L2 to the held-out teacher results {mean:.4f} "
                f"({len(distances)} samples)")
    path = Path(args.output_dir) / "teacher_distance.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(teacher_data=str(args.validation_teacher_data), num_inference_steps=args.student_steps)
    record.setdefault("steps", {})[str(global_step)] = {"mean": mean, "per_sample": distances.tolist()}
    atomic_write_text(path, json.dumps(record, indent=2))
    return mean


if __name__ == "__main__":
    main(parse_args())
