"""Conversion of official-layout checkpoints: key accounting, config inference, safety, round trips."""

import argparse
import math
import os
import pickle

import pytest
import torch
from conftest import assert_close_rel, plain_config
from diffusers import AutoencoderKL, UNet2DConditionModel

from stablesr.checkpoint_io import CheckpointError, UnsafeCheckpointError, load_checkpoint
from stablesr.conversion import ConversionError, convert_stablesr_checkpoint
from stablesr.pipelines.pipeline_stablesr import StableSRPipeline


@pytest.fixture(scope="module")
def tiny_state(tiny_ref_dir):
    sd, _ = load_checkpoint(tiny_ref_dir / "stablesr_tiny.ckpt")
    return sd


def _save(tmp_path, sd, name="ckpt.ckpt", **extra):
    path = tmp_path / name
    torch.save({"state_dict": sd, "global_step": 0, **extra}, path)
    return path


def test_every_key_accounted_for(converted_tiny, tiny_state, ref_prediction_type):
    pipe, report = converted_tiny
    converted = sum(report.converted.values())
    skipped = sum(len(v) for v in report.skipped.values())
    assert report.converted["unet"] + report.converted["sft_adapter"] + report.converted["time_aware_encoder"] + len(
        [k for k in tiny_state if k.startswith("first_stage_model.")]
    ) + len(report.skipped["1000-step schedule buffers (the scheduler recomputes them)"]) == len(tiny_state)
    assert len(report.skipped["1000-step schedule buffers (the scheduler recomputes them)"]) == 12
    assert converted > 0 and skipped > 0
    assert "global_step" in " ".join(report.other_entries)
    assert report.prediction_type == ref_prediction_type  # config.yaml parameterization: eps -> epsilon, v -> v_prediction


def test_folder_layout_and_stock_parts(converted_tiny):
    pipe, _ = converted_tiny
    out = pipe.converted_dir
    for sub in ("unet", "vae", "time_aware_encoder", "sft_adapter", "cfw_adapter", "scheduler", "prompt_embedding"):
        assert (out / sub).is_dir(), sub
    assert (out / "model_index.json").is_file()
    # The SD parts are plain diffusers folders with stock keys only.
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not any("spade" in k or "sft" in k for k in unet.state_dict())
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert not any("fusion" in k for k in vae.state_dict())
    assert not list(out.rglob("*.bin")), "everything is written as safetensors"


def test_pipeline_round_trip_is_exact(converted_tiny, ref_config, ref_prediction_type):
    pipe, _ = converted_tiny
    loaded = StableSRPipeline.from_pretrained(pipe.converted_dir)
    for name in ("unet", "vae", "time_aware_encoder", "sft_adapter", "cfw_adapter", "prompt_embedding"):
        a, b = getattr(pipe, name), getattr(loaded, name)
        assert plain_config(a.config) == plain_config(b.config), name
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert loaded.config.default_num_inference_steps == 200
    assert type(loaded.scheduler).__name__ == "StableSRDDPMScheduler"
    assert loaded.scheduler.config.prediction_type == ref_prediction_type
    assert loaded.vae.config.scaling_factor == ref_config["model"]["params"]["scale_factor"]


def test_config_from_shapes_equals_config_from_yaml(converted_tiny, tiny_ref_dir, tiny_cases, ref_config,
                                                    ref_prediction_type):
    pipe, _ = converted_tiny
    # The parameterization cannot be read from the weights (without a YAML it comes from the file name): pass the
    # fixture's, as a user converting a v checkpoint without its YAML would.
    from_shapes, report = convert_stablesr_checkpoint(
        tiny_ref_dir / "stablesr_tiny.ckpt",
        tiny_ref_dir / "vqgan_cfw_tiny.ckpt",
        prompt_embeds=tiny_cases["c8.context"][:1],
        prediction_type=ref_prediction_type,
    )
    assert report.config_source == "shapes"
    assert report.prediction_type == ref_prediction_type
    # The UNet's native size is not in the weights either: the YAML's image_size, else 512 (eps) / 768 (v) pixels.
    yaml_image_size = ref_config["model"]["params"].get("image_size", 512)
    assert pipe.unet.config.sample_size == yaml_image_size // 8
    assert from_shapes.unet.config.sample_size == (768 if ref_prediction_type == "v_prediction" else 512) // 8
    # Nor is the latent scale factor: the YAML's scale_factor, else the SD one.
    assert pipe.vae.config.scaling_factor == ref_config["model"]["params"]["scale_factor"]
    assert from_shapes.vae.config.scaling_factor == 0.18215
    not_in_weights = {"unet": "sample_size", "vae": "scaling_factor"}
    for name in ("unet", "vae", "time_aware_encoder", "sft_adapter", "cfw_adapter"):
        a, b = plain_config(getattr(pipe, name).config), plain_config(getattr(from_shapes, name).config)
        if name in not_in_weights:
            a.pop(not_in_weights[name]), b.pop(not_in_weights[name])
        assert a == b, name


def test_unknown_and_missing_keys_are_listed(tmp_path, tiny_state, tiny_cases):
    extra = dict(tiny_state)
    extra["model.diffusion_model.input_blocks.1.0.mystery.weight"] = torch.zeros(1)
    extra["structcond_stage_model.extra_head.bias"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="mystery") as err:
        convert_stablesr_checkpoint(_save(tmp_path, extra), prompt_embeds=tiny_cases["c8.context"][:1])
    missing = dict(tiny_state)
    del missing["model.diffusion_model.middle_block.1.proj_in.weight"]
    with pytest.raises(ConversionError, match="missing"):
        convert_stablesr_checkpoint(_save(tmp_path, missing, "m.ckpt"), prompt_embeds=tiny_cases["c8.context"][:1])
    missing_enc = {k: v for k, v in tiny_state.items() if k != "structcond_stage_model.fea_tran.1.in_layers.2.bias"}
    with pytest.raises(ConversionError, match="fea_tran.1.in_layers.2.bias"):
        convert_stablesr_checkpoint(_save(tmp_path, missing_enc, "e.ckpt"), prompt_embeds=tiny_cases["c8.context"][:1])
    assert "input_blocks.1.0.mystery" in str(err.value)


def test_no_text_encoder_and_no_embedding_is_a_clear_error(tiny_ref_dir):
    with pytest.raises(ConversionError, match="prompt_embeds"):
        convert_stablesr_checkpoint(tiny_ref_dir / "stablesr_tiny.ckpt")


def test_existing_output_folder_is_not_overwritten(tmp_path, tiny_ref_dir, tiny_cases):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_stablesr_checkpoint(tiny_ref_dir / "stablesr_tiny.ckpt", output_dir=out,
                                    prompt_embeds=tiny_cases["c8.context"][:1])
    assert (out / "precious.txt").read_text() == "user data"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, tiny_state):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": evil}, path)
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"):
        load_checkpoint(path)
    assert not marker.exists(), "code from the checkpoint was executed"

    # Same payload hidden in a raw pickle (legacy, non-zip format).
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": {}, "x": evil}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(legacy)
    assert not marker.exists()


def test_lightning_style_metadata_loads_inertly(tmp_path, tiny_state):
    """Real Lightning files carry non-tensor state (hyper-parameters, callback state): read without executing it."""
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": argparse.Namespace(lr=5e-5), "epoch": 117}, path
    )
    sd, others = load_checkpoint(path)
    assert torch.equal(sd["w"], torch.ones(2))
    assert others == ["epoch", "hyper_parameters"]


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_and_empty_files(tmp_path, tiny_ref_dir, cut):
    data = (tiny_ref_dir / "vqgan_cfw_tiny.ckpt").read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def _open_clip_text_tower(width=64, layers=3, heads=1, vocab=49408, ctx=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    p = "cond_stage_model.model."
    sd = {
        p + "token_embedding.weight": r(vocab, width),
        p + "positional_embedding": r(ctx, width),
        p + "ln_final.weight": 1 + r(width),
        p + "ln_final.bias": r(width),
        p + "text_projection": r(width, width),
        p + "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(layers):
        q = p + f"transformer.resblocks.{i}."
        sd.update({
            q + "ln_1.weight": 1 + r(width), q + "ln_1.bias": r(width),
            q + "attn.in_proj_weight": r(3 * width, width), q + "attn.in_proj_bias": r(3 * width),
            q + "attn.out_proj.weight": r(width, width), q + "attn.out_proj.bias": r(width),
            q + "ln_2.weight": 1 + r(width), q + "ln_2.bias": r(width),
            q + "mlp.c_fc.weight": r(4 * width, width), q + "mlp.c_fc.bias": r(4 * width),
            q + "mlp.c_proj.weight": r(width, 4 * width), q + "mlp.c_proj.bias": r(width),
        })
    return sd


def _reference_penultimate(sd, ids, heads):
    """Independent OpenCLIP text forward (FrozenOpenCLIPEmbedder, layer='penultimate'): all blocks but the last,
    then ln_final. Written from the open_clip ResidualAttentionBlock definition with nn.MultiheadAttention."""
    p = "cond_stage_model.model."
    width = sd[p + "token_embedding.weight"].shape[1]
    n = len({k.split(".")[4] for k in sd if ".resblocks." in k})
    x = sd[p + "token_embedding.weight"][ids] + sd[p + "positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(n - 1):
        q = p + f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({
            "in_proj_weight": sd[q + "attn.in_proj_weight"], "in_proj_bias": sd[q + "attn.in_proj_bias"],
            "out_proj.weight": sd[q + "attn.out_proj.weight"], "out_proj.bias": sd[q + "attn.out_proj.bias"],
        })
        h = torch.nn.functional.layer_norm(x, (width,), sd[q + "ln_1.weight"], sd[q + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = torch.nn.functional.layer_norm(x, (width,), sd[q + "ln_2.weight"], sd[q + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ sd[q + "mlp.c_fc.weight"].T + sd[q + "mlp.c_fc.bias"])
        x = x + h @ sd[q + "mlp.c_proj.weight"].T + sd[q + "mlp.c_proj.bias"]
    return torch.nn.functional.layer_norm(x, (width,), sd[p + "ln_final.weight"], sd[p + "ln_final.bias"])


def test_open_clip_text_tower_conversion(tmp_path, tiny_state, tiny_ref_dir, ref_config):
    """A checkpoint WITH cond_stage_model.* (as the released ones): CLIPTextModel == OpenCLIP penultimate output,
    and the stored empty-prompt embedding equals that output for the ids [SOT, EOT, 0...]."""
    # text width = the UNet's cross-attention width (64 in stablesr-tiny)
    text = _open_clip_text_tower(width=ref_config["model"]["params"]["unet_config"]["params"]["context_dim"])
    path = _save(tmp_path, {**tiny_state, **text}, "with_text.ckpt")
    pipe, report = convert_stablesr_checkpoint(path, original_config=tiny_ref_dir / "config.yaml")
    assert pipe.text_encoder.config.num_hidden_layers == 2
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, 0], ids[0, 1] = 49406, 49407
    with torch.no_grad():
        expected = _reference_penultimate(text, ids, heads=1)
        got = pipe.text_encoder(ids).last_hidden_state
    assert_close_rel(got, expected, rtol=1e-5, name="text encoder")
    assert_close_rel(pipe.prompt_embedding(), expected, rtol=1e-5, name="stored empty-prompt embedding")
    skipped = " ".join(k for keys in report.skipped.values() for k in keys)
    assert "resblocks.2." in skipped and "logit_scale" in skipped


def test_v_prediction_and_turbo_settings(tmp_path, tiny_state, tiny_ref_dir, tiny_cases):
    turbo = _save(tmp_path, tiny_state, "stablesr_turbo.ckpt")
    pipe, _ = convert_stablesr_checkpoint(turbo, prompt_embeds=tiny_cases["c8.context"][:1])
    assert pipe.config.default_num_inference_steps == 4
    v = _save(tmp_path, tiny_state, "stablesr_768v_tiny.ckpt")
    pipe, report = convert_stablesr_checkpoint(v, prompt_embeds=tiny_cases["c8.context"][:1])
    assert report.prediction_type == "v_prediction"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.sample_size == 96
    with pytest.raises(ConversionError, match="prediction_type"):
        convert_stablesr_checkpoint(v, prompt_embeds=tiny_cases["c8.context"][:1], prediction_type="x0")
