"""``stablesr ui``: a local Gradio web app for StableSR.

Upload a photo, pick the upscale, steps, scheduler, colour fix, seed and tiling, and restore it; the result is shown
in a before/after slider with a PNG download. The sampled latents are kept per browser session, so moving the
**fidelity** slider (or changing the colour fix) only decodes them again (one CFW decode) and never samples again.

Gradio is an optional extra (``pip install 'stablesr[ui]'``); it is imported only when the app is built. The app is
meant to run locally (``127.0.0.1`` by default). Memory stays bounded by three limits: uploads above
``max_upload_pixels`` and results above ``max_output_pixels`` are refused with an error naming the limit and the
fix, at most ``concurrency_limit`` jobs run at once, and at most ``max_queue`` wait (more are refused as "queue
full"). The pipeline itself is used by one job at a time (its SFT and CFW adapters hold per-call state), guarded by a
lock per pipeline.

Python use::

    from stablesr.loading import load_pipeline
    from stablesr.webui import build_app, launch_app

    demo = build_app(load_pipeline("path/to/converted"), max_upload_pixels=1024 * 1024)
    launch_app(demo, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import weakref
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
SESSION_TTL_S = 2 * 3600  # a session's cached latents and files are dropped this long after its last update

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
    canvas = pipe.working_canvas(height, width, upscale)  # the pipeline's own arithmetic
    (out_h, out_w), (work_h, work_w) = canvas.output_size, canvas.work_size
    if out_w * out_h > max_output_pixels:
        best = math.sqrt(max_output_pixels / (width * height))
        raise ValueError(
            f"Upscaling {width}×{height} by ×{upscale:g} gives {out_w}×{out_h} = {_mp(out_w * out_h)}, more than this "
            f"server's output limit of {max_output_pixels:,} pixels ({_mp(max_output_pixels)}). Lower the upscale to "
            f"×{math.floor(best * 100) / 100:g} or less, upload a smaller image, or restart the server with: "
            f"stablesr ui --max-output-pixels {out_w * out_h}."
        )
    if work_w * work_h > max_output_pixels:
        raise ValueError(
            f"The image's aspect ratio is too extreme: its short side is sampled at the model's native "
            f"{pipe.native_size} px, a {work_w}×{work_h} canvas ({_mp(work_w * work_h)}), more than this server's "
            f"limit of {_mp(max_output_pixels)}. Crop it to a less elongated shape, or restart the server with: "
            f"stablesr ui --max-output-pixels {work_w * work_h}."
        )
    return out_w, out_h


def probe_image(path: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
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
    """What one browser session keeps between events: enough to decode again without sampling."""

    latents: Any  # torch.Tensor on the CPU
    condition: Any  # RestorationCondition, tensors on the CPU
    before_path: str
    stem: str
    upscale: float
    info: str
    files: list[str] = field(default_factory=list)
    after_path: str | None = None


def _remove_files(session: _Session | None) -> None:
    if isinstance(session, _Session):
        for path in session.files:
            try:
                os.unlink(path)
            except OSError:
                pass
        session.files.clear()


def _safe_stem(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._") or "image"
    return stem[:60]


def _prune_old_files(folder: Path, max_age_s: float) -> None:
    cutoff = time.time() - max_age_s
    for p in folder.glob("*.png"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass


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
    default_steps: int | None = None,
    default_upscale: float = 4.0,
    title: str = "StableSR",
):
    """Build the Gradio app around a loaded `StableSRPipeline` (queue configured; call `launch_app` to serve it).

    Args:
        pipe: the pipeline (any device / dtype). Model calls are serialised with a lock per pipeline.
        max_upload_pixels: refuse uploads with more pixels (width × height), with an error naming the limit and fix.
        concurrency_limit: jobs processed at once per event (the queue's ``default_concurrency_limit``).
        max_queue: jobs allowed to wait; more are refused ("queue full") instead of piling up in memory.
        max_output_pixels: refuse jobs whose result (or sampled canvas) would have more pixels.
        default_steps: initial value of the steps slider (default: the pipeline's, 200 official / 4 turbo).
        default_upscale: initial value of the upscale slider.

    Returns:
        ``gradio.Blocks`` with ``stablesr_stats`` (a [`UIStats`]) and ``stablesr_tmpdir`` attributes.
    """
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    import torch
    from PIL import Image

    from .image_io import ImageLoadError, load_image, save_image

    if max_upload_pixels < 1 or max_output_pixels < 1:
        raise ValueError("max_upload_pixels and max_output_pixels must be positive")
    if concurrency_limit < 1 or max_queue < 1:
        raise ValueError("concurrency_limit and max_queue must be >= 1")

    stats = UIStats()
    lock = _pipe_lock(pipe)
    _scheduler(pipe, "ddpm")  # remember the original scheduler config before any swap
    pipe.set_progress_bar_config(disable=True)
    tmpdir = Path(tempfile.mkdtemp(prefix="stablesr-ui-"))
    atexit.register(shutil.rmtree, tmpdir, True)
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

    def decode(session: _Session, fidelity: float, color_fix: str) -> tuple[str, float]:
        """Decode the session's latents at ``fidelity`` (under the pipeline lock), save the PNG, return its path."""
        t0 = time.perf_counter()
        with lock:
            image = pipe.decode_latents(session.latents, session.condition, float(fidelity), color_fix)
        seconds = time.perf_counter() - t0
        record("decode", seconds)
        path = tmpdir / f"{session.stem}_x{session.upscale:g}_w{float(fidelity):.2f}_{uuid.uuid4().hex[:8]}.png"
        save_image(image, path, overwrite=True)
        return str(path), seconds

    def on_upload(path):
        if not path:
            return gr.skip()
        try:
            width, height = probe_image(path)
            check_upload_size(width, height, max_upload_pixels)
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
            width, height = probe_image(path)
            check_upload_size(width, height, max_upload_pixels)
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
            cond = out.conditions[0].to("cpu")
            progress(1.0, desc="Decoding")
            before = loaded.rgb.resize((out_w, out_h), Image.Resampling.BICUBIC)  # what a plain resize gives
            stem = _safe_stem(path)
            before_path = tmpdir / f"{stem}_input_x{upscale:g}_{uuid.uuid4().hex[:8]}.png"
            save_image(before, before_path, overwrite=True)
            _prune_old_files(tmpdir, SESSION_TTL_S)
            info = (f"{width}×{height} → {out_w}×{out_h} (×{upscale:g}), {steps} {scheduler} steps, seed {seed}, "
                    f"sampled in {sampling_s:.2f} s")
            _remove_files(session)
            new = _Session(latents, cond, str(before_path), stem, upscale, info, files=[str(before_path)])
            after_path, decode_s = decode(new, fidelity, color_fix)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise fail("Out of GPU memory. Lower the upscale or the tile size, or upload a smaller image.",
                       "Out of memory") from None
        except ValueError as err:
            raise fail(str(err), "Invalid settings") from None
        except Exception as err:  # anything else: still a readable message in the page (traceback in the log)
            logger.exception("restoration failed")
            raise fail(f"Restoration failed: {type(err).__name__}: {err}", "Restoration failed") from None
        new.files.append(after_path)
        new.after_path = after_path
        status = (f"**Done**: {info}; decoded at fidelity {float(fidelity):.2f} in {decode_s:.2f} s. Move "
                  "**Fidelity** (or change the colour fix) to decode again without sampling.")
        return [*result_value(new.before_path, after_path), after_path, status, new]

    def redecode(fidelity, color_fix, session, progress=gr.Progress()):  # noqa: B008
        n_out = (1 if has_slider else 2) + 2
        if not isinstance(session, _Session):
            return [*skip_outputs(n_out), session]
        progress(0, desc="Decoding (no sampling)")
        try:
            after_path, decode_s = decode(session, fidelity, color_fix)
        except ValueError as err:
            raise fail(str(err), "Invalid settings") from None
        except Exception as err:
            logger.exception("re-decoding failed")
            raise fail(f"Decoding failed: {type(err).__name__}: {err}", "Decoding failed") from None
        old = session.after_path
        session.after_path = after_path
        session.files.append(after_path)
        if old and old in session.files:
            session.files.remove(old)
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
            f"Limits: uploads up to {_mp(max_upload_pixels)}, results up to {_mp(max_output_pixels)}."
        )
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_remove_files)
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
    demo.stablesr_limits = {"max_upload_pixels": max_upload_pixels, "max_output_pixels": max_output_pixels,
                            "concurrency_limit": concurrency_limit, "max_queue": max_queue}
    return demo


def launch_app(demo, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
               max_file_size: str | int | None = DEFAULT_MAX_FILE_SIZE, prevent_thread_lock: bool = False,
               quiet: bool = False):
    """Serve an app from `build_app` (local theme without web fonts, errors shown in the page)."""
    import gradio as gr

    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       prevent_thread_lock=prevent_thread_lock, show_error=True, quiet=quiet, theme=_theme(gr),
                       css=CSS, inbrowser=False)
