"""The respaced ancestral DDPM sampler of StableSR as a diffusers scheduler.

StableSR samples with the plain LDM ancestral sampler (fixed-small posterior variance, no x0 clipping) on a
*respaced* schedule: the inference scripts keep ``space_timesteps(1000, [N])`` of the 1000 training steps and
re-register the schedule buffers for those N steps (``scripts/sr_val_ddpm_text_T_vqganfin_old.py`` ``main()``, the
lines between the first ``register_schedule`` and ``model.ori_timesteps.sort()``). Two details make a stock
``DDPMScheduler`` differ slightly from the official numbers, which is why this subclass exists:

* the official grid comes from guided-diffusion's ``space_timesteps`` (float accumulation of the stride and Python's
  half-to-even ``round``), which differs from any diffusers ``timestep_spacing`` for some N (e.g. 21, 23, 45);
* the respaced buffers are built in float32 from the float32 ``alphas_cumprod`` buffer and then pushed through
  ``register_schedule``'s numpy arithmetic (``ldm/models/diffusion/ddpm.py`` ``DDPM.register_schedule``), with its
  mixture of float32 and float64 intermediates. This scheduler precomputes exactly those tables.

Timesteps stay on the ORIGINAL 0..999 scale everywhere (``self.timesteps``, ``step``, ``add_noise``), which is what
the UNet and the time-aware encoder receive (the official ``t_replace``); the index into the respaced tables is
looked up internally.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput, rescale_zero_terminal_snr

# DiffusionPipeline.from_pretrained resolves a custom component's base class by looking the name up in the module that
# defines it, so SchedulerMixin must be importable from here.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["RESPACED_TABLE_NAMES", "StableSRDDPMScheduler", "space_timesteps"]

# Names of the re-registered schedule buffers of the official model (ldm/models/diffusion/ddpm.py
# DDPM.register_schedule), in registration order; ``StableSRDDPMScheduler.respaced`` uses the same keys.
RESPACED_TABLE_NAMES: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Variance types whose sampling noise scale is exp(0.5 * posterior_log_variance_clipped), i.e. what the official
# p_sample does; the learned / large variants are left to DDPMScheduler.
_TABLE_VARIANCE_TYPES = ("fixed_small", "fixed_small_log")


def space_timesteps(num_timesteps: int, section_counts: int | list[int] | str) -> list[int]:
    """
    Selects the timesteps kept when respacing a diffusion process, exactly like the official (guided-diffusion)
    ``space_timesteps`` that StableSR's inference scripts use.

    The original process of ``num_timesteps`` steps is split into ``len(section_counts)`` nearly equal sections and
    each section is strided into ``section_counts[i]`` steps. The stride position is accumulated in floating point and
    rounded with Python's ``round`` (half to even), so for some counts (e.g. 21, 23 and 45 of 1000) the result contains
    499 where ``round(i * stride)`` would give 500; this function reproduces that.

    Args:
        num_timesteps (`int`):
            Number of steps of the original process (1000 for Stable Diffusion).
        section_counts (`int`, `list[int]` or `str`):
            Steps to keep per section. An `int` means a single section. A string is either a comma-separated list
            of counts (``"10,15,20"``) or ``"ddimN"`` for the fixed integer stride of the DDIM paper.

    Returns:
        `list[int]`: The kept timesteps (original scale), sorted ascending.

    Raises:
        `ValueError`: If a count is smaller than 1 or larger than its section, or ``"ddimN"`` has no integer stride.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("section_counts must not be empty")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        # The official code silently returns nothing for a count of 0; a sampler with no step is never intended.
        if section_count < 1:
            raise ValueError(f"each section needs at least 1 step, got {section_count}")
        if size < section_count:
            raise ValueError(f"cannot divide a section of {size} steps into {section_count} steps")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate in float (not i * frac_stride) and use Python's round: this is what fixes the tie cases.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


class StableSRDDPMScheduler(DDPMScheduler):
    """
    Ancestral DDPM sampler on StableSR's respaced schedule, bit-compatible with the official inference scripts.

    It is a [`~diffusers.DDPMScheduler`] whose defaults are StableSR's (Stable Diffusion 2.1 "scaled_linear"
    schedule, fixed-small variance, no clipping) plus one flag, `official_respacing`. With it (the default),
    `set_timesteps(N)` keeps the timesteps of the official `space_timesteps(1000, N)` and precomputes the respaced
    tables exactly like the official `register_schedule`; `step` then reproduces the official `p_sample`
    (`predict_start_from_noise` / `predict_start_from_z_and_v`, `q_posterior`, noise scaled by
    `exp(0.5 * posterior_log_variance_clipped)`). All timesteps are on the original 0..999 scale.

    `timestep_spacing` stays a standard diffusers value, so the config can be loaded by any other diffusers
    scheduler (`DDIMScheduler.from_config(scheduler.config)` etc.); those ignore `official_respacing` (diffusers
    logs a one-line warning that the attribute is not expected) and use `timestep_spacing` instead. The default
    `"linspace"` gives the same grid as `space_timesteps` for most N (both span 0..999 evenly).

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Number of diffusion steps used to train the model.
        beta_start (`float`, defaults to 0.00085):
            The starting `beta` value (official `linear_start`).
        beta_end (`float`, defaults to 0.012):
            The final `beta` value (official `linear_end`).
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            The beta schedule. `"scaled_linear"` is the LDM "linear" schedule (betas are the squares of a linspace
            of square roots). It is computed in float64 and stored in float32, as in the official code.
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Betas to use directly instead of `beta_start`, `beta_end` and `beta_schedule`.
        variance_type (`str`, defaults to `"fixed_small"`):
            Posterior variance. `"fixed_small"` (and the equivalent `"fixed_small_log"`) use the official tables;
            other values fall back to [`~diffusers.DDPMScheduler.step`].
        clip_sample (`bool`, defaults to `False`):
            Clip the predicted x0 to `[-clip_sample_range, clip_sample_range]` (the official sampler never clips).
        prediction_type (`str`, defaults to `"epsilon"`):
            `"epsilon"` for the 512 model, `"v_prediction"` for the 768-v model, or `"sample"`.
        thresholding (`bool`, defaults to `False`):
            Dynamic thresholding of the predicted x0 (not used by StableSR).
        dynamic_thresholding_ratio (`float`, defaults to 0.995):
            The ratio for dynamic thresholding.
        clip_sample_range (`float`, defaults to 1.0):
            The clipping range when `clip_sample` is set.
        sample_max_value (`float`, defaults to 1.0):
            The threshold value for dynamic thresholding.
        timestep_spacing (`str`, defaults to `"linspace"`):
            Spacing used by `set_timesteps(num_inference_steps)` when `official_respacing` is `False`, and by other
            diffusers schedulers loaded from this config. `"official"` is accepted as shorthand for
            `official_respacing=True` and is stored as `"linspace"`.
        steps_offset (`int`, defaults to 0):
            Offset added to the timesteps with `timestep_spacing="leading"`.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR (not used by StableSR).
        official_respacing (`bool`, defaults to `True`):
            Choose the timesteps of `set_timesteps(num_inference_steps)` with the official `space_timesteps` instead
            of `timestep_spacing`. Either way the step uses the respaced tables of the chosen timesteps.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal[
            "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"
        ] = "fixed_small",
        clip_sample: bool = False,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        official_respacing: bool = True,
    ):
        # Accept timestep_spacing="official" as an alias, but never store it: the other diffusers schedulers raise
        # "official is not supported" in set_timesteps when they are built from a config carrying it.
        if timestep_spacing == "official":
            timestep_spacing = "linspace"
            official_respacing = True
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

        # Store the resolved values (the decorator recorded the arguments as passed, possibly the alias).
        self.register_to_config(timestep_spacing=timestep_spacing, official_respacing=official_respacing)
        # diffusers notes which arguments were left at their defaults, and another scheduler's from_config then
        # substitutes ITS defaults for them (DDIMScheduler would get linear 0.0001..0.02 betas). Here the defaults
        # are the model's schedule, so drop that note and let every value propagate (save_pretrained drops it too).
        if "_use_default_values" in self._internal_dict:
            self._internal_dict = FrozenDict(
                {k: v for k, v in self._internal_dict.items() if k != "_use_default_values"}
            )

        # Recompute the training schedule in float64 and store it in float32, as the official make_beta_schedule +
        # register_schedule do (ldm/modules/diffusionmodules/util.py make_beta_schedule builds float64 betas; numpy
        # cumprod in float64; buffers cast with torch.tensor(..., dtype=float32)). DDPMScheduler works in float32
        # throughout, which moves alphas_cumprod by up to ~1e-6 relative.
        if trained_betas is not None:
            betas64 = np.asarray(trained_betas, dtype=np.float64)
        elif beta_schedule == "scaled_linear":
            betas64 = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        elif beta_schedule == "linear":
            betas64 = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        else:
            betas64 = self.betas.double().numpy()
        if rescale_betas_zero_snr and (trained_betas is not None or beta_schedule in ("scaled_linear", "linear")):
            betas64 = rescale_zero_terminal_snr(torch.from_numpy(betas64)).numpy()
        alphas_cumprod64 = np.cumprod(1.0 - betas64, axis=0)
        self.betas = torch.tensor(betas64, dtype=torch.float32)
        self.alphas = torch.tensor(1.0 - betas64, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(alphas_cumprod64, dtype=torch.float32)
        # The official q_sample / q_sample_respace (x_T of the canvas scripts) read these float32 buffers rather than
        # taking the square root of the float32 alphas_cumprod; add_noise uses them too.
        self.sqrt_alphas_cumprod = torch.tensor(np.sqrt(alphas_cumprod64), dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = torch.tensor(np.sqrt(1.0 - alphas_cumprod64), dtype=torch.float32)

        self.respaced: dict[str, torch.Tensor] | None = None
        self.ori_timesteps: torch.Tensor | None = None
        self._respaced_index_map: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------------
    # schedule

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """
        Sets the sampling timesteps (original scale, descending) and precomputes the respaced tables for them.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of sampling steps N, 1 <= N <= `num_train_timesteps`. With `official_respacing` the timesteps
                are `space_timesteps(num_train_timesteps, N)`; otherwise they follow `timestep_spacing`.
            device (`str` or `torch.device`, *optional*):
                Device for `self.timesteps` and the respaced tables.
            timesteps (`list[int]`, *optional*):
                Custom timesteps in descending order, each in `[0, num_train_timesteps)`. The tables are respaced
                from this list the same way. Mutually exclusive with `num_inference_steps`.
        """
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Pass either `num_inference_steps` or `timesteps`.")
        num_train = self.config.num_train_timesteps

        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if len(timesteps) == 0:
                raise ValueError("`timesteps` must not be empty.")
            if min(timesteps) < 0:
                raise ValueError(f"`timesteps` must be >= 0, got {min(timesteps)}.")
            super().set_timesteps(timesteps=timesteps, device=device)  # validates order and the upper bound
            self.num_inference_steps = len(timesteps)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise ValueError(f"`num_inference_steps` must be an integer, got {num_inference_steps!r}.")
            if not 1 <= num_inference_steps <= num_train:
                raise ValueError(
                    f"`num_inference_steps` must be between 1 and num_train_timesteps={num_train}, "
                    f"got {num_inference_steps}."
                )
            if self.config.official_respacing:
                kept = space_timesteps(num_train, [int(num_inference_steps)])
                self.timesteps = torch.tensor(kept[::-1], dtype=torch.int64, device=device)
                self.num_inference_steps = int(num_inference_steps)
                self.custom_timesteps = False
            else:
                super().set_timesteps(num_inference_steps=int(num_inference_steps), device=device)
                if self.timesteps.min() < 0 or self.timesteps.max() >= num_train:
                    raise ValueError(
                        f"timestep_spacing={self.config.timestep_spacing!r} with steps_offset="
                        f"{self.config.steps_offset} gives timesteps outside [0, {num_train})."
                    )

        self._build_respaced(sorted(self.timesteps.tolist()), device=device)

    def _build_respaced(self, kept: list[int], device: str | torch.device | None = None) -> None:
        """Builds the respaced tables for the ascending original-scale timesteps `kept`, as the official code does."""
        num_train = self.config.num_train_timesteps
        if len(set(kept)) != len(kept):
            raise ValueError("timesteps must be unique")
        kept_t = torch.tensor(kept, dtype=torch.int64)

        # new_betas: 1 - acp[t] / acp[previous kept t], with float32 torch tensors (the script loops over the float32
        # alphas_cumprod buffer; its first divisor is the Python float 1.0). Elementwise identical to that loop.
        acp = self.alphas_cumprod[kept_t]
        last = torch.cat([torch.ones(1, dtype=torch.float32), acp[:-1]])
        betas = (1 - acp / last).numpy()  # float32, as np.array(list of float32 scalars) in the script

        # register_schedule(given_betas=...) numpy arithmetic, keeping its dtypes: betas/alphas/cumprod stay float32,
        # np.append(1., ...) promotes alphas_cumprod_prev (and everything using it) to float64; cast at the end.
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # v_posterior = 0 in StableSR, so the posterior variance is the plain "fixed small" beta-tilde.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # the variance is 0 at the first step, hence the clip before the log
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        self.respaced = {
            name: torch.tensor(tables[name], dtype=torch.float32, device=device) for name in RESPACED_TABLE_NAMES
        }
        self.ori_timesteps = kept_t.to(device)
        index_map = torch.full((num_train,), -1, dtype=torch.int64)
        index_map[kept_t] = torch.arange(len(kept), dtype=torch.int64)
        self._respaced_index_map = index_map.to(device)

    def respaced_index(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """
        Maps original-scale timesteps (what the UNet receives) to indices into the respaced tables.

        Args:
            timestep (`int` or `torch.Tensor`):
                One timestep or a 1-D batch of timesteps, each one of `self.timesteps`.

        Returns:
            `torch.Tensor`: int64 indices with the shape of `timestep` (the official `ts`).
        """
        if self._respaced_index_map is None:
            # No set_timesteps yet: sample the full chain, like the official scripts with ddpm_steps == 1000.
            self._build_respaced(list(range(self.config.num_train_timesteps)))
        t = torch.as_tensor(timestep)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"timestep must be an integer original-scale timestep, got {timestep}")
        t = t.long()
        if t.ndim > 1:
            raise ValueError(f"timestep must be a scalar or a 1-D batch, got shape {tuple(t.shape)}")
        num_train = self.config.num_train_timesteps
        if bool(((t < 0) | (t >= num_train)).any()):
            raise ValueError(f"timestep {timestep} is outside [0, {num_train})")
        index = self._respaced_index_map.to(t.device)[t]
        if bool((index < 0).any()):
            raise ValueError(
                f"timestep {timestep} is not one of the scheduler's timesteps {self.ori_timesteps.tolist()}; call "
                "set_timesteps first and pass the original-scale timesteps from scheduler.timesteps"
            )
        return index

    def _gather(self, name: str, index: torch.Tensor, sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Table values at `index`, shaped (batch, 1, ..., 1) like the official extract_into_tensor."""
        table = self.respaced[name].to(device=sample.device)
        index = index.to(sample.device)
        if index.ndim == 0:
            index = index.expand(sample.shape[0])
        values = table[index].to(dtype)
        return values.reshape(values.shape[0], *((1,) * (sample.ndim - 1)))

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def predict_original_sample(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """
        The predicted x0 of the official `p_mean_variance`, before any clipping.

        Args:
            model_output (`torch.Tensor`): The UNet output (eps, v or x0 according to `prediction_type`).
            timestep (`int` or `torch.Tensor`): Original-scale timestep(s) of `sample`.
            sample (`torch.Tensor`): The current latent x_t.

        Returns:
            `torch.Tensor`: x0 in the dtype of the computation (float32 for half-precision inputs).
        """
        index = self.respaced_index(timestep)
        dtype = _compute_dtype(sample)
        x, out = sample.to(dtype), model_output.to(dtype)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            # predict_start_from_noise
            return (
                self._gather("sqrt_recip_alphas_cumprod", index, x, dtype) * x
                - self._gather("sqrt_recipm1_alphas_cumprod", index, x, dtype) * out
            )
        if prediction_type == "v_prediction":
            # predict_start_from_z_and_v (uses the respaced sqrt buffers)
            return (
                self._gather("sqrt_alphas_cumprod", index, x, dtype) * x
                - self._gather("sqrt_one_minus_alphas_cumprod", index, x, dtype) * out
            )
        if prediction_type == "sample":
            return out
        raise ValueError(
            f"prediction_type given as {prediction_type} must be one of `epsilon`, `sample` or `v_prediction`."
        )

    def q_posterior(
        self, pred_original_sample: torch.Tensor, sample: torch.Tensor, timestep: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Mean and variance of q(x_{t_prev} | x_t, x0) on the respaced schedule (the official `q_posterior`).

        Args:
            pred_original_sample (`torch.Tensor`): The (predicted) x0.
            sample (`torch.Tensor`): The current latent x_t.
            timestep (`int` or `torch.Tensor`): Original-scale timestep(s) of `sample`.

        Returns:
            `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(mean, variance, log_variance_clipped)`; the variance
            terms have shape (batch, 1, ..., 1).
        """
        index = self.respaced_index(timestep)
        dtype = _compute_dtype(sample)
        x, x0 = sample.to(dtype), pred_original_sample.to(dtype)
        mean = (
            self._gather("posterior_mean_coef1", index, x, dtype) * x0
            + self._gather("posterior_mean_coef2", index, x, dtype) * x
        )
        variance = self._gather("posterior_variance", index, x, dtype)
        log_variance = self._gather("posterior_log_variance_clipped", index, x, dtype)
        return mean, variance, log_variance

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """
        One ancestral DDPM step on the respaced schedule (the official `p_sample` with `clip_denoised=False`).

        Args:
            model_output (`torch.Tensor`):
                The UNet output for `sample` at `timestep` (eps or v).
            timestep (`int` or `torch.Tensor`):
                The ORIGINAL-scale timestep(s) the UNet received, one of `self.timesteps` (or a 1-D batch of them).
            sample (`torch.Tensor`):
                The current latent x_t.
            generator (`torch.Generator`, *optional*):
                Random generator for the step noise (ignored when `variance_noise` is given).
            variance_noise (`torch.Tensor`, *optional*):
                Standard normal noise to use instead of drawing it (for reproducing a reference run). It is multiplied
                by zero at the last step, as in the official code.
            return_dict (`bool`, defaults to `True`):
                Return a [`~diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput`] instead of a tuple.

        Returns:
            [`~diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput`] or `tuple`: `prev_sample` (x at the next
            lower timestep) and `pred_original_sample` (x0), in the dtype of `sample`.
        """
        if generator is not None and variance_noise is not None:
            raise ValueError("Cannot pass both `generator` and `variance_noise`.")
        if self.config.variance_type not in _TABLE_VARIANCE_TYPES:
            # Not a StableSR setting: keep DDPMScheduler's behaviour for the learned / large variances.
            if variance_noise is not None:
                raise ValueError(f"`variance_noise` is not supported with variance_type={self.config.variance_type!r}")
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

        index = self.respaced_index(timestep)
        pred_original_sample = self.predict_original_sample(model_output, timestep, sample)
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )
        mean, _, log_variance = self.q_posterior(pred_original_sample, sample, timestep)

        # No noise at the last step (respaced index 0), like the official nonzero_mask.
        nonzero = index.to(sample.device) != 0
        if variance_noise is None and bool(nonzero.any()):
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        if variance_noise is None:
            prev_sample = mean
        else:
            if nonzero.ndim == 0:
                nonzero = nonzero.expand(sample.shape[0])
            mask = nonzero.to(mean.dtype).reshape(-1, *((1,) * (sample.ndim - 1)))
            prev_sample = mean + mask * (0.5 * log_variance).exp() * variance_noise.to(mean)

        prev_sample = prev_sample.to(sample.dtype)
        pred_original_sample = pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # ------------------------------------------------------------------------------------------------------------
    # forward process

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor | int
    ) -> torch.Tensor:
        """
        Forward diffusion to ORIGINAL-scale `timesteps` with the 1000-step float32 tables (the official `q_sample`).

        Args:
            original_samples (`torch.Tensor`): Clean latents x0.
            noise (`torch.Tensor`): Standard normal noise of the same shape.
            timesteps (`torch.IntTensor` or `int`): One timestep or one per sample, in `[0, num_train_timesteps)`.

        Returns:
            `torch.Tensor`: `sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise`.
        """
        sqrt_alpha, sqrt_one_minus_alpha = self._forward_coefficients(original_samples, timesteps)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor | int
    ) -> torch.Tensor:
        """
        The v-prediction target for the 768-v model (the official `get_v`, with the float32 sqrt tables).

        Args:
            sample (`torch.Tensor`): Clean latents x0.
            noise (`torch.Tensor`): The noise added to them.
            timesteps (`torch.IntTensor` or `int`): Original-scale timesteps.

        Returns:
            `torch.Tensor`: `sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0`.
        """
        sqrt_alpha, sqrt_one_minus_alpha = self._forward_coefficients(sample, timesteps)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample

    def _forward_coefficients(
        self, samples: torch.Tensor, timesteps: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = torch.as_tensor(timesteps, device=samples.device).long().flatten()
        num_train = self.config.num_train_timesteps
        if bool(((timesteps < 0) | (timesteps >= num_train)).any()):
            raise ValueError(f"timesteps must be in [0, {num_train}), got {timesteps.tolist()}")
        self.sqrt_alphas_cumprod = self.sqrt_alphas_cumprod.to(samples.device)
        self.sqrt_one_minus_alphas_cumprod = self.sqrt_one_minus_alphas_cumprod.to(samples.device)
        shape = (-1, *((1,) * (samples.ndim - 1)))
        sqrt_alpha = self.sqrt_alphas_cumprod[timesteps].to(samples.dtype).reshape(shape)
        sqrt_one_minus_alpha = self.sqrt_one_minus_alphas_cumprod[timesteps].to(samples.dtype).reshape(shape)
        return sqrt_alpha, sqrt_one_minus_alpha

    def lq_start_latents(
        self,
        lq_latents: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """
        The start latent of the official canvas / tile scripts: the LR latent diffused to the last training step,
        `x_T = sqrt(acp[999]) * z_LR + sqrt(1 - acp[999]) * noise` (`q_sample_respace` with the 1000-step buffers,
        independent of the respacing).

        Args:
            lq_latents (`torch.Tensor`): Scaled VAE latents of the (upsampled) low-quality image.
            noise (`torch.Tensor`, *optional*): Standard normal noise; drawn with `generator` when omitted.
            generator (`torch.Generator`, *optional*): Random generator for the noise.

        Returns:
            `torch.Tensor`: x_T, same shape and dtype as `lq_latents`.
        """
        if noise is None:
            noise = randn_tensor(
                lq_latents.shape, generator=generator, device=lq_latents.device, dtype=lq_latents.dtype
            )
        last = torch.full((lq_latents.shape[0],), self.config.num_train_timesteps - 1, dtype=torch.int64)
        return self.add_noise(lq_latents, noise.to(lq_latents), last)


def _compute_dtype(sample: torch.Tensor) -> torch.dtype:
    """float32 for half-precision latents (|x0| reaches ~15|x| at t=999), otherwise the latent's own dtype."""
    if sample.dtype in (torch.float16, torch.bfloat16) or not sample.is_floating_point():
        return torch.float32
    return sample.dtype
