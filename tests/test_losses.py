"""hf_ddpm.losses against independent computations: numerical integration and scipy's normal CDF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from hf_ddpm.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

LEVELS = np.arange(256) * 2.0 / 255.0 - 1.0  # the 8-bit grid on [-1, 1]


def test_mean_flat_averages_all_but_the_batch_dimension():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "mean1, logvar1, mean2, logvar2",
    [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (-1.5, 1.2, 0.7, -2.0), (0.01, -9.0, 0.0, -8.5)],
)
def test_normal_kl_matches_numerical_integration(mean1, logvar1, mean2, logvar2):
    p = stats.norm(mean1, math.exp(0.5 * logvar1))
    q = stats.norm(mean2, math.exp(0.5 * logvar2))
    lo, hi = p.ppf(1e-15), p.isf(1e-15)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, epsabs=1e-13, limit=200)
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (mean1, logvar1, mean2, logvar2)))
    assert kl.item() == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_normal_kl_broadcasts_and_accepts_floats():
    mean = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    logvar = torch.full((2, 3), -0.5, dtype=torch.float64)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(mean, logvar, 0.0, 0.0), normal_kl(mean, logvar, zeros, zeros))
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), zeros)
    with pytest.raises(TypeError):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def _scipy_bin_probabilities(mean: float, scale: float) -> np.ndarray:
    """P(bin of each 8-bit level) for N(mean, scale^2), edge bins open, straight from scipy's CDF / SF."""
    lower = np.where(LEVELS < -0.999, -np.inf, LEVELS - 1 / 255)
    upper = np.where(LEVELS > 0.999, np.inf, LEVELS + 1 / 255)
    dist = stats.norm(mean, scale)
    # Take the difference on the side of the mean where it does not cancel (sf(a) - sf(b) above the mean).
    return np.where(LEVELS > mean, dist.sf(lower) - dist.sf(upper), dist.cdf(upper) - dist.cdf(lower))


@pytest.mark.parametrize("mean, scale", [(0.0, 1.0), (0.3, 0.05), (-0.97, 0.004), (1.2, 0.3), (0.5, 5e-4), (0.0, 30.0)])
def test_discretized_log_likelihood_matches_scipy(mean, scale):
    x = torch.tensor(LEVELS)
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, math.log(scale))
    ours = discretized_gaussian_log_likelihood(x, means, log_scales).numpy()
    probabilities = _scipy_bin_probabilities(mean, scale)
    finite = probabilities > 1e-290
    np.testing.assert_allclose(ours[finite], np.log(probabilities[finite]), rtol=1e-9, atol=1e-9)
    # The 256 bins partition the real line.
    assert np.exp(ours).sum() == pytest.approx(1.0, abs=1e-12)


def test_discretized_log_likelihood_far_tails_are_exact_and_differentiable():
    # Bins thousands of standard deviations from the mean: probabilities underflow float64, their logs do not.
    x = torch.tensor([-1.0, -1.0 + 2 / 255, 0.0, 1.0 - 2 / 255, 1.0], dtype=torch.float64)
    means = torch.tensor([0.8, 0.9, -0.5, -0.9, -0.2], dtype=torch.float64, requires_grad=True)
    log_scales = torch.full((5,), math.log(1e-3), dtype=torch.float64, requires_grad=True)
    ours = discretized_gaussian_log_likelihood(x, means, log_scales)
    z_lo = (x.numpy() - 1 / 255 - means.detach().numpy()) / 1e-3
    z_hi = (x.numpy() + 1 / 255 - means.detach().numpy()) / 1e-3
    # log(P(Z < b) - P(Z < a)) below the mean, log(P(Z > a) - P(Z > b)) above it, from scipy's log CDF / SF.
    log_cdf_hi, log_cdf_lo = stats.norm.logcdf(z_hi), stats.norm.logcdf(z_lo)
    log_sf_hi, log_sf_lo = stats.norm.logsf(z_hi), stats.norm.logsf(z_lo)
    with np.errstate(divide="ignore"):  # each formula underflows on the other side, where it is not used
        below = log_cdf_hi + np.log(-np.expm1(log_cdf_lo - log_cdf_hi))
        above = log_sf_lo + np.log(-np.expm1(log_sf_hi - log_sf_lo))
    inner = np.where(z_lo > 0, above, below)
    expected = np.concatenate([[log_cdf_hi[0]], inner[1:4], [log_sf_lo[4]]])
    np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-9)
    assert (ours < -1e5).all()
    ours.sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()


def test_discretized_log_likelihood_edge_gradients_are_finite_in_float32():
    x = torch.tensor(LEVELS, dtype=torch.float32)
    means = torch.zeros_like(x, requires_grad=True)
    log_scales = torch.full_like(x, math.log(0.01), requires_grad=True)
    discretized_gaussian_log_likelihood(x, means, log_scales).sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()
    float64 = discretized_gaussian_log_likelihood(x.double(), means.double(), log_scales.double())
    float32 = discretized_gaussian_log_likelihood(x, means, log_scales)
    torch.testing.assert_close(float32.double(), float64, rtol=1e-4, atol=1e-3)
