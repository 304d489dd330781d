"""Loading a ready-to-run `StableSRPipeline` from whatever the user names, plus device and dtype resolution.

``--model`` (CLI), ``stablesr ui`` and Python callers all come through [`load_pipeline`]:

- a converted folder (``model_index.json``; ``stablesr convert`` makes one);
- an official Lightning ``.ckpt`` (with the CFW ``.ckpt``), converted in memory;
- a Hub id: the official release (``Iceclear/StableSR``: two Lightning files, downloaded once, converted once and
  cached under ``$STABLESR_CACHE`` or ``~/.cache/stablesr``) or a converted folder on the Hub.

Every failure a user can fix raises [`ModelLoadError`] (a `ValueError`) whose message names the problem and the fix.
The allowed dtype names ([`DTYPES`]) and device names ([`resolve_device`]) are defined here, once.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "HUB_FILES",
    "LONG_DTYPE_NAMES",
    "ModelLoadError",
    "cache_dir",
    "load_pipeline",
    "resolve_device",
    "torch_dtype",
]

DEFAULT_MODEL = "Iceclear/StableSR"
# The official release on the Hub is a pair of Lightning checkpoints, converted once and cached.
HUB_FILES = {"Iceclear/StableSR": ("stablesr_000117.ckpt", "vqgan_cfw_00011.ckpt")}
# Short dtype names (CLI --dtype, web UI) -> torch dtype attribute names (the long names, which the training scripts
# take as in diffusers' examples, are accepted too).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LONG_DTYPE_NAMES = tuple(DTYPES.values())
DEVICE_HELP = "auto, cpu, cuda, cuda:1, mps"
_CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")


class ModelLoadError(ValueError):
    """A model could not be loaded for a reason the user can fix; the message names the problem and the fix."""


def cache_dir() -> Path:
    """Where converted Hub models are cached: ``$STABLESR_CACHE``, else ``$XDG_CACHE_HOME/stablesr`` or
    ``~/.cache/stablesr``."""
    base = os.environ.get("STABLESR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stablesr"
    )
    return Path(base)


def torch_dtype(name: str):
    """The torch dtype of a short name in [`DTYPES`] ("fp32", "fp16", "bf16") or its long name ("float32", ...)."""
    import torch

    if name in LONG_DTYPE_NAMES:
        return getattr(torch, name)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"mps"``, else ``"cpu"``; any other name is returned as given."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dtype_warning(device: str, dtype: str) -> str | None:
    """A warning for a device/dtype pair that works badly (fp16 on a CPU), or None."""
    if device == "cpu" and dtype == "fp16":
        return "fp16 on CPU is slow or unsupported; use --dtype bf16 or fp32"
    return None


def load_pipeline(model: str = DEFAULT_MODEL, cfw: str | None = None, device: str = "cpu", dtype: str = "fp32"):
    """A `StableSRPipeline` from a converted folder, an official ``.ckpt`` (+ CFW ``.ckpt``), or a Hub id.

    Args:
        model: converted folder, official checkpoint file, or Hub id (default: the official release).
        cfw: the official ``vqgan_cfw`` checkpoint when ``model`` is an official ``.ckpt``.
        device: torch device name, or "auto" (see [`resolve_device`]).
        dtype: "fp32", "fp16" or "bf16".

    Raises:
        [`ModelLoadError`]: a folder that is not a converted model, a missing file, or a Hub model that cannot be
            fetched (offline, not cached).
    """
    from .conversion import convert_stablesr_checkpoint
    from .pipelines.pipeline_stablesr import StableSRPipeline

    dtype_ = torch_dtype(dtype)
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not a converted StableSR model (no model_index.json); convert the official "
                "checkpoints with `stablesr convert`"
            )
        pipe = StableSRPipeline.from_pretrained(path, dtype=dtype_)
    elif path.is_file():
        pipe, _ = convert_stablesr_checkpoint(path, cfw)
        pipe = pipe.to(dtype=dtype_)
    elif path.suffix in _CHECKPOINT_SUFFIXES or model.startswith((".", "/")):
        raise ModelLoadError(f"model {model} does not exist")
    else:
        pipe = _pipeline_from_hub(model, dtype_)
    return pipe.to(resolve_device(device))


def _pipeline_from_hub(repo_id: str, dtype):
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .conversion import convert_stablesr_checkpoint, save_pipeline_atomically
    from .pipelines.pipeline_stablesr import StableSRPipeline

    cached = cache_dir() / "converted" / repo_id.replace("/", "--")
    if (cached / "model_index.json").is_file():
        return StableSRPipeline.from_pretrained(cached, dtype=dtype)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        if repo_id in HUB_FILES:
            ckpt_name, cfw_name = HUB_FILES[repo_id]
            logger.info(f"downloading the official StableSR weights from {repo_id} (once; ~7.5 GB)")
            ckpt = hf_hub_download(repo_id, ckpt_name)
            cfw = hf_hub_download(repo_id, cfw_name)
            pipe, report = convert_stablesr_checkpoint(ckpt, cfw)
            save_pipeline_atomically(pipe, cached)
            logger.info(f"converted and cached in {cached}\n{report.summary()}")
            return StableSRPipeline.from_pretrained(cached, dtype=dtype)
        files = list_repo_files(repo_id)
        if "model_index.json" not in files:
            raise ModelLoadError(f"{repo_id} is not a converted StableSR model on the Hub (no model_index.json)")
        return StableSRPipeline.from_pretrained(repo_id, dtype=dtype)
    except (LocalEntryNotFoundError, OSError) as err:
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ModelLoadError(
            f"cannot fetch {repo_id} from the Hugging Face Hub{hint}: {err}. Connect to the internet once, or pass "
            "--model with a converted folder or the official .ckpt files (`stablesr convert` makes the folder)"
        ) from None


def enable_fast_attention(pipe, device: str) -> bool:
    """Use xformers' memory-efficient attention on CUDA when xformers is installed (extra: stablesr[xformers]).

    Returns whether it was enabled; otherwise PyTorch SDPA (the default) is used.
    """
    if not str(device).startswith("cuda"):
        return False
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    pipe.enable_xformers_memory_efficient_attention()
    return True
