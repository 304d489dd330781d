"""The untiled decode reuses the CFW features of the LQ-latent encode: one VAE encoder pass per image instead of two,
with bit-identical latents and images (converted tiny model, 128 px native size)."""

import dataclasses

import pytest
import torch
from PIL import Image

from stablesr.pipelines.pipeline_stablesr import StableSRPipeline


@pytest.fixture(scope="module")
def pipe(small_pipeline_dir):
    p = StableSRPipeline.from_pretrained(small_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def encoder_calls(pipe):
    calls = []
    handle = pipe.vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


def _condition(pipe):
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(40, 56, 3, generator=generator) * 255).to(torch.uint8).numpy())
    return pipe.prepare_condition(image, 2)


@torch.no_grad()
def test_one_encoder_pass_same_latents_and_image(pipe, encoder_calls):
    condition = _condition(pipe)
    lq = condition.lq_image
    plain = pipe.encode_condition(lq, torch.Generator().manual_seed(1), 1024, 64)
    assert len(encoder_calls) == 1
    latents, features = pipe.encode_condition(lq, torch.Generator().manual_seed(1), 1024, 64, return_cfw_features=True)
    assert len(encoder_calls) == 2
    assert torch.equal(latents, plain)
    expected = pipe.cfw_adapter.encode_features(pipe.vae, lq).encoder_features
    assert len(features) == len(expected) and all(torch.equal(a, b) for a, b in zip(features, expected, strict=True))

    encoder_calls.clear()
    reused = pipe.decode_latents(latents, dataclasses.replace(condition, cfw_features=features), 0.5, "none",
                                 output_type="pt")
    assert len(encoder_calls) == 0, "the untiled decode must not encode the LQ image again"
    recomputed = pipe.decode_latents(latents, condition, 0.5, "none", output_type="pt")
    assert len(encoder_calls) == 1
    assert torch.equal(reused, recomputed)


@torch.no_grad()
def test_tiled_encode_or_decode_does_not_use_full_size_features(pipe, encoder_calls):
    condition = _condition(pipe)
    height, width = condition.lq_image.shape[-2:]
    tile = 64
    assert max(height, width) > tile
    latents, features = pipe.encode_condition(condition.lq_image, None, tile, 16, return_cfw_features=True)
    assert features is None  # tiled encode: no full-size features to keep

    _, features = pipe.encode_condition(condition.lq_image, None, None, 16, return_cfw_features=True)
    with_features = dataclasses.replace(condition, cfw_features=features)
    encoder_calls.clear()
    tiled = pipe.decode_latents(latents, with_features, 0.5, "none", vae_tile_size=tile, vae_tile_overlap=16,
                                output_type="pt")
    assert len(encoder_calls) > 1  # per-tile features from LQ crops, as without stored features
    assert torch.equal(tiled, pipe.decode_latents(latents, condition, 0.5, "none", vae_tile_size=tile,
                                                  vae_tile_overlap=16, output_type="pt"))
