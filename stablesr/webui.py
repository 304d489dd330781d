"""``stablesr ui``: a local Gradio web app for StableSR.

Upload a photo, pick the upscale, steps, scheduler, colour fix, seed and tiling, and restore it; the result is shown
in a before/after slider with a PNG download. The sampled latents are kept per browser session, so moving the
**fidelity** slider (or changing the colour fix) only decodes them again (one CFW decode) and never samples again.

Gradio is an optional extra (``pip install 'stablesr[ui]'``); it is imported only when the app is built. The app is
meant to run locally (``127.0.0.1`` by default). Memory stays bounded by these limits: uploads above
``max_file_size`` bytes or ``max_upload_pixels`` pixels are refused before any pixel is decoded (the size is read from
the file header), results above ``max_output_pixels`` are refused with an error naming the limit and the fix, at most
``concurrency_limit`` jobs run at once, at most ``max_queue`` wait (more are refused as "queue full"), and the latents
of at most ``max_sessions`` sessions are cached (the least recently used is dropped first). The pipeline itself is used
by one job at a time (its SFT and CFW adapters hold per-call state), guarded by a lock per pipeline.

Files: each app has one private folder inside Gradio's upload folder, holding this app's uploads and one folder per
session with an unguessable name (192 random bits) for its PNGs; Gradio serves them in place, without copies, and a
session's folder is deleted when its cache entry is dropped. Served through `launch_app`, the app answers file
requests only for paths inside that folder (anything else, ``/etc/passwd`` included, gets 404) and refuses request
bodies larger than an upload may be.

Python use::

    from stablesr.loading import load_pipeline
    from stablesr.webui import build_app, launch_app

    demo = build_app(load_pipeline("path/to/converted"), max_upload_pixels=1024 * 1024)
    launch_app(demo, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import dataclasses
import io
import logging
import math
import os
import random
import re
import secrets
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .color import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX
from .schedulers import DEFAULT_SCHEDULER, SCHEDULER_LABELS, SCHEDULERS

logger = logging.getLogger("stablesr.webui")

GRADIO_REQUIREMENT = "gradio>=6,<7"
INSTALL_HINT = (
    "the web UI needs Gradio, an optional extra of stablesr: pip install 'stablesr[ui]' "
    f"(or: pip install '{GRADIO_REQUIREMENT}')"
)
DEFAULT_MAX_UPLOAD_PIXELS = 2048 * 2048
DEFAULT_MAX_OUTPUT_PIXELS = 4096 * 4096
DEFAULT_MAX_QUEUE = 16
MAX_UI_UPSCALE = 4.0  # one sampling pass, so the fidelity slider can re-decode its latents
MAX_UI_STEPS = 1000
DEFAULT_MAX_FILE_SIZE = "50mb"
DEFAULT_MAX_SESSIONS = 8
SESSION_TTL_S = 2 * 3600  # a session's cached latents and files are dropped this long after its last update
SESSION_TOKEN_BYTES = 24  # a session folder's name: 192 random bits, URL-safe

# (label, value) for the scheduler dropdown; values as in `stablesr restore --scheduler`.
SCHEDULER_CHOICES = [(SCHEDULER_LABELS[name], name) for name in SCHEDULERS]
COLOR_FIX_CHOICES = list(COLOR_FIX_METHODS)


# ----------------------------------------------------------------------------------------------------------- counters
@dataclass
class UIStats:
    """Work done by an app (``demo.stablesr_stats``) or by every app of this process (``webui.STATS``).

    ``sampling_runs`` counts pipeline sampling calls (the expensive part), ``decode_runs`` counts CFW decodes (one
    after each sampling, plus one per fidelity / colour-fix change). Times are wall-clock seconds of the last call.
    """

    sampling_runs: int = 0
    decode_runs: int = 0
    rejected: int = 0
    last_sampling_s: float = math.nan
    last_decode_s: float = math.nan
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, kind: str, seconds: float | None = None) -> None:
        with self._lock:
            if kind == "sampling":
                self.sampling_runs += 1
                if seconds is not None:
                    self.last_sampling_s = seconds
            elif kind == "decode":
                self.decode_runs += 1
                if seconds is not None:
                    self.last_decode_s = seconds
            elif kind == "rejected":
                self.rejected += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "sampling_runs": self.sampling_runs,
                "decode_runs": self.decode_runs,
                "rejected": self.rejected,
                "last_sampling_s": self.last_sampling_s,
                "last_decode_s": self.last_decode_s,
            }


STATS = UIStats()  # totals over every app built in this process

# One lock and one set of scheduler instances per pipeline object, shared by every app built on it.
_PIPE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PIPE_SCHEDULERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _pipe_lock(pipe) -> threading.Lock:
    with _REGISTRY_LOCK:
        lock = _PIPE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPE_LOCKS[pipe] = threading.Lock()
        return lock


def _scheduler(pipe, name: str):
    """The scheduler ``name`` for ``pipe``, built once from the pipeline's original scheduler config.

    (The pipeline passes ``generator=`` to ``step`` only when the scheduler takes it, so UniPC needs no wrapper.)
    """
    from .schedulers import StableSRDDPMScheduler, scheduler_from_name

    with _REGISTRY_LOCK:
        cache = _PIPE_SCHEDULERS.get(pipe)
        if cache is None:
            original = pipe.scheduler
            cache = _PIPE_SCHEDULERS[pipe] = {"_config": original.config}
            if isinstance(original, StableSRDDPMScheduler):
                cache["ddpm"] = original
        if name not in cache:
            cache[name] = scheduler_from_name(name, cache["_config"])
        return cache[name]


# --------------------------------------------------------------------------------------------------------- limits
def _mp(pixels: float) -> str:
    return f"{pixels / 1e6:.2g} MP" if pixels < 1e6 else f"{pixels / 1e6:.1f} MP"


def check_upload_size(width: int, height: int, max_upload_pixels: int) -> None:
    """Raise ValueError (message names the limit and the fix) when an upload has too many pixels."""
    pixels = width * height
    if pixels <= max_upload_pixels:
        return
    shrink = math.sqrt(max_upload_pixels / pixels)
    fit_w, fit_h = max(1, math.floor(width * shrink)), max(1, math.floor(height * shrink))
    raise ValueError(
        f"The image is {width}×{height} = {pixels:,} pixels ({_mp(pixels)}); this server accepts uploads of at most "
        f"{max_upload_pixels:,} pixels ({_mp(max_upload_pixels)}). Downscale it (e.g. to {fit_w}×{fit_h}) or crop it, "
        f"or restart the server with: stablesr ui --max-upload-pixels {pixels}."
    )


def check_output_size(pipe, width: int, height: int, upscale: float, max_output_pixels: int) -> tuple[int, int]:
    """Raise ValueError when the result (or the canvas sampled for it) would exceed ``max_output_pixels``."""
    canvas = pipe.working_canvas(height, width, upscale)  # the pipeline's own arithmetic (bounded for thin images)
    (out_h, out_w), (canvas_h, canvas_w) = canvas.output_size, canvas.padded_size
    if out_w * out_h > max_output_pixels:
        best = math.sqrt(max_output_pixels / (width * height))
        raise ValueError(
            f"Upscaling {width}×{height} by ×{upscale:g} gives {out_w}×{out_h} = {_mp(out_w * out_h)}, more than this "
            f"server's output limit of {max_output_pixels:,} pixels ({_mp(max_output_pixels)}). Lower the upscale to "
            f"×{math.floor(best * 100) / 100:g} or less, upload a smaller image, or restart the server with: "
            f"stablesr ui --max-output-pixels {out_w * out_h}."
        )
    if canvas.area > max_output_pixels:
        raise ValueError(
            f"The image is sampled on a {canvas_w}×{canvas_h} canvas ({_mp(canvas.area)}: small or thin images are "
            f"scaled and padded to the model's native {pipe.native_size} px), more than this server's limit of "
            f"{_mp(max_output_pixels)}. Upload a larger or less elongated image, or restart the server with: "
            f"stablesr ui --max-output-pixels {canvas.area}."
        )
    return out_w, out_h


_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}  # as Gradio reads max_file_size


def parse_file_size(size: str | int | None) -> int | None:
    """Bytes from a size such as ``"50mb"`` (units b, kb, mb, gb, tb of 1024; Gradio's reading), an int, or None."""
    if size is None or isinstance(size, int):
        if size is not None and size < 1:
            raise ValueError(f"max_file_size must be a positive number of bytes, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).lower() if match else ""
    if not match or (unit or "b") not in _SIZE_UNITS or int(match.group(1)) < 1:
        raise ValueError(f"max_file_size must be a positive size such as 50mb or 500kb, got {size!r}")
    return int(match.group(1)) * _SIZE_UNITS[unit or "b"]


def _format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def check_file_bytes(n_bytes: int, max_file_size: int | None) -> None:
    """Raise ValueError (message names the limit and the fix) when an upload has more bytes than allowed."""
    if max_file_size is None or n_bytes <= max_file_size:
        return
    raise ValueError(
        f"The file is {_format_bytes(n_bytes)} ({n_bytes:,} bytes); this server accepts uploads of at most "
        f"{_format_bytes(max_file_size)} ({max_file_size:,} bytes). Save it smaller (PNG or JPEG, fewer pixels), "
        f"or restart the server with: stablesr ui --max-file-size {math.ceil(n_bytes / 1024)}kb."
    )


def probe_image(path) -> tuple[int, int]:
    """(width, height) from the header of a file (a path or a binary file object), without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as err:
        raise ValueError(f"The image is far too large to process ({err}). Downscale it before uploading.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(
            f"The upload is not an image this server can read ({type(err).__name__}). Upload a PNG, JPEG, WebP, TIFF "
            "or BMP file."
        ) from None


# --------------------------------------------------------------------------------------------------------- session
@dataclass
class _Session:
    """What one browser session keeps between events: enough to decode again without sampling, and its own folder."""

    latents: Any  # torch.Tensor on the CPU; None once dropped from the cache
    condition: Any  # RestorationCondition, tensors on the CPU; None once dropped
    folder: Path  # this session's PNGs; its name is the only way to reach them
    before_path: str
    stem: str
    upscale: float
    info: str
    after_path: str | None = None

    @property
    def cached(self) -> bool:
        return self.latents is not None

    def drop(self) -> None:
        """Forget the latents and delete the session's folder (and so every URL it handed out)."""
        self.latents = self.condition = None
        shutil.rmtree(self.folder, ignore_errors=True)


class _SessionCache:
    """The sessions whose latents an app keeps: at most ``capacity``, the least recently used dropped first.

    Gradio keeps each browser session's ``gr.State`` (up to 10,000 sessions, for ``SESSION_TTL_S``); the heavy part
    (latents, the CFW condition, the PNGs) lives here instead, so a flood of sessions cannot grow memory or disk.
    """

    def __init__(self, folder: Path, capacity: int):
        self.folder = folder
        self.capacity = capacity
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        path = self.folder / secrets.token_urlsafe(SESSION_TOKEN_BYTES)
        path.mkdir(mode=0o700)
        return path

    def add(self, session: _Session) -> None:
        with self._lock:
            self._sessions[str(session.folder)] = session
            evicted = []
            while len(self._sessions) > self.capacity:
                evicted.append(self._sessions.popitem(last=False)[1])
        for old in evicted:
            old.drop()

    def touch(self, session: _Session) -> None:
        with self._lock:
            if str(session.folder) in self._sessions:
                self._sessions.move_to_end(str(session.folder))

    def drop(self, session: Any) -> None:
        if isinstance(session, _Session):
            with self._lock:
                self._sessions.pop(str(session.folder), None)
            session.drop()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def _safe_stem(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._") or "image"
    return stem[:60]


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks resolved, relative to the working directory) is ``folder`` or lies inside it."""
    real, base = os.path.realpath(os.path.abspath(path)), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _prune_uploads(root: Path, keep: Path, max_age_s: float) -> None:
    """Delete the upload folders under ``root`` (not ``keep``) whose files are all older than ``max_age_s``."""
    cutoff = time.time() - max_age_s
    for folder in root.iterdir():
        try:
            if folder == keep or not folder.is_dir():
                continue
            if all(p.stat().st_mtime < cutoff for p in folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------------- serving
_FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
_REFUSED_ROUTES = ("/gradio_api/proxy=", "/proxy=")  # fetching other servers' files: this app never needs it


class _OwnFilesOnly:
    """ASGI middleware: file routes answer only for paths inside the app's folder; request bodies are capped.

    Gradio alone serves any file in its (shared, long-lived) upload folder, its examples cache under the working
    directory, and remote URLs fetched on the caller's behalf. This app needs none of that, so such requests get 404
    before Gradio sees them. Bodies above ``max_body`` bytes (no upload or API call of this app needs more) get 413
    before they are read, so a huge base64 image in a JSON call is refused before it is parsed or decoded.
    """

    def __init__(self, app, root: str, max_body: int | None):
        self.app = app
        self.root = os.path.realpath(root)
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        prefix = scope.get("root_path") or ""
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        if path.startswith(_REFUSED_ROUTES):
            return await _reply(send, 404, "Not found")
        for route in _FILE_ROUTES:
            if path.startswith(route):
                target = path[len(route):]
                if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or not _inside(target, self.root):
                    return await _reply(send, 404, "Not found")
                break
        if self.max_body is None or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"Request body too large (this server accepts at most "
                                           f"{self.max_body:,} bytes).")
        received = 0
        started = False

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, 413, "Request body too large.")


class _BodyTooLarge(Exception):
    pass


class _Expired(Exception):
    """The session's latents were dropped from the cache (see `_SessionCache`)."""


async def _reply(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------------- the app
def _theme(gr):
    """The default theme with system fonts: the page then needs nothing from the internet (Google Fonts)."""
    sans = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "Consolas", "monospace"]
    try:
        return gr.themes.Default(font=sans, font_mono=mono)
    except Exception:  # pragma: no cover - very old / unusual gradio builds
        return None


CSS = """
#status { min-height: 2.5em; }
"""


def build_app(
    pipe,
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    concurrency_limit: int = 1,
    max_queue: int = DEFAULT_MAX_QUEUE,
    *,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    max_file_size: str | int | None = DEFAULT_MAX_FILE_SIZE,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    default_steps: int | None = None,
    default_upscale: float = 4.0,
    title: str = "StableSR",
):
    """Build the Gradio app around a loaded `StableSRPipeline` (queue configured; call `launch_app` to serve it).

    Args:
        pipe: the pipeline (any device / dtype). Model calls are serialised with a lock per pipeline.
        max_upload_pixels: refuse uploads with more pixels (width × height, read from the file header before any pixel
            is decoded), with an error naming the limit and fix.
        concurrency_limit: jobs processed at once per event (the queue's ``default_concurrency_limit``).
        max_queue: jobs allowed to wait; more are refused ("queue full") instead of piling up in memory.
        max_output_pixels: refuse jobs whose result (or sampled canvas) would have more pixels.
        max_file_size: refuse uploads with more bytes (``"50mb"``, ``"500kb"`` or an int; None: no limit), checked on
            every input before it is opened; `launch_app` also gives it to Gradio's upload route.
        max_sessions: sessions whose latents (and PNGs) are kept for re-decoding; the least recently used beyond this
            is dropped (its page then asks for **Restore** again).
        default_steps: initial value of the steps slider (default: the pipeline's, 200 official / 4 turbo).
        default_upscale: initial value of the upscale slider.

    Returns:
        ``gradio.Blocks`` with ``stablesr_stats`` (a [`UIStats`]), ``stablesr_tmpdir`` (the app's private folder) and
        ``stablesr_limits`` attributes.
    """
    try:
        import gradio as gr
        from gradio.utils import get_upload_folder
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    import torch
    from PIL import Image

    from .image_io import ImageLoadError, load_image, save_image

    if max_upload_pixels < 1 or max_output_pixels < 1:
        raise ValueError("max_upload_pixels and max_output_pixels must be positive")
    if concurrency_limit < 1 or max_queue < 1:
        raise ValueError("concurrency_limit and max_queue must be >= 1")
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    max_bytes = parse_file_size(max_file_size)

    stats = UIStats()
    lock = _pipe_lock(pipe)
    _scheduler(pipe, "ddpm")  # remember the original scheduler config before any swap
    pipe.set_progress_bar_config(disable=True)
    # Inside Gradio's upload folder, so Gradio accepts and serves these files in place instead of copying them.
    gradio_folder = Path(get_upload_folder())
    gradio_folder.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix="stablesr-ui-", dir=gradio_folder)).resolve()  # mode 0700
    atexit.register(shutil.rmtree, tmpdir, True)
    sessions = _SessionCache(tmpdir / "sessions", max_sessions)
    sessions.folder.mkdir(mode=0o700)
    native_tile = pipe.default_tile_size
    steps_default = int(default_steps or pipe.config.default_num_inference_steps)
    has_slider = hasattr(gr, "ImageSlider")

    def record(kind: str, seconds: float | None = None) -> None:
        stats.record(kind, seconds)
        STATS.record(kind, seconds)

    def fail(message: str, title: str = "Error"):
        record("rejected")
        return gr.Error(message, title=title, print_exception=False)

    def result_value(before: str, after: str):
        return [(before, after)] if has_slider else [before, after]

    def skip_outputs(n: int):
        return [gr.skip() for _ in range(n)]

    def check_input_file(path: str) -> tuple[int, int]:
        """Bytes, then pixels from the header: (width, height), or ValueError. Nothing is decoded."""
        if _inside(path, sessions.folder):
            raise ValueError("That file is a result of this server, not an upload. Upload an image file.")
        try:
            n_bytes = os.stat(path).st_size
        except OSError:
            raise ValueError("The upload is gone from the server (it keeps uploads for a while only); upload it "
                             "again.") from None
        check_file_bytes(n_bytes, max_bytes)
        width, height = probe_image(path)
        check_upload_size(width, height, max_upload_pixels)
        return width, height

    def check_data_url(url: str) -> None:
        """The same checks for an image sent inline as a ``data:`` URL (API calls): length first, then the header."""
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("An inline image must be a base64 data: URL (data:image/png;base64,...).")
        check_file_bytes(len(payload) * 3 // 4, max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("The inline image is not valid base64.") from None
        width, height = probe_image(io.BytesIO(data))
        check_upload_size(width, height, max_upload_pixels)

    def guarded_preprocess(original):
        """Wrap the input's preprocess: Gradio decodes an inline image fully before any handler runs."""

        def preprocess(payload):
            if payload is not None:
                try:
                    if (payload.url or "").startswith("data:"):
                        check_data_url(payload.url)
                    elif payload.path:
                        check_input_file(payload.path)
                except ValueError as err:
                    raise fail(str(err), "Image not accepted") from None
            return original(payload)

        return preprocess

    def decode(session: _Session, fidelity: float, color_fix: str) -> tuple[str, float]:
        """Decode the session's latents at ``fidelity`` (under the pipeline lock), save the PNG, return its path."""
        latents, condition = session.latents, session.condition
        if latents is None:
            raise _Expired
        t0 = time.perf_counter()
        with lock:
            image = pipe.decode_latents(latents, condition, float(fidelity), color_fix)
        seconds = time.perf_counter() - t0
        record("decode", seconds)
        name = f"{session.stem}_x{session.upscale:g}_w{float(fidelity):.2f}_{secrets.token_hex(4)}.png"
        path = session.folder / name
        try:
            save_image(image, path, overwrite=True)
        except OSError:
            if not session.cached:  # dropped meanwhile, folder and all
                raise _Expired from None
            raise
        return str(path), seconds

    def on_upload(path):
        if not path:
            return gr.skip()
        try:
            width, height = check_input_file(path)
        except ValueError as err:
            raise fail(str(err), "Image not accepted") from None
        return f"Uploaded {width}×{height}. Choose the settings and press **Restore**."

    def restore(path, upscale, steps, scheduler, color_fix, fidelity, seed, tile_size, tile_overlap, session,
                progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
        if not path:
            raise fail("Upload an image first (drop a file on the input, or click it to browse).", "No image")
        try:
            upscale, steps = float(upscale), int(steps)
            if not (math.isfinite(upscale) and 1 <= upscale <= MAX_UI_UPSCALE):
                raise ValueError(f"upscale must be between 1 and {MAX_UI_UPSCALE:g} in the web UI (one pass), got "
                                 f"{upscale:g}; for larger factors use: stablesr restore --upscale 8")
            if not 1 <= steps <= MAX_UI_STEPS:
                raise ValueError(f"steps must be between 1 and {MAX_UI_STEPS}, got {steps}")
            width, height = check_input_file(path)
            out_w, out_h = check_output_size(pipe, width, height, upscale, max_output_pixels)
            loaded = load_image(path, max_pixels=max_upload_pixels)
        except ImageLoadError as err:
            raise fail(f"Cannot read the upload: {err.problem}." + (f" {err.fix}." if err.fix else ""),
                       "Image not accepted") from None
        except ValueError as err:
            raise fail(str(err), "Image not accepted") from None
        seed = int(seed) if seed is not None and int(seed) >= 0 else random.randrange(2**31)
        tile = int(tile_size or 0) or native_tile
        overlap = min(tile - 1, round(tile * float(tile_overlap)))

        def callback(i, t, latents):
            progress((i + 1, steps), desc=f"Sampling ({scheduler})", unit="steps")

        progress(0, desc="Waiting for the model" if lock.locked() else "Encoding")
        new = None
        try:
            with lock:
                progress(0, desc="Encoding")
                pipe.scheduler = _scheduler(pipe, scheduler)
                record("sampling")
                t0 = time.perf_counter()
                out = pipe(
                    loaded,  # RGB + alpha, split once by load_image
                    upscale=upscale,
                    num_inference_steps=steps,
                    fidelity_weight=float(fidelity),
                    color_fix=color_fix,
                    tile_size=tile,
                    tile_overlap=overlap,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                    output_type="latent",
                    callback=callback,
                )
                sampling_s = time.perf_counter() - t0
                stats.last_sampling_s = STATS.last_sampling_s = sampling_s
            latents = out.latents[0].detach().cpu()
            # Kept per session on the CPU: latents and the LQ canvas only. The CFW features (96 floats per pixel,
            # 384 MB at 1024^2) are dropped so that many sessions cannot pile up memory; a re-decode recomputes them.
            cond = dataclasses.replace(out.conditions[0], cfw_features=None).to("cpu")
            progress(1.0, desc="Decoding")
            before = loaded.rgb.resize((out_w, out_h), Image.Resampling.BICUBIC)  # what a plain resize gives
            stem = _safe_stem(path)
            sessions.drop(session)  # this browser's previous result: its latents, files and URLs
            folder = sessions.new_folder()
            before_path = folder / f"{stem}_input_x{upscale:g}_{secrets.token_hex(4)}.png"
            save_image(before, before_path, overwrite=True)
            _prune_uploads(tmpdir, sessions.folder, SESSION_TTL_S)
            info = (f"{width}×{height} → {out_w}×{out_h} (×{upscale:g}), {steps} {scheduler} steps, seed {seed}, "
                    f"sampled in {sampling_s:.2f} s")
            new = _Session(latents, cond, folder, str(before_path), stem, upscale, info)
            after_path, decode_s = decode(new, fidelity, color_fix)
        except torch.cuda.OutOfMemoryError:
            if new is not None:
                new.drop()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise fail("Out of GPU memory. Lower the upscale or the tile size, or upload a smaller image.",
                       "Out of memory") from None
        except ValueError as err:
            if new is not None:
                new.drop()
            raise fail(str(err), "Invalid settings") from None
        except Exception as err:  # anything else: still a readable message in the page (traceback in the log)
            if new is not None:
                new.drop()
            logger.exception("restoration failed")
            raise fail(f"Restoration failed: {type(err).__name__}: {err}", "Restoration failed") from None
        new.after_path = after_path
        sessions.add(new)  # may drop the least recently used session
        status = (f"**Done**: {info}; decoded at fidelity {float(fidelity):.2f} in {decode_s:.2f} s. Move "
                  "**Fidelity** (or change the colour fix) to decode again without sampling.")
        return [*result_value(new.before_path, after_path), after_path, status, new]

    def redecode(fidelity, color_fix, session, progress=gr.Progress()):  # noqa: B008
        n_out = (1 if has_slider else 2) + 2
        if not isinstance(session, _Session):
            return [*skip_outputs(n_out), session]
        expired = [*skip_outputs(n_out - 2), gr.skip(),
                   f"This result is no longer cached on the server (it keeps the latest {max_sessions} results, for "
                   f"up to {SESSION_TTL_S // 3600} hours). Press **Restore** to run it again.", None]
        if not session.cached:
            return expired
        sessions.touch(session)
        progress(0, desc="Decoding (no sampling)")
        try:
            after_path, decode_s = decode(session, fidelity, color_fix)
        except _Expired:
            return expired
        except ValueError as err:
            raise fail(str(err), "Invalid settings") from None
        except Exception as err:
            logger.exception("re-decoding failed")
            raise fail(f"Decoding failed: {type(err).__name__}: {err}", "Decoding failed") from None
        old, session.after_path = session.after_path, after_path
        if old:
            try:
                os.unlink(old)
            except OSError:
                pass
        status = (f"**Re-decoded** at fidelity {float(fidelity):.2f} ({color_fix} colour fix) in {decode_s:.2f} s, "
                  f"without sampling again. {session.info}.")
        return [*result_value(session.before_path, after_path), after_path, status, session]

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, SESSION_TTL_S)) as demo:
        gr.Markdown(
            f"# {title}: real-world super-resolution\n"
            "Upload a photo and press **Restore**. After that, the **Fidelity** slider and the colour fix decode the "
            "cached result again in a moment, without sampling. "
            f"Limits: uploads up to {_mp(max_upload_pixels)}"
            + (f" and {_format_bytes(max_bytes)}" if max_bytes is not None else "")
            + f", results up to {_mp(max_output_pixels)}."
        )
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=sessions.drop)
        with gr.Row():
            with gr.Column(scale=1):
                inp = gr.Image(type="filepath", image_mode=None, label="Input (low quality)",
                               sources=["upload", "clipboard"], elem_id="input-image", height=320)
                upscale = gr.Slider(1, MAX_UI_UPSCALE, value=min(default_upscale, MAX_UI_UPSCALE), step=0.5,
                                    label="Upscale", elem_id="upscale",
                                    info="one pass; StableSR is trained for ×4 (stablesr restore chains passes for more)")
                steps = gr.Slider(1, MAX_UI_STEPS, value=min(steps_default, MAX_UI_STEPS), step=1, label="Steps", elem_id="steps",
                                  info="official DDPM: 200; DDIM / DPM-Solver / UniPC / Euler: 20-50")
                scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=DEFAULT_SCHEDULER, label="Scheduler", elem_id="scheduler")
                with gr.Row():
                    color_fix = gr.Radio(COLOR_FIX_CHOICES, value=DEFAULT_COLOR_FIX, label="Colour fix", elem_id="color-fix")
                    seed = gr.Number(42, precision=0, label="Seed (-1 = random)", elem_id="seed")
                with gr.Accordion("Tiling", open=False):
                    tile_size = gr.Slider(0, 4 * native_tile, value=0, step=8, elem_id="tile-size",
                                          label=f"Tile size in latent pixels (0 = the model's {native_tile})",
                                          info="smaller tiles use less memory; 1 latent pixel = 8 image pixels")
                    tile_overlap = gr.Slider(0, 0.75, value=0.5, step=0.05, elem_id="tile-overlap",
                                             label="Tile overlap (fraction of the tile; 0.5 = official)")
                run = gr.Button("Restore", variant="primary", elem_id="restore-btn")
            with gr.Column(scale=2):
                if has_slider:
                    result = [gr.ImageSlider(label="Before / after (drag the divider)", type="filepath",
                                             format="png", image_mode=None, elem_id="result", max_height=640,
                                             buttons=["download", "fullscreen"], interactive=False)]
                else:
                    with gr.Row():
                        result = [gr.Image(label="Before (bicubic)", type="filepath", format="png", image_mode=None,
                                           elem_id="result-before", interactive=False),
                                  gr.Image(label="After", type="filepath", format="png", image_mode=None,
                                           elem_id="result", interactive=False)]
                fidelity = gr.Slider(0, 1, value=0.5, step=0.01, elem_id="fidelity",
                                     label="Fidelity (0 = realism, 1 = fidelity to the input)",
                                     info="re-decodes the cached result; no new sampling")
                status = gr.Markdown("Upload an image to start.", elem_id="status")
                download = gr.File(label="Download the result (PNG)", elem_id="download", interactive=False)

        outputs = [*result, download, status, session]
        for component in (inp, *result, download):  # files these create stay in the app's folder
            component.GRADIO_CACHE = str(tmpdir)
        inp.preprocess = guarded_preprocess(inp.preprocess)
        # Queued (so a gr.Error shows as a toast with its message) but unlimited: it only reads the file header.
        inp.upload(on_upload, inp, status, concurrency_limit=None, api_visibility="private", show_progress="hidden")
        run.click(restore, [inp, upscale, steps, scheduler, color_fix, fidelity, seed, tile_size, tile_overlap,
                            session], outputs, api_name="restore", concurrency_id="model")
        # Re-decode only: never samples. "always_last" collapses the many changes of one drag into the latest value.
        redecode_kwargs = dict(inputs=[fidelity, color_fix, session], outputs=outputs, trigger_mode="always_last",
                               show_progress="minimal", concurrency_id="model")
        fidelity.change(redecode, api_name="redecode", **redecode_kwargs)
        color_fix.change(redecode, api_visibility="private", **redecode_kwargs)

    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
    demo.stablesr_stats = stats
    demo.stablesr_tmpdir = tmpdir
    demo.stablesr_sessions = sessions
    demo.stablesr_limits = {"max_upload_pixels": max_upload_pixels, "max_output_pixels": max_output_pixels,
                            "max_file_size": max_bytes, "max_sessions": max_sessions,
                            "concurrency_limit": concurrency_limit, "max_queue": max_queue}
    return demo


def launch_app(demo, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
               max_file_size: str | int | None = None, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve an app from `build_app` (local theme without web fonts, errors shown in the page).

    Files are served only from the app's own folder (uploads land there too), request bodies are capped at what the
    largest allowed upload needs, and Gradio's run history, monitoring and MCP server are off. ``max_file_size``
    defaults to the app's (`build_app`'s ``max_file_size``). Returns what ``Blocks.launch`` returns.
    """
    import gradio as gr
    from starlette.middleware import Middleware

    limits = getattr(demo, "stablesr_limits", {})
    root = getattr(demo, "stablesr_tmpdir", None)
    max_bytes = parse_file_size(limits.get("max_file_size") if max_file_size is None else max_file_size)
    # A base64 data: URL of the largest allowed file, plus the rest of a JSON call.
    max_body = None if max_bytes is None else max_bytes * 4 // 3 + 256 * 1024
    app_kwargs = {}
    if root is not None:

        @contextlib.asynccontextmanager
        async def uploads_in_app_folder(app):
            app.uploaded_file_dir = str(root)  # before the first request: uploads join the one folder served
            yield

        app_kwargs = {"middleware": [Middleware(_OwnFilesOnly, root=str(root), max_body=max_body)],
                      "lifespan": uploads_in_app_folder}
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_bytes,
                       prevent_thread_lock=prevent_thread_lock, show_error=True, quiet=quiet, theme=_theme(gr),
                       css=CSS, inbrowser=False, app_kwargs=app_kwargs, run_history=False, enable_monitoring=False,
                       mcp_server=False)
