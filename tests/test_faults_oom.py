"""Out of memory on the GPU degrades instead of failing: smaller tile batches, then smaller VAE tiles.

``torch.OutOfMemoryError`` is injected on the CPU (the tiny model's UNet, time-aware encoder or VAE raise it for
inputs above a size), and each run is compared with a run that used the smaller setting from the start. Both the
tile-batch and the VAE-tile fallbacks redo the failed work in the smaller setting, so the results are bit-identical.
"""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from stablesr import vae_tiling
from stablesr.pipelines.pipeline_stablesr import StableSRPipeline


@pytest.fixture(scope="module")
def pipe(small_pipeline_dir):
    p = StableSRPipeline.from_pretrained(small_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    return p


def image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def raise_oom_when(monkeypatch, module, too_big, calls: list):
    """Make ``module.forward`` raise torch.OutOfMemoryError whenever ``too_big(first input)``; records the raises."""
    forward = module.forward

    def guarded(*args, **kwargs):
        sample = args[0] if args else next(iter(kwargs.values()))
        if too_big(sample):
            calls.append(tuple(sample.shape))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", guarded)


def run(pipe, **kwargs):
    # 64 px x4 = 256 px: a 32x32 latent, 9 tiles of the tiny model's native 16 (overlap 8).
    kwargs = {"upscale": 4, "num_inference_steps": 2, "tile_size": 16, "tile_overlap": 8, "output_type": "latent",
              "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(image(64), **kwargs).latents[0]


@pytest.mark.parametrize("part", ["unet", "time_aware_encoder"])
def test_tile_batch_is_halved_on_out_of_memory(pipe, monkeypatch, caplog, part):
    expected = run(pipe, tile_batch_size=2)
    raises = []
    raise_oom_when(monkeypatch, getattr(pipe, part), lambda x: x.shape[0] > 2, raises)
    with caplog.at_level(logging.WARNING, logger="stablesr.pipelines.pipeline_stablesr"):
        degraded = run(pipe, tile_batch_size=4)
    assert torch.equal(degraded, expected)
    # Once: the smaller batch is kept for the remaining tiles and steps.
    assert len(raises) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tile_batch_size=2" in warnings[0]


def test_tile_batch_goes_down_to_one_then_a_clear_error(pipe, monkeypatch, caplog):
    expected = run(pipe, tile_batch_size=1, num_inference_steps=1)
    raises = []
    raise_oom_when(monkeypatch, pipe.unet, lambda x: x.shape[0] > 1, raises)
    with caplog.at_level(logging.WARNING, logger="stablesr.pipelines.pipeline_stablesr"):
        degraded = run(pipe, tile_batch_size=4, num_inference_steps=1)
    assert torch.equal(degraded, expected)
    assert [r.getMessage().split("tile_batch_size=")[1][0] for r in caplog.records] == ["2", "1"]

    monkeypatch.undo()
    raise_oom_when(monkeypatch, pipe.unet, lambda x: True, raises)
    with pytest.raises(torch.OutOfMemoryError, match=r"one tile at a time \(16x16 latent pixels\).*--tile-size, now 16"):
        run(pipe, tile_batch_size=4, num_inference_steps=1)
    with pytest.raises(torch.OutOfMemoryError, match="the whole latent.*--tile-size"):
        pipe(image(32), upscale=4, num_inference_steps=1, output_type="latent")  # 128 px: the whole 16x16 latent is one tile


def test_vae_decode_tile_is_halved_on_out_of_memory(pipe, monkeypatch, caplog):
    # 64 px x4 = 256 px: decoded untiled with the default 1024-px VAE tile; 128-px tiles after the fallback. (Plain
    # decoder, w = 0, to keep it fast; the CFW decode runs through the same vae.decoder and the same fallback.)
    out = pipe(image(64), upscale=4, num_inference_steps=1, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    latents, condition = out.latents[0], out.conditions[0]
    expected = pipe.decode_latents(latents, condition, 0.0, vae_tile_size=128, output_type="pt")
    raises = []
    raise_oom_when(monkeypatch, pipe.vae.decoder, lambda z: z.shape[-1] > 128 // 8, raises)
    with caplog.at_level(logging.WARNING, logger="stablesr.vae_tiling"):
        degraded = pipe.decode_latents(latents, condition, 0.0, vae_tile_size=1024, output_type="pt")
    assert torch.equal(degraded, expected)
    assert raises == [(1, 4, 32, 32)]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "VAE decode with no tiles" in warning and "--vae-tile-size 128" in warning

    # Out of memory at every size: untiled, then 128-px tiles, then a clear error (64 px is below the floor).
    monkeypatch.undo()
    raise_oom_when(monkeypatch, pipe.vae.decoder, lambda z: True, raises)
    with pytest.raises(torch.OutOfMemoryError, match=r"VAE decode even with 128-px tiles.*--dtype"):
        pipe.decode_latents(latents, condition, 0.0, vae_tile_size=1024, output_type="pt")


def test_vae_encode_tile_is_halved_on_out_of_memory(pipe, monkeypatch, caplog):
    lq_image = torch.rand(1, 3, 256, 256) * 2 - 1
    expected = pipe.encode_condition(lq_image, torch.Generator().manual_seed(0), 128, 64)
    raises = []
    raise_oom_when(monkeypatch, pipe.vae.encoder, lambda x: x.shape[-1] > 128, raises)
    with caplog.at_level(logging.WARNING, logger="stablesr.vae_tiling"):
        degraded, features = pipe.encode_condition(
            lq_image, torch.Generator().manual_seed(0), None, 64, return_cfw_features=True
        )
    assert torch.equal(degraded, expected)
    assert features is None  # the single-pass CFW features exist only for an untiled encode
    assert len(raises) == 1 and "VAE encode with no tiles" in caplog.records[0].getMessage()


def test_other_runtime_errors_are_not_swallowed(pipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pipe.vae.decoder, "forward", broken)
    with pytest.raises(RuntimeError, match="mat1"):
        vae_tiling.with_smaller_tiles(lambda s, o: pipe.vae.decode(torch.zeros(1, 4, 32, 32)), 256, 256, 1024, 64, 8,
                                      "VAE decode")
