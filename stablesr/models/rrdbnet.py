"""RRDBNet, the ESRGAN / Real-ESRGAN generator, as the Real-ESRGAN baseline of ``stablesr evaluate`` and the fidelity
curve.

The architecture follows BasicSR ``basicsr/archs/rrdbnet_arch.py:RRDBNet`` (used by xinntao/Real-ESRGAN for
``RealESRGAN_x4plus.pth``, ``RealESRNet_x4plus.pth``, ``RealESRGAN_x4plus_anime_6B.pth`` and ``RealESRGAN_x2plus.pth``)
with the same parameter names, so the official state dicts load one to one: ``conv_first`` -> ``body`` (``num_block``
[`RRDB`]) -> ``conv_body`` + skip -> two nearest x2 upsamplings, each followed by a conv (``conv_up1``, ``conv_up2``)
and LeakyReLU(0.2) -> ``conv_hr`` -> LeakyReLU -> ``conv_last``. The trunk always upsamples x4; the x2 and x1 models
pixel-unshuffle the input by 2 and 4 first (so their ``conv_first`` reads 4 or 16 times the input channels).

[`RRDB`] and [`ResidualDenseBlock`] are also the building blocks of the CFW fusion ([`stablesr.models.cfw`], which
re-exports them under their old names). BasicSR is not a dependency: the test suite checks this port against it on
recorded vectors (``tests/fixtures/make_rrdbnet_vector.py``).

Checkpoints are read without executing code: ``torch.load(..., weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "RRDB",
    "RRDBNet",
    "RRDBNetLoadError",
    "RealESRGANUpscaler",
    "ResidualDenseBlock",
    "load_rrdbnet",
    "rrdbnet_config_from_state_dict",
    "rrdbnet_upscale",
]

# The trunk upsamples x4; the x2 / x1 models pixel-unshuffle the input by this factor first.
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


class ResidualDenseBlock(nn.Module):
    """ESRGAN residual dense block: 5 densely connected 3x3 convs, LeakyReLU(0.2), output ``0.2 * x5 + x``.

    Port of BasicSR ``basicsr/archs/rrdbnet_arch.py:ResidualDenseBlock`` (BasicSR is not a dependency). Its
    initialisation matters only for training from scratch: BasicSR's ``default_init_weights(..., 0.1)`` draws every
    conv weight from kaiming-normal (fan_in, gain sqrt(2)) and scales it by 0.1, with zero bias.

    Args:
        channels (`int`): Feature channels in and out.
        growth_channels (`int`): Channels added by each of the first four convs.
    """

    def __init__(self, channels: int, growth_channels: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, growth_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels + growth_channels, growth_channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels + 2 * growth_channels, growth_channels, 3, padding=1)
        self.conv4 = nn.Conv2d(channels + 3 * growth_channels, growth_channels, 3, padding=1)
        self.conv5 = nn.Conv2d(channels + 4 * growth_channels, channels, 3, padding=1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            if conv.weight.is_meta:  # built to receive a checkpoint (load_rrdbnet): init on meta is slow and void
                continue
            nn.init.kaiming_normal_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = [hidden_states]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, dim=1)), negative_slope=0.2))
        return self.conv5(torch.cat(features, dim=1)) * 0.2 + hidden_states


class RRDB(nn.Module):
    """Residual-in-residual dense block: three [`ResidualDenseBlock`] in a row, output ``0.2 * rdb3(...) + x``.

    Port of BasicSR ``basicsr/archs/rrdbnet_arch.py:RRDB`` (submodule names ``rdb1..rdb3`` kept).

    Args:
        channels (`int`): Feature channels in and out.
        growth_channels (`int`): Growth channels of each dense block.
    """

    def __init__(self, channels: int, growth_channels: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(channels, growth_channels)
        self.rdb2 = ResidualDenseBlock(channels, growth_channels)
        self.rdb3 = ResidualDenseBlock(channels, growth_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(hidden_states))) * 0.2 + hidden_states


class RRDBNet(nn.Module):
    """The ESRGAN / Real-ESRGAN generator (BasicSR ``RRDBNet``), parameter names as in the official ``.pth`` files.

    ``RealESRGAN_x4plus``: ``RRDBNet(scale=4, num_feat=64, num_block=23, num_grow_ch=32)``; the anime model has
    ``num_block=6``; ``RealESRGAN_x2plus`` has ``scale=2``. Use [`load_rrdbnet`] to build one from a checkpoint.

    Args:
        in_channels (`int`): Image channels in (3).
        out_channels (`int`): Image channels out (3).
        scale (`int`): 4, 2 or 1; the output is ``scale`` times the input size. For 2 and 1 the input is
            pixel-unshuffled by 2 / 4 first, so its height and width must be multiples of 2 / 4
            ([`rrdbnet_upscale`] pads them).
        num_feat (`int`): Feature channels of the trunk.
        num_block (`int`): Number of [`RRDB`] in ``body``.
        num_grow_ch (`int`): Growth channels of the dense blocks.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be 4, 2 or 1, got {scale!r}")
        if min(in_channels, out_channels, num_feat, num_block, num_grow_ch) < 1:
            raise ValueError("RRDBNet channel and block counts must be positive")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "scale": scale, "num_feat": num_feat,
                       "num_block": num_block, "num_grow_ch": num_grow_ch}
        self.scale = scale
        self.conv_first = nn.Conv2d(in_channels * _UNSHUFFLE[scale] ** 2, num_feat, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, out_channels, 3, padding=1)

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (1 for x4, 2 for x2, 4 for x1)."""
        return _UNSHUFFLE[self.scale]

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """
        Args:
            sample (`torch.Tensor`): (B, C, H, W), nominally in [0, 1]; H and W multiples of `input_multiple`.

        Returns:
            `torch.Tensor`: (B, out_channels, scale * H, scale * W), unclamped.
        """
        factor = self.input_multiple
        if factor > 1:
            if sample.shape[-2] % factor or sample.shape[-1] % factor:
                raise ValueError(
                    f"an x{self.scale} RRDBNet needs height and width divisible by {factor}, got "
                    f"{tuple(sample.shape[-2:])}; pad the input (rrdbnet_upscale does)"
                )
            sample = F.pixel_unshuffle(sample, factor)
        hidden_states = self.conv_first(sample)
        hidden_states = hidden_states + self.conv_body(self.body(hidden_states))
        for conv in (self.conv_up1, self.conv_up2):
            hidden_states = F.interpolate(hidden_states, scale_factor=2, mode="nearest")
            hidden_states = F.leaky_relu(conv(hidden_states), negative_slope=0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(hidden_states), negative_slope=0.2))


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


class RRDBNetLoadError(ValueError):
    """A checkpoint that is not a loadable RRDBNet state dict (the message says why and what to do)."""


_TOP_LEVEL = ("conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last")


def _read_checkpoint(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise RRDBNetLoadError(f"{path} is not a readable .safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = (found.group(1) if found else text.strip().split("\n")[0]).split(" Please use")[0].strip()
        if "Unsupported global" in detail or "GLOBAL" in detail:
            raise RRDBNetLoadError(
                f"{path} contains pickled Python objects besides tensors, which torch.load(weights_only=True) refuses "
                f"({detail}). stablesr never unpickles code from a checkpoint. Save only the state dict "
                "(torch.save({'params_ema': model.state_dict()}, path)) or convert it to .safetensors in a trusted "
                "environment."
            ) from None
        detail = detail or type(err).__name__
        raise RRDBNetLoadError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse an untrusted file is "not a checkpoint"
        if isinstance(err, OSError):
            raise
        raise RRDBNetLoadError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _select_state_dict(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """``params_ema``, then ``params``, then the dict itself when it holds tensors (BasicSR / Real-ESRGAN layout)."""
    if not isinstance(data, Mapping):
        raise RRDBNetLoadError(f"{path} holds a {type(data).__name__}, not a state dict")
    for key in ("params_ema", "params"):
        if isinstance(data.get(key), Mapping):
            data = data[key]
            break
    else:
        if not any(isinstance(v, torch.Tensor) for v in data.values()):
            raise RRDBNetLoadError(
                f"{path} has no 'params_ema' or 'params' entry and no tensors at its top level (keys: "
                f"{', '.join(map(str, list(data)[:10]))}); expected a BasicSR / Real-ESRGAN RRDBNet checkpoint"
            )
    state_dict = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DataParallel wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def rrdbnet_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The [`RRDBNet`] arguments of a state dict, read from its tensor shapes (x4plus: 64 / 23 / 32, scale 4).

    The scale follows from ``conv_first`` reading 1, 4 or 16 times the output channels (the input is pixel-unshuffled
    by 1, 2 or 4), assuming as many input as output channels (RGB in, RGB out).

    Raises:
        `RRDBNetLoadError`: the keys or shapes are not those of an RRDBNet (the message names the missing keys).
    """
    missing = [f"{name}.weight" for name in _TOP_LEVEL if f"{name}.weight" not in state_dict]
    has_body = any(k.startswith("body.") for k in state_dict)
    if "conv_first.weight" not in state_dict or "conv_last.weight" not in state_dict or not has_body:
        sample = ", ".join(list(state_dict)[:6]) or "none"
        hint = ""
        if "body.0.weight" in state_dict:
            hint = " (it looks like an SRVGGNetCompact model such as realesr-general-x4v3, which is not supported)"
        raise RRDBNetLoadError(
            f"not an RRDBNet (ESRGAN / Real-ESRGAN x4plus-style) state dict{hint}: missing "
            f"{', '.join(missing) or 'body.*'}; its first keys are {sample}"
        )
    first, last = state_dict["conv_first.weight"], state_dict["conv_last.weight"]
    if first.ndim != 4 or last.ndim != 4:
        raise RRDBNetLoadError("conv_first.weight / conv_last.weight are not conv weights (4-d tensors)")
    num_feat, first_in = int(first.shape[0]), int(first.shape[1])
    out_channels = int(last.shape[0])
    ratio = first_in / out_channels
    scales = {factor**2: scale for scale, factor in _UNSHUFFLE.items()}
    if ratio not in scales:
        raise RRDBNetLoadError(
            f"conv_first reads {first_in} channels for {out_channels} output channels; an RRDBNet reads 1x (scale 4), "
            "4x (scale 2) or 16x (scale 1) its image channels"
        )
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.", k))}
    grow = state_dict.get("body.0.rdb1.conv1.weight")
    if grow is None or not blocks:
        raise RRDBNetLoadError("missing body.0.rdb1.conv1.weight: the body is not a sequence of RRDB blocks")
    return {"in_channels": out_channels, "out_channels": out_channels, "scale": scales[ratio], "num_feat": num_feat,
            "num_block": max(blocks) + 1, "num_grow_ch": int(grow.shape[0])}


def load_rrdbnet(path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> RRDBNet:
    """Build an [`RRDBNet`] from a BasicSR / Real-ESRGAN checkpoint, in eval mode, without executing code.

    Accepts a ``.pth`` read with ``torch.load(weights_only=True)`` (the weights under ``params_ema``, else ``params``,
    else a bare state dict) or a ``.safetensors`` state dict. The architecture is inferred from the tensor shapes
    ([`rrdbnet_config_from_state_dict`]) and every key must match (strict).

    Raises:
        `FileNotFoundError`: no such file.
        `RRDBNetLoadError`: unreadable file, pickled objects refused by ``weights_only``, or not an RRDBNet state dict
            (missing / unexpected keys and shape mismatches are named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Real-ESRGAN weights '{path}' do not exist (e.g. RealESRGAN_x4plus.pth)")
    state_dict = _select_state_dict(_read_checkpoint(path), path)
    config = rrdbnet_config_from_state_dict(state_dict)
    with torch.device("meta"):  # no init work: every tensor is assigned from the checkpoint
        model = RRDBNet(**config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise RRDBNetLoadError(f"{path} does not match an RRDBNet with {config}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise RRDBNetLoadError(f"{path}: shape mismatch for an RRDBNet with {config}: {', '.join(wrong[:5])}")
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------------------


def _pad_to_multiple(sample: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom / right to multiples of ``multiple``: reflect as Real-ESRGAN does, replicate when too small."""
    pad_h = -sample.shape[-2] % multiple
    pad_w = -sample.shape[-1] % multiple
    if not pad_h and not pad_w:
        return sample
    mode = "reflect" if pad_h < sample.shape[-2] and pad_w < sample.shape[-1] else "replicate"
    return F.pad(sample, (0, pad_w, 0, pad_h), mode=mode)


@torch.no_grad()
def rrdbnet_upscale(model: RRDBNet, lq: torch.Tensor, tile_size: int | None = 512, tile_pad: int = 10) -> torch.Tensor:
    """Run `model` on a batch, tile by tile for big inputs (Real-ESRGAN's ``tile`` / ``tile_pad`` scheme).

    The input is padded at the bottom / right to a multiple of ``model.input_multiple`` (reflect), then split into
    ``tile_size`` x ``tile_size`` tiles; each tile is run with ``tile_pad`` extra input pixels of context on every side
    (inside the image) and only its own area of the output is kept, so device memory is bounded by one padded tile.
    The output is cropped to ``scale`` x the input size and clamped to [0, 1]. Tiles change the result slightly near
    tile borders when ``tile_pad`` is smaller than the network's receptive field (as in Real-ESRGAN).

    Args:
        model (`RRDBNet`): The network (its device and dtype are used).
        lq (`torch.Tensor`): (B, C, H, W) in [0, 1].
        tile_size (`int`, *optional*): Tile side in input pixels; `None` or 0 runs the whole image at once (also
            when it fits in one tile). Rounded up to a multiple of ``model.input_multiple``.
        tile_pad (`int`): Context pixels around each tile (Real-ESRGAN default 10), rounded up likewise.

    Returns:
        `torch.Tensor`: (B, out_channels, scale * H, scale * W) in [0, 1], on the model's device, float32.
    """
    if lq.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(lq.shape)}")
    if tile_size is not None and tile_size < 0 or tile_pad < 0:
        raise ValueError(f"tile_size and tile_pad must be >= 0, got {tile_size} and {tile_pad}")
    param = next(model.parameters())
    scale, multiple = model.scale, model.input_multiple
    height, width = lq.shape[-2:]
    sample = _pad_to_multiple(lq.to(device=param.device, dtype=param.dtype), multiple)
    padded_h, padded_w = sample.shape[-2:]
    if not tile_size or (padded_h <= tile_size and padded_w <= tile_size):
        output = model(sample)
    else:
        tile = math.ceil(tile_size / multiple) * multiple
        pad = math.ceil(tile_pad / multiple) * multiple
        output = sample.new_zeros((sample.shape[0], model.conv_last.out_channels, padded_h * scale, padded_w * scale))
        for top in range(0, padded_h, tile):
            for left in range(0, padded_w, tile):
                bottom, right = min(top + tile, padded_h), min(left + tile, padded_w)
                ctx_top, ctx_left = max(top - pad, 0), max(left - pad, 0)
                ctx_bottom, ctx_right = min(bottom + pad, padded_h), min(right + pad, padded_w)
                result = model(sample[..., ctx_top:ctx_bottom, ctx_left:ctx_right])
                y0, x0 = (top - ctx_top) * scale, (left - ctx_left) * scale
                output[..., top * scale:bottom * scale, left * scale:right * scale] = result[
                    ..., y0:y0 + (bottom - top) * scale, x0:x0 + (right - left) * scale]
    return output[..., : height * scale, : width * scale].float().clamp_(0, 1)


class RealESRGANUpscaler:
    """Real-ESRGAN as an image-to-image baseline: PIL RGB in, PIL RGB of exactly the requested size out.

    The model runs at its own scale ([`rrdbnet_upscale`]); its output is rounded to 8 bits (as Real-ESRGAN writes
    files). When that is not the requested size (an x4 model for an x2 request, or a non-integer ratio) it is then
    resized with PIL bicubic, which is antialiased when shrinking; [`upscale`] says so in its note.

    Args:
        model (`RRDBNet`): The network, e.g. from [`load_rrdbnet`].
        tile_size (`int`, *optional*): See [`rrdbnet_upscale`] (default 512 input pixels; 0 / `None`: no tiling).
        tile_pad (`int`): See [`rrdbnet_upscale`].
        weights (`str`, *optional*): The checkpoint path, for reports.
    """

    key = "realesrgan"
    label = "Real-ESRGAN"

    def __init__(self, model: RRDBNet, tile_size: int | None = 512, tile_pad: int = 10, weights: str | None = None):
        self.model = model
        self.tile_size = tile_size or None
        self.tile_pad = tile_pad
        self.weights = weights

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu", tile_size: int | None = 512,
                  tile_pad: int = 10) -> RealESRGANUpscaler:
        """[`load_rrdbnet`] on `device`, wrapped (errors as there)."""
        return cls(load_rrdbnet(path, device=device), tile_size, tile_pad, weights=str(path))

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings for reports: weights, architecture, tiling, device."""
        return {"name": self.key, "label": self.label, "weights": self.weights, "model": dict(self.model.config),
                "tile_size": self.tile_size, "tile_pad": self.tile_pad,
                "device": str(next(self.model.parameters()).device)}

    def upscale(self, image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
        """Upscale an RGB image to ``size`` (width, height).

        Returns:
            ``(image, note)``: the 8-bit RGB result and ``None``, or a note saying that the model's output was
            resized (from which size to which) because the model scale does not give ``size``.
        """
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        lq = torch.from_numpy(array).permute(2, 0, 1)[None]
        out = rrdbnet_upscale(self.model, lq, self.tile_size, self.tile_pad)[0]
        pixels = out.mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        result = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
        if result.size == tuple(size):
            return result, None
        note = (f"the x{self.model.scale} model's {result.width}x{result.height} output was resized to "
                f"{size[0]}x{size[1]} (PIL bicubic, antialiased when shrinking)")
        return result.resize(tuple(size), Image.Resampling.BICUBIC), note
