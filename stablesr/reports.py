"""Rendering metric results: the ``stablesr evaluate`` report as a terminal table, CSV, JSON and a self-contained HTML
page with zoomable crops, plus the JSON / CSV helpers the fidelity curve shares.

Every file is written atomically ([`stablesr.file_utils`]): a crash leaves the previous file or the complete new one.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import metrics as M
from .evaluate import EvaluationReport, bicubic_baseline
from .file_utils import atomic_write_bytes, atomic_write_text
from .image_io import ImageLoadError, load_image

__all__ = [
    "format_table",
    "json_safe",
    "missing_lines",
    "pick_crops",
    "protocol_line",
    "report_dict",
    "write_csv",
    "write_csv_rows",
    "write_html",
    "write_json",
    "write_json_data",
]


# ----------------------------------------------------------------------------------------------------------------------
# Shared writers
# ----------------------------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings "inf" / "-inf" / "nan" (strict JSON has no such numbers; PSNR
    of identical images is inf) and paths as strings, recursively through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(x) for x in value]
    return value


def write_json_data(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented strict JSON (see [`json_safe`]), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def write_csv_rows(rows: Iterable[Iterable[Any]], path: str | Path) -> Path:
    """Write rows as CSV (UTF-8, ``\\r\\n`` line ends as the csv module writes them), atomically."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _number(value: Any) -> str:
    """A CSV cell: empty for None, else the float's repr (full precision, ``inf`` as "inf")."""
    return "" if value is None else repr(float(value))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation report: terminal table, CSV, JSON
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "nan"
        if column == "consistency_mse":
            return f"{value:.3e}"
        if column.startswith(("psnr", "consistency", "fid", "musiq")):
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def protocol_line(report: EvaluationReport) -> str:
    """One line naming the protocol, the crop border and the color space."""
    p = report.protocol
    scale = f", scale x{p['scale']:g}" if p.get("scale") else ""
    return (f"protocol: {p['description']} [{p['source']}]{scale}; crop border {p['crop_border']} px; "
            "PSNR/SSIM on Y (BT.601)")


def format_table(report: EvaluationReport, max_name: int = 28) -> str:
    """The terminal table: one line per image (SR), then the SR mean and the baselines' means (bicubic,
    Real-ESRGAN)."""
    cols = [c for c in M.metric_columns(report.metrics) if c != "consistency_mse"]
    set_cols = [c for c in cols if M.column_spec(c).kind == "set"]
    arrows = {c: ("↑" if M.column_spec(c).higher_is_better else "↓") for c in cols}
    header = ["image"] + [f"{c}{arrows[c]}" for c in cols]
    lines = []
    body = []
    for r in report.rows:
        if r["method"] != "sr":
            continue
        body.append([r["name"][:max_name]] + ["" if c in set_cols else _fmt(r.get(c), c) for c in cols])
    for method in report.means:
        label = "mean SR" if method == "sr" else f"mean {report.method_label(method)}"
        body.append([f"{label} ({report.counts[method]})"] + [_fmt(report.means[method].get(c), c) for c in cols])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(row[0].ljust(widths[0]) if i == 0 else row[i].rjust(widths[i])  # noqa: E731
                                    for i in range(len(row))) if row else ""
    lines.append(protocol_line(report))
    lines.append(fmt_row(header))
    lines.append("-" * len(lines[-1]))
    n_images = sum(1 for r in report.rows if r["method"] == "sr")
    for i, row in enumerate(body):
        if i == n_images:
            lines.append("-" * len(lines[1]))
        lines.append(fmt_row(row))
    lines.extend(missing_lines(report))
    for name, msg in report.errors:
        lines.append(f"error: {name}: {msg}")
    for w in report.protocol.get("warnings", []):
        lines.append(f"warning: {w}")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def missing_lines(report: EvaluationReport, limit: int = 10) -> list[str]:
    """One line per kind of unpaired file (see [`stablesr.evaluate.pair_folders`]), naming up to ``limit`` files."""
    labels = {"sr_without_gt": "SR files without a GT file", "gt_without_sr": "GT files without an SR file",
              "lq_missing": "pairs without an LQ file (no bicubic row / consistency for them)",
              "lq_without_pair": "LQ files without an SR/GT pair", "duplicates": "duplicate names"}
    lines = []
    for key, label in labels.items():
        items = report.missing.get(key) or []
        if items:
            shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
            lines.append(f"missing: {len(items)} {label}: {shown}")
    return lines


def write_csv(report: EvaluationReport, path: str | Path) -> Path:
    """Per-image rows (``method`` sr / bicubic), then ``MEAN`` rows per method (FID only there)."""
    cols = M.metric_columns(report.metrics)
    set_cols = [c for c in cols if M.column_spec(c).kind == "set"]
    rows = [["name", "method", "width", "height"] + cols]
    for r in report.rows:
        rows.append([r["name"], r["method"], r["width"], r["height"]]
                    + ["" if c in set_cols else _number(r.get(c)) for c in cols])
    for method, values in report.means.items():
        rows.append(["MEAN", method, "", ""] + [_number(values.get(c)) for c in cols])
    return write_csv_rows(rows, path)


def report_dict(report: EvaluationReport) -> dict[str, Any]:
    """The report as JSON-ready data (see [`json_safe`])."""
    return json_safe({
        "protocol": report.protocol,
        "metrics": {n: {"label": M.METRICS[n].label, "higher_is_better": M.METRICS[n].higher_is_better,
                        "backend": report.backends.get(n)} for n in report.metrics},
        "settings": report.settings,
        "mean": report.means,
        "count": report.counts,
        "per_image": report.rows,
        "missing": report.missing,
        "errors": [{"name": n, "error": e} for n, e in report.errors],
        "notes": report.notes,
    })


def write_json(report: EvaluationReport, path: str | Path) -> Path:
    """The whole report; non-finite numbers (PSNR of identical images) are written as the strings "inf" / "nan"."""
    return write_json_data(report_dict(report), path)


# ----------------------------------------------------------------------------------------------------------------------
# HTML report
# ----------------------------------------------------------------------------------------------------------------------


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _window_sums(values: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, list[int], list[int]]:
    h, w = values.shape
    integral = np.pad(values.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = list(range(0, h - size + 1, stride)) or [0]
    xs = list(range(0, w - size + 1, stride)) or [0]
    if ys[-1] != h - size:
        ys.append(max(0, h - size))
    if xs[-1] != w - size:
        xs.append(max(0, w - size))
    sums = np.array([[integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
                      for x in xs] for y in ys])
    return sums, ys, xs


def pick_crops(sr: Image.Image, gt: Image.Image, size: int = 128, count: int = 2) -> list[tuple[str, tuple]]:
    """Crop boxes worth looking at: where SR differs most from GT, then the most detailed GT region elsewhere."""
    size = min(size, sr.width, sr.height)
    y_sr, y_gt = M.rgb_to_y(M.to_array(sr)), M.rgb_to_y(M.to_array(gt))
    err = np.abs(y_sr - y_gt)
    gy, gx = np.gradient(y_gt)
    detail = np.hypot(gx, gy)
    boxes: list[tuple[str, tuple]] = []
    for label, score in (("largest SR-GT difference", err), ("most GT detail", detail)):
        sums, ys, xs = _window_sums(score, size, max(1, size // 4))
        for idx in np.argsort(sums, axis=None)[::-1]:
            y, x = ys[idx // len(xs)], xs[idx % len(xs)]
            box = (x, y, x + size, y + size)
            overlap = any(min(b[2], box[2]) - max(b[0], box[0]) > size // 2 and
                          min(b[3], box[3]) - max(b[1], box[1]) > size // 2 for _, b in boxes)
            if not overlap:
                boxes.append((label, box))
                break
        if len(boxes) >= count:
            break
    return boxes


_HTML_STYLE = """
:root { --z: 2; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #f3f3f3; }
.crops { display: flex; flex-wrap: wrap; gap: 6px; margin: .3em 0 1em; cursor: zoom-in; }
.crops.big { --zz: 2; cursor: zoom-out; }
figure { margin: 0; }
figure img { width: calc(var(--z) * var(--zz, 1) * var(--w) * 1px); image-rendering: pixelated;
             image-rendering: crisp-edges; border: 1px solid #999; display: block; }
figcaption { font-size: 12px; text-align: center; }
.controls { position: sticky; top: 0; background: #fff; padding: .4em 0; border-bottom: 1px solid #ddd; }
.warn { color: #a00; }
"""

_HTML_SCRIPT = """
const z = document.getElementById('zoom'), zl = document.getElementById('zoomlabel');
z.addEventListener('input', () => { document.documentElement.style.setProperty('--z', z.value);
                                      zl.textContent = z.value + 'x'; });
document.querySelectorAll('.crops').forEach(c => c.addEventListener('click', () => c.classList.toggle('big')));
"""


def write_html(report: EvaluationReport, path: str | Path, max_images: int = 20, crop_size: int = 128,
               crops_per_image: int = 2) -> Path:
    """A self-contained HTML report: protocol, the metric table, and per image side-by-side crops (LQ nearest-
    upscaled, bicubic, the learned baseline such as Real-ESRGAN when its outputs were saved, SR, GT) embedded as PNG
    data URIs, zoomable (slider; click a row of crops to double it)."""
    esc = html.escape
    cols = [c for c in M.metric_columns(report.metrics) if c != "consistency_mse"]
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>stablesr evaluation</title>",
           f"<style>{_HTML_STYLE}</style></head><body>", "<h1>stablesr evaluation</h1>",
           f"<p>{esc(protocol_line(report))}</p>"]
    out.append("<p>SR: <code>{}</code> &nbsp; GT: <code>{}</code>{}</p>".format(
        esc(str(report.settings.get("sr_dir"))), esc(str(report.settings.get("gt_dir"))),
        f" &nbsp; LQ: <code>{esc(str(report.settings['lq_dir']))}</code>" if report.settings.get("lq_dir") else ""))
    out.append("<p>" + ", ".join(f"{esc(n)} ({'higher' if M.METRICS[n].higher_is_better else 'lower'} is better; "
                                 f"{esc(report.backends.get(n, ''))})" for n in report.metrics) + "</p>")
    for w in report.protocol.get("warnings", []):
        out.append(f"<p class='warn'>warning: {esc(w)}</p>")
    for note in report.notes:
        out.append(f"<p>note: {esc(note)}</p>")
    out.append("<table><tr><th>image</th><th>method</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for r in report.rows:
        method = esc(report.method_label(r["method"]))
        out.append(f"<tr><td><a href='#img-{esc(r['name'])}'>{esc(r['name'])}</a></td><td>{method}</td>"
                   + "".join(f"<td>{_fmt(r.get(c), c) if M.column_spec(c).kind != 'set' else ''}</td>" for c in cols)
                   + "</tr>")
    for method, values in report.means.items():
        label = esc(report.method_label(method))
        out.append(f"<tr class='mean'><td>mean ({report.counts[method]})</td><td>{label}</td>"
                   + "".join(f"<td>{_fmt(values.get(c), c)}</td>" for c in cols) + "</tr>")
    out.append("</table>")
    for line in missing_lines(report, limit=50):
        out.append(f"<p class='warn'>{esc(line)}</p>")
    for name, msg in report.errors:
        out.append(f"<p class='warn'>error: {esc(name)}: {esc(msg)}</p>")

    out.append("<div class='controls'>zoom <input id='zoom' type='range' min='1' max='8' step='1' value='2'> "
               "<span id='zoomlabel'>2x</span> &nbsp; (click a row of crops to double it)</div>")
    names = list(report.paths)
    baseline_key = (report.settings.get("baseline") or {}).get("name")
    for name in names[:max_images]:
        p = report.paths[name]
        try:
            sr, gt = load_image(p["sr"]).rgb, load_image(p["gt"]).rgb
            lq = load_image(p["lq"]).rgb if p.get("lq") else None
            learned = load_image(p[baseline_key]).rgb if baseline_key and p.get(baseline_key) else None
        except (ImageLoadError, OSError) as err:
            out.append(f"<p class='warn'>{esc(name)}: {esc(str(err))}</p>")
            continue
        sr_row = next((r for r in report.rows if r["name"] == name and r["method"] == "sr"), {})
        summary = ", ".join(f"{c} {_fmt(sr_row.get(c), c)}" for c in cols if c in sr_row)
        out.append(f"<h3 id='img-{esc(name)}'>{esc(name)} "
                   f"<small>({sr.width}x{sr.height}; {esc(summary)})</small></h3>")
        panels = []
        if lq is not None:
            panels.append(("LQ (nearest)", lq.resize(gt.size, Image.Resampling.NEAREST)))
            panels.append(("bicubic", bicubic_baseline(lq, gt.size)))
        if learned is not None:
            panels.append((report.method_label(baseline_key), learned))
        panels += [("SR", sr), ("GT", gt)]
        for label, box in pick_crops(sr, gt, crop_size, crops_per_image):
            out.append(f"<div class='crops' title='{esc(label)}, box {box}'>")
            for title, img in panels:
                crop = img.crop(box)
                out.append(f"<figure><img style='--w:{crop.width}' src='{_png_data_uri(crop)}' alt='{esc(title)}'>"
                           f"<figcaption>{esc(title)}</figcaption></figure>")
            out.append(f"<figure><figcaption>{esc(label)}<br>x {box[0]}-{box[2]}, y {box[1]}-{box[3]}"
                       "</figcaption></figure></div>")
    if len(names) > max_images:
        out.append(f"<p>crops shown for the first {max_images} of {len(names)} images (--html-max-images)</p>")
    out.append(f"<script>{_HTML_SCRIPT}</script></body></html>")
    return atomic_write_text(path, "\n".join(out))


