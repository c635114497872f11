"""The training and likelihood maths of a DDPM (Ho et al. 2020), on top of `diffusers.DDPMScheduler`.

The subclass keeps the parent's name, constructor, config, `step`, `set_timesteps` and `add_noise` untouched,
so `save_config` writes a plain DDPMScheduler config that diffusers loads without hf_ddpm, and any diffusers
DDPMScheduler config loads into this class. What it adds is what training and evaluation need:

    forward process     q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)      q_mean_variance, q_sample
    posterior           q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)           q_posterior_mean_variance
    reverse process     p(x_{t-1} | x_t) = N(mu_theta, Sigma_theta)            p_mean_variance
    parameterisations   epsilon / x_0 ("sample") / v                           predict_x0, predict_eps, ...
    training objective  weighted MSE (+ improved-diffusion's hybrid VLB)       training_loss, loss_weights
    variational bound   L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim              vlb_terms, vlb_bits_per_dim, ...

Notation: T = config.num_train_timesteps, and a timestep index t in {0, ..., T-1} is the paper's step t + 1,
so `t = 0` is the last denoising step (x_1 -> x_0 in the paper) whose bound term is the decoder NLL.
alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, abar_{-1} = 1, SNR(t) = abar_t / (1 - abar_t).

The coefficient tables are float64 (`DDPMScheduler.tables`), recomputed from the config rather than cast
from the parent's float32 ones: 1 - abar_t for small t and the posterior variance lose most of their digits
in float32. Every method takes a batch of integer timesteps `t` of shape (B,) and broadcasts the coefficients
over the remaining dimensions. Unless noted, a method computes in float32 or wider (bf16/fp16 inputs are
upcast) and returns torch's promotion of its inputs' dtypes. Data `x0` are images scaled to [-1, 1] from
8-bit values (x = 2k/255 - 1, bins 2/255 wide), which is what the decoder likelihood and bits/dim assume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import reduce
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from hf_ddpm.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

LOSS_WEIGHTINGS = ("uniform", "min_snr", "vlb")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# The table of log Sigma_t for each fixed variance_type. "fixed_small_log" is the same distribution as
# "fixed_small": diffusers' `step` only parameterises its noise by the standard deviation instead.
_FIXED_LOG_VARIANCE_TABLES = {
    "fixed_small": "posterior_log_variance_clipped",
    "fixed_small_log": "posterior_log_variance_clipped",
    "fixed_large": "fixed_large_log_variance",
}
# The variance types the training maths supports (diffusers' "learned" and "fixed_large_log" are not).
VARIANCE_TYPES = (*_FIXED_LOG_VARIANCE_TABLES, "learned_range")


@dataclass(frozen=True)
class DiffusionTables:
    """Per-timestep coefficients of the forward process and its posterior, each a (T,) tensor.

    Built in float64 by `from_betas`; the names follow improved-diffusion's GaussianDiffusion.
    """

    betas: Tensor  # beta_t
    alphas: Tensor  # alpha_t = 1 - beta_t
    alphas_cumprod: Tensor  # abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: Tensor  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: Tensor  # sqrt(abar_t)
    sqrt_one_minus_alphas_cumprod: Tensor  # sqrt(1 - abar_t)
    log_one_minus_alphas_cumprod: Tensor  # log(1 - abar_t)
    sqrt_recip_alphas_cumprod: Tensor  # sqrt(1 / abar_t)
    sqrt_recipm1_alphas_cumprod: Tensor  # sqrt(1 / abar_t - 1)
    snr: Tensor  # abar_t / (1 - abar_t)
    posterior_variance: Tensor  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0
    posterior_log_variance_clipped: Tensor  # log beta~_t, with the t = 0 entry replaced by log beta~_1
    posterior_mean_coef1: Tensor  # coefficient of x_0 in mu~_t: beta_t sqrt(abar_{t-1}) / (1 - abar_t)
    posterior_mean_coef2: Tensor  # coefficient of x_t in mu~_t: sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)
    log_betas: Tensor  # log beta_t: the "large" end of learned_range
    fixed_large_log_variance: Tensor  # log of [beta~_1, beta_1, ..., beta_{T-1}] (improved-diffusion)

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiffusionTables:
        """All tables from a (T,) float64 beta schedule, T >= 2."""
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"need a 1-D schedule of at least 2 betas, got shape {tuple(betas.shape)}")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7):
        #   beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        #   mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0
        #           + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta~_0 = 0: its log is clipped to log beta~_1, then the variance of the decoder p(x_0 | x_1).
        posterior_variance_clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            log_one_minus_alphas_cumprod=torch.log1p(-alphas_cumprod),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            snr=alphas_cumprod / (1.0 - alphas_cumprod),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_variance_clipped.log(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            log_betas=betas.log(),
            fixed_large_log_variance=torch.cat([posterior_variance[1:2], betas[1:]]).log(),
        )

    def to(self, device: torch.device) -> DiffusionTables:
        """The same tables on `device` (float32 on MPS, which has no float64)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return DiffusionTables(**{f.name: getattr(self, f.name).to(device, dtype) for f in fields(self)})


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021) in float64:

    beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta),  f(s) = cos((s + 0.008) / 1.008 * pi / 2)^2
    """
    s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


def _promoted_dtype(*tensors: Tensor) -> torch.dtype:
    """torch's type promotion of the tensors' dtypes (the dtype a method returns)."""
    return reduce(torch.promote_types, (x.dtype for x in tensors))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted dtype, but at least float32: half-precision inputs are upcast for the maths."""
    return torch.promote_types(_promoted_dtype(*tensors), torch.float32)


class DDPMScheduler(diffusers.DDPMScheduler):
    """`diffusers.DDPMScheduler` plus the forward/posterior/reverse Gaussians, training losses and the
    variational bound (see the module docstring). Config, constructor and sampling are the parent's."""

    # ------------------------------------------------------------------------------------------------------
    # Tables
    # ------------------------------------------------------------------------------------------------------

    def _betas_float64(self) -> Tensor:
        """The beta schedule in float64: recomputed from the config for trained betas and the "linear",
        "scaled_linear" and "squaredcos_cap_v2" schedules, otherwise the parent's float32 betas cast."""
        c = self.config
        if c.trained_betas is not None:
            betas = torch.tensor(c.trained_betas, dtype=torch.float64)
        elif c.beta_schedule == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
        elif c.beta_schedule == "scaled_linear":
            roots = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64)
            betas = roots**2
        elif c.beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(c.num_train_timesteps)
        else:
            return self.betas.to(torch.float64)  # already rescaled by the parent if asked to
        return rescale_zero_terminal_snr(betas) if c.rescale_betas_zero_snr else betas

    @property
    def tables(self) -> DiffusionTables:
        """The float64 coefficient tables on the CPU."""
        return self._tables(torch.device("cpu"))

    def _tables(self, device: torch.device) -> DiffusionTables:
        """The tables on `device`, built on first use and cached per device (the config is frozen)."""
        cache: dict[torch.device, DiffusionTables] = self.__dict__.setdefault("_tables_by_device", {})
        if device not in cache:
            cpu = torch.device("cpu")
            if cpu not in cache:
                cache[cpu] = DiffusionTables.from_betas(self._betas_float64())
            cache[device] = cache[cpu].to(device)
        return cache[device]

    def _coef_broadcast(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table `name` at timesteps t (B,), shaped (B, 1, ..., 1) to multiply `like` (B, ...), in `like`'s
        dtype but at least float32 (so multiplying a half-precision tensor by it upcasts)."""
        table = getattr(self._tables(like.device), name)
        coef = table[t.to(like.device)].to(torch.promote_types(like.dtype, torch.float32))
        return coef.reshape(-1, *([1] * (like.ndim - 1)))

    def _coef_per_sample(self, name: str, t: Tensor) -> Tensor:
        """Table `name` at timesteps t (B,): one value per sample, on t's device, in the table's dtype
        (float64 but on MPS)."""
        return getattr(self._tables(t.device), name)[t]

    # ------------------------------------------------------------------------------------------------------
    # Forward process and its posterior
    # ------------------------------------------------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. eq. 4):

            q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)

        All three have x0's shape.
        """
        dtype = x0.dtype
        mean = self._coef_broadcast("sqrt_alphas_cumprod", t, x0) * x0
        # From log(1 - abar_t), computed in float64: 1 - abar_t in float32 would cancel for small t.
        log_variance = self._coef_broadcast("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean.to(dtype), log_variance.exp().to(dtype), log_variance.to(dtype)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

        The same map as the parent's `add_noise`, with float64 coefficients.
        """
        x_t = (
            self._coef_broadcast("sqrt_alphas_cumprod", t, x0) * x0
            + self._coef_broadcast("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )
        return x_t.to(_promoted_dtype(x0, noise))

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7):

            mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0
                    + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
            beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)

        At t = 0 the posterior is a point mass on x_0 (beta~_0 = 0, mu~_0 = x_0); its log-variance is clipped
        to log beta~_1 (improved-diffusion). All three have xt's shape.
        """
        dtype = _promoted_dtype(x0, xt)
        mean = (
            self._coef_broadcast("posterior_mean_coef1", t, xt) * x0
            + self._coef_broadcast("posterior_mean_coef2", t, xt) * xt
        )
        variance = self._coef_broadcast("posterior_variance", t, xt).expand_as(xt)
        log_variance = self._coef_broadcast("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean.to(dtype), variance.to(dtype), log_variance.to(dtype)

    # ------------------------------------------------------------------------------------------------------
    # Parameterisations: the network predicts eps, x_0 ("sample") or v = sqrt(abar_t) eps - sqrt(1-abar_t) x_0
    # ------------------------------------------------------------------------------------------------------

    def _prediction_type(self) -> str:
        prediction_type = self.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        return prediction_type

    def x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps, which inverts
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
        """
        x0 = (
            self._coef_broadcast("sqrt_recip_alphas_cumprod", t, xt) * xt
            - self._coef_broadcast("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        )
        return x0.to(_promoted_dtype(xt, eps))

    def eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (sqrt(1 / abar_t) x_t - x_0) / sqrt(1 / abar_t - 1), the inverse of `x0_from_eps`."""
        eps = (self._coef_broadcast("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self._coef_broadcast(
            "sqrt_recipm1_alphas_cumprod", t, xt
        )
        return eps.to(_promoted_dtype(xt, x0))

    def predict_x0(self, model_output: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """x_0 predicted from the (mean part of the) model output, for config.prediction_type:

        epsilon:       x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps
        sample:        x_0 = model output
        v_prediction:  x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
        """
        prediction_type = self._prediction_type()
        if prediction_type == "epsilon":
            return self.x0_from_eps(xt, t, model_output)
        if prediction_type == "sample":
            return model_output.to(_promoted_dtype(model_output, xt))
        x0 = (
            self._coef_broadcast("sqrt_alphas_cumprod", t, xt) * xt
            - self._coef_broadcast("sqrt_one_minus_alphas_cumprod", t, xt) * model_output
        )
        return x0.to(_promoted_dtype(model_output, xt))

    def predict_eps(self, model_output: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """eps predicted from the (mean part of the) model output, for config.prediction_type:

        epsilon:       eps = model output
        sample:        eps = (sqrt(1 / abar_t) x_t - x_0) / sqrt(1 / abar_t - 1)
        v_prediction:  eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v
        """
        prediction_type = self._prediction_type()
        if prediction_type == "epsilon":
            return model_output.to(_promoted_dtype(model_output, xt))
        if prediction_type == "sample":
            return self.eps_from_x0(xt, t, model_output)
        eps = (
            self._coef_broadcast("sqrt_one_minus_alphas_cumprod", t, xt) * xt
            + self._coef_broadcast("sqrt_alphas_cumprod", t, xt) * model_output
        )
        return eps.to(_promoted_dtype(model_output, xt))

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is regressed onto for x_t = q_sample(x0, t, noise), for config.prediction_type:

        epsilon: eps,   sample: x_0,   v_prediction: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
        """
        prediction_type = self._prediction_type()
        dtype = _promoted_dtype(x0, noise)
        if prediction_type == "epsilon":
            return noise.to(dtype)
        if prediction_type == "sample":
            return x0.to(dtype)
        v = (
            self._coef_broadcast("sqrt_alphas_cumprod", t, x0) * noise
            - self._coef_broadcast("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )
        return v.to(dtype)

    # ------------------------------------------------------------------------------------------------------
    # Reverse process p(x_{t-1} | x_t)
    # ------------------------------------------------------------------------------------------------------

    def _split_model_output(self, model_output: Tensor, xt: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean part, variance part or None): learned_range models output 2C channels, the others C."""
        variance_type = self.config.variance_type
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unsupported variance_type {variance_type!r}; valid: {', '.join(VARIANCE_TYPES)}")
        channels = xt.shape[1]
        learned = variance_type == "learned_range"
        if model_output.shape[1] != (2 * channels if learned else channels):
            raise ValueError(
                f"variance_type {variance_type!r} needs a model output with "
                f"{2 * channels if learned else channels} channels for {channels}-channel data, "
                f"got {model_output.shape[1]}"
            )
        if learned:
            mean_output, var_output = model_output.split(channels, dim=1)
            return mean_output, var_output
        return model_output, None

    def _fixed_log_variance_table(self) -> str:
        """Name of the table holding log Sigma_t for a fixed variance_type."""
        variance_type = self.config.variance_type
        if variance_type not in _FIXED_LOG_VARIANCE_TABLES:
            raise ValueError(
                f"variance_type {variance_type!r} is not a fixed variance; fixed ones: "
                f"{', '.join(_FIXED_LOG_VARIANCE_TABLES)}"
            )
        return _FIXED_LOG_VARIANCE_TABLES[variance_type]

    def p_mean_variance(
        self, model_output: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """The reverse step p(x_{t-1} | x_t) = N(mean, variance) given the model output at (x_t, t).

        mean = mu~_t(pred_x0, x_t), the posterior mean with x_0 replaced by its prediction (Ho et al. eq. 11
        for epsilon prediction); with clip_denoised, pred_x0 is first clamped to +-config.clip_sample_range.
        log_variance depends on config.variance_type:

            fixed_small (and fixed_small_log):  log beta~_t (clipped: log beta~_1 at t = 0)
            fixed_large:                        log beta_t (log beta~_1 at t = 0, improved-diffusion)
            learned_range:                      frac * log beta_t + (1 - frac) * log beta~_t (clipped),
                                                frac = (v + 1) / 2, v = the second half of the 2C output
                                                channels

        learned_range is the interpolation diffusers' `step` samples with, so v = -1 is fixed_small and
        v = +1 fixed_large for t > 0. At t = 0, where `step` adds no noise, its lower end is the clipped
        log beta~_1 (diffusers: log 1e-20) and its upper end log beta_0 (fixed_large: log beta~_1).
        variance = exp(log_variance) everywhere, so at t = 0 it is the variance of the decoder p(x_0 | x_1)
        (beta~_1 for fixed_small), not the zero noise that `step` adds there. diffusers' "learned" and
        "fixed_large_log" variance types raise ValueError.

        Returns:
            dict with "mean", "variance", "log_variance", "pred_x0", all of xt's shape, in the promoted dtype.
        """
        dtype = _promoted_dtype(model_output, xt)
        mean_output, var_output = self._split_model_output(model_output, xt)
        if var_output is None:
            log_variance = self._coef_broadcast(self._fixed_log_variance_table(), t, xt).expand_as(xt)
        else:
            frac = (var_output + 1.0) / 2.0
            max_log = self._coef_broadcast("log_betas", t, xt)
            min_log = self._coef_broadcast("posterior_log_variance_clipped", t, xt)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self.predict_x0(mean_output, xt, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {
            "mean": mean.to(dtype),
            "variance": log_variance.exp().to(dtype),
            "log_variance": log_variance.to(dtype),
            "pred_x0": pred_x0.to(dtype),
        }

    # ------------------------------------------------------------------------------------------------------
    # Training objective
    # ------------------------------------------------------------------------------------------------------

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """abar_t at timesteps t (B,); float64 (but on MPS) on t's device, from the per-device table cache."""
        return self._coef_per_sample("alphas_cumprod", t)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) at timesteps t (B,); float32 on t's device."""
        return self._coef_per_sample("snr", t).float()

    def _x0_error_per_target_error(self, t: Tensor) -> Tensor:
        """s_t = (d x_0 / d target)^2 at fixed x_t, per sample (B,): x_0's squared error per unit of the target's.

        epsilon: (1 - abar_t) / abar_t = 1 / SNR,   sample: 1,   v_prediction: 1 - abar_t = 1 / (SNR + 1)
        """
        snr = self._coef_per_sample("snr", t)
        prediction_type = self._prediction_type()
        if prediction_type == "epsilon":
            return 1.0 / snr
        if prediction_type == "sample":
            return torch.ones_like(snr)
        return 1.0 / (snr + 1.0)

    def loss_weights(self, t: Tensor, weighting: str, snr_gamma: float = 5.0) -> Tensor:
        """Per-sample weights lambda_t (B,) of the target MSE in `training_loss`; float32 on t's device.

            uniform   lambda_t = 1                           L_simple (Ho et al. 2020, eq. 14)
            min_snr   lambda_t = min(SNR_t, gamma) s_t       Min-SNR-gamma (Hang et al. 2023)
            vlb       lambda_t = c_t^2 s_t / (2 sigma_t^2)   L_{t-1} of the bound (Ho et al. 2020, eq. 5 and 12)

        s_t = (d x_0 / d target)^2 at fixed x_t turns the target's squared error into x_0's (1/SNR_t for
        epsilon, 1 for sample, 1/(SNR_t + 1) for v), c_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) is x_0's
        coefficient in mu~_t, and sigma_t^2 the fixed reverse variance of config.variance_type.

        Notes:
            "vlb" makes lambda_t * mse the KL term L_{t-1} in nats per dimension, less a constant that does not
            depend on the model (0 for fixed_small); at t = 0 it is the Gaussian-density surrogate of the
            decoder NLL, without the 8-bit discretisation of `vlb_terms`. It needs a fixed variance:
            learned_range raises ValueError, as do unknown weightings. Derivations and the closed form of each
            weight per target: docs/training_objective.md.
        """
        if weighting == "uniform":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        if weighting == "min_snr":
            if snr_gamma <= 0:
                raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
            snr = self._coef_per_sample("snr", t)
            weights = snr.clamp(max=snr_gamma) * self._x0_error_per_target_error(t)
        elif weighting == "vlb":
            c = self._coef_per_sample("posterior_mean_coef1", t)
            log_sigma2 = self._coef_per_sample(self._fixed_log_variance_table(), t)
            weights = 0.5 * c**2 * torch.exp(-log_sigma2) * self._x0_error_per_target_error(t)
        else:
            raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(LOSS_WEIGHTINGS)}")
        return weights.float()

    def training_loss(
        self,
        model_output: Tensor,
        x0: Tensor,
        noise: Tensor,
        t: Tensor,
        loss_weighting: str = "uniform",
        snr_gamma: float = 5.0,
        vlb_lambda: float = 0.001,
    ) -> Tensor:
        """Per-sample loss (B,) of the model output at x_t = q_sample(x0, t, noise): Ho et al. 2020's weighted
        denoising MSE, plus Nichol & Dhariwal 2021's L_hybrid bound term (sec. 3.1) for learned_range.

            loss = lambda_t * mean_{C,H,W} (output[:, :C] - target)^2  [+ vlb_lambda * T * L_t]

        lambda_t = `loss_weights(t, loss_weighting, snr_gamma)`, target = `training_target(x0, noise, t)`, and
        the bracket, for learned_range only, is the bound term L_t = `vlb_terms` in bits/dim of the output with
        its mean half detached and clip_denoised=False.

        Notes:
            T * L_t is a one-sample estimate of L_vlb = sum_t L_t, so with T = 1000 the bracket is exactly
            improved-diffusion's "vb" loss; the detached mean lets the bound train only the variance. L_t
            recomputes x_t with `q_sample`: feed the model that x_t (the parent's float32 `add_noise` differs by
            ~1e-6). Multiply by a timestep sampler's importance weights outside. Computed in float32 (float64
            for float64 inputs) even when the output is bf16/fp16; returns that dtype.
        """
        dtype = _compute_dtype(model_output, x0, noise)
        model_output, x0, noise = model_output.to(dtype), x0.to(dtype), noise.to(dtype)
        mean_output, var_output = self._split_model_output(model_output, x0)
        mse = mean_flat((mean_output - self.training_target(x0, noise, t)) ** 2)
        loss = self.loss_weights(t, loss_weighting, snr_gamma).to(mse) * mse
        if var_output is None:
            return loss
        xt = self.q_sample(x0, t, noise)
        detached_mean_output = torch.cat([mean_output.detach(), var_output], dim=1)
        vlb = self.vlb_terms(detached_mean_output, x0, xt, t, clip_denoised=False)
        return loss + vlb_lambda * self.config.num_train_timesteps * vlb

    # ------------------------------------------------------------------------------------------------------
    # Variational bound, in bits per dimension
    # ------------------------------------------------------------------------------------------------------

    def _vlb_terms_and_reverse(
        self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`vlb_terms` and the reverse step p(x_{t-1} | x_t) (`p_mean_variance`'s dict) it was computed from."""
        dtype = _compute_dtype(model_output, x0, xt)
        model_output, x0, xt = model_output.to(dtype), x0.to(dtype), xt.to(dtype)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        reverse = self.p_mean_variance(model_output, xt, t, clip_denoised=clip_denoised)
        # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 ...
        kl_nats = normal_kl(true_mean, true_log_variance, reverse["mean"], reverse["log_variance"])
        kl = mean_flat(kl_nats) / math.log(2.0)
        # ... and L_0 = -log p(x_0 | x_1), the discretised Gaussian decoder with std exp(log_variance / 2).
        log_likelihood = discretized_gaussian_log_likelihood(x0, reverse["mean"], 0.5 * reverse["log_variance"])
        decoder_nll = -mean_flat(log_likelihood) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, decoder_nll, kl), reverse

    def vlb_terms(self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool = True) -> Tensor:
        """Per-sample terms (B,) of the variational bound, in bits per dimension (mean over C, H, W / log 2):

            t > 0:  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))       (Ho et al. eq. 5)
            t = 0:  L_0 = -log p(x_0 | x_1), the discretised Gaussian decoder     (Ho et al. eq. 13)

        x0 must be 8-bit data in [-1, 1] for L_0 to be a likelihood. clip_denoised (default, as the DDPM
        paper's code and improved-diffusion evaluate the bound): p's mean is formed from pred_x0 clamped to
        +-config.clip_sample_range, see `p_mean_variance`; False uses the raw prediction. Either p is a valid
        reverse process, so both are bounds, but only bounds with the same setting are comparable. Computed and
        returned in float32 or wider.
        """
        return self._vlb_terms_and_reverse(model_output, x0, xt, t, clip_denoised)[0]

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per sample (B,) in bits per dimension (float32 or wider).

        Does not depend on the model; ~1e-5 bits/dim for the paper's linear schedule.
        """
        x0 = x0.to(_compute_dtype(x0))
        t_last = torch.full((x0.shape[0],), self.config.num_train_timesteps - 1, device=x0.device)
        mean, _, log_variance = self.q_mean_variance(x0, t_last)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        generator: torch.Generator | None = None,
        timestep_batch: int | None = None,
        progress: bool = False,
        clip_denoised: bool = True,
    ) -> dict[str, Tensor]:
        """Evaluate every term of the variational bound on x0 (B, C, H, W), 8-bit images scaled to [-1, 1].

        For each t a fresh eps gives x_t = q_sample(x0, t, eps) and the model output model_fn(x_t, t), a
        tensor (e.g. `lambda x, t: unet(x, t).sample`; 2C channels for learned_range). t runs from T-1 down
        to 0 and eps is drawn in that order (one (B, C, H, W) draw per t from `generator`), so the result
        does not depend on `timestep_batch`: that many timesteps are evaluated in one model call of batch
        size timestep_batch * B (x0 repeated; default 1). clip_denoised: clamp pred_x0 to
        +-config.clip_sample_range before the posterior mean is formed, in every term (see `vlb_terms`); the
        default True is how the DDPM paper's code and improved-diffusion's image_nll.py report NLL, False gives
        the bound of the unclipped network. Runs under torch.no_grad().

        Returns (float32, or float64 for float64 x0):
            "vb" (B, T): vlb_terms at each t, bits/dim; "prior_bpd" (B,): L_T;
            "total_bpd" (B,) = prior_bpd + vb.sum(1): the negative ELBO in bits/dim (a one-sample estimate
                of it), an upper bound on the NLL -log2 p(x0) / D;
            "xstart_mse" (B, T): mean-flat squared error of pred_x0;
            "mse" (B, T): mean-flat squared error of the eps implied by pred_x0, against the true eps.
        """
        num_timesteps = self.config.num_train_timesteps
        chunk_size = 1 if timestep_batch is None else timestep_batch
        if chunk_size < 1:
            raise ValueError(f"timestep_batch must be a positive integer, got {timestep_batch}")
        dtype = _compute_dtype(x0)
        x0 = x0.to(dtype)
        batch = x0.shape[0]
        results = {key: x0.new_empty(batch, num_timesteps) for key in ("vb", "xstart_mse", "mse")}
        timesteps = list(range(num_timesteps - 1, -1, -1))
        chunks = [timesteps[i : i + chunk_size] for i in range(0, num_timesteps, chunk_size)]
        for chunk in tqdm(chunks, desc="bits/dim", disable=not progress):
            t = torch.tensor(chunk, device=x0.device).repeat_interleave(batch)
            noise = torch.cat(
                [randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=dtype) for _ in chunk]
            )
            x0_rep = x0.repeat(len(chunk), *([1] * (x0.ndim - 1)))
            xt = self.q_sample(x0_rep, t, noise)
            vb, reverse = self._vlb_terms_and_reverse(model_fn(xt, t), x0_rep, xt, t, clip_denoised)
            eps = self.eps_from_x0(xt, t, reverse["pred_x0"])
            columns = torch.tensor(chunk, device=x0.device)
            for key, value in (
                ("vb", vb),
                ("xstart_mse", mean_flat((reverse["pred_x0"] - x0_rep) ** 2)),
                ("mse", mean_flat((eps - noise) ** 2)),
            ):
                results[key][:, columns] = value.reshape(len(chunk), batch).T
        results["prior_bpd"] = self.prior_bpd(x0)
        results["total_bpd"] = results["prior_bpd"] + results["vb"].sum(dim=1)
        return results

    def vlb_bits_per_dim(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, **kwargs: Any) -> Tensor:
        """The variational bound of a batch (B,) in bits/dim: the negative ELBO, an upper bound on
        -log2 p(x0) / D, i.e. `calc_bpd_loop`'s "total_bpd". kwargs (generator, timestep_batch, progress,
        clip_denoised) are passed to it."""
        return self.calc_bpd_loop(model_fn, x0, **kwargs)["total_bpd"]
