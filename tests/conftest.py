"""Shared pytest fixtures.

The official test vectors (``stablesr-tiny``) are read from ``$STABLESR_REFERENCE_DIR`` (default
``../shared/reference/stablesr-tiny`` next to the checkout). They are ~29 MB and are never committed. When they are
missing the equivalence tests skip with the reason, unless ``STABLESR_REQUIRE_REFERENCE=1`` (set by ``.ci/run``),
in which case a missing folder is an error, so CI can never silently pass without running them.
"""

import functools
import json
import os
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference" / "stablesr-tiny"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow (GPU/real weights)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --run-slow to run it (needs a GPU or real weights)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def reference_dir() -> Path:
    return Path(os.environ.get("STABLESR_REFERENCE_DIR", DEFAULT_REFERENCE_DIR))


@pytest.fixture(scope="session")
def tiny_ref_dir() -> Path:
    path = reference_dir()
    if not (path / "cases.safetensors").is_file():
        msg = (
            f"official test vectors not found at {path} (set STABLESR_REFERENCE_DIR to the stablesr-tiny folder "
            "from shared/reference)"
        )
        if os.environ.get("STABLESR_REQUIRE_REFERENCE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def tiny_cases(tiny_ref_dir):
    """All tensors of cases.safetensors, as a dict of CPU tensors."""
    from safetensors.torch import load_file

    return load_file(str(tiny_ref_dir / "cases.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Facts of the fixture. Other vector folders of the same format (other sizes, step counts, batch sizes, tiles,
# v-prediction) are tested by pointing STABLESR_REFERENCE_DIR at them, so tests must read such facts from the fixture
# (cases.json "meta", the tensor names / shapes, config.yaml) instead of hard-coding the values of stablesr-tiny.


@pytest.fixture(scope="session")
def case_meta(tiny_ref_dir) -> dict:
    """cases.json "meta": the exact call arguments of every case (c8.ddpm_steps, c9.tile_size, ...)."""
    return json.loads((tiny_ref_dir / "cases.json").read_text())["meta"]


@pytest.fixture(scope="session")
def ref_config(tiny_ref_dir) -> dict:
    """The fixture's official LDM config (config.yaml) as a plain dict."""
    import yaml

    return yaml.safe_load((tiny_ref_dir / "config.yaml").read_text())


def prediction_type_of(ldm_config: dict) -> str:
    """diffusers prediction_type of an official LDM config: ``parameterization`` eps (default) or v."""
    parameterization = ldm_config["model"]["params"].get("parameterization", "eps")
    return {"eps": "epsilon", "v": "v_prediction"}[parameterization]


@pytest.fixture(scope="session")
def ref_prediction_type(ref_config) -> str:
    return prediction_type_of(ref_config)


def feature_widths(cases, prefix: str) -> list[int]:
    """Widths W of the keys ``<prefix>enc_out_<W>``, largest first (the order the encoder returns its features)."""
    pattern = re.compile(re.escape(prefix) + r"enc_out_(\d+)$")
    widths = sorted((int(m.group(1)) for key in cases if (m := pattern.match(key))), reverse=True)
    if not widths:
        raise KeyError(f"no {prefix}enc_out_<W> tensors in the reference vectors")
    return widths


def key_numbers(cases, pattern: str) -> list[int]:
    """Sorted distinct integers captured by the one group of ``pattern`` (full match) over the tensor names."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in cases if (m := regex.fullmatch(key))})


def reference_keys() -> list[str] | None:
    """Tensor names of the fixture, read at COLLECTION time (for parametrize); None when it cannot be read.

    Tests parametrized from these names fall back to the stablesr-tiny values when the folder is missing, and then
    skip or fail through ``tiny_ref_dir`` like every other official-vector test.
    """
    keys = _safetensors_keys(str(reference_dir() / "cases.safetensors"))
    return None if keys is None else list(keys)


@functools.cache
def _safetensors_keys(path: str) -> tuple[str, ...] | None:
    if not Path(path).is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return tuple(f.keys())
    except Exception:  # unreadable file: let the tiny_cases fixture report it
        return None


def collected_numbers(pattern: str, fallback) -> list[int]:
    """``key_numbers`` over the fixture's tensor names at collection time, or ``fallback`` when they are unknown."""
    keys = reference_keys()
    if keys is None:
        return list(fallback)
    return key_numbers(keys, pattern)


# name -> max relative error of every official-vector comparison made in this session (printed at the end).
EQUIVALENCE_ERRORS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if not EQUIVALENCE_ERRORS:
        return
    terminalreporter.section("official vectors: max |ours - official| / max|official| per tensor")
    for name in sorted(EQUIVALENCE_ERRORS):
        terminalreporter.write_line(f"{name:60s} {EQUIVALENCE_ERRORS[name]:.2e}")
    official = {k: v for k, v in EQUIVALENCE_ERRORS.items() if re.match(r"c\d+\.", k)}
    if official:
        worst = max(official, key=official.get)
        terminalreporter.write_line(
            f"{len(official)} official-vector comparisons, worst {official[worst]:.2e} ({worst}; bound 1e-4); "
            f"{len(EQUIVALENCE_ERRORS) - len(official)} other comparisons use their own stated tolerances"
        )


def assert_close_rel(actual, expected, rtol: float = 1e-4, atol: float = 1e-5, name: str = "tensor"):
    """|a - b| <= rtol * max|expected| + atol elementwise (the tolerance stated in the fixture's cases.md)."""
    import torch

    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    bound = rtol * scale + atol
    EQUIVALENCE_ERRORS[name] = max(EQUIVALENCE_ERRORS.get(name, 0.0), err / max(scale, 1e-12))
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e} (rtol {rtol} x max|ref| {scale:.3e} + {atol})"
    return err / max(scale, 1e-12)


@pytest.fixture(scope="session")
def converted_tiny(tiny_ref_dir, tiny_cases, tmp_path_factory):
    """The official tiny checkpoint pair converted with ``convert_stablesr_checkpoint`` (official YAML), and saved.

    The tiny checkpoint has no text encoder (the vectors feed the context directly), so the stored prompt embedding is
    the first context of case c8. Returns ``(pipeline, report, output_dir)``... as ``(pipeline, report)`` plus the
    folder in ``pipeline.converted_dir``.
    """
    from stablesr.conversion import convert_stablesr_checkpoint

    out = tmp_path_factory.mktemp("converted") / "stablesr-tiny"
    pipe, report = convert_stablesr_checkpoint(
        tiny_ref_dir / "stablesr_tiny.ckpt",
        tiny_ref_dir / "vqgan_cfw_tiny.ckpt",
        out,
        original_config=tiny_ref_dir / "config.yaml",
        prompt_embeds=tiny_cases["c8.context"][:1],
    )
    pipe.converted_dir = out
    return pipe, report


def plain_config(config) -> dict:
    """A model config without private keys and with tuples as lists (as JSON stores them), for equality checks."""
    import json

    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


def realign(model):
    """Copy every parameter/buffer into freshly allocated (64-byte aligned) memory; see the round-trip tests."""
    import torch

    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model


@pytest.fixture(scope="session")
def small_pipeline_dir(converted_tiny, tmp_path_factory):
    """The converted tiny model, saved with a 16-latent (128 px) native size so end-to-end tests stay fast on a CPU.

    Only ``unet.config.sample_size`` changes (it sets the minimum working size and the aggregation tile); weights are
    the converted official ones.
    """
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    pipe, _ = converted_tiny
    out = tmp_path_factory.mktemp("small") / "stablesr-tiny-128"
    small = StableSRPipeline.from_pretrained(pipe.converted_dir)
    small.unet.register_to_config(sample_size=16)
    small.save_pretrained(out)
    return out
