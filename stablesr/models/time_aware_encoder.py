"""The StableSR time-aware encoder: a timestep-conditioned half UNet over the low-quality latent.

It reads the clean VAE latent of the (bicubic-upsampled) low-quality image together with the diffusion timestep and
returns one feature map per UNet resolution; each map conditions the SFT layers of the matching UNet blocks.

The module tree keeps the parameter names of the official ``EncoderUNetModelWT`` (``time_embed``, ``input_blocks``,
``middle_block``, ``fea_tran``), so official weights load one to one after stripping ``structcond_stage_model.``.
That includes the legacy head-major ``qkv`` layout of its attention blocks.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (the official ``GroupNorm32``, eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class TimestepResBlock(nn.Module):
    """LDM ``ResBlock`` without scale-shift norm: GN-SiLU-conv3, + Linear(SiLU(temb)), GN-SiLU-dropout-conv3, + skip.

    Port of the official layer layout (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``) so that
    official keys load unchanged.
    """

    def __init__(self, in_channels: int, temb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # Official: zero_module(conv) on the last conv of the residual branch, 1x1 conv skip when widths differ.
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(hidden_states)
        h = h + self.emb_layers(temb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(hidden_states) + h


class LegacyAttentionBlock(nn.Module):
    """Full spatial self-attention with the official head-major fused ``qkv`` 1x1 Conv1d layout.

    The 3C output channels of ``qkv`` are grouped per head as ``[q_h | k_h | v_h]`` (``QKVAttentionLegacy``), not as
    ``[q | k | v]``; we split them the same way so the official weights need no permutation. The product itself runs
    through ``F.scaled_dot_product_attention`` (scale 1/sqrt(head_dim), as the official 1/sqrt(sqrt(d)) on q and k).
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = hidden_states.shape
        x = hidden_states.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        head_dim = c // self.num_heads
        # (B, 3C, T) -> (B, heads, 3*head_dim, T): per-head [q | k | v] blocks (legacy order).
        qkv = qkv.reshape(b, self.num_heads, 3 * head_dim, -1)
        # contiguous(): with a strided last dim SDPA falls back to the math kernel (full score matrix: ~2.3 GB, 2.9x slower).
        q, k, v = qkv.transpose(-1, -2).contiguous().split(head_dim, dim=-1)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, -1)
        return (x + self.proj_out(out)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3x3 conv downsample (official ``Downsample`` with ``conv_resample=True``; parameter name ``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.op(hidden_states)


class EncoderStage(nn.ModuleList):
    """One official ``TimestepEmbedSequential``: runs its layers, giving ``temb`` to those that take it."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepResBlock):
                hidden_states = layer(hidden_states, temb)
            else:
                hidden_states = layer(hidden_states)
        return hidden_states


@dataclass
class TimeAwareEncoderOutput(BaseOutput):
    """
    Args:
        features (`tuple[torch.Tensor, ...]`):
            One map per UNet resolution level, highest resolution first: level ``k`` has shape
            ``(B, out_channels, ceil(h / 2**k), ceil(w / 2**k))`` for a ``(B, in_channels, h, w)`` latent. The last
            entry is the middle-block feature and shares the lowest resolution.
    """

    features: tuple[torch.Tensor, ...]


class TimeAwareEncoder(ModelMixin, ConfigMixin):
    r"""
    StableSR's time-aware encoder (official ``EncoderUNetModelWT``).

    Args:
        in_channels (`int`): Channels of the input latent (4 for SD).
        model_channels (`int`): Base width (256 official).
        out_channels (`int`): Width of every output feature map; must equal the SFT condition width (256 official).
        num_res_blocks (`int`): Residual blocks per level.
        channel_mult (`tuple[int, ...]`): Width multiplier per level; one output map per level.
        attention_resolutions (`tuple[int, ...]`): Downsample rates (1, 2, 4, ...) at which attention follows each
            residual block (official ``(4, 2, 1)``: levels 0-2).
        num_heads (`int`): Attention heads (used when ``num_head_channels == -1``).
        num_head_channels (`int`): Channels per head, or -1 to use ``num_heads``.
        dropout (`float`): Dropout inside the residual blocks.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 256,
        out_channels: int = 256,
        num_res_blocks: int = 2,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2),
        attention_resolutions: tuple[int, ...] = (4, 2, 1),
        num_heads: int = 4,
        num_head_channels: int = -1,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        temb_channels = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, temb_channels), nn.SiLU(), nn.Linear(temb_channels, temb_channels)
        )

        def attention(width: int) -> LegacyAttentionBlock:
            heads = num_heads if num_head_channels == -1 else width // num_head_channels
            return LegacyAttentionBlock(width, heads)

        self.input_blocks = nn.ModuleList([EncoderStage([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        # Indices of input blocks whose INPUT is recorded as a feature (those that halve the resolution).
        self._feature_block_indices: list[int] = []
        feature_channels = []
        width, rate = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [TimestepResBlock(width, temb_channels, mult * model_channels, dropout)]
                width = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(attention(width))
                self.input_blocks.append(EncoderStage(layers))
            if level != len(channel_mult) - 1:
                self._feature_block_indices.append(len(self.input_blocks))
                feature_channels.append(width)
                self.input_blocks.append(EncoderStage([Downsample(width)]))
                rate *= 2
        self.middle_block = EncoderStage(
            [
                TimestepResBlock(width, temb_channels, width, dropout),
                attention(width),
                TimestepResBlock(width, temb_channels, width, dropout),
            ]
        )
        feature_channels.append(width)
        self.fea_tran = nn.ModuleList(
            [TimestepResBlock(ch, temb_channels, out_channels, dropout) for ch in feature_channels]
        )

    @property
    def num_levels(self) -> int:
        return len(self.fea_tran)

    def _run(self, block: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> TimeAwareEncoderOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): ``(B, in_channels, h, w)`` clean low-quality latent, already scaled by the VAE
                scaling factor (0.18215 for SD).
            timestep (`torch.Tensor` or number): original-scale (0..999) diffusion timestep, a scalar or ``(B,)``.
            return_dict (`bool`): return a [`TimeAwareEncoderOutput`] instead of a tuple.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"TimeAwareEncoder expects a (B, {self.config.in_channels}, h, w) latent, got {tuple(sample.shape)}"
            )
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.numel() == 1 and batch > 1:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or shape ({batch},), got {tuple(timesteps.shape)}")

        # [cos | sin] sinusoid with max period 1e4, as LDM's timestep_embedding.
        t_emb = get_timestep_embedding(
            timesteps, self.config.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        temb = self.time_embed(t_emb.to(self.dtype))

        recorded = []
        hidden_states = sample.to(self.dtype)
        for index, block in enumerate(self.input_blocks):
            if index in self._feature_block_indices:
                recorded.append(hidden_states)
            hidden_states = self._run(block, hidden_states, temb)
        recorded.append(self._run(self.middle_block, hidden_states, temb))
        features = tuple(self._run(head, feat, temb) for head, feat in zip(self.fea_tran, recorded, strict=True))
        if not return_dict:
            return (features,)
        return TimeAwareEncoderOutput(features=features)
