"""The speed levers (hf_ddpm/speed.py and the trainer's use of them) train the same model as the eager fp32 path.

channels_last and torch.compile change the order of float operations (other convolution and normalisation
kernels, fused elementwise code), so their weights match eager ones to a tolerance, not bit for bit; resume
under torch.compile stays bit-exact on one CPU process. CUDA-only branches are checked by what they set.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import PYTHON, REPO_ROOT
from safetensors.torch import load_file
from test_training import FAST, run, weights

from hf_ddpm import speed
from hf_ddpm.errors import TrainingError
from hf_ddpm.scheduler import DDPMScheduler
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args

STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # 4 Adam steps at lr 1e-3 move weights ~4e-3: a real error is far larger


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=key)


def test_channels_last_trains_the_eager_model_and_resumes_exactly(tmp_path):
    eager, _ = run(tmp_path, *STEPS, name="eager")
    fast, results = run(tmp_path, *STEPS, "--channels_last", name="channels_last")
    assert results["speed_settings"] == "eager UNet, channels_last"
    assert_close_weights(weights(eager), weights(fast))
    checkpoint = load_file(fast / "checkpoints/checkpoint-4/model.safetensors")
    assert_close_weights(load_file(eager / "checkpoints/checkpoint-4/model.safetensors"), checkpoint)
    halfway = str(fast / "checkpoints/checkpoint-2")
    resumed, _ = run(tmp_path, *STEPS, "--channels_last", "--resume_from_checkpoint", halfway, name="resumed")
    resumed_weights = load_file(resumed / "checkpoints/checkpoint-4/model.safetensors")
    assert all(torch.equal(checkpoint[k], resumed_weights[k]) for k in checkpoint)


def test_torch_compile_trains_the_eager_model_keeps_plain_names_and_resumes_exactly(tmp_path):
    eager, _ = run(tmp_path, *STEPS, name="eager")
    compiled, results = run(tmp_path, *STEPS, "--torch_compile", name="compiled")
    assert results["speed_settings"] == "compiled UNet, NCHW"
    assert_close_weights(weights(eager), weights(compiled))
    trained = load_file(compiled / "checkpoints/checkpoint-4/model.safetensors")
    assert not [key for key in trained if "_orig_mod" in key]
    # a compiled run resumed from the other's step-2 checkpoint ends where the straight one did
    halfway = str(compiled / "checkpoints/checkpoint-2")
    resumed, _ = run(tmp_path, *STEPS, "--torch_compile", "--resume_from_checkpoint", halfway, name="resumed")
    resumed_weights = load_file(resumed / "checkpoints/checkpoint-4/model.safetensors")
    assert all(torch.equal(trained[k], resumed_weights[k]) for k in trained)


def test_a_failing_compile_warns_once_and_trains_eager(tmp_path, monkeypatch, caplog):
    def broken(function):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler\nlong traceback")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "o"), *STEPS, "--torch_compile"]))
    assert "forward" not in vars(trainer.unet)  # the class's forward again
    warned = [r.message for r in caplog.records if "--torch_compile" in r.message]
    assert len(warned) == 1 and warned[0].endswith(
        "--torch_compile: compiling failed (RuntimeError: no C++ compiler); running eager"
    )
    assert trainer.train()["speed_settings"] == "eager UNet, NCHW"
    assert all(p.grad is None for p in trainer.unet.parameters())


def test_the_loss_is_read_only_at_logging_steps_and_before_checkpoints(tmp_path, monkeypatch):
    reads = []
    real = Trainer._window_loss

    def counted(self):
        reads.append(self.global_step)
        return real(self)

    monkeypatch.setattr(Trainer, "_window_loss", counted)
    run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3", "--logging_steps", "2")
    assert reads == [2, 3, 4, 6]  # step 6 is logged first, so its checkpoint has nothing new to read


def test_a_non_finite_loss_between_logging_steps_stops_before_the_checkpoint(tmp_path, monkeypatch):
    real = DDPMScheduler.training_loss
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        losses = real(self, *a, **kw)
        return losses * float("inf") if calls["n"] == 2 else losses

    monkeypatch.setattr(DDPMScheduler, "training_loss", poisoned)
    with pytest.raises(TrainingError, match=r"the loss is (inf|nan) at or before step 3 .*Last good checkpoint: none"):
        run(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "3", "--logging_steps", "4")
    assert not (tmp_path / "out" / "checkpoints" / "checkpoint-3").exists()


@pytest.fixture
def tf32_flags():
    """torch's global TF32 switches, put back afterwards (monkeypatch cannot: they are properties of C state)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_switched_on_cuda_only(tf32_flags):
    assert speed.set_tf32(torch.device("cpu"), True) is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert speed.set_tf32(torch.device("cuda", 0), True) is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert speed.set_tf32(torch.device("cuda", 0), False) is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_adamw_is_fused_on_cuda_only_and_the_trainer_uses_the_choice(tmp_path, monkeypatch):
    assert speed.adamw_options(torch.device("cuda", 0)) == {"fused": True}
    assert speed.adamw_options(torch.device("cpu")) == {}
    # torch's fused AdamW also runs on CPUs: the trainer builds and steps it as it would on CUDA
    monkeypatch.setattr(speed, "adamw_options", lambda device: {"fused": True})
    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "o"), *STEPS]))
    assert trainer.optimizer.param_groups[0]["fused"] is True
    assert trainer.train()["speed_settings"] == "eager UNet, NCHW, fused AdamW"


def benchmark(script: str, *args: str) -> str:
    result = subprocess.run([PYTHON, str(REPO_ROOT / "benchmarks" / script), *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_throughput_measures_both_loops_and_profiles_every_phase(tmp_path):
    out = benchmark("train_throughput.py", "--preset", "tiny-8", "--batch_size", "8", "--steps", "2", "--rounds",
                    "2", "--profile_steps", "2", "--json", str(tmp_path / "r.json"))  # fmt: skip
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["hf_ddpm"]["median"] > 0 and results["reference"]["median"] > 0
    assert set(results["profile"]["phases"]) == {"data", "noise", "forward_backward", "optimizer", "ema", "logging"}
    assert results["profile"]["phases"]["forward_backward"]["host_ms"] > 0
    assert "hf_ddpm / reference" in out and "CPU" in out


def test_sample_throughput_finds_eager_identical_to_plain_diffusers(tmp_path):
    model, _ = run(tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1")
    figures = tmp_path / "s.json"
    benchmark("sample_throughput.py", str(model), "--num_inference_steps", "3", "--num_images", "3", "--batch_size",
              "2", "--rounds", "1", "--variants", "eager,channels_last", "--json", str(figures))  # fmt: skip
    sides = json.loads(figures.read_text())["sides"]
    assert sides["eager"]["max_abs_diff"] == 0
    assert sides["channels_last"]["mean_abs_diff"] <= 2


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")], check=True)
