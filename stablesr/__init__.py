"""stablesr: StableSR super-resolution on a frozen Stable Diffusion, built on Hugging Face diffusers."""

__version__ = "0.1.0"

from .models.cfw import CFWAdapter
from .models.prompt_embedding import PromptEmbedding
from .models.sft import SFTAdapter
from .models.time_aware_encoder import TimeAwareEncoder
from .pipelines.pipeline_stablesr import RestorationCondition, StableSRPipeline, StableSRPipelineOutput
from .schedulers import StableSRDDPMScheduler

__all__ = [
    "CFWAdapter",
    "PromptEmbedding",
    "RestorationCondition",
    "SFTAdapter",
    "StableSRDDPMScheduler",
    "StableSRPipeline",
    "StableSRPipelineOutput",
    "TimeAwareEncoder",
]
