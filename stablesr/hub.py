"""The official StableSR models by short name, and the Hugging Face cache their files are downloaded into.

The official release (Hub repo ``Iceclear/StableSR``, S-Lab License 1.0, non-commercial) is three pickled Lightning
diffusion checkpoints, each used with the same CFW autoencoder checkpoint. [`OFFICIAL_MODELS`] names them
(``stablesr-512``, ``stablesr-768v``, ``stablesr-turbo``) with what the files themselves cannot tell: the prediction
type, the native size and the default number of steps.

Files are fetched with ``huggingface_hub.hf_hub_download`` into the normal Hugging Face cache, whose location
([`hf_hub_cache`]) and offline switch ([`hub_offline`]) are read from the environment at call time. An LFS file's
blob in that cache is named by the SHA-256 of its content, so [`fetch_official_file`] checks every downloaded
checkpoint against its blob name; a corrupt blob is deleted and downloaded once more. Everything a user can fix is
raised as [`OfficialFileError`] whose message names the file, what is wrong and the fix.

This module knows the Hub and its cache only; converting and loading are `stablesr.loading`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffusers.utils import logging
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError

logger = logging.get_logger(__name__)

__all__ = [
    "ALIASES",
    "CFW_FILE",
    "CFW_GB",
    "LICENSE_ID",
    "LICENSE_LINK",
    "LICENSE_NAME",
    "OFFICIAL_MODELS",
    "OFFICIAL_REPO",
    "OfficialFileError",
    "OfficialModel",
    "cached_file",
    "download_command",
    "fetch_official_file",
    "hf_hub_cache",
    "hub_offline",
    "official_model",
    "official_model_of_files",
    "partial_downloads",
    "sha256_of",
]

OFFICIAL_REPO = "Iceclear/StableSR"
CFW_FILE = "vqgan_cfw_00011.ckpt"
CFW_GB = 0.96
LICENSE_NAME = "S-Lab License 1.0"
LICENSE_ID = "s-lab-license-1.0"
LICENSE_LINK = "https://github.com/IceClear/StableSR/blob/main/LICENSE.txt"
LICENSE_SHORT = f"{LICENSE_NAME} (non-commercial)"
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 8 * 1024 * 1024


class OfficialFileError(ValueError):
    """An official file cannot be fetched or is corrupt; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class OfficialModel:
    """One official StableSR model: where its files are and what they do not say about themselves.

    Args:
        name: the short name ``--model`` takes.
        repo_id: the Hub repository of the files.
        checkpoint: the diffusion checkpoint (UNet + time-aware encoder + SFT + VAE + text encoder).
        cfw: the CFW autoencoder checkpoint (the same file for every official model).
        prediction_type: "epsilon" or "v_prediction" (the weights cannot tell).
        native_size: the pixel size the UNet was trained at (the aggregation tile).
        default_steps: sampling steps when the caller gives none.
        checkpoint_gb: approximate size of ``checkpoint`` in GB (10^9 bytes).
        sd_base: the Stable Diffusion model it was built on.
        description: one line: what it is for.
    """

    name: str
    repo_id: str
    checkpoint: str
    cfw: str
    prediction_type: str
    native_size: int
    default_steps: int
    checkpoint_gb: float
    sd_base: str
    description: str
    license: str = LICENSE_SHORT

    @property
    def files(self) -> tuple[str, str]:
        return self.checkpoint, self.cfw

    @property
    def download_gb(self) -> float:
        """Both files, approximately, in GB (the CFW file is shared: it is downloaded once for all models)."""
        return round(self.checkpoint_gb + CFW_GB, 2)


OFFICIAL_MODELS: dict[str, OfficialModel] = {
    model.name: model
    for model in (
        OfficialModel(
            name="stablesr-turbo",
            repo_id=OFFICIAL_REPO,
            checkpoint="stablesr_turbo.ckpt",
            cfw=CFW_FILE,
            prediction_type="epsilon",
            native_size=512,
            default_steps=4,
            checkpoint_gb=6.48,
            sd_base="stabilityai/sd-turbo",
            description="the 512 model's encoder and SFT on SD-Turbo: 4 steps instead of 200, the fast default",
        ),
        OfficialModel(
            name="stablesr-512",
            repo_id=OFFICIAL_REPO,
            checkpoint="stablesr_000117.ckpt",
            cfw=CFW_FILE,
            prediction_type="epsilon",
            native_size=512,
            default_steps=200,
            checkpoint_gb=6.48,
            sd_base="stabilityai/stable-diffusion-2-1-base",
            description="the paper's model (SD 2.1-base, 200 steps): the published results, 50x the steps of turbo",
        ),
        OfficialModel(
            name="stablesr-768v",
            repo_id=OFFICIAL_REPO,
            checkpoint="stablesr_768v_000139.ckpt",
            cfw=CFW_FILE,
            prediction_type="v_prediction",
            native_size=768,
            default_steps=200,
            checkpoint_gb=6.48,
            sd_base="stabilityai/stable-diffusion-2-1",
            description="SD 2.1-768 v-prediction, 200 steps on 768 px tiles: larger outputs, more memory and time",
        ),
    )
}
# Other names that keep working: the Hub id the first releases of stablesr took meant the 512 model.
ALIASES = {OFFICIAL_REPO: "stablesr-512"}


def official_model(name: str) -> OfficialModel | None:
    """The official model a short name (or an alias such as ``Iceclear/StableSR``) stands for, else None."""
    return OFFICIAL_MODELS.get(ALIASES.get(name, name))


def official_model_of_files(checkpoint: str | os.PathLike, cfw: str | os.PathLike | None) -> OfficialModel | None:
    """The official model whose file NAMES these are (the CFW file, when given, must be the official one too).

    Names only: a renamed or fine-tuned file goes unrecognised, and a file given an official name is taken for it.
    """
    if cfw is not None and Path(cfw).name != CFW_FILE:
        return None
    return next((m for m in OFFICIAL_MODELS.values() if m.checkpoint == Path(checkpoint).name), None)


# ------------------------------------------------------------------------------------------ the Hugging Face cache
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_hub_cache() -> Path:
    """The Hugging Face Hub cache folder, from the environment NOW: ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``,
    ``$HF_HOME/hub``, else huggingface_hub's default (which it read when it was imported)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether Hub downloads are off: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now or at import."""
    from huggingface_hub import constants

    env = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def _repo_folder(repo_id: str) -> Path:
    return hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"


def cached_file(repo_id: str, filename: str) -> Path | None:
    """The complete cached copy of ``filename`` (its snapshot path), or None; never touches the network."""
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_hub_cache()))
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found)
    return None


def partial_downloads(repo_id: str) -> list[Path]:
    """Interrupted downloads of ``repo_id`` in the cache (``blobs/*.incomplete``: resumed by the next download)."""
    blobs = _repo_folder(repo_id) / "blobs"
    return sorted(blobs.glob("*.incomplete")) if blobs.is_dir() else []


def download_command(model: OfficialModel) -> str:
    """The shell command that puts ``model``'s files in the cache (``huggingface-cli download`` before hub 0.34)."""
    return f"hf download {model.repo_id} {' '.join(model.files)}"


def _how_to_fix(model: OfficialModel) -> str:
    return (
        f"connect to the internet once and rerun (an interrupted download resumes), or download the files with "
        f"`{download_command(model)}`, or pass the files themselves: --model path/to/{model.checkpoint} "
        f"--cfw path/to/{model.cfw}"
    )


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 8 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _download(model: OfficialModel, filename: str, *, force: bool) -> Path:
    offline = hub_offline()
    try:
        return Path(
            hf_hub_download(
                model.repo_id,
                filename,
                cache_dir=str(hf_hub_cache()),
                local_files_only=offline,
                force_download=force,
            )
        )
    except (OSError, ValueError, EntryNotFoundError) as err:  # not cached offline, HTTP or connection error, full disk
        partial = partial_downloads(model.repo_id)
        if partial:
            done = ", ".join(f"{p.name} ({p.stat().st_size / 1e9:.2f} GB)" for p in partial)
            state = f"only a partial download is in the cache ({done} in {partial[0].parent})"
        else:
            state = f"it is not in the Hugging Face cache ({hf_hub_cache()})"
        why = "HF_HUB_OFFLINE is set" if offline else f"the download failed: {type(err).__name__}: {_first_line(err)}"
        raise OfficialFileError(
            f"{model.name} needs {filename} from {model.repo_id} (about {_file_gb(model, filename):.2f} GB): {state} "
            f"and {why}. To fix: {_how_to_fix(model)}"
        ) from None


def _file_gb(model: OfficialModel, filename: str) -> float:
    return model.checkpoint_gb if filename == model.checkpoint else CFW_GB


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _blob_of(path: Path) -> tuple[Path, str | None]:
    """The blob a snapshot path points at, and the SHA-256 its name states (None when the name is not one: non-LFS
    files are named by their git hash, and caches without symlinks hold copies)."""
    blob = path.resolve()
    return blob, blob.name if _SHA256_NAME.fullmatch(blob.name) else None


def _remove_cached(path: Path, blob: Path) -> None:
    for item in (path, blob):
        try:
            item.unlink()
        except FileNotFoundError:
            pass


def fetch_official_file(
    model: OfficialModel, filename: str, *, sha256: Callable[[Path], str] = sha256_of
) -> tuple[Path, str | None]:
    """Download ``filename`` of ``model`` once (the Hugging Face cache) and check its content; returns the local path
    and its SHA-256 (None where the cache does not name blobs by content).

    A blob whose content does not match its name is deleted with its snapshot link and downloaded once more
    (``force_download``); offline it is deleted and the error says to reconnect.

    Args:
        model: the official model the file belongs to (for the messages).
        filename: ``model.checkpoint`` or ``model.cfw``.
        sha256: the hash function (`stablesr.loading.file_sha256` remembers the hashes of unchanged files).

    Raises:
        [`OfficialFileError`]: the file is missing or partial and cannot be downloaded now, or is still corrupt after
            downloading it again; the message names the file, the expected and actual SHA-256 and the fix.
    """
    path = _download(model, filename, force=False)
    blob, expected = _blob_of(path)
    if expected is None:
        logger.info(f"{filename}: the cache does not name {blob} by its SHA-256; its content is not checked")
        return path, None
    actual = sha256(blob)
    if actual == expected:
        return path, actual
    _remove_cached(path, blob)
    corrupt = (
        f"{filename} of {model.name} in the Hugging Face cache is corrupt: {blob} should have SHA-256 {expected} "
        f"(the content hash its name states) but has {actual}"
    )
    if hub_offline():
        raise OfficialFileError(f"{corrupt}. The bad copy was deleted; to fix: {_how_to_fix(model)}")
    logger.warning(f"{corrupt}; deleted it, downloading it again")
    path = _download(model, filename, force=True)
    blob, expected = _blob_of(path)
    actual = sha256(blob) if expected is not None else None
    if expected is not None and actual != expected:
        _remove_cached(path, blob)
        raise OfficialFileError(
            f"{filename} of {model.name} is still corrupt after downloading it again: {blob} should have SHA-256 "
            f"{expected} but has {actual} (deleted). The disk, a proxy or the connection damages it: check free space "
            f"and the disk, then rerun, or download it elsewhere and pass --model path/to/{model.checkpoint} "
            f"--cfw path/to/{model.cfw}"
        )
    return path, actual
