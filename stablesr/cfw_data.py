"""Stage-2 (CFW) training data: what the stage-1 StableSR model makes of low-quality images, next to their ground truth.

Port of IceClear/StableSR ``scripts/generate_vqgan_data.py`` + ``basicsr/data/single_image_dataset.py:
SingleImageNPDataset`` @398ee93. For every sample index the stage-1 model samples a latent from the bicubic-upsampled
LQ image (official: 200 respaced DDPM steps from ``x_T = q_sample(z_LQ, 999)``), and we store

    inputs/NAME.png          the LQ image bicubic-upsampled to the GT size (what CFW's encoder sees)
    gts/NAME.png             the GT (USM-sharpened in the degradation mode, as the official data)
    latents/NAME.safetensors the sampled latent, key "latents", (1, 4, H/8, W/8), scaled by vae.config.scaling_factor
    samples/NAME.png         optional: that latent through the stock VAE decoder, to eyeball the data

with ``NAME = f"{index:08d}"`` (official naming). Sources are either a paired folder (``lq/`` and ``hq/`` matched by
file stem) or clean HQ images degraded on the fly by [`~stablesr.degradation.RealESRGANDegradation`].

Everything random for sample ``i`` comes from generators seeded with ``(seed, i)``, so a sample is the same whether it
is made in one run, after a resume, or by any shard. Each file is written to a hidden temporary name and moved into
place (``os.replace``), and a sample counts as done only when all its files exist, so a killed run never leaves a half
sample that a resumed run or [`CFWDataset`] would take for a finished one.

Differences from the official script, on purpose: latents are safetensors (not ``.npy``), images are rounded (the
official ``astype(np.uint8)`` truncates), the sampler is the pipeline's aggregation sampler (identical to the official
non-tiled ``model.sample`` when the image fits in one tile, as the official 512 crops do), and samples whose latent
contains NaN are skipped with a warning (the official script skips them silently).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import vae_tiling
from .color import DEFAULT_COLOR_FIX
from .degradation import DegradationConfig, RealESRGANDegradation
from .file_utils import atomic_write_path, atomic_write_text, remove_stale_temporaries
from .image_io import iter_image_files, load_image, save_image
from .image_processor import from_tensor, pad_to, to_tensor
from .schedulers import is_deterministic

logger = logging.get_logger(__name__)

__all__ = [
    "LATENTS_KEY",
    "METADATA_FILE",
    "CFWDataReport",
    "CFWDataset",
    "CFWSource",
    "generate_cfw_data",
    "is_complete",
    "list_sources",
    "make_pair",
    "sample_name",
    "sample_paths",
    "sample_seed",
    "shard_indices",
]

LATENTS_KEY = "latents"
METADATA_FILE = "cfw_data.json"
REQUIRED_PARTS = ("inputs", "gts", "latents")
_SUFFIX = {"inputs": ".png", "gts": ".png", "latents": ".safetensors", "samples": ".png"}


# ----------------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------------


def sample_name(index: int) -> str:
    """File stem of sample `index` (official naming: 8 digits)."""
    return f"{index:08d}"


def sample_paths(root: str | os.PathLike, name: str) -> dict[str, Path]:
    """``{"inputs", "gts", "latents", "samples"} -> path`` of sample `name` under `root`."""
    root = Path(root)
    return {part: root / part / f"{name}{suffix}" for part, suffix in _SUFFIX.items()}


def is_complete(root: str | os.PathLike, name: str, with_samples: bool = False) -> bool:
    """Whether every file of sample `name` exists (temporary files never count: they have other names)."""
    paths = sample_paths(root, name)
    parts = REQUIRED_PARTS + (("samples",) if with_samples else ())
    return all(paths[part].is_file() for part in parts)


def shard_indices(num_samples: int, num_shards: int = 1, shard_index: int = 0) -> list[int]:
    """Sample indices of one shard: sample ``i`` belongs to shard ``i % num_shards``.

    Round-robin rather than contiguous blocks, so shards stay balanced when a run stops early and the first indices
    are done first.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards - 1}], got {shard_index}")
    return list(range(shard_index, num_samples, num_shards))


def sample_seed(seed: int, index: int, purpose: str) -> int:
    """Seed of the generator that `purpose` (``"data"`` or ``"sample"``) uses for sample `index` (63 bits).

    Hashing keeps the streams of neighbouring seeds and indices unrelated, and the purpose keeps the sampling noise
    independent of the degradation draws (changing the degradation table does not change the noise).
    """
    digest = hashlib.sha256(f"stablesr-cfw:{seed}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, index: int, purpose: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, index, purpose))


# ----------------------------------------------------------------------------------------------------------------------
# Sources and pairs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CFWSource:
    """Where sample `index` comes from.

    Args:
        index: Sample index (the file name is [`sample_name`] of it).
        hq_path: The clean / ground-truth image.
        lq_path: The paired low-quality image, or `None` to degrade `hq_path` on the fly.
        repeat: Which of the ``num_per_image`` degraded versions of `hq_path` this is (0 in paired mode).
    """

    index: int
    hq_path: Path
    lq_path: Path | None = None
    repeat: int = 0


def list_sources(
    hq_dir: str | os.PathLike, lq_dir: str | os.PathLike | None = None, num_per_image: int = 1
) -> list[CFWSource]:
    """Enumerate the samples of a source folder, in a fixed order (sorted file names).

    Args:
        hq_dir: Folder of ground-truth images.
        lq_dir: Folder of low-quality images matched to `hq_dir` by file stem (paired mode), or `None` to degrade the
            HQ images on the fly. Every HQ image needs exactly one LQ partner.
        num_per_image: On-the-fly mode only: degraded versions per HQ image (official dataset: ``mul_num``).
            Sample ``i`` is version ``i // N`` of image ``i % N`` (N = number of images), so adding versions keeps
            the existing samples.

    Returns:
        One [`CFWSource`] per sample, indexed 0..len-1.
    """
    hq_files = iter_image_files(hq_dir)
    if lq_dir is None:
        if num_per_image < 1:
            raise ValueError(f"num_per_image must be >= 1, got {num_per_image}")
        return [
            CFWSource(index=repeat * len(hq_files) + i, hq_path=path, repeat=repeat)
            for repeat in range(num_per_image)
            for i, path in enumerate(hq_files)
        ]
    if num_per_image != 1:
        raise ValueError(
            "num_per_image only applies to on-the-fly degradation (no lq_dir); paired data has one LQ each"
        )
    lq_by_stem: dict[str, list[Path]] = {}
    for path in iter_image_files(lq_dir):
        lq_by_stem.setdefault(path.stem, []).append(path)
    missing = [p.name for p in hq_files if p.stem not in lq_by_stem]
    doubled = sorted(stem for stem, paths in lq_by_stem.items() if len(paths) > 1)
    if missing or doubled:
        problems = []
        if missing:
            problems.append(f"{len(missing)} HQ image(s) without an LQ of the same stem, e.g. {missing[:5]}")
        if doubled:
            problems.append(f"LQ stems with several files, e.g. {doubled[:5]}")
        raise ValueError(f"cannot pair {lq_dir} with {hq_dir}: " + "; ".join(problems))
    return [CFWSource(index=i, hq_path=p, lq_path=lq_by_stem[p.stem][0]) for i, p in enumerate(hq_files)]


def _load_01(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1] on the CPU."""
    return (to_tensor(load_image(path).rgb) + 1.0) / 2.0


def _quantize(image_01: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels (what the PNG will hold), so the sampler sees exactly what training will read."""
    return (image_01.clamp(0, 1) * 255).round() / 255


def _random_crop_box(height: int, width: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    return int(u[0] * (height - size + 1)), int(u[1] * (width - size + 1))


def _upsample_to(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Official: F.interpolate(lq, size=gt_size, mode="bicubic") then clamp; antialias only matters when shrinking.
    shrink = lq.shape[-2] > size[0] or lq.shape[-1] > size[1]
    return F.interpolate(lq, size=size, mode="bicubic", align_corners=False, antialias=shrink).clamp(0, 1)


def make_pair(
    source: CFWSource,
    generator: torch.Generator,
    degradation: RealESRGANDegradation | None = None,
    gt_size: int | None = 512,
    multiple: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (upsampled LQ, GT) pair of one sample, both (1, 3, H, W) in [0, 1] on 8-bit levels.

    On-the-fly mode (``source.lq_path is None``): reflect-pad the HQ image to `gt_size` if smaller, random-crop
    `gt_size` (official RealESRGANDataset), degrade with `degradation` (its ``gt_size`` is ignored; the GT target
    is the USM-sharpened crop when its config says so), then bicubic-upsample the LQ to the GT size.
    Paired mode: bicubic-resize the LQ to the GT size, then take the same random `gt_size` crop of both when the GT
    is larger. Either way H and W are then cropped down to multiples of `multiple` (the VAE factor).

    Args:
        source: The sample.
        generator: CPU generator for the crop and the degradation draws.
        degradation: Needed in on-the-fly mode.
        gt_size: Side of the square crop, or `None` for the whole image.
        multiple: H and W of the pair are made multiples of this.
    """
    gt = _load_01(source.hq_path)
    if source.lq_path is None:
        if degradation is None:
            raise ValueError(f"sample {source.index}: no LQ image and no degradation to make one")
        scale = degradation.config.scale
        if gt_size is not None:
            if gt_size % scale:
                raise ValueError(f"gt_size={gt_size} must be a multiple of the degradation scale {scale}")
            gt = pad_to(gt, gt_size, gt_size)
            top, left = _random_crop_box(gt.shape[-2], gt.shape[-1], gt_size, generator)
            gt = gt[..., top : top + gt_size, left : left + gt_size]
        step = math.lcm(scale, multiple)
        gt = gt[..., : gt.shape[-2] - gt.shape[-2] % step, : gt.shape[-1] - gt.shape[-1] % step]
        if gt.shape[-1] == 0 or gt.shape[-2] == 0:
            raise ValueError(f"{source.hq_path} is smaller than {step} pixels on one side")
        lq, gt = degradation(gt, generator)
        lq_up = _upsample_to(lq.float(), tuple(gt.shape[-2:]))
    else:
        lq_up = _upsample_to(_load_01(source.lq_path), tuple(gt.shape[-2:]))
        if gt_size is not None and (gt.shape[-2] > gt_size or gt.shape[-1] > gt_size):
            size_h, size_w = min(gt_size, gt.shape[-2]), min(gt_size, gt.shape[-1])
            u = torch.rand(2, generator=generator, dtype=torch.float64)
            top, left = int(u[0] * (gt.shape[-2] - size_h + 1)), int(u[1] * (gt.shape[-1] - size_w + 1))
            gt = gt[..., top : top + size_h, left : left + size_w]
            lq_up = lq_up[..., top : top + size_h, left : left + size_w]
        h, w = gt.shape[-2] - gt.shape[-2] % multiple, gt.shape[-1] - gt.shape[-1] % multiple
        if h == 0 or w == 0:
            raise ValueError(f"{source.hq_path} is smaller than {multiple} pixels on one side")
        gt, lq_up = gt[..., :h, :w], lq_up[..., :h, :w]
    return _quantize(lq_up.float()), _quantize(gt.float())


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def _to_pil(image_01: torch.Tensor):
    return from_tensor(image_01 * 2.0 - 1.0)[0]


def _save_png(image_01: torch.Tensor, path: Path) -> None:
    save_image(_to_pil(image_01), path, overwrite=True)  # temp file + fsync + os.replace


def _save_latents(latents: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    latents = latents.detach().to("cpu", torch.float32).contiguous()
    with atomic_write_path(path, size=latents.numel() * latents.element_size()) as tmp:  # size: for a full disk
        save_file({LATENTS_KEY: latents}, str(tmp), metadata=metadata)


def _remove_stale_temporaries(root: Path, name: str) -> None:
    # Leftovers of a killed writer of this very sample; samples belong to one shard, so no other process writes them.
    for part, suffix in _SUFFIX.items():
        remove_stale_temporaries(root / part, f"{name}{suffix}")


def _write_metadata(root: Path, settings: dict[str, Any]) -> None:
    """Store the generation settings once; refuse to mix samples made with different settings in one folder."""
    path = root / METADATA_FILE
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from disk
    if path.is_file():
        existing = json.loads(path.read_text()).get("settings", {})
        if existing != settings:
            changed = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
            raise ValueError(
                f"{root} holds CFW data made with other settings ({', '.join(changed)} differ, see {path}); "
                "write to another --output_dir, or delete the folder to start over"
            )
        return
    atomic_write_text(path, json.dumps({"format": "stablesr-cfw-data/1", "settings": settings}, indent=2, sort_keys=True))


@dataclass
class CFWDataReport:
    """What one [`generate_cfw_data`] call did, as lists of sample indices."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def _check_sample_size(pipeline, height: int, width: int) -> None:
    """A sample's latent must cover exactly its GT: sides multiples of the VAE factor, at least the native size."""
    factor = pipeline.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(f"the image is {height}x{width}; both sides must be multiples of {factor}")
    if min(height, width) < pipeline.native_size:
        raise ValueError(
            f"a {height}x{width} sample is below the model's native size {pipeline.native_size}: the pipeline would "
            "sample at a larger size, so the latent would not match the GT. Use --gt_size >= "
            f"{pipeline.native_size} and GT images at least that large"
        )


@torch.no_grad()
def sample_latents(
    pipeline,
    lq_up: torch.Tensor,
    generator: torch.Generator,
    num_inference_steps: int = 200,
    start: str = "lq",
    **pipeline_kwargs,
) -> torch.Tensor:
    """Run the stage-1 model on an already upsampled LQ image and return the final scaled latents (1, 4, H/8, W/8).

    Args:
        pipeline: A [`~stablesr.StableSRPipeline`].
        lq_up: (1, 3, H, W) in [0, 1], the LQ at GT size; H and W multiples of 8 and the short side at least the
            model's native size (512 for SD 2.1 base), so that the latent covers exactly the GT.
        generator: CPU generator for every random draw of the sampler.
        num_inference_steps / start: As in [`~stablesr.StableSRPipeline.__call__`] (official: 200, ``"lq"``).
        pipeline_kwargs: Further ``__call__`` arguments (tile sizes, ``prompt_embeds``...).
    """
    height, width = lq_up.shape[-2:]
    factor = pipeline.vae_scale_factor
    _check_sample_size(pipeline, height, width)
    output = pipeline(
        _to_pil(lq_up),
        upscale=1.0,
        num_inference_steps=num_inference_steps,
        start=start,
        generator=generator,
        output_type="latent",
        **pipeline_kwargs,
    )
    condition = output.conditions[0]
    if tuple(condition.work_size) != (height, width):
        raise RuntimeError(f"pipeline sampled at {condition.work_size}, expected {(height, width)}")
    # The pipeline pads to its UNet multiple; keep the latent of the image itself.
    return output.latents[0][..., : height // factor, : width // factor]


@torch.no_grad()
def sample_latents_batch(
    pipeline,
    lq_ups: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator],
    num_inference_steps: int = 50,
    start: str = "lq",
    *,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    vae_tile_size: int | None = 1024,
    vae_tile_overlap: int = 64,
    prompt_embeds: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[`sample_latents`] of several same-size images at once: one sampling loop over the batch, each image with its
    own generator, drawn in the pipeline's order (the LQ posterior noise, then the start noise), so each result is the
    one the pipeline gives for that image and generator alone, up to float rounding of the batched kernels.

    Only for a deterministic scheduler (see [`~stablesr.schedulers.DETERMINISTIC_SCHEDULERS`]): an ancestral one
    (the official DDPM) draws noise at every step from the generator, which one loop over the batch cannot replay.
    """
    if not lq_ups:
        return []
    if len(generators) != len(lq_ups):
        raise ValueError(f"got {len(generators)} generators for {len(lq_ups)} images")
    if len({tuple(x.shape) for x in lq_ups}) != 1:
        raise ValueError("a batch must hold images of one size")
    if not is_deterministic(pipeline.scheduler):
        raise ValueError(
            f"{type(pipeline.scheduler).__name__} draws noise at every step, so a batch cannot reproduce each "
            "sample's own run; use a deterministic scheduler (--scheduler dpmsolver, ddim or unipc) or a batch size of 1"
        )
    height, width = lq_ups[0].shape[-2:]
    _check_sample_size(pipeline, height, width)
    device = pipeline._execution_device
    tile_size = tile_size or pipeline.default_tile_size
    tile_overlap = tile_overlap if tile_overlap is not None else tile_size // 2
    pipeline.check_inputs(1.0, 0.0, DEFAULT_COLOR_FIX, start, tile_size, tile_overlap, num_inference_steps)
    pipeline.prepare_half_precision()
    pipeline.scheduler.set_timesteps(num_inference_steps, device=device)
    lq_latents, starts = [], []
    for lq_up, generator in zip(lq_ups, generators, strict=True):
        # Through PIL as in sample_latents (8-bit, as the saved input), then the pipeline's own preprocessing.
        condition = pipeline.prepare_condition(_to_pil(lq_up), 1.0)
        z = pipeline.encode_condition(condition.lq_image.to(device), generator, vae_tile_size, vae_tile_overlap).float()
        noise = randn_tensor(z.shape, generator=generator, device=device, dtype=torch.float32)
        if start == "lq":
            x = pipeline.scheduler.add_noise(z, noise, pipeline.scheduler.timesteps[:1].repeat(z.shape[0]))
        else:
            x = noise * pipeline.scheduler.init_noise_sigma
        lq_latents.append(z)
        starts.append(x)
    embeds = pipeline.get_prompt_embeds(prompt_embeds, device, pipeline.unet.dtype)
    with pipeline.sft_adapter.attached(pipeline.unet):
        latents = pipeline.denoise(torch.cat(starts), torch.cat(lq_latents), embeds, tile_size, tile_overlap,
                                   tile_batch_size=1)  # one tile of every image per call
    factor = pipeline.vae_scale_factor
    return [x[None, :, : height // factor, : width // factor] for x in latents]


@torch.no_grad()
def _decode_check(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Stock-decoder image of the latents in [0, 1] (the official ``samples/``: decode_first_stage, no CFW)."""
    vae = pipeline.vae
    raw = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    image = vae_tiling.decode(vae, raw, tile_size=1024).float()  # tiled only above 1024 px
    # Only a check image: an fp16 overflow here must not stop the run.
    return ((torch.nan_to_num(image) + 1) / 2).clamp(0, 1).cpu()


def generate_cfw_data(
    pipeline,
    output_dir: str | os.PathLike,
    sources: Sequence[CFWSource],
    *,
    degradation_config: DegradationConfig | None = None,
    gt_size: int | None = 512,
    num_inference_steps: int = 200,
    start: str = "lq",
    seed: int = 10000,
    num_shards: int = 1,
    shard_index: int = 0,
    save_samples: bool = True,
    max_samples: int | None = None,
    progress: bool = True,
    sampler: str | None = None,
    batch_size: int = 1,
    **pipeline_kwargs,
) -> CFWDataReport:
    """Generate (or complete) a CFW training set with a stage-1 pipeline; see the module docstring for the layout.

    Resumable: samples whose files all exist are skipped. Shardable: this call only handles the indices of
    [`shard_indices`]`(len(sources), num_shards, shard_index)`; run one call per process with the same arguments.

    Args:
        pipeline: A loaded [`~stablesr.StableSRPipeline`] (stage 1; its CFW adapter is not used).
        output_dir: Dataset root.
        sources: From [`list_sources`].
        degradation_config: On-the-fly degradation table (default: ``DegradationConfig()``, StableSR 512).
        gt_size: GT crop side (official 512), or `None` for whole images (they must be at least the native size).
        num_inference_steps: Sampling steps (official 200).
        start: ``"lq"`` (official: ``x_T = q_sample(z_LQ, 999)``) or ``"noise"``.
        seed: Base seed (official README: 10000); sample ``i`` uses generators seeded from ``(seed, i)``.
        num_shards / shard_index: This process's share.
        save_samples: Also write ``samples/NAME.png`` (stock-decoder check images); required for completeness then.
        max_samples: Only consider the first `max_samples` sample indices (official runs stop at ~5000 per run).
        progress: Show a progress bar.
        sampler: Name of the scheduler the pipeline samples with, when it is not the model's own (recorded in the
            folder's settings, so a resumed run cannot mix samplers; e.g. ``"dpmsolver"`` for distillation targets).
        batch_size: Samples sampled together ([`sample_latents_batch`]; same results up to float rounding, several
            times the throughput). Above 1 it needs a deterministic scheduler; a sample is written once its batch is
            done, so an interrupted run loses at most one batch.
        pipeline_kwargs: Passed to the pipeline's ``__call__`` (e.g. ``tile_size``).

    Returns:
        [`CFWDataReport`] of this shard.

    Raises:
        [`~stablesr.file_utils.DiskFullError`]: no room for a file; the run stops there (every further sample would
            fail the same way) and leaves no partial sample that counts as finished.
    """
    root = Path(output_dir)
    degradation_config = degradation_config if degradation_config is not None else DegradationConfig()
    degradation = RealESRGANDegradation(dataclasses.replace(degradation_config, gt_size=None))
    paired = any(s.lq_path is not None for s in sources)
    # The files behind the indices: resuming with another source folder would silently mix two datasets. Repeats
    # are left out, so more --num_per_image later keeps the samples made so far.
    names = sorted({(s.hq_path.name, s.lq_path.name if s.lq_path is not None else "") for s in sources})
    settings = {
        "mode": "paired" if paired else "degrade",
        "sources_sha256": hashlib.sha256(json.dumps(names).encode()).hexdigest(),
        "gt_size": gt_size,
        "num_inference_steps": num_inference_steps,
        "start": start,
        "seed": seed,
        "degradation": None if paired else degradation_config.to_dict(),
    }
    if sampler is not None:  # only then, so folders made before this setting existed still resume
        settings["sampler"] = sampler
    _write_metadata(root, settings)
    for part in REQUIRED_PARTS + (("samples",) if save_samples else ()):
        (root / part).mkdir(parents=True, exist_ok=True)

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = len(sources) if max_samples is None else min(max_samples, len(sources))
    mine = shard_indices(count, num_shards, shard_index)
    report = CFWDataReport()
    pending: list[tuple[CFWSource, torch.Tensor, torch.Tensor]] = []

    def write(source: CFWSource, lq_up: torch.Tensor, gt: torch.Tensor, latents: torch.Tensor) -> None:
        name = sample_name(source.index)
        if not torch.isfinite(latents).all():
            logger.warning(f"sample {name} ({source.hq_path.name}): the sampled latent is not finite; skipped")
            report.failed.append(source.index)
            return
        paths = sample_paths(root, name)
        _save_png(lq_up, paths["inputs"])
        _save_png(gt, paths["gts"])
        if save_samples:
            _save_png(_decode_check(pipeline, latents), paths["samples"])
        # Latents last: a sample without its latent file is visibly unfinished for CFWDataset too.
        _save_latents(
            latents,
            paths["latents"],
            {
                "scaled": "true",
                "hq": source.hq_path.name,
                "lq": source.lq_path.name if source.lq_path is not None else "",
                "repeat": str(source.repeat),
            },
        )
        report.generated.append(source.index)

    def flush() -> None:
        if batch_size == 1:
            results = [sample_latents(pipeline, lq_up, _generator(seed, source.index, "sample"), num_inference_steps,
                                      start, **pipeline_kwargs) for source, lq_up, _ in pending]
        else:
            results = sample_latents_batch(
                pipeline, [lq_up for _, lq_up, _ in pending],
                [_generator(seed, source.index, "sample") for source, _, _ in pending], num_inference_steps, start,
                **pipeline_kwargs,
            )
        for (source, lq_up, gt), latents in zip(pending, results, strict=True):
            write(source, lq_up, gt, latents)
        bar.update(len(pending))
        pending.clear()

    # Counts finished samples (a batch advances it when its samples are written).
    bar = tqdm(total=len(mine), desc=f"CFW data shard {shard_index}/{num_shards}", disable=not progress)
    for index in mine:
        source = sources[index]
        name = sample_name(source.index)
        if is_complete(root, name, with_samples=save_samples):
            report.skipped.append(source.index)
            bar.update(1)
            continue
        _remove_stale_temporaries(root, name)
        lq_up, gt = make_pair(source, _generator(seed, source.index, "data"), degradation, gt_size)
        if pending and pending[0][1].shape != lq_up.shape:  # whole images of another size: a batch of their own
            flush()
        pending.append((source, lq_up, gt))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


class CFWDataset(torch.utils.data.Dataset):
    """The samples of a [`generate_cfw_data`] folder (official ``SingleImageNPDataset``, without augmentation).

    Lists the names that have ``inputs/``, ``gts/`` and ``latents/`` files (``samples/`` is not needed), sorted.
    Each item is a dict:

    - ``"lq"``: (3, H, W) float32 in [-1, 1], the upsampled LQ image (source of the CFW encoder features).
    - ``"gt"``: (3, H, W) float32 in [-1, 1], the target.
    - ``"latents"``: (4, H/8, W/8) float32, scaled (divide by ``vae.config.scaling_factor`` to decode).
    - ``"name"``: the sample name.

    Args:
        root: The dataset folder.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        latents_dir = self.root / "latents"
        if not latents_dir.is_dir():
            raise FileNotFoundError(
                f"{self.root} is not a CFW data folder (no latents/ inside); make one with scripts/generate_cfw_data.py"
            )
        names = sorted(p.stem for p in latents_dir.glob("*.safetensors") if not p.name.startswith("."))
        self.names = [n for n in names if is_complete(self.root, n)]
        if not self.names:
            raise ValueError(f"{self.root} holds no complete CFW sample (inputs/, gts/ and latents/ per name)")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        paths = sample_paths(self.root, name)
        lq = to_tensor(load_image(paths["inputs"]).rgb)[0]
        gt = to_tensor(load_image(paths["gts"]).rgb)[0]
        latents = load_file(str(paths["latents"]))[LATENTS_KEY].float()
        if latents.ndim == 4:
            latents = latents[0]
        if (
            lq.shape != gt.shape
            or latents.ndim != 3
            or latents.shape[-2] * 8 != gt.shape[-2]
            or (latents.shape[-1] * 8 != gt.shape[-1])
        ):
            raise ValueError(
                f"CFW sample {name}: inputs {tuple(lq.shape)}, gts {tuple(gt.shape)} and latents "
                f"{tuple(latents.shape)} do not fit together (need equal image sizes and latents of 1/8 their size)"
            )
        return {"lq": lq, "gt": gt, "latents": latents, "name": name}
