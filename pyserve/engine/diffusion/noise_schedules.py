"""Noise schedules: host-side tables that turn a denoising loop's position into one row of `Coef`
coefficients (what diffusers calls a "scheduler"; here that word is kept for the request
scheduler of the engines).

The fused `denoise_step` kernel is schedule-agnostic: each row carries the numbers below, so one
launch serves requests at different timesteps and with different schedules. Configurations use
the field names of diffusers' `scheduler_config.json`, so a diffusers model directory works as is.
Each request owns its schedule object, so concurrent requests never share mutable state.
"""

import math
from dataclasses import dataclass

import numpy as np

from ...kernels.types import Coef


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # or "scaled_linear"
    prediction_type: str = "epsilon"  # or "v_prediction", "sample"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"  # or "linspace", "trailing"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> "ScheduleConfig":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in known})


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float32) ** 2
    else:
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported (linear, scaled_linear)")
    return np.cumprod(1.0 - betas, dtype=np.float32)


def spaced_timesteps(cfg: ScheduleConfig, steps: int, extra: int = 0) -> np.ndarray:
    """Descending training timesteps for `steps` inference steps (+`extra` dropped at the end)."""
    n, total = cfg.num_train_timesteps, steps + extra
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, total).round()[::-1]
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, total) * (n // total)).round()[::-1] + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / total)) - 1
    else:
        raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported")
    return ts[:steps].astype(np.int64).copy()


def _prediction_terms(prediction: str, alpha: float, sigma: float) -> dict[int, float]:
    """x0 and eps as linear maps of (x, model output) for x = alpha * x0 + sigma * eps."""
    if prediction == "epsilon":
        return {Coef.X0_X: 1 / alpha, Coef.X0_OUT: -sigma / alpha, Coef.EPS_X: 0.0, Coef.EPS_OUT: 1.0}
    if prediction == "v_prediction":
        return {Coef.X0_X: alpha, Coef.X0_OUT: -sigma, Coef.EPS_X: sigma, Coef.EPS_OUT: alpha}
    if prediction == "sample":
        return {Coef.X0_X: 0.0, Coef.X0_OUT: 1.0, Coef.EPS_X: 1 / sigma, Coef.EPS_OUT: -alpha / sigma}
    raise ValueError(f"prediction_type {prediction!r} is not supported")


def _row(terms: dict[int, float], guidance: float) -> list[float]:
    row = [0.0] * Coef.COUNT
    row[Coef.GUIDANCE] = guidance
    for col, value in terms.items():
        row[col] = value
    return row


class NoiseSchedule:
    """A denoising schedule of `steps` steps; `coefficients(i)` gives step i's row.

    A loop may begin part-way (img2img): `begin` is its first step, and `noised(i)` says how a
    clean latent x0 and unit noise combine into the loop's starting point at step i."""

    name = ""
    uses_prev_x0 = False
    stochastic = False

    def __init__(self, config: dict | ScheduleConfig, steps: int):
        self.cfg = config if isinstance(config, ScheduleConfig) else ScheduleConfig.from_dict(config)
        self.steps = steps
        self.begin = 0
        self.alphas_cumprod = alphas_cumprod(self.cfg)
        self.timesteps = self._timesteps()

    def _timesteps(self) -> np.ndarray:
        return spaced_timesteps(self.cfg, self.steps)

    def model_input_scale(self, i: int) -> float:
        """Factor applied to x before it goes into the denoiser at step i."""
        return 1.0

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the unit noise a loop starts from."""
        return 1.0

    def noised(self, i: int) -> tuple[float, float]:
        """(a, b) such that a * x0 + b * noise is a latent at step i's noise level."""
        a_t = float(self.alphas_cumprod[int(self.timesteps[i])])
        return a_t**0.5, (1 - a_t) ** 0.5

    def coefficients(self, i: int, guidance: float = 1.0) -> list[float]:
        raise NotImplementedError


class DDPM(NoiseSchedule):
    """DDPM ancestral step with the fixed-small posterior variance."""

    name = "ddpm"
    stochastic = True

    def coefficients(self, i: int, guidance: float = 1.0) -> list[float]:
        t = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < self.steps else -1
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
        beta_t = 1 - a_t / a_prev
        row = _row(_prediction_terms(self.cfg.prediction_type, a_t**0.5, (1 - a_t) ** 0.5), guidance)
        row[Coef.CLIP] = self.cfg.clip_sample_range if self.cfg.clip_sample else 0.0
        row[Coef.NEXT_X0] = a_prev**0.5 * beta_t / (1 - a_t)
        row[Coef.NEXT_X] = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)
        if t > 0:
            row[Coef.NOISE] = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20) ** 0.5
        return row


class DDIM(NoiseSchedule):
    """DDIM; eta = 0 is deterministic, eta = 1 matches DDPM's variance."""

    name = "ddim"

    def __init__(self, config: dict | ScheduleConfig, steps: int, eta: float = 0.0):
        super().__init__(config, steps)
        self.eta = eta
        self.stochastic = eta > 0
        self.final_alpha = 1.0 if self.cfg.set_alpha_to_one else float(self.alphas_cumprod[0])

    def coefficients(self, i: int, guidance: float = 1.0) -> list[float]:
        t = int(self.timesteps[i])
        prev = t - self.cfg.num_train_timesteps // self.steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        row = _row(_prediction_terms(self.cfg.prediction_type, a_t**0.5, (1 - a_t) ** 0.5), guidance)
        row[Coef.CLIP] = self.cfg.clip_sample_range if self.cfg.clip_sample else 0.0
        row[Coef.NEXT_X0] = a_prev**0.5
        row[Coef.NEXT_EPS] = max(1 - a_prev - std**2, 0.0) ** 0.5
        row[Coef.NOISE] = std
        return row


class _SigmaSchedule(NoiseSchedule):
    """Schedules in sigma space: sigma_t = sqrt((1 - abar_t) / abar_t), ending at 0."""

    def __init__(self, config: dict | ScheduleConfig, steps: int):
        super().__init__(config, steps)
        train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sig = np.interp(self.timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)

    def noised(self, i: int) -> tuple[float, float]:
        return 1.0, float(self.sigmas[i])


class Euler(_SigmaSchedule):
    """Euler's method on the probability-flow ODE; x lives at scale sqrt(sigma^2 + 1)."""

    name = "euler"
    ancestral = False

    def _timesteps(self) -> np.ndarray:
        n = self.cfg.num_train_timesteps
        if self.cfg.timestep_spacing == "linspace":  # fractional timesteps here, as diffusers does
            return np.linspace(0, n - 1, self.steps, dtype=np.float32)[::-1].copy()
        return super()._timesteps().astype(np.float32)

    def model_input_scale(self, i: int) -> float:
        return 1.0 / (float(self.sigmas[i]) ** 2 + 1) ** 0.5

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max())
        return top if self.cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def coefficients(self, i: int, guidance: float = 1.0) -> list[float]:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        # x = x0 + sigma * eps is the VP form with alpha = 1/sqrt(sigma^2+1) rescaled by 1/alpha.
        alpha_vp = 1 / (sigma**2 + 1) ** 0.5
        terms = _prediction_terms(self.cfg.prediction_type, alpha_vp, sigma * alpha_vp)
        terms = {Coef.X0_X: terms[Coef.X0_X] * alpha_vp, Coef.X0_OUT: terms[Coef.X0_OUT],
                 Coef.EPS_X: terms[Coef.EPS_X] * alpha_vp, Coef.EPS_OUT: terms[Coef.EPS_OUT]}
        row = _row(terms, guidance)
        row[Coef.NEXT_X] = 1.0
        if self.ancestral:
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            row[Coef.NEXT_EPS] = sigma_down - sigma
            row[Coef.NOISE] = sigma_up
        else:
            row[Coef.NEXT_EPS] = sigma_next - sigma
        return row


class EulerAncestral(Euler):
    name = "euler_a"
    ancestral = True
    stochastic = True


class DPMSolverPP2M(_SigmaSchedule):
    """DPM-Solver++ (2M, midpoint): second order from the previous step's x0 estimate.

    The first step, and the last when there are fewer than 15 steps, are first order.
    """

    name = "dpmpp_2m"
    uses_prev_x0 = True

    def _timesteps(self) -> np.ndarray:
        return spaced_timesteps(self.cfg, self.steps, extra=1)

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def noised(self, i: int) -> tuple[float, float]:
        return self._alpha_sigma(float(self.sigmas[i]))  # this solver's x lives in VP form

    def _lambda(self, sigma: float) -> float:
        alpha, s = self._alpha_sigma(sigma)
        return math.log(alpha) - math.log(s)

    def coefficients(self, i: int, guidance: float = 1.0) -> list[float]:
        sigma_s, sigma_t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha_s, vp_sigma_s = self._alpha_sigma(sigma_s)
        row = _row(_prediction_terms(self.cfg.prediction_type, alpha_s, vp_sigma_s), guidance)
        if sigma_t == 0.0:  # lambda_t is infinite: the step lands on x0
            row[Coef.NEXT_X0] = 1.0
            return row
        alpha_t, vp_sigma_t = self._alpha_sigma(sigma_t)
        h = self._lambda(sigma_t) - self._lambda(sigma_s)
        phi = -alpha_t * math.expm1(-h)
        row[Coef.NEXT_X] = vp_sigma_t / vp_sigma_s
        first_order = i == self.begin or (i == self.steps - 1 and self.steps < 15)
        if first_order:
            row[Coef.NEXT_X0] = phi
        else:
            r0 = (self._lambda(sigma_s) - self._lambda(float(self.sigmas[i - 1]))) / h
            row[Coef.NEXT_X0] = phi * (1 + 0.5 / r0)
            row[Coef.NEXT_PREV_X0] = -phi * 0.5 / r0
        return row


NOISE_SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.name: cls for cls in (DDPM, DDIM, Euler, EulerAncestral, DPMSolverPP2M)
}
# diffusers' scheduler class names (scheduler_config.json "_class_name") -> ours
DIFFUSERS_NAMES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                   "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpmpp_2m"}
