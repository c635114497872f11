"""hf_ddpm.scheduler.DDPMScheduler against independent computations: simulating the forward chain, Bayes' rule
on a grid, scipy's normal CDF, closed forms written out in numpy, and diffusers' own DDPMScheduler."""

from __future__ import annotations

import json
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from scipy import stats

from hf_ddpm.losses import mean_flat, normal_kl
from hf_ddpm.scheduler import DDPMScheduler

# A short schedule whose chain reaches noise (abar_{T-1} ~ 0.006), written out independently of the scheduler.
T = 50
BETAS = np.linspace(1e-3, 0.2, T)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
ALPHAS_CUMPROD_PREV = np.concatenate([[1.0], ALPHAS_CUMPROD[:-1]])
SNR = ALPHAS_CUMPROD / (1.0 - ALPHAS_CUMPROD)
POSTERIOR_VARIANCE = BETAS * (1.0 - ALPHAS_CUMPROD_PREV) / (1.0 - ALPHAS_CUMPROD)
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def short_scheduler(**config) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2, clip_sample=False, **config)


def broadcast(values: np.ndarray, t: np.ndarray, ndim: int) -> np.ndarray:
    return values[t].reshape(-1, *([1] * (ndim - 1)))


def noisy_batch(seed: int = 0, shape=(T, 3, 4, 4)):
    """x0 in [-1, 1], eps, t = 0..T-1 and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, all float64 numpy."""
    rng = np.random.default_rng(seed)
    x0 = rng.integers(0, 256, size=shape) * 2.0 / 255.0 - 1.0
    eps = rng.standard_normal(shape)
    t = np.arange(shape[0]) % T
    ab = broadcast(ALPHAS_CUMPROD, t, len(shape))
    xt = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps
    return x0, eps, t, xt


def targets_for(x0_hat: np.ndarray, xt: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """The epsilon / sample / v outputs that all imply the x_0 prediction x0_hat at x_t."""
    ab = broadcast(ALPHAS_CUMPROD, t, xt.ndim)
    eps_hat = (xt - np.sqrt(ab) * x0_hat) / np.sqrt(1.0 - ab)
    return {
        "epsilon": eps_hat,
        "sample": x0_hat,
        "v_prediction": np.sqrt(ab) * eps_hat - np.sqrt(1.0 - ab) * x0_hat,
    }


def tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# ----------------------------------------------------------------------------------------------------------
# Tables and compatibility with diffusers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "sigmoid"},
        {"trained_betas": np.linspace(1e-4, 0.05, 1000).tolist()},
    ],
    ids=["linear", "scaled_linear", "cosine", "sigmoid", "trained"],
)
def test_float64_betas_agree_with_the_parent(config):
    ours = DDPMScheduler(**config)
    assert ours.tables.betas.dtype == torch.float64
    torch.testing.assert_close(ours.tables.betas.float(), ours.betas, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(ours.tables.alphas_cumprod.float(), ours.alphas_cumprod, rtol=1e-4, atol=1e-6)


def test_zero_terminal_snr_rescaling_in_float64():
    ours = DDPMScheduler(rescale_betas_zero_snr=True)
    # Lin et al. 2024: sqrt(abar) is shifted to 0 at the last step and scaled back to its value at the first.
    original = np.sqrt(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    expected = (original - original[-1]) * original[0] / (original[0] - original[-1])
    np.testing.assert_allclose(ours.tables.sqrt_alphas_cumprod.numpy(), expected, rtol=1e-10, atol=1e-15)
    assert ours.tables.alphas_cumprod[-1] < 1e-30 and ours.tables.snr[-1] < 1e-30
    # The parent does the same in float32, which keeps only ~3 digits of the smallest betas.
    torch.testing.assert_close(ours.tables.betas.float(), ours.betas, rtol=2e-3, atol=5e-6)


def test_float64_tables_match_numpy():
    tables = short_scheduler().tables
    for name, expected in [
        ("betas", BETAS),
        ("alphas_cumprod", ALPHAS_CUMPROD),
        ("alphas_cumprod_prev", ALPHAS_CUMPROD_PREV),
        ("snr", SNR),
        ("posterior_variance", POSTERIOR_VARIANCE),
        ("log_betas", np.log(BETAS)),
    ]:
        np.testing.assert_allclose(getattr(tables, name).numpy(), expected, rtol=1e-13, err_msg=name)
    clipped = np.log(np.concatenate([[POSTERIOR_VARIANCE[1]], POSTERIOR_VARIANCE[1:]]))
    np.testing.assert_allclose(tables.posterior_log_variance_clipped.numpy(), clipped, rtol=1e-13)
    np.testing.assert_allclose(short_scheduler().snr(torch.arange(T)).numpy(), SNR.astype(np.float32), rtol=1e-6)


def test_config_round_trips_through_plain_diffusers(tmp_path):
    ours = DDPMScheduler(
        prediction_type="v_prediction", variance_type="learned_range", beta_schedule="squaredcos_cap_v2"
    )
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMScheduler"
    plain = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert type(plain) is diffusers.DDPMScheduler
    public = {key: value for key, value in ours.config.items() if not key.startswith("_")}
    assert {key: plain.config[key] for key in public} == public
    assert set(public) == {key for key in diffusers.DDPMScheduler().config if not key.startswith("_")}
    back = DDPMScheduler.from_config(plain.config)
    assert type(back) is DDPMScheduler and {key: back.config[key] for key in public} == public
    torch.testing.assert_close(back.tables.betas, ours.tables.betas, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"prediction_type": "v_prediction", "variance_type": "learned_range"},
        {"variance_type": "fixed_large"},
    ],
)
@pytest.mark.parametrize("num_inference_steps", [None, 20])
def test_step_is_the_parents_bit_for_bit(config, num_inference_steps):
    ours, parent = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    channels = 6 if config.get("variance_type") == "learned_range" else 3
    if num_inference_steps:
        ours.set_timesteps(num_inference_steps)
        parent.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, parent.timesteps)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps[:3].tolist() + ours.timesteps[-2:].tolist():
        output = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(t))
        a = ours.step(output, t, sample, generator=torch.Generator().manual_seed(1))
        b = parent.step(output, t, sample, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.pred_original_sample, b.pred_original_sample)
        sample = a.prev_sample


# ----------------------------------------------------------------------------------------------------------
# Forward process and posterior
# ----------------------------------------------------------------------------------------------------------


def test_q_mean_variance_matches_simulating_the_one_step_chain():
    scheduler = short_scheduler()
    x0 = np.array([-0.8, 0.1, 0.9])
    mean, variance, log_variance = scheduler.q_mean_variance(torch.from_numpy(np.tile(x0, (T, 1))), torch.arange(T))
    torch.testing.assert_close(log_variance, variance.log())
    # Monte Carlo: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, 100k chains, within 5 standard errors.
    rng = np.random.default_rng(0)
    n = 100_000
    x = np.tile(x0, (n, 1))
    for t, beta in enumerate(BETAS):
        x = np.sqrt(1.0 - beta) * x + np.sqrt(beta) * rng.standard_normal(x.shape)
        var = variance[t].numpy()
        assert (np.abs(x.mean(axis=0) - mean[t].numpy()) < 5 * np.sqrt(var / n)).all()
        assert (np.abs(x.var(axis=0) - var) < 5 * var * np.sqrt(2.0 / n)).all()
    # Exactly, by the moment recursion m_t = sqrt(1 - beta_t) m_{t-1}, v_t = (1 - beta_t) v_{t-1} + beta_t.
    m, v = x0.copy(), 0.0
    for t, beta in enumerate(BETAS):
        m, v = np.sqrt(1.0 - beta) * m, (1.0 - beta) * v + beta
        np.testing.assert_allclose(mean[t].numpy(), m, rtol=1e-12)
        np.testing.assert_allclose(variance[t].numpy(), v, rtol=1e-12)


def test_q_sample_is_the_closed_form_and_the_parents_add_noise():
    x0, eps, t, xt = noisy_batch()
    scheduler = short_scheduler()
    np.testing.assert_allclose(scheduler.q_sample(*tensors(x0), torch.from_numpy(t), *tensors(eps)).numpy(), xt)
    default = DDPMScheduler()
    x0, eps = (torch.from_numpy(a).float() for a in (x0, eps))
    t = torch.tensor([0, 1, 10, 500, 999] * 10)
    torch.testing.assert_close(default.q_sample(x0, t, eps), default.add_noise(x0, eps, t), rtol=0, atol=1e-5)
    bf16 = default.q_sample(x0.bfloat16(), t, eps.bfloat16())
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("t", [1, 4, 25, 49])
def test_q_posterior_matches_bayes_rule_on_a_grid(t):
    x0, xt = 0.3, -0.4
    grid = np.linspace(-8.0, 8.0, 1_600_001)  # values of x_{t-1}
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0)
    log_density = stats.norm.logpdf(xt, np.sqrt(1.0 - BETAS[t]) * grid, np.sqrt(BETAS[t])) + stats.norm.logpdf(
        grid, np.sqrt(ALPHAS_CUMPROD[t - 1]) * x0, np.sqrt(1.0 - ALPHAS_CUMPROD[t - 1])
    )
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    grid_mean = np.sum(weights * grid)
    grid_variance = np.sum(weights * (grid - grid_mean) ** 2)
    mean, variance, log_variance = short_scheduler().q_posterior_mean_variance(
        torch.tensor([[x0]], dtype=torch.float64),
        torch.tensor([[xt]], dtype=torch.float64),
        torch.tensor([t]),
    )
    assert mean.item() == pytest.approx(grid_mean, rel=1e-8, abs=1e-10)
    assert variance.item() == pytest.approx(grid_variance, rel=1e-7)
    assert log_variance.item() == pytest.approx(math.log(grid_variance), abs=1e-7)


def test_q_posterior_at_t0_is_a_point_mass_with_clipped_log_variance():
    x0 = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    mean, variance, log_variance = short_scheduler().q_posterior_mean_variance(x0, x0 + 0.01, torch.tensor([0]))
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all()
    np.testing.assert_allclose(log_variance.numpy(), math.log(POSTERIOR_VARIANCE[1]), rtol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# Parameterisations and the reverse process
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_conversions_round_trip(prediction_type):
    x0, eps, t, xt = noisy_batch()
    scheduler = short_scheduler(prediction_type=prediction_type)
    x0_, eps_, xt_, t_ = *tensors(x0, eps, xt), torch.from_numpy(t)
    target = scheduler.training_target(x0_, eps_, t_)
    expected = targets_for(x0, xt, t)[prediction_type]  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scheduler.predict_x0(target, xt_, t_).numpy(), x0, atol=1e-9)
    np.testing.assert_allclose(scheduler.predict_eps(target, xt_, t_).numpy(), eps, atol=1e-9)
    np.testing.assert_allclose(scheduler.x0_from_eps(xt_, t_, eps_).numpy(), x0, atol=1e-9)
    np.testing.assert_allclose(scheduler.eps_from_x0(xt_, t_, x0_).numpy(), eps, atol=1e-9)
    if prediction_type == "v_prediction":
        velocity = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2).get_velocity(
            x0_.float(), eps_.float(), t_
        )
        torch.testing.assert_close(target.float(), velocity, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_is_the_distribution_step_samples_from(prediction_type, variance_type):
    config = {"prediction_type": prediction_type, "variance_type": variance_type}
    ours = short_scheduler(**config)
    parent = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2, clip_sample=False, **config)
    rng = np.random.default_rng(4)
    for t in [1, 7, 30, 49]:
        xt = torch.from_numpy(rng.standard_normal((2, 3, 4, 4))).float()
        channels = 6 if variance_type == "learned_range" else 3
        output = torch.from_numpy(rng.uniform(-1, 1, (2, channels, 4, 4))).float()
        out = ours.p_mean_variance(output, xt, torch.full((2,), t))
        noise = randn_tensor(xt.shape, generator=torch.Generator().manual_seed(t), dtype=xt.dtype)
        expected = parent.step(output, t, xt, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(out["pred_x0"], expected.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            out["mean"] + out["variance"].sqrt() * noise, expected.prev_sample, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(out["variance"].log(), out["log_variance"])


def test_p_mean_variance_of_the_true_x0_is_the_posterior():
    x0, eps, t, xt = noisy_batch()
    for prediction_type in PREDICTION_TYPES:
        scheduler = short_scheduler(prediction_type=prediction_type)
        target = targets_for(x0, xt, t)[prediction_type]
        out = scheduler.p_mean_variance(*tensors(target, xt), torch.from_numpy(t))
        posterior_mean, _, _ = scheduler.q_posterior_mean_variance(*tensors(x0, xt), torch.from_numpy(t))
        torch.testing.assert_close(out["mean"], posterior_mean)
        torch.testing.assert_close(out["pred_x0"], torch.from_numpy(x0))
    clipped = short_scheduler(prediction_type="sample").p_mean_variance(
        *tensors(3 * x0, xt), torch.from_numpy(t), clip_denoised=True
    )
    assert clipped["pred_x0"].abs().max() <= 1.0


def test_learned_range_ends_are_fixed_small_and_fixed_large():
    x0, eps, t, xt = noisy_batch()
    t_ = torch.from_numpy(t)
    eps_, xt_ = tensors(eps, xt)
    learned = short_scheduler(variance_type="learned_range")
    small = short_scheduler(variance_type="fixed_small").p_mean_variance(eps_, xt_, t_)
    large = short_scheduler(variance_type="fixed_large").p_mean_variance(eps_, xt_, t_)
    at_minus_one = learned.p_mean_variance(torch.cat([eps_, -torch.ones_like(eps_)], 1), xt_, t_)
    at_plus_one = learned.p_mean_variance(torch.cat([eps_, torch.ones_like(eps_)], 1), xt_, t_)
    at_zero = learned.p_mean_variance(torch.cat([eps_, torch.zeros_like(eps_)], 1), xt_, t_)
    for key in ("mean", "log_variance", "variance", "pred_x0"):
        torch.testing.assert_close(at_minus_one[key], small[key])
        torch.testing.assert_close(at_plus_one[key][1:], large[key][1:])
    np.testing.assert_allclose(at_plus_one["variance"][0].numpy(), BETAS[0], rtol=1e-12)  # log beta_0 at t = 0
    np.testing.assert_allclose(at_minus_one["variance"][1:, 0, 0, 0].numpy(), POSTERIOR_VARIANCE[1:], rtol=1e-12)
    np.testing.assert_allclose(at_plus_one["variance"][1:, 0, 0, 0].numpy(), BETAS[1:], rtol=1e-12)
    geometric_mean = np.sqrt(POSTERIOR_VARIANCE[1:] * BETAS[1:])
    np.testing.assert_allclose(at_zero["variance"][1:, 0, 0, 0].numpy(), geometric_mean, rtol=1e-12)
    with pytest.raises(ValueError, match="6 channels"):
        learned.p_mean_variance(eps_, xt_, t_)
    with pytest.raises(ValueError, match="3 channels"):
        short_scheduler().p_mean_variance(torch.cat([eps_, eps_], 1), xt_, t_)


# ----------------------------------------------------------------------------------------------------------
# Loss weights and the training loss
# ----------------------------------------------------------------------------------------------------------


def test_uniform_and_min_snr_limits():
    t = torch.arange(T)
    for prediction_type in PREDICTION_TYPES:
        scheduler = short_scheduler(prediction_type=prediction_type)
        uniform = scheduler.loss_weights(t, "uniform")
        assert uniform.dtype == torch.float32 and torch.equal(uniform, torch.ones(T))
    # gamma >= max SNR: no clipping, so epsilon is uniform, x_0 gets SNR and v SNR / (SNR + 1).
    gamma = float(SNR.max()) + 1.0
    for prediction_type, expected in [
        ("epsilon", np.ones(T)),
        ("sample", SNR),
        ("v_prediction", SNR / (SNR + 1)),
    ]:
        weights = short_scheduler(prediction_type=prediction_type).loss_weights(t, "min_snr", snr_gamma=gamma)
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    # gamma -> 0: every target is weighted like gamma * (x_0 error).
    weights = short_scheduler().loss_weights(t, "min_snr", snr_gamma=1e-9)
    np.testing.assert_allclose(weights.numpy(), 1e-9 / SNR, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weighs_the_same_x0_error_alike_for_every_target(gamma):
    x0, eps, t, xt = noisy_batch(seed=1)
    x0_hat = x0 + 0.1 * np.random.default_rng(2).standard_normal(x0.shape)
    x0_mse = np.mean((x0_hat - x0) ** 2, axis=(1, 2, 3))
    for prediction_type, output in targets_for(x0_hat, xt, t).items():
        scheduler = short_scheduler(prediction_type=prediction_type)
        loss = scheduler.training_loss(*tensors(output, x0, eps), torch.from_numpy(t), "min_snr", snr_gamma=gamma)
        np.testing.assert_allclose(loss.numpy(), np.minimum(SNR, gamma) * x0_mse, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_vlb_weights_turn_the_mse_into_the_kl_term(prediction_type, variance_type):
    x0, eps, t, xt = noisy_batch(seed=3)
    x0_hat = x0 + 0.05 * np.random.default_rng(5).standard_normal(x0.shape)
    scheduler = short_scheduler(prediction_type=prediction_type, variance_type=variance_type)
    output = targets_for(x0_hat, xt, t)[prediction_type]
    loss = scheduler.training_loss(*tensors(output, x0, eps), torch.from_numpy(t), "vlb").numpy()
    # KL(q(x_{t-1} | x_t, x_0) || N(mu~(x0_hat, x_t), sigma_t^2)) per dim, less its value for a perfect mean.
    # Sigma_t: beta~_t (fixed_small) or beta_t (fixed_large), both with beta~_1 at t = 0.
    sigma2 = np.concatenate(
        [[POSTERIOR_VARIANCE[1]], (POSTERIOR_VARIANCE if variance_type == "fixed_small" else BETAS)[1:]]
    )
    log_sigma2 = torch.from_numpy(np.log(broadcast(sigma2, t, 4)))
    true_mean, _, true_log_variance = scheduler.q_posterior_mean_variance(*tensors(x0, xt), torch.from_numpy(t))
    model_mean, _, _ = scheduler.q_posterior_mean_variance(*tensors(x0_hat, xt), torch.from_numpy(t))
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, log_sigma2))
    const = mean_flat(normal_kl(true_mean, true_log_variance, true_mean, log_sigma2))
    np.testing.assert_allclose(loss[1:], (kl - const).numpy()[1:], rtol=1e-5)
    if variance_type == "fixed_small":
        np.testing.assert_allclose(const.numpy()[1:], 0.0, atol=1e-12)
    # t = 0: the decoder's Gaussian-density surrogate (x_0 - pred_x0)^2 / (2 sigma_0^2), sigma_0^2 = beta~_1.
    np.testing.assert_allclose(loss[0], np.mean((x0_hat[0] - x0[0]) ** 2) / (2 * POSTERIOR_VARIANCE[1]), rtol=1e-5)


def test_vlb_weights_closed_forms():
    t = torch.arange(1, T)
    s = np.arange(1, T)
    beta, ab, ab_prev = BETAS[s], ALPHAS_CUMPROD[s], ALPHAS_CUMPROD_PREV[s]
    sigma2 = POSTERIOR_VARIANCE[s]
    eps_weights = short_scheduler().loss_weights(t, "vlb")
    np.testing.assert_allclose(eps_weights.numpy(), beta**2 / (2 * sigma2 * (1 - beta) * (1 - ab)), rtol=1e-6)
    sample_weights = short_scheduler(prediction_type="sample").loss_weights(t, "vlb")
    np.testing.assert_allclose(sample_weights.numpy(), 0.5 * (SNR[s - 1] - SNR[s]), rtol=1e-6)
    v_weights = short_scheduler(prediction_type="v_prediction").loss_weights(t, "vlb")
    np.testing.assert_allclose(v_weights.numpy(), beta**2 * ab_prev / (2 * sigma2 * (1 - ab)), rtol=1e-6)


def test_unknown_weighting_and_vlb_with_learned_variance_raise():
    t = torch.arange(3)
    with pytest.raises(ValueError, match="uniform, min_snr, vlb"):
        short_scheduler().loss_weights(t, "snr")
    with pytest.raises(ValueError, match="not a fixed variance"):
        short_scheduler(variance_type="learned_range").loss_weights(t, "vlb")
    with pytest.raises(ValueError, match="fixed_small, fixed_small_log, fixed_large, learned_range"):
        short_scheduler(variance_type="learned").p_mean_variance(torch.zeros(3, 2), torch.zeros(3, 1), t)
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        short_scheduler(prediction_type="flow").training_target(torch.zeros(3, 1), torch.zeros(3, 1), t)


def test_training_loss_is_the_mean_squared_error_and_upcasts_half_precision():
    x0, eps, t, xt = noisy_batch(seed=6)
    output = torch.from_numpy(eps + 0.1).float()
    x0_, eps_ = (torch.from_numpy(a).float() for a in (x0, eps))
    scheduler = short_scheduler()
    loss = scheduler.training_loss(output, x0_, eps_, torch.from_numpy(t))
    torch.testing.assert_close(loss, ((output - eps_) ** 2).mean(dim=(1, 2, 3)))
    half = scheduler.training_loss(output.bfloat16(), x0_, eps_, torch.from_numpy(t))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, scheduler.training_loss(output.bfloat16().float(), x0_, eps_, torch.from_numpy(t)))


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    x0, eps, t, xt = noisy_batch(seed=7)
    scheduler = short_scheduler(variance_type="learned_range")
    x0_, eps_, xt_, t_ = *tensors(x0, eps, xt), torch.from_numpy(t)
    rng = np.random.default_rng(8)
    output = torch.from_numpy(
        np.concatenate([eps + 0.2 * rng.standard_normal(eps.shape), rng.uniform(-1, 1, eps.shape)], 1)
    )
    output.requires_grad_(True)
    loss = scheduler.training_loss(output, x0_, eps_, t_, vlb_lambda=0.01)
    mse = ((output[:, :3] - eps_) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, mse + 0.01 * T * scheduler.vlb_terms(output, x0_, xt_, t_, clip_denoised=False))
    (grad,) = torch.autograd.grad(loss.sum(), output)
    torch.testing.assert_close(grad[:, :3], 2 * (output[:, :3] - eps_).detach() / (3 * 4 * 4))
    assert (grad[:, 3:].abs().sum(dim=(1, 2, 3)) > 0).all()


# ----------------------------------------------------------------------------------------------------------
# Variational bound
# ----------------------------------------------------------------------------------------------------------


def test_decoder_term_is_the_discretised_gaussian_nll():
    x0, eps, _, _ = noisy_batch(seed=9, shape=(4, 3, 4, 4))
    t = np.zeros(4, dtype=np.int64)
    xt = np.sqrt(ALPHAS_CUMPROD[0]) * x0 + np.sqrt(1.0 - ALPHAS_CUMPROD[0]) * eps
    eps_hat = eps + 0.02 * np.random.default_rng(10).standard_normal(eps.shape)
    terms = short_scheduler().vlb_terms(*tensors(eps_hat, x0, xt), torch.from_numpy(t), clip_denoised=False).numpy()
    # p(x_0 | x_1): mean = pred_x0 (the posterior mean at t = 0), standard deviation sqrt(beta~_1).
    mean = (xt - np.sqrt(1.0 - ALPHAS_CUMPROD[0]) * eps_hat) / np.sqrt(ALPHAS_CUMPROD[0])
    dist = stats.norm(mean, np.sqrt(POSTERIOR_VARIANCE[1]))
    upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    expected = -np.log(dist.cdf(upper) - dist.cdf(lower)).mean(axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(terms, expected, rtol=1e-8)


def prior_kl_bits(x0: np.ndarray) -> np.ndarray:
    """KL(N(sqrt(abar_{T-1}) x0, 1 - abar_{T-1}) || N(0, 1)) per sample, bits/dim, written out."""
    ab = ALPHAS_CUMPROD[-1]
    kl = 0.5 * (-1.0 - np.log(1.0 - ab) + (1.0 - ab) + ab * x0**2)
    return kl.mean(axis=(1, 2, 3)) / np.log(2)


def test_prior_bpd_is_the_kl_to_the_standard_normal():
    x0, _, _, _ = noisy_batch(shape=(3, 3, 4, 4))
    np.testing.assert_allclose(short_scheduler().prior_bpd(torch.from_numpy(x0)).numpy(), prior_kl_bits(x0), rtol=1e-10)


def test_bpd_loop_does_not_depend_on_the_timestep_batch():
    scheduler = short_scheduler(variance_type="learned_range")
    x0 = torch.from_numpy(noisy_batch(shape=(2, 3, 4, 4))[0]).float()

    def model_fn(xt, t):  # any deterministic function of (x_t, t): the result depends on the noise
        scale = (t.float() / T).view(-1, 1, 1, 1)
        return torch.cat([0.5 * xt * scale, torch.tanh(xt) * (1 - scale)], dim=1)

    results = [
        scheduler.calc_bpd_loop(model_fn, x0, generator=torch.Generator().manual_seed(0), timestep_batch=k)
        for k in (None, 7, T)
    ]
    assert set(results[0]) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    assert results[0]["vb"].shape == results[0]["mse"].shape == results[0]["xstart_mse"].shape == (2, T)
    assert results[0]["total_bpd"].shape == results[0]["prior_bpd"].shape == (2,)
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-6, atol=1e-6)


def test_bound_of_a_denoiser_off_by_a_known_offset_is_the_closed_form():
    # One known image; the model returns the true noise plus a fixed offset delta and a fixed variance channel v.
    # Then pred_x0 = x0 - k_t delta, k_t = sqrt(1 / abar_t - 1), whatever the noise, and every term is closed form.
    x0 = noisy_batch(seed=12, shape=(2, 3, 4, 4))[0]
    rng = np.random.default_rng(13)
    delta = 0.05 * rng.standard_normal(x0.shape)
    v = rng.uniform(-1.0, 1.0, x0.shape)
    alphas_cumprod = torch.from_numpy(ALPHAS_CUMPROD)

    def model_fn(xt, t):
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x0_, delta_, v_ = (torch.from_numpy(z).repeat(len(t) // len(x0), 1, 1, 1) for z in (x0, delta, v))
        true_eps = (xt - a.sqrt() * x0_) / (1.0 - a).sqrt()
        return torch.cat([true_eps + delta_, v_], dim=1)

    scheduler = short_scheduler(variance_type="learned_range")
    kwargs = {"generator": torch.Generator().manual_seed(2), "timestep_batch": 7, "clip_denoised": False}
    results = scheduler.calc_bpd_loop(model_fn, torch.from_numpy(x0), **kwargs)

    # Nichol & Dhariwal's interpolation: log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2,
    # with beta~_0 = 0 replaced by beta~_1.
    frac = (v + 1.0) / 2.0
    vb = np.empty((2, T))
    for t in range(T):
        k = np.sqrt(1.0 / ALPHAS_CUMPROD[t] - 1.0)
        log_sigma2 = frac * np.log(BETAS[t]) + (1.0 - frac) * np.log(POSTERIOR_VARIANCE[max(t, 1)])
        if t == 0:  # decoder: the 8-bit bin of x0 under N(pred_x0, sigma_0^2), the edge bins open-ended
            dist = stats.norm(x0 - k * delta, np.exp(0.5 * log_sigma2))
            upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
            lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
            nats = -np.log(dist.cdf(upper) - dist.cdf(lower))
        else:  # KL(N(mu~_t, beta~_t) || N(mu~_t - c_t k_t delta, sigma_t^2)), c_t = x0's coefficient in mu~_t
            c = BETAS[t] * np.sqrt(ALPHAS_CUMPROD_PREV[t]) / (1.0 - ALPHAS_CUMPROD[t])
            ratio = POSTERIOR_VARIANCE[t] / np.exp(log_sigma2)
            nats = 0.5 * (ratio - 1.0 - np.log(ratio) + (c * k * delta) ** 2 / np.exp(log_sigma2))
        vb[:, t] = nats.mean(axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(results["vb"].numpy(), vb, rtol=1e-8)
    np.testing.assert_allclose(results["prior_bpd"].numpy(), prior_kl_bits(x0), rtol=1e-10)
    np.testing.assert_allclose(results["total_bpd"].numpy(), prior_kl_bits(x0) + vb.sum(axis=1), rtol=1e-8)
    # The implied eps is off by delta at every t, the implied x0 by k_t delta.
    delta_mse = (delta**2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(results["mse"].numpy(), np.tile(delta_mse[:, None], (1, T)), rtol=1e-8)
    x0_mse = delta_mse[:, None] * (1.0 / ALPHAS_CUMPROD - 1.0)
    np.testing.assert_allclose(results["xstart_mse"].numpy(), x0_mse, rtol=1e-8)
    kwargs["generator"] = torch.Generator().manual_seed(2)
    bound = scheduler.vlb_bits_per_dim(model_fn, torch.from_numpy(x0), **kwargs)
    np.testing.assert_allclose(bound.numpy(), prior_kl_bits(x0) + vb.sum(axis=1), rtol=1e-8)


def test_bound_clamps_pred_x0_in_every_term_by_default_and_matches_the_closed_form():
    # x0 near the edges, predicted as +-1.02 (x0-prediction): clamped to +-1, or not. With fixed_small, every KL
    # term is c_t^2 (x0 - x0_hat)^2 / (2 beta~_t) whatever the noise, and L_0 a bin of N(x0_hat, beta~_1).
    levels = np.array([[255, 250, 252, 253], [0, 3, 5, 1]])  # top row near +1, bottom row near -1
    x0 = np.stack([np.tile(levels, (2, 1)), np.tile(levels[::-1], (2, 1))])[:, None] * 2.0 / 255.0 - 1.0
    prediction = 1.02 * np.sign(x0)
    coef1 = BETAS * np.sqrt(ALPHAS_CUMPROD_PREV) / (1.0 - ALPHAS_CUMPROD)
    sigma0 = np.sqrt(POSTERIOR_VARIANCE[1])

    def closed_form(x0_hat):
        kl = sum(coef1[t] ** 2 * (x0 - x0_hat) ** 2 / (2 * POSTERIOR_VARIANCE[t]) for t in range(1, T))
        upper = np.where(x0 > 0.999, 1.0, stats.norm.cdf((x0 + 1 / 255 - x0_hat) / sigma0))
        lower = np.where(x0 < -0.999, 0.0, stats.norm.cdf((x0 - 1 / 255 - x0_hat) / sigma0))
        ab = ALPHAS_CUMPROD[-1]
        prior = 0.5 * (-1.0 - np.log(1.0 - ab) + (1.0 - ab) + ab * x0**2)
        return (kl - np.log(upper - lower) + prior).mean(axis=(1, 2, 3)) / np.log(2)

    scheduler = short_scheduler(prediction_type="sample")
    x0_ = torch.from_numpy(x0)

    def model_fn(xt, t):
        return torch.from_numpy(prediction).repeat(len(t) // len(x0), 1, 1, 1)

    def bound(**kwargs):
        return scheduler.vlb_bits_per_dim(model_fn, x0_, generator=torch.Generator().manual_seed(1), **kwargs)

    np.testing.assert_allclose(bound().numpy(), closed_form(np.clip(prediction, -1, 1)), rtol=1e-6)
    np.testing.assert_allclose(bound(clip_denoised=True, timestep_batch=7).numpy(), bound().numpy(), rtol=1e-9)
    np.testing.assert_allclose(bound(clip_denoised=False).numpy(), closed_form(prediction), rtol=1e-6)
    t0 = torch.zeros(2, dtype=torch.long)  # a single decoder term, clamped by hand
    decoder = scheduler.vlb_terms(torch.from_numpy(prediction), x0_, x0_, t0)
    clamped = scheduler.vlb_terms(torch.from_numpy(np.clip(prediction, -1, 1)), x0_, x0_, t0, clip_denoised=False)
    torch.testing.assert_close(decoder, clamped)


def test_nll_of_an_oracle_denoiser_is_the_decoder_floor_and_beats_a_zero_model():
    scheduler = DDPMScheduler()  # the paper's schedule, T = 1000
    x0 = torch.from_numpy(noisy_batch(seed=11, shape=(1, 3, 8, 8))[0])
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = torch.from_numpy(np.cumprod(1.0 - betas))

    def oracle(xt, t):  # the true noise, knowing the single training image
        a = ab[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * x0) / (1.0 - a).sqrt()

    def zero(xt, t):
        return torch.zeros_like(xt)

    kwargs = {"generator": torch.Generator().manual_seed(0), "timestep_batch": 500}
    perfect = scheduler.calc_bpd_loop(oracle, x0, **kwargs)
    assert perfect["vb"][:, 1:].abs().max() < 1e-6 and perfect["xstart_mse"].max() < 1e-12
    # What remains: the prior, and the decoder centred exactly on x_0, -log2 P(bin) with sigma_0^2 = beta~_1.
    sigma = math.sqrt(betas[1] * betas[0] / (1 - (1 - betas[0]) * (1 - betas[1])))
    x = x0.numpy()
    half_bin = stats.norm.cdf(1 / 255 / sigma)
    probability = np.where(np.abs(x) > 0.999, half_bin, 2 * half_bin - 1)
    decoder = -np.log2(probability).mean()
    ab_last = np.prod(1.0 - betas)  # L_T = KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1))
    prior = 0.5 * (-1.0 - np.log(1.0 - ab_last) + (1.0 - ab_last) + ab_last * x**2).mean() / np.log(2)
    np.testing.assert_allclose(perfect["total_bpd"].numpy(), decoder + prior, rtol=1e-6)
    assert perfect["total_bpd"].item() < 1.5
    assert scheduler.vlb_bits_per_dim(zero, x0, **kwargs).item() > perfect["total_bpd"].item() + 5.0
