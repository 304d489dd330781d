"""train/train_distill.py: 1- to 4-step students of a StableSR teacher, restored through the normal pipeline path.

The teacher is the converted official tiny fixture at a 128 px native size (``small_pipeline_dir``); its results are
its deterministic 50-step DPM-Solver++ samples made ahead of time by the CFW data generator (``--teacher_data``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "train_distill.py"
sys.path.insert(0, str(REPO / "train"))

import train_distill  # noqa: E402

from stablesr.training_utils import latest_checkpoint, list_checkpoints  # noqa: E402

TEACHER_STEPS = 50
DATA_SEED = 3
# Shared by the reference, 2-process and kill/resume runs (see test_train_sft.EXACT_ARGS for why Adam's epsilon is
# large and the learning rate small: SGD-like updates keep float reassociation at the rounding level).
EXACT_ARGS = ["--report_to=none", "--seed=7", "--learning_rate=1e-4", "--adam_epsilon=1.0",
              "--dataloader_num_workers=0", "--lora_rank=4"]
TRAINED = ("time_aware_encoder", "sft_adapter")


def _photo(name: str, short_side: int = 136) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    s = short_side / min(img.size)
    return img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)


@pytest.fixture(scope="module")
def teacher_data(small_pipeline_dir, tmp_path_factory):
    """Teacher results (50 deterministic DPM-Solver++ steps) for 8 training and 2 held-out crops, made with the CFW
    data generator as a user would (scripts/generate_cfw_data.py --scheduler dpmsolver)."""
    from stablesr import StableSRPipeline
    from stablesr.cfw_data import generate_cfw_data, list_sources
    from stablesr.schedulers import deterministic_scheduler

    root = tmp_path_factory.mktemp("distill")
    teacher = StableSRPipeline.from_pretrained(small_pipeline_dir)
    teacher.set_progress_bar_config(disable=True)
    teacher.scheduler = deterministic_scheduler("dpmsolver", teacher.scheduler.config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for split, names, per, seed in (("train", ("astronaut", "rocket", "coffee", "immunohistochemistry"), 2, DATA_SEED),
                                        ("held", ("chelsea",), 2, DATA_SEED + 1)):
            hq = root / f"hq_{split}"
            hq.mkdir()
            for name in names:
                _photo(name).save(hq / f"{name}.png")
            generate_cfw_data(teacher, root / split, list_sources(hq, None, per), gt_size=128,
                              num_inference_steps=TEACHER_STEPS, seed=seed, save_samples=False, progress=False,
                              sampler="dpmsolver")
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def one_thread():
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(args, out: Path, launcher=None, env=None, timeout=300):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + args + [f"--output_dir={out}"]
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _trained(folder) -> dict[str, torch.Tensor]:
    """The student's trained tensors in a checkpoint or output folder (encoder, SFT, UNet LoRA)."""
    folder = Path(folder)
    out = {}
    for part in TRAINED:
        for k, v in load_file(str(folder / part / "diffusion_pytorch_model.safetensors")).items():
            out[f"{part}.{k}"] = v
    lora = folder / "unet_lora" / "pytorch_lora_weights.safetensors"
    if not lora.exists():
        lora = folder / "pytorch_lora_weights.safetensors"
    out.update({f"lora.{k}": v for k, v in load_file(str(lora)).items()})
    return out


def _trained_parts(folder) -> dict[str, bytes]:
    """The encoder and SFT weight files of an output folder, as bytes (for bit-for-bit comparisons)."""
    return {part: (Path(folder) / part / "diffusion_pytorch_model.safetensors").read_bytes() for part in TRAINED}


def _base(teacher_dir, teacher_data):
    return [f"--pretrained_model_name_or_path={teacher_dir}", f"--teacher_data={teacher_data / 'train'}"]


def held_out_distance(folder, teacher_data, student_scheduler: bool = False) -> float:
    """Mean relative L2 distance between a model's 1-step result (through the pipeline: the normal restore path)
    and the teacher's 50-step result, over the held-out crops, each started from the same x_T as the teacher."""
    from stablesr import StableSRPipeline
    from stablesr.cfw_data import CFWDataset, _generator, sample_latents

    pipe = StableSRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if student_scheduler:  # the undistilled student: the teacher's weights with the student's sampler
        pipe.scheduler = train_distill.student_scheduler(pipe.scheduler.config)
    data = CFWDataset(teacher_data / "held")
    distances = []
    for i in range(len(data)):
        item = data[i]
        latents = sample_latents(pipe, (item["lq"][None] + 1) / 2, _generator(DATA_SEED + 1, int(item["name"]), "sample"),
                                 1)
        distances.append(train_distill.relative_l2(latents, item["latents"][None]).item())
    return sum(distances) / len(distances)


# ----------------------------------------------------------------------------------------------------------------------


def test_arguments_are_checked(small_pipeline_dir, teacher_data, tmp_path):
    base = [f"--pretrained_model_name_or_path={small_pipeline_dir}", f"--output_dir={tmp_path}", "--report_to=none"]
    with pytest.raises(ValueError, match="exactly one of --teacher_data"):
        train_distill.parse_args(base)
    with pytest.raises(FileNotFoundError, match="generate_cfw_data"):
        train_distill.parse_args(base + [f"--teacher_data={tmp_path}"])
    with pytest.raises(ValueError, match="at least one of"):
        train_distill.parse_args(base + [f"--teacher_data={teacher_data / 'train'}", "--traj_weight=0"])
    with pytest.raises(ValueError, match="student_steps"):
        train_distill.parse_args(base + [f"--teacher_data={teacher_data / 'train'}", "--student_steps=0"])
    args = train_distill.parse_args(base + [f"--teacher_data={teacher_data / 'train'}"])
    assert (args.student_steps, args.teacher_steps, args.traj_weight, args.dmd_weight) == (1, 50, 1.0, 0.0)
    config = REPO / "configs" / "train_distill.yaml"
    args = train_distill.parse_args([f"--config={config}"] + base + [f"--teacher_data={teacher_data / 'train'}"])
    assert args.student_steps == 1 and args.lora_rank > 0


def test_student_sampler_one_step_is_the_predicted_x0(small_pipeline_dir):
    """The stored sampler: 1 step is t = 999 -> x0 exactly; K steps start at 999 (the official respacing would run a
    1-step model at t = 0)."""
    from stablesr import StableSRPipeline

    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    scheduler = train_distill.student_scheduler(pipe.scheduler.config)
    for steps, first in ((1, 999), (2, 999), (4, 999)):
        scheduler.set_timesteps(steps)
        assert len(scheduler.timesteps) == steps and int(scheduler.timesteps[0]) == first
    scheduler.set_timesteps(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    step = scheduler.step(eps, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(step.prev_sample, scheduler.predict_original_sample(eps, scheduler.timesteps[0], x),
                               rtol=0, atol=0)


def test_training_step_is_the_pipeline_one_step_path(small_pipeline_dir, teacher_data):
    """What the student is trained on is what the pipeline runs: for a held-out crop, the training code's x_T (rebuilt
    from the sample's seed) through the UNet gives the pipeline's 1-step latent (tolerance 1e-5 relative)."""
    from stablesr import StableSRPipeline
    from stablesr.cfw_data import CFWDataset, _generator, sample_latents, sample_seed

    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = train_distill.student_scheduler(pipe.scheduler.config)
    item = CFWDataset(teacher_data / "held")[0]
    index = int(item["name"])
    expected = sample_latents(pipe, (item["lq"][None] + 1) / 2, _generator(DATA_SEED + 1, index, "sample"), 1)
    scheduler = train_distill.student_scheduler(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    gens = [torch.Generator().manual_seed(sample_seed(DATA_SEED + 1, index, "sample"))]
    with torch.no_grad():
        z_lq, x_start = train_distill.lq_start_latents(pipe.vae, item["lq"][None], gens, scheduler, 999)
        t = torch.tensor([999])
        with pipe.sft_adapter.attached(pipe.unet):
            pipe.sft_adapter.set_condition(pipe.time_aware_encoder(z_lq, t).features)
            out = pipe.unet(x_start, t, encoder_hidden_states=pipe.prompt_embedding()).sample
        x0 = scheduler.predict_original_sample(out, t, x_start)
    assert train_distill.relative_l2(x0, expected).item() < 1e-5
    # ... and the teacher result of that crop is a different, 50-step, latent
    assert train_distill.relative_l2(expected, item["latents"][None]).item() > 1e-2


@pytest.fixture(scope="module")
def reference_run(small_pipeline_dir, teacher_data, tmp_path_factory):
    """One process, batch 2 x accumulation 2, 4 steps (2 epochs of 2 optimizer steps), checkpoints every 1 step."""
    out = tmp_path_factory.mktemp("distill_ref") / "run"
    args = _base(small_pipeline_dir, teacher_data) + EXACT_ARGS + [
        "--train_batch_size=2", "--gradient_accumulation_steps=2", "--max_train_steps=4",
        "--checkpointing_steps=1", "--checkpoints_total_limit=5"]
    _run(args, out)
    return args, out


def test_two_processes_match_one(reference_run, small_pipeline_dir, tmp_path):
    """2 processes x batch 2 (gloo) vs 1 process x batch 2 x accumulation 2: same global batches and per-sample
    draws, so the trained weights agree up to float reassociation (<= 2 % of the update, as for train_sft)."""
    args, ref = reference_run
    args = [a for a in args if not a.startswith(("--max_train_steps", "--checkpointing_steps", "--gradient_acc"))]
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    proc = _run(args + ["--gradient_accumulation_steps=1", "--max_train_steps=3", "--checkpointing_steps=0"], out,
                launcher=launcher, env=dict(_env(), ACCELERATE_USE_CPU="true"))
    assert "MULTI_CPU" in proc.stderr + proc.stdout
    two, one = _trained(out), _trained(ref / "checkpoint-3")
    base = _trained(ref / "checkpoint-1")  # (the LoRA's start is random: compare updates from step 1 on)
    diff = sum(((two[k] - one[k]).double() ** 2).sum() for k in one).sqrt().item()
    update = sum(((one[k] - base[k]).double() ** 2).sum() for k in one).sqrt().item()
    print(f"2 processes vs 1: ||diff|| / ||update (steps 2-3)|| = {diff / update:.3e}")
    assert update > 0
    assert diff / update <= 2e-2


def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path):
    args, ref = reference_run
    out = tmp_path / "killed"
    seed = random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    kill_step, jitter = rng.randint(2, 3), rng.uniform(0.0, 0.3)
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT)] + args + [f"--output_dir={out}"], env=_env(),
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 240
            while not (out / f"checkpoint-{kill_step}").is_dir():
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "no progress within 240 s"
                time.sleep(0.02)
            time.sleep(jitter)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    print(f"killed {jitter:.2f} s after checkpoint-{kill_step} (seed {seed}); left: "
          f"{[p.name for p in list_checkpoints(out)]}")
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run ended on its own ({proc.returncode}) before the kill")
    resumed_from = latest_checkpoint(out)
    proc = _run(args + ["--resume_from_checkpoint=latest"], out)
    assert f"resuming from {resumed_from}" in proc.stdout + proc.stderr
    final, reference = _trained(out), _trained(ref)
    assert final.keys() == reference.keys()
    mismatched = [k for k in reference if not torch.equal(final[k], reference[k])]
    assert not mismatched, mismatched[:5]


@pytest.fixture(scope="module")
def distilled(small_pipeline_dir, teacher_data, tmp_path_factory):
    """A short distillation (1-step student, LoRA rank 4) saved as a pipeline folder, in process, and the same run
    saved with the LoRA merged (a separate process: the same seed and data give the same weights)."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("distilled")
    common = _base(small_pipeline_dir, teacher_data) + [
        "--report_to=none", "--seed=1", "--lora_rank=4", "--learning_rate=1e-3", "--train_batch_size=4",
        "--max_train_steps=3", "--checkpointing_steps=0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_distill.main(train_distill.parse_args(common + [f"--output_dir={root / 'lora'}"]))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    _run(common + ["--merge_lora"], root / "merged")
    return root, {"lora": result}


def test_distilled_folder_is_a_one_step_pipeline(distilled, small_pipeline_dir):
    from stablesr.loading import load_pipeline

    root, outs = distilled
    assert outs["lora"]["global_step"] == 3
    folder = root / "lora"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert not (root / "merged" / "pytorch_lora_weights.safetensors").exists()
    pipe = load_pipeline(str(folder))  # checks the folder, loads the LoRA
    assert pipe.config.default_num_inference_steps == 1
    assert type(pipe.scheduler).__name__ == "StableSRDDPMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing" and not pipe.scheduler.config.official_respacing
    assert any("lora" in k for k in pipe.unet.state_dict())
    teacher = load_pipeline(str(small_pipeline_dir))
    # the LoRA changed the UNet (3 steps at lr 1e-3) and the merged copy is the same model
    image = Image.new("RGB", (24, 20), (120, 60, 30))
    calls = []

    def run(p, steps=None):
        p.set_progress_bar_config(disable=True)
        return p(image, upscale=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 output_type="latent", callback=lambda i, t, x: calls.append(int(t))).latents[0]

    lora_out = run(pipe)
    assert calls == [999]  # one step, from the stored default
    merged_out = run(load_pipeline(str(root / "merged")))
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-4)
    teacher.scheduler = pipe.scheduler
    assert not torch.allclose(run(teacher, 1), lora_out, atol=1e-3)


def test_distilled_folder_restores_from_the_command_line_with_a_fidelity_sweep(distilled, tmp_path):
    from stablesr.cli import main

    root, _ = distilled
    inputs = tmp_path / "in"
    inputs.mkdir()
    _photo("coffee", 32).crop((0, 0, 40, 32)).save(inputs / "coffee.png")
    assert main(["restore", str(inputs), "-o", str(tmp_path / "out"), "--model", str(root / "lora"), "--device", "cpu",
                 "--fidelity-sweep", "0,1", "-q"]) == 0
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == ["coffee.png", "coffee_w0.00.png", "coffee_w1.00.png"]
    sizes = {Image.open(tmp_path / "out" / n).size for n in outputs}
    assert sizes == {(160, 128)}
    a, b = (torch.tensor(list(Image.open(tmp_path / "out" / n).getdata()), dtype=torch.float32)
            for n in ("coffee_w0.00.png", "coffee_w1.00.png"))
    assert (a - b).abs().mean() > 0.5  # the fidelity knob still acts on the 1-step student


def test_distilled_folder_restores_in_the_web_ui(distilled, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from stablesr import webui
    from stablesr.loading import load_pipeline

    root, _ = distilled
    pipe = load_pipeline(str(root / "lora"))
    demo = webui.build_app(pipe, default_upscale=2)
    photo = tmp_path / "cat.png"
    _photo("chelsea", 40).crop((0, 0, 48, 40)).save(photo)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    webui.launch_app(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False, analytics_enabled=False)
        result = client.predict(handle_file(str(photo)), 2, 1, "ddpm", "wavelet", 0.5, 7, 0, 0.5, api_name="/restore")
        assert result
        assert demo.stablesr_stats.sampling_runs == 1
    finally:
        demo.close()


def test_pixel_and_distribution_matching_losses_train(small_pipeline_dir, teacher_data, tmp_path, one_thread):
    """(b) L2 + LPIPS through the VAE decoder and (c) DMD with a fake-score LoRA: finite losses, the fake score is
    trained and checkpointed next to the student's parts, and resuming loads it back."""
    out = tmp_path / "dmd"
    args = train_distill.parse_args(_base(small_pipeline_dir, teacher_data) + [
        "--report_to=none", "--seed=2", "--lora_rank=4", "--fake_lora_rank=4", "--train_batch_size=2",
        "--max_train_steps=2", "--checkpointing_steps=2", "--l2_weight=1", "--lpips_weight=1", "--perceptual_net=tiny",
        "--dmd_weight=1", "--teacher_steps=2", f"--output_dir={out}"])
    result = train_distill.main(args)
    assert result["global_step"] == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    fake = load_file(str(out / "checkpoint-2" / "fake_lora" / "pytorch_lora_weights.safetensors"))
    assert fake and any(".lora" in k for k in fake)
    assert (out / "model_index.json").is_file()


def test_on_the_fly_teacher_runs(small_pipeline_dir, tmp_path, one_thread):
    """--train_data_config: HQ crops degraded on the fly, the teacher samples each batch (2 steps here)."""
    hq = tmp_path / "hq"
    hq.mkdir()
    _photo("astronaut").save(hq / "a.png")
    (tmp_path / "data.yaml").write_text(f"length: 2\nsources:\n  - {{type: hq, roots: {hq}}}\n")
    args = train_distill.parse_args([
        f"--pretrained_model_name_or_path={small_pipeline_dir}", f"--train_data_config={tmp_path / 'data.yaml'}",
        "--resolution=128", "--report_to=none", "--lora_rank=4", "--train_batch_size=2", "--max_train_steps=1",
        "--teacher_steps=2", "--student_steps=2", "--checkpointing_steps=0", f"--output_dir={tmp_path / 'out'}"])
    result = train_distill.main(args)
    assert result["global_step"] == 1 and torch.isfinite(torch.tensor(result["losses"])).all()
    saved = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert saved["default_num_inference_steps"] == 2


def test_generate_cfw_data_records_the_sampler(teacher_data):
    settings = json.loads((teacher_data / "train" / "cfw_data.json").read_text())["settings"]
    assert settings["sampler"] == "dpmsolver" and settings["num_inference_steps"] == TEACHER_STEPS
    assert re.fullmatch(r"\d{8}", sorted(p.stem for p in (teacher_data / "train" / "latents").iterdir())[0])


def test_batched_teacher_data_matches_one_at_a_time(small_pipeline_dir, teacher_data, tmp_path, one_thread):
    """generate_cfw_data(batch_size=4) samples 4 crops in one loop and writes what one-at-a-time generation wrote
    (same crops, degradations and start noise; the latents within 1e-5 relative: batched kernels round differently);
    an ancestral sampler (the official DDPM) cannot be batched and is refused with the fix."""
    from stablesr import StableSRPipeline
    from stablesr.cfw_data import CFWDataset, generate_cfw_data, list_sources
    from stablesr.schedulers import deterministic_scheduler

    pipe = StableSRPipeline.from_pretrained(small_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    sources = list_sources(teacher_data / "hq_train", None, 2)
    with pytest.raises(ValueError, match="deterministic scheduler"):
        generate_cfw_data(pipe, tmp_path / "ddpm", sources, gt_size=128, num_inference_steps=2, seed=DATA_SEED,
                          save_samples=False, progress=False, batch_size=2)
    pipe.scheduler = deterministic_scheduler("dpmsolver", pipe.scheduler.config)
    report = generate_cfw_data(pipe, tmp_path / "batched", sources, gt_size=128, num_inference_steps=TEACHER_STEPS,
                               seed=DATA_SEED, save_samples=False, progress=False, sampler="dpmsolver", batch_size=4,
                               max_samples=4)
    assert report.generated == [0, 1, 2, 3]
    batched, single = CFWDataset(tmp_path / "batched"), CFWDataset(teacher_data / "train")
    for i in range(4):
        a, b = batched[i], single[i]
        assert a["name"] == b["name"]
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
        assert train_distill.relative_l2(a["latents"][None], b["latents"][None]).item() < 1e-5


def test_full_unet_student_reports_its_held_out_distance_and_resumes_exactly(small_pipeline_dir, teacher_data,
                                                                              tmp_path):
    """--full_unet trains every UNet weight and saves the whole UNet (no LoRA file); --validation_teacher_data records
    the mean relative L2 to held-out teacher results before training (the undistilled student), at each validation
    step and at the end, equal (1e-4) to the distance of the saved folder restoring through the pipeline; resuming
    from a checkpoint gives the same UNet bit for bit."""
    import shutil

    held = teacher_data / "held"
    args = _base(small_pipeline_dir, teacher_data) + EXACT_ARGS + [
        "--full_unet", "--train_batch_size=2", "--max_train_steps=2", "--checkpointing_steps=1",
        f"--validation_teacher_data={held}", "--validation_steps=1"]
    out = tmp_path / "full"
    _run(args, out)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    record = json.loads((out / "teacher_distance.json").read_text())
    assert sorted(record["steps"], key=int) == ["0", "1", "2"] and record["num_inference_steps"] == 1
    assert all(len(v["per_sample"]) == len(list((held / "latents").iterdir())) for v in record["steps"].values())
    before = held_out_distance(small_pipeline_dir, teacher_data, student_scheduler=True)
    after = held_out_distance(out, teacher_data)
    assert record["steps"]["0"]["mean"] == pytest.approx(before, rel=1e-4)
    assert record["steps"]["2"]["mean"] == pytest.approx(after, rel=1e-4)
    trained = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    stock = load_file(str(small_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == stock.keys()
    assert any(not torch.equal(trained[k], stock[k]) for k in stock)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    proc = _run(args + ["--resume_from_checkpoint=latest"], resumed)
    assert "resuming from" in proc.stdout + proc.stderr
    again = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in trained if not torch.equal(trained[k], again[k])]
    assert _trained_parts(resumed) == _trained_parts(out)


def test_student_lora_file_round_trips_exactly(small_pipeline_dir, tmp_path):
    """The student's LoRA (attention + convs + projections) saved by train_sft.save_lora loads back through the
    pipeline's loader into every module it was trained on: the same UNet output, bit for bit. (Without the config in
    the file's metadata, diffusers infers the targets from the key names and dropped the attention LoRA.)"""
    import train_sft

    from stablesr import StableSRPipeline
    from stablesr.pipelines.pipeline_stablesr import LORA_WEIGHT_NAME, load_unet_lora

    trained = StableSRPipeline.from_pretrained(small_pipeline_dir).unet
    train_distill.add_lora(trained, 4, None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    train_sft.save_lora(trained, tmp_path)
    loaded = StableSRPipeline.from_pretrained(small_pipeline_dir).unet
    load_unet_lora(loaded, tmp_path / LORA_WEIGHT_NAME)
    count = lambda unet: sum("lora_B" in k for k in unet.state_dict())  # noqa: E731
    assert count(loaded) == count(trained) > 100
    x, t = torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500])
    context = torch.randn(1, 77, trained.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, encoder_hidden_states=context).sample,
                                   trained(x, t, encoder_hidden_states=context).sample, rtol=0, atol=0)
