"""Tile grids, tile weights and weighted blending for tiled latent diffusion and tiled VAE passes.

The latent-space rules reproduce the official StableSR "canvas" sampler (`p_mean_variance_canvas` and
`_gaussian_weights` in ``ldm/models/diffusion/ddpm.py``):

* Along one axis of length ``size`` with tile length ``tile`` and ``stride = tile - overlap``, the official code
  counts tiles with a loop equivalent to ``n = 1 + ceil(max(size - tile, 0) / stride)``: the smallest ``n`` with
  ``(n - 1) * stride + tile >= size``. Tile ``k < n - 1`` starts at ``k * stride``; the last one is snapped to
  ``size - tile`` so it ends exactly at the border (it may overlap its neighbour by more than ``overlap``). When
  ``size`` is reached exactly, the snapped start equals ``(n - 1) * stride`` and no extra tile is added.
* Tiles are processed with x (width) in the outer loop and y (height) in the inner loop.
* Each tile's model output is weighted by a separable Gaussian (sigma = 0.1 * tile, float64) and the canvas output
  is ``sum(weight * tile_out) / sum(weight)``.

Edge cases where the official code misbehaves and this module differs on purpose: ``overlap >= tile`` makes the
official counting loop never terminate (we raise `ValueError`), and ``size < tile`` gives a negative start and a
shape mismatch there (`tile_starts` raises; `tile_grid` falls back to one tile covering the whole, smaller, axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "TileAccumulator",
    "blend_weights",
    "gaussian_tile_weights",
    "pixel_tile_grid",
    "tile_grid",
    "tile_starts",
]

Box = tuple[int, int, int, int]

# Variance of the official Gaussian in units of the tile length squared (sigma = 0.1 * tile).
_GAUSSIAN_VAR = 0.01


def _check_tile_overlap(tile: int, overlap: int) -> None:
    if tile <= 0:
        raise ValueError(f"tile size must be a positive integer, got {tile}")
    if overlap < 0:
        raise ValueError(f"tile overlap must be >= 0, got {overlap}")
    if overlap >= tile:
        raise ValueError(
            f"tile overlap ({overlap}) must be smaller than the tile size ({tile}): the stride tile - overlap would be "
            f"<= 0; use an overlap of at most {tile - 1}"
        )


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """
    Start offsets of the tiles along one axis, following the official StableSR canvas rule.

    Args:
        size (`int`): Length of the axis (latent or pixel units); must be `>= tile`.
        tile (`int`): Tile length, `> 0`.
        overlap (`int`): Nominal overlap between neighbouring tiles, `0 <= overlap < tile`.

    Returns:
        `list[int]`: Increasing starts `[0, stride, 2 * stride, ..., size - tile]` with `stride = tile - overlap`; the
        last start is snapped to `size - tile`. A single `[0]` when `size == tile`.

    Raises:
        ValueError: if `tile <= 0`, `overlap < 0`, `overlap >= tile`, or `size < tile` (pad the input to at least
        `tile`, lower the tile size, or use [`tile_grid`], which covers a short axis with one smaller tile).
    """
    _check_tile_overlap(tile, overlap)
    if size < tile:
        raise ValueError(
            f"axis length {size} is smaller than the tile size {tile}: pad the input to at least {tile}, use a tile "
            f"size <= {size}, or use tile_grid(), which covers such an axis with a single tile"
        )
    stride = tile - overlap
    count = 1 + math.ceil((size - tile) / stride)
    return [k * stride for k in range(count - 1)] + [size - tile]


def _axis_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    _check_tile_overlap(tile, overlap)
    if size <= 0:
        raise ValueError(f"axis length must be positive, got {size}")
    if size <= tile:
        return [(0, size)]
    return [(start, start + tile) for start in tile_starts(size, tile, overlap)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """
    Tile boxes covering a `height x width` canvas, in the official StableSR processing order.

    Args:
        height (`int`): Canvas height, `> 0`.
        width (`int`): Canvas width, `> 0`.
        tile (`int`): Tile side length, `> 0`.
        overlap (`int`): Nominal overlap, `0 <= overlap < tile`.

    Returns:
        `list[tuple[int, int, int, int]]`: Boxes `(y0, y1, x0, x1)` (end-exclusive), x in the outer loop and y in the
        inner loop, as the official sampler enumerates them. Per axis the starts are [`tile_starts`]. An axis with
        length `<= tile` gets a single span `(0, length)`, so its boxes are smaller than `tile` when the length is
        below it (the official code requires `length >= tile`); callers then need weights of the box's own size.

    Raises:
        ValueError: if `tile <= 0`, `overlap < 0`, `overlap >= tile`, or a canvas side is `<= 0`.
    """
    y_spans = _axis_spans(height, tile, overlap)
    x_spans = _axis_spans(width, tile, overlap)
    return [(y0, y1, x0, x1) for x0, x1 in x_spans for y0, y1 in y_spans]


def _balanced_spans(size: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """As many tiles as the official rule needs, but all of one (smaller) size and evenly spread, on an ``align`` grid."""
    if size <= tile:
        return [(0, size)]
    count = len(tile_starts(size, tile, overlap))
    # Work in units of `align`: the smallest tile T whose neighbours, spread evenly, still overlap by `overlap`.
    total, full, lap = size // align, tile // align, -(-overlap // align)
    t = max(1, -(-(total + (count - 1) * lap) // count))
    while t - lap < -(-(total - t) // (count - 1)):
        t += 1
    t = min(t, full)  # the official layout (count tiles of `tile`) always satisfies the bound, so this never cuts
    starts = [k * (total - t) // (count - 1) for k in range(count)]
    return [(a * align, a * align + t * align) for a in starts]


def pixel_tile_grid(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[Box]:
    """
    Tile boxes for pixel-space tiling (tiled VAE encode/decode): balanced tiles, in the order of [`tile_grid`].

    Per axis the number of tiles is the official rule's ([`tile_starts`]), but instead of snapping the last `tile`
    to the border (which can make two tiles almost coincide: 2048 px with 1024-px tiles would decode 3 x 3 tiles of
    1024^2, 2.25x the image area), every tile gets the smallest common size for which evenly spread neighbours
    overlap by at least `overlap`. Same count, smaller tiles: less compute and lower peak memory.

    Args:
        height (`int`): Image height in pixels, `> 0`.
        width (`int`): Image width in pixels, `> 0`.
        tile (`int`): Largest tile side in pixels, `> 0`.
        overlap (`int`): Smallest overlap of neighbouring tiles in pixels, `0 <= overlap < tile`.
        align (`int`, defaults to 1): Tile starts and sizes are multiples of it (the VAE factor, so that tiles map
            to whole latent pixels); `height`, `width`, `tile` must be multiples of it.

    Returns:
        `list[tuple[int, int, int, int]]`: Boxes `(y0, y1, x0, x1)`; an image side `<= tile` is one span of its full
        length. Blend the tiles with [`blend_weights`] and [`TileAccumulator`].
    """
    _check_tile_overlap(tile, overlap)
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got {height} x {width}")
    if align <= 0 or height % align or width % align or tile % align:
        raise ValueError(f"height {height}, width {width} and tile {tile} must be multiples of align={align}")
    y_spans = _balanced_spans(height, tile, overlap, align)
    x_spans = _balanced_spans(width, tile, overlap, align)
    return [(y0, y1, x0, x1) for x0, x1 in x_spans for y0, y1 in y_spans]


def _official_gaussian_1d(length: int, midpoint: float) -> torch.Tensor:
    u = torch.arange(length, dtype=torch.float64)
    # Same operation order as the official list comprehension: -(d*d) / (T*T) / (2*var), then / sqrt(2*pi*var).
    d = u - midpoint
    return torch.exp(-(d * d) / (length * length) / (2 * _GAUSSIAN_VAR)) / math.sqrt(2 * math.pi * _GAUSSIAN_VAR)


def gaussian_tile_weights(
    tile_h: int, tile_w: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """
    The official StableSR Gaussian tile weights, `outer(g_y, g_x)`.

    ``g(u) = exp(-(u - mu)^2 / (2 * 0.01 * T^2)) / sqrt(2 * pi * 0.01)`` for ``u = 0..T-1``, with ``mu_x = (T_w - 1)/2``
    but ``mu_y = T_h / 2``: the official code (inherited from mixture-of-diffusers) centres the y profile half a pixel
    lower, so the weights are not symmetric in y. Reproduced on purpose for numerical parity. The official function
    returns this tiled to `(1, channels, T, T)`; here it is 2-D and callers broadcast.

    Args:
        tile_h (`int`): Tile height, `> 0`.
        tile_w (`int`): Tile width, `> 0`.
        dtype (`torch.dtype`, defaults to `torch.float64`): Output dtype; computed in float64 like the official
            numpy code. Use float32 on devices without float64 (MPS).
        device: Output device.

    Returns:
        `torch.Tensor` of shape `(tile_h, tile_w)`, all values `> 0` but very peaked: along one axis the edge/centre
        ratio is about 5.5e-6 for T = 64.
    """
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError(f"tile sizes must be positive, got ({tile_h}, {tile_w})")
    g_y = _official_gaussian_1d(tile_h, tile_h / 2)
    g_x = _official_gaussian_1d(tile_w, (tile_w - 1) / 2)
    return torch.outer(g_y, g_x).to(device=device, dtype=dtype)


def _ramp_1d(length: int, overlap: int) -> torch.Tensor:
    # Linear ramp over `overlap` samples at both ends: (i + 1) / (overlap + 1) rises from > 0 and reaches 1 at
    # index `overlap`; the min with the mirrored ramp keeps short tiles (2 * overlap > length) well defined.
    i = torch.arange(length, dtype=torch.float32)
    rise = (i + 1) / (overlap + 1)
    fall = (length - i) / (overlap + 1)
    return torch.clamp(torch.minimum(rise, fall), max=1.0)


def blend_weights(
    h: int,
    w: int,
    overlap_h: int,
    overlap_w: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """
    Feathering weights for blending overlapping pixel tiles: a separable linear ramp at all four edges.

    Along each axis the weight rises linearly over the first `overlap` samples from `1 / (overlap + 1)` to 1, stays 1
    in the middle and falls symmetrically at the end. Weights are strictly positive everywhere, so a pixel covered by a
    single tile (e.g. at the image border) is still normalised correctly by ``sum(w * tile) / sum(w)``.

    Args:
        h (`int`): Tile height, `> 0`.
        w (`int`): Tile width, `> 0`.
        overlap_h (`int`): Ramp length along y, `>= 0` (0 gives constant weights).
        overlap_w (`int`): Ramp length along x, `>= 0`.
        dtype (`torch.dtype`, defaults to `torch.float32`): Output dtype.
        device: Output device.

    Returns:
        `torch.Tensor` of shape `(h, w)` with values in `(0, 1]`.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"tile sizes must be positive, got ({h}, {w})")
    if overlap_h < 0 or overlap_w < 0:
        raise ValueError(f"overlaps must be >= 0, got ({overlap_h}, {overlap_w})")
    weights = torch.outer(_ramp_1d(h, overlap_h), _ramp_1d(w, overlap_w))
    return weights.to(device=device, dtype=dtype)


class TileAccumulator:
    """
    Weighted accumulation of per-tile outputs into a full canvas: ``result = sum(w * tile_out) / sum(w)``.

    Numerics follow the official canvas sampler: both sums are buffers of `dtype` (float32 by default), and each
    `add` does ``buffer[box] += tile_out * weight`` with PyTorch type promotion, i.e. with float64 weights the
    product is formed in float64 and rounded into the float32 buffer.

    Args:
        shape (`Sequence[int]`): Full canvas shape `(batch, channels, height, width)`.
        device: Device of the buffers.
        dtype (`torch.dtype`, defaults to `torch.float32`): Dtype of the buffers and of the result.

    Example:
        ```py
        acc = TileAccumulator(latents.shape, latents.device)
        weight = gaussian_tile_weights(64, 64, device=latents.device)
        for y0, y1, x0, x1 in tile_grid(h, w, 64, 32):
            acc.add((y0, y1, x0, x1), model(latents[..., y0:y1, x0:x1]), weight)
        blended = acc.result()
        ```
    """

    def __init__(
        self, shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape must be (batch, channels, height, width), got {shape}")
        self.shape = shape
        self._sum = torch.zeros(shape, device=device, dtype=dtype)
        self._weight_sum = torch.zeros(shape, device=device, dtype=dtype)

    def add(self, box: Sequence[int], tile_out: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        """
        Adds one tile's output.

        Args:
            box (`Sequence[int]`): `(y0, y1, x0, x1)`, end-exclusive, inside the canvas.
            tile_out (`torch.Tensor` of shape `(batch, channels, y1 - y0, x1 - x0)`): The tile's output.
            weight (`torch.Tensor` broadcastable to `tile_out`, e.g. `(y1 - y0, x1 - x0)`, or `float`): Its weights,
                which should be `> 0` wherever the canvas must be defined.
        """
        y0, y1, x0, x1 = (int(v) for v in box)
        height, width = self.shape[-2:]
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"tile box {(y0, y1, x0, x1)} is empty or outside the canvas of size {(height, width)}")
        if tuple(tile_out.shape[-2:]) != (y1 - y0, x1 - x0):
            raise ValueError(
                f"tile output has spatial size {tuple(tile_out.shape[-2:])} but the box {(y0, y1, x0, x1)} has "
                f"{(y1 - y0, x1 - x0)}"
            )
        if not isinstance(weight, torch.Tensor):
            weight = torch.tensor(float(weight), dtype=self._sum.dtype, device=self._sum.device)
        # In-place add on a slice: promotion happens in the product, the buffer keeps its dtype (official behaviour).
        self._sum[..., y0:y1, x0:x1] += tile_out * weight
        self._weight_sum[..., y0:y1, x0:x1] += weight

    def result(self) -> torch.Tensor:
        """
        Returns the blended canvas `(batch, channels, height, width)` in the buffer dtype.

        Raises:
            ValueError: if some canvas element received no (or only zero) weight.
        """
        if bool((self._weight_sum == 0).any()):
            raise ValueError("some canvas positions are not covered by any tile with non-zero weight")
        return self._sum / self._weight_sum
