"""ComfyUI nodes for StableSR: load a model, sample once, decode at any fidelity weight.

The nodes are a thin layer over the installed `stablesr` package (never a copy of it):

- **StableSR Load Model** -> ``STABLESR_MODEL``: a loaded `StableSRPipeline`, cached per (model, cfw, dtype, device).
- **StableSR Sample** (``IMAGE`` -> ``STABLESR_SAMPLES``): the final latents of every image plus its
  `RestorationCondition`, kept in memory, so decoding again needs no sampling.
- **StableSR Decode** (``STABLESR_SAMPLES`` -> ``IMAGE``): CFW decode at a fidelity weight, color fix, crop/resize.
  ComfyUI re-runs a node only when its inputs change, so moving the fidelity slider re-runs Decode alone.
- **StableSR Upscale**: Sample + Decode in one node.

ComfyUI conventions: ``IMAGE`` is a float tensor (B, H, W, C) in [0, 1] on the CPU. Image ``i`` of a batch is
sampled with the seed ``seed + i``, so every image is reproducible on its own.

ComfyUI's own modules (``comfy.utils.ProgressBar``, ``comfy.model_management``: device, interrupt, freeing memory) are
looked up when a node runs and are optional: without ComfyUI the nodes run in plain Python (the tests call them).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING

import torch

try:
    # The light modules only; the pipeline and the schedulers (diffusers models) are imported when first needed, so
    # they do not add to ComfyUI's start-up time.
    from stablesr.color import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX
    from stablesr.loading import DEFAULT_MODEL, DTYPES, load_pipeline, resolve_device
except ImportError as _err:
    _missing = (_err.name or "").split(".")[0]
    if _missing == "stablesr":
        _problem = "the `stablesr` Python package is not installed in ComfyUI's Python environment"
    else:
        _problem = f"`stablesr` is installed but its dependency `{_missing}` cannot be imported ({_err})"
    raise ImportError(
        f"StableSR nodes: {_problem}. Install it into the Python that runs ComfyUI ({sys.executable}):\n"
        f"    {sys.executable} -m pip install stablesr\n"
        "or, from a checkout of the stablesr repository, `pip install -e <checkout>`; then restart ComfyUI."
    ) from _err

if TYPE_CHECKING:
    from stablesr.pipelines.pipeline_stablesr import RestorationCondition

logger = logging.getLogger(__name__)

CATEGORY = "image/upscaling/stablesr"
MODEL_TYPE = "STABLESR_MODEL"
SAMPLES_TYPE = "STABLESR_SAMPLES"
OFFICIAL_MODELS = ("stablesr-turbo", "stablesr-512", "stablesr-768v")  # short names `load_pipeline` resolves
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)
DEFAULT_FIDELITY = 0.5
MAX_UPSCALE = 4.0  # one sampling pass; chain two passes (x4 then x2) for x8, as `stablesr restore` cascades
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed range; torch generators take seeds up to 2**64 - 1


# ------------------------------------------------------------------------------------------------ ComfyUI (optional)
def _comfy(name: str) -> ModuleType | None:
    """The ComfyUI module ``name`` (``comfy.utils``, ``comfy.model_management``), or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def default_device() -> str:
    """ComfyUI's torch device (``comfy.model_management.get_torch_device()``; honours ``--cpu``) when running inside
    ComfyUI, else ``"auto"`` resolved by [`stablesr.loading.resolve_device`] (cuda, mps, cpu)."""
    mm = _comfy("comfy.model_management")
    if mm is not None and hasattr(mm, "get_torch_device"):
        return str(mm.get_torch_device())
    return resolve_device("auto")


def _check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    mm = _comfy("comfy.model_management")
    if mm is not None and hasattr(mm, "throw_exception_if_processing_interrupted"):
        mm.throw_exception_if_processing_interrupted()


def _soft_empty_cache() -> None:
    """Hand cached accelerator memory back (ComfyUI's ``soft_empty_cache``; outside ComfyUI, CUDA's cache only)."""
    mm = _comfy("comfy.model_management")
    if mm is not None and hasattr(mm, "soft_empty_cache"):
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def _unload_comfy_models(device: str) -> None:
    """Ask ComfyUI to move its own models off an accelerator before StableSR needs the memory (they load again
    when next used). Our pipeline is not one of ComfyUI's managed models, so ComfyUI cannot make room by itself."""
    if torch.device(device).type == "cpu":
        return
    mm = _comfy("comfy.model_management")
    if mm is not None and hasattr(mm, "unload_all_models"):
        mm.unload_all_models()
        _soft_empty_cache()


class _Progress:
    """ComfyUI's progress bar (``comfy.utils.ProgressBar``) when importable; otherwise it only counts."""

    def __init__(self, total: int):
        utils = _comfy("comfy.utils")
        cls = getattr(utils, "ProgressBar", None) if utils is not None else None
        self.bar = cls(total) if cls is not None else None
        self.value, self.total = 0, total

    def set(self, value: int, total: int | None = None) -> None:
        self.value, self.total = value, total if total is not None else self.total
        if self.bar is not None:
            self.bar.update_absolute(value, self.total)


# ------------------------------------------------------------------------------------------------ model and samples
class StableSRModel:
    """What ``STABLESR_MODEL`` carries: a loaded `StableSRPipeline` and the schedulers built for it.

    Args:
        pipe: the pipeline, on ``device``.
        name: the ``model`` string it was loaded from (for messages).
        device / dtype: where it lives and its dtype name ("fp32", "fp16", "bf16").
    """

    def __init__(self, pipe, name: str, device: str, dtype: str):
        self.pipe, self.name, self.device, self.dtype = pipe, name, device, dtype
        from stablesr.schedulers import StableSRDDPMScheduler

        self._scheduler_config = pipe.scheduler.config
        self._schedulers = {}
        if isinstance(pipe.scheduler, StableSRDDPMScheduler):
            self._schedulers["ddpm"] = pipe.scheduler  # the converted official one, as loaded
        self.lock = threading.Lock()  # one sampling or decode at a time: the scheduler is swapped per run

    def scheduler(self, name: str):
        """The scheduler ``name`` (one of `stablesr.schedulers.SCHEDULERS`), built once from the model's config."""
        from stablesr.schedulers import scheduler_from_name

        if name not in self._schedulers:
            self._schedulers[name] = scheduler_from_name(name, self._scheduler_config)
        return self._schedulers[name]

    def __repr__(self) -> str:
        return f"StableSRModel({self.name!r}, device={self.device!r}, dtype={self.dtype!r})"


@dataclasses.dataclass
class StableSRSamples:
    """What ``STABLESR_SAMPLES`` carries: one sampling of a batch, decodable again at any fidelity weight.

    Args:
        model: the [`StableSRModel`] that sampled them (Decode uses its pipeline).
        latents: final scaled latents per image, (1, 4, h, w) on the CPU.
        conditions: the matching `RestorationCondition` per image (LQ canvas, sizes), on the CPU. The CFW encoder
            features are not kept (96 floats per pixel); a decode computes them again in one encoder pass.
        seeds: the seed each image was sampled with (``seed + index``).
    """

    model: StableSRModel
    latents: list[torch.Tensor]
    conditions: list[RestorationCondition]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.latents)


_MODEL_CACHE: dict[tuple, StableSRModel] = {}
_MODEL_CACHE_LOCK = threading.Lock()


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"`` -> "fp16" on CUDA, else "fp32"; any name of `stablesr.loading.DTYPES` is returned as given."""
    if dtype == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return dtype


def load_model(model: str, cfw: str = "", dtype: str = "auto", device: str | None = None) -> StableSRModel:
    """Load (or reuse) the pipeline named by ``model``: a converted folder, an official ``.ckpt`` (with ``cfw``, the
    official ``vqgan_cfw`` ``.ckpt``), or an official short name such as ``stablesr-512``.

    The last loaded model is cached per (model, cfw, dtype, device), so queuing a workflow again does not reload it;
    loading another one drops it (one StableSR model in memory at a time).

    Raises:
        `stablesr.loading.ModelLoadError`: the message names the problem and the fix.
    """
    model = os.path.expanduser(model.strip())
    cfw = os.path.expanduser(cfw.strip()) if cfw and cfw.strip() else None
    if not model:
        raise ValueError(
            "StableSR Load Model: `model` is empty; give a converted model folder, an official .ckpt path, or one "
            f"of {', '.join(OFFICIAL_MODELS)}"
        )
    device = str(device) if device else default_device()
    dtype = resolve_dtype(dtype, device)
    key = (model, cfw, dtype, device)
    with _MODEL_CACHE_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is not None:
            return cached
        _MODEL_CACHE.clear()  # the previous model goes once nothing else (ComfyUI's output cache) holds it
        _soft_empty_cache()
        _unload_comfy_models(device)
        pipe = load_pipeline(model, cfw, device, dtype)
        loaded = StableSRModel(pipe, model, device, dtype)
        if pipe.cfw_adapter is None:
            logger.warning(
                f"StableSR: {model} has no CFW weights, so the fidelity weight has no effect (for an official .ckpt "
                "give the vqgan_cfw .ckpt as `cfw`)"
            )
        _MODEL_CACHE[key] = loaded
        return loaded


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a batch: ``seed + index`` (wrapping at 2**64, ComfyUI's seed range)."""
    return (int(seed) + index) % (SEED_MAX + 1)


def comfy_to_pipeline(image: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) in [0, 1] as the pipeline's input: (B, 3, H, W) float32 on the CPU.

    One channel becomes gray RGB; a fourth (alpha) channel is dropped (ComfyUI carries masks separately).
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"StableSR: expected a ComfyUI IMAGE, a (B, H, W, C) tensor with C = 1, 3 or 4; got {shape}")
    if image.shape[0] == 0:
        raise ValueError("StableSR: the IMAGE batch is empty")
    image = image.detach().to(device="cpu", dtype=torch.float32)
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return image[..., :3].clamp(0, 1).permute(0, 3, 1, 2).contiguous()


def sample(
    model: StableSRModel,
    image: torch.Tensor,
    upscale: float = 4.0,
    steps: int = 0,
    seed: int = 0,
    scheduler: str = "ddpm",
    tile_size: int = 0,
    tile_overlap: float = 0.5,
    tile_batch: int = 4,
    vae_tile_size: int = 1024,
    start: str = "lq",
) -> StableSRSamples:
    """Sample every image of a ComfyUI IMAGE batch once (``output_type="latent"``); image ``i`` uses ``seed + i``.

    Args:
        steps: sampling steps; 0 = the model's default (200 official DDPM, 4 turbo).
        tile_size: aggregation tile in latent pixels; 0 = the model's native latent size (64 for 512 px).
        tile_overlap: overlap as a fraction of the tile (0.5 = half, the official default).
        tile_batch: tiles per UNet call.
        vae_tile_size: tiled VAE encode tile in pixels; 0 = never tile.
    """
    if not isinstance(model, StableSRModel):
        raise ValueError(f"StableSR Sample: `model` must come from StableSR Load Model, got {type(model).__name__}")
    if not 0.0 <= float(tile_overlap) < 1.0:
        raise ValueError(f"StableSR Sample: tile_overlap is a fraction of the tile in [0, 1), got {tile_overlap}")
    images = comfy_to_pipeline(image)
    pipe = model.pipe
    tile = int(tile_size) or pipe.default_tile_size
    overlap = min(tile - 1, round(tile * float(tile_overlap)))
    _unload_comfy_models(model.device)
    latents, conditions, seeds = [], [], []
    with model.lock:
        pipe.scheduler = model.scheduler(scheduler)
        progress = _Progress(len(images) * (int(steps) or pipe.config.default_num_inference_steps))
        for index in range(len(images)):
            _check_interrupted()
            seed_i = image_seed(seed, index)

            def callback(step, timestep, step_latents, index=index):
                per_image = len(pipe.scheduler.timesteps)  # the scheduler's real step count
                progress.set(index * per_image + step + 1, len(images) * per_image)
                _check_interrupted()

            out = pipe(
                images[index : index + 1],
                upscale=float(upscale),
                num_inference_steps=int(steps) or None,
                tile_size=tile,
                tile_overlap=overlap,
                tile_batch_size=int(tile_batch),
                vae_tile_size=int(vae_tile_size) or None,
                start=start,
                generator=torch.Generator(device="cpu").manual_seed(seed_i),
                output_type="latent",
                callback=callback,
            )
            latents.append(out.latents[0].detach().to("cpu"))
            conditions.append(dataclasses.replace(out.conditions[0], cfw_features=None).to("cpu"))
            seeds.append(seed_i)
            del out
    _soft_empty_cache()
    return StableSRSamples(model, latents, conditions, seeds)


def decode(
    samples: StableSRSamples,
    fidelity_weight: float = DEFAULT_FIDELITY,
    color_fix: str = DEFAULT_COLOR_FIX,
    vae_tile_size: int = 1024,
) -> torch.Tensor:
    """Decode [`StableSRSamples`] at ``fidelity_weight`` (0 = realism, 1 = fidelity to the input): a ComfyUI IMAGE
    (B, H*upscale, W*upscale, 3) in [0, 1]. No sampling: only the VAE runs."""
    if not isinstance(samples, StableSRSamples):
        raise ValueError(f"StableSR Decode: `samples` must come from StableSR Sample, got {type(samples).__name__}")
    pipe = samples.model.pipe
    progress = _Progress(len(samples))
    images = []
    with samples.model.lock:
        for index, (latents, condition) in enumerate(zip(samples.latents, samples.conditions, strict=True)):
            _check_interrupted()
            image = pipe.decode_latents(
                latents, condition, float(fidelity_weight), color_fix, int(vae_tile_size) or None, output_type="pt"
            )
            images.append(image.permute(0, 2, 3, 1).float().cpu())
            progress.set(index + 1)
    _soft_empty_cache()
    return torch.cat(images)


# ------------------------------------------------------------------------------------------------ input definitions
def _sampling_inputs() -> dict:
    from stablesr.pipelines.pipeline_stablesr import STARTS
    from stablesr.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    return {
        "upscale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": MAX_UPSCALE, "step": 0.05,
                              "tooltip": "output size = round(upscale x input size); StableSR is trained for x4"}),
        "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                          "tooltip": "sampling steps; 0 = the model's default (200 official DDPM, 4 turbo)"}),
        "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                         "tooltip": "image i of a batch is sampled with seed + i"}),
        "scheduler": (list(SCHEDULERS), {"default": DEFAULT_SCHEDULER,
                                         "tooltip": "ddpm = the official respaced DDPM; the others suit 10-50 steps"}),
        "tile_size": ("INT", {"default": 0, "min": 0, "max": 512, "step": 8,
                              "tooltip": "aggregation tile in latent pixels (x8 = image pixels); 0 = the model's "
                                         "native size (64 for 512-px models, 96 for 768)"}),
        "tile_overlap": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.75, "step": 0.05,
                                   "tooltip": "tile overlap as a fraction of the tile"}),
        "tile_batch": ("INT", {"default": 4, "min": 1, "max": 64,
                               "tooltip": "tiles per UNet call (halved by itself when the GPU runs out of memory)"}),
        "vae_tile_size": ("INT", {"default": 1024, "min": 0, "max": 8192, "step": 64,
                                  "tooltip": "tiled VAE tile in pixels; 0 = never tile"}),
        "start": (list(STARTS), {
            "default": "lq", "tooltip": "lq = the official start from the noised input latent; noise = pure noise"}),
    }


def _decode_inputs() -> dict:
    return {
        "fidelity_weight": ("FLOAT", {"default": DEFAULT_FIDELITY, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "display": "slider",
                                      "tooltip": "CFW weight: 0 = realism (more generated detail), 1 = fidelity to "
                                                 "the input"}),
        "color_fix": (list(COLOR_FIX_METHODS), {"default": DEFAULT_COLOR_FIX,
                                                "tooltip": "match the colors of the upscaled input"}),
        "vae_tile_size": ("INT", {"default": 1024, "min": 0, "max": 8192, "step": 64,
                                  "tooltip": "tiled VAE decode tile in pixels; 0 = never tile"}),
    }


# ------------------------------------------------------------------------------------------------------------- nodes
class StableSRLoadModel:
    """Load a StableSR model: a converted folder, an official .ckpt (+ CFW .ckpt), or an official short name."""

    DESCRIPTION = (
        "Loads a StableSR model: a converted model folder, an official StableSR .ckpt (with the vqgan_cfw .ckpt for "
        "the fidelity control), or an official model by name (stablesr-turbo, stablesr-512, stablesr-768v). The "
        "last loaded model stays in memory, so queuing again does not reload it."
    )
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("STRING", {"default": DEFAULT_MODEL, "multiline": False,
                                     "tooltip": "converted folder, official .ckpt path, or an official model "
                                                f"name ({', '.join(OFFICIAL_MODELS)})"}),
                "dtype": (list(DTYPE_CHOICES), {"default": "auto",
                                                "tooltip": "auto = fp16 on CUDA, fp32 elsewhere"}),
            },
            "optional": {
                "cfw": ("STRING", {"default": "", "multiline": False,
                                   "tooltip": "official vqgan_cfw .ckpt, when model is an official .ckpt"}),
            },
        }

    def load(self, model, dtype="auto", cfw=""):
        return (load_model(model, cfw, dtype),)


class StableSRSample:
    """Sample a batch once; the latents stay in memory for StableSR Decode."""

    DESCRIPTION = (
        "Runs StableSR's sampling on every image of the batch (image i with seed + i) and keeps the final latents in "
        "memory. Connect it to StableSR Decode: changing the fidelity weight there re-runs only the decode."
    )
    RETURN_TYPES = (SAMPLES_TYPE,)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL_TYPE,), "image": ("IMAGE",), **_sampling_inputs()}}

    def sample(self, model, image, upscale, steps, seed, scheduler, tile_size, tile_overlap, tile_batch, vae_tile_size,
               start):
        return (sample(model, image, upscale, steps, seed, scheduler, tile_size, tile_overlap, tile_batch,
                       vae_tile_size, start),)


class StableSRDecode:
    """Decode StableSR samples at a fidelity weight (no sampling)."""

    DESCRIPTION = (
        "Decodes StableSR samples with the CFW decoder at the given fidelity weight, then color-fixes them against "
        "the input. Only the VAE runs, so trying other weights is fast."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": (SAMPLES_TYPE,), **_decode_inputs()}}

    def decode(self, samples, fidelity_weight, color_fix, vae_tile_size):
        return (decode(samples, fidelity_weight, color_fix, vae_tile_size),)


class StableSRUpscale:
    """StableSR Sample + Decode in one node."""

    DESCRIPTION = "Restores and upscales images with StableSR in one node: StableSR Sample, then StableSR Decode."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        sampling = _sampling_inputs()
        decoding = _decode_inputs()
        del decoding["vae_tile_size"]  # one VAE tile size for the encode and the decode
        return {"required": {"model": (MODEL_TYPE,), "image": ("IMAGE",), **sampling, **decoding}}

    def upscale(self, model, image, upscale, steps, seed, scheduler, tile_size, tile_overlap, tile_batch,
                vae_tile_size, start, fidelity_weight, color_fix):
        samples = sample(model, image, upscale, steps, seed, scheduler, tile_size, tile_overlap, tile_batch,
                         vae_tile_size, start)
        return (decode(samples, fidelity_weight, color_fix, vae_tile_size),)


NODE_CLASS_MAPPINGS = {
    "StableSRLoadModel": StableSRLoadModel,
    "StableSRSample": StableSRSample,
    "StableSRDecode": StableSRDecode,
    "StableSRUpscale": StableSRUpscale,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StableSRLoadModel": "StableSR Load Model",
    "StableSRSample": "StableSR Sample",
    "StableSRDecode": "StableSR Decode",
    "StableSRUpscale": "StableSR Upscale",
}
