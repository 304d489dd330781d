"""Broken model folders, prediction-type guesses and the conversion cache: one-line errors, no silent wrong results.

Every broken-folder case is checked through `load_pipeline` and through ``stablesr restore``: a `ModelLoadError`
of one line naming the file and the fix, exit code 2 and one ``error:`` line on stderr, never a traceback. Pickles
put where safetensors belong carry a payload that would create a marker file if anything unpickled them.
"""

import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stablesr import conversion, loading
from stablesr.checkpoint_io import load_checkpoint
from stablesr.cli import main
from stablesr.conversion import convert_stablesr_checkpoint
from stablesr.loading import ModelLoadError, load_pipeline

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _marker(folder):
    return folder.parent / "UNPICKLED"


def _truncate(folder):
    path = folder / UNET_WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(folder):
    path = folder / UNET_WEIGHTS
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])  # header length field > file size


def _wider_config(folder):
    config = json.loads((folder / "unet/config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    (folder / "unet/config.json").write_text(json.dumps(config))


def _pickle_as_safetensors(folder):
    (folder / UNET_WEIGHTS).write_bytes(pickle.dumps({"conv_in.weight": _Payload(_marker(folder))}))


def _bin_instead(folder):
    (folder / UNET_WEIGHTS).unlink()
    torch.save({"conv_in.weight": _Payload(_marker(folder))}, folder / "unet/diffusion_pytorch_model.bin")


def _tensor_missing(folder):
    # diffusers used to load this with a randomly initialised prompt embedding and a warning only.
    path = folder / "prompt_embedding/diffusion_pytorch_model.safetensors"
    save_file({"renamed": load_file(path)["embeds"]}, path)


# case -> (mutation, file the message must name, words it must contain)
BROKEN = {
    "component folder missing": (lambda f: shutil.rmtree(f / "unet"), "unet", "missing"),
    "weights missing": (lambda f: (f / UNET_WEIGHTS).unlink(), UNET_WEIGHTS, "missing"),
    "truncated safetensors": (_truncate, UNET_WEIGHTS, "truncated"),
    "huge header length": (_huge_header, UNET_WEIGHTS, "header length"),
    "config disagrees with weights": (_wider_config, "unet/config.json", "disagrees"),
    "pickle named safetensors": (_pickle_as_safetensors, UNET_WEIGHTS, "pickle"),
    "pickle .bin instead": (_bin_instead, "unet/diffusion_pytorch_model.bin", "pickle"),
    "tensor missing": (_tensor_missing, "prompt_embedding/config.json", "lack embeds"),
}


@pytest.fixture
def broken(small_pipeline_dir, tmp_path, request):
    mutate, named, words = BROKEN[request.param]
    folder = tmp_path / "model"
    shutil.copytree(small_pipeline_dir, folder)
    mutate(folder)
    return folder, folder / named, words


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_broken_folder_is_one_line_naming_the_file(broken):
    folder, named, words = broken
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    message = str(err.value)
    assert "\n" not in message
    assert str(named) in message and words in message
    assert "stablesr convert" in message
    assert not _marker(folder).exists(), "code from a pickle was executed"


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_broken_folder_through_the_cli(broken, tmp_path, capsys):
    folder, named, _ = broken
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (120, 80, 40)).save(image)
    code = main(["restore", str(image), "-o", str(tmp_path / "out"), "--model", str(folder), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(named) in errors[0], err
    assert "Traceback" not in err
    assert not _marker(folder).exists()


def test_untrusted_module_in_model_index_is_refused(small_pipeline_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(small_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model_index.json: unet names os.system"):
        load_pipeline(str(folder))


# ------------------------------------------------------------------------------------------------ prediction type
@pytest.fixture(scope="module")
def tiny_state(tiny_ref_dir):
    return load_checkpoint(tiny_ref_dir / "stablesr_tiny.ckpt")[0]


def test_v_prediction_declared_in_the_checkpoint_survives_renaming(tmp_path, tiny_state, tiny_cases):
    """A 768-v checkpoint renamed so the name no longer says so used to convert as eps without a word."""
    path = tmp_path / "my_model.ckpt"
    hyper = {"parameterization": "v", "unet_config": {"params": {"model_channels": 320}}}
    torch.save({"state_dict": tiny_state, "hyper_parameters": hyper, "global_step": 1}, path)
    pipe, report = convert_stablesr_checkpoint(path, prompt_embeds=tiny_cases["c8.context"][:1])
    assert report.prediction_type == pipe.scheduler.config.prediction_type == "v_prediction"
    assert report.prediction_type_source == "checkpoint hyper_parameters.parameterization"
    assert not report.prediction_type_guessed
    assert "prediction type v_prediction (checkpoint hyper_parameters.parameterization)" in report.summary()

    # OmegaConf-style hyper-parameters nested under the official config layout, read as inert placeholders.
    from stablesr.checkpoint_io import _Inert

    node = _Inert()
    node._state = {"_val": "v", "_metadata": None}
    extras = {"hyper_parameters": _Inert(), "optimizer_states": [{"state": {}}]}
    extras["hyper_parameters"]._state = {"_content": {"model": {"params": {"parameterization": node}}}}
    assert conversion.declared_prediction_type(extras) == (
        "v_prediction",
        "hyper_parameters._content.model.params.parameterization",
    )
    # safetensors metadata (Stability's model-spec tag).
    assert conversion.declared_prediction_type({"__metadata__": {"modelspec.prediction_type": "v"}})[0] == (
        "v_prediction"
    )


def test_guessed_prediction_type_is_warned_and_recorded(tmp_path, tiny_state, tiny_cases, caplog):
    path = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": tiny_state}, path)
    with caplog.at_level(logging.WARNING, logger="stablesr.conversion"):
        _, report = convert_stablesr_checkpoint(path, prompt_embeds=tiny_cases["c8.context"][:1])
    assert report.prediction_type == "epsilon" and report.prediction_type_guessed
    assert "guessed" in report.summary()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "renamed.ckpt" in warned and "assuming eps" in warned and "--prediction-type" in warned

    caplog.clear()
    named_v = tmp_path / "stablesr_768v_copy.ckpt"
    shutil.copy(path, named_v)
    with caplog.at_level(logging.WARNING, logger="stablesr.conversion"):
        _, report = convert_stablesr_checkpoint(named_v, prompt_embeds=tiny_cases["c8.context"][:1])
    assert report.prediction_type == "v_prediction"
    assert report.prediction_type_source == "guessed from the file name"
    assert "file name" in " ".join(r.getMessage() for r in caplog.records)

    # An explicit choice or the YAML is not a guess, and is not warned about.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stablesr.conversion"):
        _, report = convert_stablesr_checkpoint(
            named_v, prompt_embeds=tiny_cases["c8.context"][:1], prediction_type="eps"
        )
    assert report.prediction_type == "epsilon" and not report.prediction_type_guessed
    assert not [r for r in caplog.records if "prediction type" in r.getMessage()]


# ------------------------------------------------------------------------------------------------ conversion cache
@pytest.fixture
def counted_converter(monkeypatch, tiny_cases):
    """The real converter (given the tiny model's prompt embedding, which its checkpoint lacks), counting calls."""
    calls = []
    real = conversion.convert_stablesr_checkpoint

    def convert(*args, **kwargs):
        calls.append(args)
        return real(*args, prompt_embeds=tiny_cases["c8.context"][:1], **kwargs)

    monkeypatch.setattr(conversion, "convert_stablesr_checkpoint", convert)
    return calls


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLESR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in ("unet", "vae", "time_aware_encoder", "sft_adapter", "cfw_adapter",
                                          "prompt_embedding") for k, v in getattr(pipe, name).state_dict().items()}


def test_checkpoint_is_converted_once_and_cached_by_content(tiny_ref_dir, tmp_path, cache, counted_converter,
                                                            monkeypatch):
    ckpt, cfw = tmp_path / "stablesr_tiny.ckpt", tmp_path / "vqgan_cfw_tiny.ckpt"
    shutil.copy(tiny_ref_dir / ckpt.name, ckpt)
    shutil.copy(tiny_ref_dir / cfw.name, cfw)
    first = load_pipeline(str(ckpt), str(cfw))
    assert len(counted_converter) == 1
    (entry,) = (cache / "converted").iterdir()
    assert (entry / "model_index.json").is_file()

    hashed = []
    real_hash = loading._hash_file
    monkeypatch.setattr(loading, "_hash_file", lambda p: hashed.append(p) or real_hash(p))
    second = load_pipeline(str(ckpt), str(cfw))
    assert len(counted_converter) == 1, "the cached conversion was not reused"
    assert hashed == [], "an unchanged checkpoint was hashed again"
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Touched (new mtime), same bytes: hashed again, same cache entry.
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    load_pipeline(str(ckpt), str(cfw))
    assert len(counted_converter) == 1 and [p.name for p in hashed] == [ckpt.name]

    # Other bytes: another entry. (A new file: the loaded pipelines may map the old one's tensors.)
    sd = load_checkpoint(ckpt)[0]
    sd["model.diffusion_model.out.2.bias"] = sd["model.diffusion_model.out.2.bias"] + 1
    torch.save({"state_dict": sd}, tmp_path / "stablesr_tiny_changed.ckpt")
    load_pipeline(str(tmp_path / "stablesr_tiny_changed.ckpt"), str(cfw))
    assert len(counted_converter) == 2 and len(list((cache / "converted").iterdir())) == 2


def test_corrupt_or_half_written_cache_entry_is_rebuilt(tiny_ref_dir, cache, counted_converter, monkeypatch, caplog):
    ckpt, cfw = str(tiny_ref_dir / "stablesr_tiny.ckpt"), str(tiny_ref_dir / "vqgan_cfw_tiny.ckpt")

    # A save that dies half-way leaves no entry (the folder is renamed into place only when complete).
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    real_save = StableSRPipeline.save_pretrained

    def dying_save(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        (folder / UNET_WEIGHTS).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(StableSRPipeline, "save_pretrained", dying_save)
    load_pipeline(ckpt, cfw)
    assert not (cache / "converted").exists() or not [
        p for p in (cache / "converted").iterdir() if not p.name.startswith(".")
    ]
    monkeypatch.setattr(StableSRPipeline, "save_pretrained", real_save)
    load_pipeline(ckpt, cfw)
    assert len(counted_converter) == 2
    (entry,) = [p for p in (cache / "converted").iterdir() if not p.name.startswith(".")]

    # A corrupt entry (truncated weights) is reported in the log and rebuilt.
    data = (entry / UNET_WEIGHTS).read_bytes()
    (entry / UNET_WEIGHTS).write_bytes(data[:1000])
    with caplog.at_level(logging.WARNING, logger="stablesr.loading"):
        pipe = load_pipeline(ckpt, cfw)
    assert len(counted_converter) == 3
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "unusable" in warned and "truncated" in warned and str(entry / UNET_WEIGHTS) in warned
    loading.check_model_folder(entry)  # rebuilt in place
    assert pipe.unet.conv_in.weight.abs().sum() > 0
    load_pipeline(ckpt, cfw)
    assert len(counted_converter) == 3
