"""Shared pytest fixtures.

The official test vectors (``stablesr-tiny``) are read from ``$STABLESR_REFERENCE_DIR`` (default
``../shared/reference/stablesr-tiny`` next to the checkout). They are ~29 MB and are never committed. When they are
missing the equivalence tests skip with the reason, unless ``STABLESR_REQUIRE_REFERENCE=1`` (set by ``.ci/run``),
in which case a missing folder is an error, so CI can never silently pass without running them.
"""

import os
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


# name -> max relative error of every official-vector comparison made in this session (printed at the end).
EQUIVALENCE_ERRORS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if not EQUIVALENCE_ERRORS:
        return
    terminalreporter.section("official vectors: max |ours - official| / max|official| per tensor")
    for name in sorted(EQUIVALENCE_ERRORS):
        terminalreporter.write_line(f"{name:60s} {EQUIVALENCE_ERRORS[name]:.2e}")
    import re

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
