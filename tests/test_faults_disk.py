"""A full disk is a clear error: `DiskFullError` names the path and the bytes needed, nothing partial is left, the
previous training checkpoint survives a failed save, and a batch stops instead of failing every remaining file alike.

The full disk is a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG) set in a forked
child (see ``helpers_faults``) and, where user namespaces allow mounting one, a real full tmpfs (ENOSPC).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers_faults import Forker, noise_images, published, temporaries

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork, /proc and RLIMIT_FSIZE")


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    helper = Forker(tmp_path_factory.mktemp("forker"))
    yield helper
    helper.close()


def _result(outcome) -> dict:
    """The JSON line a code job printed last."""
    lines = [line for line in outcome.log.splitlines() if line.startswith("{")]
    assert outcome.returncode == 0 and lines, f"exit code {outcome.returncode}:\n{outcome.log}"
    return json.loads(lines[-1])


WRITERS = textwrap.dedent("""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from stablesr.file_utils import DiskFullError, atomic_write_bytes, atomic_write_text
    from stablesr.image_io import save_image

    folder = Path(argv[0])
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    writers = {
        "data.bin": lambda p: atomic_write_bytes(p, b"x" * 50_000),
        "image.png": lambda p: save_image(noise, p, overwrite=True),
        "report.json": lambda p: atomic_write_text(p, json.dumps(list(range(20_000)))),
    }
    results = {}
    for name, write in writers.items():
        try:
            write(folder / name)
            results[name] = None
        except DiskFullError as err:
            results[name] = {"message": str(err), "path": str(err.path), "needed": err.needed,
                             "at_least": err.at_least, "errno": err.errno}
    print(json.dumps(results))
""")


def test_atomic_writers_raise_disk_full_and_keep_the_previous_file(forker, tmp_path):
    """Fails before: the writers raised a bare OSError(EFBIG, 'File too large') naming neither file nor size.
    (That the temporary is removed and the previous file kept held before, and is checked here too.)"""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"previous")
    (folder / "image.png").write_bytes(b"previous")
    results = _result(forker.run("code", WRITERS, [folder], fsize=20_000))

    for name, err in results.items():
        assert err is not None, f"{name}: no DiskFullError"
        assert err["errno"] == errno.EFBIG and err["path"] == str(folder / name)
        assert err["message"].startswith(f"no space left to write '{folder / name}'"), err["message"]
        assert "20.0 kB per file (`ulimit -f`)" in err["message"], err["message"]
    # Sizes known in advance are reported as such; otherwise the bytes written before the failure, a lower bound.
    assert results["data.bin"]["needed"] == 50_000 and "needs about 50.0 kB" in results["data.bin"]["message"]
    assert results["report.json"]["needed"] > 20_000 and not results["report.json"]["at_least"]
    assert results["image.png"]["at_least"] and "needs more than 20.0 kB" in results["image.png"]["message"]
    # Nothing partial: no temporaries, and the files that existed are untouched.
    assert sorted(p.name for p in folder.iterdir()) == ["data.bin", "image.png"]
    assert (folder / "data.bin").read_bytes() == b"previous" and (folder / "image.png").read_bytes() == b"previous"


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
def test_no_space_left_on_a_small_tmpfs(tmp_path):
    """Fails before (no DiskFullError). A real ENOSPC: the message gives the size needed and the space free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    code = ("import sys; from stablesr.file_utils import DiskFullError, atomic_write_bytes\n"
            "try:\n    atomic_write_bytes(sys.argv[1], bytes(100_000))\n"
            "except DiskFullError as err:\n    print('ERROR', err.errno, err)\n")
    script = f'mount -t tmpfs -o size=64k tmpfs "$1" && "{sys.executable}" -c "$2" "$1/big.bin" && ls -A "$1"'
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), code], capture_output=True,
                         text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines, run.stdout + run.stderr
    assert lines[0] == (f"ERROR {errno.ENOSPC} no space left to write '{disk}/big.bin' (needs about 100.0 kB; "
                        f"65.5 kB free on {disk}): free space or choose another output folder")
    assert lines[1:] == [], "the partial temporary file must be gone"


CHECKPOINT = textwrap.dedent("""
    import hashlib, json, resource, signal
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    from stablesr.file_utils import DiskFullError
    from stablesr.training_utils import save_checkpoint

    out = Path(argv[0])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))

    def train_step():
        accelerator.backward(model(torch.randn(4, 64)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    train_step()
    save_checkpoint(accelerator, out, 1, total_limit=1)
    saved = digest(out / "checkpoint-1")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    largest = max(p.stat().st_size for p in (out / "checkpoint-1").iterdir())

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, resource.RLIM_INFINITY))
    train_step()
    try:
        save_checkpoint(accelerator, out, 2, total_limit=1)
        error = None
    except DiskFullError as err:
        error = {"message": str(err), "path": str(err.path), "needed": err.needed}
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    listing = sorted(p.name for p in out.iterdir())
    intact = digest(out / "checkpoint-1") == saved
    accelerator.load_state(str(out / "checkpoint-1"))
    restored = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    size = sum(p.stat().st_size for p in (out / "checkpoint-1").iterdir())
    print(json.dumps({"error": error, "listing": listing, "intact": intact, "restored": restored, "size": size}))
""")


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(forker, tmp_path):
    """Fails before: the save raised torch's "unexpected pos" RuntimeError (or a SafetensorError) naming no path,
    and left a half-written checkpoint-2.tmp behind. (checkpoint-1 surviving held before: rotation runs only after a
    complete save.)"""
    out = tmp_path / "run"
    result = _result(forker.run("code", CHECKPOINT, [out]))
    error = result["error"]
    assert error is not None, "the failed save must raise DiskFullError"
    assert error["path"] == str(out / "checkpoint-2")
    assert error["message"].startswith(f"no space left to write '{out / 'checkpoint-2'}'"), error["message"]
    assert error["needed"] == result["size"], "needs about the size of the previous checkpoint"
    assert result["listing"] == ["checkpoint-1"], "no checkpoint-2 and no checkpoint-2.tmp"
    assert result["intact"] and result["restored"], "checkpoint-1 unchanged and loadable"


CONVERT = textwrap.dedent("""
    import json
    from pathlib import Path

    import torch

    from stablesr.conversion import convert_stablesr_checkpoint
    from stablesr.file_utils import DiskFullError

    ref, out = Path(argv[0]), Path(argv[1])
    try:
        convert_stablesr_checkpoint(ref / "stablesr_tiny.ckpt", ref / "vqgan_cfw_tiny.ckpt", out,
                                    original_config=ref / "config.yaml", prompt_embeds=torch.zeros(1, 77, 64))
        error = None
    except DiskFullError as err:
        error = {"message": str(err), "path": str(err.path), "needed": err.needed}
    print(json.dumps({"error": error}))
""")


def test_convert_on_a_full_disk_leaves_no_folder(forker, tiny_ref_dir, ref_config, tmp_path):
    """Fails before: a SafetensorError "... File too large (os error 27)" naming neither the folder nor the size
    (the temporary folder was removed before too)."""
    assert ref_config["model"]["params"]["unet_config"]["params"]["context_dim"] == 64
    out = tmp_path / "converted" / "model"
    result = _result(forker.run("code", CONVERT, [tiny_ref_dir, out], fsize=100_000))
    error = result["error"]
    assert error is not None and error["path"] == str(out)
    assert error["message"].startswith(f"no space left to write '{out}'"), error["message"]
    assert error["needed"] > 1_000_000 and "needs about" in error["message"], "the size of the model's weights"
    assert not out.exists() and temporaries(out) == []


def test_restore_stops_at_a_full_disk(forker, small_pipeline_dir, tmp_path):
    """A batch stops at the first full-disk error: one clear message naming the file, nothing partial written, the
    remaining inputs reported as not attempted (before, each of them failed with the same error)."""
    inputs = noise_images(tmp_path / "in", 3, (32, 32))
    out = tmp_path / "out"
    outcome = forker.run("cli", argv=["restore", inputs, "-o", out, "--model", small_pipeline_dir, "--steps", 1,
                                      "--device", "cpu", "-q"], fsize=20_000)
    assert outcome.returncode not in (0, -9), outcome.log
    assert outcome.log.lower().count("no space") == 1, outcome.log
    [line] = [line for line in outcome.log.splitlines() if "no space" in line.lower()]
    assert str(out / "im0.png") in line, line
    assert "not attempted" in outcome.log, outcome.log
    errors = [line for line in outcome.log.splitlines() if "error" in line.lower()]
    assert not any("im1" in line or "im2" in line for line in errors), outcome.log
    assert published(out) == {} and temporaries(out) == []
