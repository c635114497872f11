"""Training-timestep samplers: which t each training example is noised to, and the weight that keeps the loss
unbiased (improved-diffusion's resample.py, Nichol & Dhariwal 2021, sec. 3.3).

The training objective is an average over timesteps, L = (1/T) sum_t L_t. A sampler draws t ~ p(t) and returns
the importance weight w(t) = 1 / (T p(t)), so that E_{t~p}[w(t) L_t] = sum_t p(t) L_t / (T p(t)) = L for any p
with full support: multiply each per-sample loss by its weight before averaging.

    >>> sampler = create_timestep_sampler("loss-second-moment", num_timesteps=1000)
    >>> t, weights = sampler.sample(batch_size=64, device="cuda", generator=torch.Generator().manual_seed(0))
    >>> loss = (weights * per_sample_loss).mean()
    >>> sampler.update(gathered_t, gathered_per_sample_loss)   # losses of all processes, before weighting

Sampling runs on the CPU (the distribution has only T entries), so a seeded CPU generator gives the same
timesteps on every device; the results are then moved to `device`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class TimestepSampler:
    """Base class: a distribution p over {0, ..., T-1}, from which `sample` draws with importance weights.

    Subclasses implement `probabilities`; those that adapt to the losses set `adaptive` and override `update`,
    `state_dict` and `load_state_dict`.
    """

    adaptive = False  # whether p changes with the losses: then step k's timesteps can only be drawn after step k-1

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> np.ndarray:
        """p(t) for t = 0, ..., T-1: a (T,) float64 array with positive entries summing to one."""
        raise NotImplementedError

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw `batch_size` timesteps t ~ p independently, with weights w(t) = 1 / (T p(t)).

        Args:
            generator: a CPU generator (or None for torch's global one).
        Returns:
            (timesteps, weights): a (B,) int64 tensor and a (B,) float32 tensor, both on `device`.
        """
        probabilities = torch.from_numpy(self.probabilities())
        timesteps = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probabilities[timesteps])
        return timesteps.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, timesteps: Tensor, losses: Tensor) -> None:
        """Record per-sample losses (B,) at timesteps (B,); samplers that do not adapt ignore them.

        In distributed training pass the timesteps and losses gathered from ALL processes (e.g. with
        `accelerator.gather`), in the same order on every rank, so that every rank keeps an identical state
        and hence samples from an identical distribution. Pass the losses before multiplying by the sampler's
        weights.
        """

    def state_dict(self) -> dict[str, Any]:
        """The sampler's adaptive state (plain tensors), for exact resumption; empty if it has none."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict`."""
        if state_dict:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state_dict)}")


class UniformSampler(TimestepSampler):
    """p(t) = 1/T: Ho et al.'s Algorithm 1. All weights are 1."""

    def probabilities(self) -> np.ndarray:
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)


class LossSecondMomentSampler(TimestepSampler):
    """Importance sampling by the loss' second moment (Nichol & Dhariwal 2021, eq. 18), the
    variance-minimising choice for an estimator of the average loss:

        p(t) ∝ sqrt(E[L_t^2]),  estimated from the last `history_per_term` losses seen at each t,

    then mixed with the uniform distribution, p <- (1 - uniform_prob) p + uniform_prob / T, so that every t
    keeps a positive probability and a bounded weight. Until every t has `history_per_term` recorded losses
    (the warm-up) p is uniform.
    """

    adaptive = True

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be positive, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        # A ring buffer per timestep: the n-th loss seen at t goes to column n % history_per_term.
        self._history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self._counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        """Whether every timestep has a full history (before that, sampling is uniform)."""
        return bool((self._counts >= self.history_per_term).all())

    def probabilities(self) -> np.ndarray:
        uniform = np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        if not self.warmed_up():
            return uniform
        root_second_moment = np.sqrt(np.mean(self._history**2, axis=1))
        total = root_second_moment.sum()
        if total == 0.0:  # all recorded losses are zero: no information, stay uniform
            return uniform
        return (1.0 - self.uniform_prob) * root_second_moment / total + self.uniform_prob * uniform

    def update(self, timesteps: Tensor, losses: Tensor) -> None:
        for t, loss in zip(timesteps.tolist(), losses.detach().double().tolist(), strict=True):
            self._history[t, self._counts[t] % self.history_per_term] = loss
            self._counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": torch.from_numpy(self._history.copy()),
            "counts": torch.from_numpy(self._counts.copy()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict["history"].numpy()
        counts = state_dict["counts"].numpy()
        if history.shape != self._history.shape or counts.shape != self._counts.shape:
            raise ValueError(
                f"state for history {tuple(history.shape)} does not fit this sampler's "
                f"{tuple(self._history.shape)} (num_timesteps, history_per_term)"
            )
        self._history = history.astype(np.float64, copy=True)
        self._counts = counts.astype(np.int64, copy=True)


TIMESTEP_SAMPLERS: dict[str, type[TimestepSampler]] = {
    "uniform": UniformSampler,
    "loss-second-moment": LossSecondMomentSampler,
}


def create_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    """The sampler called `name` ("uniform" or "loss-second-moment") over num_timesteps, default settings."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; valid: {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](num_timesteps)
