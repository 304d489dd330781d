"""Loads the official tiny CFW checkpoint (``vqgan_cfw_tiny.ckpt``) into a diffusers AutoencoderKL + CFWAdapter.

Test-only stand-in for the official converter (``stablesr/conversion.py`` is written separately): the VAE part goes
through diffusers' own ``convert_ldm_vae_checkpoint``, the fusion part is a prefix strip.
"""

from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from stablesr.models.cfw import CFWAdapter

FUSION_PREFIX = "decoder.fusion_layer_"


def ldm_scale_factor(ldm_yaml_path: Path) -> float:
    """``model.params.scale_factor`` of the LDM config that uses this VAE (the CFW yaml itself has none)."""
    return float(yaml.safe_load(Path(ldm_yaml_path).read_text())["model"]["params"]["scale_factor"])


def vae_config_from_ldm_yaml(yaml_path: Path, scaling_factor: float) -> dict:
    """AutoencoderKL config from an ``AutoencoderKLResi`` yaml, like ``create_vae_diffusers_config_from_ldm``;
    ``scaling_factor`` is the LDM's ``scale_factor`` (see ``ldm_scale_factor``)."""
    params = yaml.safe_load(Path(yaml_path).read_text())["model"]["params"]
    dd = params["ddconfig"]
    block_out_channels = [dd["ch"] * mult for mult in dd["ch_mult"]]
    return {
        "sample_size": dd["resolution"],
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out_channels),
        "block_out_channels": block_out_channels,
        "latent_channels": dd["z_channels"],
        "layers_per_block": dd["num_res_blocks"],
        "scaling_factor": scaling_factor,
    }


def load_official_cfw(ref_dir: Path) -> tuple[AutoencoderKL, CFWAdapter, dict]:
    """Returns ``(vae, adapter, report)``; ``report`` lists what did not load (all empty when the port is complete)."""
    state_dict = torch.load(ref_dir / "vqgan_cfw_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    state_dict = {key: value.float() for key, value in state_dict.items()}
    vae_part = {key: value for key, value in state_dict.items() if not key.startswith(FUSION_PREFIX)}
    fusion_part = {key[len("decoder.") :]: value for key, value in state_dict.items() if key.startswith(FUSION_PREFIX)}

    config = vae_config_from_ldm_yaml(ref_dir / "config_vqgan_cfw.yaml", ldm_scale_factor(ref_dir / "config.yaml"))
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(vae_part, config)
    vae_missing, vae_unexpected = vae.load_state_dict(converted, strict=False)

    adapter = CFWAdapter.from_vae(vae, fusion_levels=(1, 2))
    fusion_missing, fusion_unexpected = adapter.load_state_dict(fusion_part, strict=False)

    report = {
        "vae_missing": list(vae_missing),
        "vae_unexpected": list(vae_unexpected),
        # Every original VAE tensor must land somewhere: same count and same number of values after conversion.
        "vae_count": (len(vae_part), len(converted)),
        "vae_numel": (sum(v.numel() for v in vae_part.values()), sum(v.numel() for v in converted.values())),
        "fusion_missing": list(fusion_missing),
        "fusion_unexpected": list(fusion_unexpected),
    }
    return vae.eval(), adapter.eval(), report
