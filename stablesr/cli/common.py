"""What every ``stablesr`` sub-command shares: the user-error class and the model / device / dtype options."""

from __future__ import annotations

import argparse
import sys

from ..loading import (
    DEFAULT_MODEL,
    DEVICE_HELP,
    DTYPE_CHOICES,
    dtype_warning,
    load_pipeline,
    resolve_device,
    resolve_dtype,
)
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
                        help="official model name (stablesr-turbo, stablesr-512, stablesr-768v: see `stablesr "
                             "models`), converted folder, official .ckpt, or Hub id of a converted folder (default: "
                             f"{DEFAULT_MODEL}; downloaded, converted and cached on first use)")
    parser.add_argument("--cfw", help="official vqgan_cfw .ckpt when --model is an official .ckpt")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="auto (default): bf16 on GPUs with native bf16 (Ampere and newer), fp16 on older GPUs "
                             "and Apple MPS, fp32 on CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet's and encoder's repeated blocks (the first image compiles them: "
                             "minutes; faster steps after that)")
    parser.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                        help="keep models in CPU memory and move them to the GPU while they run: model (whole "
                             "models, small slow-down) or sequential (layer by layer, least GPU memory, slow)")
    if scheduler:
        parser.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER,
                            help="ddpm = official respaced DDPM")


def pipeline_from_args(args, *, quiet: bool = False):
    """Load the pipeline named by :func:`add_model_arguments` options (scheduler swapped when asked)."""
    from ..acceleration import compile_pipeline, enable_offload
    from ..loading import enable_fast_attention
    from ..schedulers import scheduler_from_name

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    offload = getattr(args, "offload", "none")
    if not quiet:
        how = " (auto)" if args.dtype == "auto" else ""
        print(f"running on {device} in {dtype}{how}" + (f", {offload} offload" if offload != "none" else ""),
              file=sys.stderr)
    warning = dtype_warning(device, dtype)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    # Offloaded models are loaded into CPU memory; the hooks move them to the device while they run.
    pipe = load_pipeline(args.model, args.cfw, "cpu" if offload != "none" else device, dtype)
    if offload != "none":
        enable_offload(pipe, offload, device)
    enable_fast_attention(pipe, device)
    if getattr(args, "compile", False):
        if device == "cpu":
            print("warning: --compile on a CPU measured no speed-up (0.8-0.95x of eager, scripts/bench_compile.py) "
                  "after minutes of compiling; it is meant for GPUs", file=sys.stderr)
        try:
            compile_pipeline(pipe)
        except (RuntimeError, ValueError) as err:
            raise CLIError(str(err)) from None
    name = getattr(args, "scheduler", DEFAULT_SCHEDULER)
    if name != DEFAULT_SCHEDULER:
        pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe
