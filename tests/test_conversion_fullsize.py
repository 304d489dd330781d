"""Conversion of FULL-SIZE official-layout checkpoints (random values, every official key and shape).

The pair is built from ``shared/reference/official-keys`` (``stablesr_512.tsv``: 1616 keys, 1.41 B parameters including
the 354 M OpenCLIP text tower; ``vqgan_cfw.tsv``: 404 keys), saved as float16 Lightning-style ``.ckpt`` files (2.8 GB
+ 0.26 GB), converted to float32 and saved with ``save_pretrained`` (5.8 GB), then loaded back.

Checks: zero leftover keys (every input key converted or skipped on purpose, and exactly the expected ones skipped),
every component's parameter count equal to the official count (``param_counts.json``), tensors landing bit-exactly
(after the float16 -> float32 cast) at the expected diffusers locations (all SFT, time-aware-encoder and CFW tensors;
a hand-mapped sample of UNet, VAE and text-encoder tensors, including attention q/k/v), and an exact
``save_pretrained`` -> ``StableSRPipeline.from_pretrained`` round trip.

Cost on a 2-core CI machine: about 1.5-2 minutes, about 10 GB peak RSS (of which about 3 GB are pages of the
memory-mapped checkpoint), 9 GB of temporary disk (deleted at the end). Without the official-keys folder the tests
skip, unless ``STABLESR_REQUIRE_REFERENCE=1``, which makes a missing folder an error.
"""

import gc
import json
import math
import os
import re
import shutil

import pytest
import torch
from conftest import plain_config
from official_layout import OFFICIAL_KEYS_DIR, read_key_table

UNET, TEXT, ENCODER = "model.diffusion_model.", "cond_stage_model.model.", "structcond_stage_model."
POOL_SIZE = 1 << 26  # > the largest official tensor (token_embedding, 50.6 M values)

# Official key (after the prefix) -> diffusers key, written out by hand from the LDM and diffusers module layouts.
UNET_SAMPLES = {
    "input_blocks.0.0.weight": "conv_in.weight",
    "time_embed.2.bias": "time_embedding.linear_2.bias",
    "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
    "input_blocks.5.1.transformer_blocks.0.attn1.to_q.weight": "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
    "input_blocks.9.0.op.weight": "down_blocks.2.downsamplers.0.conv.weight",
    "input_blocks.11.0.emb_layers.1.weight": "down_blocks.3.resnets.1.time_emb_proj.weight",
    "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
    "middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight": "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight",
    "output_blocks.8.2.conv.weight": "up_blocks.2.upsamplers.0.conv.weight",
    "output_blocks.9.0.skip_connection.weight": "up_blocks.3.resnets.0.conv_shortcut.weight",
    "output_blocks.10.1.transformer_blocks.0.ff.net.0.proj.weight": "up_blocks.3.attentions.1.transformer_blocks.0.ff.net.0.proj.weight",
    "output_blocks.11.1.norm.weight": "up_blocks.3.attentions.2.norm.weight",
    "out.0.weight": "conv_norm_out.weight",
    "out.2.bias": "conv_out.bias",
}
# The CFW file's VAE (the one the pipeline decodes with). Attention 1x1 convs become linear weights.
VAE_SAMPLES = {
    "encoder.conv_in.weight": "encoder.conv_in.weight",
    "encoder.down.0.downsample.conv.weight": "encoder.down_blocks.0.downsamplers.0.conv.weight",
    "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
    "encoder.mid.attn_1.q.weight": "encoder.mid_block.attentions.0.to_q.weight",
    "encoder.mid.attn_1.norm.bias": "encoder.mid_block.attentions.0.group_norm.bias",
    "decoder.mid.attn_1.proj_out.weight": "decoder.mid_block.attentions.0.to_out.0.weight",
    "decoder.mid.attn_1.v.bias": "decoder.mid_block.attentions.0.to_v.bias",
    "decoder.mid.block_2.conv1.weight": "decoder.mid_block.resnets.1.conv1.weight",
    "decoder.up.3.block.0.conv1.weight": "decoder.up_blocks.0.resnets.0.conv1.weight",
    "decoder.up.1.upsample.conv.weight": "decoder.up_blocks.2.upsamplers.0.conv.weight",
    "decoder.norm_out.weight": "decoder.conv_norm_out.weight",
    "quant_conv.weight": "quant_conv.weight",
    "post_quant_conv.bias": "post_quant_conv.bias",
}
# OpenCLIP -> transformers CLIPTextModel (without the ``text_model.`` level, which newer transformers drop).
TEXT_SAMPLES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "transformer.resblocks.0.ln_1.weight": "encoder.layers.0.layer_norm1.weight",
    "transformer.resblocks.3.attn.out_proj.bias": "encoder.layers.3.self_attn.out_proj.bias",
    "transformer.resblocks.22.mlp.c_fc.weight": "encoder.layers.22.mlp.fc1.weight",
    "transformer.resblocks.22.mlp.c_proj.weight": "encoder.layers.22.mlp.fc2.weight",
    "transformer.resblocks.22.ln_2.bias": "encoder.layers.22.layer_norm2.bias",
    "ln_final.weight": "final_layer_norm.weight",
}
# Fused OpenCLIP in_proj (q; k; v stacked on dim 0) -> the three transformers projections.
TEXT_QKV_SAMPLES = {
    "transformer.resblocks.5.attn.in_proj_weight": "encoder.layers.5.self_attn.{}_proj.weight",
    "transformer.resblocks.11.attn.in_proj_bias": "encoder.layers.11.self_attn.{}_proj.bias",
}
EXPECTED_CONVERTED = {  # diffusers tensors per part (the text encoder's fused q/k/v become three tensors each)
    "unet": 686,
    "sft_adapter": 176,
    "time_aware_encoder": 200,
    "vae": 248,
    "cfw_adapter": 156,
    "text_encoder": 372,
}


@pytest.fixture(scope="module")
def official_keys_dir():
    path = OFFICIAL_KEYS_DIR
    names = ("stablesr_512.tsv", "vqgan_cfw.tsv", "param_counts.json")
    if not all((path / name).is_file() for name in names):
        msg = f"official key lists ({', '.join(names)}) not found in {path} (shared/reference/official-keys)"
        if os.environ.get("STABLESR_REQUIRE_REFERENCE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def fast_random_state_dict(table, seed: int, tag_start: int = 0) -> dict[str, torch.Tensor]:
    """float16 values ~ N(0, 0.02) for every key, like ``official_layout.random_state_dict`` but ~5x faster.

    Each tensor is a copy of a random window of one random pool, and its first value is replaced by a tag unique to
    the key ((index + 1) * 2**-12, exact in float16 up to 2047 keys), so no two tensors are equal and a tensor put at
    a wrong place cannot match by chance.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL_SIZE, dtype=torch.float16).normal_(0.0, 0.02, generator=gen)
    offsets = torch.randint(0, POOL_SIZE, (len(table),), generator=gen).tolist()
    out = {}
    for i, (key, (shape, _)) in enumerate(table.items()):
        n = math.prod(shape)
        start = offsets[i] % (POOL_SIZE - n + 1)
        tensor = pool[start : start + n].clone()
        tensor[0] = (tag_start + i + 1) * 2.0**-12
        out[key] = tensor.reshape(shape)
    return out


def expected_param_counts(keys_dir, table) -> dict[str, int]:
    counts = json.loads((keys_dir / "param_counts.json").read_text())
    sr, cfw = counts["stablesr_512"], counts["vqgan_cfw"]
    spade = sr["  of which spade layers"]
    last = max(
        int(m.group(1)) for k in table if (m := re.match(re.escape(TEXT) + r"transformer\.resblocks\.(\d+)\.", k))
    )
    never_run = [k for k in table if k.startswith(TEXT + f"transformer.resblocks.{last}.")]
    never_run += [TEXT + "text_projection", TEXT + "logit_scale"]
    return {
        "unet": sr["model.diffusion_model (UNetModelDualcondV2)"] - spade,
        "sft_adapter": spade,
        "time_aware_encoder": sr["structcond_stage_model (EncoderUNetModelWT)"],
        "vae": sr["first_stage_model (AutoencoderKL)"],
        "cfw_adapter": cfw["  of which decoder.fusion_layer_* (CFW)"],
        # official penultimate-layer conditioning: the last block, text_projection and logit_scale are never run
        "text_encoder": sr["cond_stage_model (FrozenOpenCLIPEmbedder, ViT-H-14 text tower)"]
        - sum(math.prod(table[k][0]) for k in never_run),
    }


@pytest.fixture(scope="module")
def fullsize(official_keys_dir, tmp_path_factory):
    """Build the float16 pair, convert it (saving the folder), keep the source tensors the checks need."""
    from stablesr.conversion import convert_stablesr_checkpoint

    work = tmp_path_factory.mktemp("fullsize")
    try:
        table = read_key_table(official_keys_dir / "stablesr_512.tsv")
        cfw_table = read_key_table(official_keys_dir / "vqgan_cfw.tsv")
        assert len(table) == 1616 and len(cfw_table) == 404

        sd = fast_random_state_dict(table, seed=0)
        torch.save({"state_dict": sd, "global_step": 0, "epoch": 117}, work / "stablesr_000117.ckpt")
        # Kept for the checks (each tensor owns its storage): the SFT, encoder, CFW parts and the samples, ~0.3 GB.
        samples = {UNET + k for k in UNET_SAMPLES} | {TEXT + k for k in (*TEXT_SAMPLES, *TEXT_QKV_SAMPLES)}
        kept = {k: v for k, v in sd.items() if ".spade." in k or k.startswith(ENCODER) or k in samples}
        keys = list(sd)
        del sd
        cfw_sd = fast_random_state_dict(cfw_table, seed=1, tag_start=len(table))
        torch.save({"state_dict": cfw_sd, "global_step": 0, "epoch": 11}, work / "vqgan_cfw_00011.ckpt")
        cfw_keys = list(cfw_sd)
        kept.update({k: v for k, v in cfw_sd.items() if k.startswith("decoder.fusion_layer") or k in VAE_SAMPLES})
        del cfw_sd
        gc.collect()

        out = work / "converted"
        pipe, report = convert_stablesr_checkpoint(work / "stablesr_000117.ckpt", work / "vqgan_cfw_00011.ckpt", out)
        for name in ("stablesr_000117.ckpt", "vqgan_cfw_00011.ckpt"):  # 3 GB of disk back before the checks
            (work / name).unlink()
        gc.collect()
        yield {
            "pipe": pipe,
            "report": report,
            "out": out,
            "kept": kept,
            "keys": keys,
            "cfw_keys": cfw_keys,
            "expected_counts": expected_param_counts(official_keys_dir, table),
        }
    finally:
        # pytest keeps the last 3 base temp folders: do not leave 6 GB behind per run.
        shutil.rmtree(work, ignore_errors=True)


def _text_state(pipe) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}


def test_every_key_accounted_for(fullsize):
    report, keys, cfw_keys = fullsize["report"], fullsize["keys"], fullsize["cfw_keys"]
    assert report.converted == EXPECTED_CONVERTED
    skipped = {k for ks in report.skipped.values() for k in ks}
    last_block = TEXT + "transformer.resblocks.23."
    expected_skips = {k for k in keys if k.startswith("first_stage_model.")}  # the CFW file's VAE is used
    expected_skips |= {k for k in keys if k.startswith(last_block)} | {TEXT + "text_projection", TEXT + "logit_scale"}
    expected_skips |= {k for k in keys if "." not in k}  # the 12 schedule buffers
    assert skipped == expected_skips
    assert len(skipped) == 248 + 12 + 2 + 12
    # Source keys per converted part + skipped keys == every input key: zero leftover.
    parts = {
        "unet": [k for k in keys if k.startswith(UNET) and ".spade." not in k],
        "sft_adapter": [k for k in keys if ".spade." in k],
        "time_aware_encoder": [k for k in keys if k.startswith(ENCODER)],
        "text_encoder": [k for k in keys if k.startswith(TEXT) and k not in skipped],
    }
    cfw_parts = {
        "vae": [k for k in cfw_keys if not k.startswith("decoder.fusion_layer")],
        "cfw_adapter": [k for k in cfw_keys if k.startswith("decoder.fusion_layer")],
    }
    leftover = set(keys) - skipped - {k for ks in parts.values() for k in ks}
    cfw_leftover = set(cfw_keys) - {k for ks in cfw_parts.values() for k in ks}
    assert not leftover and not cfw_leftover, sorted(leftover | cfw_leftover)[:20]
    assert len(parts["unet"]) == 686 and len(parts["sft_adapter"]) == 176 and len(parts["text_encoder"]) == 280
    assert sorted(e.split(":")[1] for e in report.other_entries) == ["epoch", "epoch", "global_step", "global_step"]
    assert report.config_source == "shapes" and report.prediction_type == "epsilon"


def test_official_parameter_counts(fullsize):
    pipe, expected = fullsize["pipe"], fullsize["expected_counts"]
    assert expected["unet"] == 865_910_724 and expected["sft_adapter"] == 53_020_160
    assert expected["time_aware_encoder"] == 52_494_080 and expected["vae"] == 83_653_863
    assert expected["cfw_adapter"] == 44_393_728
    got = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in expected}
    assert got == expected
    for name in expected:
        dtypes = {p.dtype for p in getattr(pipe, name).parameters()}
        assert dtypes == {torch.float32}, (name, dtypes)
        assert not any(p.is_meta for p in getattr(pipe, name).parameters()), name
    assert pipe.text_encoder.config.num_hidden_layers == 23
    assert pipe.unet.config.cross_attention_dim == 1024 and pipe.unet.config.sample_size == 64
    embeds = pipe.prompt_embedding()
    assert embeds.shape == (1, 77, 1024) and torch.isfinite(embeds).all()


def _assert_exact(got: torch.Tensor, source: torch.Tensor, what: str):
    expected = source.float()
    assert got.dtype == torch.float32, what
    assert got.numel() == expected.numel(), f"{what}: {tuple(got.shape)} vs {tuple(source.shape)}"
    assert torch.equal(got, expected.reshape(got.shape)), f"{what}: values differ"


def test_tensors_land_bit_exactly(fullsize):
    pipe, kept = fullsize["pipe"], fullsize["kept"]
    unet = pipe.unet.state_dict()
    for src, dst in UNET_SAMPLES.items():
        _assert_exact(unet[dst], kept[UNET + src], f"{src} -> unet.{dst}")
    vae = pipe.vae.state_dict()
    for src, dst in VAE_SAMPLES.items():
        _assert_exact(vae[dst], kept[src], f"{src} -> vae.{dst}")
    assert vae["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    text = _text_state(pipe)
    for src, dst in TEXT_SAMPLES.items():
        _assert_exact(text[dst], kept[TEXT + src], f"{src} -> text_encoder.{dst}")
    for src, dst in TEXT_QKV_SAMPLES.items():
        for part, chunk in zip("qkv", kept[TEXT + src].chunk(3, dim=0), strict=True):
            _assert_exact(text[dst.format(part)], chunk, f"{src}[{part}] -> text_encoder.{dst.format(part)}")

    # Every time-aware-encoder tensor (official names minus the prefix), attention qkv included.
    encoder = pipe.time_aware_encoder.state_dict()
    encoder_keys = [k for k in kept if k.startswith(ENCODER)]
    assert len(encoder_keys) == 200 and set(encoder) == {k.removeprefix(ENCODER) for k in encoder_keys}
    assert "structcond_stage_model.input_blocks.7.1.qkv.weight" in encoder_keys
    for key in encoder_keys:
        _assert_exact(encoder[key.removeprefix(ENCODER)], kept[key], key)

    # Every CFW tensor (official names minus ``decoder.``).
    cfw = pipe.cfw_adapter.state_dict()
    cfw_keys = [k for k in kept if k.startswith("decoder.fusion_layer")]
    assert len(cfw_keys) == 156 and set(cfw) == {k.removeprefix("decoder.") for k in cfw_keys}
    for key in cfw_keys:
        _assert_exact(cfw[key.removeprefix("decoder.")], kept[key], key)

    # Every SFT tensor: official input_blocks.i / middle_block.i / output_blocks.i SPADE -> the conv2 of that resnet.
    sft = pipe.sft_adapter.state_dict()
    targets = list(pipe.sft_adapter.config.target_modules)
    spade_keys = [k for k in kept if ".spade." in k]
    assert len(spade_keys) == 176 and len(targets) == 22
    for key in spade_keys:
        block, index, suffix = re.match(re.escape(UNET) + r"(\w+)\.(\d+)\.(?:0\.)?spade\.(.+)", key).groups()
        index = int(index)
        if block == "input_blocks":  # 2 resnets + 1 downsampler per level after conv_in
            target = f"down_blocks.{(index - 1) // 3}.resnets.{(index - 1) % 3}.conv2"
        elif block == "middle_block":  # resnet, attention, resnet
            target = f"mid_block.resnets.{index // 2}.conv2"
        else:  # 3 resnets per level
            target = f"up_blocks.{index // 3}.resnets.{index % 3}.conv2"
        _assert_exact(sft[f"layers.{targets.index(target)}.{suffix}"], kept[key], f"{key} -> {target}")


def _config(model) -> dict:
    if hasattr(model.config, "to_dict"):  # transformers: drop bookkeeping entries
        skip = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}
        return {k: v for k, v in model.config.to_dict().items() if k not in skip and not k.startswith("_")}
    return plain_config(model.config)


def test_save_load_round_trip(fullsize):
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    pipe, out = fullsize["pipe"], fullsize["out"]
    for sub in (
        "unet",
        "vae",
        "time_aware_encoder",
        "sft_adapter",
        "cfw_adapter",
        "text_encoder",
        "scheduler",
        "prompt_embedding",
    ):
        assert (out / sub).is_dir(), sub
    assert not list(out.rglob("*.bin")) and not list(out.parent.glob(".converted.*")), "safetensors only, no temp dirs"
    loaded = StableSRPipeline.from_pretrained(out).components
    assert loaded["scheduler"].config.prediction_type == "epsilon"
    assert loaded["tokenizer"] is None
    # One component at a time, released after its check: the loaded weights are memory-mapped from the folder.
    for name in (
        "unet",
        "text_encoder",
        "vae",
        "time_aware_encoder",
        "sft_adapter",
        "cfw_adapter",
        "prompt_embedding",
    ):
        a, b = getattr(pipe, name), loaded.pop(name)
        assert type(a) is type(b), name
        assert _config(a) == _config(b), name
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb), name
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{name}: {different[:5]}"
        del b, sb
        gc.collect()
