"""fp16 safety on the tiny converted model (CPU, float16): activations pushed past float16's 65504 in the two places
where SD 2.x overflows (attention scores, the VAE) give a finite, non-black image with the pipeline's guards
(`StableSRPipeline.prepare_half_precision`) and a NaN/inf without them, which the pipeline then reports as
`NonFiniteOutputError` instead of writing a black image."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from PIL import Image

from stablesr.pipelines.pipeline_stablesr import NonFiniteOutputError, StableSRPipeline


def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)).resize((56, 40))


def fp16_pipeline(folder) -> StableSRPipeline:
    pipe = StableSRPipeline.from_pretrained(folder, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe):
    """Latents and condition of one 1-step restore (float16 UNet; no decode: float16 convolutions are slow on a CPU)."""
    out = pipe(image(), upscale=2, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    return out.latents[0], out.conditions[0]


def assert_finite_not_black(out: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    assert out.mean() > 0.05 and out.std() > 0.01, "a black or flat image"


def no_guards(monkeypatch) -> None:
    monkeypatch.setattr(StableSRPipeline, "prepare_half_precision", lambda self: None)


@pytest.fixture(scope="module")
def sampled(small_pipeline_dir):
    """Latents and condition from the float32 pipeline, to decode with float16 ones."""
    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return sample(pipe)


def vae_overflow_pipe(folder) -> StableSRPipeline:
    """fp16 pipeline whose VAE decoder input conv is scaled x1e5: its activations (~1e4-1e5 in float32) exceed
    float16's range; the GroupNorm right after it removes the scale, so in float32 the image is ordinary."""
    pipe = fp16_pipeline(folder)
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
        pipe.vae.decoder.conv_in.bias.mul_(1e5)
    return pipe


def test_vae_overflow_is_upcast(small_pipeline_dir, sampled):
    pipe = vae_overflow_pipe(small_pipeline_dir)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float16
    assert_finite_not_black(pipe.decode_latents(*sampled, fidelity_weight=0.5, output_type="pt"))
    assert pipe.vae.dtype == pipe.cfw_adapter.dtype == torch.float32, "the guard runs the VAE and CFW in float32"
    assert pipe.unet.dtype == torch.float16, "the UNet stays in float16"


def test_vae_overflow_without_the_guard_is_reported(small_pipeline_dir, sampled, monkeypatch):
    pipe = vae_overflow_pipe(small_pipeline_dir)
    no_guards(monkeypatch)
    with pytest.raises(NonFiniteOutputError, match=r"VAE decode produced NaN/inf values in float16.*bf16.*fp32"):
        pipe.decode_latents(*sampled, fidelity_weight=0.0, output_type="pt")  # w=0: the overflow is before CFW


def test_force_upcast_false_keeps_the_vae_in_fp16(small_pipeline_dir):
    pipe = fp16_pipeline(small_pipeline_dir)
    pipe.vae.register_to_config(force_upcast=False)
    pipe.prepare_half_precision()
    assert pipe.vae.dtype == torch.float16


def attention_overflow_pipe(folder, processor) -> StableSRPipeline:
    """fp16 UNet with q and k of every attention scaled x300: scores x9e4, beyond float16, ordinary in float32 (the
    softmax saturates). The VAE runs in float32 (these tests are about the UNet)."""
    pipe = fp16_pipeline(folder)
    pipe.vae.to(torch.float32)
    pipe.cfw_adapter.to(torch.float32)
    pipe.unet.set_attn_processor(processor)
    with torch.no_grad():
        for module in pipe.unet.modules():
            if isinstance(module, Attention):
                module.to_q.weight.mul_(300.0)
                module.to_k.weight.mul_(300.0)
    return pipe


def test_attention_scores_are_upcast(small_pipeline_dir):
    """The classic processor computes the scores itself (baddbmm in the input dtype, as sliced attention does)."""
    pipe = attention_overflow_pipe(small_pipeline_dir, AttnProcessor())
    latents, condition = sample(pipe)
    assert torch.isfinite(latents).all()
    assert_finite_not_black(pipe.decode_latents(latents, condition, fidelity_weight=0.0, output_type="pt"))
    attentions = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(m.upcast_attention and m.upcast_softmax for m in attentions)


def test_attention_overflow_without_the_guard_is_reported(small_pipeline_dir, monkeypatch):
    pipe = attention_overflow_pipe(small_pipeline_dir, AttnProcessor())
    no_guards(monkeypatch)
    with pytest.raises(NonFiniteOutputError, match=r"sampling step 1 produced NaN/inf values in float16"):
        sample(pipe)


def test_sdpa_needs_no_upcast(small_pipeline_dir, monkeypatch):
    """The default processor (PyTorch SDPA) accumulates the scores in float32 itself: the same scaled scores stay
    finite without the guard (upcast_attention is a no-op for it)."""
    pipe = attention_overflow_pipe(small_pipeline_dir, AttnProcessor2_0())
    no_guards(monkeypatch)
    latents, _ = sample(pipe)
    assert torch.isfinite(latents).all() and latents.std() > 0.01


def test_bf16_is_left_alone(small_pipeline_dir):
    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir, dtype=torch.bfloat16)
    pipe.prepare_half_precision()
    assert pipe.vae.dtype == torch.bfloat16
    assert not any(m.upcast_attention for m in pipe.unet.modules() if isinstance(m, Attention))
