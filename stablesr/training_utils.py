"""What the StableSR training scripts share: checkpoint folders, save/load hook dispatch, TrainState, seeding, YAML.

Checkpoints are ``{output_dir}/checkpoint-{step}`` folders written by ``accelerator.save_state`` into
``checkpoint-{step}.tmp`` and renamed into place only when every process has finished writing, so a crash, a kill or
a full disk never leaves a half-written ``checkpoint-N`` that ``--resume_from_checkpoint latest`` would pick.

Randomness in the training step comes from generators re-seeded from ``(seed, purpose, epoch, position)``
(:func:`make_generator`). A resumed run therefore needs no generator state beyond the restored step, and the draws
that must not depend on how the global batch is split (VAE posterior noise, timesteps, diffusion noise) come from one
generator per sample keyed by its position in the epoch (:func:`sample_generators`), so 1 process x batch 2 x
accumulation 2 and 2 processes x batch 2 see the same numbers for the same samples.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers.utils import logging

from .file_utils import as_disk_full, fsync_tree, replace_dir

logger = logging.get_logger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "TrainState",
    "check_data_parallel_only",
    "check_distributed_launch",
    "latest_checkpoint",
    "list_checkpoints",
    "load_yaml",
    "make_generator",
    "per_sample_randint",
    "per_sample_randn",
    "register_checkpoint_hooks",
    "remove_stale_temporaries",
    "resolve_resume_path",
    "rotate_checkpoints",
    "sample_generators",
    "save_checkpoint",
    "seed_for",
]

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_TMP_SUFFIX = ".tmp"


# ------------------------------------------------------------------------------------------------------------- YAML


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file that must hold a mapping at the top level (``ValueError`` naming the file otherwise)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------------------- seeds


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs, platforms and Python hash randomisation)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(*parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed_for(*parts)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed_for(*parts))
    return generator


def sample_generators(*parts: Any, positions: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from ``(*parts, position)``.

    ``position`` is the sample's place in the global stream of the epoch, e.g.
    ``(batch_index * num_processes + process_index) * batch_size + row`` for accelerate's round-robin batch sharding:
    the same sample gets the same draws however the global batch is split over processes and accumulation steps.
    """
    return [make_generator(*parts, position) for position in positions]


def per_sample_randn(generators: Sequence[torch.Generator], shape: Sequence[int], device=None) -> torch.Tensor:
    """``(len(generators), *shape)`` standard normal draws, row ``i`` from ``generators[i]`` (drawn on the CPU)."""
    out = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return out.to(device) if device is not None else out


def per_sample_randint(generators: Sequence[torch.Generator], low: int, high: int, device=None) -> torch.Tensor:
    """``(len(generators),)`` integers in ``[low, high)``, one per generator."""
    out = torch.cat([torch.randint(low, high, (1,), generator=g) for g in generators])
    return out.to(device) if device is not None else out


# --------------------------------------------------------------------------------------------------------- TrainState


class TrainState:
    """The loop counters, checkpointed with ``accelerator.register_for_checkpointing`` (not parsed from folder names).

    ``global_step`` counts optimizer updates. ``fingerprint`` records what fixes the data position of a step (per
    process batch size, accumulation, number of processes, dataset length); a resume with a different fingerprint
    still works but is not exact, and says so.
    """

    def __init__(self, global_step: int = 0, fingerprint: dict[str, Any] | None = None):
        self.global_step = int(global_step)
        self.fingerprint = dict(fingerprint or {})

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved and self.fingerprint and saved != self.fingerprint:
            changed = {k: (saved.get(k), self.fingerprint.get(k)) for k in set(saved) | set(self.fingerprint)
                       if saved.get(k) != self.fingerprint.get(k)}
            logger.warning(f"resuming with a different setup {changed} (saved, now): the data order will not match "
                           "the interrupted run exactly")
        self.global_step = int(state["global_step"])


# -------------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first; ``*.tmp`` ones are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint or ``None`` (fresh start); a path -> that folder, which must
    exist (``FileNotFoundError`` otherwise: an explicit resume point that is missing is a mistake, not a fresh start)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        candidate = Path(output_dir) / resume_from_checkpoint
        if candidate.is_dir():
            return candidate
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist (looked for it as a folder and "
            f"inside {output_dir}); use 'latest' to resume from the newest checkpoint if there is one"
        )
    return path


def rotate_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest ``checkpoint-N`` folders so that at most ``total_limit`` remain; returns what was removed."""
    if total_limit is None or total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        logger.info(f"removing old checkpoint {path}")
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_stale_temporaries(output_dir: str | os.PathLike) -> None:
    """Remove ``checkpoint-N.tmp`` folders left by a run that died while saving (and hidden ``.checkpoint-N.old-*``
    folders left by one that died while replacing a checkpoint of the same step)."""
    root = Path(output_dir)
    if root.is_dir():
        for p in [*root.glob(f"{CHECKPOINT_PREFIX}*{_TMP_SUFFIX}"), *root.glob(f".{CHECKPOINT_PREFIX}*{_TMP_SUFFIX}")]:
            logger.warning(f"removing incomplete checkpoint {p} (the run that wrote it stopped while saving)")
            shutil.rmtree(p, ignore_errors=True)


def _folder_bytes(folder: Path | None) -> int | None:
    if folder is None:
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-{step}.tmp``, then rename to ``checkpoint-{step}`` and rotate.

    Every process writes its own RNG file, so the rename waits for all of them. Call on every process. Older
    checkpoints are rotated out only after the new one is complete and flushed to disk, so a save that fails (full
    disk) or is killed leaves the previous checkpoints as they were and no ``checkpoint-{step}``; a failed save
    removes its ``.tmp`` folder on the main process, and no room to write raises
    [`~stablesr.file_utils.DiskFullError`] naming the checkpoint and about how much it needs (the size of the
    previous checkpoint).
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + _TMP_SUFFIX)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:
        full = as_disk_full(err, final, needed=_folder_bytes(latest_checkpoint(output_dir)), partial=tmp)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from err
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)
        replace_dir(tmp, final, overwrite=True)
        rotate_checkpoints(output_dir, total_limit)
        logger.info(f"saved state to {final}")
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------------ launch check


def check_distributed_launch(accelerator) -> None:
    """Refuse a multi-process launch that accelerate runs as independent single processes.

    On a machine without GPUs, ``accelerate launch --multi_gpu`` without ``ACCELERATE_USE_CPU=1`` starts N
    processes that each see ``num_processes == 1``: each would train alone on all the data and write the same files.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"launched as {world_size} processes but accelerate runs them as independent single processes. On a "
            "machine without GPUs set ACCELERATE_USE_CPU=1 (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...`, gloo backend); `accelerate launch --cpu` only starts several processes via MPI"
        )


_SHARDED_ENGINES = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED",
                    "MEGATRON_LM": "ACCELERATE_USE_MEGATRON_LM"}


def check_data_parallel_only(accelerator, why: str) -> None:
    """Refuse a launch that asks for FSDP, DeepSpeed or Megatron-LM in a script that supports only data parallelism
    (one process, DDP, or gloo on CPUs); ``why`` (the script's reasons) goes into the error.

    Checks both the engine accelerate chose and the one the launcher asked for: on a machine without GPUs,
    ``accelerate launch --use_fsdp`` with ``ACCELERATE_USE_CPU=1`` silently runs plain DDP (accelerate 1.x selects
    FSDP/DeepSpeed only for GPU-like devices), which should not pass for an FSDP run either.
    """
    chosen = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    requested = [name for name, env in _SHARDED_ENGINES.items() if os.environ.get(env, "false").lower() in ("1", "true")]
    engine = chosen if chosen in _SHARDED_ENGINES else (requested[0] if requested else None)
    if engine is None:
        return
    raise NotImplementedError(
        f"{engine} is not supported by this script (accelerate runs {chosen}): {why} Launch with one process or "
        "DDP instead (configs/accelerate/single_gpu.yaml, multi_gpu.yaml, multi_node.yaml; on CPUs "
        "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`)."
    )


# ------------------------------------------------------------------------------------------------------ hook dispatch


def register_checkpoint_hooks(
    accelerator,
    savers: dict[type, Callable[[torch.nn.Module, str], None]],
    loaders: dict[type, Callable[[torch.nn.Module, str], None]],
) -> None:
    """Register save/load-state pre-hooks that dispatch each prepared model by ``isinstance`` of its unwrapped form.

    ``savers[cls](model, output_dir)`` writes what ``cls`` needs (e.g. ``save_pretrained`` of the trainable parts)
    on the main process; ``loaders[cls](model, input_dir)`` loads it back in place, so the optimizer keeps pointing at
    the same parameters. A model of any other class raises ``TypeError``: silently saving a full frozen UNet (GBs
    per checkpoint) or dropping a trainable part is never what we want.
    """

    def find(model, table):
        unwrapped = accelerator.unwrap_model(model)
        for cls, fn in table.items():
            if isinstance(unwrapped, cls):
                return unwrapped, fn
        raise TypeError(
            f"unexpected model {type(unwrapped).__name__} in the accelerator state; the checkpoint hooks handle "
            f"{[c.__name__ for c in table]}"
        )

    def save_model_hook(models, weights, output_dir):
        for model in models:
            unwrapped, fn = find(model, savers)
            if accelerator.is_main_process:
                fn(unwrapped, output_dir)
        # The parts were saved above; keep accelerate from also writing every prepared model's full state dict.
        weights.clear()

    def load_model_hook(models, input_dir):
        while models:
            unwrapped, fn = find(models.pop(), loaders)
            fn(unwrapped, input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments shared by the training scripts
# ---------------------------------------------------------------------------------------------------------------------


def add_training_arguments(parser, *, output_dir: str, tracker_project_name: str) -> None:
    """The optimisation, checkpoint, logging and validation flags every training script takes (same names, same
    meaning); a script changes a default with ``parser.set_defaults``."""
    # optimisation
    parser.add_argument("--output_dir", type=str, default=output_dir)
    parser.add_argument("--seed", type=int, default=0, help="Seeds everything; the run is reproducible given it.")
    parser.add_argument("--train_batch_size", type=int, default=6, help="Per-device batch (6 official).")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4, help="4 official.")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch x accumulation x processes.")
    parser.add_argument("--lr_scheduler", type=str, default="constant",
                        help='"constant" (official), "constant_with_warmup", "linear", "cosine", ...')
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0,
                        help="Clip the gradient norm of the trainable weights at this value; 0 = off. Default: "
                             "%(default)s, as in diffusers' training examples, a guard against loss spikes from "
                             "single bad batches in small-batch runs started without a config. The official recipe "
                             "(Lightning, no clipping) and both shipped configs (configs/train_sft_*.yaml) set 0.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Frozen weights in this dtype; trainable weights stay float32.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trainable weights (saved at the end).")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    # checkpoints, logging, validation
    parser.add_argument("--checkpointing_steps", type=int, default=1500, help="1500 official.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='"latest" (newest checkpoint in --output_dir, or a fresh start) or a checkpoint path.')
    parser.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--tracker_project_name", type=str, default=tracker_project_name)
    parser.add_argument("--validation_images", type=str, nargs="*", default=None, help="LQ images restored at validation.")
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--validation_num_inference_steps", type=int, default=20)
    parser.add_argument("--validation_upscale", type=float, default=None, help="Default: the degradation scale.")


def parse_with_config(parser, input_args: list[str] | None, script: str):
    """Parse ``input_args`` with the values of the ``--config`` YAML (keys = flag names) as defaults; the command
    line wins. An unknown key in the YAML is an error naming it."""
    import argparse

    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", type=str, default=None)
    known, _ = config_parser.parse_known_args(input_args)
    if known.config:
        values = load_yaml(known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise ValueError(f"{known.config}: unknown key(s) {unknown}; keys are the flag names of {script}")
        parser.set_defaults(**values)
    return parser.parse_args(input_args)


def start_training(args, sharding_unsupported: str):
    """The start every training script shares: the `Accelerator` (accumulation, mixed precision, trackers, a sampler
    shuffling from seed + epoch on every process, so resumable and equal across process counts), logging, the
    data-parallel-only and launch checks, the seed, the output folder (stale temporaries removed) and TF32.

    Returns:
        ``(accelerator, output_dir)``.
    """
    import logging as std_logging

    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    get_logger(__name__).info(accelerator.state, main_process_only=False)
    check_distributed_launch(accelerator)
    check_data_parallel_only(accelerator, sharding_unsupported)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator, output_dir
