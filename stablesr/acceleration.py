"""Speed and memory options for a loaded `StableSRPipeline`, and what a restore will cost.

- [`compile_pipeline`]: regional ``torch.compile`` of the repeated blocks (the UNet's resnets and transformer blocks,
  the time-aware encoder's res/attention blocks), compiled once per block shape and reused by every tile and step.
- [`enable_offload`]: diffusers' model or sequential CPU offload (accelerate hooks), with the StableSR adapters
  moved along with the models they run inside.
- [`restore_work`] / [`RestoreEstimator`]: how many tiles, UNet calls and VAE pixels a restore takes (exactly the
  pipeline's own arithmetic), and a time estimate from the first measured steps.

Used by ``stablesr restore`` / ``stablesr ui`` (``--compile``, ``--offload``, the estimate line), usable from Python.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from diffusers.utils import logging

from .cascade import plan_cascade
from .tiling import pixel_tile_grid, tile_grid
from .vae_tiling import fits_one_tile

logger = logging.get_logger(__name__)

__all__ = [
    "COMPILED_BLOCKS",
    "OFFLOAD_MODES",
    "RestoreEstimator",
    "RestoreWork",
    "compile_pipeline",
    "enable_offload",
    "restore_work",
]

# Class names of the blocks compiled by `compile_pipeline`, per component. Each block class is one code object for
# dynamo: its graphs are cached per distinct parameter shapes, and every instance of a shape reuses them.
COMPILED_BLOCKS: dict[str, tuple[str, ...]] = {
    "unet": ("ResnetBlock2D", "BasicTransformerBlock"),
    "time_aware_encoder": ("TimestepResBlock", "LegacyAttentionBlock"),
}
OFFLOAD_MODES = ("model", "sequential")
# Components that sequential offload keeps whole on the device: the SFT and CFW adapters run inside the UNet / VAE
# through methods that read their parameters directly (not through forward, where accelerate's per-layer hooks load
# them), and the prompt embedding is one tensor. Together ~100M parameters (SFT 53M, CFW 44M at full size).
_SEQUENTIAL_RESIDENT = ("sft_adapter", "cfw_adapter", "prompt_embedding")

# VAE decoder FLOPs per pixel relative to the encoder's (SD VAE, FlopCounterMode at 512^2: encoder 1117 GFLOP,
# decoder 2515, decoder with CFW fusion 5000). The estimate times the encoder and scales the decode by these.
DECODE_TO_ENCODE_FLOPS = 2.25
CFW_DECODE_TO_ENCODE_FLOPS = 4.48


# ------------------------------------------------------------------------------------------------------ compile
def _blocks(pipe) -> list[torch.nn.Module]:
    found = []
    for name, classes in COMPILED_BLOCKS.items():
        model = getattr(pipe, name, None)
        if model is not None:
            found += [m for m in model.modules() if type(m).__name__ in classes]
    return found


def _signature(module: torch.nn.Module) -> tuple:
    return type(module).__name__, tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def _check_compiler(device: str, backend: str) -> None:
    if backend == "inductor" and str(device).startswith("cpu"):
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise RuntimeError(
                "torch.compile (inductor) on the CPU needs a C++ compiler (g++ or clang++) on PATH: install one "
                "(e.g. apt install g++), or run without --compile"
            )


def compile_pipeline(pipe, mode: str | None = None, *, backend: str = "inductor", fullgraph: bool = True,
                     dynamic: bool = True) -> int:
    """Regional compilation: ``torch.compile`` every repeated block of the UNet and the time-aware encoder.

    The blocks are those named in [`COMPILED_BLOCKS`] (diffusers' ``compile_repeated_blocks`` compiles only the
    UNet's transformer blocks; the resnets, where the SFT layers sit, are most of the UNet's time). Compiling a
    block instead of the whole UNet costs far less compile time and survives what the pipeline does between calls:

    - the SFT wrappers that ``SFTAdapter.attach`` puts around each resnet's ``conv2`` in every ``__call__`` are
      traced into the resnet's graph; their per-call features are graph inputs, so re-attaching does not recompile;
    - ``dynamic=True`` compiles shape-generic graphs, so other tile sizes, image sizes and tile batch sizes do not
      recompile (a batch of one tile is specialised once more by dynamo).

    Each block class is one code object for dynamo, with one graph per distinct parameter shapes (SD 2.x: ~15 resnet
    shapes), so dynamo's recompile limit (8 per code object) is raised to fit them (it is never lowered).

    The first call compiles (minutes for the full-size model); later calls reuse the graphs. Not with sequential
    offload (its per-layer hooks move weights inside the blocks; use model offload).

    Args:
        pipe: a `StableSRPipeline`.
        mode: ``torch.compile`` mode (None = default, "max-autotune", ...).
        backend: ``torch.compile`` backend ("inductor"; "aot_eager" / "eager" to check tracing without codegen).
        fullgraph: fail on graph breaks instead of silently running parts eagerly.
        dynamic: shape-generic graphs (see above).

    Returns:
        The number of compiled blocks.

    Raises:
        RuntimeError: inductor on a CPU without a C++ compiler.
        ValueError: the pipeline is sequentially offloaded.
    """
    if _offload_mode(pipe) == "sequential":
        raise ValueError("--compile does not work with sequential offload (its hooks move each layer's weights "
                         "inside the compiled blocks); use --offload model, or drop one of the two")
    _check_compiler(pipe._execution_device, backend)
    blocks = _blocks(pipe)
    if not blocks:
        raise ValueError(f"found none of the blocks to compile ({COMPILED_BLOCKS}) in this pipeline")
    per_class: dict[str, set] = {}
    for block in blocks:
        per_class.setdefault(type(block).__name__, set()).add(_signature(block))
    # Per signature: one graph, one more for a batch of one tile, one more in case the SFT layers are detached.
    needed = 3 * max(len(s) for s in per_class.values()) + 8
    dynamo_config = torch._dynamo.config
    if dynamo_config.recompile_limit < needed:
        dynamo_config.recompile_limit = needed
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    needed * len(per_class) * 2)
    for block in blocks:
        block.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    logger.info(f"compiled {len(blocks)} blocks ({', '.join(f'{k}: {len(v)} shapes' for k, v in per_class.items())});"
                " the first call compiles them")
    return len(blocks)


# ------------------------------------------------------------------------------------------------------ offload
def _offload_mode(pipe) -> str | None:
    if getattr(pipe, "_all_hooks", None):
        return "model"
    unet = getattr(pipe, "unet", None)
    if unet is not None and any(p.device.type == "meta" for p in unet.parameters()):
        return "sequential"
    return None


def enable_offload(pipe, mode: str, device: str | torch.device = "cuda") -> None:
    """Keep the models in CPU memory and move them to ``device`` only while they run (accelerate hooks).

    - ``"model"``: whole models move when they are called (diffusers' ``enable_model_cpu_offload``): the UNet,
      then the VAE, each alone on the device (peak ~ the UNet). The time-aware encoder and the adapters have their
      own hooks (the encoder runs once per UNet call, so it stays on the device during sampling; the SFT and CFW
      layers move with the UNet / VAE they are attached to). Costs one transfer per model per image.
    - ``"sequential"``: each layer's weights move when it runs (``enable_sequential_cpu_offload``): minimal device
      memory, every weight crosses the bus in every step (slow). The SFT and CFW adapters and the prompt embedding
      stay whole on the device (~100M parameters).

    An fp16 VAE is first upcast to float32 as [`StableSRPipeline.prepare_half_precision`] does (the hooks keep
    their own copy of the weights, which cannot be cast later). The hooks also work with ``device="cpu"``: the
    models then run on the CPU, which is how the tests check that outputs do not change.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode must be one of {OFFLOAD_MODES}, got {mode!r}")
    pipe.prepare_half_precision()
    device = torch.device(device)
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        # An instance attribute, so the class default (used by model offload) is untouched.
        pipe._exclude_from_cpu_offload = sorted({*type(pipe)._exclude_from_cpu_offload, *_SEQUENTIAL_RESIDENT})
        if device.type == "cpu":
            _sequential_offload_on_cpu(pipe)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    logger.info(f"{mode} offload to {device} enabled")


def _sequential_offload_on_cpu(pipe) -> None:
    """``enable_sequential_cpu_offload`` with the execution device named ``cpu``: diffusers names it ``cpu:0``, and
    accelerate's hooks then copy each weight into a plain tensor on load (``Parameter.to("cpu:0")`` is a copy on a
    ``cpu`` tensor) and fail when offloading it again. The same hooks, on the CPU: how the tests run them."""
    from accelerate import cpu_offload

    device = torch.device("cpu")
    pipe.remove_all_hooks()
    for name, model in pipe.components.items():
        if not isinstance(model, torch.nn.Module):
            continue
        if name in pipe._exclude_from_cpu_offload:
            model.to(device)
        else:
            cpu_offload(model, device, offload_buffers=len(model._parameters) > 0)
    pipe._offload_device = device


# ------------------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class RestoreWork:
    """What restoring some images costs, in the units the time goes into (sums over images and cascade passes).

    Attributes:
        images: images restored.
        passes: pipeline passes (a cascaded x8 is two per image).
        tiles: aggregation tiles per sampling step, summed over passes.
        steps: sampling steps per pass (the scheduler's timesteps).
        unet_calls: encoder + UNet forward calls (each takes a batch of up to ``tile_batch_size`` tiles).
        tile_steps: tiles x steps: encoder + UNet evaluations of one tile (the time is proportional to these).
        encode_pixels: pixels through the VAE encoder (tiles with their overlaps; with a tiled CFW decode, also the
            margin crops it encodes for the fusion features).
        decode_pixels: pixels through the stock VAE decoder (tiles with their overlaps).
        cfw_decode_pixels: pixels through the decoder with CFW fusion (fidelity weight > 0).
    """

    images: int = 0
    passes: int = 0
    tiles: int = 0
    steps: int = 0
    unet_calls: int = 0
    tile_steps: int = 0
    encode_pixels: int = 0
    decode_pixels: int = 0
    cfw_decode_pixels: int = 0

    def __add__(self, other: RestoreWork) -> RestoreWork:
        values = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        values["steps"] = max(self.steps, other.steps)
        return RestoreWork(**values)

    @property
    def encode_equivalent_pixels(self) -> float:
        """All VAE work in encoder-pixel units (decode pixels weighted by their FLOPs relative to the encoder's)."""
        return (self.encode_pixels + DECODE_TO_ENCODE_FLOPS * self.decode_pixels
                + CFW_DECODE_TO_ENCODE_FLOPS * self.cfw_decode_pixels)


def _tiled_pixels(height: int, width: int, tile: int | None, overlap: int, factor: int) -> list[tuple[int, int]]:
    if fits_one_tile(height, width, tile):
        return [(height, width)]
    return [(y1 - y0, x1 - x0) for y0, y1, x0, x1 in pixel_tile_grid(height, width, tile, overlap, align=factor)]


def _pass_work(pipe, height, width, upscale, steps, tile_size, tile_overlap, tile_batch_size, vae_tile_size,
               vae_tile_overlap, cfw: bool) -> RestoreWork:
    canvas = pipe.working_canvas(height, width, upscale)
    factor = pipe.vae_scale_factor
    pad_h, pad_w = canvas.padded_size
    boxes = tile_grid(pad_h // factor, pad_w // factor, tile_size, tile_overlap)
    calls_per_step = 1 if len(boxes) == 1 else math.ceil(len(boxes) / tile_batch_size)
    tiles = _tiled_pixels(pad_h, pad_w, vae_tile_size, vae_tile_overlap, factor)
    encode = sum(h * w for h, w in tiles)
    decode = encode
    if cfw and len(tiles) > 1:  # each decoded tile encodes its LQ crop with a margin for the fusion features
        margin = 4 * factor * 4  # vae_tiling.decode's margin
        for y0, y1, x0, x1 in pixel_tile_grid(pad_h, pad_w, vae_tile_size, vae_tile_overlap, align=factor):
            encode += (min(pad_h, y1 + margin) - max(0, y0 - margin)) * (min(pad_w, x1 + margin) - max(0, x0 - margin))
    return RestoreWork(images=0, passes=1, tiles=len(boxes), steps=steps, unet_calls=calls_per_step * steps,
                       tile_steps=len(boxes) * steps, encode_pixels=encode,
                       decode_pixels=0 if cfw else decode, cfw_decode_pixels=decode if cfw else 0)


def restore_work(
    pipe,
    height: int,
    width: int,
    upscale: float = 4.0,
    num_inference_steps: int | None = None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    tile_batch_size: int = 4,
    vae_tile_size: int | None = 1024,
    vae_tile_overlap: int = 64,
    fidelity_weight: float = 0.5,
    max_pass_upscale: float | None = None,
) -> RestoreWork:
    """The work of restoring one ``height`` x ``width`` image with these `StableSRPipeline` / ``cascade_upscale``
    arguments (same defaults), computed with the pipeline's own canvas and tile arithmetic (``working_canvas``,
    ``tiling.tile_grid``, ``tiling.pixel_tile_grid``) and the scheduler's real number of timesteps.

    ``max_pass_upscale`` (as ``cascade_upscale``; None = one pass) splits large factors into passes.
    """
    tile_size = tile_size or pipe.default_tile_size
    tile_overlap = tile_overlap if tile_overlap is not None else tile_size // 2
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps or pipe.config.default_num_inference_steps, device="cpu")
    steps = len(scheduler.timesteps)
    cfw = pipe.cfw_adapter is not None and fidelity_weight > 0
    factors = plan_cascade(upscale, max_pass_upscale) if max_pass_upscale else [upscale]
    target = (max(1, round(height * upscale)), max(1, round(width * upscale)))
    work = RestoreWork(images=1)
    h, w = height, width
    for index, factor in enumerate(factors):
        if index == len(factors) - 1 and len(factors) > 1:  # cascade_upscale aims the last pass at the exact target
            factor = target[0] / h if h >= w else target[1] / w
        work = work + _pass_work(pipe, h, w, factor, steps, tile_size, tile_overlap, tile_batch_size, vae_tile_size,
                                 vae_tile_overlap, cfw)
        h, w = max(1, round(h * factor)), max(1, round(w * factor))
    return work


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RestoreEstimator:
    """Times the first encoder + UNet calls and the first VAE encode of a run and reports the estimated total time.

    Forward hooks (removed on exit) on the time-aware encoder, the UNet and the VAE encoder measure, with the
    device synchronised around them:

    - seconds per tile step: the second encoder + UNet call divided by its tiles (the first carries one-time costs:
      allocation, autotuning, compilation); the first call when the whole run has only one;
    - seconds per VAE-encoded pixel: the first image's LQ encode (it runs before sampling). Decoding is scaled from
      it by the decoder's FLOPs relative to the encoder's ([`DECODE_TO_ENCODE_FLOPS`],
      [`CFW_DECODE_TO_ENCODE_FLOPS`]).

    ``estimate = tile_steps x seconds per tile step + VAE encoder-equivalent pixels x seconds per pixel``, reported
    once through ``report(seconds, text)`` as soon as it is known, if it is at least ``min_seconds``.

    ```py
    works = [restore_work(pipe, h, w, 4) for h, w in sizes]
    with RestoreEstimator(pipe, works, lambda s, text: print(text)):
        for image in images:
            pipe(image, upscale=4)
    ```
    """

    def __init__(self, pipe, works: Sequence[RestoreWork], report: Callable[[float, str], None],
                 min_seconds: float = 60.0):
        self.pipe = pipe
        self.work = sum(works, RestoreWork())
        self.report = report
        self.min_seconds = min_seconds
        self.tile_seconds: list[float] = []
        self.encode_seconds = 0.0
        self.encoded_pixels = 0
        self.estimate: float | None = None
        self._handles = []
        self._start: float | None = None
        self._encode_start: float | None = None
        self._encoding_done = False

    def _sync(self):
        device = self.pipe._execution_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    def __enter__(self) -> RestoreEstimator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> RestoreEstimator:
        """Install the timing hooks (what ``with`` does)."""
        pipe = self.pipe
        if self.work.tile_steps == 0 or self._handles:
            return self
        self._handles = [
            pipe.time_aware_encoder.register_forward_pre_hook(self._call_start),
            pipe.unet.register_forward_hook(self._call_end),
            pipe.vae.encoder.register_forward_pre_hook(self._encode_start_hook),
            pipe.vae.encoder.register_forward_hook(self._encode_end_hook),
        ]
        return self

    def stop(self) -> None:
        """Remove the timing hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _call_start(self, module, args):
        if self.estimate is None:
            self._encoding_done = True
            self._sync()
            self._start = time.perf_counter()

    def _call_end(self, module, args, output):
        if self.estimate is not None or self._start is None:
            return
        self._sync()
        tiles = args[0].shape[0] if args else 1
        self.tile_seconds.append((time.perf_counter() - self._start) / max(tiles, 1))
        self._start = None
        if len(self.tile_seconds) >= 2 or self.work.unet_calls <= 1:
            self._finish()

    def _encode_start_hook(self, module, args):
        if not self._encoding_done:
            self._sync()
            self._encode_start = time.perf_counter()

    def _encode_end_hook(self, module, args, output):
        if self._encoding_done or self._encode_start is None:
            return
        self._sync()
        self.encode_seconds += time.perf_counter() - self._encode_start
        self.encoded_pixels += args[0].shape[0] * args[0].shape[-2] * args[0].shape[-1]
        self._encode_start = None

    def _finish(self) -> None:
        work = self.work
        per_tile = self.tile_seconds[-1]
        per_pixel = self.encode_seconds / self.encoded_pixels if self.encoded_pixels else 0.0
        vae_seconds = work.encode_equivalent_pixels * per_pixel
        self.estimate = work.tile_steps * per_tile + vae_seconds
        if self.estimate < self.min_seconds:
            return
        device = self.pipe._execution_device
        text = (
            f"estimated ~{_format_seconds(self.estimate)} for {work.images} image{'s' if work.images != 1 else ''} "
            f"({work.tiles} tile{'s' if work.tiles != 1 else ''} x {work.steps} steps = {work.tile_steps} UNet tile "
            f"evaluations at {per_tile:.2f} s, + ~{_format_seconds(vae_seconds)} VAE for "
            f"{(work.encode_pixels + work.decode_pixels + work.cfw_decode_pixels) / 1e6:.1f} Mpx) on {device.type}"
        )
        self.report(self.estimate, text)
