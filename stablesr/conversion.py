"""Convert the official StableSR checkpoints into a diffusers-format StableSRPipeline folder.

Inputs (IceClear/StableSR release): ``stablesr_000117.ckpt`` (SD 2.1-base 512, eps), ``stablesr_768v_000139.ckpt``
(SD 2.1 768, v-prediction), ``stablesr_turbo.ckpt`` (512 layout, 4 steps) and ``vqgan_cfw_00011.ckpt`` (CFW).
Output: a folder with the stock SD UNet and VAE (loadable by plain diffusers), the time-aware encoder, the SFT and CFW
adapters, the official scheduler config, the OpenCLIP text tower as a transformers ``CLIPTextModel`` (when the
checkpoint carries it) and the precomputed empty-prompt embedding.

The SD parts go through diffusers' own single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``; undocumented helpers, pinned in pyproject and
covered by tests). The StableSR parts keep official parameter names and load after a prefix strip. Every key of the
input is accounted for: converted, skipped on purpose (listed), or an error.
"""

import inspect
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.utils import logging

from .checkpoint_io import _Inert, load_checkpoint, load_checkpoint_with_extras
from .file_utils import atomic_write_dir, remove_stale_temporaries
from .hub import LICENSE_ID, LICENSE_LINK, LICENSE_NAME, official_model_of_files, sha256_of
from .models.cfw import CFWAdapter
from .models.prompt_embedding import PromptEmbedding
from .models.sft import SFTAdapter
from .models.time_aware_encoder import TimeAwareEncoder
from .schedulers import RESPACED_TABLE_NAMES, StableSRDDPMScheduler

logger = logging.get_logger(__name__)

UNET_PREFIX = "model.diffusion_model."
ENCODER_PREFIX = "structcond_stage_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
# The 12 schedule buffers the official LatentDiffusion registers (same names as the scheduler's respaced tables).
SCHEDULE_BUFFERS = RESPACED_TABLE_NAMES
# OpenCLIP token ids of the empty prompt: <start_of_text>, <end_of_text>, then zero padding (open_clip.tokenize pads
# with 0, which is also the SD 2 tokenizer's pad id), so the stored embedding needs no tokenizer.
SOT_TOKEN, EOT_TOKEN = 49406, 49407


class ConversionError(ValueError):
    """The checkpoint does not match the StableSR layout; the message lists the offending keys."""


@dataclass
class ConversionReport:
    """What the converter did with every input key."""

    converted: dict[str, int] = field(default_factory=dict)  # part -> number of tensors
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    other_entries: list[str] = field(default_factory=list)  # non-state_dict top-level entries of the files
    config_source: str = "shapes"
    prediction_type: str = "epsilon"
    # Where prediction_type came from; "guessed ..." when nothing in the inputs declared it.
    prediction_type_source: str = "default"
    seconds: float = 0.0

    @property
    def prediction_type_guessed(self) -> bool:
        return self.prediction_type_source.startswith("guessed")

    def skip(self, reason: str, keys) -> None:
        keys = sorted(keys)
        if keys:
            self.skipped.setdefault(reason, []).extend(keys)

    def summary(self) -> str:
        lines = [f"converted: {', '.join(f'{k} {v} tensors' for k, v in self.converted.items())}"]
        for reason, keys in self.skipped.items():
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} keys)" if len(keys) > 4 else "")
            lines.append(f"skipped on purpose ({reason}): {shown}")
        if self.other_entries:
            lines.append(f"ignored non-weight entries: {', '.join(self.other_entries)}")
        lines.append(f"config from {self.config_source}; prediction type {self.prediction_type} "
                     f"({self.prediction_type_source})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- configuration
def _levels(keys, pattern: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(key)
    return found


def _input_block_layout(sd: dict[str, torch.Tensor], p: str) -> dict:
    """Widths, res blocks per level, and attention levels of an LDM-style ``input_blocks`` stack under prefix ``p``
    (shared by the UNet and the time-aware encoder, which use the same block layout)."""
    model_channels, in_channels = sd[p + "input_blocks.0.0.weight"].shape[:2]
    blocks = _levels(sd, re.escape(p) + r"input_blocks\.(\d+)\.")
    downsample_ids = sorted(i for i in blocks if p + f"input_blocks.{i}.0.op.weight" in sd)
    num_levels = len(downsample_ids) + 1
    num_res_blocks = (max(blocks) - len(downsample_ids)) // num_levels
    channel_mult, attention_resolutions = [], []
    for level in range(num_levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(sd[p + f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        if any(k.startswith(p + f"input_blocks.{first}.1.") for k in blocks[first]):
            attention_resolutions.append(2**level)
    return {
        "in_channels": int(in_channels),
        "model_channels": int(model_channels),
        "num_res_blocks": int(num_res_blocks),
        "channel_mult": channel_mult,
        "attention_resolutions": attention_resolutions,
        "blocks": blocks,
    }


def _unet_params_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    """Official ``unet_config.params`` recovered from tensor shapes (heads are not visible in shapes: see below)."""
    p = UNET_PREFIX
    layout = _input_block_layout(sd, p)
    model_channels, channel_mult, blocks = layout["model_channels"], layout["channel_mult"], layout["blocks"]
    attn_key = next(k for k in sd if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    depth = len({k.split("transformer_blocks.")[1].split(".")[0] for k in blocks[1] if "transformer_blocks." in k})
    proj_in = next(k for k in sd if k.startswith(p) and k.endswith(".1.proj_in.weight"))
    # Heads cannot be read from shapes. SD 2.x uses 64 channels per head; smaller models (tests) one head per level
    # width. Pass the official YAML to make this exact.
    head_channels = 64 if all((model_channels * m) % 64 == 0 for m in channel_mult) else model_channels
    return {
        "in_channels": layout["in_channels"],
        "out_channels": int(sd[p + "out.2.weight"].shape[0]),
        "model_channels": int(model_channels),
        "channel_mult": channel_mult,
        "num_res_blocks": layout["num_res_blocks"],
        "attention_resolutions": layout["attention_resolutions"],
        "num_head_channels": head_channels,
        "transformer_depth": depth or 1,
        "context_dim": int(sd[attn_key].shape[1]),
        "use_linear_in_transformer": sd[proj_in].ndim == 2,
        "semb_channels": int(sd[p + "input_blocks.1.0.spade.mlp_shared.0.weight"].shape[1]),
    }


def _encoder_params_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    p = ENCODER_PREFIX
    layout = _input_block_layout(sd, p)
    return {
        "in_channels": layout["in_channels"],
        "model_channels": layout["model_channels"],
        "out_channels": int(sd[p + "fea_tran.0.out_layers.3.weight"].shape[0]),
        "num_res_blocks": layout["num_res_blocks"],
        "channel_mult": layout["channel_mult"],
        "attention_resolutions": sorted(layout["attention_resolutions"], reverse=True),  # official order, e.g. [4, 2, 1]
        # Not visible in shapes; 4 heads in every official config.
        "num_heads": 4,
        "num_head_channels": -1,
    }


def _vae_ddconfig_from_shapes(sd: dict[str, torch.Tensor], prefix: str) -> dict:
    ch = sd[prefix + "encoder.conv_in.weight"].shape[0]
    levels = _levels(sd, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    ch_mult = [sd[prefix + f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in sorted(levels)]
    num_res_blocks = len(_levels(levels[0], re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."))
    return {
        "double_z": True,
        "z_channels": int(sd[prefix + "post_quant_conv.weight"].shape[0]),
        "in_channels": int(sd[prefix + "encoder.conv_in.weight"].shape[1]),
        "out_ch": int(sd[prefix + "decoder.conv_out.weight"].shape[0]),
        "ch": int(ch),
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [],
    }


def _load_yaml(path: str | os.PathLike | None) -> dict | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ConversionError(f"cannot read the config {path}: {err}") from err


PREDICTION_TYPE_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
# Keys that declare the parameterization: the official LDM one, diffusers' name, and the Stability model-spec tag.
_PREDICTION_TYPE_KEYS = ("parameterization", "prediction_type", "modelspec.prediction_type")


def checkpoint_name_hints(checkpoint_path: str | os.PathLike) -> dict[str, bool]:
    """What the converter reads from a checkpoint's file NAME alone (the weights cannot tell): a v-prediction model
    ("768v" or "_v_" in the name) and a turbo model ("turbo": 4 default steps). Part of the conversion cache key."""
    name = Path(checkpoint_path).name
    return {"v_prediction": "768v" in name or "_v_" in name, "turbo": "turbo" in name.lower()}


def declared_prediction_type(extras: dict) -> tuple[str, str] | None:
    """``(prediction_type, where)`` declared in a checkpoint's non-weight entries, or None.

    Looks for ``parameterization`` / ``prediction_type`` / ``modelspec.prediction_type`` in the Lightning
    ``hyper_parameters`` (plain dicts, ``argparse.Namespace`` or OmegaConf objects, read as inert placeholders) and
    in safetensors metadata. The official StableSR checkpoints carry none (their classes never call
    ``save_hyperparameters``), but re-saved or fine-tuned ones may. Nothing is executed: only already-loaded plain
    values are walked, with a bound on how many.
    """
    budget = [20_000]

    def plain(value):
        if isinstance(value, _Inert):  # OmegaConf value node: its pickled state holds the value
            state = getattr(value, "_state", None)
            value = state.get("_val") if isinstance(state, dict) else None
        return value.strip().strip('"').lower() if isinstance(value, str) else None

    def walk(node, path: str, depth: int):
        budget[0] -= 1
        if budget[0] < 0 or depth > 8:
            return None
        if isinstance(node, _Inert):
            node = getattr(node, "_state", None)
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    continue
                found = plain(value) if key in _PREDICTION_TYPE_KEYS else None
                if found in PREDICTION_TYPE_ALIASES:
                    return PREDICTION_TYPE_ALIASES[found], f"{path}.{key}"
                if not isinstance(value, torch.Tensor) and (hit := walk(value, f"{path}.{key}", depth + 1)):
                    return hit
        elif isinstance(node, (list, tuple)):
            for item in node[:1000]:
                if not isinstance(item, torch.Tensor) and (hit := walk(item, path, depth + 1)):
                    return hit
        return None

    for name, value in extras.items():
        if any(word in name.lower() for word in ("hyper", "hparams", "config", "metadata")):
            hit = walk(value, name, 0)
            if hit:
                return hit
    return None


def _prediction_type(
    explicit: str | None, yaml_cfg: dict | None, ckpt_path: Path, extras: dict | None = None
) -> tuple[str, str]:
    """``(prediction_type, source)``: explicit argument > YAML > checkpoint metadata > file name > eps.

    The weights cannot tell eps from v (the official 512 and 768-v key lists are identical), so the last two are
    guesses and are logged as warnings."""
    aliases = PREDICTION_TYPE_ALIASES
    if explicit is not None:
        if explicit not in aliases:
            raise ConversionError(f"prediction_type must be one of {sorted(aliases)}, got {explicit!r}")
        return aliases[explicit], "given explicitly"
    if yaml_cfg is not None:
        params = yaml_cfg["model"]["params"]
        value = params.get("parameterization", "eps")
        if value not in aliases:
            raise ConversionError(f"the config's parameterization must be eps or v, got {value!r}")
        stated = "parameterization" in params
        return aliases[value], "from the config" + ("" if stated else " (no parameterization: the LDM default eps)")
    declared = declared_prediction_type(extras or {})
    if declared is not None:
        logger.info(f"{ckpt_path.name}: prediction type {declared[0]} from the checkpoint's {declared[1]}")
        return declared[0], f"checkpoint {declared[1]}"
    settle = "pass --prediction-type (eps or v) or --config with the official YAML to `stablesr convert` to settle it"
    if checkpoint_name_hints(ckpt_path)["v_prediction"]:
        logger.warning(f"{ckpt_path.name}: nothing in the checkpoint declares its prediction type and the weights "
                       f"cannot tell; assuming v-prediction because the file name says '768v'/'_v_'. {settle}")
        return "v_prediction", "guessed from the file name"
    logger.warning(f"{ckpt_path.name}: nothing in the checkpoint declares its prediction type and the weights cannot "
                   "tell; assuming eps (the 512 and turbo models). A renamed 768-v checkpoint would give wrong "
                   f"images this way: {settle}")
    return "epsilon", "guessed: eps, since the file name does not say 768v"


# ------------------------------------------------------------------------------------------------------ converters
def _assign(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    what: str,
    dtype: torch.dtype,
    source: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load converted weights (cast to ``dtype``) into an empty model; every mismatch is an error naming the keys."""
    # Name unexpected keys by their ORIGINAL checkpoint key (the converters rename whatever they are given).
    origin = {v.data_ptr(): k for k, v in (source or {}).items()}
    names = {k: origin.get(v.data_ptr(), k) for k, v in state_dict.items()}
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        unexpected = [names.get(k, k) for k in result.unexpected_keys]
        raise ConversionError(
            f"{what}: the checkpoint does not fit the model. missing: {result.missing_keys[:10]} "
            f"({len(result.missing_keys)}), unknown: {unexpected[:10]} ({len(unexpected)})"
        )


def _empty_model(cls, config: dict):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(**config)


def _consumed(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> set[str]:
    """Source keys whose tensors appear in ``converted`` (diffusers' converters reuse the storage)."""
    used = {v.data_ptr() for v in converted.values()}
    return {k for k, v in source.items() if v.data_ptr() in used}


def convert_unet(sd: dict, unet_params: dict, sample_size: int, dtype: torch.dtype, report: ConversionReport):
    """Stock ``UNet2DConditionModel`` from ``model.diffusion_model.*`` (SFT keys excluded)."""
    source = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX) and ".spade." not in k}
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original_config, source)
    config["sample_size"] = sample_size
    converted = convert_ldm_unet_checkpoint(source, config)
    leftover = set(source) - _consumed(source, converted)
    if leftover:
        raise ConversionError(f"UNet keys with no diffusers counterpart: {sorted(leftover)[:20]} ({len(leftover)})")
    unet = _empty_model(UNet2DConditionModel, config)
    _assign(unet, converted, "UNet", dtype, source)
    report.converted["unet"] = len(converted)
    return unet, set(source)


def _spade_target(key: str, layers_per_block: int) -> tuple[str, str] | None:
    """Official SPADE key -> (diffusers conv2 path, parameter suffix)."""
    m = re.match(re.escape(UNET_PREFIX) + r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:0\.)?spade\.(.+)", key)
    if not m:
        return None
    kind, index, suffix = m.group(1), int(m.group(2)), m.group(3)
    if kind == "input_blocks":
        block, pos = divmod(index - 1, layers_per_block + 1)
        path = f"down_blocks.{block}.resnets.{pos}.conv2"
    elif kind == "middle_block":
        path = f"mid_block.resnets.{index // 2}.conv2"
    else:
        block, pos = divmod(index, layers_per_block + 1)
        path = f"up_blocks.{block}.resnets.{pos}.conv2"
    return path, suffix


def convert_sft(sd: dict, unet: UNet2DConditionModel, dtype: torch.dtype, report: ConversionReport):
    source = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX) and ".spade." in k}
    if not source:
        raise ConversionError("no SFT (spade) keys under model.diffusion_model.*: this is not a StableSR checkpoint")
    first = next(k for k in source if k.endswith("mlp_shared.0.weight"))
    hidden, cond = source[first].shape[:2]
    from accelerate import init_empty_weights

    with init_empty_weights():  # every parameter is replaced by _assign: skip the random init (~2-3 s, 0.2 GB)
        adapter = SFTAdapter.from_unet(unet, cond_channels=int(cond), hidden_channels=int(hidden))
    index = {name: i for i, name in enumerate(adapter.config.target_modules)}
    converted, bad = {}, []
    for key, value in source.items():
        target = _spade_target(key, unet.config.layers_per_block)
        if target is None or target[0] not in index:
            bad.append(key)
            continue
        converted[f"layers.{index[target[0]]}.{target[1]}"] = value
    if bad:
        raise ConversionError(f"SFT keys that match no UNet resnet: {bad[:20]} ({len(bad)})")
    _assign(adapter, converted, "SFT layers", dtype)
    report.converted["sft_adapter"] = len(converted)
    return adapter, set(source)


def convert_encoder(sd: dict, params: dict, dtype: torch.dtype, report: ConversionReport):
    source = {k[len(ENCODER_PREFIX) :]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    if not source:
        raise ConversionError("no structcond_stage_model.* keys: the checkpoint has no time-aware encoder")
    # The official YAML also lists options the architecture does not use (image_size, dims, use_fp16, ...).
    names = inspect.signature(TimeAwareEncoder.__init__).parameters
    accepted = {k: v for k, v in params.items() if k in names}
    encoder = _empty_model(TimeAwareEncoder, accepted)
    _assign(encoder, source, "time-aware encoder", dtype)
    report.converted["time_aware_encoder"] = len(source)
    return encoder, {ENCODER_PREFIX + k for k in source}


def convert_vae(sd: dict, prefix: str, ddconfig: dict, scale_factor: float, dtype: torch.dtype, report):
    source = {k: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(prefix + "decoder.fusion_layer")}
    source = {k: v for k, v in source.items() if not k.startswith(prefix + "loss.")}
    original_config = {
        "model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}, "scale_factor": scale_factor}}
    }
    config = create_vae_diffusers_config_from_ldm(original_config, source)
    config["sample_size"] = 512
    stripped = {k[len(prefix) :]: v for k, v in source.items()}
    converted = convert_ldm_vae_checkpoint(stripped, config)
    leftover = set(stripped) - _consumed(stripped, converted)
    if leftover:
        raise ConversionError(f"VAE keys with no diffusers counterpart: {sorted(leftover)[:20]} ({len(leftover)})")
    vae = _empty_model(AutoencoderKL, config)
    _assign(vae, converted, "VAE", dtype, stripped)
    report.converted["vae"] = len(converted)
    return vae, set(source)


def convert_cfw(sd: dict, vae: AutoencoderKL, dtype: torch.dtype, report: ConversionReport):
    source = {k: v for k, v in sd.items() if k.startswith("decoder.fusion_layer")}
    if not source:
        raise ConversionError("the CFW checkpoint has no decoder.fusion_layer_* keys")
    from accelerate import init_empty_weights

    with init_empty_weights():  # every parameter is replaced by _assign: skip the random init (~2 s, 0.18 GB)
        adapter = CFWAdapter.from_vae(vae)
    _assign(adapter, {k[len("decoder.") :]: v for k, v in source.items()}, "CFW fusion layers", dtype)
    report.converted["cfw_adapter"] = len(source)
    return adapter, set(source)


def convert_text_encoder(sd: dict, dtype: torch.dtype, report: ConversionReport):
    """transformers ``CLIPTextModel`` equal to the official penultimate-layer OpenCLIP text tower, and its "" output."""
    from transformers import CLIPTextConfig, CLIPTextModel

    source = {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    layers = _levels(source, re.escape(TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    last = max(layers)
    width = source[TEXT_PREFIX + "token_embedding.weight"].shape[1]
    config = CLIPTextConfig(
        vocab_size=source[TEXT_PREFIX + "token_embedding.weight"].shape[0],
        hidden_size=width,
        intermediate_size=source[TEXT_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=source[TEXT_PREFIX + "text_projection"].shape[1],
        num_hidden_layers=last,  # official layer="penultimate": the last block is never run
        num_attention_heads=max(1, width // 64),  # OpenCLIP text towers use 64-wide heads
        max_position_embeddings=source[TEXT_PREFIX + "positional_embedding"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    unused = layers[last] | {TEXT_PREFIX + "text_projection", TEXT_PREFIX + "logit_scale"} & set(source)
    report.skip("OpenCLIP parts the penultimate-layer text conditioning never runs", unused)
    kept = {k: v for k, v in source.items() if k not in unused}
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    # no_init_weights: CLIPTextModel's _init_weights otherwise runs ~280 normal_() on meta tensors (~2 s of Python)
    with init_empty_weights(), no_init_weights():
        model = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(model, kept, prefix=TEXT_PREFIX)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    leftover = set(kept) - _consumed(kept, converted)
    # in_proj weights are split into q/k/v copies, so they are not found by storage; they are converted by name.
    leftover = {k for k in leftover if not k.endswith((".in_proj_weight", ".in_proj_bias"))}
    if leftover:
        raise ConversionError(f"text encoder keys with no counterpart: {sorted(leftover)[:20]}")
    result = model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if "position_ids" not in k]
    if missing or result.unexpected_keys:
        raise ConversionError(f"text encoder: missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}")
    model = model.to(dtype).eval()
    report.converted["text_encoder"] = len(converted)
    return model, set(source)


@torch.no_grad()
def empty_prompt_embedding(text_encoder) -> torch.Tensor:
    """(1, 77, D) float32 output of ``text_encoder`` for the empty prompt (official conditioning of every StableSR
    model). It is always computed in float32: a half-precision encoder is cast up for the call and back after."""
    length = text_encoder.config.max_position_embeddings
    ids = torch.zeros(1, length, dtype=torch.long)
    ids[0, 0], ids[0, 1] = SOT_TOKEN, EOT_TOKEN
    if text_encoder.config.vocab_size <= EOT_TOKEN:
        raise ConversionError(f"text encoder vocabulary ({text_encoder.config.vocab_size}) lacks the CLIP start/end ids")
    param = next(text_encoder.parameters())
    dtype = param.dtype
    text_encoder.to(torch.float32)
    try:
        return text_encoder(ids.to(param.device)).last_hidden_state.float().cpu()
    finally:
        text_encoder.to(dtype)


# ------------------------------------------------------------------------------------------------------- top level
def convert_stablesr_checkpoint(
    checkpoint_path: str | os.PathLike,
    cfw_checkpoint_path: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    original_config: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    default_num_inference_steps: int | None = None,
    prompt_embeds: torch.Tensor | None = None,
    text_encoder=None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
):
    """Convert official StableSR checkpoint(s) into a [`StableSRPipeline`] (and save it when ``output_dir`` is given).

    Args:
        checkpoint_path: the official diffusion checkpoint (``stablesr_000117.ckpt``, ``stablesr_768v_000139.ckpt``,
            ``stablesr_turbo.ckpt``) or a safetensors copy of its state_dict.
        cfw_checkpoint_path: ``vqgan_cfw_00011.ckpt``; its VAE and fusion layers are used for encoding and decoding.
            Without it the pipeline decodes with the checkpoint's own VAE and no CFW.
        output_dir: where to write the diffusers folder (atomically; an existing non-empty folder is kept unless
            ``overwrite``).
        original_config: the official YAML (``v2-finetune_text_T_512.yaml``...). Without it the architecture is read
            from tensor shapes (attention heads then follow the SD 2 convention of 64 channels per head).
        prediction_type: "epsilon"/"eps" or "v_prediction"/"v"; default from the YAML, else from the checkpoint's
            ``hyper_parameters`` / metadata (``parameterization``), else guessed from the file name ("768v" -> v,
            otherwise eps) with a warning; ``report.prediction_type_source`` says which.
        default_num_inference_steps: stored in the pipeline config (default 4 for a "turbo" file, else 200).
        prompt_embeds: ``(1, 77, D)`` empty-prompt embedding to store when the checkpoint has no text encoder.
        text_encoder: a ``CLIPTextModel`` to compute the empty-prompt embedding when the checkpoint has none.
        dtype: dtype of the saved weights (float32 keeps the official values exactly).
        overwrite: replace an existing ``output_dir``.

    Returns:
        ``(pipeline, report)``.
    """
    from .pipelines.pipeline_stablesr import StableSRPipeline

    start = time.perf_counter()
    checkpoint_path = Path(checkpoint_path)
    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{output_dir} exists and is not empty; choose another folder or pass overwrite")
    report = ConversionReport()
    yaml_cfg = _load_yaml(original_config)
    sd, extras = load_checkpoint_with_extras(checkpoint_path)
    report.other_entries += [f"{checkpoint_path.name}:{k}" for k in sorted(extras)]
    report.prediction_type, report.prediction_type_source = _prediction_type(
        prediction_type, yaml_cfg, checkpoint_path, extras
    )

    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ConversionError(
            f"{checkpoint_path} has no model.diffusion_model.* keys; pass the StableSR diffusion checkpoint first "
            "(the vqgan_cfw file goes second)"
        )
    if yaml_cfg is not None:
        params = yaml_cfg["model"]["params"]
        unet_params = dict(params["unet_config"]["params"])
        encoder_params = dict(params["structcond_stage_config"]["params"])
        vae_ddconfig = dict(params["first_stage_config"]["params"]["ddconfig"])
        scale_factor = float(params.get("scale_factor", 0.18215))
        image_size = int(params.get("image_size", 512))
        schedule = {
            "beta_start": float(params.get("linear_start", 0.00085)),
            "beta_end": float(params.get("linear_end", 0.012)),
            "num_train_timesteps": int(params.get("timesteps", 1000)),
        }
        report.config_source = str(original_config)
    else:
        unet_params = _unet_params_from_shapes(sd)
        encoder_params = _encoder_params_from_shapes(sd)
        vae_ddconfig = _vae_ddconfig_from_shapes(sd, VAE_PREFIX) if any(k.startswith(VAE_PREFIX) for k in sd) else None
        scale_factor, schedule = 0.18215, {}
        image_size = 768 if report.prediction_type == "v_prediction" else 512
    sample_size = image_size // 8

    consumed: set[str] = set()
    unet, keys = convert_unet(sd, unet_params, sample_size, dtype, report)
    consumed |= keys
    sft_adapter, keys = convert_sft(sd, unet, dtype, report)
    consumed |= keys
    time_aware_encoder, keys = convert_encoder(sd, encoder_params, dtype, report)
    consumed |= keys

    vae = cfw_adapter = None
    has_vae = any(k.startswith(VAE_PREFIX) for k in sd)
    if has_vae and cfw_checkpoint_path is None:
        vae, keys = convert_vae(sd, VAE_PREFIX, vae_ddconfig, scale_factor, dtype, report)
        consumed |= keys
    if cfw_checkpoint_path is not None:
        cfw_sd, cfw_others = load_checkpoint(cfw_checkpoint_path)
        report.other_entries += [f"{Path(cfw_checkpoint_path).name}:{k}" for k in cfw_others]
        report.skip("CFW training losses (LPIPS, discriminator)", [k for k in cfw_sd if k.startswith("loss.")])
        cfw_vae, cfw_keys = convert_vae(cfw_sd, "", vae_ddconfig or _vae_ddconfig_from_shapes(cfw_sd, ""),
                                        scale_factor, dtype, report)
        cfw_adapter, fusion_keys = convert_cfw(cfw_sd, cfw_vae, dtype, report)
        cfw_leftover = set(cfw_sd) - cfw_keys - fusion_keys - {k for k in cfw_sd if k.startswith("loss.")}
        if cfw_leftover:
            raise ConversionError(f"unknown keys in {cfw_checkpoint_path}: {sorted(cfw_leftover)[:20]}")
        if has_vae:
            # Compare the two VAEs in the files' own dtype instead of converting (and casting) the unused one.
            own = {k[len(VAE_PREFIX) :]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
            if set(own) != cfw_keys or any(own[k].shape != cfw_sd[k].shape for k in own):
                convert_vae(sd, VAE_PREFIX, vae_ddconfig, scale_factor, dtype, report)  # names the bad keys
                raise ConversionError(
                    f"the VAE of {checkpoint_path.name} (first_stage_model.*) and of {Path(cfw_checkpoint_path).name} "
                    f"differ in layout: {sorted(set(own) ^ cfw_keys)[:10]}"
                )
            differ = [k for k in sorted(own) if not torch.equal(own[k], cfw_sd[k].to(own[k].dtype))]
            if differ:
                logger.warning(f"the CFW file's VAE differs from the diffusion checkpoint's ({len(differ)} of "
                               f"{len(own)} tensors, e.g. {differ[0]}); using the CFW one, which is what the "
                               "official scripts decode with")
            report.skip("VAE also present in the CFW file (the CFW copy is used)", [VAE_PREFIX + k for k in own])
        vae = cfw_vae
    if vae is None:
        raise ConversionError("no VAE found: the checkpoint has no first_stage_model.* keys and no CFW file was given")

    encoder_model = None
    if any(k.startswith(TEXT_PREFIX) for k in sd):
        # The stored embedding comes from the float32 weights whatever ``dtype`` is; only the result is cast.
        encoder_model, keys = convert_text_encoder(sd, torch.float32, report)
        consumed |= keys
        if prompt_embeds is None:
            prompt_embeds = empty_prompt_embedding(encoder_model)
        encoder_model = encoder_model.to(dtype)
    elif prompt_embeds is None:
        if text_encoder is None:
            raise ConversionError(
                f"{checkpoint_path} carries no text encoder (cond_stage_model.*), so the empty-prompt embedding "
                "cannot be computed. Pass text_encoder= (e.g. CLIPTextModel.from_pretrained("
                "'stabilityai/stable-diffusion-2-1-base', subfolder='text_encoder')) or prompt_embeds="
            )
        encoder_model = text_encoder
        prompt_embeds = empty_prompt_embedding(text_encoder)
    if prompt_embeds.shape[-1] != unet.config.cross_attention_dim:
        raise ConversionError(
            f"prompt embedding width {prompt_embeds.shape[-1]} != UNet cross_attention_dim "
            f"{unet.config.cross_attention_dim}"
        )

    report.skip("1000-step schedule buffers (the scheduler recomputes them)", [k for k in SCHEDULE_BUFFERS if k in sd])
    consumed |= set(SCHEDULE_BUFFERS) | set().union(*report.skipped.values())
    leftover = set(sd) - consumed
    if leftover:
        raise ConversionError(f"unknown keys in {checkpoint_path} ({len(leftover)}): {sorted(leftover)[:30]}")

    scheduler = StableSRDDPMScheduler(prediction_type=report.prediction_type, **schedule)
    prompt_embedding = PromptEmbedding.from_tensor(prompt_embeds)  # float32
    prompt_embedding.embeds = prompt_embedding.embeds.to(dtype)  # cast only the result, as every other weight
    if default_num_inference_steps is None:
        default_num_inference_steps = 4 if checkpoint_name_hints(checkpoint_path)["turbo"] else 200
    pipe = StableSRPipeline(
        vae=vae,
        unet=unet,
        time_aware_encoder=time_aware_encoder,
        sft_adapter=sft_adapter,
        scheduler=scheduler,
        cfw_adapter=cfw_adapter,
        prompt_embedding=prompt_embedding,
        text_encoder=encoder_model,
        tokenizer=None,
        default_num_inference_steps=default_num_inference_steps,
    )
    if output_dir is not None:
        files = [Path(p) for p in (checkpoint_path, cfw_checkpoint_path) if p is not None]
        sources = {p.name: sha256_of(p) for p in files}
        official = official_model_of_files(checkpoint_path, cfw_checkpoint_path)
        origin = "Local files" + (f", named as the official {official.name} release files" if official else "")
        card = model_card(pipe, report, sources, official=official, origin=origin)
        save_pipeline_atomically(pipe, output_dir, overwrite=overwrite, card=card)
    report.seconds = time.perf_counter() - start
    logger.info(report.summary())
    return pipe, report


def save_pipeline_atomically(pipe, output_dir: Path, overwrite: bool = False, card: str | None = None) -> None:
    """``save_pretrained`` into a hidden temporary sibling folder, flush it to disk, then rename it into place.

    A kill at any point leaves no folder or the complete one; the temporary folders of killed earlier runs are removed
    first. No room to write raises [`~stablesr.file_utils.DiskFullError`] naming the folder and about how many bytes
    it needs, and leaves nothing behind. ``card`` (see [`model_card`]) is written as the folder's ``README.md``
    before the folder is published.
    """
    output_dir = Path(output_dir)
    remove_stale_temporaries(output_dir.parent, output_dir.name)  # only folders whose writer is gone
    size = sum(t.numel() * t.element_size() for module in pipe.components.values()
               if isinstance(module, torch.nn.Module) for t in module.state_dict().values())
    with atomic_write_dir(output_dir, overwrite=overwrite, size=size) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ model card
_CARD_TAGS = ["stablesr", "super-resolution", "image-restoration", "stable-diffusion"]


def model_card(pipe, report: ConversionReport, sources: dict[str, str | None], *, official=None,
               origin: str = "Local files") -> str:
    """The ``README.md`` of a converted folder: Hub model-card front matter, then the source files and their SHA-256,
    the converter version, the conversion settings and the license of the weights.

    Args:
        pipe: the converted [`StableSRPipeline`].
        report: its [`ConversionReport`] (the prediction type and where it came from).
        sources: source file name -> SHA-256 (None when unknown), the diffusion checkpoint first.
        official: the [`~stablesr.hub.OfficialModel`] the sources are, when known; without it the license is said to
            be that of the source files.
        origin: one sentence on where the source files came from.
    """
    from . import __version__

    meta = {"license": "other"}
    if official is not None:
        meta.update(license_name=LICENSE_ID, license_link=LICENSE_LINK, base_model=official.repo_id)
    else:
        meta["license_name"] = "same-as-source-checkpoint"
    meta.update(library_name="diffusers", pipeline_tag="image-to-image", tags=_CARD_TAGS)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    checkpoint = next(iter(sources), "unknown")
    title = official.name if official is not None else Path(checkpoint).stem
    cfw = pipe.cfw_adapter is not None
    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    rows = "\n".join(f"| `{name}` | `{digest or 'not computed'}` |" for name, digest in sources.items())
    settings = [
        ("converter", f"stablesr {__version__} (`stablesr.conversion.convert_stablesr_checkpoint`)"),
        ("prediction type", f"{report.prediction_type} ({report.prediction_type_source})"),
        ("weights dtype", dtype),
        ("native size", f"{pipe.native_size} px"),
        ("default steps", str(pipe.config.default_num_inference_steps)),
        ("CFW (fidelity weight)", "yes" if cfw else "no: decodes with the checkpoint's own VAE"),
        ("text encoder", "included" if pipe.text_encoder is not None else "not included (stored embedding only)"),
        ("architecture from", "tensor shapes" if report.config_source == "shapes" else report.config_source),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in settings)
    if official is not None:
        about = f"{official.description[0].upper()}{official.description[1:]}."
        license_text = (
            f"These are StableSR's official weights ([{official.repo_id}](https://huggingface.co/{official.repo_id}), "
            f"S-Lab, Nanyang Technological University), released under the [{LICENSE_NAME}]({LICENSE_LINK}): "
            "non-commercial use only; for commercial use, contact the authors. Redistribution must keep the "
            "copyright notice, the license conditions and the disclaimer. The license travels with the weights: "
            f"this converted copy, and whatever is made from it, stays under the {LICENSE_NAME}. The Apache-2.0 "
            f"license of the stablesr code does not apply to the weights. They are built on {official.sd_base}, "
            "whose own license may also apply to the parts taken from it."
        )
    else:
        about = "A StableSR checkpoint that is not one of the official release files (by file name)."
        license_text = (
            "The source files are not recognised as the official release, so these weights are under the license "
            "of the source checkpoint: check where it came from. StableSR's official weights are under the "
            f"[{LICENSE_NAME}]({LICENSE_LINK}) (non-commercial), which also binds weights made from them. The "
            "Apache-2.0 license of the stablesr code does not apply to the weights."
        )
    return (
        f"---\n{front}---\n\n"
        f"# {title}\n\n{about}\n\n"
        "StableSR (Wang et al., *Exploiting Diffusion Prior for Real-World Image Super-Resolution*, IJCV 2024) "
        f"converted to a diffusers `StableSRPipeline` folder by stablesr {__version__}. Load it with "
        "`stablesr.StableSRPipeline.from_pretrained(folder)` or `stablesr restore --model folder`.\n\n"
        f"## Source files\n\n{origin}.\n\n| file | SHA-256 |\n|---|---|\n{rows}\n\n"
        f"## Conversion settings\n\n| setting | value |\n|---|---|\n{table}\n\n"
        f"## License\n\n{license_text}\n"
    )
