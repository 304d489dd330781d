"""``stablesr ui``: serve the local Gradio web app (`stablesr.webui`) for a loaded model."""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Any

from ..loading import resolve_device
from ..webui import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_OUTPUT_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_UPLOAD_PIXELS,
    GRADIO_REQUIREMENT,
    INSTALL_HINT,
    build_app,
    launch_app,
    parse_file_size,
)
from .common import CLIError, add_model_arguments, pipeline_from_args


class UIError(CLIError, ValueError):
    """A user-fixable `stablesr ui` error."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_gradio():
    try:
        import gradio
    except ImportError:
        raise UIError(INSTALL_HINT) from None
    major = int(re.match(r"\d+", gradio.__version__).group()) if re.match(r"\d+", gradio.__version__) else 0
    if major < 6:
        raise UIError(f"gradio {gradio.__version__} is too old for the web UI; upgrade: pip install -U "
                       f"'{GRADIO_REQUIREMENT}' (or pip install -U 'stablesr[ui]')")
    return gradio


def cmd_ui(args) -> int:
    _require_gradio()  # before anything slow: a missing extra is reported at once
    if args.max_upload_pixels < 1 or args.max_output_pixels < 1:
        raise UIError("--max-upload-pixels and --max-output-pixels must be positive")
    if args.concurrency < 1 or args.max_queue < 1 or args.max_sessions < 1:
        raise UIError("--concurrency, --max-queue and --max-sessions must be >= 1")
    try:
        max_file_size = parse_file_size(args.max_file_size)
    except ValueError as err:
        raise UIError(f"--max-file-size: {err}") from None
    device = resolve_device(args.device)
    if args.share or not _is_loopback(args.host):
        print("warning: the web UI has no authentication; anyone who can reach it can use this machine's "
              f"{'GPU' if device.startswith('cuda') else 'compute'}", file=sys.stderr)
    print(f"loading {args.model} ...", file=sys.stderr)
    pipe = pipeline_from_args(args)  # prints the device and the dtype (--dtype auto: chosen for the device)
    demo = build_app(pipe, max_upload_pixels=args.max_upload_pixels, concurrency_limit=args.concurrency,
                     max_queue=args.max_queue, max_output_pixels=args.max_output_pixels, max_file_size=max_file_size,
                     max_sessions=args.max_sessions, default_steps=args.steps)
    try:
        _, local_url, share_url = launch_app(demo, host=args.host, port=args.port, share=args.share,
                                             prevent_thread_lock=True, quiet=True)
    except OSError as err:
        raise UIError(f"cannot serve on {args.host}:{args.port}: {str(err).rstrip('.')}. Pick a free port with --port") from None
    print(f"StableSR web UI: {local_url}" + (f" (public link: {share_url})" if share_url else "")
          + "  - press Ctrl+C to stop", file=sys.stderr)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


def add_ui_parser(subparsers) -> Any:
    """Register ``stablesr ui`` on the CLI's sub-command parsers (works without gradio installed)."""
    u = subparsers.add_parser("ui", help="start the local web UI (needs the [ui] extra: gradio)",
                              description="Start a local Gradio web app for StableSR. Note: " + INSTALL_HINT + ".")
    add_model_arguments(u)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    u.add_argument("--max-upload-pixels", type=int, default=DEFAULT_MAX_UPLOAD_PIXELS,
                   help=f"refuse uploads with more pixels (default {DEFAULT_MAX_UPLOAD_PIXELS:,} = 2048²)")
    u.add_argument("--max-output-pixels", type=int, default=DEFAULT_MAX_OUTPUT_PIXELS,
                   help=f"refuse jobs whose result has more pixels (default {DEFAULT_MAX_OUTPUT_PIXELS:,} = 4096²)")
    u.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE,
                   help=f"largest upload file, checked before it is opened (default {DEFAULT_MAX_FILE_SIZE})")
    u.add_argument("--concurrency", type=int, default=1,
                   help="jobs processed at once (default 1; the model itself runs one job at a time)")
    u.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"jobs allowed to wait; more are refused as 'queue full' (default {DEFAULT_MAX_QUEUE})")
    u.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                   help="sessions whose latents stay cached for re-decoding; the least recently used beyond this is "
                        f"dropped (default {DEFAULT_MAX_SESSIONS})")
    u.add_argument("--steps", type=int, default=None, help="initial steps (default: the model's)")
    u.set_defaults(func=cmd_ui)
    return u
