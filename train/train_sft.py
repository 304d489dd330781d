#!/usr/bin/env python
"""StableSR stage 1: train the time-aware encoder + SFT layers on a frozen Stable Diffusion UNet.

Shape of diffusers' ``examples/controlnet/train_controlnet.py``, trimmed; recipe of IceClear/StableSR
``configs/stableSRNew/v2-finetune_text_T_512.yaml`` + ``ldm/models/diffusion/ddpm.py`` (``get_input``, ``p_losses``):

    gt crop (USM) --Real-ESRGAN degradation--> lq --bicubic x scale, clamp--> VAE.sample * s = z_lq (clean)
    gt           --------------------------------------------------------> VAE.sample * s = z_gt
    t ~ U[0, 999], x_t = q_sample(z_gt, noise, t)
    loss = MSE(unet_with_sft(x_t, t, "" embedding | encoder(z_lq, t)), eps or v)

Only the encoder and the SFT layers (and optional LoRA on the UNet attention, beyond the official recipe) train; the
UNet, VAE and prompt embedding are frozen. Paired (real LQ) data skips the synthetic degradation.

Launch::

    accelerate launch --config_file configs/accelerate/single_gpu.yaml train/train_sft.py \
        --config configs/train_sft_24gb.yaml --pretrained_model_name_or_path ./stablesr-converted \
        --train_data_config my_data.yaml --output_dir ./stablesr-sft

Every flag can be set in the ``--config`` YAML (keys are flag names without dashes); command-line flags override it.
The output folder is a [`StableSRPipeline`] (stock UNet/VAE, trained encoder/SFT); with ``--lora_rank`` the LoRA
weights are in ``pytorch_lora_weights.safetensors`` beside it, loaded with
``pipe.unet.load_lora_adapter(output_dir, weight_name="pytorch_lora_weights.safetensors", prefix="unet")``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import send_to_device
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from stablesr.data import build_dataset, collate_samples
from stablesr.degradation import DegradationConfig, RealESRGANDegradation, usm_sharp
from stablesr.image_io import load_image
from stablesr.models.prompt_embedding import PromptEmbedding
from stablesr.models.sft import SFTAdapter
from stablesr.models.time_aware_encoder import TimeAwareEncoder
from stablesr.pipelines.pipeline_stablesr import StableSRPipeline
from stablesr.schedulers import StableSRDDPMScheduler
from stablesr.training_utils import (
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

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# Why FSDP/DeepSpeed are refused at start-up (each found with FSDP forced on for 2 gloo processes, accelerate 1.15 /
# torch 2.13; none of them depends on the device): the UNet and the encoder are prepared as two models sharing one
# optimizer (accelerate's FSDP checkpoint pairs optimizer i with model i -> KeyError in FSDP.optim_state_dict; FSDP2
# and DeepSpeed take one model only); the checkpoint hooks, the final save, EMA and validation read the encoder/SFT
# weights through their modules, which FSDP(use_orig_params) leaves holding flattened local shards (the saved
# pipeline does not load); clip_grad_norm_ of the trainable subset computes a per-shard norm; a bf16 frozen UNet and
# float32 SFT layers cannot share an FSDP1 flat parameter.
SHARDING_UNSUPPORTED = (
    "the UNet and the time-aware encoder are two prepared models sharing one optimizer, and the checkpoint hooks "
    "and the final save read the trainable encoder/SFT weights through their (FSDP-sharded) modules."
)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="StableSR stage 1: time-aware encoder + SFT on a frozen SD UNet.")
    parser.add_argument("--config", type=str, default=None, help="YAML of flag values (keys = flag names); CLI wins.")
    # model
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="A StableSRPipeline folder (converted official weights or an earlier run), or with "
                             "--from_scratch a stock Stable Diffusion 2.x folder (vae, unet, scheduler, text_encoder).")
    parser.add_argument("--from_scratch", action="store_true",
                        help="Start from a stock SD folder with a fresh encoder (official init) and fresh SFT layers.")
    parser.add_argument("--time_aware_encoder_config", type=str, default=None,
                        help="With --from_scratch: a TimeAwareEncoder config.json (default: the official 52M one).")
    parser.add_argument("--lora_rank", type=int, default=0, help="Also train LoRA of this rank on the UNet attention "
                        "(beyond the official recipe); 0 = off.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    # data
    parser.add_argument("--train_data_config", type=str, default=None, help="YAML of data sources (configs/data_example.yaml).")
    parser.add_argument("--degradation_config", type=str, default=None,
                        help="Degradation table YAML (default: StableSR 512, configs/degradation/stablesr.yaml).")
    parser.add_argument("--resolution", type=int, default=512, help="GT crop side in pixels (512 official).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # timesteps and restore defaults
    parser.add_argument("--train_timesteps", type=str, default="uniform",
                        help='Timesteps t of the training loss: "uniform" = all of [0, num_train_timesteps) (official), '
                             '"respaced:N" = only those the official respaced DDPM visits at N steps (a few-step base '
                             'such as SD-Turbo at 4 steps: 999,666,333,0), or a comma-separated list.')
    parser.add_argument("--default_num_inference_steps", type=int, default=None,
                        help="Steps stored in the output folder for restoring (default: the starting folder's, or 200 "
                             "with --from_scratch); 4 for a turbo base.")
    add_training_arguments(parser, output_dir="stablesr-sft", tracker_project_name="stablesr-sft")
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "train_sft.py")

    # Validation
    if not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required (a StableSRPipeline folder, or an SD folder "
                         "with --from_scratch)")
    if not args.train_data_config:
        raise ValueError("--train_data_config is required (a YAML of data sources, see configs/data_example.yaml)")
    if args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise ValueError("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    if args.lora_rank < 0:
        raise ValueError(f"--lora_rank must be >= 0, got {args.lora_rank}")
    training_timesteps(args.train_timesteps, 1000)  # raises on a malformed value
    if args.default_num_inference_steps is not None and args.default_num_inference_steps < 1:
        raise ValueError(f"--default_num_inference_steps must be >= 1, got {args.default_num_inference_steps}")
    for path in args.validation_images or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--validation_images: {path} does not exist")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        resolve_resume_path(args.output_dir, args.resume_from_checkpoint)  # raises when missing
    if args.report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ImportError("--report_to tensorboard needs `pip install tensorboard` (or pass --report_to none)")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Components:
    """The float32 parts of the starting point (see [`load_components`]).

    ``time_aware_encoder`` and ``sft_adapter`` are `None` only when loaded with ``with_trainable=False`` from a stock
    SD folder; ``cfw_adapter`` is `None` for a stock SD folder.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    time_aware_encoder: TimeAwareEncoder | None
    sft_adapter: SFTAdapter | None
    scheduler: StableSRDDPMScheduler
    prompt_embedding: PromptEmbedding
    cfw_adapter: Any | None
    default_num_inference_steps: int


def load_components(args, with_trainable: bool = True) -> Components:
    """The float32 parts of the starting point: vae, unet, encoder, sft_adapter, scheduler, prompt_embedding, cfw.

    ``with_trainable=False`` skips building fresh encoder/SFT layers (``--from_scratch``), for the final save."""
    path = args.pretrained_model_name_or_path
    if not args.from_scratch:
        pipe = StableSRPipeline.from_pretrained(path, text_encoder=None, tokenizer=None)
        return Components(
            vae=pipe.vae,
            unet=pipe.unet,
            time_aware_encoder=pipe.time_aware_encoder,
            sft_adapter=pipe.sft_adapter,
            scheduler=pipe.scheduler,
            prompt_embedding=pipe.prompt_embedding,
            cfw_adapter=pipe.cfw_adapter,
            default_num_inference_steps=pipe.config.default_num_inference_steps,
        )
    from transformers import CLIPTextModel

    from stablesr.conversion import empty_prompt_embedding

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    sd_sched = StableSRDDPMScheduler.load_config(path, subfolder="scheduler")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    scheduler = StableSRDDPMScheduler(**{k: sd_sched[k] for k in keys if k in sd_sched})
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    with torch.no_grad():
        prompt_embedding = PromptEmbedding.from_tensor(empty_prompt_embedding(text_encoder))
    del text_encoder
    encoder = sft_adapter = None
    if not with_trainable:
        pass
    elif args.time_aware_encoder_config:
        encoder = TimeAwareEncoder.from_config(TimeAwareEncoder.load_config(args.time_aware_encoder_config))
    else:
        encoder = TimeAwareEncoder()  # official EncoderUNetModelWT configuration, PyTorch default init
    if encoder is not None:
        sft_adapter = SFTAdapter.from_unet(unet, cond_channels=encoder.config.out_channels)
    return Components(
        vae=vae,
        unet=unet,
        time_aware_encoder=encoder,
        sft_adapter=sft_adapter,
        scheduler=scheduler,
        prompt_embedding=prompt_embedding,
        cfw_adapter=None,
        default_num_inference_steps=200,
    )


def training_timesteps(spec: str, num_train_timesteps: int) -> torch.Tensor | None:
    """The timesteps ``--train_timesteps`` allows, ascending, or None for "uniform" (every timestep)."""
    from stablesr.schedulers import space_timesteps

    spec = str(spec).strip()
    if spec == "uniform":
        return None
    try:
        if spec.startswith("respaced:"):
            values = space_timesteps(num_train_timesteps, [int(spec.split(":", 1)[1])])
        else:
            values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0 or max(values) >= num_train_timesteps:
        raise ValueError(f'--train_timesteps must be "uniform", "respaced:N" or a comma-separated list of integers '
                         f"in [0, {num_train_timesteps}), got {spec!r}")
    return torch.tensor(sorted(set(values)), dtype=torch.long)


def vae_encode(vae: AutoencoderKL, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scaled latent ``posterior.sample() * scaling_factor`` of (B, 3, H, W) images in [0, 1] (official
    ``get_first_stage_encoding``), with the posterior noise given explicitly."""
    dist = vae.encode((images * 2 - 1).clamp(-1, 1).to(vae.dtype)).latent_dist
    latents = dist.mean.float() + dist.std.float() * noise
    # The VAE returns channels-last strided latents; GroupNorm backward on channels-last CPU tensors crashes
    # (torch 2.13), and a plain layout is what the UNet/encoder expect anyway.
    return (latents * vae.config.scaling_factor).contiguous()


def latent_shape(vae: AutoencoderKL, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return batch, vae.config.latent_channels, height // factor, width // factor


@dataclass
class SynthesizedBatch:
    """What [`synthesize_batch`] makes of a training batch; all on the training device, batch size B.

    Attributes:
        target (`torch.Tensor`): (B, 3, H, W) in [0, 1], the image the model learns: the GT crop, USM-sharpened when
            the degradation config says so (official ``gt_usm``).
        lq_upsampled (`torch.Tensor`): (B, 3, H, W) in [0, 1], the LQ (synthesised, or the real one of a pair)
            bicubic-upsampled to the GT size; the target itself for a sample the degradation left clean.
        z_gt (`torch.Tensor`): (B, C, H/f, W/f) scaled latent of ``target``.
        z_lq (`torch.Tensor`): (B, C, H/f, W/f) scaled latent of ``lq_upsampled``.
    """

    target: torch.Tensor
    lq_upsampled: torch.Tensor
    z_gt: torch.Tensor
    z_lq: torch.Tensor


@torch.no_grad()
def synthesize_batch(
    batch: dict[str, torch.Tensor],
    degradation: RealESRGANDegradation,
    generator: torch.Generator,
    vae: AutoencoderKL,
    generators: list[torch.Generator],
    device: torch.device | str,
) -> SynthesizedBatch:
    """The model inputs of one batch of [`~stablesr.data.collate_samples`] (official ``get_input``).

    HQ-only samples are degraded on the fly (one ``degradation`` call, drawing from ``generator``); paired samples
    keep their real LQ, and their GT is USM-sharpened like the degradation's target when its config uses USM. Both
    LQs are bicubic-upsampled to the GT size and clamped, then both images are VAE-encoded with posterior noise drawn
    from ``generators`` (one per sample: first the target's noise, then the LQ's; the caller draws the
    timesteps and diffusion noise from them next).
    """
    config = degradation.config
    gt = batch["gt"].to(device, torch.float32)
    has_lq = batch["has_lq"].to(device)
    b, _, height, width = gt.shape
    target = torch.empty_like(gt)
    lq_up = torch.empty_like(gt)
    synth = ~has_lq
    if synth.any():
        lq, gt_usm, replaced = degradation(gt[synth], generator, return_replaced=True)
        up = F.interpolate(lq.to(gt.dtype), size=(height, width), mode="bicubic", align_corners=False)
        # Official: a no-degradation (or NaN) sample is conditioned on the target itself, not a re-upsampled
        # downscale of it.
        target[synth] = gt_usm.to(gt.dtype)
        lq_up[synth] = torch.where(replaced.to(device).view(-1, 1, 1, 1), target[synth], up)
    if has_lq.any():
        real_gt = gt[has_lq]
        if config.use_usm:  # Real-ESRGAN's paired branch sharpens the GT the same way
            real_gt = usm_sharp(real_gt, config.usm_radius, config.usm_weight, config.usm_threshold)
        target[has_lq] = real_gt.to(gt.dtype)
        lq_up[has_lq] = F.interpolate(batch["lq"].to(device, torch.float32)[has_lq], size=(height, width),
                                      mode="bicubic", align_corners=False)
    lq_up = lq_up.clamp(0, 1)
    shape = latent_shape(vae, b, height, width)[1:]
    z_gt = vae_encode(vae, target, per_sample_randn(generators, shape, device))
    z_lq = vae_encode(vae, lq_up, per_sample_randn(generators, shape, device))
    return SynthesizedBatch(target=target, lq_upsampled=lq_up, z_gt=z_gt, z_lq=z_lq)


def save_lora(unet, output_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """The UNet's LoRA ``adapter_name`` as diffusers' ``pytorch_lora_weights.safetensors`` (``unet.`` prefix), with
    its peft config in the file's ``lora_adapter_metadata``, so ``load_lora_adapter`` rebuilds exactly the trained
    adapter (target modules, rank, alpha) instead of guessing it from the key names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    config = {}
    for key, value in unet.peft_config[adapter_name].to_dict().items():
        config[f"unet.{key}"] = sorted(value) if isinstance(value, set) else value
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str)}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_file({f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()},
              os.path.join(output_dir, LORA_WEIGHT_NAME), metadata=metadata)


def load_lora(unet, input_dir: str | os.PathLike) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(input_dir, LORA_WEIGHT_NAME))
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"unexpected LoRA keys in {input_dir}: {result.unexpected_keys[:5]}")


@torch.no_grad()
def log_validation(args, accelerator, parts: Components, upscale: float, unet, encoder, ema, trainable, global_step,
                   weight_dtype):
    """Restore the validation images with a StableSRPipeline built from the current (EMA) weights; log + save PNGs."""
    logger.info(f"running validation on {len(args.validation_images)} image(s)")
    unet_u, encoder_u = accelerator.unwrap_model(unet), accelerator.unwrap_model(encoder)
    sft_adapter = parts.sft_adapter
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    sft_adapter.detach(unet_u)  # the pipeline attaches it inside __call__
    was_training = (unet_u.training, encoder_u.training)
    unet_u.eval(), encoder_u.eval()
    images = []
    try:
        pipe = StableSRPipeline(
            vae=parts.vae,
            unet=unet_u,
            time_aware_encoder=encoder_u,
            sft_adapter=sft_adapter,
            scheduler=copy.deepcopy(parts.scheduler),
            cfw_adapter=parts.cfw_adapter,
            prompt_embedding=parts.prompt_embedding,
        )
        pipe.set_progress_bar_config(disable=True)
        for path in args.validation_images:
            lq = load_image(path).rgb
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            with accelerator.autocast():
                out = pipe(lq, upscale=upscale, num_inference_steps=args.validation_num_inference_steps,
                           generator=generator).images[0]
            images.append(out)
    finally:
        sft_adapter.attach(unet_u)
        unet_u.train(was_training[0]), encoder_u.train(was_training[1])
        if ema is not None:
            ema.restore(trainable)

    folder = Path(args.output_dir) / "validation" / f"step-{global_step}"
    folder.mkdir(parents=True, exist_ok=True)
    for path, image in zip(args.validation_images, images, strict=True):
        image.save(folder / f"{Path(path).stem}.png")
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, image in enumerate(images):
                tracker.writer.add_image(f"validation/{i}", np.asarray(image), global_step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=Path(p).name)
                                        for p, im in zip(args.validation_images, images, strict=True)]}, step=global_step)
    return images


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Train; returns ``{"global_step", "losses"}`` (the per-step training losses of this process's run)."""
    # 1. Accelerator, logging, seed -----------------------------------------------------------------------------
    accelerator, output_dir = start_training(args, SHARDING_UNSUPPORTED)

    # 2. Models ----------------------------------------------------------------------------------------------------
    parts = load_components(args)
    vae, unet, encoder, sft_adapter = parts.vae, parts.unet, parts.time_aware_encoder, parts.sft_adapter
    noise_scheduler = StableSRDDPMScheduler.from_config(parts.scheduler.config)  # official q_sample/get_v tables
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    multiple = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.resolution % multiple:
        raise ValueError(f"--resolution must be a multiple of {multiple} for this VAE/UNet, got {args.resolution}")

    # 3. Freeze, cast, attach (LoRA order: cast UNet -> attach -> cast_training_params(fp32) -> prepare) ----------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    parts.prompt_embedding.requires_grad_(False)
    encoder.requires_grad_(True)
    sft_adapter.requires_grad_(True)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    encoder.to(accelerator.device)  # built/loaded in float32 (checked below)
    sft_adapter.to(accelerator.device)
    sft_adapter.attach(unet)
    if args.lora_rank:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                    init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    cast_training_params([unet, encoder], dtype=torch.float32)
    trainable = [p for p in list(encoder.parameters()) + list(unet.parameters()) if p.requires_grad]
    wrong = {p.dtype for p in trainable if p.dtype != torch.float32}
    if wrong:
        raise RuntimeError(f"trainable parameters must be float32, found {wrong}")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        encoder.enable_gradient_checkpointing()
    if parts.cfw_adapter is not None:
        parts.cfw_adapter.requires_grad_(False).to(accelerator.device)
        if weight_dtype != torch.float32:
            parts.cfw_adapter.to(dtype=weight_dtype)
    parts.prompt_embedding.to(accelerator.device)
    num_params = sum(p.numel() for p in trainable)
    logger.info(f"trainable parameters: {num_params / 1e6:.2f}M (encoder + SFT{' + LoRA' if args.lora_rank else ''})")

    ema = None
    if args.use_ema:
        ema = EMAModel(trainable, decay=args.ema_decay)
        ema.to(accelerator.device)

    # 4. Checkpoint hooks: only the trainable parts are written (never the frozen UNet) ---------------------------------
    def save_unet_parts(model, folder):
        sft_adapter.save_pretrained(os.path.join(folder, "sft_adapter"))
        if args.lora_rank:
            save_lora(model, os.path.join(folder, "unet_lora"))

    def load_unet_parts(model, folder):
        loaded = SFTAdapter.from_pretrained(os.path.join(folder, "sft_adapter"))
        sft_adapter.load_state_dict(loaded.state_dict())
        if args.lora_rank:
            load_lora(model, os.path.join(folder, "unet_lora"))

    def load_encoder(model, folder):
        model.load_state_dict(TimeAwareEncoder.from_pretrained(os.path.join(folder, "time_aware_encoder")).state_dict())

    register_checkpoint_hooks(
        accelerator,
        savers={TimeAwareEncoder: lambda m, d: m.save_pretrained(os.path.join(d, "time_aware_encoder")),
                UNet2DConditionModel: save_unet_parts},
        loaders={TimeAwareEncoder: load_encoder, UNet2DConditionModel: load_unet_parts},
    )

    # 5. Optimizer ---------------------------------------------------------------------------------------------------
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # 6. Data and degradation --------------------------------------------------------------------------------------
    degradation_config = (DegradationConfig.from_yaml(args.degradation_config) if args.degradation_config
                          else DegradationConfig())
    if degradation_config.gt_size is not None and degradation_config.gt_size != args.resolution:
        # The dataset already crops to --resolution; the degradation's own paired crop would be redundant.
        degradation_config.gt_size = None
    if args.resolution % degradation_config.scale:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the degradation scale "
                         f"{degradation_config.scale}")
    degradation = RealESRGANDegradation(degradation_config)
    validation_upscale = args.validation_upscale or degradation_config.scale
    dataset = build_dataset(load_yaml(args.train_data_config), gt_size=args.resolution, seed=args.seed)
    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        if args.max_train_steps is None:
            raise ValueError("streaming (shards) data has no epoch length: set --max_train_steps")
        # The stream splits itself over ranks and workers, so it is not handed to accelerate (whose iterable
        # sharding would make every rank read everything).
        dataset.rank, dataset.world_size = accelerator.process_index, accelerator.num_processes
    train_dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=not streaming,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate_samples,
        drop_last=True,
    )

    # 7. Schedule, prepare -----------------------------------------------------------------------------------------
    num_batches = None if streaming else math.ceil(len(dataset) / accelerator.num_processes / args.train_batch_size)
    updates_per_epoch = None if streaming else math.ceil(num_batches / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    if streaming:
        unet, encoder, optimizer, lr_scheduler = accelerator.prepare(unet, encoder, optimizer, lr_scheduler)
    else:
        unet, encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, encoder, optimizer, train_dataloader, lr_scheduler
        )
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
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # 8. Trackers ----------------------------------------------------------------------------------------------------
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {'streaming' if streaming else len(dataset)}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")

    # 9. Resume ---------------------------------------------------------------------------------------------------
    global_step, first_epoch, resume_batches = 0, 0, 0
    resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"no checkpoint in {output_dir}; starting a new training run")
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        if ema is not None:
            ema.to(accelerator.device)
        global_step = train_state.global_step
        if streaming:
            resume_batches = global_step * args.gradient_accumulation_steps
        else:
            first_epoch = global_step // updates_per_epoch
            resume_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    # 10. Training loop ------------------------------------------------------------------------------------------------
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    prompt_embeds = parts.prompt_embedding().to(device, dtype=weight_dtype)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    allowed_timesteps = training_timesteps(args.train_timesteps, num_timesteps)
    if allowed_timesteps is not None:
        logger.info(f"training at {len(allowed_timesteps)} timestep(s): {allowed_timesteps.tolist()}")
        allowed_timesteps = allowed_timesteps.to(device)
    losses: list[float] = []
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    def compute_loss(batch, epoch: int, batch_index: int) -> torch.Tensor:
        b = batch["gt"].shape[0]
        # Per-sample draws (VAE posterior noise, timestep, diffusion noise) keyed by the sample's position in the
        # epoch's global stream (accelerate deals whole batches round-robin to the processes): independent of the
        # process count and accumulation split, and re-derived after a resume. The degradation draws per batch.
        positions = [(batch_index * world + rank) * b + i for i in range(b)]
        gens = sample_generators(args.seed, "sample", epoch, positions=positions)
        with torch.no_grad():
            inputs = synthesize_batch(
                batch, degradation, make_generator(args.seed, "degradation", epoch, batch_index, rank), vae, gens,
                device,
            )
            z_gt, z_lq = inputs.z_gt, inputs.z_lq
            shape = z_gt.shape[1:]
            if allowed_timesteps is None:
                timesteps = per_sample_randint(gens, 0, num_timesteps, device)
            else:  # one draw per sample either way
                timesteps = allowed_timesteps[per_sample_randint(gens, 0, len(allowed_timesteps), device)]
            noise = per_sample_randn(gens, shape, device)
            noisy = noise_scheduler.add_noise(z_gt, noise, timesteps)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(z_gt, noise, timesteps)
        features = encoder(z_lq, timesteps).features
        sft_adapter.set_condition(features)
        pred = unet(noisy.to(weight_dtype), timesteps, encoder_hidden_states=prompt_embeds.expand(b, -1, -1)).sample
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    unet.train()
    encoder.train()
    train_loss = 0.0
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
                loss = compute_loss(batch, epoch, batch_index)
                avg_loss = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                global_step += 1
                train_state.global_step = global_step
                progress_bar.update(1)
                if ema is not None:
                    ema.step(trainable)
                losses.append(train_loss)
                accelerator.log({"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                progress_bar.set_postfix(loss=f"{train_loss:.4f}")
                train_loss = 0.0
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if (args.validation_images and args.validation_steps
                        and global_step % args.validation_steps == 0 and accelerator.is_main_process):
                    log_validation(args, accelerator, parts, validation_upscale, unet, encoder, ema, trainable,
                                   global_step, weight_dtype)
                if global_step >= args.max_train_steps:
                    done = True
                    break
    progress_bar.close()
    if hasattr(dataset, "skip_summary"):
        logger.info(f"data: {dataset.skip_summary()}", main_process_only=False)

    # 11. Save the pipeline (stock UNet/VAE from the starting point + the trained encoder/SFT) ---------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet_u, encoder_u = accelerator.unwrap_model(unet), accelerator.unwrap_model(encoder)
        if ema is not None:
            ema.copy_to(trainable)
        sft_adapter.detach(unet_u)
        if args.lora_rank:
            save_lora(unet_u, output_dir)
        base = load_components(args, with_trainable=False)
        pipeline = StableSRPipeline(
            vae=base.vae,
            unet=base.unet,
            time_aware_encoder=copy.deepcopy(encoder_u).to("cpu"),  # float32 throughout training
            sft_adapter=copy.deepcopy(sft_adapter).to("cpu"),
            scheduler=base.scheduler,
            cfw_adapter=base.cfw_adapter,
            prompt_embedding=base.prompt_embedding,
            default_num_inference_steps=args.default_num_inference_steps or base.default_num_inference_steps,
        )
        pipeline.save_pretrained(output_dir, safe_serialization=True)
        with open(output_dir / "training_args.json", "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in vars(args).items()}, f, indent=2, default=str)
        logger.info(f"saved the fine-tuned StableSRPipeline to {output_dir}")
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses}


if __name__ == "__main__":
    main(parse_args())
