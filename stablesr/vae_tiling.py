"""Tiled VAE encode and tiled CFW decode, so restoring any image size needs bounded memory.

Why our own loops instead of ``AutoencoderKL.enable_tiling()``: the CFW decoder needs, for every decoded tile, the
VAE-encoder features of the same region of the low-quality image. diffusers' tiled decode cannot hand per-tile
features to the decoder, and keeping full-resolution CFW features costs 96 floats per pixel (SD VAE levels 1 and
2: 256 channels at H/2 and 512 at H/4; 384 MB at 1024^2, 6 GB at 4096^2 in fp32). Here each decode tile recomputes
its CFW features from a crop of the low-quality image with a margin, so nothing full-resolution is kept but the
image buffers themselves. Images that fit one tile are decoded in one pass and can reuse the features of the encoder
pass that gave their LQ latent ([`CFWAdapter.encode_features`] returns both), so they are encoded only once.

Tiles come from [`stablesr.tiling.pixel_tile_grid`]: the official tile count per axis, but balanced tiles of one
size instead of a last tile snapped to the border (at 2048^2 with 1024-px tiles: 1.14x the image area to decode
instead of 2.25x). They overlap and are blended with linear ramps ([`stablesr.tiling.blend_weights`]). GroupNorm
statistics are per tile, so tiled results differ slightly from untiled ones (measured in the tests as PSNR; smaller
tiles differ a little more: 14.6 vs 15.2 dB on the random test VAE, diffusers' tiled VAE 14.3 dB); images that fit
in one tile take the exact untiled path.

Out of memory on the GPU: [`with_smaller_tiles`] runs an encode or decode again with half the tile (an untiled pass
becomes tiles of half the image), down to [`MIN_TILE_SIZE`] pixels, with a warning each time. The retry starts the
pass over, so its result is exactly that of a run started with the smaller tile.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging

from .models.cfw import CFWAdapter
from .tiling import blend_weights, pixel_tile_grid

logger = logging.get_logger(__name__)

# Smallest VAE tile (pixels) the out-of-memory fallback goes down to; smaller tiles blend visibly worse.
MIN_TILE_SIZE = 128
T = TypeVar("T")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an accelerator out-of-memory error (CUDA's ``torch.OutOfMemoryError``, or MPS's)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "MPS backend out of memory" in str(err)
    )


def release_cached_memory() -> None:
    """Hand the allocator's cached blocks back after an out-of-memory error (CUDA only; a no-op elsewhere)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_smaller_tiles(
    run: Callable[[int | None, int], T],
    height: int,
    width: int,
    tile_size: int | None,
    tile_overlap: int,
    factor: int,
    what: str,
) -> T:
    """``run(tile_size, tile_overlap)``, run again with half the tile after each out-of-memory error.

    An untiled pass (the image fits ``tile_size``, or ``tile_size`` is None) is retried with tiles of half the
    image's longer side. Each retry logs a warning. Below [`MIN_TILE_SIZE`] pixels it gives up with an error naming
    the settings to lower. ``what`` names the pass in messages ("VAE decode").
    """
    while True:
        try:
            return run(tile_size, tile_overlap)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(err):
                raise
        # Outside the except block: the failed attempt's tensors (held by the traceback) are released by now.
        release_cached_memory()
        current = max(height, width) if fits_one_tile(height, width, tile_size) else tile_size
        smaller = current // 2 // factor * factor
        if smaller < MIN_TILE_SIZE:
            raise torch.OutOfMemoryError(
                f"out of memory in the {what} even with {current}-px tiles (the fallback stops at {MIN_TILE_SIZE} "
                "px): use --dtype fp16 or bf16, a smaller --upscale or input, or free GPU memory"
            )
        logger.warning(
            f"out of memory in the {what} with {'no tiles' if current != tile_size else f'{current}-px tiles'}; "
            f"retrying with {smaller}-px tiles (pass vae_tile_size={smaller}, CLI --vae-tile-size {smaller}, to "
            "start there)"
        )
        tile_size, tile_overlap = smaller, min(tile_overlap, smaller // 2 // factor * factor)


def _vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def fits_one_tile(height: int, width: int, tile_size: int | None) -> bool:
    """Whether an image of ``height`` x ``width`` pixels takes the untiled path (``tile_size`` None = never tile)."""
    return tile_size is None or (height <= tile_size and width <= tile_size)


def encode_moments(
    vae: AutoencoderKL, image: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` of the raw (unscaled) latent of ``image`` ((B, 3, H, W) in [-1, 1]).

    With ``tile_size`` (pixels) and an image larger than it, the encoder runs per overlapping tile and the moments
    are blended; otherwise it is one ``vae.encode`` call.
    """
    factor = _vae_factor(vae)
    height, width = image.shape[-2:]
    if fits_one_tile(height, width, tile_size):
        dist = vae.encode(image).latent_dist
        return dist.mean, dist.std
    _check_tiles(tile_size, tile_overlap, factor)
    lh, lw = height // factor, width // factor
    latent_channels = vae.config.latent_channels
    mean = torch.zeros(image.shape[0], latent_channels, lh, lw, device=image.device, dtype=torch.float32)
    logvar = torch.zeros_like(mean)
    weight_sum = torch.zeros(1, 1, lh, lw, device=image.device, dtype=torch.float32)
    overlap_l = tile_overlap // factor
    for y0, y1, x0, x1 in pixel_tile_grid(height, width, tile_size, tile_overlap, align=factor):
        dist = vae.encode(image[..., y0:y1, x0:x1]).latent_dist
        box = (slice(None), slice(None), slice(y0 // factor, y1 // factor), slice(x0 // factor, x1 // factor))
        w = blend_weights((y1 - y0) // factor, (x1 - x0) // factor, overlap_l, overlap_l).to(mean)
        mean[box] += dist.mean.float() * w
        logvar[box] += dist.logvar.float() * w
        weight_sum[box] += w
    mean /= weight_sum
    logvar /= weight_sum
    return mean.to(image.dtype), torch.exp(0.5 * logvar).to(image.dtype)


def decode(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    lq_image: torch.Tensor | None = None,
    cfw_adapter: CFWAdapter | None = None,
    fidelity_weight: float = 0.0,
    tile_size: int | None = None,
    tile_overlap: int = 64,
    encoder_features: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode raw (unscaled) ``latents`` to an image in [-1, 1] (unclamped), with CFW when an adapter is given.

    Args:
        latents: (B, 4, h, w) raw latents (already divided by the scaling factor).
        lq_image: (B, 3, 8h, 8w) low-quality image in [-1, 1] whose encoder features the CFW fuses; needed when
            ``fidelity_weight > 0``, unless the decode is untiled and ``encoder_features`` are given.
        tile_size / tile_overlap: decode tile and overlap in PIXELS; ``None`` or a small image decodes in one pass.
        encoder_features: the CFW features of the whole ``lq_image`` (e.g. from the encoder pass that gave the LQ
            latent, [`CFWAdapter.encode_features`]), used by the untiled path instead of encoding ``lq_image`` again.
            The tiled path ignores them and encodes each tile's LQ crop.
    """
    factor = _vae_factor(vae)
    use_cfw = cfw_adapter is not None and fidelity_weight > 0
    height, width = latents.shape[-2] * factor, latents.shape[-1] * factor
    untiled = fits_one_tile(height, width, tile_size)
    if use_cfw and lq_image is None and (encoder_features is None or not untiled):
        raise ValueError(
            "CFW decoding with fidelity_weight > 0 needs the low-quality image (lq_image); only an untiled decode "
            "can use precomputed encoder_features instead"
        )
    if untiled:
        if not use_cfw:
            return vae.decode(latents).sample
        if encoder_features is None:
            encoder_features = cfw_adapter.encode_features(vae, lq_image).encoder_features
        return cfw_adapter.decode(vae, latents, encoder_features, fidelity_weight).sample

    _check_tiles(tile_size, tile_overlap, factor)
    out = torch.zeros(latents.shape[0], vae.config.out_channels, height, width, device=latents.device,
                      dtype=torch.float32)
    weight_sum = torch.zeros(1, 1, height, width, device=latents.device, dtype=torch.float32)
    # Margin of LQ context around each tile for the CFW encoder features (covers the encoder's receptive field up to
    # the fused levels well enough; beyond it only GroupNorm statistics differ).
    margin = 4 * factor * 4
    for y0, y1, x0, x1 in pixel_tile_grid(height, width, tile_size, tile_overlap, align=factor):
        tile_latents = latents[..., y0 // factor : y1 // factor, x0 // factor : x1 // factor]
        if use_cfw:
            cy0, cy1 = max(0, y0 - margin), min(height, y1 + margin)
            cx0, cx1 = max(0, x0 - margin), min(width, x1 + margin)
            feats = cfw_adapter.encode_features(vae, lq_image[..., cy0:cy1, cx0:cx1]).encoder_features
            crops = []
            for level, feat in zip(cfw_adapter.fusion_levels, feats, strict=True):
                s = 2**level
                crops.append(feat[..., (y0 - cy0) // s : (y1 - cy0) // s, (x0 - cx0) // s : (x1 - cx0) // s])
            tile = cfw_adapter.decode(vae, tile_latents, crops, fidelity_weight).sample
        else:
            tile = vae.decode(tile_latents).sample
        w = blend_weights(y1 - y0, x1 - x0, tile_overlap, tile_overlap).to(out)
        out[..., y0:y1, x0:x1] += tile.float() * w
        weight_sum[..., y0:y1, x0:x1] += w
    return (out / weight_sum).to(latents.dtype)


def _check_tiles(tile_size: int, tile_overlap: int, factor: int) -> None:
    if tile_size % factor or tile_overlap % factor:
        raise ValueError(
            f"VAE tile size ({tile_size}) and overlap ({tile_overlap}) must be multiples of {factor} pixels"
        )
    if not 0 <= tile_overlap < tile_size:
        raise ValueError(f"VAE tile overlap ({tile_overlap}) must be >= 0 and smaller than the tile ({tile_size})")
