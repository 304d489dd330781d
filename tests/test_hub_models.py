"""Official models by name (`stablesr.hub`), the model card of converted folders, and the fp32 prompt embedding.

Everything runs offline against a FAKE Hugging Face cache laid out as huggingface_hub lays it out
(``models--Iceclear--StableSR/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}``) and
holding the tiny official-layout checkpoints (stablesr-tiny plus a tiny OpenCLIP text tower, as the official files
carry one) under the official file names. The cache location and the offline switch are read from the environment
at call time, so monkeypatched variables redirect huggingface_hub.
"""

import copy
import hashlib
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_conversion import _open_clip_text_tower

import stablesr
from stablesr import conversion, hub, loading
from stablesr.checkpoint_io import load_checkpoint
from stablesr.cli import main
from stablesr.cli.common import add_model_arguments
from stablesr.loading import DEFAULT_MODEL, ModelLoadError, load_pipeline

REPO = "Iceclear/StableSR"
COMMIT = "2b6673236ea283b29951ccbbb3b6c98fa3b93550"
CFW = "vqgan_cfw_00011.ckpt"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_files(tiny_ref_dir, ref_config, tmp_path_factory):
    """(diffusion checkpoint with a text tower, CFW checkpoint): tiny stand-ins for the official pair."""
    folder = tmp_path_factory.mktemp("sources")
    state, _ = load_checkpoint(tiny_ref_dir / "stablesr_tiny.ckpt")
    text = _open_clip_text_tower(width=ref_config["model"]["params"]["unet_config"]["params"]["context_dim"])
    ckpt = folder / "tiny_with_text.ckpt"
    torch.save({"state_dict": {**state, **text}, "global_step": 0}, ckpt)
    cfw = folder / "vqgan_cfw_tiny.ckpt"
    shutil.copy(tiny_ref_dir / cfw.name, cfw)
    return ckpt, cfw


def _repo_folder(hub_cache: Path) -> Path:
    return hub_cache / f"models--{REPO.replace('/', '--')}"


def put_in_hf_cache(hub_cache: Path, filename: str, source: Path) -> Path:
    """Place ``source`` in the cache as huggingface_hub does: content-named blob, ref, relative snapshot symlink."""
    repo = _repo_folder(hub_cache)
    sha = _sha(source)
    blob = repo / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        shutil.copy(source, blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    link = repo / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("..") / ".." / "blobs" / sha)
    return link


@pytest.fixture
def env(tmp_path, monkeypatch):
    """HF_HOME / HF_HUB_CACHE / STABLESR_CACHE in tmp_path, offline."""
    hub_cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STABLESR_CACHE", str(tmp_path / "stablesr"))
    return hub_cache


@pytest.fixture
def fake_hub(env, source_files):
    """The turbo and 512 checkpoints (same tiny bytes, so one blob) and the CFW file in the fake cache."""
    ckpt, cfw = source_files
    put_in_hf_cache(env, "stablesr_turbo.ckpt", ckpt)
    put_in_hf_cache(env, "stablesr_000117.ckpt", ckpt)
    put_in_hf_cache(env, CFW, cfw)
    return env


@pytest.fixture(scope="module")
def turbo_folder(source_files, tmp_path_factory):
    """A converted ``stablesr-turbo`` folder made once through the name path (copied into tests that start from it)."""
    root = tmp_path_factory.mktemp("turbo")
    ckpt, cfw = source_files
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("STABLESR_CACHE", str(root / "stablesr"))
        put_in_hf_cache(root / "hub", "stablesr_turbo.ckpt", ckpt)
        put_in_hf_cache(root / "hub", CFW, cfw)
        load_pipeline("stablesr-turbo")
    return root / "stablesr" / "converted" / "stablesr-turbo"


def _reuse(turbo_folder):
    """Put the module's converted turbo folder in this test's cache, as if an earlier run had made it."""
    shutil.copytree(turbo_folder, _converted("stablesr-turbo"))


@pytest.fixture
def conversions(monkeypatch):
    """Calls of the real converter."""
    calls = []
    real = conversion.convert_stablesr_checkpoint

    def convert(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion, "convert_stablesr_checkpoint", convert)
    return calls


def _converted(name: str) -> Path:
    return loading.cache_dir() / "converted" / name


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _corrupt(blob: Path) -> str:
    """Flip one byte in the middle (same size); returns the new SHA-256."""
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return hashlib.sha256(bytes(data)).hexdigest()


def _go_online(monkeypatch, fake_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hf_hub_download", fake_download)


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_and_default():
    assert DEFAULT_MODEL == "stablesr-turbo"
    assert set(hub.OFFICIAL_MODELS) == {"stablesr-512", "stablesr-768v", "stablesr-turbo"}
    turbo, base, v = (hub.OFFICIAL_MODELS[n] for n in ("stablesr-turbo", "stablesr-512", "stablesr-768v"))
    assert (turbo.checkpoint, turbo.default_steps, turbo.prediction_type, turbo.native_size) == (
        "stablesr_turbo.ckpt", 4, "epsilon", 512)
    assert (base.checkpoint, base.default_steps, base.prediction_type, base.native_size) == (
        "stablesr_000117.ckpt", 200, "epsilon", 512)
    assert (v.checkpoint, v.default_steps, v.prediction_type, v.native_size) == (
        "stablesr_768v_000139.ckpt", 200, "v_prediction", 768)
    assert {m.cfw for m in hub.OFFICIAL_MODELS.values()} == {CFW}
    assert all(m.repo_id == REPO and "S-Lab" in m.license for m in hub.OFFICIAL_MODELS.values())
    assert hub.official_model("Iceclear/StableSR") is base  # the old default id keeps meaning the 512 model
    assert hub.official_model("someone/else") is None
    import argparse

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert parser.parse_args([]).model == "stablesr-turbo"


# ------------------------------------------------------------------------------------------- loading by name
def test_turbo_by_name_converts_once_and_is_cached(fake_hub, source_files, conversions, monkeypatch):
    pipe = load_pipeline("stablesr-turbo")
    assert len(conversions) == 1
    assert pipe.config.default_num_inference_steps == 4
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.native_size == 512 and pipe.cfw_adapter is not None
    folder = _converted("stablesr-turbo")
    loading.check_model_folder(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["stablesr-turbo"], "no temporaries or other entries left"
    # The converter got the snapshot files of the cache, whose blobs are content-named.
    (ckpt, cfw), _ = conversions[0]
    assert Path(ckpt).name == "stablesr_turbo.ckpt" and Path(ckpt).resolve().parent.name == "blobs"
    _check_official_card(folder / "README.md", source_files)

    # Second call: the converted folder, without converting, downloading or hashing.
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded again"))
    monkeypatch.setattr(loading, "_hash_file", lambda p: pytest.fail("hashed again"))
    again = load_pipeline("stablesr-turbo")
    assert len(conversions) == 1
    assert again.config.default_num_inference_steps == 4
    a, b = pipe.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_hub_id_means_the_512_model(fake_hub, monkeypatch):
    calls = []

    def stop(*args, **kwargs):  # the routing is what is tested: stop before the (tested elsewhere) conversion
        calls.append((args, kwargs))
        raise conversion.ConversionError("stop here")

    monkeypatch.setattr(conversion, "convert_stablesr_checkpoint", stop)
    with pytest.raises(conversion.ConversionError, match="stop here"):
        load_pipeline("Iceclear/StableSR")
    ((ckpt, cfw), kwargs), = calls
    assert Path(ckpt).name == "stablesr_000117.ckpt" and Path(cfw).name == CFW
    assert kwargs == {"prediction_type": "epsilon", "default_num_inference_steps": 200}
    assert not (loading.cache_dir() / "converted").exists()


def _check_official_card(path: Path, source_files):
    card = path.read_text()
    meta = _front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == "s-lab-license-1.0"
    assert meta["license_link"] == "https://github.com/IceClear/StableSR/blob/main/LICENSE.txt"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-to-image"
    assert meta["base_model"] == REPO and "super-resolution" in meta["tags"]
    ckpt, cfw = source_files
    assert f"| `stablesr_turbo.ckpt` | `{_sha(ckpt)}` |" in card
    assert f"| `{CFW}` | `{_sha(cfw)}` |" in card
    assert f"stablesr {stablesr.__version__}" in card
    assert "| prediction type | epsilon (the official stablesr-turbo settings in stablesr.hub) |" in card
    assert "| architecture from | tensor shapes |" in card
    assert "| default steps | 4 |" in card and "| native size | 512 px |" in card
    assert "| weights dtype | float32 |" in card and "| CFW (fidelity weight) | yes |" in card
    assert "S-Lab License 1.0" in card and "non-commercial" in card and "travels with the weights" in card


# ------------------------------------------------------------------------------------------- failure cases
def test_corrupt_blob_offline_is_a_clear_error(fake_hub, source_files, conversions):
    link = _repo_folder(fake_hub) / "snapshots" / COMMIT / "stablesr_turbo.ckpt"
    blob = link.resolve()
    bad = _corrupt(blob)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("stablesr-turbo")
    message = str(err.value)
    assert "stablesr_turbo.ckpt" in message and "corrupt" in message
    assert blob.name in message and bad in message  # expected and actual SHA-256
    assert "hf download Iceclear/StableSR stablesr_turbo.ckpt" in message and "--model" in message
    assert not blob.exists() and not link.is_symlink(), "the bad copy is deleted, so the next run downloads it"
    assert conversions == [] and not _converted("stablesr-turbo").exists()


def _fake_download(source_files, calls, *, good=True):
    """hf_hub_download as the Hub would answer it: a forced download writes the blob and its link again."""
    ckpt, cfw = source_files

    def download(repo_id, filename, *, cache_dir, local_files_only, force_download, **kwargs):
        calls.append((filename, force_download))
        assert not local_files_only
        link = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT / filename
        if force_download or not link.exists():
            source = cfw if filename == CFW else ckpt
            link.unlink(missing_ok=True)
            put_in_hf_cache(Path(cache_dir), filename, source)
            if not good:  # the "download" arrives damaged
                _corrupt(link.resolve())
        return str(link)

    return download


def test_corrupt_blob_is_downloaded_again_once(fake_hub, source_files, conversions, monkeypatch):
    blob = (_repo_folder(fake_hub) / "snapshots" / COMMIT / "stablesr_turbo.ckpt").resolve()
    _corrupt(blob)
    calls = []
    _go_online(monkeypatch, _fake_download(source_files, calls))
    pipe = load_pipeline("stablesr-turbo")
    assert calls == [("stablesr_turbo.ckpt", False), ("stablesr_turbo.ckpt", True), (CFW, False)]
    assert pipe.config.default_num_inference_steps == 4 and len(conversions) == 1
    assert _sha(blob) == blob.name


def test_still_corrupt_after_the_retry_is_a_clear_error(fake_hub, source_files, conversions, monkeypatch):
    blob = (_repo_folder(fake_hub) / "snapshots" / COMMIT / "stablesr_turbo.ckpt").resolve()
    _corrupt(blob)
    calls = []
    _go_online(monkeypatch, _fake_download(source_files, calls, good=False))
    with pytest.raises(ModelLoadError, match="still corrupt after downloading it again") as err:
        load_pipeline("stablesr-turbo")
    assert blob.name in str(err.value) and "--model path/to/stablesr_turbo.ckpt" in str(err.value)
    assert calls == [("stablesr_turbo.ckpt", False), ("stablesr_turbo.ckpt", True)]
    assert conversions == [] and not _converted("stablesr-turbo").exists()


def test_partial_download_offline_is_a_clear_error(env, source_files, conversions):
    ckpt, cfw = source_files
    put_in_hf_cache(env, CFW, cfw)
    blobs = _repo_folder(env) / "blobs"
    data = ckpt.read_bytes()
    (blobs / f"{_sha(ckpt)}.incomplete").write_bytes(data[: len(data) // 3])  # an interrupted download
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("stablesr-turbo")
    message = str(err.value)
    assert "\n" not in message
    assert "stablesr_turbo.ckpt" in message and "partial download" in message and ".incomplete" in message
    assert "HF_HUB_OFFLINE" in message and "connect to the internet once" in message
    assert "hf download Iceclear/StableSR stablesr_turbo.ckpt vqgan_cfw_00011.ckpt" in message
    assert "--model path/to/stablesr_turbo.ckpt --cfw path/to/vqgan_cfw_00011.ckpt" in message
    assert conversions == [] and not _converted("stablesr-turbo").exists()

    # Nothing in the cache at all: the same error without the partial download, and the CLI prints one line.
    shutil.rmtree(_repo_folder(env))
    with pytest.raises(ModelLoadError, match="it is not in the Hugging Face cache"):
        load_pipeline("stablesr-768v")


def test_failed_conversion_or_save_leaves_no_folder(fake_hub, conversions, monkeypatch, caplog):
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    def failing_convert(*args, **kwargs):
        raise conversion.ConversionError("injected failure")

    counted = conversion.convert_stablesr_checkpoint
    monkeypatch.setattr(conversion, "convert_stablesr_checkpoint", failing_convert)
    with pytest.raises(conversion.ConversionError, match="injected"):
        load_pipeline("stablesr-turbo")
    assert not _converted("stablesr-turbo").exists()

    # A save that dies half-way (after writing part of the weights): no folder, no temporaries; the model is still
    # returned (converted in memory), with a warning, and the next run converts again (nothing is cached).
    monkeypatch.setattr(conversion, "convert_stablesr_checkpoint", counted)
    real_save = StableSRPipeline.save_pretrained

    def dying_save(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(StableSRPipeline, "save_pretrained", dying_save)
    with caplog.at_level(logging.WARNING, logger="stablesr.loading"):
        pipe = load_pipeline("stablesr-turbo")
    assert pipe.config.default_num_inference_steps == 4
    assert "could not cache the converted stablesr-turbo" in caplog.text and "disk full" in caplog.text
    converted = _converted("stablesr-turbo").parent
    assert not converted.exists() or list(converted.iterdir()) == []
    assert len(conversions) == 1


def test_half_written_converted_folder_is_converted_again(fake_hub, turbo_folder, conversions):
    _reuse(turbo_folder)
    weights = _converted("stablesr-turbo") / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    pipe = load_pipeline("stablesr-turbo")
    assert len(conversions) == 1 and pipe.config.default_num_inference_steps == 4
    loading.check_model_folder(_converted("stablesr-turbo"))


# ------------------------------------------------------------------------------------------- stablesr models
def _sections(out: str) -> dict[str, str]:
    blocks = out.split("\n\n")
    return {b.splitlines()[0].split()[0]: b for b in blocks[1:] if b.strip() and b.startswith("stablesr-")}


def test_models_command_lists_names_and_cache_state(fake_hub, turbo_folder, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    sections = _sections(out)
    assert set(sections) == {"stablesr-turbo", "stablesr-512", "stablesr-768v"}
    assert "stablesr-turbo (default)" in sections["stablesr-turbo"]
    assert "stablesr_turbo.ckpt cached, vqgan_cfw_00011.ckpt cached" in sections["stablesr-turbo"]
    assert "stablesr_768v_000139.ckpt not cached, vqgan_cfw_00011.ckpt cached" in sections["stablesr-768v"]
    for block in sections.values():
        assert "S-Lab License 1.0 (non-commercial)" in block and "7.44 GB" in block
        assert "converted:  not cached" in block
    assert str(fake_hub) in out

    _reuse(turbo_folder)
    main(["models"])
    sections = _sections(capsys.readouterr().out)
    assert f"converted:  cached in {_converted('stablesr-turbo')}" in sections["stablesr-turbo"]
    assert "converted:  not cached" in sections["stablesr-512"]

    # A partial download is listed; a broken converted folder is reported as such.
    (_repo_folder(fake_hub) / "blobs" / "abc.incomplete").write_bytes(b"x" * 10)
    (_converted("stablesr-turbo") / "model_index.json").unlink()
    main(["models"])
    out = capsys.readouterr().out
    assert "abc.incomplete" in out
    assert "converted:  broken, converted again on next use" in _sections(out)["stablesr-turbo"]


# ------------------------------------------------------------------------------- model cards of other paths
def test_convert_command_writes_a_model_card(source_files, tmp_path, monkeypatch):
    monkeypatch.setenv("STABLESR_CACHE", str(tmp_path / "cache"))
    ckpt, cfw = source_files
    out = tmp_path / "mine"
    assert main(["convert", str(ckpt), "--cfw", str(cfw), "-o", str(out), "--prediction-type", "eps"]) == 0
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == "same-as-source-checkpoint"
    assert "base_model" not in meta and meta["library_name"] == "diffusers"
    assert f"| `{ckpt.name}` | `{_sha(ckpt)}` |" in card and f"| `{cfw.name}` | `{_sha(cfw)}` |" in card
    assert "under the license of the source checkpoint" in card
    assert "| prediction type | epsilon (given explicitly) |" in card and "| default steps | 200 |" in card



def test_checkpoint_cache_writes_a_model_card(source_files, tmp_path, monkeypatch):
    monkeypatch.setenv("STABLESR_CACHE", str(tmp_path / "cache"))
    ckpt, cfw = source_files
    load_pipeline(str(ckpt), str(cfw))
    (entry,) = (tmp_path / "cache" / "converted").iterdir()
    card = (entry / "README.md").read_text()
    assert _front_matter(card)["license_name"] == "same-as-source-checkpoint"
    assert f"| `{ckpt.name}` | `{_sha(ckpt)}` |" in card and f"| `{cfw.name}` | `{_sha(cfw)}` |" in card
    assert str(ckpt.parent) not in card, "no local paths in the card"
    assert "guessed" in card  # the prediction type of an unknown file is a guess, and the card says so


# ------------------------------------------------------------------------------- issue 9: fp32 prompt embedding
def test_fp16_conversion_stores_the_fp32_embedding_cast(source_files, turbo_folder, tmp_path):
    """fp16 `stablesr convert` of files with the official names: the stored empty-prompt embedding is the float32
    conversion's cast to fp16 (not the fp16 text encoder's output), and the card is the official one."""
    from transformers import CLIPTextModel

    ckpt, cfw = source_files
    named = tmp_path / "official"
    named.mkdir()
    shutil.copy(ckpt, named / "stablesr_turbo.ckpt")
    shutil.copy(cfw, named / CFW)
    out = tmp_path / "turbo-fp16"
    assert main(["convert", str(named / "stablesr_turbo.ckpt"), "--cfw", str(named / CFW), "-o", str(out),
                 "--dtype", "fp16"]) == 0
    stored = load_file(out / "prompt_embedding" / "diffusion_pytorch_model.safetensors")["embeds"]
    full = load_file(turbo_folder / "prompt_embedding" / "diffusion_pytorch_model.safetensors")["embeds"]
    assert stored.dtype == torch.float16 and full.dtype == torch.float32
    assert torch.equal(stored, full.to(torch.float16))

    # What the old code stored (the fp16 text encoder's own output) is not that.
    encoder = CLIPTextModel.from_pretrained(out / "text_encoder").to(torch.float16)
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, 0], ids[0, 1] = conversion.SOT_TOKEN, conversion.EOT_TOKEN
    with torch.no_grad():
        in_half = encoder(ids).last_hidden_state
    assert in_half.dtype == torch.float16 and not torch.equal(in_half, stored)
    # The helper computes in float32 for a half-precision encoder too, and leaves the encoder in its own dtype.
    upcast = copy.deepcopy(encoder).float()
    assert torch.equal(conversion.empty_prompt_embedding(encoder), conversion.empty_prompt_embedding(upcast))
    assert encoder.dtype == torch.float16

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license_name"] == "s-lab-license-1.0" and meta["base_model"] == REPO
    assert "named as the official stablesr-turbo release files" in card
    assert "| default steps | 4 |" in card and "| weights dtype | float16 |" in card
    assert f"| `stablesr_turbo.ckpt` | `{_sha(ckpt)}` |" in card
