"""StableSRPipeline behaviour on the converted tiny model (128 px native size for speed)."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from stablesr import vae_tiling
from stablesr.pipelines.pipeline_stablesr import StableSRPipeline


@pytest.fixture(scope="module")
def pipe(small_pipeline_dir):
    p = StableSRPipeline.from_pretrained(small_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    return p


def photo(h=40, w=56):
    return Image.fromarray(data.astronaut()[100 : 100 + 4 * h : 4, 150 : 150 + 4 * w : 4])


def test_output_size_is_exactly_round_upscale(pipe):
    for upscale, size in [(2.0, (112, 80)), (2.5, (140, 100)), (3.3, (185, 132))]:
        out = pipe(photo(), upscale=upscale, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
        assert out.images[0].size == size


def test_deterministic_and_seed_dependent(pipe):
    run = lambda seed: np.asarray(pipe(photo(), upscale=2, num_inference_steps=2,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed)).images[0], dtype=float)
    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.1


def test_fidelity_redecode_without_resampling(pipe):
    """output_type='latent' + decode_latents: one CFW decode per weight, same latents; w=0 is the stock decode."""
    out = pipe(photo(), upscale=2, num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    latents, cond = out.latents[0], out.conditions[0]
    imgs = {w: np.asarray(pipe.decode_latents(latents, cond, w, "none"), dtype=float) for w in (0.0, 0.5, 1.0)}
    assert np.abs(imgs[0.0] - imgs[1.0]).mean() > 0.5
    full = pipe(photo(), upscale=2, num_inference_steps=2, fidelity_weight=0.5, color_fix="none",
                generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(full, dtype=float), imgs[0.5]), "re-decoding equals the full run"
    with torch.no_grad():
        raw = latents / pipe.vae.config.scaling_factor
        stock = pipe.vae.decode(raw).sample
        ours = vae_tiling.decode(pipe.vae, raw, cond.lq_image, pipe.cfw_adapter, 0.0)
    assert torch.equal(stock, ours)


def test_tiled_vae_matches_untiled(pipe):
    """Tiled encode / tiled CFW decode vs one pass on a 256x384 image (tiles 128 px, overlap 32).

    With RANDOM weights the VAE is no image model (its output spans about [-5, 7]) and per-tile GroupNorm statistics
    move it a lot, so the absolute PSNR says little; we compare against diffusers' own tiled VAE (the reference
    approach, same tile/overlap) on the same weights, and print our numbers for the record.
    """
    img = torch.from_numpy(data.astronaut()[:256, :384]).permute(2, 0, 1)[None].float() / 127.5 - 1
    psnr = lambda a, b: 10 * np.log10(4 / (a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean().item())  # noqa: E731
    with torch.no_grad():
        mean_full, _ = vae_tiling.encode_moments(pipe.vae, img, None)
        mean_tiled, _ = vae_tiling.encode_moments(pipe.vae, img, 128, 32)
        full = vae_tiling.decode(pipe.vae, mean_full, img, pipe.cfw_adapter, 0.0, None)
        tiled = vae_tiling.decode(pipe.vae, mean_full, img, pipe.cfw_adapter, 0.0, 128, 32)
        cfw_full = vae_tiling.decode(pipe.vae, mean_full, img, pipe.cfw_adapter, 0.5, None)
        cfw_tiled = vae_tiling.decode(pipe.vae, mean_full, img, pipe.cfw_adapter, 0.5, 128, 32)
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size, pipe.vae.tile_overlap_factor = 128, 16, 0.25
        try:
            ref_tiled = pipe.vae.decode(mean_full).sample
            ref_mean = pipe.vae.encode(img).latent_dist.mean
        finally:
            pipe.vae.disable_tiling()
    ours, ref = psnr(tiled, full), psnr(ref_tiled, full)
    print(f"decode tiled vs untiled PSNR: ours {ours:.2f} dB, diffusers tiled VAE {ref:.2f} dB; "
          f"with CFW w=0.5 ours {psnr(cfw_tiled, cfw_full):.2f} dB")
    assert ours >= ref - 1.0
    assert psnr(cfw_tiled, cfw_full) >= ref - 1.0
    err = lambda m: ((m - mean_full).norm() / mean_full.norm()).item()  # noqa: E731
    print(f"encode tiled vs untiled relative L2: ours {err(mean_tiled):.4f}, diffusers {err(ref_mean):.4f}")
    assert err(mean_tiled) <= 1.5 * err(ref_mean) + 1e-3


def test_alpha_and_grayscale_inputs(pipe):
    rgba = photo().convert("RGBA")
    alpha = np.zeros((40, 56), np.uint8)
    alpha[:, 28:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    out = pipe([rgba, photo().convert("L")], upscale=2, num_inference_steps=1).images
    assert out[0].mode == "RGBA" and out[0].size == (112, 80)
    assert np.asarray(out[0].getchannel("A"))[40, 100] == 255 and np.asarray(out[0].getchannel("A"))[40, 5] == 0
    assert out[1].mode == "RGB" and out[1].size == (112, 80)


def test_bad_arguments_are_clear(pipe):
    with pytest.raises(ValueError, match="fidelity_weight"):
        pipe(photo(), fidelity_weight=1.5)
    with pytest.raises(ValueError, match="color_fix"):
        pipe(photo(), color_fix="hist")
    with pytest.raises(ValueError, match="upscale"):
        pipe(photo(), upscale=0)
    with pytest.raises(ValueError, match="tile_overlap"):
        pipe(photo(), tile_size=16, tile_overlap=16)


def test_bf16_close_to_fp32(pipe, small_pipeline_dir):
    """The whole pipeline loaded in bfloat16 (VAE encode, encoder, UNet + SFT; the scheduler runs in float32), same
    seed, 2 DDPM steps at the smallest canvas (128 px): final latents within 6 % relative L2 of the float32 run
    (measured 2.0 %; another seed differs by ~137 %). Latents only: a bf16 CFW decode takes ~90 s on a CPU.
    A separate bf16 copy, since casting the shared float32 pipeline there and back would round its weights."""
    image = Image.fromarray(data.astronaut()[100:228:4, 150:278:4])  # 32 x 32 -> x4 = the 128 px native size

    def run(p, seed):
        out = p(image, upscale=4, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(seed))
        return out.latents[0].double()

    bf16_pipe = StableSRPipeline.from_pretrained(small_pipeline_dir, torch_dtype=torch.bfloat16)
    bf16_pipe.set_progress_bar_config(disable=True)
    assert bf16_pipe.unet.dtype == bf16_pipe.vae.dtype == bf16_pipe.time_aware_encoder.dtype == torch.bfloat16
    fp32, other_seed, bf16 = run(pipe, 0), run(pipe, 1), run(bf16_pipe, 0)
    error = ((bf16 - fp32).norm() / fp32.norm()).item()
    seed_change = ((other_seed - fp32).norm() / fp32.norm()).item()
    print(f"bf16 vs fp32 latents: relative L2 {error:.3e} (another seed: {seed_change:.2f})")
    assert error <= 0.06
    assert seed_change > 0.5
