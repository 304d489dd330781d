"""Loading a ready-to-run `StableSRPipeline` from whatever the user names, plus device and dtype resolution.

``--model`` (CLI), ``stablesr ui`` and Python callers all come through [`load_pipeline`]:

- a converted folder (``model_index.json``; ``stablesr convert`` makes one);
- an official Lightning ``.ckpt`` (with the CFW ``.ckpt``), converted once and cached by content: the SHA-256 of both
  files (remembered per path, size and mtime in ``file_hashes.json``, so a 6.5 GB file is hashed once) names the
  cached folder ``converted/<key>``, which is written atomically;
- an official model by name (``stablesr-turbo``, the default; ``stablesr-512``, also ``Iceclear/StableSR``;
  ``stablesr-768v``; see `stablesr.hub`): its two Lightning files are downloaded once into the Hugging Face cache,
  checked against their SHA-256, converted once and cached as ``converted/<name>``;
- a Hub id of a converted folder.

Caches live under ``$STABLESR_CACHE`` or ``~/.cache/stablesr`` ([`cache_dir`]). A local converted folder is checked
before and after ``from_pretrained`` ([`check_model_folder`]). A missing component, a truncated or corrupt safetensors
file, pickle weights where safetensors are expected (never opened) and a config that disagrees with its weights each
give one line that names the file. A cached conversion that fails the check is converted again.

Every failure a user can fix raises [`ModelLoadError`] (a `ValueError`) whose message names the problem and the fix.
The allowed dtype names ([`DTYPES`]) and device names ([`resolve_device`]) are defined here, once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "LONG_DTYPE_NAMES",
    "ModelLoadError",
    "cache_dir",
    "check_model_folder",
    "file_sha256",
    "load_pipeline",
    "resolve_device",
    "resolve_dtype",
    "torch_dtype",
]

# An official model name (stablesr.hub.OFFICIAL_MODELS): SD-Turbo based, 4 steps instead of 200, same CFW.
DEFAULT_MODEL = "stablesr-turbo"
# Short dtype names (CLI --dtype, web UI) -> torch dtype attribute names (the long names, which the training scripts
# take as in diffusers' examples, are accepted too).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LONG_DTYPE_NAMES = tuple(DTYPES.values())
# What --dtype accepts on the commands that run a model: "auto" picks per device (resolve_dtype).
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_HELP = "auto, cpu, cuda, cuda:1, mps"
_CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
# Weight files that are pickles: never opened in a model folder (unpickling can run code).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Modules a model_index.json may name (importing any other module could run code).
_TRUSTED_LIBRARIES = ("diffusers", "transformers", "stablesr")
_FIX = "re-convert with `stablesr convert` or download the model folder again"
# Bump when the converter's output for the same input files changes, so old cached conversions are not reused.
_CONVERSION_CACHE_VERSION = 1
_HASH_CHUNK = 8 * 1024 * 1024


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


def resolve_dtype(name: str, device: str) -> str:
    """The short dtype name (fp32, fp16, bf16) to run on ``device``: ``name`` itself, or for ``"auto"``:

    - CUDA / ROCm: bf16 on GPUs with native bf16 (NVIDIA compute capability 8.0+, i.e. Ampere and newer; AMD
      GPUs), else fp16. bf16 has float32's exponent range, so SD 2.x activations cannot overflow it, at the same
      tensor-core speed as fp16 on those GPUs. Older GPUs (T4, V100, ...) have no fast bf16 and get fp16, made safe
      by the pipeline's fp16 guards (fp32 attention scores, fp32 VAE, a non-finite check; see the pipeline).
    - Apple MPS: fp16 (every MPS version supports it, bf16 needs macOS 14+), with the same fp16 guards.
    - CPU and anything else: fp32. CPUs without native bf16 instructions (AVX512-BF16 / AMX) emulate bf16 matmuls
      and convolutions, many times slower than fp32 (scripts/bench_step.py), and fp16 is slower still.
    """
    if name != "auto":
        torch_dtype(name)  # validates
        return next((short for short, long in DTYPES.items() if name in (short, long)), name)
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        if torch.version.hip:
            return "bf16"
        index = torch.device(device).index
        major = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).major
        return "bf16" if major >= 8 else "fp16"
    if kind == "mps":
        return "fp16"
    return "fp32"


def dtype_warning(device: str, dtype: str) -> str | None:
    """A warning for a device/dtype pair that works badly (fp16 or bf16 on a CPU), or None."""
    if str(device).split(":")[0] == "cpu" and dtype in ("fp16", "float16"):
        return "fp16 on CPU is slow or unsupported; use --dtype fp32 (the auto choice on CPU)"
    if str(device).split(":")[0] == "cpu" and dtype in ("bf16", "bfloat16"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            flags = ""
        if not {"avx512_bf16", "amx_bf16"} & set(flags.split()):
            return ("this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 convolutions are emulated and much slower "
                    "than fp32; use --dtype fp32 (the auto choice on CPU)")
    return None


def load_pipeline(model: str = DEFAULT_MODEL, cfw: str | None = None, device: str = "cpu", dtype: str = "auto"):
    """A `StableSRPipeline` from a converted folder, an official ``.ckpt`` (+ CFW ``.ckpt``), or a Hub id.

    Args:
        model: converted folder, official checkpoint file, official model name (``stablesr-turbo``,
            ``stablesr-512``, ``stablesr-768v``; see `stablesr.hub`) or Hub id of a converted folder.
        cfw: the official ``vqgan_cfw`` checkpoint when ``model`` is an official ``.ckpt``.
        device: torch device name, or "auto" (see [`resolve_device`]).
        dtype: "fp32", "fp16", "bf16" or "auto" (see [`resolve_dtype`]).

    Raises:
        [`ModelLoadError`]: a folder that is not a converted model or is broken (see [`check_model_folder`]), a
            missing file, or a Hub model that cannot be fetched (offline, not cached).
    """
    device = resolve_device(device)
    dtype_ = torch_dtype(resolve_dtype(dtype, device))
    path = Path(model)
    if path.is_dir():
        pipe = _load_folder(path, dtype_)
    elif path.is_file():
        pipe = _pipeline_from_checkpoint(path, cfw, dtype_)
    elif path.suffix in _CHECKPOINT_SUFFIXES or model.startswith((".", "/")):
        raise ModelLoadError(f"model {model} does not exist")
    else:
        pipe = _pipeline_from_hub(model, dtype_)
    return pipe.to(resolve_device(device))


# ------------------------------------------------------------------------------------------- converted folders
def check_model_folder(path: str | os.PathLike) -> dict[str, dict[str, tuple[int, ...]]]:
    """Check a converted model folder without loading any weights; returns ``{component: {tensor: shape}}``.

    Every component listed in ``model_index.json`` needs its folder and config, and models need safetensors
    weights whose header agrees with the file size. Only headers are read. Pickle weights are never opened.

    Raises:
        [`ModelLoadError`]: one line naming the file, what is wrong with it and what to do.
    """
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{path} is a folder but not a converted StableSR model (no model_index.json); convert the official "
            "checkpoints with `stablesr convert`"
        )
    shapes = {}
    for name, (library, class_name) in _components(index_file).items():
        folder = path / name
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: missing (model_index.json lists {name}, a {class_name}); {_FIX}")
        if class_name.endswith("Scheduler"):
            _read_json(folder / "scheduler_config.json")
        elif not any(word in class_name for word in ("Tokenizer", "Processor", "FeatureExtractor")):
            _read_json(folder / "config.json")
            shapes[name] = _weight_shapes(folder, "model" if library == "transformers" else "diffusion_pytorch_model")
    return shapes


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ModelLoadError(f"{file}: missing; {_FIX}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelLoadError(f"{file}: not readable JSON ({str(err).splitlines()[0]}); {_FIX}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: not a JSON object; {_FIX}")
    return data


def _components(index_file: Path) -> dict[str, tuple[str, str]]:
    """``{name: (library, class name)}`` of the components model_index.json lists (absent optional ones skipped)."""
    found = {}
    for name, entry in _read_json(index_file).items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        library, class_name = entry
        trusted = isinstance(library, str) and library.split(".")[0] in _TRUSTED_LIBRARIES
        if not trusted or not isinstance(class_name, str):
            raise ModelLoadError(
                f"{index_file}: {name} names {library}.{class_name}; only diffusers, transformers and stablesr "
                f"classes are loaded (importing other modules could run code); {_FIX}"
            )
        found[name] = (library, class_name)
    return found


def _weight_shapes(folder: Path, stem: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a component's safetensors weights (one file, or the shards its index file lists)."""
    from .checkpoint_io import CheckpointError, safetensors_header

    index_file = folder / f"{stem}.safetensors.index.json"
    if index_file.is_file():
        files = [folder / name for name in sorted(set(_read_json(index_file).get("weight_map", {}).values()))]
    else:
        files = [folder / f"{stem}.safetensors"]
    for file in files:
        if file.is_file():
            continue
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{folder / pickles[0]}: pickle weights where {file.name} is expected; pickles are never loaded "
                f"(unpickling can run code): {_FIX}"
            )
        raise ModelLoadError(f"{file}: missing (the weights of {folder.name}); {_FIX}")
    shapes = {}
    for file in files:
        try:
            header = safetensors_header(file)
        except CheckpointError as err:
            raise ModelLoadError(f"{err}; {_FIX}") from None
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _load_folder(path: Path, dtype):
    """``StableSRPipeline.from_pretrained`` of a local folder, checked before and after (see [`check_model_folder`])."""
    from .pipelines.pipeline_stablesr import StableSRPipeline

    shapes = check_model_folder(path)
    components = _components(path / "model_index.json")
    try:
        pipe = StableSRPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except Exception as err:  # diffusers raises many types: name the file when a config/weights check can
        for name, on_disk in shapes.items():
            _check_weights_fit(path, name, on_disk, _empty_state_dict(path, name, *components[name]))
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"{path}: cannot load the model ({type(err).__name__}: {first}); {_FIX}") from err
    # diffusers ignores tensors the config has no place for and may leave missing ones randomly initialised with
    # only a warning: compare what was built with what is on disk. (transformers renames keys on load and checks
    # its own.)
    for name, on_disk in shapes.items():
        if components[name][0] != "transformers":
            _check_weights_fit(path, name, on_disk, _without_lora(getattr(pipe, name).state_dict()))
    return pipe


def _without_lora(state_dict: dict) -> dict:
    """A state dict as the stock model has it: a loaded LoRA's own tensors dropped and the wrapped layers' names
    (``to_q.base_layer.weight``) back to the stock ones (``to_q.weight``)."""
    return {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}


def _empty_state_dict(path: Path, name: str, library: str, class_name: str) -> dict:
    """The state dict (meta tensors) of component ``name`` built from its config; {} for transformers models."""
    from accelerate import init_empty_weights

    if library == "transformers":
        return {}
    cls = getattr(importlib.import_module(library), class_name)
    try:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(path / name))
    except Exception as err:  # a config the class rejects
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"{path / name / 'config.json'}: {class_name} rejects it ({first}); {_FIX}") from err
    return model.state_dict()


def _check_weights_fit(path: Path, name: str, on_disk: dict[str, tuple[int, ...]], expected: dict) -> None:
    """One-line error when the tensors on disk do not fit the model built from the config (``expected``)."""
    if not expected:
        return

    def count(n: int) -> str:
        return f"{n} tensor{'s' if n != 1 else ''}"

    renames = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."))
    disk = {}
    for key, shape in on_disk.items():
        for old, new in renames:  # old diffusers attention names, which diffusers renames on load
            key = key.replace(old, new)
        disk[key] = shape
    model = {k: tuple(v.shape) for k, v in expected.items()}
    wrong = sorted(k for k in model.keys() & disk.keys() if model[k] != disk[k])
    missing = sorted(model.keys() - disk.keys())
    unexpected = sorted(disk.keys() - model.keys())
    if wrong:
        problem = (
            f"{wrong[0]} is {list(disk[wrong[0]])} in the weights but {list(model[wrong[0]])} by the config "
            f"({count(len(wrong))} differ)"
        )
    elif missing:
        problem = f"the weights lack {missing[0]} ({count(len(missing))} the config needs)"
    elif unexpected:
        problem = f"the weights hold {unexpected[0]}, which the config has no place for ({count(len(unexpected))})"
    else:
        return
    raise ModelLoadError(
        f"{path / name / 'config.json'} disagrees with the weights next to it: {problem}. The config or the weights "
        f"were edited, or they come from different models: {_FIX}"
    )


# ---------------------------------------------------------------------------------------------- checkpoint files
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 8 MiB chunks. It is remembered in ``cache_dir()/file_hashes.json`` by (absolute
    path, size, mtime), so an unchanged multi-GB checkpoint is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    record_file = cache_dir() / "file_hashes.json"
    try:
        records = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        records = {}
    records = records if isinstance(records, dict) else {}
    known = records.get(str(path))
    if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    digest = _hash_file(path)
    records = {k: v for k, v in records.items() if os.path.exists(k)}
    records[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        from .file_utils import atomic_write_text

        record_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_file, json.dumps(records, indent=1))
    except OSError as err:
        logger.warning(
            f"could not record the hash of {path.name} in {record_file} ({err}); it is hashed again next run"
        )
    return digest


def _hash_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _pipeline_from_checkpoint(path: Path, cfw: str | None, dtype):
    """An official checkpoint (+ CFW checkpoint), converted once and cached under ``converted/<content key>``."""
    from .conversion import checkpoint_name_hints, convert_stablesr_checkpoint, model_card, save_pipeline_atomically
    from .hub import official_model_of_files

    cfw_path = Path(cfw) if cfw else None
    if cfw_path is not None and not cfw_path.is_file():
        raise ModelLoadError(f"CFW checkpoint {cfw} does not exist")
    key_source = {
        "version": _CONVERSION_CACHE_VERSION,
        "checkpoint": file_sha256(path),
        "cfw": file_sha256(cfw_path) if cfw_path is not None else None,
        # The file name decides what the weights cannot (v-prediction, turbo default steps), so it is in the key.
        "name_hints": checkpoint_name_hints(path),
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:32]
    cached = cache_dir() / "converted" / key
    if cached.exists():
        try:
            pipe = _load_folder(cached, dtype)
            logger.info(f"{path.name}: using the cached conversion {cached}")
            return pipe
        except ModelLoadError as err:
            logger.warning(f"the cached conversion of {path.name} is unusable ({err}); converting it again")
    pipe, report = convert_stablesr_checkpoint(path, cfw_path)
    logger.info(f"converted {path.name}\n{report.summary()}")
    sources = {path.name: key_source["checkpoint"], **({cfw_path.name: key_source["cfw"]} if cfw_path else {})}
    official = official_model_of_files(path, cfw_path)
    origin = "Local files" + (f", named as the official {official.name} release files" if official else "")
    try:
        card = model_card(pipe, report, sources, official=official, origin=origin)
        save_pipeline_atomically(pipe, cached, overwrite=cached.exists(), card=card)
        logger.info(f"cached the converted model in {cached}")
    except FileExistsError:
        pass  # another process cached the same files meanwhile
    except OSError as err:
        logger.warning(f"could not cache the converted model in {cached} ({err}); it is converted again next run")
    # Converted (and cached) in float32, the checkpoints' own precision.
    return pipe if str(dtype) == "torch.float32" else pipe.to(dtype=dtype)


def _pipeline_from_hub(repo_id: str, dtype):
    from .hub import official_model

    official = official_model(repo_id)
    if official is not None:
        return _pipeline_from_official(official, dtype)
    from huggingface_hub import list_repo_files
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .pipelines.pipeline_stablesr import StableSRPipeline

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        files = list_repo_files(repo_id)
        if "model_index.json" not in files:
            raise ModelLoadError(f"{repo_id} is not a converted StableSR model on the Hub (no model_index.json)")
        return StableSRPipeline.from_pretrained(repo_id, dtype=dtype, use_safetensors=True)
    except (LocalEntryNotFoundError, OSError) as err:
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ModelLoadError(
            f"cannot fetch {repo_id} from the Hugging Face Hub{hint}: {err}. Connect to the internet once, or pass "
            "--model with a converted folder or the official .ckpt files (`stablesr convert` makes the folder)"
        ) from None


def _pipeline_from_official(official, dtype):
    """An official model by name (a `stablesr.hub.OfficialModel`): its two files fetched into the Hugging Face cache
    and checked, converted once and cached as ``converted/<name>`` with a model card."""
    from . import conversion
    from .hub import OfficialFileError, fetch_official_file

    cached = cache_dir() / "converted" / official.name
    if cached.exists():
        try:
            return _load_folder(cached, dtype)
        except ModelLoadError as err:
            logger.warning(f"the cached conversion of {official.name} is unusable ({err}); converting it again")
    logger.info(f"{official.name}: fetching {' and '.join(official.files)} from {official.repo_id} (once; about "
                f"{official.download_gb} GB), then converting them (once)")
    try:
        (ckpt, ckpt_sha), (cfw, cfw_sha) = [fetch_official_file(official, f, sha256=file_sha256) for f in official.files]
    except OfficialFileError as err:
        raise ModelLoadError(str(err)) from None
    pipe, report = conversion.convert_stablesr_checkpoint(
        ckpt, cfw, prediction_type=official.prediction_type, default_num_inference_steps=official.default_steps
    )
    report.prediction_type_source = f"the official {official.name} settings in stablesr.hub"
    logger.info(f"converted {official.name}\n{report.summary()}")
    sources = {official.checkpoint: ckpt_sha or file_sha256(ckpt), official.cfw: cfw_sha or file_sha256(cfw)}
    origin = (f"Downloaded from the Hub repository {official.repo_id}, content checked against the SHA-256 names of "
              "the Hugging Face cache")
    try:
        card = conversion.model_card(pipe, report, sources, official=official, origin=origin)
        conversion.save_pipeline_atomically(pipe, cached, overwrite=cached.exists(), card=card)
        logger.info(f"cached the converted {official.name} in {cached}")
    except FileExistsError:
        pass  # another process cached it meanwhile
    except OSError as err:
        logger.warning(f"could not cache the converted {official.name} in {cached} ({err}); it is converted again "
                       "next run")
        return pipe if str(dtype) == "torch.float32" else pipe.to(dtype=dtype)
    del pipe  # load the published folder: what every later run loads
    return _load_folder(cached, dtype)


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
