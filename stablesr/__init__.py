"""stablesr: StableSR super-resolution on a frozen Stable Diffusion, built on Hugging Face diffusers.

The public classes are imported lazily, so ``import stablesr.degradation`` (say) does not load diffusers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CFWAdapter": "stablesr.models.cfw",
    "PromptEmbedding": "stablesr.models.prompt_embedding",
    "SFTAdapter": "stablesr.models.sft",
    "TimeAwareEncoder": "stablesr.models.time_aware_encoder",
    "RestorationCondition": "stablesr.pipelines.pipeline_stablesr",
    "StableSRPipeline": "stablesr.pipelines.pipeline_stablesr",
    "StableSRPipelineOutput": "stablesr.pipelines.pipeline_stablesr",
    "StableSRDDPMScheduler": "stablesr.schedulers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stablesr' has no attribute {name!r}")
