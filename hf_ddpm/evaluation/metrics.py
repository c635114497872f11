"""Sample-quality metrics on feature vectors: Fréchet distance (FID, FD_DINOv2), KID and Inception Score.

Everything here works on plain arrays of features or logits, computed in float64; which network produced
them is `hf_ddpm.evaluation.feature_extractors`' business and how the images got there is `hf_ddpm.evaluation`'s.

    >>> from hf_ddpm.evaluation.metrics import FeatureStats, frechet_distance, kernel_inception_distance
    >>> real, fake = FeatureStats.from_features(real_features), FeatureStats.from_features(fake_features)
    >>> fid = frechet_distance(real, fake)
    >>> kid_mean, kid_std = kernel_inception_distance(real.features, fake.features)

Reference statistics are cached as `.npz` files (mu, sigma and the features themselves, which KID needs): see
`FeatureStats.save` / `FeatureStats.load` and `stats_cache_path`, which names a file after a key that identifies
the images and the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_STATS_CACHE = Path("~/.cache/hf_ddpm/stats")
STATS_FORMAT_VERSION = 1


def _as_float64(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def _log_softmax(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """log p(y|x) = l_y - log sum_k exp(l_k), shifted by max_k l_k for stability; float64."""
    logits = _as_float64(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def check_enough_samples(num_samples: int, dim: int, what: str = "samples") -> None:
    """Raise a ValueError unless N >= D + 1, the fewest points whose sample covariance can reach rank D."""
    if num_samples < dim + 1:
        raise ValueError(
            f"need at least D+1 = {dim + 1} {what} for a full-rank covariance of {dim}-dimensional features; "
            f"got {num_samples}"
        )


@dataclass
class FeatureStats:
    """The Gaussian fitted to a set of features, and the features (float32) for KID and re-splitting.

    mu = (1/N) sum_i f_i and sigma = 1/(N-1) sum_i (f_i - mu)(f_i - mu)^T (unbiased, as numpy.cov and every
    FID implementation use).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Fit mu and sigma to (N, D) features; fewer than D + 1 rows raise a ValueError."""
        feats = _as_float64(features)
        if feats.ndim != 2:
            raise ValueError(f"features must be a 2-D array (N, D); got shape {feats.shape}")
        check_enough_samples(*feats.shape)
        return cls(
            mu=feats.mean(axis=0),
            sigma=np.cov(feats, rowvar=False),
            features=feats.astype(np.float32),
        )

    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Write an .npz with `mu`, `sigma`, `features` and a JSON `metadata` string; atomic on POSIX."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            mu=self.mu,
            sigma=self.sigma,
            features=self.features,
            metadata=np.array(json.dumps(dict(metadata or {}), sort_keys=True, default=str)),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path, allow_pickle=False) as data:
            return cls(mu=data["mu"], sigma=data["sigma"], features=data["features"])


def stats_cache_path(cache_dir: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    """`cache_dir/<extractor>-<sha256 of the key JSON>.npz` (evaluation's default cache_dir: DEFAULT_STATS_CACHE)."""
    folder = Path(cache_dir).expanduser()
    blob = json.dumps({**key, "format": STATS_FORMAT_VERSION}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    prefix = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key.get("extractor", "stats")))
    return folder / f"{prefix}-{digest}.npz"


def frechet_distance(
    stats1: FeatureStats | tuple[np.ndarray, np.ndarray], stats2: FeatureStats | tuple[np.ndarray, np.ndarray]
) -> float:
    r"""Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    The trace of the square root is computed from an eigendecomposition in float64 instead of `sqrtm` of the
    non-symmetric product: with S = sigma1^{1/2} (from `eigh`, negative round-off eigenvalues clipped to 0),
    sigma1 sigma2 = S (S sigma2 S) S^{-1} is similar to the symmetric PSD matrix S sigma2 S, so

        tr((sigma1 sigma2)^{1/2}) = sum_k sqrt(lambda_k(S sigma2 S)),   lambda_k clipped to >= 0.

    This is exact for singular covariances too, so the `sqrtm` work-arounds of other implementations
    (discarding tiny imaginary parts, retrying with eps * I added on a singular product) are not needed.
    The result is clipped at 0 against round-off for identical inputs.
    """
    mu1, sigma1 = (stats1.mu, stats1.sigma) if isinstance(stats1, FeatureStats) else stats1
    mu2, sigma2 = (stats2.mu, stats2.sigma) if isinstance(stats2, FeatureStats) else stats2
    mu1, mu2 = _as_float64(mu1), _as_float64(mu2)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    inner_eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(inner_eigvals, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(distance, 0.0))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    r"""Unbiased MMD^2 between samples x (m, D) and y (n, D) with the kernel k(a, b) = (a.b / D + 1)^3.

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n)
    """
    x, y = _as_float64(x), _as_float64(y)
    dim = x.shape[1]
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    m, n = len(x), len(y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray | torch.Tensor,
    features2: np.ndarray | torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std of `polynomial_mmd2_unbiased` over random subsets.

    Each of `num_subsets` rounds draws min(subset_size, N1, N2) rows without replacement from each set; the
    estimate is unbiased, so two samples of one distribution give values scattered around 0 (it can be < 0).
    """
    f1, f2 = _as_float64(features1), _as_float64(features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set; got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd2_unbiased(
            f1[rng.choice(len(f1), size, replace=False)], f2[rng.choice(len(f2), size, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    r"""Inception Score (Salimans et al. 2016): mean and std over `splits` contiguous chunks of

        IS = exp( E_x[ KL(p(y|x) || p(y)) ] ),   p(y|x) = softmax(logits),   p(y) = E_x[p(y|x)] in the chunk.

    1 when every prediction is the same; K when predictions are confident and spread evenly over K classes.
    """
    log_p = _log_softmax(logits)
    scores = []
    for chunk in np.array_split(log_p, min(splits, len(log_p))):
        p = np.exp(chunk)
        log_py = np.log(p.mean(axis=0))
        kl = (p * (chunk - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_histogram_entropy(logits: np.ndarray | torch.Tensor) -> float:
    r"""Entropy of the predicted-class (argmax) histogram over log K; 1.0 = all K classes equally often.

    H = -sum_k h_k log h_k / log K,   h_k = #{x : argmax p(y|x) = k} / N
    """
    logits = _as_float64(logits)
    num_classes = logits.shape[1]
    hist = np.bincount(logits.argmax(axis=1), minlength=num_classes) / len(logits)
    nonzero = hist[hist > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / np.log(num_classes))


def confident_fraction(logits: np.ndarray | torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of samples whose largest softmax probability exceeds t: mean_x [max_k p(k|x) > t]."""
    max_prob = np.exp(_log_softmax(logits).max(axis=1))
    return float((max_prob > threshold).mean())
