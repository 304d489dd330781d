"""CFW decode benchmark on the full-size SD 2.x VAE (random weights, fp32, CPU): two questions in one run.

1. What the single LQ encode saves (``--encode-size``, default 1024^2): the LQ latent + untiled CFW decode with the
   VAE encoder run twice (``vae_tiling.encode_moments``, then ``vae_tiling.decode(lq_image=...)`` encodes again for
   the CFW features: the path before ``RestorationCondition.cfw_features``) vs once (``CFWAdapter.encode_features``
   gives the posterior and the features; ``vae_tiling.decode(encoder_features=...)``).
2. Does our CFW decode cost more than the stock decoder plus the fusion blocks (``--decode-size``, default 512^2)?
   ``CFWAdapter.decode`` vs ``vae.decode`` followed by the two fusion blocks called directly on tensors of the fused
   shapes: the official ``Decoder_Mix`` is the stock decoder with those blocks inserted, so the same kernels and FLOPs.

Model: ``AutoencoderKL`` with the SD 2.1 VAE config (block_out_channels (128, 256, 512, 512), layers_per_block 2,
latent 4) and ``CFWAdapter.from_vae`` (levels 1 and 2), seeded random weights; fidelity weight 0.5.

Every measurement runs in a FRESH child process (this script with ``--child``) so its peak RSS and allocator state
are its own; the variants alternate. A child reads ``VmRSS`` after building the model and inputs (``base``), resets
the peak (``/proc/self/clear_refs`` = 5) and reads ``VmHWM`` after the measured call (``peak``). Printed per run:
wall s, CPU s (user + sys of the process), sys s, minor page faults, peak and peak - base (MB); then the minimum over
repeats of each and the ratios.

    .venv/bin/python scripts/bench_cfw_decode.py [--encode-size 1024] [--decode-size 512] [--repeats 2]
        [--encode-repeats 1] [--threads N] [--skip-encode] [--skip-decode]

On the 2-core dev machine with other jobs running, a 1024^2 encode + decode child takes 3-6 minutes, a 512^2
decode child 1-2 minutes; the CPU s column is the steadier one when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from proc_memory import reset_peak, status_kb  # scripts/proc_memory.py (this folder)

VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
FIDELITY_WEIGHT = 0.5
ENCODE_VARIANTS = ("encode_twice", "encode_once")
DECODE_VARIANTS = ("ours", "stock_plus_fusion")


def child(variant: str, size: int, threads: int | None) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from stablesr import vae_tiling
    from stablesr.models.cfw import CFWAdapter

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval().requires_grad_(False)
    adapter = CFWAdapter.from_vae(vae).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    if variant in ENCODE_VARIANTS:
        lq = torch.rand(1, 3, size, size, generator=generator) * 2 - 1

        def run(lq=lq):
            if variant == "encode_twice":
                mean, _ = vae_tiling.encode_moments(vae, lq, size)
                return vae_tiling.decode(vae, mean, lq, adapter, FIDELITY_WEIGHT, size)
            encoded = adapter.encode_features(vae, lq)
            return vae_tiling.decode(vae, encoded.latent_dist.mean, lq, adapter, FIDELITY_WEIGHT, size,
                                     encoder_features=encoded.encoder_features)

        with torch.no_grad():
            run(lq[..., :64, :64])  # one-time costs (thread pool, lazy initialisation) out of the measurement
    else:
        widths = VAE_CONFIG["block_out_channels"]
        latents = torch.randn(1, 4, size // 8, size // 8, generator=generator)
        shapes = {level: (1, widths[level], size // 2**level, size // 2**level) for level in adapter.fusion_levels}
        enc = {level: torch.randn(shape, generator=generator) for level, shape in shapes.items()}
        dec = {level: torch.randn(shape, generator=generator) for level, shape in shapes.items()}  # both variants

        def run(latents=latents, enc=enc, dec=dec):
            if variant == "ours":
                return adapter.decode(vae, latents, list(enc.values()), FIDELITY_WEIGHT).sample
            image = vae.decode(latents).sample
            for level in adapter.fusion_levels:
                adapter.fusion_layer(level)(enc[level], dec[level], FIDELITY_WEIGHT)
            return image

        with torch.no_grad():  # the same call at 64^2 first: one-time costs out of the measurement
            run(latents[..., :8, :8], {k: v[..., : 64 >> k, : 64 >> k] for k, v in enc.items()},
                {k: v[..., : 64 >> k, : 64 >> k] for k, v in dec.items()})

    base_kb = status_kb("VmRSS")
    can_reset = reset_peak()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with torch.no_grad():
        run()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = status_kb("VmHWM") if can_reset else after.ru_maxrss
    return {
        "variant": variant, "size": size, "threads": torch.get_num_threads(), "wall_s": seconds,
        "cpu_s": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
        "sys_s": after.ru_stime - usage.ru_stime, "minflt": after.ru_minflt - usage.ru_minflt,
        "base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "peak_reset": can_reset,
    }


def run_child(variant: str, size: int, threads: int | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--size", str(size)]
    if threads:
        command += ["--threads", str(threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    print(f"  {variant:18s} {size:5d}^2  wall {result['wall_s']:7.1f} s  cpu {result['cpu_s']:7.1f} s  "
          f"sys {result['sys_s']:6.1f} s  minflt {result['minflt']:9d}  peak {result['peak_mb']:7.0f} MB  "
          f"peak-base {result['peak_mb'] - result['base_mb']:7.0f} MB", flush=True)
    return result


def compare(title: str, variants: tuple[str, str], size: int, repeats: int, threads: int | None) -> dict:
    print(f"{title} ({size}^2, {repeats} run(s) each, alternating, fresh process per run)", flush=True)
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            runs[variant].append(run_child(variant, size, threads))
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {
            "wall_s": min(r["wall_s"] for r in results),
            "cpu_s": min(r["cpu_s"] for r in results),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in results),
            "peak_mb": min(r["peak_mb"] for r in results),
            "transient_mb": min(r["peak_mb"] - r["base_mb"] for r in results),
            "minflt": min(r["minflt"] for r in results),
        }
    a, b = (summary[v] for v in variants)
    print(f"  min over runs: {variants[0]} wall {a['wall_s']:.1f} s / cpu {a['cpu_s']:.1f} s / peak {a['peak_mb']:.0f} "
          f"MB (transient {a['transient_mb']:.0f} MB); {variants[1]} wall {b['wall_s']:.1f} s / cpu {b['cpu_s']:.1f} "
          f"s / peak {b['peak_mb']:.0f} MB (transient {b['transient_mb']:.0f} MB)")
    print(f"  ratio {variants[0]} / {variants[1]}: wall {a['wall_s'] / b['wall_s']:.3f}, cpu {a['cpu_s'] / b['cpu_s']:.3f}"
          f" (median cpu {a['cpu_s_median'] / b['cpu_s_median']:.3f}), peak RSS {a['peak_mb'] / b['peak_mb']:.3f}, "
          f"transient {a['transient_mb'] / b['transient_mb']:.3f}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encode-size", type=int, default=1024)
    parser.add_argument("--decode-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant for question 2")
    parser.add_argument("--encode-repeats", type=int, default=1, help="runs per variant for question 1")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--child", choices=ENCODE_VARIANTS + DECODE_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.threads)))
        return
    if not args.skip_encode:
        once = compare("1. LQ encode + untiled CFW decode: encoder twice vs once", ENCODE_VARIANTS,
                       args.encode_size, args.encode_repeats, args.threads)
        twice, single = once["encode_twice"], once["encode_once"]
        print(f"  saved by encoding once: {twice['wall_s'] - single['wall_s']:.1f} s wall, "
              f"{twice['cpu_s'] - single['cpu_s']:.1f} s cpu ({1 - single['cpu_s'] / twice['cpu_s']:.1%}), "
              f"{twice['peak_mb'] - single['peak_mb']:.0f} MB peak RSS", flush=True)
    if not args.skip_decode:
        compare("2. CFW decode: ours vs stock decoder + fusion blocks called directly", DECODE_VARIANTS,
                args.decode_size, args.repeats, args.threads)


if __name__ == "__main__":
    main()
