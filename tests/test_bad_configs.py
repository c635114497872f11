"""Bad configurations are refused with one line before anything is built: every numeric flag out of range, an
image size the UNet cannot halve, a config.json of another model class, a checkpoint of another UNet."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from hf_ddpm import training_args
from hf_ddpm.errors import CheckpointError, ConfigError
from hf_ddpm.presets import build_unet
from hf_ddpm.trainer import Trainer, train
from hf_ddpm.training_args import TrainingArguments, parse_training_args

# for each rule of training_args._RANGES, a value just outside it
OUTSIDE = {"at least 1": "0", "at least 0": "-1", "positive": "0", "in [0, 1)": "1", "in [0, 1]": "1.5",
           "in [0, 2**32 - 1]": "-1"}  # fmt: skip
RANGED = [(name, rule) for names, (rule, _) in training_args._RANGES.items() for name in names]
FAST = [
    "--preset", "tiny-8", "--train_batch_size", "8", "--max_train_samples", "64", "--logging_steps", "1",
    "--sample_every", "0", "--num_final_images", "2", "--final_sampler", "ddim", "--final_steps", "2",
    "--report_to", "none", "--lr_warmup_steps", "0",
]  # fmt: skip


def test_every_numeric_flag_has_a_range():
    numeric = {f.name for f in dataclasses.fields(TrainingArguments) if "int" in str(f.type) or "float" in str(f.type)}
    assert numeric - {name for name, _ in RANGED} == {"beta_start", "beta_end"}  # checked as a pair, below


@pytest.mark.parametrize(("name", "rule"), RANGED)
def test_a_numeric_flag_out_of_range_is_one_line_naming_it(name, rule):
    with pytest.raises(ConfigError, match=rf"^--{name} must be {re.escape(rule)}, got "):
        parse_training_args(["--preset", "tiny-8", f"--{name}", OUTSIDE[rule]])


@pytest.mark.parametrize(("start", "end"), [("-0.1", "0.02"), ("0.05", "0.02"), ("0.0001", "1.5"), ("0", "0.02")])
def test_beta_schedule_out_of_range_is_refused(start, end):
    with pytest.raises(ConfigError, match=r"^--beta_start .* and --beta_end .* must satisfy 0 < beta_start <="):
        parse_training_args(["--preset", "tiny-8", "--beta_start", start, "--beta_end", end])
    parse_training_args(["--beta_schedule", "squaredcos_cap_v2", "--beta_start", start, "--beta_end", end])


def test_an_image_size_the_unet_cannot_halve_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"image size 7 .* not divisible by 2: the UNet halves it 1 time\(s\)"):
        build_unet("tiny-8", sample_size=7)
    with pytest.raises(ConfigError, match=r"image size 18 .* not divisible by 4: .* halves it 2 time\(s\)"):
        build_unet("digits-16", sample_size=18)
    build_unet("digits-16", sample_size=20)
    with pytest.raises(ConfigError, match="not divisible by 2"):
        Trainer(parse_training_args([*FAST, "--resolution", "7", "--output_dir", str(tmp_path / "o")]))
    folder = tmp_path / "unet"
    build_unet("tiny-8").save_pretrained(folder)
    with pytest.raises(ConfigError, match="image size 9"):
        build_unet(str(folder), sample_size=9)


def test_a_config_json_of_another_model_class_is_refused(tmp_path):
    vae = tmp_path / "vae.json"
    vae.write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3, "latent_channels": 4}))
    with pytest.raises(ConfigError, match=r"vae.json is the config of a AutoencoderKL, not of a UNet2DModel"):
        build_unet(str(vae))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken.json is not valid JSON"):
        build_unet(str(tmp_path / "broken.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list.json is not a JSON object"):
        build_unet(str(tmp_path / "list.json"))


def test_resuming_a_checkpoint_of_another_preset_says_what_differs(tmp_path):
    out = str(tmp_path / "o")
    train(parse_training_args([*FAST, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", out]))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    other = parse_training_args([*FAST, "--preset", "digits-16", "--max_train_steps", "4", "--output_dir", out,
                                 "--resume_from_checkpoint", "latest"])  # fmt: skip
    expected = (r"checkpoint-2 is of another UNet than this run \(.*block_out_channels \[16, 32\] there, "
                r"\[16, 32, 64\] here.*sample_size 8 there, 16 here.*\); resume with the --preset")  # fmt: skip
    with pytest.raises(CheckpointError, match=expected):
        Trainer(other).train()
