"""Cascaded upscaling: large factors (x8, x16, ...) as a chain of StableSR passes of at most x4 each.

When it helps
-------------
StableSR was trained for x4 only: 512x512 targets made from 128x128 Real-ESRGAN-degraded inputs, with the
time-aware encoder always seeing a x4 bicubic upsample of the input. Asked for x8 in one pass, the pipeline upsamples
the input 8x bicubically and the encoder sees a blur twice as strong as anything it was trained on, so the UNet
invents texture at the wrong scale (smeared, "painted" detail) or leaves the blur in. A cascade keeps every pass in
distribution: x16 = x4 then x4, x8 = x4 then x2. The first x4 pass does the real restoration of the degraded input
(noise, JPEG, blur); later passes see a clean image at a mild factor and mostly add detail at the new scale.

Use it for factors above 4 (``--upscale 8`` / ``16``); it changes nothing at or below ``max_pass_upscale``. Costs:
one full sampling per pass, the last one on the biggest image (runtime grows roughly with the output area, as one
pass would); memory stays bounded because every pass goes through the pipeline's aggregation tiles and tiled VAE.
Each pass also re-applies the color fix against its own input, so colors stay anchored to the original.

How the factors are chosen (``split``)
--------------------------------------
- ``"greedy"`` (default): as many ``max_pass_upscale`` passes as fit, then the remainder:
  x8 -> [4, 2], x16 -> [4, 4], x6 -> [4, 1.5], x32 -> [4, 4, 2]. The input, which carries the real degradation,
  always gets the trained x4 factor.
- ``"even"``: the fewest passes with equal factors: x8 -> [2.83, 2.83], x6 -> [2.45, 2.45]. Gentler per pass, but
  the first pass then restores the degraded input at a factor StableSR was not trained for.

Sizes: the result is exactly ``round(upscale x input)`` pixels on each side (the last pass's decode resizes its
working canvas straight to that size, so the rounding of intermediate passes never accumulates).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from .image_processor import SplitImage, as_rgb_alpha_list

__all__ = ["cascade_upscale", "plan_cascade"]

logger = logging.getLogger(__name__)

_EPS = 1e-6


def plan_cascade(upscale: float, max_pass_upscale: float | None = 4.0, split: str = "greedy") -> list[float]:
    """The factor of each pass (their product is ``upscale``); a single pass when ``upscale <= max_pass_upscale``
    or ``max_pass_upscale`` is ``None``/``0``/``inf`` (never split)."""
    if not (isinstance(upscale, (int, float)) and math.isfinite(upscale) and upscale > 0):
        raise ValueError(f"upscale must be a positive number, got {upscale!r}")
    if not max_pass_upscale or math.isinf(max_pass_upscale) or upscale <= max_pass_upscale * (1 + _EPS):
        return [float(upscale)]
    if max_pass_upscale <= 1:
        raise ValueError(f"max_pass_upscale must be > 1 (or 0 to never split), got {max_pass_upscale}")
    if split == "greedy":
        factors, rest = [], float(upscale)
        while rest > max_pass_upscale * (1 + _EPS):
            factors.append(float(max_pass_upscale))
            rest /= max_pass_upscale
        return factors + [rest]
    if split == "even":
        n = math.ceil(math.log(upscale) / math.log(max_pass_upscale) - _EPS)
        return [float(upscale) ** (1 / n)] * n
    raise ValueError(f"split must be 'greedy' or 'even', got {split!r}")


@torch.no_grad()
def cascade_upscale(
    pipe,
    image,
    upscale: float,
    max_pass_upscale: float | None = 4.0,
    split: str = "greedy",
    fidelity_weight: float = 0.5,
    color_fix: str = "wavelet",
    vae_tile_size: int | None = 1024,
    vae_tile_overlap: int = 64,
    output_type: str = "pil",
    generator: torch.Generator | list[torch.Generator] | None = None,
    pass_callback: Callable[[int, int, float, Any], None] | None = None,
    **kwargs,
):
    """Upscale by ``upscale`` with chained pipeline passes of at most ``max_pass_upscale`` each (see the module doc).

    A drop-in for ``pipe(image, upscale=..., ...)``: same arguments (all other ``kwargs`` such as
    ``num_inference_steps``, ``tile_size``, ``tile_overlap``, ``start``, ``prompt_embeds`` go to every pass) and the
    same return type. With one pass it is exactly ``pipe(...)``.

    Args:
        pipe: a [`StableSRPipeline`].
        image: what the pipeline accepts (PIL, numpy, torch, or a list); each image is cascaded on its own.
        upscale: total factor; the output is ``round(upscale x input)`` pixels.
        max_pass_upscale: the largest factor of one pass (default 4, StableSR's training factor; ``None`` or 0 =
            never split).
        split: "greedy" (x4 passes first, then the remainder) or "even" (equal factors).
        fidelity_weight, color_fix, vae_tile_size, vae_tile_overlap: for every pass's decode.
        output_type: "pil", "np", "pt" or "latent". With "latent" the returned latents and conditions are those of
            the last pass (its condition's ``output_size`` is the final size), so
            ``pipe.decode_latents(out.latents[0], out.conditions[0], w)`` re-decodes the final pass at another w.
            Earlier passes are decoded at ``fidelity_weight``.
        generator: one generator (shared by the passes) or one per image.
        pass_callback: ``pass_callback(pass_index, num_passes, factor, pass_output_image)`` after each pass except
            the last (e.g. for progress or to keep the intermediate results).

    Returns:
        [`StableSRPipelineOutput`] (``images``, ``latents``, ``conditions``) like the pipeline.
    """
    from .pipelines.pipeline_stablesr import StableSRPipelineOutput

    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    factors = plan_cascade(upscale, max_pass_upscale, split)
    if len(factors) > 1 and kwargs.get("latents") is not None:
        raise ValueError("initial latents cannot be given for a multi-pass cascade (their size changes per pass)")
    images = as_rgb_alpha_list(image)  # alpha split once; only the last pass re-attaches it (at the final size)
    generators = generator if isinstance(generator, list) else [generator] * len(images)
    if len(generators) != len(images):
        raise ValueError(f"got {len(generators)} generators for {len(images)} images")
    decode = dict(color_fix=color_fix, vae_tile_size=vae_tile_size, vae_tile_overlap=vae_tile_overlap)
    if len(factors) > 1:
        logger.info("cascade x%g as %d passes: %s", upscale, len(factors), " then ".join(f"x{f:.4g}" for f in factors))

    outputs, all_latents, conditions = [], [], []
    for (img, alpha), gen in zip(images, generators, strict=True):
        target = (max(1, round(img.height * upscale)), max(1, round(img.width * upscale)))
        current = img
        for i, factor in enumerate(factors[:-1]):
            current = pipe(current, upscale=factor, fidelity_weight=fidelity_weight, generator=gen, output_type="pil",
                           **decode, **kwargs).images[0]
            if pass_callback is not None:
                pass_callback(i, len(factors), factor, current)
        last = factors[-1]
        if len(factors) > 1:  # aim the last pass at the exact target (the longer side decides the factor)
            last = target[0] / current.height if current.height >= current.width else target[1] / current.width
        out = pipe(SplitImage(current, alpha), upscale=last, fidelity_weight=fidelity_weight, generator=gen,
                   output_type="latent", **decode, **kwargs)
        latents, condition = out.latents[0], out.conditions[0]
        if tuple(condition.output_size) != target:  # decode resizes the working canvas straight to the final size
            condition = dataclasses.replace(condition, output_size=target)
        all_latents.append(latents)
        conditions.append(condition)
        if output_type == "latent":
            outputs.append(latents)
        else:
            outputs.append(pipe.decode_latents(latents, condition, fidelity_weight, output_type=output_type, **decode))

    if output_type in ("np", "pt") and len({tuple(o.shape) for o in outputs}) == 1:
        outputs = torch.cat(outputs) if output_type == "pt" else __import__("numpy").concatenate(outputs)
    return StableSRPipelineOutput(images=outputs, latents=all_latents, conditions=conditions)
