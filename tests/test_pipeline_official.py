"""The sampling cases of the official vectors (c8: a short DDPM run; c9: aggregation step and run on a non-square
latent), replayed through StableSRPipeline's own methods with the recorded noise. Tolerance: 1e-4 relative to the
reference's max |value| (+1e-5), as stated in the fixture's cases.md.

Step counts, timesteps, batch size, feature widths, tile settings and the CFW weight come from the fixture (cases.json
meta, tensor names / shapes) and the scale factor / prediction type from the converted model's own config, so the same
tests run on every vector folder of this format."""

import torch
from conftest import assert_close_rel, feature_widths

from stablesr import vae_tiling
from stablesr.color import color_fix


def _case(tiny_cases, case):
    return {k[len(case) + 1 :]: v for k, v in tiny_cases.items() if k.startswith(case + ".")}


def _check_schedule(pipe, meta, ref_prediction_type):
    """Respaces the pipeline's scheduler as the case did and checks the timesteps against the case's meta."""
    assert pipe.scheduler.config.prediction_type == ref_prediction_type
    pipe.scheduler.set_timesteps(meta["ddpm_steps"])
    # sampled from the largest original-scale timestep down (999, ..., 0 for the 1000-step schedule)
    assert pipe.scheduler.timesteps.tolist() == sorted(meta["ori_timesteps"], reverse=True)


def test_c8_sampling_run(converted_tiny, tiny_cases, case_meta, ref_prediction_type):
    pipe, _ = converted_tiny
    meta = case_meta["c8"]
    c = _case(tiny_cases, "c8")
    scale = pipe.vae.config.scaling_factor
    steps = meta["ddpm_steps"]
    batch = c["x_T"].shape[0]
    widths = feature_widths(c, "step0.")
    with torch.no_grad():
        enc = pipe.cfw_adapter.encode_features(pipe.vae, c["image"])
        init_latent = (enc.latent_dist.mean + enc.latent_dist.std * c["posterior_noise"]) * scale
        assert_close_rel(init_latent, c["init_latent"], name="c8.init_latent")

        _check_schedule(pipe, meta, ref_prediction_type)
        x = pipe.scheduler.lq_start_latents(init_latent, c["xT_noise"])
        assert_close_rel(x, c["x_T"], name="c8.x_T")

        # Encoder features recomputed at every step with the original-scale timestep.
        for s, t in enumerate(pipe.scheduler.timesteps):
            assert c[f"step{s}.t_orig"].tolist() == [int(t)] * batch
            feats = pipe.time_aware_encoder(init_latent, t.repeat(batch)).features
            assert len(feats) == len(widths)
            for w, f in zip(widths, feats, strict=True):
                assert_close_rel(f, c[f"step{s}.enc_out_{w}"], name=f"c8.step{s}.enc_out_{w}")

        # c8 is the plain (untiled) sampler: one tile covering the whole latent.
        tile_size = max(x.shape[-2:])
        steps_out = []
        with pipe.sft_adapter.attached(pipe.unet):
            samples = pipe.denoise(
                x, init_latent, c["context"], tile_size=tile_size, tile_overlap=tile_size // 2,
                variance_noise=[c[f"step{s}.noise"] for s in range(steps)],
                callback=lambda i, t, latents: steps_out.append(latents.clone()),
            )
        assert len(steps_out) == steps
        for s in range(steps):
            assert_close_rel(steps_out[s], c[f"step{s}.x_out"], name=f"c8.step{s}.x_out")
        assert_close_rel(samples, c["samples"], name="c8.samples")

        dec_w = meta["dec_w"]
        decoded = pipe.cfw_adapter.decode(pipe.vae, samples / scale, enc.encoder_features, dec_w).sample
        assert_close_rel(decoded, c["decoded"], name="c8.decoded")
        # The pipeline's own decode path (recomputes the CFW features from the LQ image).
        ours = vae_tiling.decode(pipe.vae, c["samples"] / scale, c["image"], pipe.cfw_adapter, dec_w)
        assert_close_rel(ours, c["decoded"], name="c8.decoded via vae_tiling.decode")
        assert_close_rel(color_fix(c["decoded"], c["image"], "adain"), c["adain"], name="c8.adain")
        assert_close_rel(color_fix(c["decoded"], c["image"], "wavelet"), c["wavelet"], name="c8.wavelet")


def test_c9_aggregation_step_and_run(converted_tiny, tiny_cases, case_meta, ref_prediction_type):
    pipe, _ = converted_tiny
    meta = case_meta["c9"]
    c = _case(tiny_cases, "c9")
    steps, tile_size, tile_overlap = meta["ddpm_steps"], meta["tile_size"], meta["tile_overlap"]
    n_tiles = len(meta["tile_boxes_yyxx"])
    assert list(c["x_T"].shape) == meta["latent_shape"]
    with torch.no_grad():
        _check_schedule(pipe, meta, ref_prediction_type)
        x_t = pipe.scheduler.lq_start_latents(c["lr_latent"], c["xT_noise"])
        assert_close_rel(x_t, c["x_T"], name="c9.x_T")
        # the single canvas step is the first step of the run (t_replace = the largest timestep, per sample)
        t = c["step.t_orig"]
        assert t.tolist() == [int(pipe.scheduler.timesteps[0])] * c["x_T"].shape[0]
        with pipe.sft_adapter.attached(pipe.unet):
            out, tiles = pipe.predict_model_output(
                x_t, t, c["lr_latent"], c["context"], tile_size=tile_size, tile_overlap=tile_overlap,
                tile_batch_size=3, return_tiles=True,
            )
            assert len(tiles) == c["tile_boxes"].shape[0] == n_tiles
            for i, tile in enumerate(tiles):
                assert_close_rel(tile, c["step.tile_model_out"][i], name=f"c9.step.tile_model_out[{i}]")
            assert_close_rel(out, c["step.model_out"], name="c9.step.model_out")
            step = pipe.scheduler.step(out, int(t[0]), x_t, variance_noise=c["step.noise"])
            assert_close_rel(step.pred_original_sample, c["step.pred_x0"], name="c9.step.pred_x0")
            assert_close_rel(step.prev_sample, c["step.x_out"], name="c9.step.x_out")

            steps_out = []
            samples = pipe.denoise(
                x_t, c["lr_latent"], c["context"], tile_size=tile_size, tile_overlap=tile_overlap,
                tile_batch_size=n_tiles,
                variance_noise=[c[f"full.step{s}.noise"] for s in range(steps)],
                callback=lambda i, t, latents: steps_out.append(latents.clone()),
            )
        assert len(steps_out) == steps
        for s in range(steps):
            assert_close_rel(steps_out[s], c[f"full.step{s}.x_out"], name=f"c9.full.step{s}.x_out")
        assert_close_rel(samples, c["full.samples"], name="c9.full.samples")
