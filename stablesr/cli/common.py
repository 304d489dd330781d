"""What every ``stablesr`` sub-command shares: the user-error class and the model / device / dtype options."""

from __future__ import annotations

import argparse
import sys

from ..loading import DEFAULT_MODEL, DEVICE_HELP, DTYPES, dtype_warning, load_pipeline, resolve_device
from ..schedulers import DEFAULT_SCHEDULER, SCHEDULERS


class CLIError(Exception):
    """An error the user can fix; printed without a traceback (exit code 2)."""


def parse_weights(text: str, option: str) -> list[float]:
    """Comma-separated fidelity weights in [0, 1]."""
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"{option} must be comma-separated numbers, got {text!r}") from None
    for w in weights:
        if not 0 <= w <= 1:
            raise CLIError(f"fidelity weights must be in [0, 1], got {w}")
    return weights


def add_model_arguments(parser: argparse.ArgumentParser, *, scheduler: bool = False) -> None:
    """``--model --cfw --device --dtype`` (and ``--scheduler``) with the same names, defaults and help everywhere."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="converted folder, official .ckpt, or Hub id (default: the official release, converted "
                             "and cached on first use)")
    parser.add_argument("--cfw", help="official vqgan_cfw .ckpt when --model is an official .ckpt")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    if scheduler:
        parser.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER,
                            help="ddpm = official respaced DDPM")


def pipeline_from_args(args, *, quiet: bool = False):
    """Load the pipeline named by :func:`add_model_arguments` options (scheduler swapped when asked)."""
    from ..loading import enable_fast_attention
    from ..schedulers import scheduler_from_name

    device = resolve_device(args.device)
    warning = dtype_warning(device, args.dtype)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    pipe = load_pipeline(args.model, args.cfw, device, args.dtype)
    enable_fast_attention(pipe, device)
    name = getattr(args, "scheduler", DEFAULT_SCHEDULER)
    if name != DEFAULT_SCHEDULER:
        pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe
