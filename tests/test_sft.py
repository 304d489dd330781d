import pytest
import torch
from conftest import assert_close_rel, feature_widths, plain_config
from diffusers import UNet2DConditionModel

from stablesr.models.sft import SFTAdapter, SFTConv2d


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
    )


def conds(batch, size=16, channels=16, levels=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, channels, size >> k, size >> k, generator=g) for k in range(levels))


def test_official_count_full_size():
    """Full-size SD 2.1 UNet: 22 SFT layers, 176 tensors, 53,020,160 parameters (official-keys/param_counts.json)."""
    from stablesr.conversion import _unet_params_from_shapes  # noqa: F401  (import check of the converter)

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        )
        adapter = SFTAdapter.from_unet(unet)
    assert len(adapter.layers) == 22
    assert len(adapter.state_dict()) == 176
    assert sum(p.numel() for p in adapter.parameters()) == 53_020_160


def test_attach_detach_leaves_unet_bit_identical():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter = SFTAdapter.from_unet(unet, cond_channels=16)
    adapter.attach(unet)
    assert isinstance(unet.down_blocks[0].resnets[0].conv2, SFTConv2d)
    assert set(unet.state_dict()) != set(before)  # SFT params visible while attached
    adapter.detach(unet)
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, SFTConv2d) for m in unet.modules())


def test_matches_resblockdual_formula():
    """With SFT attached, one resnet computes skip(x) + SPADE(conv2 branch) exactly as the official ResBlockDual."""
    unet = tiny_unet()
    adapter = SFTAdapter.from_unet(unet, cond_channels=16)
    resnet = unet.down_blocks[1].resnets[0]
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    cond = torch.randn(2, 16, 8, 8)
    # Hand-written official formula.
    h = resnet.conv1(torch.nn.functional.silu(resnet.norm1(x)))
    h = h + resnet.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None]
    h = resnet.conv2(torch.nn.functional.silu(resnet.norm2(h)))
    spade = adapter.layers[adapter.config.target_modules.index("down_blocks.1.resnets.0.conv2")]
    actv = torch.relu(spade.mlp_shared[0](cond))
    h = torch.nn.functional.group_norm(h, 32, spade.param_free_norm.weight, spade.param_free_norm.bias, 1e-5)
    h = h * (1 + spade.mlp_gamma(actv)) + spade.mlp_beta(actv)
    expected = resnet.conv_shortcut(x) + h
    with adapter.attached(unet):
        adapter._wrappers["down_blocks.1.resnets.0.conv2"].condition = cond
        out = resnet(x, temb)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_levels_follow_official_routing():
    unet = tiny_unet()
    adapter = SFTAdapter.from_unet(unet, cond_channels=16)
    levels = dict(zip(adapter.config.target_modules, adapter.config.target_levels, strict=True))
    assert levels["down_blocks.0.resnets.0.conv2"] == 0
    assert levels["down_blocks.1.resnets.0.conv2"] == 1
    assert levels["mid_block.resnets.1.conv2"] == 1
    assert levels["up_blocks.0.resnets.1.conv2"] == 1
    assert levels["up_blocks.1.resnets.0.conv2"] == 0


def test_cfg_doubled_batch_equals_two_single_runs():
    unet = tiny_unet()
    adapter = SFTAdapter.from_unet(unet, cond_channels=16)
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(2, 7, 32)
    with adapter.attached(unet):
        adapter.set_condition(conds(1))
        doubled = unet(torch.cat([x, x]), 10, encoder_hidden_states=ctx).sample
        single = [unet(x, 10, encoder_hidden_states=ctx[i : i + 1]).sample for i in range(2)]
    torch.testing.assert_close(doubled, torch.cat(single), rtol=1e-5, atol=1e-5)


def test_errors_name_the_target():
    unet = tiny_unet()
    adapter = SFTAdapter.from_unet(unet, cond_channels=16)
    x, ctx = torch.randn(3, 4, 16, 16), torch.randn(3, 7, 32)
    with adapter.attached(unet):
        with pytest.raises(RuntimeError, match="down_blocks.0.resnets.0.conv2"):
            unet(x, 1, encoder_hidden_states=ctx)
        adapter.set_condition(conds(2))
        with pytest.raises(ValueError, match="batch 2"):
            unet(x, 1, encoder_hidden_states=ctx)
        adapter.set_condition(conds(3, size=8))
        with pytest.raises(ValueError, match="spatial size"):
            unet(x, 1, encoder_hidden_states=ctx)
    with pytest.raises(RuntimeError, match="attach"):
        adapter.set_condition(conds(3))


def test_round_trip_and_gradient_checkpointing(tmp_path):
    unet = tiny_unet()
    unet.requires_grad_(False)
    adapter = SFTAdapter.from_unet(unet, cond_channels=16)
    adapter.save_pretrained(tmp_path)
    loaded = SFTAdapter.from_pretrained(tmp_path)
    assert plain_config(loaded.config) == plain_config(adapter.config)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values(), strict=True))

    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    grads = []
    for ckpt in (False, True):
        feats = tuple(f.requires_grad_(True) for f in conds(2))
        unet.train()
        if ckpt:
            unet.enable_gradient_checkpointing()
        with loaded.attached(unet):
            loaded.set_condition(feats)
            unet(x, 500, encoder_hidden_states=ctx).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in loaded.parameters()] + [f.grad.clone() for f in feats])
        loaded.zero_grad()
    assert unet.is_gradient_checkpointing
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_official_vectors_c2(converted_tiny, tiny_cases):
    """c2: UNetModelDualcondV2(x, t, context, struct_cond) == stock UNet + attached SFT; 1e-4 relative."""
    pipe, _ = converted_tiny
    feats = tuple(tiny_cases[f"c1.enc_out_{w}"] for w in feature_widths(tiny_cases, "c1."))  # largest width first
    with pipe.sft_adapter.attached(pipe.unet):
        pipe.sft_adapter.set_condition(feats)
        out = pipe.unet(tiny_cases["c2.x"], tiny_cases["c2.timesteps"], encoder_hidden_states=tiny_cases["c2.context"])
    assert_close_rel(out.sample, tiny_cases["c2.model_out"], name="c2.model_out")
