"""StableSRPipeline: real-world super-resolution with a frozen Stable Diffusion UNet steered by StableSR parts."""

import inspect
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .. import vae_tiling
from ..color import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX
from ..color import color_fix as apply_color_fix
from ..image_processor import (
    Canvas,
    alpha_from_tensor,
    alpha_to_tensor,
    as_rgb_alpha_list,
    attach_alpha,
    from_tensor,
    pad_to,
    to_tensor,
    working_canvas,
)
from ..models.cfw import CFWAdapter
from ..models.prompt_embedding import PromptEmbedding
from ..models.sft import SFTAdapter
from ..models.time_aware_encoder import TimeAwareEncoder
from ..schedulers import StableSRDDPMScheduler  # noqa: F401  (diffusers only loads components of imported modules)
from ..tiling import TileAccumulator, gaussian_tile_weights, tile_grid

logger = logging.get_logger(__name__)

STARTS = ("lq", "noise")


class NonFiniteOutputError(RuntimeError):
    """Sampling or decoding produced NaN/inf (a half-precision overflow, in practice): raised instead of writing a
    black image. The message names the stage, the dtype and the fix."""


def _check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(tensor).all()):
        fix = ("run in bf16 (--dtype bf16, GPUs with native bf16) or fp32 (--dtype fp32)"
               if dtype == torch.float16 else "run in fp32 (--dtype fp32)")
        raise NonFiniteOutputError(f"{what} produced NaN/inf values in {str(dtype).removeprefix('torch.')}: {fix}")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""File of a folder's UNet LoRA (diffusers' name; keys ``unet.<module>.lora_A/B.weight``)."""


def load_unet_lora(unet: UNet2DConditionModel, path: str | os.PathLike) -> None:
    """Load the LoRA file ``path`` (diffusers format, ``unet.`` prefix, as ``train_sft.save_lora`` writes it) into
    ``unet`` as its active adapter.

    Raises:
        ImportError: peft is not installed (it is a dependency of stablesr's training extras).
        ValueError: the file holds keys that match no UNet module.
    """
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(f"{path} is a UNet LoRA; loading it needs peft (`pip install peft`)") from None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        file_metadata = f.metadata() or {}
    if not keys or not all(k.startswith("unet.") and ".lora" in k for k in keys):
        raise ValueError(f"{path} is not a UNet LoRA file (expected diffusers LoRA keys 'unet.<module>.lora...')")
    stored = file_metadata.get("lora_adapter_metadata")
    if stored is None:  # a file without its config: diffusers infers it from the key names
        unet.load_lora_adapter(str(Path(path).parent), weight_name=Path(path).name, prefix="unet",
                               adapter_name="default")
        return
    # The trained adapter's own config (target modules, rank, alpha), as train_sft.save_lora writes it.
    import json

    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = {k.removeprefix("unet."): v for k, v in json.loads(stored).items() if k.startswith("unet.")}
    accepted = inspect.signature(LoraConfig.__init__).parameters
    unet.add_adapter(LoraConfig(**{k: v for k, v in config.items() if k in accepted}), adapter_name="default")
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in load_file(str(path)).items()})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: LoRA tensors {unexpected[:3]} match no module of the UNet")


def _batch_embeds(prompt_embeds: torch.Tensor, batch: int) -> torch.Tensor:
    """Prompt embeddings for a UNet batch made of whole copies of the image batch (tiles, CFG)."""
    if prompt_embeds.shape[0] == batch:
        return prompt_embeds
    if batch % prompt_embeds.shape[0]:
        raise ValueError(f"prompt_embeds batch {prompt_embeds.shape[0]} does not divide the UNet batch {batch}")
    return prompt_embeds.repeat(batch // prompt_embeds.shape[0], 1, 1)


@dataclass(frozen=True)
class RestorationCondition:
    """Everything needed to decode sampled latents of one image again (at another fidelity weight, say): tensors and
    sizes only, immutable (make a changed copy with `dataclasses.replace`).

    Args:
        lq_image: (1, 3, H, W) bicubic-upsampled and padded low-quality image in [-1, 1] (the CFW / color-fix input).
        work_size: (height, width) before padding.
        output_size: (height, width) of the final image (= round(upscale x input)).
        alpha: (1, 1, h, w) uint8 alpha channel of the input at its own size, or None; upscaled to the output size
            and attached to the decoded image.
        cfw_features: the CFW encoder features of ``lq_image`` (one per fusion level), computed in the same encoder
            pass as the LQ latent when the image fits one VAE tile; None otherwise (decoding recomputes them).
    """

    lq_image: torch.Tensor
    work_size: tuple[int, int]
    output_size: tuple[int, int]
    alpha: torch.Tensor | None = None
    cfw_features: tuple[torch.Tensor, ...] | None = None

    def to(self, device=None, dtype=None) -> "RestorationCondition":
        """A copy with the image tensors (and CFW features) moved; alpha stays uint8."""
        features = None
        if self.cfw_features is not None:
            features = tuple(f.to(device=device, dtype=dtype) for f in self.cfw_features)
        alpha = None if self.alpha is None else self.alpha.to(device=device)
        return replace(self, lq_image=self.lq_image.to(device=device, dtype=dtype), alpha=alpha,
                       cfw_features=features)


@dataclass
class StableSRPipelineOutput(BaseOutput):
    """
    Args:
        images: restored images (PIL list, numpy (B, H, W, C) in [0, 1], or torch (B, C, H, W) in [0, 1]); with
            ``output_type="latent"`` the final latents per image.
        latents: the final (scaled) latents of each image, for decoding again at other fidelity weights.
        conditions: the matching [`RestorationCondition`] of each image.
    """

    images: list | object
    latents: list[torch.Tensor] = field(default_factory=list)
    conditions: list[RestorationCondition] = field(default_factory=list)


class StableSRPipeline(DiffusionPipeline):
    r"""
    StableSR restoration pipeline.

    Args:
        vae ([`AutoencoderKL`]): the stock SD VAE (CFW fusion is attached at decode time only).
        unet ([`UNet2DConditionModel`]): the stock, frozen SD UNet (SFT layers are attached inside `__call__` only).
        time_aware_encoder ([`TimeAwareEncoder`]): maps (LQ latent, t) to one feature map per UNet level.
        sft_adapter ([`SFTAdapter`]): SFT layers for every UNet resnet.
        scheduler: any diffusers scheduler; the converted default is the official respaced DDPM.
        cfw_adapter ([`CFWAdapter`], *optional*): CFW fusion layers; without them decoding is the stock decoder.
        prompt_embedding ([`PromptEmbedding`], *optional*): the stored empty-prompt text embedding.
        text_encoder / tokenizer (*optional*): only needed for prompts other than the stored one.
        default_num_inference_steps (`int`): steps when the caller gives none (200 official, 4 for the turbo model).
    """

    # The time-aware encoder runs once per UNet call, so it is not in the chain (a chained model is offloaded each
    # time the next one runs: it would move every step); like ControlNet in diffusers it gets its own hook, as do
    # the adapters. The SFT and CFW layers live inside the UNet / VAE while they run and move with them.
    model_cpu_offload_seq = "text_encoder->unet->vae"
    # A buffer without parameters, which accelerate's offload hooks cannot handle; tiny, so it stays on the device.
    _exclude_from_cpu_offload = ["prompt_embedding"]
    _optional_components = ["cfw_adapter", "prompt_embedding", "text_encoder", "tokenizer"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        time_aware_encoder: TimeAwareEncoder,
        sft_adapter: SFTAdapter,
        scheduler: KarrasDiffusionSchedulers,
        cfw_adapter: CFWAdapter | None = None,
        prompt_embedding: PromptEmbedding | None = None,
        text_encoder=None,
        tokenizer=None,
        default_num_inference_steps: int = 200,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            unet=unet,
            time_aware_encoder=time_aware_encoder,
            sft_adapter=sft_adapter,
            scheduler=scheduler,
            cfw_adapter=cfw_adapter,
            prompt_embedding=prompt_embedding,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self.register_to_config(default_num_inference_steps=default_num_inference_steps)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """[`DiffusionPipeline.from_pretrained`], plus the UNet LoRA of a folder that carries one.

        A folder made by ``train/train_sft.py --lora_rank N`` or ``train/train_distill.py`` keeps the UNet stock and
        its LoRA weights in ``pytorch_lora_weights.safetensors`` beside ``model_index.json``; they are loaded into the
        UNet here (needs peft), so every caller (``stablesr restore``, the web UI, fidelity-curve) runs the model as
        trained. A folder saved with the LoRA merged has no such file.
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(str(pretrained_model_name_or_path))
        lora = folder / LORA_WEIGHT_NAME
        if folder.is_dir() and lora.is_file():
            load_unet_lora(pipe.unet, lora)
        return pipe

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Pixel size the UNet was trained at (512 or 768): the smallest short side we sample at."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def default_tile_size(self) -> int:
        """Latent tile of the aggregation sampler: the UNet's native latent size (64 for 512, 96 for 768)."""
        return int(self.unet.config.sample_size)

    # ------------------------------------------------------------------------------------------------ helpers
    def prepare_half_precision(self) -> None:
        """fp16 overflow guards, applied at the start of [`__call__`] and [`decode_latents`] (cheap; idempotent).

        float16 tops out at 65504, and SD 2.x overflows it in two known places (bf16 and fp32 need none of this):

        - attention scores: every diffusers ``Attention`` of an fp16 UNet / VAE gets ``upcast_attention`` (scores and
          softmax in float32, like the official ``ATTN_PRECISION=fp32``). It matters for processors that compute the
          scores themselves (classic, sliced attention); the default SDPA and xformers kernels accumulate them in
          float32 already, so it costs them nothing.
        - the VAE: an fp16 VAE whose config sets ``force_upcast`` (diffusers' default, as for the SD VAE) is cast to
          float32 with the CFW adapter, once (diffusers' rule for VAEs that overflow in fp16). Opt out with
          ``pipe.vae.register_to_config(force_upcast=False)``.

        A NaN/inf that still appears stops the run with [`NonFiniteOutputError`] instead of a black image.
        """
        from diffusers.models.attention_processor import Attention

        for model in (self.unet, self.vae):
            if model.dtype == torch.float16:
                for module in model.modules():
                    if isinstance(module, Attention):
                        module.upcast_attention = True
                        module.upcast_softmax = True
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", True):
            offloaded = [m for m in (self.vae, self.cfw_adapter) if m is not None and hasattr(m, "_hf_hook")]
            if any(p.device.type == "meta" for m in offloaded for p in m.parameters()):
                logger.warning("the fp16 VAE is sequentially offloaded and cannot be upcast now: upcast it before "
                               "enabling offload (stablesr.acceleration.enable_offload does)")
                return
            logger.info("fp16 VAE with force_upcast: running the VAE (and CFW) in float32 (fp16 overflows in it)")
            self.vae.to(dtype=torch.float32)
            if self.cfw_adapter is not None:
                self.cfw_adapter.to(dtype=torch.float32)

    def check_inputs(self, upscale, fidelity_weight, color_fix, start, tile_size, tile_overlap, num_inference_steps):
        if not (isinstance(upscale, (int, float)) and upscale > 0 and math.isfinite(upscale)):
            raise ValueError(f"upscale must be a positive number, got {upscale!r}")
        if not 0.0 <= float(fidelity_weight) <= 1.0:
            raise ValueError(f"fidelity_weight must be in [0, 1] (0 = realism, 1 = fidelity), got {fidelity_weight}")
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        if tile_size is not None and tile_size < 8:
            raise ValueError(f"tile_size is in latent pixels and must be >= 8, got {tile_size}")
        if tile_overlap is not None and tile_size is not None and not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be >= 0 and smaller than tile_size ({tile_size}), got {tile_overlap}")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")

    def get_prompt_embeds(self, prompt_embeds: torch.Tensor | None, device, dtype) -> torch.Tensor:
        if prompt_embeds is None:
            if self.prompt_embedding is None:
                raise ValueError(
                    "this pipeline has no stored prompt embedding: pass prompt_embeds (1, 77, D), the text encoder "
                    "output for the empty prompt"
                )
            prompt_embeds = self.prompt_embedding()
        return prompt_embeds.to(device=device, dtype=dtype)

    @property
    def canvas_multiple(self) -> int:
        """Pixel multiple the UNet accepts (VAE factor x UNet down-sampling: 64 for SD 2.x)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def working_canvas(self, height: int, width: int, upscale: float) -> Canvas:
        """Output, sampled and padded sizes for an input of ``height`` x ``width`` (see
        [`stablesr.image_processor.working_canvas`])."""
        return working_canvas((height, width), upscale, self.native_size, self.canvas_multiple)

    def prepare_condition(self, image: PIL.Image.Image, upscale: float,
                          alpha: PIL.Image.Image | None = None) -> RestorationCondition:
        """Bicubic upscale of the RGB ``image`` to its working canvas, padded to the UNet's multiple."""
        lq = to_tensor(image)
        h, w = lq.shape[-2:]
        canvas = self.working_canvas(h, w, upscale)
        work_h, work_w = canvas.work_size
        lq_up = F.interpolate(lq, size=(work_h, work_w), mode="bicubic", align_corners=False,
                              antialias=work_h < h or work_w < w).clamp(-1, 1)
        lq_up = pad_to(lq_up, *canvas.padded_size)
        alpha_t = alpha_to_tensor(alpha) if alpha is not None else None
        return RestorationCondition(lq_up, canvas.work_size, canvas.output_size, alpha_t)

    def encode_condition(
        self, lq_image: torch.Tensor, generator, vae_tile_size, vae_tile_overlap, return_cfw_features: bool = False
    ):
        """Scaled latent of the low-quality image: ``posterior.sample() * scaling_factor`` (official
        ``get_first_stage_encoding``).

        With ``return_cfw_features``: ``(latent, cfw_features)``, where ``cfw_features`` (for
        [`RestorationCondition`]) are the CFW encoder features of the same encoder pass when the image is encoded
        untiled and a CFW adapter is loaded, else None; an untiled decode then does not encode the image again.

        Out of memory on the GPU: encoded again with half the VAE tile, down to
        [`~stablesr.vae_tiling.MIN_TILE_SIZE`] (see [`~stablesr.vae_tiling.with_smaller_tiles`])."""
        image = lq_image.to(self.vae.dtype)

        def encode(tile_size, tile_overlap):
            if return_cfw_features and self.cfw_adapter is not None and vae_tiling.fits_one_tile(
                *image.shape[-2:], tile_size
            ):
                encoded = self.cfw_adapter.encode_features(self.vae, image)
                return encoded.latent_dist.mean, encoded.latent_dist.std, tuple(encoded.encoder_features)
            return (*vae_tiling.encode_moments(self.vae, image, tile_size, tile_overlap), None)

        mean, std, cfw_features = vae_tiling.with_smaller_tiles(
            encode, *image.shape[-2:], vae_tile_size, vae_tile_overlap, self.vae_scale_factor, "VAE encode"
        )
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = (mean + std * noise) * self.vae.config.scaling_factor
        return (latents, cfw_features) if return_cfw_features else latents

    def predict_model_output(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        lq_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        tile_size: int,
        tile_overlap: int,
        tile_batch_size: int = 4,
        return_tiles: bool = False,
    ):
        """UNet output (eps or v) for ``latents`` at ``timestep``, steered by the encoder features of ``lq_latents``.

        Latents larger than ``tile_size`` are processed in overlapping tiles (each tile's encoder features come from
        the matching LQ-latent crop, as official) whose outputs are blended with the official Gaussian weights.
        ``tile_batch_size`` tiles go through the encoder and UNet at once; out of memory on the GPU halves it (down
        to one tile, with a warning) and the step goes on. Requires the SFT adapter to be attached.
        """
        out, tile_outputs, _ = self._model_output(
            latents, timestep, lq_latents, prompt_embeds, tile_size, tile_overlap, tile_batch_size, return_tiles
        )
        return (out, tile_outputs) if return_tiles else out

    def _model_output(
        self, latents, timestep, lq_latents, prompt_embeds, tile_size, tile_overlap, tile_batch_size, return_tiles
    ):
        """[`predict_model_output`]'s work; also returns the tile batch size that fitted, for the next steps."""
        if tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1, got {tile_batch_size}")
        height, width = latents.shape[-2:]
        boxes = tile_grid(height, width, tile_size, tile_overlap)
        if len(boxes) == 1:
            out = self._run_tiles(latents, timestep, lq_latents, prompt_embeds)
            if out is None:
                raise self._unet_out_of_memory(height, width, tile_size, untiled=True)
            return out, ([out] if return_tiles else []), tile_batch_size

        accumulator = TileAccumulator(latents.shape, latents.device)
        weights = {}
        tile_outputs = []
        batch = latents.shape[0]
        start = 0
        while start < len(boxes):
            chunk = boxes[start : start + tile_batch_size]
            x = torch.cat([latents[..., y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])
            lq = torch.cat([lq_latents[..., y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])
            t_tiles = timestep.repeat(len(chunk)) if timestep.ndim == 1 else timestep
            out = self._run_tiles(x, t_tiles, lq, prompt_embeds)
            del x, lq
            if out is None:
                if len(chunk) == 1:
                    y0, y1, x0, x1 = chunk[0]
                    raise self._unet_out_of_memory(y1 - y0, x1 - x0, tile_size)
                tile_batch_size = (len(chunk) + 1) // 2
                logger.warning(
                    f"out of memory running {len(chunk)} tiles at once through the UNet; retrying with "
                    f"tile_batch_size={tile_batch_size} (pass it from the start to skip this)"
                )
                continue
            for i, (y0, y1, x0, x1) in enumerate(chunk):
                tile_out = out[i * batch : (i + 1) * batch]
                key = (y1 - y0, x1 - x0)
                if key not in weights:
                    weights[key] = gaussian_tile_weights(*key, device=latents.device)
                accumulator.add((y0, y1, x0, x1), tile_out, weights[key])
                if return_tiles:
                    tile_outputs.append(tile_out)
            start += len(chunk)
        return accumulator.result(), tile_outputs, tile_batch_size

    def _run_tiles(self, x, timestep, lq, prompt_embeds) -> torch.Tensor | None:
        """Encoder + SFT + UNet on a batch of tiles (float32 output), or None when the accelerator ran out of memory."""
        dtype = self.unet.dtype
        try:
            features = self.time_aware_encoder(lq.to(dtype), timestep).features
            self.sft_adapter.set_condition(features)
            embeds = _batch_embeds(prompt_embeds, x.shape[0])
            return self.unet(x.to(dtype), timestep, encoder_hidden_states=embeds).sample.float()
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not vae_tiling.is_out_of_memory(err):
                raise
        # Outside the except block, so the failed attempt's activations are released.
        self.sft_adapter.set_condition(None)
        vae_tiling.release_cached_memory()
        return None

    @staticmethod
    def _unet_out_of_memory(height: int, width: int, tile_size: int, untiled: bool = False) -> torch.OutOfMemoryError:
        what = "the whole latent" if untiled else "one tile at a time"
        return torch.OutOfMemoryError(
            f"out of memory in the UNet with {what} ({height}x{width} latent pixels): lower tile_size "
            f"(--tile-size, now {tile_size}), use --dtype fp16 or bf16, or free GPU memory"
        )

    def denoise(
        self,
        latents: torch.Tensor,
        lq_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        tile_size: int,
        tile_overlap: int,
        generator=None,
        tile_batch_size: int = 4,
        variance_noise: list[torch.Tensor] | None = None,
        callback=None,
    ) -> torch.Tensor:
        """The sampling loop: aggregated model output, then one scheduler step on the whole latent, per timestep.

        ``variance_noise`` (one tensor per step) replaces the scheduler's random noise, when the scheduler supports
        it (the official DDPM one does); used to replay recorded official runs.
        """
        timesteps = self.scheduler.timesteps
        step_params = inspect.signature(self.scheduler.step).parameters
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                t_batch = t.expand(latents.shape[0]) if t.ndim == 0 else t
                # A tile batch that ran out of memory stays halved for the remaining steps.
                model_output, _, tile_batch_size = self._model_output(
                    model_input, t_batch.to(latents.device), lq_latents, prompt_embeds, tile_size, tile_overlap,
                    tile_batch_size, False,
                )
                kwargs = {}
                if variance_noise is not None:
                    kwargs["variance_noise"] = variance_noise[i]
                elif "generator" in step_params:  # e.g. UniPC's step takes no generator
                    kwargs["generator"] = generator
                latents = self.scheduler.step(model_output, t, latents, **kwargs).prev_sample
                _check_finite(latents, f"sampling step {i + 1}", self.unet.dtype)
                if callback is not None:
                    callback(i, t, latents)
                progress_bar.update()
        return latents

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        condition: RestorationCondition,
        fidelity_weight: float = 0.5,
        color_fix: str = DEFAULT_COLOR_FIX,
        vae_tile_size: int | None = 1024,
        vae_tile_overlap: int = 64,
        output_type: str = "pil",
    ):
        """Decode final latents of one image (CFW at ``fidelity_weight``), color-fix, crop and resize to its output
        size. One CFW decode per call: this is how the fidelity weight is tuned without sampling again."""
        if not 0.0 <= float(fidelity_weight) <= 1.0:
            raise ValueError(f"fidelity_weight must be in [0, 1], got {fidelity_weight}")
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
        self.prepare_half_precision()
        device = self._execution_device
        lq_image = condition.lq_image.to(device=device, dtype=self.vae.dtype)
        raw = latents.to(device=device, dtype=self.vae.dtype) / self.vae.config.scaling_factor
        # An untiled decode fuses the condition's CFW features (from the LQ-latent encode) instead of encoding again.
        # Out of memory on the GPU: decoded again with half the VAE tile (vae_tiling.with_smaller_tiles).
        weight = fidelity_weight if self.cfw_adapter is not None else 0.0
        image = vae_tiling.with_smaller_tiles(
            lambda tile_size, tile_overlap: vae_tiling.decode(
                self.vae, raw, lq_image, self.cfw_adapter, weight, tile_size, tile_overlap,
                encoder_features=condition.cfw_features,
            ),
            *lq_image.shape[-2:], vae_tile_size, vae_tile_overlap, self.vae_scale_factor, "VAE decode",
        )
        _check_finite(image, "the VAE decode", self.vae.dtype)
        image = image.float()
        image = apply_color_fix(image, lq_image.float(), color_fix)
        work_h, work_w = condition.work_size
        image = image[..., :work_h, :work_w]
        if (work_h, work_w) != condition.output_size:
            image = F.interpolate(image, size=condition.output_size, mode="bicubic", align_corners=False,
                                  antialias=True)
        image = image.clamp(-1, 1)
        return self._postprocess(image, condition, output_type)

    def _postprocess(self, image: torch.Tensor, condition: RestorationCondition, output_type: str):
        if output_type == "pt":
            return (image + 1) / 2
        if output_type == "np":
            return ((image + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        alpha = alpha_from_tensor(condition.alpha) if condition.alpha is not None else None
        return attach_alpha(from_tensor(image.cpu())[0], alpha)

    # ------------------------------------------------------------------------------------------------ __call__
    @torch.no_grad()
    def __call__(
        self,
        image,
        upscale: float = 4.0,
        num_inference_steps: int | None = None,
        fidelity_weight: float = 0.5,
        color_fix: str = DEFAULT_COLOR_FIX,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        tile_batch_size: int = 4,
        vae_tile_size: int | None = 1024,
        vae_tile_overlap: int = 64,
        start: str = "lq",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
    ):
        r"""
        Restore and upscale images.

        Args:
            image: PIL image(s), numpy (H, W[, C]) / (B, H, W, C) or torch (C, H, W) / (B, C, H, W) in [0, 1].
                Grayscale becomes RGB; an alpha channel is upscaled separately and re-attached.
            upscale (`float`): output size = round(upscale x input size) pixels. Inputs whose upscaled short side
                is below the model's native size (512 / 768) are sampled at that size and resized back.
            num_inference_steps (`int`): defaults to the pipeline's ``default_num_inference_steps`` (200 official
                respaced DDPM steps; 4 for turbo). With another scheduler, 10-50 steps.
            fidelity_weight (`float`): CFW weight w in [0, 1]: 0 = realism (stock decoder), 1 = fidelity to the input.
            color_fix (`str`): "wavelet" (default), "adain" or "none", against the upsampled input.
            tile_size / tile_overlap (`int`): aggregation-sampling tile and overlap in LATENT pixels (defaults: the
                UNet's native latent size, 64 or 96, and half of it).
            tile_batch_size (`int`): tiles per UNet call.
            vae_tile_size / vae_tile_overlap (`int`): tiled VAE encode/CFW decode tile and overlap in PIXELS
                (``None`` = never tile). Images within one tile take the exact untiled path.
            start (`str`): "lq" = official canvas start x_T = sqrt(abar_T) z_LQ + sqrt(1 - abar_T) eps;
                "noise" = pure Gaussian noise.
            generator: torch generator(s) for reproducible sampling.
            latents: initial latents x_T (one tensor per image, or a tensor for a single image) instead of sampling
                them.
            prompt_embeds: (1, 77, D) text embedding; default: the stored empty-prompt embedding.
            output_type (`str`): "pil", "np", "pt" or "latent" (skip decoding; decode later with
                [`~StableSRPipeline.decode_latents`] and the returned conditions).
            return_dict (`bool`): return a [`StableSRPipelineOutput`] instead of a tuple.
            callback: ``callback(step_index, timestep, latents)`` after every step.

        Returns:
            [`StableSRPipelineOutput`] or ``(images, latents, conditions)``.
        """
        # 1. Check inputs
        tile_size = tile_size or self.default_tile_size
        tile_overlap = tile_overlap if tile_overlap is not None else tile_size // 2
        num_inference_steps = num_inference_steps or self.config.default_num_inference_steps
        self.check_inputs(upscale, fidelity_weight, color_fix, start, tile_size, tile_overlap, num_inference_steps)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        images = as_rgb_alpha_list(image)  # the alpha channel is split off here, once
        if isinstance(latents, torch.Tensor):
            latents = [latents]
        if latents is not None and len(latents) != len(images):
            raise ValueError(f"got {len(latents)} initial latents for {len(images)} images")
        generators = generator if isinstance(generator, list) else [generator] * len(images)
        if len(generators) != len(images):
            raise ValueError(f"got {len(generators)} generators for {len(images)} images")
        self.prepare_half_precision()
        device = self._execution_device

        # 2. Prompt embedding (the stored empty-prompt embedding, as official)
        embeds = self.get_prompt_embeds(prompt_embeds, device, self.unet.dtype)

        outputs, all_latents, conditions = [], [], []
        for index, (rgb, alpha) in enumerate(images):
            gen = generators[index]
            # 3. Preprocess: bicubic upscale, pad; encode the LQ latent
            condition = self.prepare_condition(rgb, upscale, alpha)
            lq_image = condition.lq_image.to(device)
            # One encoder pass gives the LQ latent and (untiled, with CFW) the features the CFW decode fuses.
            want_features = self.cfw_adapter is not None and (fidelity_weight > 0 or output_type == "latent")
            encoded = self.encode_condition(lq_image, gen, vae_tile_size, vae_tile_overlap,
                                            return_cfw_features=want_features)
            lq_latents, cfw_features = encoded if want_features else (encoded, None)
            lq_latents = lq_latents.float()
            if cfw_features is not None:
                condition = replace(condition, cfw_features=cfw_features)

            # 4. Timesteps and initial latents
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            if latents is not None:
                x = latents[index].to(device=device, dtype=torch.float32)
                if x.shape != lq_latents.shape:
                    raise ValueError(f"initial latents have shape {tuple(x.shape)}, expected {tuple(lq_latents.shape)}")
            else:
                noise = randn_tensor(lq_latents.shape, generator=gen, device=device, dtype=torch.float32)
                if start == "lq":
                    t_start = self.scheduler.timesteps[:1].repeat(lq_latents.shape[0])
                    x = self.scheduler.add_noise(lq_latents, noise, t_start)
                else:
                    x = noise * self.scheduler.init_noise_sigma

            # 5. Denoising loop with the SFT layers attached to the (otherwise stock) UNet
            with self.sft_adapter.attached(self.unet):
                x = self.denoise(x, lq_latents, embeds, tile_size, tile_overlap, gen, tile_batch_size,
                                 callback=callback)
            all_latents.append(x)
            conditions.append(condition)

            # 6. CFW decode (tiled when large), color fix, crop/resize to the output size
            if output_type == "latent":
                outputs.append(x)
            else:
                outputs.append(self.decode_latents(x, condition, fidelity_weight, color_fix, vae_tile_size,
                                                   vae_tile_overlap, output_type))
        self.maybe_free_model_hooks()

        if output_type in ("np", "pt") and len({tuple(o.shape) for o in outputs}) == 1:
            outputs = torch.cat(outputs) if output_type == "pt" else __import__("numpy").concatenate(outputs)
        if not return_dict:
            return outputs, all_latents, conditions
        return StableSRPipelineOutput(images=outputs, latents=all_latents, conditions=conditions)
