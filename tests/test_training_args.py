"""The command line and --config into TrainingArguments: which source wins, what --help shows, what is refused."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import hf_ddpm.training_args
from hf_ddpm.arguments import check_fp16_device
from hf_ddpm.errors import ConfigError
from hf_ddpm.presets import get_preset
from hf_ddpm.training_args import TrainingArguments, parse_training_args


def help_defaults(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    """The "(default: ...)" that `--help` shows for each flag."""
    with pytest.raises(SystemExit) as exit_info:
        parse_training_args([*argv, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    flag = r"--(\w+) [A-Z_]+(?:, --[\w-]+ [A-Z_]+)? "
    help_text = r"(?:(?! --\w+ [A-Z_]{2,}).)*?"  # up to the next flag's own entry
    return dict(re.findall(flag + help_text + r"\(default: ([^)]*)\)", text))


def test_help_shows_the_defaults_of_the_chosen_preset(capsys: pytest.CaptureFixture[str]) -> None:
    cifar = get_preset("ddpm-cifar10-32").train_defaults
    shown = help_defaults(capsys, "--preset", "ddpm-cifar10-32")
    assert (shown["learning_rate"], shown["lr_warmup_steps"], shown["max_train_steps"]) == (
        str(cifar["learning_rate"]), str(cifar["lr_warmup_steps"]), str(cifar["max_train_steps"]))  # fmt: skip
    assert shown["train_batch_size"] == "128"

    default = get_preset(TrainingArguments.preset).train_defaults
    shown = help_defaults(capsys)
    assert (shown["learning_rate"], shown["lr_warmup_steps"], shown["max_train_steps"]) == (
        str(default["learning_rate"]), str(default["lr_warmup_steps"]), str(default["max_train_steps"]))  # fmt: skip
    assert shown["train_batch_size"] == "64"  # the built-in default, which digits-16 keeps


def test_help_shows_what_the_config_file_sets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("preset: tiny-8\nseed: 7\n")
    shown = help_defaults(capsys, "--config", str(config))
    assert (shown["learning_rate"], shown["lr_warmup_steps"], shown["seed"]) == ("0.001", "10", "7")


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_your_num_epochs_replaces_the_presets_max_train_steps(tmp_path: Path, where: str) -> None:
    assert get_preset("digits-16").train_defaults["max_train_steps"] == 6000
    config = tmp_path / "c.yaml"
    config.write_text("num_epochs: 3\n")
    argv = ["--num_epochs", "3"] if where == "command line" else ["--config", str(config)]
    args = parse_training_args(["--preset", "digits-16", *argv])
    assert (args.num_epochs, args.max_train_steps) == (3, None)


def test_the_command_line_run_length_beats_the_config_files(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max_train_steps: 40\n")
    assert parse_training_args(["--config", str(config), "--num_epochs", "2"]).max_train_steps is None
    config.write_text("num_epochs: 2\n")
    assert parse_training_args(["--config", str(config), "--max_train_steps", "9"]).max_train_steps == 9


def test_max_train_steps_and_num_epochs_from_one_source_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^--max_train_steps and --num_epochs are both given on the command line"):
        parse_training_args(["--max_train_steps", "5", "--num_epochs", "2"])
    config = tmp_path / "c.yaml"
    config.write_text("max_train_steps: 5\nnum_epochs: 2\n")
    with pytest.raises(ValueError, match=f"both given in --config {re.escape(str(config))}: give one of them"):
        parse_training_args(["--config", str(config)])


def test_the_command_line_preset_beats_the_config_files_and_brings_its_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("preset: tiny-8\nlearning_rate: 0.5\n")
    args = parse_training_args(["--config", str(config), "--preset", "ddpm-cifar10-32"])
    cifar = get_preset("ddpm-cifar10-32").train_defaults
    assert args.preset == "ddpm-cifar10-32"
    assert (args.lr_warmup_steps, args.train_batch_size, args.max_train_steps) == (
        cifar["lr_warmup_steps"], cifar["train_batch_size"], cifar["max_train_steps"])  # fmt: skip
    assert args.learning_rate == 0.5  # the config file still beats the preset's defaults


def test_no_args_file_next_to_the_script_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train.args").write_text("--learning_rate 0.5\n")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "train.py")])
    assert parse_training_args([]).learning_rate == get_preset(TrainingArguments.preset).train_defaults["learning_rate"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("- a\n- b\n", "expected a mapping of argument names to values"),
        ("learning_rate: 1\nlearnin_rate: 2\n", "unknown argument(s) ['learnin_rate']"),
        ("preset: [tiny-8\n", "not valid YAML"),
    ],
    ids=["missing", "not-a-mapping", "unknown-key", "bad-yaml"],
)
def test_config_file_problems_are_value_errors(tmp_path: Path, content: str | None, message: str) -> None:
    config = tmp_path / "c.yaml"
    if content is not None:
        config.write_text(content)
    with pytest.raises(ValueError) as failure:
        parse_training_args(["--config", str(config)])
    assert str(failure.value).startswith(f"--config {config}: ") and message in str(failure.value)


def test_report_to_wandb_without_wandb_fails_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_ddpm.training_args, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape('--report_to wandb needs wandb: pip install -e ".[wandb]"')):
        parse_training_args(["--report_to", "wandb"])
    assert parse_training_args(["--report_to", "all"]).report_to == "all"  # every installed tracker


def test_push_to_hub_without_a_repo_id_is_refused() -> None:
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        parse_training_args(["--push_to_hub"])


@pytest.mark.parametrize("repo_id", ["alice/not valid!", "a/b/c", "alice/..dots", "x" * 97])
def test_a_malformed_hub_model_id_is_a_config_error(repo_id: str) -> None:
    with pytest.raises(ConfigError, match=f"^--hub_model_id {re.escape(repo_id)} is not a valid repo id"):
        parse_training_args(["--push_to_hub", "--hub_model_id", repo_id])
    assert parse_training_args(["--hub_model_id", "ddpm-digits"]).hub_model_id == "ddpm-digits"  # the token's user
    assert parse_training_args(["--hub_model_id", "org/ddpm.v2_a-b"]).hub_model_id == "org/ddpm.v2_a-b"


def test_fp16_without_a_gpu_is_refused_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--mixed_precision fp16 needs a GPU"):
        parse_training_args(["--mixed_precision", "fp16"])
    assert parse_training_args(["--mixed_precision", "bf16"]).mixed_precision == "bf16"
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert parse_training_args(["--mixed_precision", "fp16"]).mixed_precision == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):  # accelerate's config chose fp16, or the CPU
        check_fp16_device("fp16", "cpu")
    check_fp16_device("fp16", "cuda")


def test_the_default_run_is_the_measured_recipe_with_fast_samples() -> None:
    """What `make train` runs (README, time to quality): min-SNR weighting, 6000 steps, and every sample it draws
    (previews, --eval_every, samples.png) from 20-step SDE-DPM-Solver++, 1000-step DDPM one flag away."""
    args = parse_training_args([])
    assert (args.preset, args.loss_weighting, args.max_train_steps, args.learning_rate) == (
        "digits-16", "min_snr", 6000, 1e-3)  # fmt: skip
    assert args.preview_sampler == args.final_sampler == "sde-dpmsolver++"
    assert args.preview_steps is None and args.final_steps is None and args.eval_num_samples == 512
    assert parse_training_args(["--final_sampler", "ddpm"]).final_sampler == "ddpm"
    cifar = parse_training_args(["--preset", "ddpm-cifar10-32"])
    assert (cifar.loss_weighting, cifar.prediction_type, cifar.learning_rate) == ("uniform", "epsilon", 2e-4)
