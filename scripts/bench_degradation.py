"""Speed and distribution check of ``stablesr.degradation`` against BasicSR's Real-ESRGAN degradation (CPU).

Both pipelines degrade the same 512x512 crops with the same table (StableSR 512 by default). The BasicSR side
drives BasicSR's own functions (kernel sampling as in ``RealESRGANDataset``, ``filter2D``, ``USMSharp``,
``random_add_{gaussian,poisson}_noise_pt``, ``DiffJPEG``) in the order of StableSR's ``get_input``.

Printed:
1. throughput (images/s, kernel sampling and USM included) of both, and the ratio;
2. operation parity on identical inputs and parameters (kernels, filter2D, USM, JPEG): max abs differences;
3. distributions that cannot be compared sample by sample because the random streams differ: kernel spread,
   noise strength, and end to end PSNR(bicubic-upsampled LQ, target) and LQ high-frequency energy, with
   mean/std/quantiles and a two-sample Kolmogorov-Smirnov test.

BasicSR is a benchmark-only dependency; keep it out of the main environment::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-bench/bin/pip install basicsr-fixed opencv-python-headless scipy scikit-image
    .venv-bench/bin/pip install -e .
    .venv-bench/bin/python scripts/bench_degradation.py
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stablesr.degradation import (
    DegradationConfig,
    RealESRGANDegradation,
    add_noise,
    apply,
    blur_kernels,
    filter2d,
    jpeg_compress,
    sample_params,
    sinc_kernels,
)

logger = logging.getLogger("bench_degradation")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "degradation" / "stablesr.yaml"))
    parser.add_argument("--num_crops", type=int, default=32)
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8, help="batch of the speed pass")
    parser.add_argument("--repeats", type=int, default=2, help="degradations per crop in the distribution pass")
    parser.add_argument("--dist_batch_size", type=int, default=4, help="batch of the distribution pass")
    parser.add_argument("--num_kernels", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------- #
# Data
# ----------------------------------------------------------------------------------------------------------------- #


def _synthetic(rng: np.random.Generator, size: int) -> np.ndarray:
    # Sum of oriented gratings, a few hard-edged shapes and fine noise: textures with edges at many scales.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(6):
        freq, angle, phase = rng.uniform(2, 60), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        img += wave[..., None] * rng.uniform(0.02, 0.12, size=3)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.25)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] += rng.uniform(-0.3, 0.3, size=3)
    img += rng.normal(0, 0.02, size=img.shape)
    return np.clip(img - img.min() + rng.uniform(0, 0.2), 0, 1)


def load_crops(num: int, size: int, seed: int) -> torch.Tensor:
    """(num, 3, size, size) crops in [0, 1] of scikit-image photos (upscaled where smaller), else synthetic."""
    rng = np.random.default_rng(seed)
    sources = []
    try:
        import skimage.data
        from PIL import Image

        names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]
        names += ["camera", "brick", "grass", "gravel", "moon"]
        for name in names:
            try:
                img = getattr(skimage.data, name)()
            except Exception as err:  # some images are fetched on demand; skip what is not bundled
                logger.info(f"skimage.data.{name} unavailable: {err}")
                continue
            img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
            h, w = img.shape[:2]
            if min(h, w) < size + 64:
                factor = (size + 64) / min(h, w)
                img = np.asarray(Image.fromarray(img).resize((round(w * factor), round(h * factor)), Image.BICUBIC))
            sources.append(img.astype(np.float32) / 255.0)
    except ImportError:
        logger.warning("scikit-image not installed: using synthetic textures only")
    crops = []
    for i in range(num):
        if sources and i % 4 != 3:  # three photo crops for every synthetic texture
            img = sources[int(rng.integers(len(sources)))]
            top, left = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
            crop = img[top : top + size, left : left + size]
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        else:
            crop = _synthetic(rng, size)
        crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
    return torch.stack(crops).float()


# ----------------------------------------------------------------------------------------------------------------- #
# BasicSR reference (StableSR get_input order), driven with BasicSR's own functions
# ----------------------------------------------------------------------------------------------------------------- #


class BasicSRReference:
    def __init__(self, config: DegradationConfig):
        from basicsr.data.degradations import (
            circular_lowpass_kernel,
            random_add_gaussian_noise_pt,
            random_add_poisson_noise_pt,
            random_mixed_kernels,
        )
        from basicsr.utils import DiffJPEG, USMSharp
        from basicsr.utils.img_process_util import filter2D

        if len(config.stages) != 2:
            raise ValueError("the BasicSR reference has exactly two stages")
        self.config = config
        self.random_mixed_kernels = random_mixed_kernels
        self.circular_lowpass_kernel = circular_lowpass_kernel
        self.gaussian = random_add_gaussian_noise_pt
        self.poisson = random_add_poisson_noise_pt
        self.filter2D = filter2D
        diffjpeg = DiffJPEG(differentiable=False)
        # DiffJPEG returns a permuted (channels-last) tensor; with recent torch, F.pad keeps that layout and
        # filter2D's .view() then fails, so make it contiguous (values unchanged).
        self.jpeger = lambda x, quality: diffjpeg(x, quality=quality).contiguous()
        self.diffjpeg = diffjpeg
        self.usm = USMSharp(radius=config.usm_radius)

    def kernel(self, stage) -> np.ndarray:
        # RealESRGANDataset.__getitem__: size from 7..21 odd, sinc with cutoff range switching at 13, pad to 21.
        k = stage.kernel
        kernel_range = list(range(k.kernel_size_range[0], k.kernel_size_range[1] + 1, 2))
        kernel_size = random.choice(kernel_range)
        if np.random.uniform() < k.sinc_prob:
            lo, hi = k.sinc_cutoff_range if kernel_size < 13 else k.sinc_cutoff_range_large
            kernel = self.circular_lowpass_kernel(np.random.uniform(lo * np.pi, hi * np.pi), kernel_size, pad_to=False)
        else:
            kernel = self.random_mixed_kernels(
                list(k.kernel_list),
                list(k.kernel_prob),
                kernel_size,
                k.sigma_range,
                k.sigma_range,
                [-math.pi, math.pi],
                k.betag_range,
                k.betap_range,
                noise_range=None,
            )
        pad = (k.kernel_size_range[1] - kernel_size) // 2
        return np.pad(kernel, ((pad, pad), (pad, pad)))

    def sinc_kernel(self) -> np.ndarray:
        cfg = self.config.final_sinc
        size = cfg.kernel_size_range[1]
        if np.random.uniform() < self.config.final_sinc_prob:
            kernel_size = random.choice(list(range(cfg.kernel_size_range[0], size + 1, 2)))
            omega = np.random.uniform(cfg.cutoff_range[0] * np.pi, cfg.cutoff_range[1] * np.pi)
            return self.circular_lowpass_kernel(omega, kernel_size, pad_to=size)
        pulse = np.zeros((size, size))
        pulse[size // 2, size // 2] = 1
        return pulse

    def _resize(self, out, stage, size=None, scale_base=None):
        updown = random.choices(["up", "down", "keep"], stage.resize_prob)[0]
        if updown == "up":
            scale = random.uniform(1, stage.resize_range[1])
        elif updown == "down":
            scale = random.uniform(stage.resize_range[0], 1)
        else:
            scale = 1
        mode = random.choice(list(stage.resize_modes))
        if scale_base is None:
            return F.interpolate(out, scale_factor=scale, mode=mode)
        return F.interpolate(out, size=(int(scale_base[0] * scale), int(scale_base[1] * scale)), mode=mode)

    def _noise(self, out, stage):
        if random.random() < stage.gaussian_noise_prob:
            return self.gaussian(
                out, sigma_range=stage.noise_range, clip=True, rounds=False, gray_prob=stage.gray_noise_prob
            )
        return self.poisson(
            out, scale_range=stage.poisson_scale_range, gray_prob=stage.gray_noise_prob, clip=True, rounds=False
        )

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, gt_usm: torch.Tensor | None = None):
        cfg, (s1, s2) = self.config, self.config.stages
        b = gt.shape[0]
        kernel1 = torch.from_numpy(np.stack([self.kernel(s1) for _ in range(b)])).float()
        kernel2 = torch.from_numpy(np.stack([self.kernel(s2) for _ in range(b)])).float()
        sinc = torch.from_numpy(np.stack([self.sinc_kernel() for _ in range(b)])).float()
        if gt_usm is None:
            gt_usm = self.usm(gt, weight=cfg.usm_weight, threshold=cfg.usm_threshold) if cfg.use_usm else gt
        h, w = gt.shape[-2:]
        out = self.filter2D(gt_usm, kernel1)
        out = self._resize(out, s1)
        out = self._noise(out, s1)
        quality = out.new_zeros(b).uniform_(*s1.jpeg_range)
        out = self.jpeger(torch.clamp(out, 0, 1), quality=quality)
        if random.random() < s2.blur_prob:
            out = self.filter2D(out, kernel2)
        out = self._resize(out, s2, scale_base=(h / cfg.scale, w / cfg.scale))
        out = self._noise(out, s2)
        lq_size = (h // cfg.scale, w // cfg.scale)
        if random.random() < cfg.sinc_before_jpeg_prob:
            out = F.interpolate(out, size=lq_size, mode=random.choice(list(cfg.final_resize_modes)))
            out = self.filter2D(out, sinc)
            quality = out.new_zeros(b).uniform_(*s2.jpeg_range)
            out = self.jpeger(torch.clamp(out, 0, 1), quality=quality)
        else:
            quality = out.new_zeros(b).uniform_(*s2.jpeg_range)
            out = self.jpeger(torch.clamp(out, 0, 1), quality=quality)
            out = F.interpolate(out, size=lq_size, mode=random.choice(list(cfg.final_resize_modes)))
            out = self.filter2D(out, sinc)
        lq = torch.clamp(out, 0, 1)
        if cfg.round_lq:
            lq = torch.clamp((lq * 255.0).round(), 0, 255) / 255.0
        # StableSR: whole batch replaced on NaN or with prob no_degradation_prob (here at LQ size, like ours).
        if random.random() < cfg.no_degradation_prob or torch.isnan(lq).any():
            lq = F.interpolate(gt_usm, size=lq_size, mode="area")
        return lq, gt_usm


# ----------------------------------------------------------------------------------------------------------------- #
# Statistics
# ----------------------------------------------------------------------------------------------------------------- #


def psnr_up(lq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(lq, size=target.shape[-2:], mode="bicubic").clamp(0, 1)
    mse = ((up - target) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def hf_energy(lq: torch.Tensor) -> torch.Tensor:
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    gray = lq.mean(1, keepdim=True)
    return F.conv2d(gray, lap).flatten(1).std(1) * 255


def kernel_spread(kernels: torch.Tensor) -> torch.Tensor:
    """RMS radius sqrt(sum k r^2) in pixels of (N, K, K) kernels (sinc kernels can give small negative sums)."""
    size = kernels.shape[-1]
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    r2 = ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2
    return (kernels.double() * r2).sum((-2, -1)).clamp_min(0).sqrt()


def summary(name: str, values) -> str:
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    qs = " ".join(f"{x:7.3f}" for x in q)
    return f"  {name:<34s} n={len(v):5d} mean={v.mean():8.3f} std={v.std():7.3f} q05/25/50/75/95= {qs}"


def compare(name: str, ours, theirs) -> None:
    print(summary(f"{name} [ours]", ours))
    print(summary(f"{name} [basicsr]", theirs))
    try:
        from scipy.stats import ks_2samp

        res = ks_2samp(np.asarray(ours), np.asarray(theirs))
        print(f"  {'':<34s} KS statistic={res.statistic:.3f} p={res.pvalue:.3f}")
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------------------------- #
# Sections
# ----------------------------------------------------------------------------------------------------------------- #


def bench_speed(config, crops, batch_size, seed, reference):
    ours = RealESRGANDegradation(config)
    generator = torch.Generator().manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ours(crops[:2], generator)  # warm-up (oneDNN primitive creation)
    if reference is not None:
        reference(crops[:2])
    # Batches alternate between the two pipelines so that both see the same machine load.
    elapsed = {"ours": 0.0, "basicsr": 0.0}
    ours_out, ref_out = [], []
    for i in range(0, len(crops), batch_size):
        batch = crops[i : i + batch_size]
        t0 = time.perf_counter()
        ours_out.append(ours(batch, generator))
        elapsed["ours"] += time.perf_counter() - t0
        if reference is not None:
            t0 = time.perf_counter()
            ref_out.append(reference(batch))
            elapsed["basicsr"] += time.perf_counter() - t0
    speeds = {name: len(crops) / t for name, t in elapsed.items() if t > 0}
    return speeds, ours_out, (ref_out if reference is not None else None)


def parity(config, crops, ours_out, ref_out) -> None:
    from basicsr.data.degradations import (
        bivariate_Gaussian,
        bivariate_generalized_Gaussian,
        bivariate_plateau,
        circular_lowpass_kernel,
    )
    from basicsr.utils import DiffJPEG
    from basicsr.utils.img_process_util import filter2D

    rng = np.random.default_rng(1)
    worst = {"gaussian": 0.0, "generalized": 0.0, "plateau": 0.0, "sinc": 0.0}
    for _ in range(200):
        size = int(rng.choice(np.arange(7, 22, 2)))
        sx, sy, theta = rng.uniform(0.2, 3), rng.uniform(0.2, 3), rng.uniform(-np.pi, np.pi)
        beta, omega = rng.uniform(0.5, 4), rng.uniform(np.pi / 5, np.pi)
        t = [torch.tensor([v]) for v in (size, sx, sy, theta)]
        pairs = {
            "gaussian": (bivariate_Gaussian(size, sx, sy, theta, isotropic=False), 1.0, False),
            "generalized": (bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=False), beta, False),
            "plateau": (bivariate_plateau(size, sx, sy, theta, beta, isotropic=False), beta, True),
        }
        pad = (21 - size) // 2
        for name, (ref, b, plateau) in pairs.items():
            ours = blur_kernels(*t, torch.tensor([b]), torch.tensor([plateau]), 21)[0]
            ref = torch.from_numpy(np.pad(ref, pad))
            worst[name] = max(worst[name], float((ours - ref).abs().max()))
        ours = sinc_kernels(torch.tensor([size]), torch.tensor([omega]), 21)[0]
        ref = torch.from_numpy(circular_lowpass_kernel(omega, size, pad_to=21))
        worst["sinc"] = max(worst["sinc"], float((ours - ref).abs().max()))
    print("operation parity (identical inputs and parameters; max abs difference):")
    for name, value in worst.items():
        print(f"  kernel {name:<12s} {value:.2e}  (200 random parameter sets, float64)")

    x = crops[:4]
    kernels = torch.from_numpy(
        np.stack([bivariate_Gaussian(21, s, s, 0, isotropic=True) for s in (0.5, 1.0, 2.0, 3.0)])
    ).float()
    print(f"  filter2D                {float((filter2d(x, kernels) - filter2D(x, kernels)).abs().max()):.2e}")
    if ref_out is not None:
        ours_usm = torch.cat([o[1] for o in ours_out])
        ref_usm = torch.cat([r[1] for r in ref_out])
        diff = (ours_usm - ref_usm).abs()
        print(f"  USM (all crops)         {float(diff.max()):.2e}  mean {float(diff.mean()):.2e}")
    jpeger = DiffJPEG(differentiable=False).requires_grad_(False)
    small = F.interpolate(crops[:8], scale_factor=0.37, mode="bicubic").clamp(0, 1)  # odd size: padding path
    quality = torch.tensor([30.0, 45.5, 60.0, 72.3, 85.0, 95.0, 99.0, 100.0])
    ours_jpeg = jpeg_compress(small, quality)
    ref_jpeg = jpeger(small, quality=quality.clone())
    diff = (ours_jpeg - ref_jpeg).abs()
    print(
        f"  JPEG vs DiffJPEG        {float(diff[:7].max()):.2e}  (q 30..99, {tuple(small.shape[-2:])}); "
        f"pixels off by > 0.5/255: {float((diff[:7] > 0.5 / 255).float().mean()):.2e}"
    )
    print(
        f"  JPEG q=100              ours finite={bool(torch.isfinite(ours_jpeg[7]).all())}, "
        f"DiffJPEG finite={bool(torch.isfinite(ref_jpeg[7]).all())}"
    )
    try:
        import io

        from PIL import Image

        errs = []
        for img, q in zip(small[:7], quality[:7], strict=True):
            buf = io.BytesIO()
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(buf, format="JPEG", quality=int(round(float(q))))
            pil = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255).permute(2, 0, 1)
            errs.append(float((jpeg_compress(img[None], q)[0] - pil).abs().mean() * 255))
        print(f"  JPEG vs PIL/libjpeg     mean abs diff per quality (0..255 scale): {np.round(errs, 2).tolist()}")
    except ImportError:
        pass


def kernel_distribution(config, num, seed, reference):
    print(f"kernel sampling ({num} kernels per stage): RMS radius of the kernel, pixels")
    generator = torch.Generator().manual_seed(seed)
    for index, stage in enumerate(config.stages):
        ours = []
        for _ in range(num // 500):
            params = sample_params(config, 500, generator)
            ours.append(params.stages[index].kernel)
        ours = torch.cat(ours)
        if reference is None:
            print(summary(f"stage {index + 1} [ours]", kernel_spread(ours)))
            continue
        random.seed(seed)
        np.random.seed(seed)
        theirs = torch.from_numpy(np.stack([reference.kernel(stage) for _ in range(len(ours))]))
        if stage.blur_prob < 1:  # BasicSR draws the second-blur coin in the model, per batch
            keep = torch.from_numpy(np.random.uniform(size=len(theirs)) < stage.blur_prob)
            theirs[~keep] = 0
            theirs[~keep, 10, 10] = 1
        compare(f"stage {index + 1} kernel RMS radius", kernel_spread(ours), kernel_spread(theirs))
        print(f"  {'':<34s} sum-to-1 max err ours {float((ours.sum((-2, -1)) - 1).abs().max()):.1e}")


def noise_distribution(crops, reference_available):
    print("noise on the same images (sigma 10 / Poisson scale 1): std of the added noise x255; R-G correlation")
    x = F.interpolate(crops[:8], scale_factor=0.25, mode="area")
    b = x.shape[0]
    for gray in (False, True):
        for kind in ("gaussian", "poisson"):
            flags = torch.full((b,), gray)
            ours = add_noise(
                x, torch.full((b,), kind == "gaussian"), torch.full((b,), 10.0), torch.ones(b), flags, torch.arange(b)
            )
            ours = ours - x
            line = f"  {kind:<8s} gray={gray!s:<5s} ours std {float(ours.std() * 255):6.3f} corr {_corr(ours):5.3f}"
            if reference_available:
                from basicsr.data.degradations import add_gaussian_noise_pt, add_poisson_noise_pt

                torch.manual_seed(0)
                if kind == "gaussian":
                    ref = add_gaussian_noise_pt(x, sigma=torch.full((b,), 10.0), gray_noise=flags.float())
                else:
                    ref = add_poisson_noise_pt(x, scale=torch.ones(b), gray_noise=flags.float())
                ref = ref - x
                line += f" | basicsr std {float(ref.std() * 255):6.3f} corr {_corr(ref):5.3f}"
            print(line)


def _corr(noise: torch.Tensor) -> float:
    r, g = noise[:, 0].flatten(), noise[:, 1].flatten()
    return float(torch.corrcoef(torch.stack([r, g]))[0, 1])


def end_to_end(config, crops, usm_crops, repeats, batch_size, seed, reference):
    print(f"end to end on {len(crops)} crops x {repeats} repeats (batch {batch_size}, USM source precomputed)")
    generator = torch.Generator().manual_seed(seed + 1)
    random.seed(seed + 1)
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    stats = {"ours": ([], []), "basicsr": ([], [])}
    for _ in range(repeats):
        for i in range(0, len(crops), batch_size):
            gt, target = crops[i : i + batch_size], usm_crops[i : i + batch_size]
            params = sample_params(config, gt.shape[0], generator)
            lq = apply(gt, params, config, gt_usm=target)
            stats["ours"][0].append(psnr_up(lq, target))
            stats["ours"][1].append(hf_energy(lq))
            if reference is not None:
                lq_ref, _ = reference(gt, gt_usm=target)
                stats["basicsr"][0].append(psnr_up(lq_ref, target))
                stats["basicsr"][1].append(hf_energy(lq_ref))
    for index, name in enumerate(("PSNR(up(LQ), target) dB", "LQ Laplacian std x255")):
        ours = torch.cat(stats["ours"][index]).numpy()
        if reference is None:
            print(summary(f"{name} [ours]", ours))
        else:
            compare(name, ours, torch.cat(stats["basicsr"][index]).numpy())


def main(args):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    config = DegradationConfig.from_yaml(args.config)
    try:
        reference = BasicSRReference(config)
    except ImportError as err:
        reference = None
        print(
            f"basicsr is not importable ({err}); only our pipeline is measured.\n"
            "Install it in a separate venv: pip install basicsr-fixed opencv-python-headless scipy (see this "
            "script's docstring)."
        )
    crops = load_crops(args.num_crops, args.crop_size, args.seed)
    print(
        f"config {args.config}; {len(crops)} crops {args.crop_size}x{args.crop_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU"
    )
    speeds, ours_out, ref_out = bench_speed(config, crops, args.batch_size, args.seed, reference)
    line = f"throughput (batch {args.batch_size}, full pipeline incl. kernels + USM): ours {speeds['ours']:.2f} img/s"
    if reference is not None:
        line += f", basicsr {speeds['basicsr']:.2f} img/s, ratio {speeds['ours'] / speeds['basicsr']:.1f}x"
    print(line)
    if reference is not None:
        parity(config, crops, ours_out, ref_out)
    kernel_distribution(config, args.num_kernels, args.seed, reference)
    noise_distribution(crops, reference is not None)
    usm_crops = torch.cat([o[1] for o in ours_out]) if config.use_usm else crops
    end_to_end(config, crops, usm_crops, args.repeats, args.dist_batch_size, args.seed, reference)


if __name__ == "__main__":
    main(parse_args())
