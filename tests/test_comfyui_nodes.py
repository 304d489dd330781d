"""The ComfyUI node pack (``comfyui/``), called directly with ComfyUI's tensor conventions; no ComfyUI needed.

The pack is imported by path, as ComfyUI imports a custom node folder. ComfyUI's own modules (progress bar, device,
interrupt, memory) are stood in for by small fakes where a test checks that the nodes use them. Model: the converted
tiny pipeline with a 128 px native size (``small_pipeline_dir``), 32x32 inputs at x4, 1-2 steps.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

PACK_DIR = Path(__file__).resolve().parents[1] / "comfyui"
PACK_NAME = "stablesr_comfyui_pack_under_test"
COMFY_CORE_NODES = {"LoadImage", "SaveImage"}
COMFY_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
COMFY_CORE_TYPES = {"IMAGE", "MASK", "LATENT"}
STEPS = 2


def import_pack(name: str = PACK_NAME) -> types.ModuleType:
    """Import ``comfyui/`` as a package from its folder, as ComfyUI's ``load_custom_node`` does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return import_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return sys.modules[f"{pack.__name__}.nodes"]


@pytest.fixture(scope="module")
def model(nodes, small_pipeline_dir):
    (loaded,) = nodes.StableSRLoadModel().load(str(small_pipeline_dir), "fp32")
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Counts StableSRPipeline.__call__ (sampling) runs."""
    calls = []
    original = StableSRPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("generator"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableSRPipeline, "__call__", counting)
    return calls


def comfy_image(batch: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE: (B, H, W, 3) float32 in [0, 1], smooth enough to be an image."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return image.permute(0, 2, 3, 1).contiguous()


def sampling_kwargs(**overrides):
    kwargs = dict(upscale=4.0, steps=STEPS, seed=7, scheduler="ddpm", tile_size=0, tile_overlap=0.5, tile_batch=4,
                  vae_tile_size=1024, start="lq")
    kwargs.update(overrides)
    return kwargs


# ---------------------------------------------------------------------------------------------- the node definitions
def _input_specs(node_cls) -> dict[str, tuple]:
    types_ = node_cls.INPUT_TYPES()
    assert set(types_) <= {"required", "optional", "hidden"} and "required" in types_
    return {**types_["required"], **types_.get("optional", {})}


def test_mappings_complete_and_nodes_consistent(pack, nodes):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert set(pack.NODE_CLASS_MAPPINGS) == {
        "StableSRLoadModel", "StableSRSample", "StableSRDecode", "StableSRUpscale"}
    produced = {t for cls in pack.NODE_CLASS_MAPPINGS.values() for t in cls.RETURN_TYPES}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("StableSR ")
        assert isinstance(cls.CATEGORY, str) and cls.CATEGORY.startswith("image/upscaling")
        assert isinstance(cls.RETURN_TYPES, tuple) and isinstance(cls.RETURN_NAMES, tuple)
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) >= 1
        assert isinstance(inspect.getattr_static(cls, "INPUT_TYPES"), classmethod)
        function = getattr(cls(), cls.FUNCTION)
        specs = _input_specs(cls)
        # ComfyUI calls FUNCTION with every input as a keyword argument: the signature must take exactly these.
        params = inspect.signature(function).parameters
        assert set(specs) == set(params), f"{name}: inputs {sorted(specs)} != parameters {sorted(params)}"
        for input_name in cls.INPUT_TYPES().get("optional", {}):  # ComfyUI leaves out unset optional inputs
            assert params[input_name].default is not inspect.Parameter.empty, f"{name}.{input_name}"
        for input_name, spec in specs.items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):  # a combo: the default must be one of the choices
                assert kind and options.get("default", kind[0]) in kind, f"{name}.{input_name}"
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{name}.{input_name}"
            elif kind not in COMFY_WIDGET_TYPES | COMFY_CORE_TYPES:
                assert kind in produced, f"{name}.{input_name}: type {kind} is made by no node"
    slider = nodes.StableSRDecode.INPUT_TYPES()["required"]["fidelity_weight"]
    assert slider[0] == "FLOAT" and {"min": 0.0, "max": 1.0, "step": 0.01}.items() <= slider[1].items()


def test_pyproject_has_registry_keys():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())
    project, comfy = config["project"], config["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]
    assert any(re.match(r"stablesr\b", dep) for dep in project["dependencies"])
    assert project["urls"]["Repository"].startswith("https://")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert isinstance(comfy[key], str), key
    assert comfy["PublisherId"] and comfy["DisplayName"]
    requirements = [line.strip() for line in (PACK_DIR / "requirements.txt").read_text().splitlines()]
    assert any(re.match(r"stablesr\b", line) for line in requirements if not line.startswith("#"))


def _widget_names(cls) -> list[str]:
    """Widget values as the ComfyUI front end stores them: non-link inputs in order, plus the seed's
    control_after_generate value."""
    names = []
    for input_name, spec in _input_specs(cls).items():
        kind = spec[0]
        if isinstance(kind, list) or kind in COMFY_WIDGET_TYPES:
            names.append(input_name)
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                names.append(f"{input_name}:control_after_generate")
    return names


def test_example_workflow_uses_only_existing_nodes(pack):
    workflow = json.loads((PACK_DIR / "example_workflows" / "stablesr_upscale.json").read_text())
    by_id = {node["id"]: node for node in workflow["nodes"]}
    node_types = {node["type"] for node in workflow["nodes"]}
    assert node_types <= set(pack.NODE_CLASS_MAPPINGS) | COMFY_CORE_NODES
    assert {"LoadImage", "StableSRLoadModel", "StableSRSample", "StableSRDecode", "SaveImage"} <= node_types
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        assert by_id[source]["outputs"][source_slot]["type"] == link_type
        assert link_id in by_id[source]["outputs"][source_slot]["links"]
        target_input = by_id[target]["inputs"][target_slot]
        assert (target_input["type"], target_input["link"]) == (link_type, link_id)
    for node in workflow["nodes"]:
        cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        names = _widget_names(cls)
        assert len(node["widgets_values"]) == len(names), f"{node['type']}: widgets {names}"
        specs = _input_specs(cls)
        for input_name, value in zip(names, node["widgets_values"], strict=True):
            if input_name in specs and isinstance(specs[input_name][0], list):
                assert value in specs[input_name][0], f"{node['type']}.{input_name} = {value!r}"
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        assert linked == set(specs) - {n for n in names if n in specs}, node["type"]

    api = json.loads((PACK_DIR / "example_workflows" / "stablesr_upscale_api.json").read_text())
    assert {entry["class_type"] for entry in api.values()} == node_types
    for entry in api.values():
        cls = pack.NODE_CLASS_MAPPINGS.get(entry["class_type"])
        for value in entry["inputs"].values():
            if isinstance(value, list):
                assert value[0] in api
        if cls is not None:
            assert set(entry["inputs"]) == set(_input_specs(cls)), entry["class_type"]


def test_missing_stablesr_gives_install_message():
    """Without stablesr (or with a dependency of it missing) the pack's import fails with the fix in the message."""
    code = (
        "import importlib.util, sys\n"
        "def attempt(blocked):\n"
        "    for name in [m for m in sys.modules if m.split('.')[0] in ('pack', 'stablesr', 'diffusers')]:\n"
        "        del sys.modules[name]\n"
        "    sys.modules[blocked] = None\n"  # as if not installed
        f"    spec = importlib.util.spec_from_file_location('pack', {str(PACK_DIR / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(PACK_DIR)!r}])\n"
        "    module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module\n"
        "    try:\n        spec.loader.exec_module(module)\n    except ImportError as err:\n"
        "        print('ERROR', err)\n"
        "    del sys.modules[blocked]\n"
        "attempt('diffusers'); attempt('stablesr')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    errors = run.stdout.split("ERROR ")[1:]
    assert len(errors) == 2, run.stdout
    assert errors[0].startswith("StableSR nodes: `stablesr` is installed but its dependency `diffusers` cannot")
    assert errors[1].startswith("StableSR nodes: the `stablesr` Python package is not installed")
    assert all(f"{sys.executable} -m pip install stablesr" in error for error in errors)


# -------------------------------------------------------------------------------------------------------- loading
def test_load_model_is_cached(nodes, small_pipeline_dir, monkeypatch):
    loads = []
    original = nodes.load_pipeline

    def counting(*args):
        loads.append(args)
        return original(*args)

    monkeypatch.setattr(nodes, "load_pipeline", counting)
    monkeypatch.setattr(nodes, "_MODEL_CACHE", {})
    first = nodes.StableSRLoadModel().load(str(small_pipeline_dir), "fp32")[0]
    again = nodes.StableSRLoadModel().load(f" {small_pipeline_dir} ", "fp32", cfw="")[0]
    assert again is first and len(loads) == 1
    assert loads[0] == (str(small_pipeline_dir), None, nodes.default_device(), "fp32")
    other = nodes.StableSRLoadModel().load(str(small_pipeline_dir), "bf16")[0]
    assert other is not first and len(loads) == 2 and other.pipe.unet.dtype == torch.bfloat16
    assert list(nodes._MODEL_CACHE.values()) == [other], "only the last loaded model is kept"
    with pytest.raises(ValueError, match="`model` is empty"):
        nodes.StableSRLoadModel().load("  ", "fp32")


# ------------------------------------------------------------------------------------------------- sample / decode
def test_decode_at_another_weight_does_not_sample(nodes, model, pipeline_calls):
    (samples,) = nodes.StableSRSample().sample(model, comfy_image(), **sampling_kwargs())
    assert len(pipeline_calls) == 1 and len(samples) == 1 and samples.seeds == [7]
    assert samples.latents[0].device.type == "cpu" and samples.conditions[0].cfw_features is None
    unet_runs = []
    handle = model.pipe.unet.register_forward_hook(lambda *args: unet_runs.append(1))
    try:
        (realism,) = nodes.StableSRDecode().decode(samples, 0.0, "wavelet", 1024)
        (fidelity,) = nodes.StableSRDecode().decode(samples, 1.0, "wavelet", 1024)
        (realism_again,) = nodes.StableSRDecode().decode(samples, 0.0, "wavelet", 1024)
    finally:
        handle.remove()
    assert len(pipeline_calls) == 1 and not unet_runs, "decoding ran the sampler again"
    for out in (realism, fidelity):  # a ComfyUI IMAGE: (B, 4H, 4W, 3) float32 in [0, 1] on the CPU
        assert out.shape == (1, 128, 128, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
        assert 0.0 <= out.min().item() and out.max().item() <= 1.0 and out.std().item() > 0.01
    assert (realism - fidelity).abs().max().item() > 1e-3, "the fidelity weight changed nothing"
    assert torch.equal(realism, realism_again)


def test_upscale_equals_sample_then_decode(nodes, model):
    image = comfy_image(seed=3)
    kwargs = sampling_kwargs(seed=11, scheduler="ddim")
    (samples,) = nodes.StableSRSample().sample(model, image, **kwargs)
    (two_nodes,) = nodes.StableSRDecode().decode(samples, 0.3, "adain", kwargs["vae_tile_size"])
    (one_node,) = nodes.StableSRUpscale().upscale(model, image, fidelity_weight=0.3, color_fix="adain", **kwargs)
    assert torch.equal(one_node, two_nodes)


def test_batch_equals_the_pipeline_called_directly_with_seed_plus_index(nodes, model):
    batch = torch.cat([comfy_image(seed=1), comfy_image(seed=2)])
    (ours,) = nodes.StableSRUpscale().upscale(model, batch, fidelity_weight=0.7, color_fix="wavelet",
                                               **sampling_kwargs(seed=123))
    assert ours.shape == (2, 128, 128, 3)
    pipe = model.pipe
    pipe.scheduler = model.scheduler("ddpm")
    for index in range(2):
        direct = pipe(batch[index : index + 1].permute(0, 3, 1, 2), upscale=4.0, num_inference_steps=STEPS,
                      fidelity_weight=0.7, color_fix="wavelet", generator=torch.Generator().manual_seed(123 + index),
                      output_type="pt").images
        assert torch.equal(ours[index : index + 1], direct.permute(0, 2, 3, 1)), f"image {index}"
    assert nodes.image_seed(123, 1) == 124 and nodes.image_seed(nodes.SEED_MAX, 1) == 0


def test_rejects_what_is_not_a_comfy_image(nodes, model):
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        nodes.StableSRSample().sample(model, torch.rand(1, 3, 32, 32)[..., :2], **sampling_kwargs())
    with pytest.raises(ValueError, match="tile_overlap"):
        nodes.StableSRSample().sample(model, comfy_image(), **sampling_kwargs(tile_overlap=1.0))


# ------------------------------------------------------------------------------------------ ComfyUI's own modules
class _Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch):
    """Stand-ins for comfy.utils and comfy.model_management that record how the nodes use them."""
    record = types.SimpleNamespace(progress=[], interrupt_checks=0, interrupt_after=None, empty_cache=0, unloads=0)

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total
            record.progress.append(("new", total))

        def update_absolute(self, value, total=None, preview=None):
            record.progress.append((value, total))

    def throw_exception_if_processing_interrupted():
        record.interrupt_checks += 1
        if record.interrupt_after is not None and record.interrupt_checks > record.interrupt_after:
            raise _Interrupted

    def soft_empty_cache(force=False):
        record.empty_cache += 1

    def unload_all_models():
        record.unloads += 1

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.soft_empty_cache = soft_empty_cache
    mm.unload_all_models = unload_all_models
    comfy.utils, comfy.model_management = utils, mm
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    return record


def test_uses_comfy_progress_interrupt_and_memory(nodes, model, fake_comfy):
    assert nodes.default_device() == "cpu"
    batch = torch.cat([comfy_image(seed=1), comfy_image(seed=2)])
    (samples,) = nodes.StableSRSample().sample(model, batch, **sampling_kwargs())
    steps = len(model.pipe.scheduler.timesteps)
    assert fake_comfy.progress == [("new", 2 * STEPS)] + [(i, 2 * steps) for i in range(1, 2 * steps + 1)]
    assert fake_comfy.interrupt_checks >= 2 * steps  # every step, and before every image
    assert fake_comfy.empty_cache >= 1
    assert fake_comfy.unloads == 0, "ComfyUI's models stay loaded when StableSR runs on the CPU"
    fake_comfy.progress.clear()
    nodes.StableSRDecode().decode(samples, 0.5, "wavelet", 1024)
    assert fake_comfy.progress == [("new", 2), (1, 2), (2, 2)]


def test_interrupt_stops_sampling_and_leaves_the_model_usable(nodes, model, fake_comfy):
    image = comfy_image(seed=9)
    fake_comfy.interrupt_after = 1  # Cancel pressed during the first step
    with pytest.raises(_Interrupted):
        nodes.StableSRSample().sample(model, image, **sampling_kwargs())
    assert not model.pipe.sft_adapter.is_attached(model.pipe.unet), "the SFT layers stayed attached"
    assert not model.lock.locked()
    fake_comfy.interrupt_after = None
    (after,) = nodes.StableSRUpscale().upscale(model, image, fidelity_weight=0.5, color_fix="wavelet",
                                               **sampling_kwargs())
    pipe = model.pipe
    pipe.scheduler = model.scheduler("ddpm")
    direct = pipe(image.permute(0, 3, 1, 2), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
                  output_type="pt").images
    assert torch.equal(after, direct.permute(0, 2, 3, 1))
