"""stablesr.acceleration on the tiny converted model (128 px native, 16-latent tiles): CPU offload with the accelerate
hooks active, regional torch.compile, the work count and the time estimate, and the --dtype auto rule."""

import types

import numpy as np
import pytest
import torch
from conftest import realign
from PIL import Image

from stablesr import acceleration
from stablesr.acceleration import RestoreEstimator, compile_pipeline, enable_offload, restore_work
from stablesr.cascade import cascade_upscale
from stablesr.loading import resolve_dtype
from stablesr.pipelines.pipeline_stablesr import StableSRPipeline


def load(folder) -> StableSRPipeline:
    """The pipeline with its weights copied into freshly allocated memory (conftest.realign): oneDNN's CPU kernels
    round differently for the unaligned memory-mapped weights than for the copies that offload hooks make."""
    pipe = StableSRPipeline.from_pretrained(folder)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            realign(component)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(small_pipeline_dir):
    return load(small_pipeline_dir)


def image(h=40, w=56, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 4, 2), max(w // 4, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def restore(pipe, img=None, **kwargs):
    kwargs = {"upscale": 2, "num_inference_steps": 1, "output_type": "pt", **kwargs}
    return pipe(img or image(), generator=torch.Generator().manual_seed(0), **kwargs).images


# ----------------------------------------------------------------------------------------------------------- offload
@pytest.fixture(scope="module")
def reference(pipe):
    return restore(pipe, tile_batch_size=1)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_on_cpu_gives_the_same_output_with_hooks_active(reference, small_pipeline_dir, mode):
    offloaded = load(small_pipeline_dir)
    enable_offload(offloaded, mode, "cpu")
    if mode == "model":
        # One hook per model: the chain text_encoder -> unet -> vae, and standalone hooks for the time-aware
        # encoder and both adapters; the parameter-less prompt embedding stays on the device.
        hooked = {n for n, m in offloaded.components.items() if hasattr(m, "_hf_hook")}
        assert hooked == {"unet", "vae", "time_aware_encoder", "sft_adapter", "cfw_adapter"}
        assert len(offloaded._all_hooks) == 5
        assert offloaded.model_cpu_offload_seq == "text_encoder->unet->vae"
    else:
        # Per-layer hooks, weights held by the hooks (parameters on the meta device); the adapters stay whole.
        assert hasattr(offloaded.unet.conv_in, "_hf_hook") and offloaded.unet.conv_in.weight.device.type == "meta"
        assert hasattr(offloaded.vae.decoder.conv_in, "_hf_hook")
        for name in ("sft_adapter", "cfw_adapter"):
            assert all(p.device.type == "cpu" for p in getattr(offloaded, name).parameters()), name
    for _ in range(2):  # the hooks are re-armed after each call (maybe_free_model_hooks)
        out = restore(offloaded, tile_batch_size=1)
        assert torch.equal(out, reference), f"{mode} offload changed the output by {(out - reference).abs().max()}"
    if mode == "sequential":
        assert all(p.device.type == "cpu" for p in offloaded.sft_adapter.parameters()), "SFT weights were lost"


def test_offload_rejects_unknown_mode(pipe):
    with pytest.raises(ValueError, match="model.*sequential"):
        enable_offload(pipe, "layers", "cpu")


# ----------------------------------------------------------------------------------------------------------- compile
def test_regional_compile_equals_eager_and_does_not_recompile(pipe):
    """Backend "eager": dynamo traces every block with the SFT wrappers inside (fullgraph, so a graph break fails)
    but runs the captured graphs with eager kernels. Inductor's code generation takes minutes for these blocks on a
    2-core CPU; its speed and outputs are measured by scripts/bench_compile.py. Tolerance: identical (same kernels)."""
    from torch._dynamo.utils import counters

    eager = restore(pipe)
    eager_other_tiles = restore(pipe, tile_size=12, tile_overlap=4, tile_batch_size=3)
    torch._dynamo.reset()
    counters.clear()
    count = compile_pipeline(pipe, backend="eager")
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    encoder_blocks = [m for m in pipe.time_aware_encoder.modules()
                      if type(m).__name__ in ("TimestepResBlock", "LegacyAttentionBlock")]
    try:
        assert count == len(blocks) + len(encoder_blocks) and encoder_blocks
        assert all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks + encoder_blocks)
        assert torch.equal(restore(pipe), eager)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0, "nothing was compiled"
        # Another call re-attaches new SFT wrappers, with other tile sizes and tile batches: no new graphs.
        assert torch.equal(restore(pipe, tile_size=12, tile_overlap=4, tile_batch_size=3), eager_other_tiles)
        assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a new call or tile size"
    finally:  # the module-scoped pipeline runs eagerly again for the other tests
        for m in blocks + encoder_blocks:
            m._compiled_call_impl = None
        torch._dynamo.reset()


def test_compile_refuses_sequential_offload(small_pipeline_dir):
    pipe = load(small_pipeline_dir)
    enable_offload(pipe, "sequential", "cpu")
    with pytest.raises(ValueError, match="sequential offload"):
        compile_pipeline(pipe, backend="eager")


# ---------------------------------------------------------------------------------------------- work and estimate
class Counter:
    """Counts what the pipeline really runs: UNet calls and the tiles in them, VAE encoder and decoder pixels."""

    def __init__(self, pipe):
        self.unet_calls = self.tiles = self.encode_pixels = self.decode_pixels = 0
        self.handles = [
            pipe.unet.register_forward_pre_hook(self.unet),
            pipe.vae.encoder.register_forward_pre_hook(self.encoder),
            pipe.vae.decoder.register_forward_pre_hook(self.decoder),
        ]
        self.factor = pipe.vae_scale_factor

    def unet(self, module, args):
        self.unet_calls += 1
        self.tiles += args[0].shape[0]

    def encoder(self, module, args):
        self.encode_pixels += args[0].shape[-2] * args[0].shape[-1]

    def decoder(self, module, args):
        self.decode_pixels += args[0].shape[-2] * args[0].shape[-1] * self.factor**2

    def remove(self):
        for handle in self.handles:
            handle.remove()


CASES = {
    "one tile": dict(size=(40, 56), upscale=2, num_inference_steps=2),
    "tiles in batches": dict(size=(40, 56), upscale=4, num_inference_steps=1, tile_overlap=6, tile_batch_size=4),
    "cascade x8, tiled VAE with CFW": dict(size=(20, 28), upscale=8, num_inference_steps=1, max_pass_upscale=4,
                                           vae_tile_size=128, vae_tile_overlap=32),
    "no CFW weight, other scheduler steps": dict(size=(40, 40), upscale=3, num_inference_steps=3, fidelity_weight=0,
                                                 vae_tile_size=96, vae_tile_overlap=16),
}


@pytest.mark.parametrize("case", CASES)
def test_restore_work_equals_what_the_pipeline_runs(pipe, case):
    kwargs = dict(CASES[case])
    height, width = kwargs.pop("size")
    work = restore_work(pipe, height, width, **kwargs)
    counter = Counter(pipe)
    try:
        cascade_upscale(pipe, image(height, width), generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        counter.remove()
    assert work.unet_calls == counter.unet_calls
    assert work.tile_steps == counter.tiles
    assert work.encode_pixels == counter.encode_pixels
    assert work.decode_pixels + work.cfw_decode_pixels == counter.decode_pixels
    assert work.passes == (2 if "cascade" in case else 1)
    if case == "tiles in batches":
        assert work.tiles == 6 and work.unet_calls == 2


def test_restore_work_of_the_cpu_example(pipe):
    """512^2 at x4 with the default 64-latent tile: 49 tiles at overlap 32, 25 at the CPU default 16."""
    big = types.SimpleNamespace(**{k: getattr(pipe, k) for k in ("vae_scale_factor", "cfw_adapter", "config")},
                                scheduler=pipe.scheduler, default_tile_size=64,
                                working_canvas=lambda h, w, s: StableSRPipeline.working_canvas(big, h, w, s),
                                native_size=512, canvas_multiple=64)
    assert restore_work(big, 512, 512, 4, 4).tiles == 49
    assert restore_work(big, 512, 512, 4, 4, tile_overlap=16).tiles == 25
    assert restore_work(big, 512, 512, 4, 4).tile_steps == 49 * 4


def test_estimator_measures_and_reports_once(pipe):
    works = [restore_work(pipe, 40, 56, 2, 1, tile_batch_size=1)] * 2
    assert works[0].unet_calls == 2
    reports = []
    with RestoreEstimator(pipe, works, lambda seconds, text: reports.append((seconds, text)), min_seconds=0) as est:
        restore(pipe, tile_batch_size=1)  # the second UNet call makes the estimate
        assert len(reports) == 1
        restore(pipe, tile_batch_size=1)
        assert len(est.tile_seconds) == 2, "stops measuring once the estimate is made"
    assert len(reports) == 1
    seconds, text = reports[0]
    work = works[0] + works[1]
    assert est.encoded_pixels == works[0].encode_pixels  # the first image's LQ encode, before sampling
    expected = work.tile_steps * est.tile_seconds[-1] + work.encode_equivalent_pixels * (
        est.encode_seconds / est.encoded_pixels)
    assert seconds == pytest.approx(expected) and seconds > 0
    assert f"for 2 images ({work.tiles} tiles x 1 steps = {work.tile_steps} UNet tile evaluations" in text
    assert not pipe.unet._forward_hooks and not pipe.time_aware_encoder._forward_pre_hooks, "hooks left behind"
    silent = []
    with RestoreEstimator(pipe, works[:1], lambda s, t: silent.append(t), min_seconds=1e9):
        restore(pipe, tile_batch_size=1)
    assert not silent, "estimates below min_seconds are not reported"


# --------------------------------------------------------------------------------------------------- dtype auto
def test_dtype_auto_rule(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("auto", "mps") == "fp16"
    assert resolve_dtype("bf16", "cpu") == "bf16" and resolve_dtype("float16", "cuda") == "fp16"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
    monkeypatch.setattr(torch.version, "hip", None)
    for major, expected in ((7, "fp16"), (8, "bf16"), (9, "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, m=major: types.SimpleNamespace(major=m))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        assert resolve_dtype("auto", "cuda") == expected
        assert resolve_dtype("auto", "cuda:1") == expected
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert resolve_dtype("auto", "cuda") == "bf16"


def test_cli_defaults_and_choices():
    import argparse

    from stablesr.cli.common import add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args([])
    assert (args.dtype, args.compile, args.offload) == ("auto", False, "none")
    args = parser.parse_args(["--dtype", "bf16", "--compile", "--offload", "sequential"])
    assert (args.dtype, args.compile, args.offload) == ("bf16", True, "sequential")
    with pytest.raises(SystemExit):
        parser.parse_args(["--offload", "disk"])


def test_cli_restore_with_offload_prints_dtype_and_estimate(small_pipeline_dir, tmp_path, capsys, monkeypatch):
    from stablesr.cli import main

    src = tmp_path / "in.png"
    image(40, 56).save(src)
    reports = []
    original = RestoreEstimator._finish

    def finish(self):
        self.min_seconds = 0  # the tiny model is fast: report whatever it estimates
        original(self)
        reports.append(self.estimate)

    monkeypatch.setattr(RestoreEstimator, "_finish", finish)
    code = main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", str(small_pipeline_dir), "--steps", "1",
                 "--upscale", "2", "--offload", "model", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0
    assert "running on cpu in fp32 (auto), model offload" in err
    assert len(reports) == 1 and "estimated ~" in err and "UNet tile evaluations" in err
    assert Image.open(tmp_path / "out" / "in.png").size == (112, 80)


def test_acceleration_module_exports():
    assert set(acceleration.__all__) <= set(dir(acceleration))
