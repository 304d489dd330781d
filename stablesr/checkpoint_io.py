"""Loading checkpoint files without ever executing code from them.

Official StableSR checkpoints are PyTorch Lightning pickles. They are first opened with ``torch.load(weights_only=True)``.
Real Lightning files also carry training state that ``weights_only`` refuses (callback objects keyed by their class,
``argparse.Namespace`` hyper-parameters, numpy scalars). For those we fall back to a restricted unpickler that resolves
only tensor-rebuild functions and turns references into known training-framework namespaces into inert placeholders
that are never imported or called. Any other global (``os.system``, ``builtins.eval``, ``subprocess``...) is refused.
"""

import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from types import ModuleType

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file, the problem and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks to import something that could execute code; it is refused."""


# Globals resolved for real: only what rebuilds tensors and plain containers.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
# Namespaces whose objects only describe training state; they become inert placeholders (never imported).
_INERT_NAMESPACES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "argparse", "pathlib")


class _Inert:
    """Stands in for an object of a training framework; records what it was and ignores its state."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state

    def __reduce__(self):  # never re-pickled into something executable
        raise TypeError(f"placeholder for {self._qualname} cannot be pickled")

    def __repr__(self):
        return f"<inert {self._qualname}>"


def _inert_class(qualname: str) -> type:
    return type(f"Inert[{qualname}]", (_Inert,), {"_qualname": qualname})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _INERT_NAMESPACES:
            return _inert_class(f"{module}.{name}")
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint references {module}.{name}, which could execute code. Only tensors "
            "and training-framework metadata are accepted; if this file is really an official StableSR checkpoint, "
            "re-save its state_dict with safetensors"
        )


# torch.load takes a pickle *module*; this one offers our Unpickler under the attribute names torch uses.
_restricted_pickle = ModuleType("stablesr_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.UnpicklingError = pickle.UnpicklingError


def _torch_load(path: Path, weights_only: bool):
    kwargs = {"map_location": "cpu"}
    if weights_only:
        kwargs["weights_only"] = True
    else:
        kwargs.update(weights_only=False, pickle_module=_restricted_pickle)
    if zipfile.is_zipfile(path):
        # mmap keeps multi-GB official files out of RAM until a tensor is touched.
        return torch.load(path, mmap=True, **kwargs)
    return torch.load(path, **kwargs)


# safetensors refuses headers above 100 MB; a larger length field means a corrupt file or another format.
SAFETENSORS_MAX_HEADER = 100_000_000
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The JSON header of a ``.safetensors`` file, checked against the file without reading any tensor.

    Returns ``{tensor name: {"dtype", "shape", "data_offsets"}}`` plus ``"__metadata__"`` when the file has it.

    Raises:
        [`CheckpointError`]: one line naming the file and what is wrong: a pickle or zip (``torch.save``) file under a
            safetensors name, a length field larger than the file or than 100 MB, a header that is not JSON, tensor
            sizes that do not match their shapes, or a file shorter (truncated) or longer than its header says.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            kind = "zip (torch.save)" if head.startswith(b"PK") else "Python pickle"
            raise CheckpointError(
                f"{path} is a {kind} file, not safetensors (it was not opened: pickles can run code)"
            )
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, shorter than a safetensors header)")
        length = int.from_bytes(head, "little")
        if length > SAFETENSORS_MAX_HEADER or 8 + length > size:
            raise CheckpointError(
                f"{path} is corrupt or truncated: its header length field says {length} bytes but the file has "
                f"{size} bytes"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            itemsize = _SAFETENSORS_ITEMSIZE.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt: malformed header entry for tensor {name!r}") from None
        if itemsize is not None and stop - begin != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} has {stop - begin} bytes for shape {shape}")
        end = max(end, stop)
    data = size - 8 - length
    if end != data:
        problem = "truncated" if end > data else "corrupt"
        raise CheckpointError(
            f"{path} is {problem}: its header describes {8 + length + end} bytes but the file has {size}"
        )
    return header


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a checkpoint's tensors safely.

    Args:
        path: a ``.ckpt``/``.pt``/``.pth`` (PyTorch or Lightning) or ``.safetensors`` file.

    Returns:
        ``(state_dict, other_entries)``: the flat tensor dict (the Lightning ``state_dict`` entry when present) and
        the names of top-level entries that were not used (``global_step``, ``optimizer_states``...).
    """
    state_dict, others = load_checkpoint_with_extras(path)
    return state_dict, sorted(others)


def load_checkpoint_with_extras(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """[`load_checkpoint`], with the non-weight entries themselves instead of their names.

    Returns:
        ``(state_dict, extras)``: ``extras`` holds the other top-level entries of a PyTorch/Lightning file
        (``hyper_parameters``, ``global_step``...; objects of training frameworks are inert placeholders whose
        pickled state is in their ``_state`` attribute), or ``{"__metadata__": {...}}`` for a safetensors file
        with metadata.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again")

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            metadata = safetensors_header(path).get("__metadata__")
        except CheckpointError as err:
            raise CheckpointError(f"{err}; fetch it again") from None
        try:
            return load_file(str(path)), ({"__metadata__": metadata} if metadata else {})
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); fetch it again") from err

    try:
        try:
            obj = _torch_load(path, weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" not in str(err) and "global" not in str(err).lower():
                raise
            logger.info(f"{path.name}: contains non-tensor training state; reading it with the restricted unpickler")
            obj = _torch_load(path, weights_only=False)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(err).__name__}: {err}). The file is probably "
            "truncated or corrupt; download it again and compare its size with the published one"
        ) from err

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict = obj["state_dict"]
        others = {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, others = obj, {}
    else:
        raise CheckpointError(f"{path} holds no state_dict of tensors; is it a StableSR checkpoint?")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:10]}")
    return dict(state_dict), others
