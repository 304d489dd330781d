"""CFW (stage-2 fusion decoder) as an adapter on a stock diffusers AutoencoderKL.

Equivalence tests reproduce the official ``AutoencoderKLResi`` vectors (stablesr-tiny cases c3, c4, c5) from the
official tiny checkpoint; property tests cover the public API (``encode_features`` / ``decode``), the private fusion
context that gradient-checkpointed training keeps open, w = 0, round-trip, validation, batching and dtype.
"""

import copy
import math
import re

import pytest
import torch
from conftest import assert_close_rel, reference_keys
from diffusers import AutoencoderKL
from helpers_cfw import ldm_scale_factor, load_official_cfw, vae_config_from_ldm_yaml

from stablesr.models.cfw import CFWAdapter, CFWEncoderOutput, CFWFusionBlock, CFWFusionWrapper

C4_KEY = re.compile(r"c4\.decoded_w(\d+(?:p\d+)?)")


def _c4_cases(keys) -> list[tuple[float, str]]:
    """(fidelity weight, key) of every ``c4.decoded_w<w>`` tensor ("w0p5" is 0.5), by weight."""
    found = [(float(m.group(1).replace("p", ".")), key) for key in keys if (m := C4_KEY.fullmatch(key))]
    return sorted(found)


# Read from the fixture's tensor names at collection time (stablesr-tiny values when the folder is missing: the tests
# then skip / fail through tiny_ref_dir); test_all_c4_keys_covered checks them against the loaded vectors.
_KEYS = reference_keys()
C4_CASES = (
    _c4_cases(_KEYS)
    if _KEYS is not None
    else [(0.0, "c4.decoded_w0"), (0.5, "c4.decoded_w0p5"), (1.0, "c4.decoded_w1")]
)


@pytest.fixture(scope="module")
def official(tiny_ref_dir):
    return load_official_cfw(tiny_ref_dir)


@pytest.fixture(scope="module")
def cfw_block_out_channels(tiny_ref_dir):
    """VAE widths of the fixture's CFW autoencoder (ch * ch_mult of config_vqgan_cfw.yaml); (32, 32, 64, 64) here."""
    scale_factor = ldm_scale_factor(tiny_ref_dir / "config.yaml")
    config = vae_config_from_ldm_yaml(tiny_ref_dir / "config_vqgan_cfw.yaml", scale_factor)
    return tuple(config["block_out_channels"])


@pytest.fixture
def vae_and_adapter(official):
    """A fresh copy per test, so VAE/dtype changes cannot leak between tests."""
    vae, adapter, _ = official
    return copy.deepcopy(vae), copy.deepcopy(adapter)


def _features(tiny_cases):
    return [tiny_cases["c3.enc_fea_0"], tiny_cases["c3.enc_fea_1"]]


def _small(tiny_cases, size=8):
    """A (at most) 8x8 latent crop of c4.z with the matching feature crops (a tile), to keep the property tests cheap.
    The feature crops follow each feature's own size ratio to the latent (4 and 2 for the official VAE)."""
    z = tiny_cases["c4.z"]
    h, w = min(size, z.shape[-2]), min(size, z.shape[-1])
    crops = []
    for fea in _features(tiny_cases):
        ry, rx = fea.shape[-2] // z.shape[-2], fea.shape[-1] // z.shape[-1]
        crops.append(fea[..., : h * ry, : w * rx])
    return z[..., :h, :w], crops


def _wrappers(vae) -> list[CFWFusionWrapper]:
    return [module for module in vae.modules() if isinstance(module, CFWFusionWrapper)]


def _decoded_shape(tiny_cases, z):
    """Shape of the image decoded from latent ``z`` (pixel/latent ratio and channels of the official c5 decode)."""
    full_z, image = tiny_cases["c4.z"], tiny_cases["c5.decoded"]
    ry, rx = image.shape[-2] // full_z.shape[-2], image.shape[-1] // full_z.shape[-1]
    return (z.shape[0], image.shape[1], z.shape[-2] * ry, z.shape[-1] * rx)


# ---------------------------------------------------------------------------------------------------------------------
# Loading the official checkpoint


def test_official_checkpoint_loads_without_leftovers(official):
    vae, adapter, report = official
    assert report["vae_missing"] == [] and report["vae_unexpected"] == []
    assert report["vae_count"][0] == report["vae_count"][1]
    assert report["vae_numel"][0] == report["vae_numel"][1]
    assert report["fusion_missing"] == [] and report["fusion_unexpected"] == []
    # Key names equal the official decoder.fusion_layer_* names minus "decoder.".
    keys = set(adapter.state_dict())
    assert "fusion_layer_1.encode_enc_1.conv_out.weight" in keys
    assert "fusion_layer_2.encode_enc_2.1.rdb3.conv5.bias" in keys
    assert not any("encode_enc_3.conv_out" in key for key in keys)
    assert len(keys) == 156


def test_state_dict_keys_follow_levels():
    adapter = CFWAdapter(block_out_channels=(32, 32, 64, 64), fusion_levels=(3, 0))
    assert adapter.fusion_levels == (0, 3)
    prefixes = {key.split(".")[0] for key in adapter.state_dict()}
    assert prefixes == {"fusion_layer_0", "fusion_layer_3"}
    assert adapter.fusion_layer_3.encode_enc_1.conv1.in_channels == 128


# ---------------------------------------------------------------------------------------------------------------------
# Equivalence with the official vectors (float32, CPU)


@torch.no_grad()
def test_encode_matches_official_c3(official, tiny_cases, ref_config):
    vae, adapter, _ = official
    scale_factor = vae.config.scaling_factor  # the fixture's config.yaml scale_factor (see helpers_cfw)
    assert scale_factor == ref_config["model"]["params"]["scale_factor"]
    out = adapter.encode_features(vae, tiny_cases["c3.image"])
    assert isinstance(out, CFWEncoderOutput)
    posterior = out.latent_dist
    assert_close_rel(posterior.parameters, tiny_cases["c3.moments"], name="c3.moments")
    assert_close_rel(posterior.mean, tiny_cases["c3.posterior_mean"], name="c3.posterior_mean")
    assert_close_rel(posterior.logvar, tiny_cases["c3.posterior_logvar"], name="c3.posterior_logvar")
    assert_close_rel(posterior.std, tiny_cases["c3.posterior_std"], name="c3.posterior_std")
    assert_close_rel(out.encoder_features[0], tiny_cases["c3.enc_fea_0"], name="c3.enc_fea_0")
    assert_close_rel(out.encoder_features[1], tiny_cases["c3.enc_fea_1"], name="c3.enc_fea_1")
    latent_scaled = scale_factor * (posterior.mean + posterior.std * tiny_cases["c3.sample_noise"])
    assert_close_rel(latent_scaled, tiny_cases["c3.latent_scaled"], name="c3.latent_scaled")


def test_all_c4_keys_covered(tiny_cases, case_meta):
    """The c4 parametrization was read from this fixture (not the fallback) and covers every weight of its meta."""
    assert C4_CASES == _c4_cases(tiny_cases)
    assert [w for w, _ in C4_CASES] == sorted(case_meta["c4"]["w"])
    assert {k for k in tiny_cases if k.startswith("c4.")} == {"c4.z"} | {key for _, key in C4_CASES}


def _fusing_case():
    """A c4 case with a fidelity weight strictly inside (0, 1) (0.5 in stablesr-tiny), else the largest weight."""
    inside = [case for case in C4_CASES if 0.0 < case[0] < 1.0]
    return inside[len(inside) // 2] if inside else C4_CASES[-1]


@torch.no_grad()
@pytest.mark.parametrize("w, key", C4_CASES)
def test_decode_matches_official_c4(official, tiny_cases, w, key):
    vae, adapter, _ = official
    image = adapter.decode(vae, tiny_cases["c4.z"], _features(tiny_cases), fidelity_weight=w).sample
    assert_close_rel(image, tiny_cases[key], name=key)
    assert not _wrappers(vae)


@torch.no_grad()
def test_stock_decode_matches_official_c5(official, tiny_cases):
    vae, _, _ = official
    assert_close_rel(vae.decode(tiny_cases["c4.z"]).sample, tiny_cases["c5.decoded"], name="c5.decoded")


@torch.no_grad()
def test_one_encoder_pass_then_fusion_context_matches_official(vae_and_adapter, tiny_cases):
    """One encode gives the posterior and the features; the private fusion context (what gradient-checkpointed
    training keeps open) makes a plain ``vae.decode`` fuse them exactly as ``decode`` does."""
    vae, adapter = vae_and_adapter
    calls = []
    handle = vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    enc = adapter.encode_features(vae, tiny_cases["c3.image"])
    handle.remove()
    assert len(calls) == 1
    assert torch.equal(enc.latent_dist.mean, vae.encode(tiny_cases["c3.image"]).latent_dist.mean)
    w, key = _fusing_case()
    with adapter._fusion_context(vae, enc.encoder_features, w):
        image = vae.decode(tiny_cases["c4.z"]).sample
    assert_close_rel(image, tiny_cases[key], name=f"fusion context {key}")
    assert torch.equal(image, adapter.decode(vae, tiny_cases["c4.z"], enc.encoder_features, w).sample)


def test_public_api_is_stateless(vae_and_adapter):
    """Fusion state is passed per call; no setter, stored features or public attach remain."""
    _, adapter = vae_and_adapter
    gone = ("fidelity_weight", "encoder_features", "set_encoder_features", "clear_encoder_features", "attach",
            "detach", "attached", "is_attached")
    assert [name for name in gone if hasattr(adapter, name)] == []


# ---------------------------------------------------------------------------------------------------------------------
# Properties


@torch.no_grad()
def test_w0_is_bit_identical_to_stock_decode(vae_and_adapter, tiny_cases):
    vae, adapter = vae_and_adapter
    z, features = _small(tiny_cases)
    stock = vae.decode(z).sample
    assert torch.equal(adapter.decode(vae, z, features, fidelity_weight=0.0).sample, stock)
    assert torch.equal(adapter.decode(vae, z, None, fidelity_weight=0).sample, stock)
    with adapter._fusion_context(vae, features, 0.0):
        assert torch.equal(vae.decode(z).sample, stock)
    with adapter._fusion_context(vae, None, 0.0):
        assert torch.equal(vae.decode(z).sample, stock)
    with adapter._fusion_context(vae, features, 1.0):
        assert not torch.equal(vae.decode(z).sample, stock)


def test_fusion_context_restores_vae_exactly(vae_and_adapter, tiny_cases):
    vae, adapter = vae_and_adapter
    before = {key: value.clone() for key, value in vae.state_dict().items()}
    targets = [vae.decoder.up_blocks[2].resnets[-1], vae.decoder.up_blocks[1].resnets[-1]]
    z, features = _small(tiny_cases)

    with adapter._fusion_context(vae, features, 1.0):
        assert isinstance(vae.decoder.up_blocks[2].resnets[-1], CFWFusionWrapper)
        assert vae.decoder.up_blocks[2].resnets[-1].fusion is adapter.fusion_layer_1
        assert vae.decoder.up_blocks[1].resnets[-1].fusion is adapter.fusion_layer_2
        with pytest.raises(ValueError, match="already carries"), adapter._fusion_context(vae, features, 0.5):
            pass
        assert len(_wrappers(vae)) == 2  # the failed inner context left the outer one alone
        with pytest.raises(ValueError, match="already carries"), torch.no_grad():
            adapter.decode(vae, z, features, fidelity_weight=1.0)

    assert [vae.decoder.up_blocks[2].resnets[-1], vae.decoder.up_blocks[1].resnets[-1]] == targets
    with torch.no_grad():
        adapter.encode_features(vae, torch.zeros(1, 3, 32, 32))
        adapter.decode(vae, z, features, fidelity_weight=1.0)
    assert not _wrappers(vae)
    assert not any(module._forward_hooks for module in vae.modules())
    after = vae.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)

    with pytest.raises(RuntimeError), adapter._fusion_context(vae, features, 1.0):
        raise RuntimeError("boom")
    assert not _wrappers(vae)
    assert list(vae.state_dict()) == list(before)


@torch.no_grad()
def test_save_load_round_trip(vae_and_adapter, tiny_cases, tmp_path, cfw_block_out_channels):
    vae, adapter = vae_and_adapter
    adapter.save_pretrained(tmp_path / "cfw")
    assert (tmp_path / "cfw" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = CFWAdapter.from_pretrained(tmp_path / "cfw").eval()
    assert tuple(loaded.config.block_out_channels) == cfw_block_out_channels
    assert tuple(loaded.config.fusion_levels) == (1, 2)
    z, features = _small(tiny_cases)
    expected = adapter.decode(vae, z, features, fidelity_weight=0.5).sample
    assert torch.equal(loaded.decode(vae, z, features, fidelity_weight=0.5).sample, expected)


@torch.no_grad()
def test_feature_size_mismatch_names_the_level(vae_and_adapter, tiny_cases):
    vae, adapter = vae_and_adapter
    fea_0, fea_1 = _features(tiny_cases)
    half_0 = fea_0[..., : fea_0.shape[-2] // 2, : fea_0.shape[-1] // 2]
    with pytest.raises(ValueError, match="level 1"):
        adapter.decode(vae, tiny_cases["c4.z"], [half_0, fea_1], fidelity_weight=0.5)
    with pytest.raises(ValueError, match="level 2"):
        adapter.decode(vae, tiny_cases["c4.z"], [fea_0, fea_1[..., : fea_1.shape[-1] // 2]], fidelity_weight=0.5)
    with pytest.raises(ValueError, match="level 2"):
        adapter.decode(vae, tiny_cases["c4.z"], [fea_0, fea_0], fidelity_weight=0.5)  # wrong channels
    with pytest.raises(ValueError, match="one per fusion level"):
        adapter.decode(vae, tiny_cases["c4.z"], [fea_0], fidelity_weight=0.5)
    with pytest.raises(ValueError, match="required"):
        adapter.decode(vae, tiny_cases["c4.z"], None, fidelity_weight=0.5)
    # A crop of the latent with the matching crop of the features is fine (tiled decode).
    z, features = _small(tiny_cases)
    assert adapter.decode(vae, z, features, fidelity_weight=0.5).sample.shape == _decoded_shape(tiny_cases, z)
    with pytest.raises(ValueError, match="required"), adapter._fusion_context(vae, None, 0.5):
        pass
    assert not _wrappers(vae)


@pytest.mark.parametrize("w", [-0.1, 1.5, math.nan, "0.5", True])
def test_invalid_fidelity_weight_raises(vae_and_adapter, tiny_cases, w):
    vae, adapter = vae_and_adapter
    with pytest.raises(ValueError, match="fidelity_weight"):
        adapter.decode(vae, tiny_cases["c4.z"], _features(tiny_cases), fidelity_weight=w)
    with pytest.raises(ValueError, match="fidelity_weight"), adapter._fusion_context(vae, _features(tiny_cases), w):
        pass


def test_config_validation(official, cfw_block_out_channels):
    vae, _, _ = official
    with pytest.raises(ValueError, match="out of range"):
        CFWAdapter(block_out_channels=(32, 32, 64, 64), fusion_levels=(4,))
    with pytest.raises(ValueError, match="distinct"):
        CFWAdapter(block_out_channels=(32, 32, 64, 64), fusion_levels=(1, 1))
    with pytest.raises(ValueError, match="GroupNorm"):
        CFWAdapter(block_out_channels=(16, 16), fusion_levels=(1,))
    other = CFWAdapter(block_out_channels=tuple(2 * c for c in cfw_block_out_channels))  # not the VAE's widths
    with pytest.raises(ValueError, match="block_out_channels"):
        other.encode_features(vae, torch.zeros(1, 3, 32, 32))
    features = [torch.zeros(1, c, 8, 8) for c in (2 * cfw_block_out_channels[1], 2 * cfw_block_out_channels[2])]
    with pytest.raises(ValueError, match="block_out_channels"):
        other.decode(vae, torch.zeros(1, 4, 4, 4), features, fidelity_weight=0.5)
    assert CFWAdapter.from_vae(vae).config.block_out_channels == cfw_block_out_channels


@torch.no_grad()
def test_batch_and_slicing(vae_and_adapter, tiny_cases):
    vae, adapter = vae_and_adapter
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    enc = adapter.encode_features(vae, images)
    widths = vae.config.block_out_channels  # features of levels 1 and 2: after one and two downsamples
    assert [tuple(f.shape) for f in enc.encoder_features] == [(2, widths[1], 32, 32), (2, widths[2], 16, 16)]
    z = enc.latent_dist.mean
    batched = adapter.decode(vae, z, enc.encoder_features, fidelity_weight=0.7).sample
    single = adapter.encode_features(vae, images[1:])
    assert_close_rel(enc.encoder_features[1][1:], single.encoder_features[1], rtol=1e-5, name="batch enc_fea_1")
    one = adapter.decode(vae, z[1:], [f[1:] for f in enc.encoder_features], fidelity_weight=0.7).sample
    assert_close_rel(batched[1:], one, rtol=1e-5, name="batched vs single decode")

    vae.enable_slicing()
    sliced_enc = adapter.encode_features(vae, images)
    assert_close_rel(sliced_enc.encoder_features[0], enc.encoder_features[0], rtol=1e-5, name="sliced enc_fea_0")
    sliced = adapter.decode(vae, z, enc.encoder_features, fidelity_weight=0.7).sample
    assert_close_rel(sliced, batched, rtol=1e-5, name="sliced decode")

    vae.disable_slicing()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    tiled_enc = adapter.encode_features(vae, images)  # encodes untiled: per-tile features would not stitch
    assert vae.use_tiling
    assert torch.equal(tiled_enc.encoder_features[1], enc.encoder_features[1])
    assert torch.equal(tiled_enc.latent_dist.mean, enc.latent_dist.mean)
    with pytest.raises(ValueError, match="tiling"):
        adapter.decode(vae, z, enc.encoder_features, fidelity_weight=0.7)


@torch.no_grad()
def test_fusion_runs_in_adapter_dtype(vae_and_adapter, tiny_cases):
    vae, adapter = vae_and_adapter
    z, features = tiny_cases["c4.z"], _features(tiny_cases)
    w, key = C4_CASES[-1]  # the largest weight (1.0, c4.decoded_w1 in stablesr-tiny): the most fusion
    reference = adapter.decode(vae, z, features, fidelity_weight=w).sample
    adapter.to(torch.float64)
    image = adapter.decode(vae, z, features, fidelity_weight=w).sample
    assert image.dtype == torch.float32
    assert_close_rel(image, tiny_cases[key], name="float64 fusion")
    assert_close_rel(image, reference, name="float64 vs float32 fusion")


def _official_fusion(params: dict, prefix: str, enc_feat, dec_feat, w, num_rrdb):
    """IceClear/StableSR ``Fuse_sft_block_RRDB.forward`` written out with plain torch ops on a state dict:
    ``dec + w * ResBlock_3(RRDB^n(ResBlock_1(cat[enc, dec])))``. ResBlock (``model.py:ResBlock``): GN(32, eps 1e-6) ->
    x * sigmoid(x) -> conv3x3 -> GN -> x * sigmoid(x) -> conv3x3, plus a 1x1 ``conv_out`` skip when the widths differ.
    BasicSR RRDB: three dense blocks (conv1..4 each on the concat of all previous outputs, LeakyReLU 0.2; conv5 on
    the concat, output conv5 * 0.2 + x), then rdb3(rdb2(rdb1(x))) * 0.2 + x."""
    P = lambda name: params[prefix + name]  # noqa: E731
    conv3 = lambda x, name: torch.nn.functional.conv2d(x, P(name + ".weight"), P(name + ".bias"), padding=1)  # noqa: E731

    def swish(x):
        return x * torch.sigmoid(x)

    def res_block(x, name):
        h = torch.nn.functional.group_norm(x, 32, P(name + ".norm1.weight"), P(name + ".norm1.bias"), eps=1e-6)
        h = conv3(swish(h), name + ".conv1")
        h = torch.nn.functional.group_norm(h, 32, P(name + ".norm2.weight"), P(name + ".norm2.bias"), eps=1e-6)
        h = conv3(swish(h), name + ".conv2")
        if prefix + name + ".conv_out.weight" in params:
            x = torch.nn.functional.conv2d(x, P(name + ".conv_out.weight"), P(name + ".conv_out.bias"))
        return x + h

    def dense_block(x, name):
        outs = [x]
        for i in range(1, 5):
            outs.append(torch.nn.functional.leaky_relu(conv3(torch.cat(outs, 1), f"{name}.conv{i}"), 0.2))
        return conv3(torch.cat(outs, 1), f"{name}.conv5") * 0.2 + x

    h = res_block(torch.cat([enc_feat, dec_feat], 1), "encode_enc_1")
    for i in range(num_rrdb):
        rrdb_in = h
        for j in (1, 2, 3):
            h = dense_block(h, f"encode_enc_2.{i}.rdb{j}")
        h = h * 0.2 + rrdb_in
    return dec_feat + w * res_block(h, "encode_enc_3")


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_fusion_block_matches_official_formula(official, w):
    """CFWFusionBlock vs the official fusion formula written out independently (float64): a random block with every
    parameter redrawn (so the small RDB init hides no path) and the official tiny checkpoint's fusion_layer_1 and 2.
    Bound 1e-10 relative; measured <= 3e-15 (float64 reassociation)."""
    torch.manual_seed(0)
    block = CFWFusionBlock(32, num_rrdb=2).double()
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    _, adapter, _ = official
    for fusion in (block, *(copy.deepcopy(adapter.fusion_layer(level)).double() for level in (1, 2))):
        params = dict(fusion.state_dict())
        num_rrdb = len({key.split(".")[1] for key in params if key.startswith("encode_enc_2.")})
        assert num_rrdb == 2  # official num_block
        channels = params["encode_enc_3.conv2.weight"].shape[0]
        enc, dec = (torch.randn(2, channels, 8, 6, dtype=torch.float64) for _ in range(2))
        expected = _official_fusion(params, "", enc, dec, w, num_rrdb)
        with torch.no_grad():
            actual = fusion(enc, dec, w)
        assert_close_rel(actual, expected, rtol=1e-10, atol=1e-12, name=f"CFW fusion formula w={w}")


def test_from_scratch_init_matches_basicsr():
    """RDB convs: kaiming-normal (fan_in, gain sqrt 2) x 0.1, zero bias; the ResBlocks keep PyTorch defaults."""
    torch.manual_seed(0)
    block = CFWFusionBlock(256, num_rrdb=2)
    conv = block.encode_enc_2[0].rdb1.conv5  # (256, 256 + 4 * 32, 3, 3)
    expected_std = 0.1 * math.sqrt(2.0 / (conv.in_channels * 9))
    assert torch.count_nonzero(conv.bias) == 0
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    assert torch.count_nonzero(block.encode_enc_1.conv1.bias) > 0


def test_gradients_reach_fusion_only(vae_and_adapter, tiny_cases):
    vae, adapter = vae_and_adapter
    vae.requires_grad_(False)
    adapter.requires_grad_(True)
    image = adapter.decode(vae, *_small(tiny_cases), fidelity_weight=1.0).sample
    image.mean().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert all(p.grad is None for p in vae.parameters())


def test_rejects_unsupported_vae_blocks():
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
    )
    adapter = CFWAdapter.from_vae(vae, fusion_levels=(1,))
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        adapter.encode_features(vae, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        adapter.decode(vae, torch.zeros(1, 4, 8, 8), [torch.zeros(1, 32, 8, 8)], fidelity_weight=0.5)
    assert not _wrappers(vae)


def test_sd_sized_parameter_counts():
    """SD VAE widths give the official sizes (stablesr-official.md e: 10.50M + 33.90M), built on the meta device."""
    with torch.device("meta"):
        adapter = CFWAdapter()
    counts = {level: sum(p.numel() for p in adapter.fusion_layer(level).parameters()) for level in (1, 2)}
    assert counts == {1: 10_496_000, 2: 33_897_728}
