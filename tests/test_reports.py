"""Report rendering (`stablesr.reports`): strict JSON values, and every file of ``stablesr evaluate`` and of the fidelity
curve written through the atomic helpers."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from stablesr import file_utils
from stablesr.cli import main
from stablesr.fidelity_curve import FidelityCurve
from stablesr.reports import json_safe, write_csv_rows


@pytest.fixture
def published(monkeypatch):
    """The final names of the files written atomically (every atomic write flushes its hidden temporary once)."""
    names = []
    flush = file_utils.fsync_file

    def record(path):
        name = path.name  # .NAME.<hex>.tmp
        names.append(name[1:name.rindex(".", 0, -len(file_utils.TMP_SUFFIX))])
        flush(path)

    monkeypatch.setattr(file_utils, "fsync_file", record)
    return names


def test_json_safe():
    data = {"a": [math.inf, -math.inf, math.nan, 1.5], "b": (1, None), "c": {"d": math.inf}}
    assert json_safe(data) == {"a": ["inf", "-inf", "nan", 1.5], "b": [1, None], "c": {"d": "inf"}}
    json.dumps(json_safe(data), allow_nan=False)


def test_csv_rows_are_exact_bytes(tmp_path):
    path = write_csv_rows([["a", "b"], ["x,y", 1.5]], tmp_path / "t.csv")
    assert path.read_bytes() == b'a,b\r\n"x,y",1.5\r\n'


def test_evaluate_reports_are_written_atomically(tmp_path, published):
    for d in ("sr", "gt"):
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray(255 - img).save(tmp_path / "sr" / f"{i}.png")
    out = tmp_path / "report"
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--gt", str(tmp_path / "gt"), "--out", str(out), "-q"]) == 0
    assert sorted(published) == sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json", "report.html"]


def test_fidelity_curve_files_are_written_atomically(tmp_path, published):
    rows = [{"image": "a", "weight": w, "psnr": p, "consistency": 40.0, "consistency_mse": 1e-4}
            for w, p in ((0.0, 30.0), (1.0, math.inf))]
    curve = FidelityCurve(weights=[0.0, 1.0], metrics=["psnr", "consistency", "consistency_mse"], rows=rows)
    curve.write_csv(tmp_path / "c.csv")
    curve.write_json(tmp_path / "c.json")
    curve.plot(tmp_path / "c.png")
    assert published == ["c.csv", "c.json", "c.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.json", "c.png"], "no temporaries left"
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["metrics"]["consistency_mse"]["higher_is_better"] is False
    assert data["per_image"][1]["psnr"] == "inf" and data["best_weight"]["psnr"] == 1.0
    assert Image.open(tmp_path / "c.png").format == "PNG"
