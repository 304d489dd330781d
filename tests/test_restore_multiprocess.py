"""Batch commands shared among processes (``accelerate launch``): restore, fidelity-curve and evaluate.

Two CPU processes connected with gloo, started as the training tests do (``accelerate launch --multi_gpu`` runs
torchrun workers; ``ACCELERATE_USE_CPU`` keeps them on the CPU; ``accelerate launch --cpu`` would need mpirun). The
one-process references run in this pytest process through ``stablesr.cli.main``. Every launch costs two interpreter
start-ups, so there are four: restore killed mid-batch, its rerun, fidelity-curve and evaluate.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from stablesr.cli import main
from stablesr.distributed import Processes, file_seed

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
          "--mixed_precision=no", "--dynamo_backend=no"]
SUMMARY = "restored by 2 processes"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in the launched processes (``OMP_NUM_THREADS=1``): float sums split over another number
    of threads round differently, and the outputs are compared byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1")
    return env


def _launch(args: list, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + ["-m", "stablesr", *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, prefix: str = "im") -> Path:
    """Smooth random RGB images ``{prefix}{i}.png`` of the given (W, H) sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        small = (rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{prefix}{i}.png")
    return folder


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


# ------------------------------------------------------------------------------------------------------ library


def test_shares_cover_the_list_once_and_in_order():
    for n in range(0, 12):
        for count in (1, 2, 3, 5, 8):
            shares = [Processes(index=r, count=count).share(n) for r in range(count)]
            assert [i for s in shares for i in s] == list(range(n)), (n, count)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert list(Processes(index=2, count=3).share(2)) == [], "more processes than items: nothing to do"
    assert Processes().gather(x for x in "ab") == ["a", "b"]


def test_file_seed_depends_on_seed_and_name_only():
    assert file_seed(42, "cat.png") == file_seed(42, "cat.png")
    assert len({file_seed(42, "cat.png"), file_seed(43, "cat.png"), file_seed(42, "dog.png")}) == 3
    assert 0 <= file_seed(-1, "") < 2**63


# ------------------------------------------------------------------------------------------------------ restore


@pytest.fixture(scope="module")
def restore_case(small_pipeline_dir, tmp_path_factory):
    """Five tiny inputs and a broken one (last in the sorted list, so in process 1's share: im3, im4, zz_broken),
    and the one-process outputs of the same command."""
    root = tmp_path_factory.mktemp("restore_mp")
    inputs = _images(root / "in", [(16, 16), (24, 16), (16, 24), (20, 20), (32, 24)])
    (inputs / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    args = [inputs, "--model", small_pipeline_dir, "--steps", 1, "--device", "cpu", "--seed", 5, "-q", "-o"]
    ref = root / "ref"
    assert main(["restore", *map(str, args), str(ref)]) == 1, "the broken file fails the batch"
    assert sorted(_outputs(ref)) == [f"im{i}.png" for i in range(5)]
    return args, ref, root


def _worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (torchrun sets RANK in their environment)."""
    pids = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "stablesr" in " ".join(child.cmdline()):
            pids[int(rank)] = child.pid
    return pids


def test_restore_two_processes_killed_then_rerun_equals_one_process(restore_case):
    """Process 1 is SIGKILLed right after its first output (im3) appears; the launcher fails. The rerun on 2
    processes skips what either process finished, completes the rest, fails only the broken file (exit 1), prints one
    summary, and every output is byte-identical to the one-process run (seeds are per file, not per process)."""
    args, ref, root = restore_case
    out = root / "out"
    cmd = LAUNCH + ["-m", "stablesr", "restore", *map(str, args), str(out)]
    log_path = root / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 240
            while not (out / "im3.png").exists():
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "no output of process 1 within 240 s"
                time.sleep(0.01)
            pids = _worker_pids(proc)
            os.kill(pids[1], signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    killed_log = log_path.read_text()
    assert proc.returncode != 0, killed_log[-4000:]
    finished = sorted(_outputs(out))
    print(f"after the kill: {finished}")
    assert "im3.png" in finished and "im4.png" not in finished, "process 1 was killed before its second output"
    assert SUMMARY not in killed_log, "no summary from a failed batch"

    rerun = _launch(["restore", *args, out])
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 1, log[-6000:]  # the broken file, on every process
    assert log.count(SUMMARY) == 1, log[-6000:]
    assert log.count("failed: ") == 1 and "zz_broken.png" in log
    [summary] = [line for line in rerun.stdout.splitlines() if SUMMARY in line]
    skipped = len(finished)
    assert summary.startswith(f"{5 - skipped} {SUMMARY}, {skipped} skipped, 1 failed"), summary
    assert log.count("skipping ") == 1 and f"skipping {skipped} file(s)" in log
    assert _outputs(out) == _outputs(ref), "2 processes (killed + rerun) wrote other bytes than 1 process"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporaries of the killed run are gone"


# ------------------------------------------------------------------------------------------------ fidelity-curve


def test_fidelity_curve_two_processes_equal_one(small_pipeline_dir, tmp_path):
    """Three inputs (the last without ground truth) on 2 processes: the CSV and JSON equal the one-process run's
    byte for byte (rows in input order, per-image notes in order, the metric notes once)."""
    lq = _images(tmp_path / "lq", [(16, 16), (24, 16), (16, 24)], seed=1)
    gt = tmp_path / "gt"
    gt.mkdir()
    for p in sorted(lq.iterdir())[:2]:
        Image.open(p).resize((Image.open(p).width * 4, Image.open(p).height * 4), Image.Resampling.BICUBIC).save(
            gt / p.name)
    args = [lq, "--gt", gt, "--model", small_pipeline_dir, "--weights", "0,1", "--steps", 1, "--upscale", 4,
            "--metrics", "psnr,ssim,consistency", "--device", "cpu", "--seed", 3, "-q", "-o"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["fidelity-curve", *map(str, args), str(one)]) == 0
    run = _launch(["fidelity-curve", *args, two])
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert log.count("wrote ") == 1 and log.count("no ground truth for 1 input(s)") == 1, log[-3000:]
    table = json.loads((one / "fidelity_curve.json").read_text())
    assert [r["image"] for r in table["per_image"]] == ["im0", "im0", "im1", "im1", "im2", "im2"]
    assert any("im2: no ground truth" in n for n in table["notes"])
    for name in ("fidelity_curve.csv", "fidelity_curve.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_two_processes_equal_one(tmp_path):
    """Four pairs (one with a size mismatch) on 2 processes, through the ``stablesr`` console script
    (``accelerate launch --no_python stablesr ...``): metrics.json and metrics.csv equal the one-process run's, and
    the failed pair makes the exit code 1. Only PSNR/SSIM/consistency here: the learned metrics need weight downloads
    (the rows of any per-image metric are split and gathered the same way)."""
    sizes = [(32, 32), (40, 32), (32, 48), (36, 36)]
    gt = _images(tmp_path / "gt", [(w * 2, h * 2) for w, h in sizes], seed=2)
    lq = _images(tmp_path / "lq", sizes, seed=3)
    sr = tmp_path / "sr"
    sr.mkdir()
    for i, p in enumerate(sorted(lq.iterdir())):
        w, h = Image.open(p).size
        size = (w * 2, h * 2) if i != 2 else (w * 2 + 2, h * 2)  # im2: the SR size does not match the GT
        Image.open(p).resize(size, Image.Resampling.LANCZOS).save(sr / p.name)
    args = ["--sr", sr, "--gt", gt, "--lq", lq, "--metrics", "psnr,ssim,consistency", "--crop-border", 2, "-q",
            "--out"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["evaluate", *map(str, args), str(one)]) == 1
    script = Path(sys.executable).parent / "stablesr"
    if script.exists():
        cmd = LAUNCH + ["--no_python", str(script), "evaluate", *map(str, args), str(two)]
    else:  # the package is importable but its console script is not installed
        cmd = LAUNCH + ["-m", "stablesr", "evaluate", *map(str, args), str(two)]
    print("launched:", " ".join(cmd[2:]))
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-6000:]
    assert log.count("wrote ") == 1, log[-3000:]
    data_one, data_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert data_two == data_one
    assert [e["name"] for e in data_one["errors"]] == ["im2"] and "size mismatch" in data_one["errors"][0]["error"]
    assert [r["name"] for r in data_one["per_image"]] == ["im0", "im0", "im1", "im1", "im3", "im3"]
    assert (two / "metrics.csv").read_bytes() == (one / "metrics.csv").read_bytes()
