"""The training loop end to end on the tiny-8 preset: outputs, exact resume, checkpoints, crashes, DDP, bf16."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO_ROOT
from diffusers import UNet2DModel
from safetensors.torch import load_file

from hf_ddpm import checkpointing
from hf_ddpm.errors import PickleWeightsError, TrainingError
from hf_ddpm.presets import build_unet
from hf_ddpm.trainer import Trainer, train
from hf_ddpm.training_args import parse_training_args

FAST = [
    "--preset", "tiny-8", "--train_batch_size", "8", "--logging_steps", "2", "--sample_every", "0",
    "--num_final_images", "4", "--final_sampler", "ddim", "--final_steps", "4", "--lr_warmup_steps", "2",
    "--learning_rate", "1e-3", "--max_train_samples", "64",
]  # fmt: skip


def run(tmp_path: Path, *extra: str, name: str = "out") -> tuple[Path, dict]:
    out = tmp_path / name
    results = train(parse_training_args([*FAST, "--output_dir", str(out), *extra]))
    return out, results


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_run_leaves_pipeline_samples_logs_card_and_summary(tmp_path):
    out, results = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3")
    for name in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "samples.png", "README.md", "training_summary.json"]:  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard event file"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["results"] == results
    assert results["global_step"] == 6 and results["world_size"] == 1 and results["global_batch_size"] == 8
    assert summary["config"]["preset"] == "tiny-8" and "hub_token" not in summary["config"]
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-3", "checkpoint-6"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]


def test_exported_unet_holds_the_ema_weights_not_the_training_weights(tmp_path):
    out, _ = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "4")
    exported = weights(out)
    trained = load_file(out / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert exported.keys() == trained.keys()
    assert any(not torch.equal(exported[k], trained[k]) for k in exported)
    no_ema, _ = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "4", "--use_ema", "false", name="b")
    assert all(torch.equal(weights(no_ema)[k], load_file(no_ema / "checkpoints/checkpoint-4/model.safetensors")[k])
               for k in exported)  # fmt: skip


class _Interrupt(Exception):
    pass


def stopped_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> None:
    """Run `run` until its first checkpoint is saved, then stop it there (as a crash right after saving would)."""
    real_save = checkpointing.save_checkpoint

    def save_then_die(accelerator, folder, step, state, limit):
        real_save(accelerator, folder, step, state, limit)
        raise _Interrupt(step)

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupt):
        run()
    monkeypatch.setattr(checkpointing, "save_checkpoint", real_save)


def test_resume_is_bit_exact_and_does_not_replay_batches(tmp_path, monkeypatch):
    args = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--lr_scheduler", "cosine",
            "--timestep_sampler", "loss-second-moment", "--gradient_accumulation_steps", "2"]  # fmt: skip
    straight, _ = run(tmp_path, *args, name="straight")

    stopped_after_first_checkpoint(monkeypatch, lambda: run(tmp_path, *args, name="resumed"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed, results = run(tmp_path, *args, "--resume_from_checkpoint", "latest", name="resumed")
    assert results["global_step"] == 8
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed EMA weights differ from the straight run"
    a = load_file(straight / "checkpoints/checkpoint-8/model.safetensors")
    b = load_file(resumed / "checkpoints/checkpoint-8/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training weights differ from the straight run"


def test_checkpoint_limit_keeps_the_newest(tmp_path):
    out, _ = run(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-6", "checkpoint-8"]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_uses_it(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def half_write(self, output_dir=None, **kw):
        if output_dir.endswith("checkpoint-4"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", half_write)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2")
    checkpoints = tmp_path / "out" / "checkpoints"
    assert [p.name for p in checkpointing.list_checkpoints(checkpoints)] == ["checkpoint-2"]
    assert checkpointing.resolve_checkpoint("latest", checkpoints).name == "checkpoint-2"
    load_file(checkpoints / "checkpoint-2" / "model.safetensors")  # intact
    monkeypatch.setattr(Accelerator, "save_state", real)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    _, results = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint",
                     "latest")  # fmt: skip
    assert results["global_step"] == 6
    assert not list(checkpoints.glob(".tmp-*"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from hf_ddpm.scheduler import DDPMScheduler

    real = DDPMScheduler.training_loss
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        losses = real(self, *a, **kw)
        return losses * float("nan") if calls["n"] == 5 else losses

    monkeypatch.setattr(DDPMScheduler, "training_loss", poisoned)
    with pytest.raises(TrainingError, match=r"at or before step 6 .*checkpoint-4"):
        run(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2")
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "out" / "checkpoints")][-1] == "checkpoint-4"
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_lr_schedule_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    args = parse_training_args([*FAST, "--output_dir", str(tmp_path / "o"), "--max_train_steps", "6",
                                "--gradient_accumulation_steps", "3", "--lr_warmup_steps", "4",
                                "--checkpointing_steps", "100"])  # fmt: skip
    trainer = Trainer(args)
    trainer.train()
    assert trainer.lr_scheduler.last_epoch == 6  # stepped once per optimizer step, not per micro-step
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # warm-up over after 4 steps


def test_bf16_mixed_precision_on_cpu_keeps_fp32_weights(tmp_path):
    out, results = run(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "3", "--mixed_precision", "bf16")
    assert results["mixed_precision"] == "bf16"
    assert results["final_loss"] == pytest.approx(results["final_loss"])  # finite
    assert all(t.dtype == torch.float32 for t in weights(out).values())


def test_learned_range_variance_doubles_the_output_channels_and_trains(tmp_path):
    out, results = run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2", "--variance_type",
                       "learned_range")  # fmt: skip
    assert UNet2DModel.from_pretrained(out / "unet").config.out_channels == 2
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["variance_type"] == "learned_range"


def test_refuses_to_overwrite_a_finished_run(tmp_path):
    run(tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1")
    with pytest.raises(TrainingError, match="--overwrite_output_dir"):
        run(tmp_path, "--max_train_steps", "1")


def _no_data(*args, **kwargs):
    raise AssertionError("the dataset was decoded before the output folder was checked")


def test_a_folder_with_checkpoints_or_a_pipeline_is_refused_before_the_data_is_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_ddpm.trainer.load_training_data", _no_data)
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-3" / checkpointing.STATE_FILE).write_text("{}")
    refusal = r"holds an earlier run \(checkpoints/checkpoint-3\); pass --resume_from_checkpoint latest .* --overwrite"
    with pytest.raises(TrainingError, match=refusal):
        run(tmp_path)
    (out / "checkpoints" / "checkpoint-3" / checkpointing.STATE_FILE).unlink()
    (out / "model_index.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"\(model_index.json\) but no checkpoint.*--overwrite_output_dir"):
        run(tmp_path, "--resume_from_checkpoint", "latest")  # used to start afresh into the old pipeline
    with pytest.raises(TrainingError, match="pass one of them"):
        run(tmp_path, "--overwrite_output_dir", "--resume_from_checkpoint", "latest")


def test_overwrite_starts_a_clean_run_and_deletes_the_old_one_only_once_exported(tmp_path, monkeypatch):
    out, _ = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    (out / "eval_results.json").write_text('{"results": []}')
    before = {p.relative_to(out) for p in out.rglob("*")}
    monkeypatch.setattr("hf_ddpm.trainer.load_training_data", _no_data)
    with pytest.raises(AssertionError):  # a crash at the start: the old run is set aside, not lost
        run(tmp_path, "--overwrite_output_dir", "--max_train_steps", "2")
    (aside,) = out.iterdir()
    assert {p.relative_to(aside) for p in aside.rglob("*")} == before
    monkeypatch.undo()
    _, results = run(tmp_path, "--overwrite_output_dir", "--max_train_steps", "2", "--checkpointing_steps", "2",
                     "--checkpoints_total_limit", "2")  # fmt: skip
    assert results["global_step"] == 2
    # the old checkpoint-4 and -6 no longer make rotation delete the new checkpoint-2 at once
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert checkpointing.resolve_checkpoint("latest", out / "checkpoints").name == "checkpoint-2"
    assert not (out / "eval_results.json").exists() and not list(out.glob(".overwritten-*"))
    assert not before & {p.relative_to(out) for p in (out / "logs").rglob("events.out.tfevents.*")}  # old logs gone


def test_resume_by_checkpoint_name_from_any_directory(tmp_path, monkeypatch):
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    monkeypatch.chdir(tmp_path)
    args = parse_training_args([*FAST, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "4",
                                "--resume_from_checkpoint", "checkpoint-2"])  # fmt: skip
    assert Trainer(args).resume == tmp_path / "out" / "checkpoints" / "checkpoint-2"


def test_learned_range_fine_tuning_keeps_the_loaded_weights(tmp_path, caplog):
    source = build_unet("tiny-8")
    source.save_pretrained(tmp_path / "start" / "unet", safe_serialization=False)
    args = parse_training_args([*FAST, "--output_dir", str(tmp_path / "out"), "--preset", str(tmp_path / "start"),
                                "--variance_type", "learned_range"])  # fmt: skip
    with pytest.raises(PickleWeightsError, match="--allow_pickle"):
        Trainer(args)
    args.allow_pickle = True
    with caplog.at_level("INFO"):
        unet = Trainer(args).unet
    assert unet.config.out_channels == 2
    old, new = source.state_dict(), unet.state_dict()
    assert all(torch.equal(new[k], v) for k, v in old.items() if not k.startswith("conv_out."))
    for name in ("conv_out.weight", "conv_out.bias"):
        assert torch.equal(new[name][:1], old[name]) and not new[name][1:].any()
    assert "learned_range" in caplog.text and "variance channels" in caplog.text


def test_config_file_with_cli_overrides_and_preset_defaults(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("preset: tiny-8\ntrain_batch_size: 4\nlearning_rate: 0.5\n")
    args = parse_training_args(["--config", str(config), "--learning_rate", "0.25"])
    assert (args.preset, args.train_batch_size, args.learning_rate) == ("tiny-8", 4, 0.25)
    assert args.lr_warmup_steps == 10  # from the tiny-8 preset's defaults
    cifar = parse_training_args(["--preset", "ddpm-cifar10-32"])
    assert (cifar.learning_rate, cifar.lr_warmup_steps, cifar.max_grad_norm, cifar.ema_max_decay) == (
        2e-4, 5000, 1.0, 0.9999)  # fmt: skip
    assert cifar.random_flip and cifar.train_batch_size == 128


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("ddpm_*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    args = parse_training_args(["--config", str(config)])
    assert args.dataset_name


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO_ROOT / "scripts" / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown UNet preset 'nope'; valid presets: ddpm-256"),
        (["--train_data_dir", "empty"], "--train_data_dir"),
        (["--dataset_name", "someone/not-a-dataset"], "someone/not-a-dataset"),
        (["--train_batch_size", "4096"], "lower --train_batch_size"),
        (["--resume_from_checkpoint", "nowhere"], "not a complete checkpoint folder"),
        (["--config", "missing.yaml"], "no such file"),
        (["--prediction_type", "noise"], "--prediction_type 'noise' is not one of: epsilon, sample, v_prediction"),
        (["--final_sampler", "plms"], "--final_sampler 'plms' is not one of: ddpm, ddim"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_non_zero_exit(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    result = _cli(*args, "--output_dir", "o", cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith("error:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_two_process_data_parallel_on_cpu_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO_ROOT / "tests" / "ddp_worker.py"), *FAST, "--output_dir", str(out), "--max_train_steps", "4",
           "--checkpointing_steps", "4", "--train_batch_size", "4"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "training_summary.json").read_text())["results"]
    assert results["world_size"] == 2, "accelerate started one process, not two"
    assert results["global_batch_size"] == 8
    assert "batch 4 per process x 2 process(es) x 1 accumulation = global batch 8" in result.stderr
    assert "the decoded dataset cache is built once, by the main process (--cache_dir is shared)" in result.stderr
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    rows = [json.loads((out / f"rows{r}.json").read_text()) for r in (0, 1)]
    assert all(not set(a) & set(b) for a, b in zip(*rows, strict=True)), "ranks saw overlapping rows in a micro-step"


def test_eval_every_logs_the_metric_and_keeps_a_best_export(tmp_path):
    out, _ = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "4", "--eval_every", "2",
                 "--eval_metric", "digits", "--eval_num_samples", "70", "--max_train_samples", "160",
                 "--preview_steps", "3")  # fmt: skip
    best = json.loads((out / "best" / "best_eval.json").read_text())
    assert best["global_step"] in (2, 4) and best["metric"] == "digits_fd"
    assert {"digits_confidence", "digits_class_entropy", "digits_fd"} <= set(best)
    assert (out / "best" / "model_index.json").is_file() and (out / "best" / "unet").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "eval/digits_fd" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/digits_fd")] == [2, 4]
    # the history of every evaluation, with the training time it took to get there (evaluations excluded)
    results = json.loads((out / "training_summary.json").read_text())["results"]
    history = results["eval_history"]
    assert [h["global_step"] for h in history] == [2, 4] and all("digits_fd" in h for h in history)
    assert 0 < history[0]["train_seconds"] < history[1]["train_seconds"] < results["wall_time_s"]
    assert results["eval_seconds"] > 0
    assert history[-1]["train_seconds"] <= results["wall_time_s"] - results["eval_seconds"] + 0.1  # both rounded
    # a bad metric is refused with the other flags, before any data is decoded, naming the valid ones
    with pytest.raises(ValueError, match="--eval_metric 'accuracy' is not one of: fid, kid, inception_score"):
        parse_training_args([*FAST, "--eval_every", "2", "--eval_metric", "accuracy"])
    from hf_ddpm.evaluation import METRICS
    from hf_ddpm.training_args import EVAL_SCORE

    assert tuple(EVAL_SCORE) == METRICS, "every metric decides best/ by one of its values"


def test_training_on_the_built_in_digits_by_default_is_said(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hf_ddpm.trainer"):
        Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "out"), "--preset", "small-16-rgb"]))
    assert "no --dataset_name or --train_data_dir: training on builtin:digits" in caplog.text
    assert "resized to 16 px, 3 channel(s)" in caplog.text
