"""Metrics on tensors (against independent formulas) and the feature extractors' networks and loading."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from transformers import Dinov2Config, Dinov2Model

from hf_ddpm.data import digits_images, digits_labels
from hf_ddpm.errors import MissingWeightsError
from hf_ddpm.evaluation import feature_extractors
from hf_ddpm.evaluation.digits_classifier import DEFAULT_CONFIG, DEFAULT_WEIGHTS, heldout_split
from hf_ddpm.evaluation.feature_extractors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_WEIGHTS_FILE,
    DigitsFeatures,
    DINOv2Features,
    InceptionV3Features,
    build_feature_extractor,
    pil_resize,
)
from hf_ddpm.evaluation.inception import InceptionV3, load_inception_v3, resize_bilinear_tf1
from hf_ddpm.evaluation.metrics import (
    FeatureStats,
    class_histogram_entropy,
    confident_fraction,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    polynomial_mmd2_unbiased,
    stats_cache_path,
)


def _gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n draws of one correlated Gaussian per (dim, shift): the mixing matrix is fixed, the draws vary with seed."""
    mixing = np.random.default_rng(dim).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing + shift


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = _gaussian(300, 12, seed=0), _gaussian(250, 12, seed=1, shift=0.3)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b))
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)  # plain (mu, sigma)


def test_frechet_distance_of_identical_sets_is_zero():
    stats = FeatureStats.from_features(_gaussian(100, 20, seed=2))
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_shifted_gaussians_is_squared_shift():
    sigma = np.cov(_gaussian(200, 6, seed=3), rowvar=False)
    mu = np.arange(6.0)
    delta = np.array([0.5, -1.0, 2.0, 0.0, 0.25, 3.0])
    assert frechet_distance((mu, sigma), (mu + delta, sigma)) == pytest.approx(delta @ delta, rel=1e-9)


def test_frechet_distance_with_singular_covariances_matches_closed_form():
    # Diagonal covariances: d^2 = sum_k (sqrt(a_k) - sqrt(b_k))^2; zeros make both covariances singular.
    a, b = np.array([0.0, 1.0, 4.0, 0.0]), np.array([1.0, 0.0, 9.0, 0.0])
    got = frechet_distance((np.zeros(4), np.diag(a)), (np.zeros(4), np.diag(b)))
    assert got == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def test_too_few_samples_for_a_full_rank_covariance():
    with pytest.raises(ValueError, match=r"need at least D\+1 = 9 samples .* got 8"):
        FeatureStats.from_features(np.zeros((8, 8)))


def test_feature_stats_round_trip_and_cache_key(tmp_path):
    stats = FeatureStats.from_features(_gaussian(30, 4, seed=4))
    key = {"extractor": "x", "dataset": "d", "split": "train", "num_images": 30}
    path = stats_cache_path(tmp_path, key)
    stats.save(path, metadata=key)
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert json.loads(str(np.load(path)["metadata"])) == key
    assert stats_cache_path(tmp_path, {**key, "split": "test"}) != path


# ------------------------------------------------------------------------------------------------------------ KID


def _mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimator written out term by term."""
    dim = x.shape[1]

    def k(a, b):
        return (a @ b / dim + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_direct_formula():
    x, y = _gaussian(15, 5, seed=5), _gaussian(12, 5, seed=6, shift=0.5)
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
    # One subset as large as both sets is a permutation of each: the same estimate, with zero spread.
    x12 = x[:12]
    mean, std = kernel_inception_distance(x12, y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(_mmd2_direct(x12, y), rel=1e-10) and std == 0.0


def test_kid_is_unbiased():
    # Two samples of one distribution: the unbiased estimate averages to 0 (the biased V-statistic does not).
    trials, m, dim = 400, 20, 4
    unbiased, biased = [], []
    for trial in range(trials):
        x, y = _gaussian(m, dim, seed=10 + 2 * trial), _gaussian(m, dim, seed=11 + 2 * trial)
        unbiased.append(polynomial_mmd2_unbiased(x, y))
        k = (np.concatenate([x, y]) @ np.concatenate([x, y]).T / dim + 1) ** 3
        biased.append(k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean())
    standard_error = np.std(unbiased) / np.sqrt(trials)
    assert abs(np.mean(unbiased)) < 4 * standard_error
    assert np.mean(biased) > 4 * np.std(biased) / np.sqrt(trials)
    shifted = kernel_inception_distance(_gaussian(200, dim, 1), _gaussian(200, dim, 2, shift=1.0), num_subsets=5)
    assert shifted[0] > 10 * standard_error


# ------------------------------------------------------------------------------------- IS and the digits summaries


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
    one_hot = 50.0 * np.eye(10)[np.arange(100) % 10]
    mean, std = inception_score(one_hot, splits=5)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_matches_direct_formula():
    logits = np.random.default_rng(7).normal(size=(60, 7)) * 2
    scores = []
    for chunk in np.array_split(logits, 3):
        p = scipy.special.softmax(chunk, axis=1)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, p.mean(axis=0)) for row in p])))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)


def test_class_histogram_entropy_and_confidence():
    assert class_histogram_entropy(np.eye(10)[np.arange(50) % 10]) == pytest.approx(1.0)
    assert class_histogram_entropy(np.eye(10)[np.zeros(50, dtype=int)]) == pytest.approx(0.0)
    logits = np.array([[10.0, 0.0], [0.1, 0.0], [0.0, 3.0]])  # max softmax 0.99995, 0.52, 0.95
    assert confident_fraction(logits, threshold=0.9) == pytest.approx(2 / 3)


# -------------------------------------------------------------------------------------------------------- resizing


def test_tf1_bilinear_resize_on_hand_worked_images():
    # TF 1.x samples source coordinate s_i = i * n_in / n_out (no half-pixel offset), and a neighbour past the
    # last pixel is clamped to it. 2 -> 4: s = 0, 1/2, 1, 3/2, so a row [a, b] becomes [a, (a + b)/2, b, b].
    image = torch.tensor([[0.0, 4.0], [8.0, 20.0]]).reshape(1, 1, 2, 2)
    expected = torch.tensor(
        [[0.0, 2.0, 4.0, 4.0], [4.0, 8.0, 12.0, 12.0], [8.0, 14.0, 20.0, 20.0], [8.0, 14.0, 20.0, 20.0]]
    )
    torch.testing.assert_close(resize_bilinear_tf1(image, 4)[0, 0], expected)
    # 2 -> 3: s = 0, 2/3, 4/3, so [a, b] becomes [a, a/3 + 2b/3, b].
    image = torch.tensor([[0.0, 3.0], [3.0, 12.0]]).reshape(1, 1, 2, 2)
    expected = torch.tensor([[0.0, 2.0, 3.0], [2.0, 20.0 / 3.0, 9.0], [3.0, 9.0, 12.0]])
    torch.testing.assert_close(resize_bilinear_tf1(image, 3)[0, 0], expected)
    # 3 -> 2: s = 0, 3/2, so [a, b, c] becomes [a, (b + c)/2]: the first pixel is dropped from the average.
    image = torch.tensor([[1.0, 2.0, 6.0], [3.0, 5.0, 7.0], [9.0, 0.0, 4.0]]).reshape(1, 1, 3, 3)
    torch.testing.assert_close(resize_bilinear_tf1(image, 2)[0, 0], torch.tensor([[1.0, 4.0], [6.0, 4.0]]))


def test_tf1_bilinear_resize_is_exact_on_affine_images():
    # Bilinear interpolation reproduces f(y, x) = a + b y + c x at the source point, clamped to the last pixel.
    rng = np.random.default_rng(3)
    a, b, c = (rng.normal(size=(2, 3, 1, 1)) for _ in range(3))
    rows, cols = np.arange(5).reshape(5, 1), np.arange(7).reshape(1, 7)
    image = torch.from_numpy(a + b * rows + c * cols).float()
    s = np.arange(11)
    y, x = np.minimum(s * 5 / 11, 4).reshape(11, 1), np.minimum(s * 7 / 11, 6).reshape(1, 11)
    expected = torch.from_numpy(a + b * y + c * x).float()
    torch.testing.assert_close(resize_bilinear_tf1(image, 11), expected, rtol=0, atol=1e-5)
    square = image[..., :5]
    torch.testing.assert_close(resize_bilinear_tf1(square, 5), square)  # same size: identity


def test_pil_resize_works_in_float():
    image = (torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) * 4).to(torch.uint8)
    out = pil_resize(image, 16, PIL.Image.Resampling.BILINEAR)
    reference = PIL.Image.fromarray(image[0, 0].numpy().astype(np.float32), mode="F").resize((16, 16), 2)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out[0, 0].numpy(), np.asarray(reference))


# ------------------------------------------------------------------------------------------------------- Inception


def test_inception_builds_randomly_and_loads_its_state_dict_from_the_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    network = InceptionV3()
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)  # grayscale: repeated to RGB
    out = InceptionV3Features(network)(images)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["features"].dtype == torch.float32 and torch.isfinite(out["logits"]).all()

    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(network.state_dict(), checkpoints / INCEPTION_WEIGHTS_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loaded = build_feature_extractor("inception")
    assert loaded.name.startswith("inception-2015-12-05-")
    torch.testing.assert_close(loaded(images)["logits"], out["logits"], rtol=0, atol=0)


def test_missing_inception_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(feature_extractors.hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError) as err:
        build_feature_extractor("inception")
    message = str(err.value)
    assert "\n" not in message
    assert f"{tmp_path}/hub/checkpoints" in message and INCEPTION_WEIGHTS_FILE in message
    assert "--inception_weights" in message
    with pytest.raises(MissingWeightsError, match="--inception_weights .*: no such file"):
        build_feature_extractor("inception", inception_weights=tmp_path / "nope.pth")


def test_wrong_inception_state_dict_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="is not the FID InceptionV3 state_dict"):
        load_inception_v3(tmp_path / "w.pth")


# ---------------------------------------------------------------------------------------------------------- DINOv2


def test_dinov2_wiring_with_a_tiny_random_model():
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14
    )
    extractor = DINOv2Features(Dinov2Model(config), image_size=28)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    out = extractor(images)
    assert out["features"].shape == (3, 16) and extractor.feature_dim == 16
    # The CLS token after the final layer norm, of the ImageNet-normalised 28x28 bicubic resize.
    x = pil_resize(images.expand(-1, 3, -1, -1), 28, PIL.Image.Resampling.BICUBIC) / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = extractor.model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(out["features"], expected)


def test_missing_dinov2_offline_gives_a_clear_error():
    with pytest.raises(MissingWeightsError) as err:
        build_feature_extractor("dinov2", dinov2_model="facebook/dinov2-base")
    message = str(err.value)
    assert "facebook/dinov2-base" in message and "--dinov2_model" in message and "\n" not in message


# ------------------------------------------------------------------------------------------- digits classifier


def test_shipped_digits_classifier_is_small_and_accurate_on_held_out_digits():
    record = json.loads(DEFAULT_CONFIG.read_text())
    assert DEFAULT_WEIGHTS.stat().st_size < 300 * 1024
    assert record["heldout_accuracy"] >= 0.97
    _, heldout = heldout_split(record["training"]["seed"], record["heldout_fraction"])
    extractor = DigitsFeatures()
    images, labels = torch.from_numpy(digits_images(16)), digits_labels()
    logits = extractor(images[heldout])["logits"]
    assert (logits.argmax(1).numpy() == labels[heldout]).mean() >= 0.95
    # Other resolutions are resized to 16 inside the extractor.
    logits32 = extractor(torch.from_numpy(digits_images(32))[heldout])["logits"]
    assert (logits32.argmax(1).numpy() == labels[heldout]).mean() >= 0.9


def test_digits_summaries_on_real_digits_and_on_noise():
    extractor = DigitsFeatures()
    real = extractor(torch.from_numpy(digits_images(16)))
    assert class_histogram_entropy(real["logits"]) > 0.99
    assert confident_fraction(real["logits"]) > 0.9
    generator = torch.Generator().manual_seed(0)
    uniform = torch.randint(0, 256, (200, 1, 16, 16), generator=generator, dtype=torch.uint8)
    gaussian = ((torch.randn(200, 1, 16, 16, generator=generator) + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    for noise in (uniform, gaussian):
        assert confident_fraction(extractor(noise)["logits"]) < 0.1
    with pytest.raises(ValueError, match="grayscale"):
        extractor(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
