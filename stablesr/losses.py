"""Losses of StableSR's CFW stage (stage 2): L1 + LPIPS reconstruction and a hinge patch-GAN.

The official CFW training (IceClear/StableSR ``ldm/modules/losses/contperceptual.py:LPIPSWithDiscriminator`` @398ee93,
built on taming-transformers' ``LPIPS``, ``NLayerDiscriminator`` and ``hinge_d_loss``) optimises

    generator:      mean(|gt - x|) + lpips_weight * LPIPS_vgg(gt, x) + disc_weight * factor(step) * (-mean(D(x)))
    discriminator:  factor(step) * 0.5 * (mean(relu(1 - D(gt))) + mean(relu(1 + D(x.detach()))))

with ``factor(step) = 1`` once ``step >= disc_start`` (0 before). The official ``disc_weight`` is "adaptive", but its
gradient probe targets the frozen ``decoder.conv_out.weight``, raises, and falls back to the fixed ``disc_weight``
(0.025), so a fixed weight is the faithful port. Everything here is written from those formulas; no code is copied.

Perceptual losses share one interface: ``module(input, target) -> (B, 1, 1, 1)`` with images in [-1, 1], frozen.
[`build_perceptual_loss`] picks one by name (``"vgg"``: LPIPS-VGG, the official loss; ``"tiny"``: a random stand-in
for tests only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.utils import logging
from torch import nn

logger = logging.get_logger(__name__)

__all__ = [
    "LPIPS",
    "LPIPS_VGG_LIN_SHA256",
    "LPIPS_VGG_LIN_URL",
    "PERCEPTUAL_NETS",
    "NLayerDiscriminator",
    "TinyFeatures",
    "VGG16Features",
    "build_perceptual_loss",
    "disc_factor",
    "hinge_d_loss",
    "hinge_g_loss",
    "load_lpips_lin_weights",
    "reconstruction_loss",
]

PERCEPTUAL_NETS = ("vgg", "tiny")

# LPIPS v0.1 linear heads for VGG16 (richzhang/PerceptualSimilarity, BSD-2-Clause). taming-transformers downloads the
# same file as ``vgg.pth`` (its md5 d507d7349b931f0638a25a48a722f98a matches), so this is the official CFW loss.
LPIPS_VGG_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LPIPS_VGG_LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

# LPIPS input normalisation (the "ScalingLayer" of LPIPS v0.1): images in [-1, 1] -> roughly ImageNet-normalised.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features indices that end at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG16_CHANNELS = (64, 128, 256, 512, 512)


# ----------------------------------------------------------------------------------------------------------------------
# GAN terms
# ----------------------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))``.

    Minimising it pushes real logits above +1 and fake logits below -1; it is 0 once both margins hold.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Adversarial loss of the generator in the hinge GAN: ``-mean(D(fake))`` (push fake logits up)."""
    return -logits_fake.mean()


def disc_factor(global_step: int, disc_start: int, factor: float = 1.0) -> float:
    """GAN on/off switch: ``factor`` once ``global_step >= disc_start``, else 0 (taming's ``adopt_weight``).

    ``global_step`` counts finished optimizer updates, so with ``disc_start=501`` updates 0..500 are pure L1 + LPIPS.
    """
    return factor if global_step >= disc_start else 0.0


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, perceptual: nn.Module | None, lpips_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official reconstruction term ``mean(|target - x|) + lpips_weight * mean(LPIPS(target, x))``.

    The official code adds the per-image LPIPS (B, 1, 1, 1) to the per-pixel L1 map and then takes ``mean / B``; with
    its batch of 1 per GPU that is exactly this. We keep the plain mean for every batch size, so the loss scale does
    not depend on how a global batch is split into per-device batches and accumulation steps.

    Args:
        reconstruction: (B, 3, H, W) decoded image in [-1, 1] (not clamped).
        target: (B, 3, H, W) ground truth in [-1, 1].
        perceptual: A module from [`build_perceptual_loss`], or `None` to skip the perceptual term.
        lpips_weight: Weight of the perceptual term (official 1.0).

    Returns:
        ``(total, l1, lpips)`` scalars; ``lpips`` is 0 without a perceptual module.
    """
    l1 = (reconstruction.float() - target.float()).abs().mean()
    if perceptual is None or lpips_weight == 0:
        p_loss = torch.zeros((), device=l1.device)
    else:
        p_loss = perceptual(reconstruction.float(), target.float()).mean()
    return l1 + lpips_weight * p_loss, l1, p_loss


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator as used by taming-transformers / StableSR's CFW loss (``n_layers=3``).

    Layout (``C = base_channels``, 4x4 convs, padding 1): conv(in->C, stride 2) + LeakyReLU(0.2); then for
    ``n = 1 .. num_layers - 1``: conv(stride 2, no bias) + BatchNorm + LeakyReLU with ``C * min(2**n, 8)`` channels;
    then one stride-1 conv (no bias) + BatchNorm + LeakyReLU to ``C * min(2**num_layers, 8)``; then a stride-1 conv to
    one logit per patch. For a 512 input and 3 layers that is a (B, 1, 62, 62) logit map. The layers sit in
    ``self.main`` with taming's indices, so taming / official ``loss.discriminator.*`` weights load with
    ``load_state_dict`` after stripping the prefix. Initialisation as taming's ``weights_init``: conv weights
    N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0.

    BatchNorm runs in training mode during training (batch statistics of each call), as in the official code.

    Args:
        in_channels (`int`): Image channels.
        base_channels (`int`): Width of the first layer (taming ``ndf``, 64).
        num_layers (`int`): Number of stride-2 stages (official 3).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev, mult = mult, min(2**num_layers, 8)
        layers += [
            nn.Conv2d(base_channels * prev, base_channels * mult, kernel_size=4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(base_channels * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(base_channels * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image in [-1, 1] -> (B, 1, h, w) patch logits (real > 0 > fake after training)."""
        return self.main(image)


# ----------------------------------------------------------------------------------------------------------------------
# Perceptual loss
# ----------------------------------------------------------------------------------------------------------------------


def _normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al., CVPR 2018) on any frozen feature backbone.

    ``d(x, y) = sum_l mean_hw( w_l . (n(f_l(s(x))) - n(f_l(s(y))))**2 )`` where ``s`` is the LPIPS input scaling,
    ``f_l`` the backbone's feature maps, ``n`` unit-normalises every pixel's channel vector and ``w_l`` are
    non-negative per-channel weights (1x1 convs without bias).

    Args:
        backbone (`nn.Module`): Maps a (B, 3, H, W) image to a list of feature maps.
        channels (`Sequence[int]`): Channels of each feature map.
        lin_weights (`Sequence[torch.Tensor]`, *optional*): One (1, C_l, 1, 1) weight per level; ones when `None`
            (the unweighted "baseline" variant).
    """

    def __init__(
        self, backbone: nn.Module, channels: Sequence[int], lin_weights: Sequence[torch.Tensor] | None = None
    ):
        super().__init__()
        self.backbone = backbone
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)
        with torch.no_grad():
            for index, lin in enumerate(self.lins):
                if lin_weights is None:
                    lin.weight.fill_(1.0)
                else:
                    if tuple(lin_weights[index].shape) != tuple(lin.weight.shape):
                        raise ValueError(
                            f"LPIPS linear head {index}: expected weight shape {tuple(lin.weight.shape)}, got "
                            f"{tuple(lin_weights[index].shape)}"
                        )
                    lin.weight.copy_(lin_weights[index])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always evaluation mode: the loss must not change with the trainer's train()/eval() calls.
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 1, 1, 1) distances (gradients flow to both inputs)."""
        feats_in = self.backbone((input - self.shift) / self.scale)
        feats_tg = self.backbone((target - self.shift) / self.scale)
        total = 0.0
        for lin, f_in, f_tg in zip(self.lins, feats_in, feats_tg, strict=True):
            diff = (_normalize_channels(f_in) - _normalize_channels(f_tg)).pow(2)
            total = total + lin(diff).mean(dim=(2, 3), keepdim=True)
        return total


class VGG16Features(nn.Module):
    """The five LPIPS taps (relu1_2 .. relu5_3) of a torchvision ``vgg16().features`` module.

    Args:
        features (`nn.Sequential`): ``torchvision.models.vgg16(weights=...).features``.
    """

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.slices = nn.ModuleList(nn.Sequential(*features[start:end]) for start, end in _VGG16_SLICES)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block in self.slices:
            image = block(image)
            out.append(image)
        return out


class TinyFeatures(nn.Module):
    """TEST-ONLY stand-in for VGG: three small random conv stages, frozen, seeded, no download.

    It has the shape of a perceptual loss (multi-scale, unit-normalised feature differences) but random features carry
    no perceptual meaning; never use it to train a model you care about.

    Args:
        channels (`Sequence[int]`): Width of each stage.
        seed (`int`): Seed of the random weights (the same seed gives the same loss everywhere).
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        stages = []
        in_channels = 3
        for index, out_channels in enumerate(channels):
            conv = nn.Conv2d(in_channels, out_channels, 3, stride=1 if index == 0 else 2, padding=1)
            with torch.no_grad():
                bound = (6.0 / (in_channels * 9)) ** 0.5  # He-uniform, so the ReLU features neither vanish nor blow up
                conv.weight.copy_(torch.empty_like(conv.weight).uniform_(-bound, bound, generator=generator))
                conv.bias.zero_()
            stages.append(nn.Sequential(conv, nn.ReLU()))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(channels)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            image = stage(image)
            out.append(image)
        return out


class _LPIPSPackage(nn.Module):
    """Adapter giving ``lpips.LPIPS`` (the ``lpips`` pip package) our ``(input, target)`` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _LPIPSPackage:
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(input, target)


def load_lpips_lin_weights(source: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """The five LPIPS-VGG linear heads, from a local ``vgg.pth`` or a URL (downloaded once into torch's hub cache).

    Args:
        source: Path or ``http(s)://`` URL of an LPIPS v0.1 ``vgg.pth`` (keys ``lin{i}.model.{j}.weight``, as in the
            ``lpips`` package and taming-transformers). Default: [`LPIPS_VGG_LIN_URL`], checked against its SHA-256.

    Returns:
        Five (1, C, 1, 1) tensors for relu1_2 .. relu5_3.
    """
    source = LPIPS_VGG_LIN_URL if source is None else os.fspath(source)
    if source.startswith(("http://", "https://")):
        cache = Path(torch.hub.get_dir()) / "checkpoints" / "lpips_v0.1_vgg.pth"
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            expected = LPIPS_VGG_LIN_SHA256 if source == LPIPS_VGG_LIN_URL else None
            torch.hub.download_url_to_file(source, str(cache), hash_prefix=expected, progress=False)
        path = cache
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights {path} not found; pass an LPIPS v0.1 vgg.pth file or URL")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    weights: dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"lin(\d)\.model\.\d\.weight", key)
        if match:
            weights[int(match.group(1))] = value.float()
    if sorted(weights) != list(range(len(_VGG16_CHANNELS))):
        raise ValueError(
            f"{path} is not an LPIPS v0.1 VGG file: expected keys lin0..lin4 '.model.*.weight', got {sorted(state_dict)}"
        )
    return [weights[index] for index in range(len(_VGG16_CHANNELS))]


def _build_vgg_lpips(lpips_weights: str | os.PathLike | None) -> nn.Module:
    if lpips_weights is None:
        try:
            import lpips  # the reference implementation; ships the linear heads, loads VGG16 through torchvision
        except ImportError:
            lpips = None
        except Exception as err:  # e.g. a torchvision that does not match the installed torch
            logger.warning(f"`import lpips` failed ({type(err).__name__}: {err}); trying torchvision directly")
            lpips = None
        if lpips is not None:
            return _LPIPSPackage(lpips.LPIPS(net="vgg", verbose=False))
    try:
        import torchvision
    except Exception as err:
        raise ImportError(
            "--lpips_net vgg (the official LPIPS-VGG loss) needs ImageNet VGG16 weights from torchvision, which could "
            f"not be imported here ({type(err).__name__}: {err}). Install one of:\n"
            "  pip install lpips            # the reference LPIPS package (pulls torchvision)\n"
            f"  pip install torchvision      # a build matching torch {torch.__version__}, see "
            "https://pytorch.org/get-started/locally/\n"
            "`--lpips_net tiny` exists only for tests: its random features are not a perceptual loss."
        ) from err
    features = torchvision.models.vgg16(weights="DEFAULT").features  # downloads ImageNet weights on first use
    return LPIPS(VGG16Features(features), _VGG16_CHANNELS, load_lpips_lin_weights(lpips_weights))


def build_perceptual_loss(net: str = "vgg", lpips_weights: str | os.PathLike | None = None) -> nn.Module:
    """A frozen perceptual loss ``module(input, target) -> (B, 1, 1, 1)`` for images in [-1, 1].

    Args:
        net: ``"vgg"``: LPIPS-VGG v0.1, the official CFW loss. Uses the ``lpips`` package when it imports, else
            torchvision's ImageNet VGG16 (``vgg16(weights="DEFAULT")``, downloaded once by torchvision) with the LPIPS
            linear heads from `lpips_weights`. Raises `ImportError` with install instructions when neither works.
            ``"tiny"``: TEST-ONLY random conv features ([`TinyFeatures`]) with unit heads; no download, no meaning.
        lpips_weights: For ``"vgg"``: path or URL of the LPIPS v0.1 ``vgg.pth`` linear heads. Given, torchvision is
            used even if ``lpips`` is installed. Default: the ``lpips`` package's own, else [`LPIPS_VGG_LIN_URL`].
    """
    if net == "vgg":
        return _build_vgg_lpips(lpips_weights)
    if net == "tiny":
        backbone = TinyFeatures()
        return LPIPS(backbone, backbone.channels)
    raise ValueError(f"unknown perceptual net {net!r}; choose one of {PERCEPTUAL_NETS}")
