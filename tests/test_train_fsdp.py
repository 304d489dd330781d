"""FSDP / DeepSpeed with the stage-1 script: refused at start-up, with the reason, before anything is loaded or written.

train_sft.py supports one process and DDP only (tests/test_train_sft.py checks 2-process DDP against one process).
What goes wrong under FSDP is listed at ``SHARDING_UNSUPPORTED`` in train/train_sft.py. On CPUs accelerate never selects FSDP: ``accelerate launch --use_fsdp`` with
``ACCELERATE_USE_CPU=1`` runs plain DDP (MULTI_CPU), so the launch test checks that this fallback is refused too.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from stablesr.training_utils import check_data_parallel_only

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "train_sft.py"
ENGINE_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")


@pytest.fixture
def no_engine_env(monkeypatch):
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_engines_are_refused(no_engine_env, engine):
    with pytest.raises(NotImplementedError, match=rf"^{engine} is not supported .*because X\. Launch with"):
        check_data_parallel_only(SimpleNamespace(distributed_type=DistributedType[engine]), "because X.")


@pytest.mark.parametrize("engine", ["NO", "MULTI_CPU", "MULTI_GPU"])
def test_data_parallel_passes(no_engine_env, engine):
    check_data_parallel_only(SimpleNamespace(distributed_type=DistributedType[engine]), "because X.")


def test_requested_fsdp_that_fell_back_to_ddp_is_refused(no_engine_env):
    no_engine_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(NotImplementedError, match=r"^FSDP is not supported .*\(accelerate runs MULTI_CPU\)"):
        check_data_parallel_only(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), "because X.")
    no_engine_env.setenv("ACCELERATE_USE_FSDP", "false")
    check_data_parallel_only(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), "because X.")


def test_fsdp_launch_on_two_cpu_processes_is_refused(tmp_path):
    """The real launcher: 2 gloo processes with the FSDP flags (those that let accelerate build its FSDP plugin
    without a GPU). Both ranks stop right after the Accelerator is built, before any model or data is read (the
    paths below do not even exist), and nothing is written to --output_dir."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", "--fsdp_version=1", "--fsdp_use_orig_params=true",
           "--fsdp_sync_module_states=false", "--fsdp_cpu_ram_efficient_loading=false",
           str(SCRIPT), f"--pretrained_model_name_or_path={tmp_path / 'no-model'}",
           f"--train_data_config={tmp_path / 'no-data.yaml'}", "--report_to=none", f"--output_dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert "MULTI_CPU" in log  # what accelerate made of the FSDP request on CPUs
    assert log.count("NotImplementedError: FSDP is not supported by this script (accelerate runs MULTI_CPU)") >= 2, \
        log[-4000:]
    assert "two prepared models sharing one optimizer" in log
    assert not out.exists() or not any(out.iterdir())
