"""A stored text-encoder output, so that inference needs neither a tokenizer nor the 354M-parameter text encoder.

StableSR always conditions the UNet on the empty prompt (official ``text_init = [''] * B``); the converter runs the
text encoder once and stores the result here.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PromptEmbedding(ModelMixin, ConfigMixin):
    r"""
    Holds one precomputed prompt embedding.

    Args:
        sequence_length (`int`): token positions (77 for CLIP).
        hidden_size (`int`): embedding width (1024 for SD 2.x), the UNet's ``cross_attention_dim``.
    """

    @register_to_config
    def __init__(self, sequence_length: int = 77, hidden_size: int = 1024):
        super().__init__()
        self.register_buffer("embeds", torch.zeros(1, sequence_length, hidden_size))

    @classmethod
    def from_tensor(cls, embeds: torch.Tensor) -> "PromptEmbedding":
        """Wrap a ``(1, sequence_length, hidden_size)`` (or 2-D) embedding."""
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"expected a (1, sequence_length, hidden_size) embedding, got {tuple(embeds.shape)}")
        module = cls(sequence_length=embeds.shape[1], hidden_size=embeds.shape[2])
        module.embeds.copy_(embeds.float())
        return module

    def forward(self, batch_size: int = 1) -> torch.Tensor:
        """``(batch_size, sequence_length, hidden_size)`` copies of the embedding."""
        return self.embeds.expand(batch_size, -1, -1)
