"""Timestep samplers: uniform warm-up, the second-moment distribution, unbiasedness and exact resumption."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from hf_ddpm.timestep_samplers import (
    LossSecondMomentSampler,
    UniformSampler,
    create_timestep_sampler,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _warm_up(sampler: LossSecondMomentSampler, losses_per_t: np.ndarray, seed: int = 0) -> None:
    """Feed every timestep history_per_term noisy losses (shuffled batches) around losses_per_t."""
    rng = np.random.default_rng(seed)
    timesteps = np.repeat(np.arange(sampler.num_timesteps), sampler.history_per_term)
    rng.shuffle(timesteps)
    losses = losses_per_t[timesteps] * rng.uniform(0.5, 1.5, size=timesteps.shape)
    for batch in np.array_split(np.arange(timesteps.size), 7):
        sampler.update(torch.from_numpy(timesteps[batch]), torch.from_numpy(losses[batch]).float())


def test_uniform_sampler_is_uniform_with_unit_weights():
    sampler = UniformSampler(10)
    timesteps, weights = sampler.sample(100_000, "cpu", generator=_generator())
    assert timesteps.dtype == torch.int64 and weights.dtype == torch.float32
    assert timesteps.shape == weights.shape == (100_000,)
    assert torch.equal(weights, torch.ones(100_000))
    counts = torch.bincount(timesteps, minlength=10).double()
    assert counts.sum() == 100_000 and ((counts - 10_000).abs() < 500).all()  # 5 standard deviations
    again, _ = sampler.sample(100_000, torch.device("cpu"), generator=_generator())
    assert torch.equal(timesteps, again)
    sampler.update(timesteps[:5], torch.ones(5))  # ignored
    assert sampler.state_dict() == {}
    sampler.load_state_dict({})


def test_second_moment_sampler_is_uniform_until_every_history_is_full():
    sampler = LossSecondMomentSampler(5, history_per_term=3)
    for t in range(4):
        sampler.update(torch.full((3,), t), torch.full((3,), 10.0**t))
    sampler.update(torch.tensor([4, 4]), torch.tensor([1e6, 1e6]))  # t = 4 has 2 of its 3 losses
    assert not sampler.warmed_up()
    np.testing.assert_array_equal(sampler.probabilities(), np.full(5, 0.2))
    _, weights = sampler.sample(1000, "cpu", generator=_generator())
    assert torch.equal(weights, torch.ones(1000))
    sampler.update(torch.tensor([4]), torch.tensor([1e6]))
    assert sampler.warmed_up()
    assert sampler.probabilities()[4] > 0.9


def test_second_moment_probabilities_follow_the_last_losses():
    num_timesteps, history, uniform_prob = 6, 4, 0.01
    sampler = LossSecondMomentSampler(num_timesteps, history_per_term=history, uniform_prob=uniform_prob)
    rng = np.random.default_rng(1)
    seen: list[list[float]] = [[] for _ in range(num_timesteps)]
    for _ in range(5):  # more losses than the history keeps, with duplicated timesteps within a batch
        timesteps = rng.integers(0, num_timesteps, size=9)
        losses = rng.uniform(0.0, 3.0, size=9) * (timesteps + 1)
        sampler.update(torch.from_numpy(timesteps), torch.from_numpy(losses))
        for t, loss in zip(timesteps, losses, strict=True):
            seen[t].append(loss)
    for t in range(num_timesteps):  # make sure every history is full, t = 0 with zero losses
        extra = [0.0] * history if t == 0 else [float(t)] * max(0, history - len(seen[t]))
        sampler.update(torch.full((len(extra),), t), torch.tensor(extra, dtype=torch.float64))
        seen[t].extend(extra)
    root_second_moment = np.array([np.sqrt(np.mean(np.square(losses[-history:]))) for losses in seen])
    expected = (1 - uniform_prob) * root_second_moment / root_second_moment.sum() + uniform_prob / num_timesteps
    np.testing.assert_allclose(sampler.probabilities(), expected, rtol=1e-12)
    assert sampler.probabilities()[0] == pytest.approx(uniform_prob / num_timesteps)


def test_second_moment_weights_make_the_loss_estimate_unbiased():
    num_timesteps = 20
    losses_per_t = np.linspace(0.05, 3.0, num_timesteps) ** 2
    sampler = LossSecondMomentSampler(num_timesteps, history_per_term=5, uniform_prob=0.05)
    _warm_up(sampler, losses_per_t)
    probabilities = sampler.probabilities()
    assert probabilities.std() > 0.01  # far from uniform
    # Exactly: E_p[w(t) L_t] = sum_t p(t) L_t / (T p(t)) = mean_t L_t.
    timesteps, weights = sampler.sample(200_000, "cpu", generator=_generator(3))
    unique, first = np.unique(timesteps.numpy(), return_index=True)
    assert len(unique) == num_timesteps
    weight_per_t = weights.double().numpy()[first]
    assert float(np.sum(probabilities * weight_per_t * losses_per_t)) == pytest.approx(losses_per_t.mean(), rel=1e-6)
    # And by Monte Carlo, within 5 standard errors.
    estimates = weights.double().numpy() * losses_per_t[timesteps.numpy()]
    standard_error = estimates.std() / np.sqrt(estimates.size)
    assert abs(estimates.mean() - losses_per_t.mean()) < 5 * standard_error
    # The importance weights lower the estimator's variance below uniform sampling's.
    assert estimates.var() < losses_per_t.var()


def test_state_dict_round_trip_reproduces_samples():
    sampler = LossSecondMomentSampler(30, history_per_term=4)
    _warm_up(sampler, np.linspace(1.0, 2.0, 30))
    sampler.update(torch.tensor([3, 3, 7]), torch.tensor([5.0, 6.0, 7.0]))  # partly overwritten ring buffers
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    restored = LossSecondMomentSampler(30, history_per_term=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    np.testing.assert_array_equal(restored.probabilities(), sampler.probabilities())
    for a, b in zip(sampler.sample(64, "cpu", _generator(5)), restored.sample(64, "cpu", _generator(5)), strict=True):
        assert torch.equal(a, b)
    # Identical updates keep them identical (what every rank of a distributed run relies on).
    for s in (sampler, restored):
        s.update(torch.tensor([0, 29, 0]), torch.tensor([9.0, 0.5, 8.0]))
    np.testing.assert_array_equal(restored.probabilities(), sampler.probabilities())
    with pytest.raises(ValueError, match="does not fit"):
        LossSecondMomentSampler(30, history_per_term=5).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="no state"):
        UniformSampler(30).load_state_dict(sampler.state_dict())


def test_factory_builds_each_sampler_and_rejects_unknown_names():
    assert type(create_timestep_sampler("uniform", 100)) is UniformSampler
    sampler = create_timestep_sampler("loss-second-moment", 100)
    assert isinstance(sampler, LossSecondMomentSampler) and sampler.num_timesteps == 100
    with pytest.raises(ValueError, match="uniform, loss-second-moment"):
        create_timestep_sampler("importance", 100)
