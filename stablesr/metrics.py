"""Image-quality metrics for super-resolution, with the field's conventions.

Weight-free metrics are implemented here with numpy/torch only:

- [`psnr`] / [`ssim`]: on the **Y channel** by default (ITU-R BT.601 "studio swing" luma, the BasicSR / pyiqa
  ``psnry`` / ``ssim`` convention used by StableSR, SeeSR, OSEDiff, ResShift ...), or on RGB with
  ``y_channel=False``; ``crop_border`` pixels are dropped on every side first (BasicSR ``crop_border``).
  Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 255] (equivalently
  16 + 65.481 r + 128.553 g + 24.966 b for r, g, b in [0, 1]); Y lies in [16, 235] and is not rounded.
  PSNR uses a peak of 255 and returns ``inf`` for identical images (no epsilon, as BasicSR).
  SSIM is BasicSR's ``calculate_ssim``: an 11x11 Gaussian window with sigma 1.5, C1 = (0.01 * 255)^2,
  C2 = (0.03 * 255)^2, statistics over the "valid" region only (no padding), mean over the map (and over channels
  for RGB). Everything is computed in float64 (BasicSR converts Y in float32; the difference is ~1e-5 dB).
- [`consistency`]: the SR3 consistency check: the SR image is downsampled back to the LQ size with antialiased
  bicubic (a = -0.5, the Matlab ``imresize`` / PIL kernel) and compared with the LQ image (MSE in [0, 1] units and
  PSNR in dB over RGB). A restoration that "explains" its input scores high; it needs no ground truth.

Learned metrics run through maintained libraries, loaded lazily and never required by the package:

============  ==================================  ===================================================
metric        default backend                     also
============  ==================================  ===================================================
``lpips``     torchmetrics (AlexNet, v0.1)        pyiqa ``lpips``
``dists``     torchmetrics >= 1.8                 pyiqa ``dists``
``fid``       torchmetrics + torch-fidelity       pyiqa ``fid`` (folder to folder)
``clipiqa``   torchmetrics multimodal (``clip_iqa``)  pyiqa ``clipiqa``
``musiq``     pyiqa ``musiq``                     -
``maniqa``    pyiqa ``maniqa-pipal``              -
``niqe``      pyiqa ``niqe``                      -
============  ==================================  ===================================================

All of them download pretrained weights on first use (torchvision / GitHub / the Hugging Face Hub) and cache them.
When the library is missing, or the weights cannot be fetched (offline, ``HF_HUB_OFFLINE=1``), a
[`MetricUnavailableError`] names the metric, what to install and that the weights download on first use.
pyiqa is an optional extra only: its license is non-commercial (PolyForm Noncommercial 1.0.0 since 2026-04); pass
``backend="pyiqa"`` to use it for every metric (that is the harness behind most published tables, e.g. OSEDiff's
``test_metrics.py``; torchmetrics' FID and CLIP-IQA implementations differ from pyiqa's, so compare numbers only
within one backend).

[`METRICS`] is the registry of names, kinds (what a metric compares with), directions and labels; [`metric_columns`] /
[`column_spec`] add the extra report columns (``consistency_mse``). [`compute_image_metrics`] computes any list of
per-image metrics for one (SR, GT, LQ) triple; ``stablesr evaluate`` and the fidelity curve both go through it.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

__all__ = [
    "METRICS",
    "ImageMetric",
    "MetricSpec",
    "MetricUnavailableError",
    "bicubic_resize",
    "column_spec",
    "compute_fid",
    "compute_image_metrics",
    "consistency",
    "fid_backend",
    "load_metric",
    "metric_columns",
    "mse",
    "parse_metric_names",
    "psnr",
    "rgb_to_y",
    "ssim",
    "to_array",
]


# ----------------------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------------------


def to_array(img: Any) -> np.ndarray:
    """An image as a float64 array in [0, 255].

    Args:
        img: a PIL image (converted to RGB; alpha is dropped), a path, or a numpy array: ``uint8`` / ``uint16``
            (scaled to [0, 255]) or float, taken as already in [0, 255]; shape (H, W, 3) for RGB or (H, W) for a
            single channel (used as it is, also for the "Y" metrics).

    Returns:
        `np.ndarray`: (H, W, 3) or (H, W), float64.
    """
    if isinstance(img, (str, os.PathLike)):
        from .image_io import load_image

        img = load_image(img).rgb
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float64)
    if isinstance(img, torch.Tensor):
        raise TypeError("pass PIL images or numpy arrays in [0, 255] (H, W[, 3]), not torch tensors")
    arr = np.asarray(img)
    if arr.dtype == np.uint16:
        arr = arr.astype(np.float64) / 257.0
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {arr.shape}")
    return arr


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma Y in [16, 235] from RGB in [0, 255] (BasicSR ``bgr2ycbcr(y_only=True)`` on RGB data, MATLAB
    ``rgb2ycbcr``): Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255. A 2-D input is returned unchanged (float64)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim == 2:
        return rgb
    return 16.0 + (rgb[..., 0] * 65.481 + rgb[..., 1] * 128.553 + rgb[..., 2] * 24.966) / 255.0


def _prepare(sr: Any, gt: Any, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_array(sr), to_array(gt)
    if a.shape != b.shape:
        raise ValueError(f"size mismatch: sr is {_shape_str(a)}, reference is {_shape_str(b)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if 2 * crop_border >= min(a.shape[:2]):
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {_shape_str(a)} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def _shape_str(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


# ----------------------------------------------------------------------------------------------------------------------
# PSNR / SSIM / MSE
# ----------------------------------------------------------------------------------------------------------------------


def mse(sr: Any, gt: Any, crop_border: int = 0, y_channel: bool = False) -> float:
    """Mean squared error in [0, 255]^2 units (over all pixels and channels)."""
    a, b = _prepare(sr, gt, crop_border, y_channel)
    return float(np.mean((a - b) ** 2))


def psnr_from_mse(value: float, peak: float = 255.0) -> float:
    """10 log10(peak^2 / mse); ``inf`` when ``mse == 0``."""
    if value == 0:
        return math.inf
    return 10.0 * math.log10(peak**2 / value)


def psnr(sr: Any, gt: Any, crop_border: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB (peak 255) on the Y channel (default) or on RGB; ``inf`` for identical images.

    Args:
        sr, gt: images (see [`to_array`]) of the same size.
        crop_border: pixels removed on each side before comparing (BasicSR ``crop_border``; 4 is common for x4).
        y_channel: BT.601 Y (default, the field's "PSNR") or all RGB channels.
    """
    return psnr_from_mse(mse(sr, gt, crop_border, y_channel))


def _gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # = cv2.getGaussianKernel(11, 1.5); the 2-D window is its outer product


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable "valid" filtering: BasicSR's ``cv2.filter2D(img, -1, outer(g, g))[5:-5, 5:-5]``."""
    rows = sliding_window_view(img, g.size, axis=0) @ g
    return sliding_window_view(rows, g.size, axis=1) @ g


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels (after crop_border), got "
                         f"{a.shape[1]}x{a.shape[0]}")
    g = _gaussian_kernel_1d()
    mu_x, mu_y, xx, yy, xy = (_filter_valid(t, g) for t in (a, b, a * a, b * b, a * b))
    sigma_x = xx - mu_x**2
    sigma_y = yy - mu_y**2
    sigma_xy = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return float(ssim_map.mean())


def ssim(sr: Any, gt: Any, crop_border: int = 0, y_channel: bool = True) -> float:
    """SSIM (BasicSR ``calculate_ssim``: 11x11 Gaussian window, sigma 1.5, valid region) on Y (default) or the mean
    over the R, G, B channels. 1.0 for identical images."""
    a, b = _prepare(sr, gt, crop_border, y_channel)
    if a.ndim == 2:
        return _ssim_channel(a, b)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


# ----------------------------------------------------------------------------------------------------------------------
# Resizing and the SR3 consistency metric
# ----------------------------------------------------------------------------------------------------------------------


def bicubic_resize(img: Any, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize (a = -0.5: Matlab ``imresize`` / PIL ``BICUBIC``) in float, no rounding.

    Args:
        img: image (see [`to_array`]).
        size: (width, height) as PIL orders it.

    Returns:
        float64 array in [0, 255] (not clipped to it), (H, W[, 3]).
    """
    arr = to_array(img)
    width, height = size
    planes = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(arr.shape[2])]
    # PIL's float ("F") resampling: the a = -0.5 kernel, stretched by the scale when downsampling (antialiasing)
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float64) for p in planes]
    return out[0] if arr.ndim == 2 else np.stack(out, axis=-1)


def consistency(sr: Any, lq: Any) -> dict[str, float]:
    """SR3 consistency: ``sr`` downsampled to ``lq``'s size (antialiased bicubic) vs ``lq``, over RGB.

    Returns:
        ``{"consistency_mse": MSE with images in [0, 1], "consistency": PSNR in dB (peak 255)}``. Higher PSNR (lower
        MSE) means the output agrees better with its input; a no-ground-truth fidelity measure.
    """
    lq_arr = to_array(lq)
    down = np.clip(bicubic_resize(sr, (lq_arr.shape[1], lq_arr.shape[0])), 0, 255)
    if down.ndim != lq_arr.ndim:
        down, lq_arr = rgb_to_y(down), rgb_to_y(lq_arr)
    value = float(np.mean((down - lq_arr) ** 2))
    return {"consistency_mse": value / 255.0**2, "consistency": psnr_from_mse(value)}


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """What a metric needs and how to read it.

    Attributes:
        name: the name used on the command line and in reports.
        kind: "fr" (needs the ground truth), "nr" (no reference), "lq" (needs the LQ input) or "set"
            (a distance between two image sets, e.g. FID: reported for the whole folder only).
        higher_is_better: direction.
        label: a short description for reports.
        backends: where it comes from, in order of preference for ``backend="auto"``.
        short_label: a plot axis title (what is compared with what).
    """

    name: str
    kind: str
    higher_is_better: bool
    label: str
    backends: tuple[str, ...] = ("builtin",)
    short_label: str = ""

    @property
    def learned(self) -> bool:
        """Whether it runs through a library with pretrained weights (see [`load_metric`] / [`compute_fid`])."""
        return self.backends != ("builtin",)


_LEARNED = ("torchmetrics", "pyiqa")
METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec("psnr", "fr", True, "PSNR dB, Y (BT.601)", short_label="PSNR-Y dB vs GT"),
        MetricSpec("ssim", "fr", True, "SSIM, Y (BT.601)", short_label="SSIM-Y vs GT"),
        MetricSpec("psnr_rgb", "fr", True, "PSNR dB, RGB", short_label="PSNR-RGB dB vs GT"),
        MetricSpec("ssim_rgb", "fr", True, "SSIM, RGB", short_label="SSIM-RGB vs GT"),
        MetricSpec("consistency", "lq", True, "SR3 consistency: PSNR dB of bicubic-down(SR) vs LQ",
                   short_label="consistency dB vs LQ"),
        MetricSpec("lpips", "fr", False, "LPIPS (AlexNet)", _LEARNED, "LPIPS vs GT"),
        MetricSpec("dists", "fr", False, "DISTS", _LEARNED, "DISTS vs GT"),
        MetricSpec("fid", "set", False, "FID, folder to folder", _LEARNED, "FID vs GT set"),
        MetricSpec("clipiqa", "nr", True, "CLIP-IQA", _LEARNED, "CLIP-IQA"),
        MetricSpec("musiq", "nr", True, "MUSIQ", ("pyiqa",), "MUSIQ"),
        MetricSpec("maniqa", "nr", True, "MANIQA (PIPAL)", ("pyiqa",), "MANIQA"),
        MetricSpec("niqe", "nr", False, "NIQE", ("pyiqa",), "NIQE"),
    )
}
BUILTIN_METRICS = tuple(name for name, spec in METRICS.items() if not spec.learned)
# Report columns a metric fills besides its own: the consistency check also reports its MSE.
EXTRA_COLUMNS: dict[str, tuple[MetricSpec, ...]] = {
    "consistency": (MetricSpec("consistency_mse", "lq", False,
                               "SR3 consistency: MSE ([0, 1] units) of bicubic-down(SR) vs LQ",
                               short_label="consistency MSE vs LQ"),),
}
# Spellings accepted on the command line (after lower-casing and dropping "-").
_ALIASES = {"psnry": "psnr", "ssimy": "ssim", "psnrrgb": "psnr_rgb", "ssimrgb": "ssim_rgb", "clip_iqa": "clipiqa",
            "clipiqa+": "clipiqa", "maniqapipal": "maniqa"}


def parse_metric_names(text: str | Sequence[str]) -> list[str]:
    """Metric names from a comma-separated string or a list: normalised (``PSNR-Y`` -> ``psnr``), de-duplicated,
    in order; `ValueError` for an unknown name or an empty list."""
    names = [m.strip().lower().replace("-", "") for m in (text.split(",") if isinstance(text, str) else text)]
    out = []
    for n in names:
        if not n:
            continue
        n = _ALIASES.get(n, n)
        if n not in METRICS:
            raise ValueError(f"unknown metric '{n}'; choose from {', '.join(METRICS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no metrics given")
    return out


def metric_columns(names: Iterable[str]) -> list[str]:
    """The report columns of ``names``, in order: each metric's own, then its extra ones (``consistency_mse``)."""
    return [c for n in names for c in (n, *(spec.name for spec in EXTRA_COLUMNS.get(n, ())))]


def column_spec(column: str) -> MetricSpec:
    """The [`MetricSpec`] of a report column: a metric of [`METRICS`] or an extra column such as ``consistency_mse``."""
    if column in METRICS:
        return METRICS[column]
    for extra in EXTRA_COLUMNS.values():
        for spec in extra:
            if spec.name == column:
                return spec
    raise KeyError(f"unknown metric column {column!r}")


# pyiqa's names for our metrics (the ones OSEDiff's test_metrics.py uses).
_PYIQA_NAMES = {"lpips": "lpips", "dists": "dists", "fid": "fid", "clipiqa": "clipiqa", "musiq": "musiq",
                "maniqa": "maniqa-pipal", "niqe": "niqe"}
_TORCHMETRICS_INSTALL = {
    "lpips": ('pip install "torchmetrics[image]"', "AlexNet weights from download.pytorch.org"),
    "dists": ('pip install "torchmetrics[image]>=1.8"', "VGG16 weights from download.pytorch.org"),
    "fid": ('pip install "torchmetrics[image]" torch-fidelity', "the FID Inception weights from GitHub"),
    "clipiqa": ('pip install "torchmetrics[multimodal]" piq', "the CLIP-IQA / CLIP weights"),
}
_PYIQA_INSTALL = ("pip install pyiqa",
                  "weights from the Hugging Face Hub repo chaofengc/IQA-PyTorch-Weights")


class MetricUnavailableError(RuntimeError):
    """A learned metric cannot run here: its library is not installed or its weights cannot be downloaded.

    Attributes:
        metric: the metric name. package: the install command to run. reason: what failed.
    """

    def __init__(self, metric: str, package: str, reason: str, weights: str = "pretrained weights"):
        self.metric, self.package, self.reason = metric, package, reason
        offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        note = (f" ({' and '.join(offline)}=1 is set, so nothing can be downloaded now: run once with network access "
                "or pre-seed the cache)") if offline else ""
        license_note = (" (pyiqa is an optional extra under a non-commercial license)" if "pyiqa" in package
                        else "")
        super().__init__(
            f"metric '{metric}' is unavailable: {reason}. Install it with `{package}`{license_note}; its {weights} "
            f"download on first use (network access needed once, then cached){note}."
        )


def _is_missing_dependency(err: BaseException) -> bool:
    """An import error, or a library's own "please install X" error (torchmetrics raises ValueError for piq)."""
    if isinstance(err, ImportError):
        return True
    text = str(err).lower()
    return "pip install" in text or "must be installed" in text or "requires that" in text


def _is_offline_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(k in text for k in ("offline", "connect", "urlopen", "resolve", "network", "download", "timed out",
                                   "localentrynotfound", "http"))


class ImageMetric:
    """A loaded learned metric: ``metric(sr, gt)`` (full reference) or ``metric(sr)`` (no reference) -> float.

    Images are PIL images, paths or numpy arrays in [0, 255] (see [`to_array`]).
    """

    def __init__(self, name: str, backend: str, fn, device: str):
        self.name, self.backend, self._fn, self.device = name, backend, fn, device
        self.spec = METRICS[name]

    def _tensor(self, img: Any) -> torch.Tensor:
        arr = to_array(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        t = torch.from_numpy(np.clip(arr, 0, 255).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        return t.to(self.device)

    @torch.no_grad()
    def __call__(self, sr: Any, gt: Any = None) -> float:
        if self.spec.kind == "fr":
            if gt is None:
                raise ValueError(f"{self.name} needs a reference image")
            return float(self._fn(self._tensor(sr), self._tensor(gt)))
        return float(self._fn(self._tensor(sr)))


def _import_backend(backend: str, name: str):
    """Import the library; MetricUnavailableError (with the install hint) when it is missing."""
    try:
        if backend == "torchmetrics":
            import torchmetrics  # noqa: F401

            return torchmetrics
        import pyiqa

        return pyiqa
    except ImportError as err:
        package = _TORCHMETRICS_INSTALL[name][0] if backend == "torchmetrics" else _PYIQA_INSTALL[0]
        weights = _TORCHMETRICS_INSTALL[name][1] if backend == "torchmetrics" else _PYIQA_INSTALL[1]
        raise MetricUnavailableError(name, package, f"{backend} is not installed ({err})", weights) from err


def _build_torchmetrics(name: str, device: str):
    if name == "lpips":
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        m = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()
    elif name == "dists":
        # the network itself: torchmetrics' Metric wrapper rebuilds it (and reloads VGG16) on every update
        from torchmetrics.functional.image.dists import DISTSNetwork

        net = DISTSNetwork().to(device).eval()
        return lambda a, b: net(a, b).mean()
    elif name == "clipiqa":
        from torchmetrics.multimodal import CLIPImageQualityAssessment

        m = CLIPImageQualityAssessment(model_name_or_path="clip_iqa", data_range=1.0).to(device).eval()
    else:  # pragma: no cover - guarded by the registry
        raise KeyError(name)

    def fn(*tensors):
        value = m(*tensors)
        m.reset()
        return value.mean()

    return fn


def _build_pyiqa(pyiqa, name: str, device: str):
    m = pyiqa.create_metric(_PYIQA_NAMES[name], device=torch.device(device), as_loss=False)
    return lambda *tensors: m(*tensors).mean()


def _resolve_backends(name: str, backend: str) -> tuple[str, ...]:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    spec = METRICS[name]
    if backend == "auto":
        return spec.backends
    if backend not in spec.backends:
        raise ValueError(f"metric {name!r} is not available from {backend!r} (only {', '.join(spec.backends)})")
    return (backend,)


def _missing_everywhere(name: str, errors: list[MetricUnavailableError]) -> MetricUnavailableError:
    if len(errors) == 1:
        return errors[0]
    package = "` or `".join(e.package for e in errors)
    reason = "; ".join(e.reason for e in errors)
    return MetricUnavailableError(name, package, reason)


def load_metric(name: str, device: str = "cpu", backend: str = "auto") -> ImageMetric:
    """Load a learned full-reference or no-reference metric (``lpips dists clipiqa musiq maniqa niqe``).

    Args:
        name: metric name (see [`METRICS`]); FID is a set metric, see [`compute_fid`].
        device: where to run it.
        backend: "auto" (the first installed library of the metric's list: torchmetrics, then pyiqa),
            "torchmetrics" or "pyiqa".

    Raises:
        `MetricUnavailableError`: no backend installed, or weights could not be loaded (e.g. offline); the message
            names the metric and the package. Once a library is found, a failure to load its weights is reported
            rather than silently switching to another library (whose numbers would differ).
    """
    spec = METRICS.get(name)
    if spec is not None and spec.kind not in ("fr", "nr"):
        raise ValueError(f"{name} is not a per-image learned metric" + ("; use compute_fid" if name == "fid" else ""))
    errors = []
    for b in _resolve_backends(name, backend):
        try:
            lib = _import_backend(b, name)
        except MetricUnavailableError as err:
            errors.append(err)
            continue
        try:
            fn = _build_torchmetrics(name, device) if b == "torchmetrics" else _build_pyiqa(lib, name, device)
        except MetricUnavailableError:
            raise
        except Exception as err:
            if not _is_missing_dependency(err):
                package = _TORCHMETRICS_INSTALL[name][0] if b == "torchmetrics" else _PYIQA_INSTALL[0]
                what = "could not download or load its weights" if _is_offline_error(err) else "failed to load"
                raise MetricUnavailableError(name, package, f"{b} {what}: {type(err).__name__}: {err}") from err
            # e.g. torchmetrics without its image/multimodal extras (torchvision, piq): try the next backend
            errors.append(MetricUnavailableError(name, _TORCHMETRICS_INSTALL[name][0] if b == "torchmetrics"
                                                 else _PYIQA_INSTALL[0], f"{b}: {err}"))
            continue
        return ImageMetric(name, b, fn, device)
    raise _missing_everywhere(name, errors)


# ----------------------------------------------------------------------------------------------------------------------
# Per-image dispatch
# ----------------------------------------------------------------------------------------------------------------------


# Weight-free full-reference metrics: name -> (function, on the Y channel).
_PIXEL_METRICS = {"psnr": (psnr, True), "ssim": (ssim, True), "psnr_rgb": (psnr, False), "ssim_rgb": (ssim, False)}


def compute_image_metrics(sr: Any, gt: Any = None, lq: Any = None, names: Sequence[str] = ("psnr", "ssim"), *,
                          crop_border: int = 0, loaded: Mapping[str, ImageMetric] | None = None
                          ) -> dict[str, float | None]:
    """The per-image metrics of one restored image: the one place that decides how each metric name is computed.

    Args:
        sr: the restored image (see [`to_array`]; alpha is ignored).
        gt: its ground truth, same size, or ``None``.
        lq: its LQ input, or ``None``.
        names: per-image metrics of [`METRICS`] ("fr", "nr" or "lq" kind; FID is a set metric, see [`compute_fid`]).
        crop_border: pixels dropped on each side for ``psnr``, ``ssim``, ``psnr_rgb`` and ``ssim_rgb``.
        loaded: the learned metrics among ``names``, from [`load_metric`], by name.

    Returns:
        ``{column: value}`` for every column of [`metric_columns`] ``(names)``; ``None`` where a metric needs a ground
        truth or LQ image that was not given.
    """
    loaded = loaded or {}
    values: dict[str, float | None] = {}
    for name in names:
        spec = METRICS.get(name)
        if spec is None:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if spec.kind == "set":
            raise ValueError(f"{name} is a set metric, not a per-image one; use compute_fid")
        reference = {"fr": gt, "lq": lq, "nr": sr}[spec.kind]
        if reference is None:
            values.update(dict.fromkeys(metric_columns([name])))
        elif name in _PIXEL_METRICS:
            fn, y_channel = _PIXEL_METRICS[name]
            values[name] = fn(sr, gt, crop_border, y_channel=y_channel)
        elif name == "consistency":
            values.update(consistency(sr, lq))
        elif name not in loaded:
            raise ValueError(f"{name} is a learned metric: load it with load_metric and pass it in `loaded`")
        else:
            values[name] = loaded[name](sr, gt) if spec.kind == "fr" else loaded[name](sr)
    return values


# ----------------------------------------------------------------------------------------------------------------------
# FID (set to set)
# ----------------------------------------------------------------------------------------------------------------------


def fid_backend(backend: str = "auto") -> str:
    """Pick the FID backend (and check it imports); MetricUnavailableError when none is usable."""
    errors = []
    for b in _resolve_backends("fid", backend):
        try:
            _import_backend(b, "fid")
            if b == "torchmetrics":
                try:
                    import torch_fidelity  # noqa: F401
                except ImportError as err:
                    raise MetricUnavailableError("fid", _TORCHMETRICS_INSTALL["fid"][0],
                                                 f"torch-fidelity is not installed ({err})",
                                                 _TORCHMETRICS_INSTALL["fid"][1]) from err
            return b
        except MetricUnavailableError as err:
            errors.append(err)
    raise _missing_everywhere("fid", errors)


def _as_image_list(images: str | os.PathLike | Iterable[Any]) -> list[Any]:
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        from .image_io import iter_image_files

        return list(iter_image_files(images))
    if isinstance(images, (str, os.PathLike)):
        raise ValueError(f"'{images}' is not a folder")
    if isinstance(images, Sequence):  # keep lazy sequences lazy
        return images
    return list(images)


def compute_fid(sr_images: str | os.PathLike | Iterable[Any], gt_images: str | os.PathLike | Iterable[Any],
                device: str = "cpu", backend: str = "auto") -> float:
    """FID between two image sets (folders, or lists of PIL images / paths / arrays), as the SR papers do it:
    restored folder vs ground-truth folder. With ~100 images it is high (>100) and noisy; compare methods only on the
    same set. torchmetrics: Inception-v3 pool features (2048), images resized to 299 internally. pyiqa: its
    ``fid`` (clean-fid style) folder-to-folder."""
    b = fid_backend(backend)
    sr_list, gt_list = _as_image_list(sr_images), _as_image_list(gt_images)
    if len(sr_list) < 2 or len(gt_list) < 2:
        raise ValueError("FID needs at least 2 images per set")
    try:
        if b == "torchmetrics":
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(feature=2048, normalize=False).to(device)
            for images, real in ((gt_list, True), (sr_list, False)):
                for img in images:
                    arr = np.clip(np.rint(to_array(img)), 0, 255).astype(np.uint8)
                    if arr.ndim == 2:
                        arr = np.repeat(arr[..., None], 3, axis=2)
                    fid.update(torch.from_numpy(arr).permute(2, 0, 1)[None].to(device), real=real)
            return float(fid.compute())
        import pyiqa

        metric = pyiqa.create_metric("fid", device=torch.device(device))
        with tempfile.TemporaryDirectory() as tmp:
            dirs = []
            for tag, images in (("sr", sr_list), ("gt", gt_list)):
                folder = _as_folder(sr_images if tag == "sr" else gt_images, images, Path(tmp) / tag)
                dirs.append(str(folder))
            return float(metric(dirs[0], dirs[1]))
    except MetricUnavailableError:
        raise
    except Exception as err:
        package = _TORCHMETRICS_INSTALL["fid"][0] if b == "torchmetrics" else _PYIQA_INSTALL[0]
        if _is_offline_error(err) or isinstance(err, (OSError, ImportError)):
            reason = f"{b} could not load FID: {type(err).__name__}: {err}"
            raise MetricUnavailableError("fid", package, reason) from err
        raise


def _as_folder(original, images: list[Any], tmp: Path) -> Path:
    if isinstance(original, (str, os.PathLike)) and Path(original).is_dir():
        return Path(original)
    tmp.mkdir(parents=True)
    for i, img in enumerate(images):
        arr = np.clip(np.rint(to_array(img)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp / f"{i:06d}.png")
    return tmp
