"""StableSRPipeline: real-world super-resolution with a frozen Stable Diffusion UNet steered by StableSR parts."""

from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging

from ..models.cfw import CFWAdapter
from ..models.prompt_embedding import PromptEmbedding
from ..models.sft import SFTAdapter
from ..models.time_aware_encoder import TimeAwareEncoder

logger = logging.get_logger(__name__)


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

    model_cpu_offload_seq = "text_encoder->time_aware_encoder->unet->vae"
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
