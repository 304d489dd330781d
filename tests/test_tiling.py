"""Tiling: parity with the official canvas sampler (case c9) and properties of grids, weights and blending.

Parity tolerance: 1e-4 relative to max|reference| (+1e-5 absolute), the `assert_close_rel` default; the Gaussian
weights are additionally checked element by element (they span 1e-9..15, so a max-relative bound alone is loose).
"""

import math

import pytest
import torch
from conftest import assert_close_rel

from stablesr.tiling import (
    TileAccumulator,
    blend_weights,
    gaussian_tile_weights,
    pixel_tile_grid,
    tile_grid,
    tile_starts,
)


def _official_count(size: int, tile: int, overlap: int) -> int:
    # Mirrors the official while-loop that counts tiles along one axis (ddpm.py, p_mean_variance_canvas).
    count, reached = 0, 0
    while reached < size:
        reached = max(count * tile - overlap * count, 0) + tile
        count += 1
    return count


# --- official vectors -------------------------------------------------------------------------------------------


def test_gaussian_weights_match_official(tiny_cases, case_meta):
    tile = case_meta["c9"]["tile_size"]
    expected = tiny_cases["c9.tile_weights"]  # (1, C, tile, tile) float64: the same 2-D map tiled over channels
    weights = gaussian_tile_weights(tile, tile)
    assert weights.dtype == torch.float64 and weights.shape == (tile, tile)
    rel = assert_close_rel(weights.expand_as(expected), expected, name="c9.tile_weights")
    assert rel <= 1e-4
    elementwise = ((weights - expected[0, 0]).abs() / expected[0, 0]).max().item()
    assert elementwise < 1e-12


def test_tile_boxes_match_official(tiny_cases, case_meta):
    meta = case_meta["c9"]
    height, width = meta["latent_shape"][-2:]
    boxes = tile_grid(height, width, meta["tile_size"], meta["tile_overlap"])
    assert boxes == [tuple(b) for b in meta["tile_boxes_yyxx"]]
    assert torch.equal(torch.tensor(boxes, dtype=torch.int64), tiny_cases["c9.tile_boxes"])


def test_accumulator_matches_official_stitching(tiny_cases, case_meta):
    # c9.step.model_out = sum(tile_out * w) / sum(w) over the tiles of c9.tile_boxes, as stitched by the official code.
    tile_outs = tiny_cases["c9.step.tile_model_out"]
    expected = tiny_cases["c9.step.model_out"]
    acc = TileAccumulator(expected.shape, expected.device)
    weights = gaussian_tile_weights(case_meta["c9"]["tile_size"], case_meta["c9"]["tile_size"])
    for box, tile_out in zip(tiny_cases["c9.tile_boxes"].tolist(), tile_outs, strict=True):
        acc.add(box, tile_out, weights)
    result = acc.result()
    assert result.dtype == torch.float32
    rel = assert_close_rel(result, expected, name="c9.step.model_out")
    assert rel <= 1e-4


# --- grid rules -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile,overlap", [(16, 8), (64, 32), (96, 48), (16, 0), (16, 15), (7, 3)])
def test_tile_starts_follow_official_rule(tile, overlap):
    stride = tile - overlap
    for size in range(tile, tile + 5 * stride + 3):
        starts = tile_starts(size, tile, overlap)
        assert len(starts) == _official_count(size, tile, overlap)
        assert starts[:-1] == [k * stride for k in range(len(starts) - 1)]
        assert starts[-1] == size - tile
        assert starts == sorted(set(starts))  # strictly increasing, the snapped last start never repeats one


def test_tile_starts_edge_cases():
    assert tile_starts(16, 16, 8) == [0]  # size == tile: one tile
    assert tile_starts(24, 16, 8) == [0, 8]  # size reached exactly by the stride: no extra tile
    assert tile_starts(25, 16, 8) == [0, 8, 9]  # one past: an extra tile snapped to the border
    assert tile_starts(40, 16, 8) == [0, 8, 16, 24]


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(24, 40, 16, 8), (64, 64, 64, 32), (100, 77, 64, 32), (10, 200, 64, 16), (5, 3, 8, 2)],
)
def test_grid_covers_canvas_within_bounds(height, width, tile, overlap):
    boxes = tile_grid(height, width, tile, overlap)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
        assert y1 - y0 == min(tile, height) and x1 - x0 == min(tile, width)
        covered[y0:y1, x0:x1] += 1
    assert (covered > 0).all()


@pytest.mark.parametrize(
    "height,width,tile,overlap,align",
    [(2048, 2048, 1024, 64, 8), (1000, 4096, 512, 64, 8), (776, 520, 512, 64, 8), (24, 40, 16, 8, 1),
     (100, 77, 64, 32, 1), (5, 3, 8, 2, 1), (512, 512, 512, 64, 8)],
)
def test_pixel_grid_is_balanced(height, width, tile, overlap, align):
    """Same tile count per axis as the official rule, tiles of one size <= `tile`, aligned, neighbours overlapping by
    >= `overlap`, full coverage, and never more area than the official layout."""
    boxes = pixel_tile_grid(height, width, tile, overlap, align=align)
    official = tile_grid(height, width, tile, overlap)
    assert len(boxes) == len(official)
    for axis, size in ((0, height), (2, width)):
        spans = sorted({(b[axis], b[axis + 1]) for b in boxes})
        assert len({b - a for a, b in spans}) == 1 and spans[0][1] - spans[0][0] <= tile
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(a % align == 0 and b % align == 0 for a, b in spans)
        assert all(spans[i][1] - spans[i + 1][0] >= min(overlap, size) for i in range(len(spans) - 1))
    area = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in boxes)
    assert area <= sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in official)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for y0, y1, x0, x1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert (covered > 0).all()
    if (height, width, tile) == (2048, 2048, 1024):
        assert area / (height * width) < 1.2  # the official snapping decodes 2.25x the image area here


def test_pixel_grid_rejects_misaligned_sizes():
    with pytest.raises(ValueError, match="multiples of align"):
        pixel_tile_grid(100, 100, 64, 16, align=8)


def test_grid_order_is_x_outer_y_inner():
    boxes = tile_grid(40, 40, 16, 8)
    x_starts = [b[2] for b in boxes]
    assert x_starts == sorted(x_starts)
    assert [b[0] for b in boxes[:4]] == [0, 8, 16, 24]


def test_small_canvas_is_one_tile():
    assert tile_grid(10, 12, 16, 8) == [(0, 10, 0, 12)]
    assert tile_grid(16, 16, 16, 8) == [(0, 16, 0, 16)]


@pytest.mark.parametrize(
    "call",
    [
        lambda: tile_starts(32, 0, 0),
        lambda: tile_starts(32, -4, 0),
        lambda: tile_starts(32, 16, 16),
        lambda: tile_starts(32, 16, 20),
        lambda: tile_starts(32, 16, -1),
        lambda: tile_starts(10, 16, 8),
        lambda: tile_grid(0, 32, 16, 8),
        lambda: tile_grid(32, 32, 16, 16),
        lambda: gaussian_tile_weights(0, 16),
        lambda: blend_weights(8, 8, -1, 0),
        lambda: blend_weights(0, 8, 0, 0),
    ],
)
def test_invalid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_size_below_tile_message_says_what_to_do():
    with pytest.raises(ValueError, match="pad"):
        tile_starts(10, 16, 8)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(32, 16, 16)


# --- weights ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_h,tile_w", [(16, 16), (64, 64), (96, 96), (5, 9)])
def test_gaussian_weights_properties(tile_h, tile_w):
    weights = gaussian_tile_weights(tile_h, tile_w)
    assert weights.shape == (tile_h, tile_w)
    assert (weights > 0).all()
    # x is symmetric about (T-1)/2; y peaks at T/2 (official quirk), so it is not symmetric.
    torch.testing.assert_close(weights, weights.flip(1))
    assert weights[:, 0].argmax().item() == tile_h // 2
    peak = 1 / math.sqrt(2 * math.pi * 0.01)
    assert weights.max().item() <= peak**2 + 1e-9
    assert gaussian_tile_weights(tile_h, tile_w, dtype=torch.float32).dtype == torch.float32


def test_blend_weights_positive_ramps():
    weights = blend_weights(12, 10, 3, 0)
    assert weights.shape == (12, 10) and (weights > 0).all() and weights.max().item() == 1.0
    column = weights[:, 0]
    torch.testing.assert_close(column[:4], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(column, column.flip(0))
    assert (weights[5] == 1).all()  # overlap_w = 0: no ramp along x
    short = blend_weights(3, 3, 8, 8)  # ramps longer than the tile still give positive weights
    assert (short > 0).all() and short.shape == (3, 3)


# --- accumulation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_kind", ["gaussian", "ramp", "scalar"])
def test_accumulator_constant_tiles_give_constant(weight_kind):
    height, width, tile, overlap = 37, 53, 16, 6
    acc = TileAccumulator((2, 3, height, width))
    for y0, y1, x0, x1 in tile_grid(height, width, tile, overlap):
        if weight_kind == "gaussian":
            weight = gaussian_tile_weights(y1 - y0, x1 - x0)
        elif weight_kind == "ramp":
            weight = blend_weights(y1 - y0, x1 - x0, overlap, overlap)
        else:
            weight = 0.5
        acc.add((y0, y1, x0, x1), torch.full((2, 3, y1 - y0, x1 - x0), -0.75), weight)
    torch.testing.assert_close(acc.result(), torch.full((2, 3, height, width), -0.75))


def test_accumulator_rejects_bad_input():
    acc = TileAccumulator((1, 1, 8, 8))
    with pytest.raises(ValueError, match="outside"):
        acc.add((4, 12, 0, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="spatial size"):
        acc.add((0, 4, 0, 4), torch.zeros(1, 1, 8, 8))
    acc.add((0, 4, 0, 8), torch.zeros(1, 1, 4, 8))
    with pytest.raises(ValueError, match="not covered"):
        acc.result()
    with pytest.raises(ValueError):
        TileAccumulator((8, 8))
