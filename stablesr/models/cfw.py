"""Controllable Feature Wrapping (CFW): fuse VAE-encoder features of the low-quality image into a stock VAE decoder.

StableSR's stage 2 adds fusion blocks to the SD VAE decoder. Each one reads the decoder feature of one level and the
encoder feature of the same level (computed from the low-quality input) and adds ``w * C(concat[F_e, F_d])`` to the
decoder feature, with ``w`` in [0, 1] trading realism (0) for fidelity (1). Official code: IceClear/StableSR
``ldm/modules/diffusionmodules/model.py`` (``Encoder.forward(return_fea=True)``, ``Decoder_Mix``, ``ResBlock``,
``Fuse_sft_block_RRDB``) and ``ldm/models/autoencoder.py:AutoencoderKLResi`` @398ee93.

Here CFW is an adapter on an unmodified diffusers [`AutoencoderKL`]: the fusion blocks live in [`CFWAdapter`], which
captures encoder features with read-only forward hooks and fuses them through small wrappers around the decoder's
resnets. The VAE on disk stays stock and the fusion blocks save on their own. Parameter names follow the official
``decoder.fusion_layer_{level}`` modules, so official weights load one to one after stripping ``decoder.``.

Levels are LDM levels: level ``i`` is the encoder's ``down[i]`` (diffusers ``encoder.down_blocks[i]``) and the
decoder's ``up[i]`` (diffusers ``decoder.up_blocks[L - 1 - i]`` with ``L`` levels). The official model fuses levels 1
and 2 (H/2 and H/4 of the image for the 4-level SD VAE).
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D
from diffusers.utils import BaseOutput
from torch import nn

# The RRDB blocks live with RRDBNet (the Real-ESRGAN baseline uses them too); imported here so that
# ``stablesr.models.cfw.RRDB`` / ``.ResidualDenseBlock`` keep working.
from .rrdbnet import RRDB, ResidualDenseBlock  # noqa: F401

# The official fusion blocks hard-code LDM's Normalize(): GroupNorm(32 groups, eps 1e-6, affine).
_NORM_GROUPS = 32
_NORM_EPS = 1e-6


def _check_fidelity_weight(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"fidelity_weight must be a float in [0, 1], got {value!r} ({type(value).__name__})")
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"fidelity_weight must be in [0, 1] (0 = stock decoder / realism, 1 = full fusion / fidelity), got {value}"
        )
    return float(value)


class CFWResBlock(nn.Module):
    """Norm-act-conv residual block without time embedding: GN-SiLU-conv3x3-GN-SiLU-conv3x3 + skip.

    Port of IceClear/StableSR ``ldm/modules/diffusionmodules/model.py:ResBlock``. The skip is a 1x1 conv named
    ``conv_out`` when the widths differ, identity otherwise (names kept for 1:1 loading). Not diffusers'
    ``ResnetBlock2D``: that one names the skip ``conv_shortcut``.

    Args:
        in_channels (`int`): Input channels (a multiple of 32).
        out_channels (`int`, *optional*): Output channels (a multiple of 32); `in_channels` when `None`.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = nn.GroupNorm(_NORM_GROUPS, in_channels, eps=_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_NORM_GROUPS, out_channels, eps=_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(F.silu(self.norm1(hidden_states)))
        residual = self.conv2(F.silu(self.norm2(residual)))
        shortcut = hidden_states if self.conv_out is None else self.conv_out(hidden_states)
        return residual + shortcut


class CFWFusionBlock(nn.Module):
    """One CFW fusion block: ``dec_feat + w * C(concat[enc_feat, dec_feat])``.

    Port of IceClear/StableSR ``ldm/modules/diffusionmodules/model.py:Fuse_sft_block_RRDB``: ``C`` is
    ``encode_enc_1`` (ResBlock 2C->C) -> ``encode_enc_2`` (``num_rrdb`` x RRDB) -> ``encode_enc_3`` (ResBlock C->C).
    There is no zero-init, so ``C`` is not zero at initialisation; only ``w = 0`` recovers the stock decoder.

    Args:
        channels (`int`): Width C of both features (a multiple of 32).
        num_rrdb (`int`): Number of RRDBs in ``encode_enc_2`` (official: 2).
        growth_channels (`int`): Growth channels of the RRDBs (official: 32).
    """

    def __init__(self, channels: int, num_rrdb: int = 2, growth_channels: int = 32):
        super().__init__()
        self.encode_enc_1 = CFWResBlock(2 * channels, channels)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, growth_channels) for _ in range(num_rrdb)))
        self.encode_enc_3 = CFWResBlock(channels, channels)

    def residual(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor) -> torch.Tensor:
        """The un-weighted correction ``C(concat[enc_feat, dec_feat])``, shape (B, C, H, W)."""
        # The official block concatenates the encoder feature first.
        hidden_states = self.encode_enc_1(torch.cat([enc_feat, dec_feat], dim=1))
        hidden_states = self.encode_enc_2(hidden_states)
        return self.encode_enc_3(hidden_states)

    def forward(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        """
        Args:
            enc_feat (`torch.Tensor`): Encoder feature of the low-quality image, (B, C, H, W).
            dec_feat (`torch.Tensor`): Decoder feature at the same level, (B, C, H, W).
            w (`float`): Fidelity weight in [0, 1].

        Returns:
            `torch.Tensor`: The fused decoder feature, (B, C, H, W).
        """
        return dec_feat + w * self.residual(enc_feat, dec_feat)


class CFWFusionWrapper(nn.Module):
    """Wraps the last resnet of one VAE decoder level and adds the CFW correction to its output (peft-style).

    Only exists inside [`CFWAdapter._fusion_context`]: the fusion sits after the level's resnets and before its
    upsampler, where ``Decoder_Mix.forward`` applies ``fusion_layer_{level}``. The wrapper is bound to one encoder
    feature and one weight for its whole life; with ``fidelity_weight == 0`` it returns the resnet output untouched.
    The fusion runs in the fusion block's dtype and device; the result is cast back.

    Args:
        base_layer (`nn.Module`): The wrapped ``ResnetBlock2D`` (``vae.decoder.up_blocks[L - 1 - level].resnets[-1]``).
        fusion (`CFWFusionBlock`): The fusion block of this level (owned by the adapter).
        level (`int`): LDM level index, used in error messages.
        encoder_feature (`torch.Tensor` or `None`): The encoder feature of this level, (B, C, h, w) matching the
            decoder feature; `None` only with ``fidelity_weight == 0``.
        fidelity_weight (`float`): ``w`` in [0, 1].
    """

    def __init__(
        self,
        base_layer: nn.Module,
        fusion: CFWFusionBlock,
        level: int,
        encoder_feature: torch.Tensor | None,
        fidelity_weight: float,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.fusion = fusion
        self.level = level
        self.fidelity_weight = fidelity_weight
        # A plain attribute, not a buffer: the feature belongs to one decode and never enters a state_dict.
        self.encoder_feature = encoder_feature

    def extra_repr(self) -> str:
        return f"level={self.level}, fidelity_weight={self.fidelity_weight}"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = self.base_layer(hidden_states, *args, **kwargs)
        w = self.fidelity_weight
        if w == 0:
            return hidden_states
        enc_feat = self.encoder_feature
        if enc_feat.shape != hidden_states.shape:
            raise ValueError(
                f"CFW fusion level {self.level}: encoder feature has shape {tuple(enc_feat.shape)} but the decoder "
                f"feature has shape {tuple(hidden_states.shape)}; batch, channels and spatial size must match (crop "
                "the encoder features to the decoded tile)."
            )
        param = next(self.fusion.parameters())
        residual = self.fusion.residual(
            enc_feat.to(device=param.device, dtype=param.dtype),
            hidden_states.to(device=param.device, dtype=param.dtype),
        )
        return hidden_states + (w * residual).to(device=hidden_states.device, dtype=hidden_states.dtype)


@dataclass
class CFWEncoderOutput(BaseOutput):
    """
    Output of [`CFWAdapter.encode_features`].

    Args:
        latent_dist (`DiagonalGaussianDistribution`):
            The VAE posterior; ``latent_dist.mean`` / ``.sample()`` are raw (unscaled) latents, (B, 4, H/8, W/8).
        encoder_features (`list[torch.Tensor]`):
            One encoder feature per fusion level, ascending by level (as ``adapter.fusion_levels``); level ``i`` has
            shape (B, block_out_channels[i], H / 2**i, W / 2**i).
    """

    latent_dist: DiagonalGaussianDistribution
    encoder_features: list[torch.Tensor]


class CFWAdapter(ModelMixin, ConfigMixin):
    r"""
    The CFW fusion blocks of StableSR, as an adapter that plugs into a stock diffusers [`AutoencoderKL`].

    The official model is ``AutoencoderKLResi`` (IceClear/StableSR ``ldm/models/autoencoder.py``) whose decoder
    (``Decoder_Mix``) owns ``fusion_layer_1`` and ``fusion_layer_2``. Here those modules have the same names and
    parameter names, so ``state_dict()`` keys equal the official ``decoder.fusion_layer_*`` keys minus ``decoder.``.

    The whole API is two calls; the VAE is only modified for the duration of [`~CFWAdapter.decode`]:

    ```py
    adapter = CFWAdapter.from_pretrained(path)
    enc = adapter.encode_features(vae, lq_image)  # lq_image: (B, 3, H, W) in [-1, 1]; one encoder pass
    ...  # diffusion on enc.latent_dist.sample() * vae.config.scaling_factor
    image = adapter.decode(vae, latents / vae.config.scaling_factor, enc.encoder_features, fidelity_weight=0.5).sample
    ```

    Args:
        block_out_channels (`tuple[int, ...]`):
            ``block_out_channels`` of the VAE the adapter fuses into, e.g. (128, 256, 512, 512) for SD.
        fusion_levels (`tuple[int, ...]`):
            LDM levels that get a fusion block; level ``i`` fuses ``encoder.down_blocks[i]`` into
            ``decoder.up_blocks[L - 1 - i]``. Official: (1, 2).
        num_rrdb (`int`): RRDBs per fusion block.
        growth_channels (`int`): Growth channels of the RRDB dense blocks.
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        fusion_levels: tuple[int, ...] = (1, 2),
        num_rrdb: int = 2,
        growth_channels: int = 32,
    ):
        super().__init__()
        block_out_channels = tuple(int(c) for c in block_out_channels)
        fusion_levels = tuple(int(level) for level in fusion_levels)
        num_levels = len(block_out_channels)
        if not fusion_levels or len(set(fusion_levels)) != len(fusion_levels):
            raise ValueError(f"fusion_levels must be a non-empty tuple of distinct levels, got {fusion_levels}")
        for level in fusion_levels:
            if not 0 <= level < num_levels:
                raise ValueError(
                    f"fusion level {level} is out of range for a VAE with {num_levels} levels "
                    f"(block_out_channels={block_out_channels}); allowed: 0..{num_levels - 1}"
                )
            if block_out_channels[level] % _NORM_GROUPS != 0:
                raise ValueError(
                    f"fusion level {level} has {block_out_channels[level]} channels, which GroupNorm({_NORM_GROUPS}) "
                    f"cannot split; use a VAE whose block_out_channels are multiples of {_NORM_GROUPS}"
                )
        if num_rrdb < 1:
            raise ValueError(f"num_rrdb must be >= 1, got {num_rrdb}")

        self._levels = tuple(sorted(fusion_levels))
        for level in self._levels:
            self.add_module(
                f"fusion_layer_{level}", CFWFusionBlock(block_out_channels[level], num_rrdb, growth_channels)
            )

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, fusion_levels: tuple[int, ...] = (1, 2), **kwargs) -> "CFWAdapter":
        """Builds a randomly initialised adapter whose widths match `vae` (``vae.config.block_out_channels``)."""
        return cls(block_out_channels=tuple(vae.config.block_out_channels), fusion_levels=fusion_levels, **kwargs)

    @property
    def fusion_levels(self) -> tuple[int, ...]:
        """The fused LDM levels, ascending (the order of encoder feature lists)."""
        return self._levels

    def fusion_layer(self, level: int) -> CFWFusionBlock:
        """The fusion block of LDM `level` (the official ``decoder.fusion_layer_{level}``)."""
        if level not in self._levels:
            raise ValueError(f"no fusion block at level {level}; fusion levels are {self._levels}")
        return getattr(self, f"fusion_layer_{level}")

    def _validate_features(self, encoder_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(encoder_features, torch.Tensor) or len(encoder_features) != len(self._levels):
            got = "a single tensor" if isinstance(encoder_features, torch.Tensor) else f"{len(encoder_features)}"
            raise ValueError(
                f"expected a list of {len(self._levels)} encoder features (one per fusion level {self._levels}), "
                f"got {got}"
            )
        for level, feature in zip(self._levels, encoder_features, strict=True):
            channels = self.config.block_out_channels[level]
            if feature.ndim != 4 or feature.shape[1] != channels:
                raise ValueError(
                    f"CFW fusion level {level}: expected an encoder feature of shape (B, {channels}, h, w), got "
                    f"{tuple(feature.shape)}"
                )
        return list(encoder_features)

    def _check_vae(self, vae: AutoencoderKL) -> None:
        vae_channels = tuple(vae.config.block_out_channels)
        if vae_channels != tuple(self.config.block_out_channels):
            raise ValueError(
                f"VAE block_out_channels {vae_channels} do not match the adapter's "
                f"{tuple(self.config.block_out_channels)}; build the adapter with CFWAdapter.from_vae(vae)"
            )
        num_levels = len(vae_channels)
        for level in self._levels:
            down_block = vae.encoder.down_blocks[level]
            up_block = vae.decoder.up_blocks[num_levels - 1 - level]
            # Attention variants would need the fusion after their last attention (as in Decoder_Mix); the SD VAE
            # has none, so we only support the plain blocks.
            if not isinstance(down_block, DownEncoderBlock2D) or not isinstance(up_block, UpDecoderBlock2D):
                raise ValueError(
                    f"CFW fusion level {level}: only DownEncoderBlock2D / UpDecoderBlock2D are supported, got "
                    f"{type(down_block).__name__} / {type(up_block).__name__}"
                )

    @staticmethod
    def _capture_into_list(store: list[torch.Tensor]):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            store.append(output)

        return hook

    # ----------------------------------------------------------------------------------------------------------------
    # Public API

    def encode_features(
        self, vae: AutoencoderKL, image: torch.Tensor, return_dict: bool = True
    ) -> CFWEncoderOutput | tuple[DiagonalGaussianDistribution, list[torch.Tensor]]:
        """
        Runs the VAE encoder once and returns its posterior and the features of the fused levels.

        Same computation as the official ``AutoencoderKLResi.encode``, run through ``vae.encode``: the posterior is
        the one ``vae.encode(image)`` gives, so a caller that needs both the LQ latent and the CFW features encodes
        once. The whole image is encoded in one pass even if ``vae.enable_tiling()`` is on (per-tile features cannot
        be stitched); ``vae.enable_slicing()`` is honoured.

        Args:
            vae (`AutoencoderKL`): The VAE.
            image (`torch.Tensor`): (B, 3, H, W) in [-1, 1], H and W multiples of 2**(L-1).
            return_dict (`bool`): Return a [`CFWEncoderOutput`] instead of a tuple.

        Returns:
            [`CFWEncoderOutput`] or `tuple`: ``(latent_dist, encoder_features)``.
        """
        self._check_vae(vae)
        if image.ndim != 4 or image.shape[1] != vae.config.in_channels:
            raise ValueError(
                f"expected an image batch of shape (B, {vae.config.in_channels}, H, W), got {tuple(image.shape)}"
            )
        captured: dict[int, list[torch.Tensor]] = {level: [] for level in self._levels}
        # Read-only capture: output of the level's last resnet, before its downsampler (official
        # Encoder.forward(return_fea=True) appends h after the level's blocks).
        handles = [
            vae.encoder.down_blocks[level].resnets[-1].register_forward_hook(self._capture_into_list(captured[level]))
            for level in self._levels
        ]
        # Through vae.encode so that slicing and offload hooks behave as usual; tiling is switched off for the call
        # because per-tile features would not form one feature map.
        use_tiling = vae.use_tiling
        try:
            vae.use_tiling = False
            posterior = vae.encode(image).latent_dist
        finally:
            vae.use_tiling = use_tiling
            for handle in handles:
                handle.remove()
        # With slicing the encoder ran once per sample: the captures are the batch in order.
        features = [
            torch.cat(captured[level]) if len(captured[level]) > 1 else captured[level][0] for level in self._levels
        ]
        if not return_dict:
            return posterior, features
        return CFWEncoderOutput(latent_dist=posterior, encoder_features=features)

    def decode(
        self,
        vae: AutoencoderKL,
        latents: torch.Tensor,
        encoder_features: Sequence[torch.Tensor] | None,
        fidelity_weight: float,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """
        ``vae.decode`` with the CFW fusion active, as the official ``AutoencoderKLResi.decode`` with ``fusion_w = w``.

        The fusion wrappers are in `vae` only during this call. ``fidelity_weight == 0`` is exactly
        ``vae.decode(latents)`` (the fusion is skipped, not multiplied by 0).

        Args:
            vae (`AutoencoderKL`): The VAE.
            latents (`torch.Tensor`): Raw (unscaled, i.e. divided by ``scaling_factor``) latents, (B, 4, h, w).
            encoder_features (`Sequence[torch.Tensor]` or `None`):
                One tensor per fusion level ascending by level (as `fusion_levels`, e.g. from
                [`~CFWAdapter.encode_features`]), level ``i`` of shape (B, block_out_channels[i], h_i, w_i) matching
                the decoder feature of that level (same batch; for a latent tile, the matching crop). May be `None`
                only when `fidelity_weight` is 0.
            fidelity_weight (`float`): ``w`` in [0, 1]: 0 = stock decoder (realism), 1 = full fusion (fidelity). The
                official training uses 1.0, its inference scripts ``--dec_w 0.5``.
            return_dict (`bool`): Return a [`~models.vae.DecoderOutput`] instead of a tuple.

        Returns:
            [`~models.vae.DecoderOutput`] or `tuple`: the image, (B, 3, 8h, 8w), nominally in [-1, 1] (unclamped).
        """
        w = _check_fidelity_weight(fidelity_weight)
        if encoder_features is None and w != 0:
            raise ValueError(f"encoder_features are required when fidelity_weight={w} (only w=0 can do without)")
        features = None if encoder_features is None else self._validate_features(encoder_features)
        if w == 0:
            image = vae.decode(latents).sample
        elif vae.use_tiling and (
            latents.shape[-1] > vae.tile_latent_min_size or latents.shape[-2] > vae.tile_latent_min_size
        ):
            raise ValueError(
                "vae.enable_tiling() would split the decode into tiles the encoder features do not match; disable it "
                "and tile the CFW decode yourself with cropped encoder features (stablesr.vae_tiling.decode)"
            )
        elif vae.use_slicing and latents.shape[0] > 1:
            # AutoencoderKL.decode would slice the latents but not our features: slice both here.
            images = []
            for index, latent in enumerate(latents.split(1)):
                with self._fusion_context(vae, [f[index : index + 1] for f in features], w):
                    images.append(vae.decode(latent).sample)
            image = torch.cat(images)
        else:
            with self._fusion_context(vae, features, w):
                image = vae.decode(latents).sample
        if not return_dict:
            return (image,)
        return DecoderOutput(sample=image)

    # ----------------------------------------------------------------------------------------------------------------
    # The one stateful piece

    @contextmanager
    def _fusion_context(
        self, vae: AutoencoderKL, encoder_features: Sequence[torch.Tensor] | None, fidelity_weight: float
    ) -> Iterator[None]:
        """
        Private: inside the block, every ``vae.decode`` fuses `encoder_features` with `fidelity_weight`.

        Replaces the last resnet of each fused decoder level with a [`CFWFusionWrapper`] bound to that level's
        feature and the weight, and puts the plain resnets back on exit (also on error), so `vae` is then exactly as
        before. The fusion blocks are VAE submodules meanwhile (``vae.state_dict()`` changes): never save the VAE
        inside the block. Contexts do not nest on one VAE.

        [`~CFWAdapter.decode`] opens one per call. The only other user is stage-2 training with gradient
        checkpointing (``train/train_cfw.py``): the decoder blocks re-run in backward, after the forward returned,
        and must still fuse the same features, so the trainer keeps one context open until its next forward.
        """
        w = _check_fidelity_weight(fidelity_weight)
        if encoder_features is None and w != 0:
            raise ValueError(f"encoder_features are required when fidelity_weight={w} (only w=0 can do without)")
        if encoder_features is None:
            features = [None] * len(self._levels)
        else:
            features = self._validate_features(encoder_features)
        self._check_vae(vae)
        num_levels = len(self.config.block_out_channels)
        installed: list[tuple[UpDecoderBlock2D, CFWFusionWrapper]] = []
        try:
            for level, feature in zip(self._levels, features, strict=True):
                up_block = vae.decoder.up_blocks[num_levels - 1 - level]
                if isinstance(up_block.resnets[-1], CFWFusionWrapper):
                    raise ValueError(
                        f"CFW fusion level {level}: the VAE decoder already carries a CFW wrapper (a fusion context "
                        "is open on this VAE)"
                    )
                wrapper = CFWFusionWrapper(up_block.resnets[-1], self.fusion_layer(level), level, feature, w)
                up_block.resnets[-1] = wrapper
                installed.append((up_block, wrapper))
            yield
        finally:
            for up_block, wrapper in reversed(installed):
                if up_block.resnets[-1] is wrapper:
                    up_block.resnets[-1] = wrapper.base_layer
