"""Schedulers: StableSR's respaced DDPM (``scheduling_stablesr_ddpm``, diffusers' file naming) and the one table of
scheduler names that the command line, the web UI and Python callers choose from.

Folders converted before this package existed name ``stablesr.schedulers`` in their ``model_index.json``; the class is
re-exported here (with the ``SchedulerMixin`` diffusers looks up next to it) so those folders keep loading.
"""

from __future__ import annotations

import inspect

# DiffusionPipeline.from_pretrained resolves a custom component's base class by looking the name up in the module
# named in model_index.json, so SchedulerMixin must be importable from here too (old folders name this package).
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .scheduling_stablesr_ddpm import RESPACED_TABLE_NAMES, StableSRDDPMScheduler, space_timesteps

__all__ = [
    "DEFAULT_SCHEDULER",
    "DETERMINISTIC_SCHEDULERS",
    "RESPACED_TABLE_NAMES",
    "SCHEDULERS",
    "StableSRDDPMScheduler",
    "deterministic_scheduler",
    "is_deterministic",
    "scheduler_from_name",
    "space_timesteps",
]

SCHEDULERS: tuple[str, ...] = ("ddpm", "ddim", "dpmsolver", "unipc", "euler")
"""Scheduler names: "ddpm" is the official respaced ancestral DDPM; the others suit 10-50 steps."""
DEFAULT_SCHEDULER = "ddpm"
SCHEDULER_LABELS: dict[str, str] = {
    "ddpm": "DDPM (official, respaced)",
    "ddim": "DDIM",
    "dpmsolver": "DPM-Solver++",
    "unipc": "UniPC",
    "euler": "Euler",
}


def _scheduler_class(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    return {
        "ddpm": StableSRDDPMScheduler,
        "ddim": DDIMScheduler,
        "dpmsolver": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }[name]


def scheduler_from_name(name: str, config):
    """
    A scheduler of the named kind built from `config` (a pipeline's ``scheduler.config``), with only the config keys
    its class takes (the official DDPM config has extras that other classes would warn about).

    Args:
        name (`str`): one of [`SCHEDULERS`].
        config: A scheduler config (`FrozenDict` or mapping) holding the training schedule and prediction type.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = _scheduler_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in dict(config).items() if k in accepted})


DETERMINISTIC_SCHEDULERS: tuple[str, ...] = ("dpmsolver", "ddim", "unipc")
"""Scheduler names whose sampling is a deterministic map from the start latent (what a distillation teacher needs)."""


def deterministic_scheduler(name: str, config):
    """A deterministic scheduler of the named kind with ``trailing`` spacing, so its first timestep is the last
    training timestep (999), where the official LQ start and a distilled student start too (DDIM with eta 0).

    Raises:
        ValueError: for a name outside [`DETERMINISTIC_SCHEDULERS`].
    """
    if name not in DETERMINISTIC_SCHEDULERS:
        raise ValueError(f"{name!r} is not a deterministic scheduler; choose one of {', '.join(DETERMINISTIC_SCHEDULERS)}")
    return scheduler_from_name(name, {**dict(config), "timestep_spacing": "trailing"})


def is_deterministic(scheduler) -> bool:
    """Whether sampling with `scheduler` (as the pipeline calls it: no ``eta``, no churn) draws no noise after the
    start latent: DDIM, UniPC, Euler and DPM-Solver(++) in its ODE forms. The official DDPM and the SDE variants of
    DPM-Solver draw noise at every step; unknown classes count as not deterministic."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler.config.algorithm_type in ("dpmsolver", "dpmsolver++")
    if isinstance(scheduler, EulerDiscreteScheduler):
        return True  # s_churn defaults to 0 in step(), and the pipeline does not pass it
    return isinstance(scheduler, (DDIMScheduler, UniPCMultistepScheduler))
