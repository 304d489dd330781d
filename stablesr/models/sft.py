"""SFT (official: SPADE) layers and the adapter that plugs them into a stock diffusers UNet.

StableSR modulates the residual branch of every UNet resnet: ``out = GN(h) * (1 + gamma(s)) + beta(s)`` where ``h``
is the output of the resnet's second conv (before the skip add) and ``s`` the time-aware encoder feature of the same
resolution. In diffusers' ``ResnetBlock2D`` only the shortcut add (and ``/ output_scale_factor`` = 1) follow
``conv2``, so wrapping ``conv2`` reproduces the official ``ResBlockDual`` exactly without forking the UNet.

The adapter owns the SFT layers; ``attach`` swaps each target ``conv2`` for an [`SFTConv2d`] wrapper and ``detach``
puts the original module back, so the UNet saved to disk is always the stock one (see STYLE.md part B, option (b)).
"""

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class SFTLayer(nn.Module):
    """One SPADE layer. Parameter names follow the official ``ldm/modules/spade.py:SPADE`` for 1:1 loading.

    Args:
        channels: width ``C`` of the modulated activation.
        cond_channels: width of the condition map (the encoder's ``out_channels``, 256 official).
        hidden_channels: width of the shared conv (hard-coded 128 in the official code).
        norm_num_groups / norm_eps: the parameter-free norm (official GroupNorm32(32, C), eps 1e-5, with affine).
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden_channels: int = 128,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.param_free_norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps, affine=True)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)

    def modulation(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta), each ``(B, C, h, w)``, from a ``(B, cond_channels, h, w)`` condition."""
        actv = self.mlp_shared(condition)
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(condition)
        return self.normalize(hidden_states) * (1 + gamma) + beta

    def normalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The official GroupNorm32 normalises in float32 even under fp16 autocast.
        norm = self.param_free_norm
        out = F.group_norm(hidden_states.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
        return out.to(hidden_states.dtype)


class SFTConv2d(nn.Module):
    """peft-style wrapper: runs the wrapped ``conv2`` and modulates its output with an [`SFTLayer`].

    The per-call condition is a side channel set by [`SFTAdapter.set_condition`]; the reference is kept until the next
    call so that gradient-checkpoint recomputation sees the same tensor.
    """

    def __init__(self, base_layer: nn.Conv2d, sft: SFTLayer, target: str):
        super().__init__()
        self.base_layer = base_layer
        self.sft = sft
        self.target = target
        self.condition: torch.Tensor | None = None

    # Attributes some diffusers code reads from conv2 (e.g. LoRA fusing, channel checks) still resolve.
    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden_states)
        condition = self.condition
        if condition is None:
            raise RuntimeError(
                f"SFT layer at {self.target} has no condition: call SFTAdapter.set_condition(encoder_features) "
                "before running the UNet"
            )
        if condition.shape[-2:] != out.shape[-2:]:
            raise ValueError(
                f"SFT condition for {self.target} has spatial size {tuple(condition.shape[-2:])} but the UNet "
                f"activation there is {tuple(out.shape[-2:])}: the encoder must see a latent of the same size as "
                "the UNet input"
            )
        sft_dtype = self.sft.mlp_gamma.weight.dtype
        gamma, beta = self.sft.modulation(condition.to(sft_dtype))
        if out.shape[0] != gamma.shape[0]:
            if out.shape[0] % gamma.shape[0] != 0:
                raise ValueError(
                    f"SFT condition for {self.target} has batch {gamma.shape[0]} but the UNet batch is "
                    f"{out.shape[0]}; it must be equal or a multiple (e.g. doubled for classifier-free guidance)"
                )
            # CFG concatenates whole copies of the batch ([uncond, cond]); repeat the modulation the same way.
            repeats = out.shape[0] // gamma.shape[0]
            gamma, beta = gamma.repeat(repeats, 1, 1, 1), beta.repeat(repeats, 1, 1, 1)
        normalized = self.sft.normalize(out.to(sft_dtype))
        return (normalized * (1 + gamma) + beta).to(out.dtype)


def _resnet_targets(unet: nn.Module) -> list[tuple[str, int, int]]:
    """(module path of each resnet's conv2, its feature level, its width) in official ResBlockDual order."""
    num_levels = len(unet.down_blocks)
    targets = []
    for i, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(block.resnets):
            targets.append((f"down_blocks.{i}.resnets.{j}.conv2", i, resnet.conv2.out_channels))
    if unet.mid_block is not None:
        for j, resnet in enumerate(unet.mid_block.resnets):
            targets.append((f"mid_block.resnets.{j}.conv2", num_levels - 1, resnet.conv2.out_channels))
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            targets.append((f"up_blocks.{i}.resnets.{j}.conv2", num_levels - 1 - i, resnet.conv2.out_channels))
    return targets


class SFTAdapter(ModelMixin, ConfigMixin):
    r"""
    The SFT layers for every resnet of a diffusers ``UNet2DConditionModel``, attachable and detachable.

    Args:
        target_modules (`tuple[str, ...]`): module paths (inside the UNet) of the wrapped ``conv2`` layers, in
            official ``ResBlockDual`` order (down blocks, mid block, up blocks).
        target_levels (`tuple[int, ...]`): encoder feature level feeding each target (0 = highest resolution).
        target_channels (`tuple[int, ...]`): width of each target's activation.
        cond_channels (`int`): width of the encoder features (256 official).
        hidden_channels (`int`): width of the shared SPADE conv (128 official).
        norm_num_groups (`int`), norm_eps (`float`): the parameter-free GroupNorm (32, 1e-5 official).

    Build one for a UNet with [`SFTAdapter.from_unet`].
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        target_modules: tuple[str, ...] = (),
        target_levels: tuple[int, ...] = (),
        target_channels: tuple[int, ...] = (),
        cond_channels: int = 256,
        hidden_channels: int = 128,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if not (len(target_modules) == len(target_levels) == len(target_channels)):
            raise ValueError(
                "target_modules, target_levels and target_channels must have the same length, got "
                f"{len(target_modules)}, {len(target_levels)} and {len(target_channels)}"
            )
        self.layers = nn.ModuleList(
            [SFTLayer(c, cond_channels, hidden_channels, norm_num_groups, norm_eps) for c in target_channels]
        )
        self._wrappers: dict[str, SFTConv2d] = {}

    @classmethod
    def from_unet(cls, unet: nn.Module, cond_channels: int = 256, hidden_channels: int = 128) -> "SFTAdapter":
        """Fresh (official, PyTorch-default initialised) SFT layers for every resnet of ``unet``."""
        targets = _resnet_targets(unet)
        return cls(
            target_modules=tuple(t[0] for t in targets),
            target_levels=tuple(t[1] for t in targets),
            target_channels=tuple(t[2] for t in targets),
            cond_channels=cond_channels,
            hidden_channels=hidden_channels,
        )

    @property
    def num_levels(self) -> int:
        return max(self.config.target_levels) + 1 if self.config.target_levels else 0

    # ----------------------------------------------------------------------------------------------- attach/detach
    def is_attached(self, unet: nn.Module | None = None) -> bool:
        if not self._wrappers:
            return False
        if unet is None:
            return True
        name = self.config.target_modules[0]
        return unet.get_submodule(name) is self._wrappers.get(name)

    def attach(self, unet: nn.Module) -> None:
        """Wrap every target ``conv2`` of ``unet`` with its SFT layer (in place). Attach before ``accelerator.prepare``."""
        if self._wrappers:
            raise RuntimeError("this SFTAdapter is already attached; call detach(unet) first")
        modules = dict(unet.named_modules())
        missing = [name for name in self.config.target_modules if name not in modules]
        if missing:
            raise ValueError(f"the UNet has no module(s) {missing[:5]}: this adapter was built for another UNet layout")
        targets = zip(self.config.target_modules, self.layers, self.config.target_channels, strict=True)
        for name, layer, channels in targets:
            conv = modules[name]
            if isinstance(conv, SFTConv2d):
                raise RuntimeError(f"{name} is already wrapped by another SFT adapter")
            if conv.out_channels != channels:
                raise ValueError(f"{name} has {conv.out_channels} channels but this adapter expects {channels}")
            if conv.weight.device.type != "meta":  # sequential offload keeps the UNet's weights in its hooks
                layer.to(device=conv.weight.device)
            wrapper = SFTConv2d(conv, layer, name)
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, wrapper)
            self._wrappers[name] = wrapper

    def detach(self, unet: nn.Module) -> None:
        """Put the original ``conv2`` modules back; the UNet's ``state_dict`` is then the stock one again."""
        for name, wrapper in self._wrappers.items():
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            if getattr(parent, child) is not wrapper:
                raise RuntimeError(f"{name} of this UNet is not wrapped by this adapter")
            wrapper.condition = None
            setattr(parent, child, wrapper.base_layer)
        self._wrappers = {}

    @contextlib.contextmanager
    def attached(self, unet: nn.Module) -> Iterator["SFTAdapter"]:
        """``with adapter.attached(unet): ...`` attaches for the block and always detaches afterwards."""
        self.attach(unet)
        try:
            yield self
        finally:
            self.detach(unet)

    # -------------------------------------------------------------------------------------------------- condition
    def set_condition(self, features: Sequence[torch.Tensor] | None) -> None:
        """Give every attached SFT layer its encoder feature (``features[level]``), or clear them with ``None``."""
        if not self._wrappers:
            raise RuntimeError("attach the SFTAdapter to a UNet before setting its condition")
        if features is not None and len(features) < self.num_levels:
            raise ValueError(f"expected {self.num_levels} encoder feature maps, got {len(features)}")
        for name, level in zip(self.config.target_modules, self.config.target_levels, strict=True):
            self._wrappers[name].condition = None if features is None else features[level]
