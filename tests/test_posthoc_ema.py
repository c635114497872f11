"""hf_ddpm.posthoc_ema and scripts/posthoc_ema.py: the power-function EMA against its closed form, a rebuilt EMA
against one kept during training, and the training and search ends."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_training import FAST, run

from hf_ddpm import posthoc_ema
from hf_ddpm.errors import CheckpointError, ConfigError
from hf_ddpm.posthoc_ema import PowerEMA, Snapshot, reconstruct, save_snapshot, sigma_rel_to_gamma
from hf_ddpm.training_args import parse_training_args


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2s_profiles():
    # EDM2 (sec. 3.1): sigma_rel 0.10 is gamma 6.94, 0.05 is gamma 16.97 (its table of the two stored profiles)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    for sigma_rel in (0.01, 0.07, 0.2, 0.28):
        assert posthoc_ema.gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        sigma_rel_to_gamma(0.3)  # wider than a plain running mean
    with pytest.raises(ConfigError, match="--posthoc_ema_sigma_rels '0.05,x'"):
        parse_training_args([*FAST, "--posthoc_ema_sigma_rels", "0.05,x"])


def test_power_ema_is_the_tau_to_the_gamma_weighted_average_of_the_trajectory():
    # after t steps, theta_tau weighs (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): (g+1) x^g integrated over step tau
    values = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    param = torch.nn.Parameter(values[0].clone())
    ema = PowerEMA([param], sigma_rels=[0.1, 0.2])
    for t in range(1, len(values) + 1):
        param.data.copy_(values[t - 1])
        ema.step([param])
        for gamma, profile in zip(ema.gammas, ema.profiles, strict=True):
            tau = torch.arange(1, t + 1, dtype=torch.float64)
            w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
            expected = (w[:, None] * values[:t].double()).sum(0)
            torch.testing.assert_close(profile[0].double(), expected, rtol=1e-5, atol=1e-6)


def trajectory(t: int) -> torch.Tensor:
    """A smooth, drifting 'training trajectory' of four weights, as weights are between evaluations."""
    x = t / 1000
    return torch.tensor([math.sin(6 * x), x**0.5, math.exp(-3 * x), math.cos(2 * x) * x])


def test_a_rebuilt_ema_matches_one_kept_during_training():
    param = torch.nn.Parameter(trajectory(1))
    stored, kept = PowerEMA([param], sigma_rels=[0.05, 0.1]), PowerEMA([param], sigma_rels=[0.07, 0.15])
    snapshots = []
    for t in range(1, 1001):
        param.data.copy_(trajectory(t))
        stored.step([param])
        kept.step([param])
        if t % 50 == 0:
            snapshots += [
                Snapshot(g, t, {"w": p[0].clone()}) for g, p in zip(stored.gammas, stored.profiles, strict=True)
            ]
        if t in (600, 1000):
            for sigma_rel, truth in zip((0.07, 0.15), kept.profiles, strict=True):
                rebuilt = reconstruct(snapshots, sigma_rel, step=t)["w"]
                spread = (trajectory(t) - trajectory(t // 2)).abs()  # how far the weights moved meanwhile
                assert ((rebuilt - truth[0]).abs() <= 0.02 * spread + 1e-4).all(), (t, sigma_rel)
    # a snapshot taken after the asked step is never used
    assert torch.equal(reconstruct(snapshots, 0.07, step=600)["w"], reconstruct(snapshots[:24], 0.07, step=600)["w"])


def test_snapshots_round_trip_and_a_missing_folder_is_one_line(tmp_path):
    param = torch.nn.Parameter(torch.arange(3.0))
    ema = PowerEMA([param], sigma_rels=[0.05, 0.1])
    ema.step([param])
    path = save_snapshot(ema, ["w"], tmp_path / "snaps")
    assert path.name == "step-0000001.safetensors" and not list(path.parent.glob(".tmp-*"))
    loaded = posthoc_ema.load_snapshots(tmp_path / "snaps")
    assert [(s.step, round(s.gamma, 2)) for s in loaded] == [(1, 16.97), (1, 6.94)]
    assert all(torch.equal(s.weights["w"], param.detach()) for s in loaded)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots in .*--posthoc_ema_every"):
        posthoc_ema.load_snapshots(tmp_path / "none")


def test_training_saves_snapshots_that_resume_exactly_and_the_search_exports_the_best(tmp_path):
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--posthoc_ema_every", "2"]
    straight, _ = run(tmp_path, *flags, name="straight")
    snaps = straight / posthoc_ema.SNAPSHOT_DIR
    assert sorted(p.name for p in snaps.iterdir()) == ["step-0000002.safetensors", "step-0000004.safetensors"]
    halfway = str(straight / "checkpoints/checkpoint-2")
    resumed, _ = run(tmp_path, *flags, "--resume_from_checkpoint", halfway, name="resumed")
    a, b = (load_file(folder / posthoc_ema.SNAPSHOT_DIR / "step-0000004.safetensors") for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from hf_ddpm.data import DataArguments
    from hf_ddpm.sampling import SamplingArguments

    args = posthoc_ema.PosthocEMAArguments(sigma_rels="0.05,0.2", metric="digits", num_images=70)
    rows = posthoc_ema.search(straight, args, SamplingArguments(sampler="ddim", num_inference_steps=2), DataArguments())
    assert [row["digits_fd"] for row in rows] == sorted(row["digits_fd"] for row in rows)  # best first
    table = json.loads((snaps / "step-4" / "results.json").read_text())
    assert table["metric"] == "digits_fd" and table["step"] == 4 and len(table["candidates"]) == 2
    for row in rows:
        folder = snaps / "step-4" / f"sigma_rel-{row['sigma_rel']:.3f}"
        assert (folder / "model_index.json").is_file() and (folder / "eval_results.json").is_file()
        assert (folder / "README.md").is_file()
    with pytest.raises(ConfigError, match="--metric 'fidd'"):
        posthoc_ema.PosthocEMAArguments(metric="fidd")
