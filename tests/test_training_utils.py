"""Shared training helpers: seeds, checkpoint folders (atomic save, rotation, resume paths), launch check."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stablesr.training_utils import (
    TrainState,
    check_distributed_launch,
    latest_checkpoint,
    list_checkpoints,
    make_generator,
    per_sample_randn,
    remove_stale_temporaries,
    resolve_resume_path,
    rotate_checkpoints,
    sample_generators,
    save_checkpoint,
    seed_for,
)


def test_seed_for_is_stable_and_distinguishes_parts():
    # A fixed value: independent of the process, Python's hash randomisation and the platform.
    assert seed_for(7, "sample", 0, 3) == seed_for(7, "sample", 0, 3)
    assert seed_for(7, "sample", 0, 3) != seed_for(7, "sample", 0, 4)
    assert seed_for(7, "sample", 1, 3) != seed_for(7, "sample", 0, 3)
    assert 0 <= seed_for("x") < 2**63
    a = torch.randn(4, generator=make_generator(1, "a"))
    assert torch.equal(a, torch.randn(4, generator=make_generator(1, "a")))


def test_per_sample_draws_do_not_depend_on_how_the_batch_is_split():
    whole = per_sample_randn(sample_generators(0, "s", 0, positions=range(4)), (2, 3))
    first = per_sample_randn(sample_generators(0, "s", 0, positions=[0, 1]), (2, 3))
    second = per_sample_randn(sample_generators(0, "s", 0, positions=[2, 3]), (2, 3))
    assert torch.equal(whole, torch.cat([first, second]))


def _make(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


def test_list_rotate_and_stale_temporaries(tmp_path):
    _make(tmp_path, "checkpoint-10", "checkpoint-2", "checkpoint-30.tmp", "checkpoint-x", "logs")
    (tmp_path / "checkpoint-5").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]  # numeric order
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None
    _make(tmp_path, "checkpoint-20")
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    assert rotate_checkpoints(tmp_path, None) == [] and rotate_checkpoints(tmp_path, 0) == []
    remove_stale_temporaries(tmp_path)
    assert not (tmp_path / "checkpoint-30.tmp").exists() and (tmp_path / "checkpoint-x").is_dir()


def test_resolve_resume_path(tmp_path):
    assert resolve_resume_path(tmp_path, None) is None
    assert resolve_resume_path(tmp_path, "latest") is None  # nothing yet: a fresh start
    _make(tmp_path, "checkpoint-4", "checkpoint-8")
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-8"
    assert resolve_resume_path(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"  # relative to output_dir
    assert resolve_resume_path(tmp_path / "other", str(tmp_path / "checkpoint-4")) == tmp_path / "checkpoint-4"
    with pytest.raises(FileNotFoundError, match="checkpoint-99.*latest"):
        resolve_resume_path(tmp_path, "checkpoint-99")


class _FakeAccelerator:
    """What save_checkpoint uses of an Accelerator, with a save_state that can fail half-way."""

    is_main_process = True

    def __init__(self, fail: bool = False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder)
        Path(folder, "model.safetensors").write_bytes(b"partial")
        if self.fail:
            raise OSError("disk full")
        Path(folder, "random_states_0.pkl").write_bytes(b"rng")


def test_save_checkpoint_is_atomic_and_rotates(tmp_path):
    for step in (1, 2, 3):
        final = save_checkpoint(_FakeAccelerator(), tmp_path, step, total_limit=2)
        assert final == tmp_path / f"checkpoint-{step}" and (final / "random_states_0.pkl").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    # A save that fails half-way removes its checkpoint-4.tmp and leaves the older checkpoints as they were.
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_FakeAccelerator(fail=True), tmp_path, 4, total_limit=2)
    assert not (tmp_path / "checkpoint-4.tmp").exists() and not (tmp_path / "checkpoint-4").exists()
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-3"
    # A save killed half-way leaves checkpoint-4.tmp, which resuming never picks; the next save of that step
    # replaces the leftover.
    _make(tmp_path, "checkpoint-4.tmp")
    save_checkpoint(_FakeAccelerator(), tmp_path, 4, total_limit=2)
    assert not (tmp_path / "checkpoint-4.tmp").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_train_state_round_trip_and_changed_setup_warning(caplog):
    state = TrainState(12, {"train_batch_size": 2, "num_processes": 1})
    other = TrainState(0, {"train_batch_size": 2, "num_processes": 2})
    import logging

    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            other.load_state_dict(state.state_dict())
    finally:
        dlogging.disable_propagation()
    assert other.global_step == 12
    assert "num_processes" in caplog.text and "will not match" in caplog.text


def test_check_distributed_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1"):
        check_distributed_launch(SimpleNamespace(num_processes=1))
    check_distributed_launch(SimpleNamespace(num_processes=2))  # a real 2-process group
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed_launch(SimpleNamespace(num_processes=1))
