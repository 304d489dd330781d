"""SIGKILL at any point leaves nothing half-written, and a rerun finishes the job with the same files.

Each command runs as a real process (forked from a helper that imported torch once, see ``helpers_faults``) and is
killed with SIGKILL at chosen points: just before a finished temporary file is renamed into place, right after a file
is published, half-way through a model folder, or from outside after a random delay. After each kill every file
under its final name must decode / parse in full; hidden temporaries may be left, and must be ignored or cleaned by
the rerun. The last rerun must complete the work, skip what was done, and leave files byte-identical to an
uninterrupted run (safetensors files: the same tensors and metadata).
"""

from __future__ import annotations

import csv
import json
import random
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers_faults import Forker, Kill, noise_images, published, temporaries
from PIL import Image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and /proc")

REPO = Path(__file__).resolve().parents[1]
PUBLISH = "stablesr.file_utils:_publish"  # a finished temporary file is renamed to its final name
FLUSH = "stablesr.file_utils:fsync_file"  # a temporary file is complete, about to be published


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    helper = Forker(tmp_path_factory.mktemp("forker"))
    yield helper
    helper.close()


def assert_complete(root: Path) -> None:
    """Every published file under ``root`` decodes or parses in full (a truncated one would not)."""
    from safetensors.torch import load_file

    for name in published(root):
        path = root / name
        suffix = path.suffix.lower()
        try:
            if suffix == ".png":
                with Image.open(path) as im:
                    im.load()
            elif suffix == ".json":
                json.loads(path.read_text())
            elif suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif suffix == ".csv":
                rows = list(csv.reader(path.read_text().splitlines()))
                assert rows and len({len(r) for r in rows}) == 1, "ragged rows"
            elif suffix == ".html":
                assert path.read_text().rstrip().endswith("</html>"), "no closing tag"
            elif suffix == ".safetensors":
                load_file(str(path))
        except Exception as err:
            raise AssertionError(f"{path} is published but incomplete: {err}") from err


def assert_killed(outcome) -> None:
    assert outcome.killed, f"the child was meant to be killed but exited with {outcome.returncode}:\n{outcome.log}"


def assert_ok(outcome) -> None:
    assert outcome.returncode == 0, f"exit code {outcome.returncode}:\n{outcome.log}"


def _same_safetensors(a: Path, b: Path) -> bool:
    """Same tensors and metadata (the bytes may differ: safetensors writes its metadata map in hash order)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def assert_same_files(out: Path, ref: Path) -> None:
    """The published files of ``out`` are those of ``ref``, byte for byte (safetensors: same tensors and metadata)."""
    got, want = published(out), published(ref)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]
              and not (name.endswith(".safetensors") and _same_safetensors(out / name, ref / name))]
    assert not differ, f"files differ from the uninterrupted run: {differ}"


# ----------------------------------------------------------------------------------------------------- restore


def test_restore_killed_then_rerun_matches_uninterrupted(forker, small_pipeline_dir, tmp_path):
    """Property (held before, now checked): a restore killed between two outputs, with the next output's temporary
    finished but not renamed, leaves only complete images; the rerun skips the done one and writes the same bytes."""
    inputs = noise_images(tmp_path / "in", 2, (32, 32))
    cmd = ["restore", inputs, "--model", small_pipeline_dir, "--steps", 1, "--device", "cpu", "-q", "-o"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert_ok(forker.run("cli", argv=[*cmd, ref]))
    assert sorted(published(ref)) == ["im0.png", "im1.png"]

    # im0 published, im1 written to its temporary file and about to be renamed.
    assert_killed(forker.run("cli", argv=[*cmd, out], kills=[Kill(FLUSH, call=2)]))
    assert sorted(published(out)) == ["im0.png"] and len(temporaries(out)) == 1
    assert_complete(out)

    rerun = forker.run("cli", argv=[*cmd, out])
    assert_ok(rerun)
    assert "skipping 1 file" in rerun.log and "1 restored" in rerun.log
    assert_same_files(out, ref)  # the leftover temporary is hidden and never taken for an output


# ----------------------------------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def tiny_text_encoder(ref_config, tmp_path_factory):
    """A small random CLIP text encoder of the tiny model's width (the tiny checkpoint has none)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = ref_config["model"]["params"]["unet_config"]["params"]["context_dim"]
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=77, vocab_size=49408)
    folder = tmp_path_factory.mktemp("clip")
    import torch

    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


def test_convert_killed_then_rerun_matches_uninterrupted(forker, tiny_ref_dir, tiny_text_encoder, tmp_path):
    """A convert killed half-way through writing the folder, or with the folder written but not yet renamed, leaves
    no output folder. New: the rerun removes the abandoned temporary folders (before, each kill left a full-size
    hidden copy of the model behind for good)."""
    def cmd(out):
        return ["convert", tiny_ref_dir / "stablesr_tiny.ckpt", "--cfw", tiny_ref_dir / "vqgan_cfw_tiny.ckpt",
                "--config", tiny_ref_dir / "config.yaml", "--text-encoder", tiny_text_encoder, "-o", out]

    ref, out = tmp_path / "ref" / "model", tmp_path / "out" / "model"
    assert_ok(forker.run("cli", argv=cmd(ref)))
    assert_complete(ref)

    for kill in (Kill("safetensors.torch:save_file", call=2, when="after"),  # half the components written
                 Kill("stablesr.file_utils:fsync_tree")):  # everything written, not yet renamed
        assert_killed(forker.run("cli", argv=cmd(out), kills=[kill]))
        assert not out.exists()
        assert temporaries(out), "the killed run's temporary folder is expected next to the output"

    assert_ok(forker.run("cli", argv=cmd(out)))
    assert_complete(out)
    assert_same_files(out, ref)
    assert temporaries(out) == [], "the rerun must remove the temporary folders of the killed runs"


# ----------------------------------------------------------------------------------------------------- degrade


def test_degrade_killed_then_rerun_matches_uninterrupted(forker, tmp_path):
    """Fails before: a kill between a pair's HQ and LQ files left half a pair that every rerun kept ("keeping existing
    pair"), so the LQ image was never written. Also killed from outside after random delays."""
    inputs = noise_images(tmp_path / "in", 3, (48, 40))
    cmd = ["degrade", inputs, "--seed", 3, "-o"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert_ok(forker.run("cli", argv=[*cmd, ref]))
    assert len(published(ref)) == 6

    # im0 complete, im1's HQ published, its LQ temporary finished but not renamed.
    assert_killed(forker.run("cli", argv=[*cmd, out], kills=[Kill(FLUSH, call=4)]))
    assert sorted(published(out)) == ["hq/im0.png", "hq/im1.png", "lq/im0.png"] and len(temporaries(out)) == 1
    assert_complete(out)
    # Killed from outside at random moments (seeded), each rerun going further.
    rng = random.Random(0)
    for _ in range(2):
        deadline = time.monotonic() + rng.uniform(0.0, 1.0)
        outcome = forker.run("cli", argv=[*cmd, out], kill_when=lambda t=deadline: time.monotonic() > t)
        assert outcome.killed or outcome.returncode == 0, outcome.log
        assert_complete(out)

    rerun = forker.run("cli", argv=[*cmd, out])
    assert_ok(rerun)
    assert_same_files(out, ref)
    assert temporaries(out) == [], "the rerun removes the temporaries of the pairs it makes again"


# ----------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_killed_then_rerun_matches_uninterrupted(forker, tmp_path):
    """Property (held before, now checked): each report file appears whole or not at all, at every kill point."""
    gt = noise_images(tmp_path / "gt", 2, (40, 40), seed=1)
    sr = noise_images(tmp_path / "sr", 2, (40, 40), seed=2)
    ref, out = tmp_path / "ref", tmp_path / "out"

    def cmd(folder):
        return ["evaluate", "--sr", sr, "--gt", gt, "--metrics", "psnr,ssim", "-q", "--out", folder]

    assert_ok(forker.run("cli", argv=cmd(ref)))
    assert sorted(published(ref)) == ["metrics.csv", "metrics.json", "report.html"]
    # The HTML names no output folder, so the reports of both runs can be compared byte for byte.
    for kill, done in ((Kill(FLUSH, call=1), []), (Kill(PUBLISH, call=1, when="after"), ["metrics.csv"]),
                       (Kill(FLUSH, call=3), ["metrics.csv", "metrics.json"])):
        if out.exists():
            for p in out.iterdir():
                p.unlink()
        assert_killed(forker.run("cli", argv=cmd(out), kills=[kill]))
        assert sorted(published(out)) == done
        assert_complete(out)
    assert_ok(forker.run("cli", argv=cmd(out)))
    assert_same_files(out, ref)


# ----------------------------------------------------------------------------------------------------- CFW data


def test_cfw_data_killed_then_rerun_matches_uninterrupted(forker, small_pipeline_dir, tmp_path):
    """Property (held before, now checked): scripts/generate_cfw_data.py killed inside a sample leaves that sample
    incomplete (invisible to CFWDataset), the rerun skips finished samples, cleans the killed one's temporaries and
    writes the same bytes as an uninterrupted run."""
    from stablesr.cfw_data import CFWDataset

    hq = noise_images(tmp_path / "hq", 2, (128, 128))
    script = str(REPO / "scripts" / "generate_cfw_data.py")
    args = ["--pretrained_model_name_or_path", small_pipeline_dir, "--hq_dir", hq, "--gt_size", 128,
            "--num_inference_steps", 1, "--num_shards", 1, "--shard_index", 0, "--device", "cpu", "--skip_samples",
            "--output_dir"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert_ok(forker.run("script", script, [*args, ref]))
    assert len(CFWDataset(ref)) == 2

    # Writes: cfw_data.json, then per sample inputs, gts, latents. Kill with sample 0 done and sample 1's inputs
    # published and its gts temporary finished.
    assert_killed(forker.run("script", script, [*args, out], kills=[Kill(FLUSH, call=6)]))
    assert_complete(out)
    assert CFWDataset(out).names == ["00000000"] and len(temporaries(out)) == 1

    rerun = forker.run("script", script, [*args, out])
    assert_ok(rerun)
    assert "1 generated, 1 already done" in rerun.log
    assert_same_files(out, ref)
    assert temporaries(out) == []


def test_cleaning_temporaries_spares_a_live_writers_folder(tmp_path):
    """New: atomic_write_dir holds a lock on its temporary folder, so remove_stale_temporaries (which a rerun calls)
    removes the folders of dead writers only, never the one a running writer is filling."""
    from stablesr.file_utils import atomic_write_dir, remove_stale_temporaries

    final = tmp_path / "model"
    abandoned = tmp_path / ".model.0123456789ab.tmp"  # what a killed writer leaves: nobody holds it
    abandoned.mkdir()
    with atomic_write_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        assert remove_stale_temporaries(tmp_path, "model") == [abandoned]
        assert tmp.is_dir() and not abandoned.exists()
    assert (final / "weights.bin").read_bytes() == b"w" and temporaries(final) == []
