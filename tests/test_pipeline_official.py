"""The sampling cases of the official vectors (c8: 4-step DDPM run; c9: aggregation step and run on a non-square
latent), replayed through StableSRPipeline's own methods with the recorded noise. Tolerance: 1e-4 relative to the
reference's max |value| (+1e-5), as stated in the fixture's cases.md."""

import torch

from conftest import assert_close_rel
from stablesr import vae_tiling
from stablesr.color import color_fix

WIDTHS = (16, 8, 4, 2)


def test_c8_four_step_sampling_run(converted_tiny, tiny_cases):
    pipe, _ = converted_tiny
    c = {k[3:]: v for k, v in tiny_cases.items() if k.startswith("c8.")}
    with torch.no_grad():
        enc = pipe.cfw_adapter.encode_features(pipe.vae, c["image"])
        init_latent = (enc.latent_dist.mean + enc.latent_dist.std * c["posterior_noise"]) * 0.18215
        assert_close_rel(init_latent, c["init_latent"], name="c8.init_latent")

        pipe.scheduler.set_timesteps(4)
        assert pipe.scheduler.timesteps.tolist() == [999, 666, 333, 0]
        x = pipe.scheduler.lq_start_latents(init_latent, c["xT_noise"])
        assert_close_rel(x, c["x_T"], name="c8.x_T")

        # Encoder features recomputed at every step with the original-scale timestep.
        for s, t in enumerate(pipe.scheduler.timesteps):
            feats = pipe.time_aware_encoder(init_latent, t.repeat(2)).features
            for w, f in zip(WIDTHS, feats):
                assert_close_rel(f, c[f"step{s}.enc_out_{w}"], name=f"c8.step{s}.enc_out_{w}")

        steps = []
        with pipe.sft_adapter.attached(pipe.unet):
            samples = pipe.denoise(
                x, init_latent, c["context"], tile_size=64, tile_overlap=32,
                variance_noise=[c[f"step{s}.noise"] for s in range(4)],
                callback=lambda i, t, latents: steps.append(latents.clone()),
            )
        for s in range(4):
            assert_close_rel(steps[s], c[f"step{s}.x_out"], name=f"c8.step{s}.x_out")
        assert_close_rel(samples, c["samples"], name="c8.samples")

        decoded = pipe.cfw_adapter.decode(pipe.vae, samples / 0.18215, enc.encoder_features, 0.5).sample
        assert_close_rel(decoded, c["decoded"], name="c8.decoded")
        # The pipeline's own decode path (recomputes the CFW features from the LQ image).
        ours = vae_tiling.decode(pipe.vae, c["samples"] / 0.18215, c["image"], pipe.cfw_adapter, 0.5)
        assert_close_rel(ours, c["decoded"], name="c8.decoded via vae_tiling.decode")
        assert_close_rel(color_fix(c["decoded"], c["image"], "adain"), c["adain"], name="c8.adain")
        assert_close_rel(color_fix(c["decoded"], c["image"], "wavelet"), c["wavelet"], name="c8.wavelet")


def test_c9_aggregation_step_and_run(converted_tiny, tiny_cases):
    pipe, _ = converted_tiny
    c = {k[3:]: v for k, v in tiny_cases.items() if k.startswith("c9.")}
    with torch.no_grad():
        pipe.scheduler.set_timesteps(4)
        x_t = pipe.scheduler.lq_start_latents(c["lr_latent"], c["xT_noise"])
        assert_close_rel(x_t, c["x_T"], name="c9.x_T")
        t = torch.tensor([999])
        with pipe.sft_adapter.attached(pipe.unet):
            out, tiles = pipe.predict_model_output(
                x_t, t, c["lr_latent"], c["context"], tile_size=16, tile_overlap=8, tile_batch_size=3,
                return_tiles=True,
            )
            assert len(tiles) == c["tile_boxes"].shape[0] == 8
            for i, tile in enumerate(tiles):
                assert_close_rel(tile, c["step.tile_model_out"][i], name=f"c9.step.tile_model_out[{i}]")
            assert_close_rel(out, c["step.model_out"], name="c9.step.model_out")
            step = pipe.scheduler.step(out, 999, x_t, variance_noise=c["step.noise"])
            assert_close_rel(step.pred_original_sample, c["step.pred_x0"], name="c9.step.pred_x0")
            assert_close_rel(step.prev_sample, c["step.x_out"], name="c9.step.x_out")

            steps = []
            samples = pipe.denoise(
                x_t, c["lr_latent"], c["context"], tile_size=16, tile_overlap=8, tile_batch_size=8,
                variance_noise=[c[f"full.step{s}.noise"] for s in range(4)],
                callback=lambda i, t, latents: steps.append(latents.clone()),
            )
        for s in range(4):
            assert_close_rel(steps[s], c[f"full.step{s}.x_out"], name=f"c9.full.step{s}.x_out")
        assert_close_rel(samples, c["full.samples"], name="c9.full.samples")
