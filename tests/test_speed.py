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
from accelerate import PartialState
from conftest import PYTHON, REPO_ROOT
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from test_training import FAST, run, weights

from hf_ddpm import speed
from hf_ddpm.errors import TrainingError
from hf_ddpm.presets import build_unet
from hf_ddpm.scheduler import DDPMScheduler
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args

STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # 4 Adam steps at lr 1e-3 move weights ~4e-3: a real error is far larger


# The attention keys' bias gets no gradient in exact arithmetic (it adds q.b to every logit of a query, which the
# softmax ignores), so Adam steps it on float noise that differs between kernels: compared only by its bound.
NOISE_ONLY = "to_k.bias"


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(NOISE_ONLY):
            assert (a[key] - b[key]).abs().max() <= 2 * 4 * 1e-3, key  # 4 Adam steps of at most lr each, per run
        else:
            torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


def test_channels_last_trains_the_eager_model_and_resumes_exactly(tmp_path):
    eager, _ = run(tmp_path, *STEPS, name="eager")
    fast, results = run(tmp_path, *STEPS, "--channels_last", name="channels_last")
    assert results["speed_settings"] == "eager UNet, channels_last, fused AdamW, foreach-lerp EMA"
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
    assert results["speed_settings"] == "compiled UNet, NCHW, fused AdamW, foreach-lerp EMA"
    assert_close_weights(weights(eager), weights(compiled))
    trained = load_file(compiled / "checkpoints/checkpoint-4/model.safetensors")
    assert not [key for key in trained if "_orig_mod" in key]
    # a compiled run resumed from the other's step-2 checkpoint ends where the straight one did
    halfway = str(compiled / "checkpoints/checkpoint-2")
    resumed, _ = run(tmp_path, *STEPS, "--torch_compile", "--resume_from_checkpoint", halfway, name="resumed")
    resumed_weights = load_file(resumed / "checkpoints/checkpoint-4/model.safetensors")
    assert all(torch.equal(trained[k], resumed_weights[k]) for k in trained)


def test_prefetched_batches_train_the_same_model_bit_for_bit_and_resume_exactly(tmp_path):
    plain, _ = run(tmp_path, *STEPS, "--gradient_accumulation_steps", "2", name="plain")
    ahead, results = run(tmp_path, *STEPS, "--gradient_accumulation_steps", "2", "--prefetch_batches", "3",
                         name="ahead")  # fmt: skip
    assert results["speed_settings"].endswith("3 batches prefetched")
    assert all(torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(ahead).values(), strict=True))
    halfway = str(ahead / "checkpoints/checkpoint-2")
    resumed, _ = run(tmp_path, *STEPS, "--gradient_accumulation_steps", "2", "--prefetch_batches", "3",
                     "--resume_from_checkpoint", halfway, name="resumed")  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(resumed).values(), strict=True))


def test_prefetch_is_off_on_cpu_and_for_an_adaptive_timestep_sampler(tmp_path):
    assert speed.default_prefetch(torch.device("cpu")) == 0 and speed.default_prefetch(torch.device("cuda")) == 2
    adaptive = [*FAST, *STEPS, "--prefetch_batches", "2", "--timestep_sampler", "loss-second-moment"]
    assert Trainer(parse_training_args([*adaptive, "--output_dir", str(tmp_path / "o")])).batches.depth == 0


def test_the_prefetcher_makes_each_item_once_in_order_drops_skipped_ones_and_raises_their_errors():
    made = []

    def make(key: int) -> int:
        made.append(key)
        if key == 7:
            raise OSError("image 7 is truncated")
        return key * key

    prefetcher = speed.Prefetcher(make, depth=2)
    assert [prefetcher.get(k) for k in (0, 1, 2)] == [0, 1, 4]
    assert prefetcher.get(5) == 25  # a resume that skips ahead: 3 and 4, made in advance, are dropped
    with pytest.raises(OSError, match="image 7"):
        prefetcher.get(7)
    prefetcher.close()
    assert made == sorted(set(made)) and {0, 1, 2, 5, 7} <= set(made) <= set(range(10))  # each once, in order
    assert speed.Prefetcher(make, depth=0).get(3) == 9 and speed.Prefetcher(make, depth=0).pool is None


def test_a_failing_compile_warns_once_and_trains_eager(tmp_path, monkeypatch, caplog):
    def broken(function, **options):
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
    assert trainer.train()["speed_settings"] == "eager UNet, NCHW, fused AdamW, foreach-lerp EMA"
    assert all(p.grad is None for p in trainer.unet.parameters())


@pytest.mark.parametrize(
    ("flags", "label"),
    [("avx2 amx_bf16 avx512_bf16 avx512f", "AMX BF16"), ("avx2 avx512_bf16 avx512f", "AVX-512 BF16"),
     ("avx2 avx512f", "AVX-512"), ("avx2 fma", "AVX2"), ("sse2", None)],
)  # fmt: skip
def test_the_cpu_is_named_by_its_best_matrix_or_vector_extension(tmp_path, flags, label):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu {flags}\n\nprocessor\t: 1\n")
    assert speed.cpu_name(cpuinfo) == (f"Some Xeon CPU ({label})" if label else "Some Xeon CPU")


@pytest.mark.parametrize(
    ("device", "cpus", "world", "threads", "warned"),
    [("cpu", 2, 1, 1, True), ("cpu", 8, 1, 3, True), ("cpu", 2, 1, 2, False), ("cpu", 2, 2, 1, False),
     ("cuda", 2, 1, 1, False)],
)  # fmt: skip
def test_a_single_cpu_process_on_fewer_threads_than_its_cpus_is_told_the_launch_flag(monkeypatch, device, cpus, world,
                                                                                    threads, warned):  # fmt: skip
    """accelerate launch gives a CPU process one thread unless told: the warning names the flag and the CPUs."""
    monkeypatch.setattr(speed.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(speed.torch, "get_num_threads", lambda: threads)
    accelerator = type("FakeAccelerator", (), {"device": torch.device(device), "num_processes": world})()
    expected = (f"{threads} torch thread(s) on {cpus} CPU(s): pass `accelerate launch --num_cpu_threads_per_process "
                f"{cpus}` to use them")  # fmt: skip
    assert speed.idle_cores_warning(accelerator) == (expected if warned else None)


def test_the_trainer_logs_the_idle_cores_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(speed.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(speed.torch, "get_num_threads", lambda: 1)
    Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "o"), *STEPS])).train()
    assert any(r.message.endswith("--num_cpu_threads_per_process 3` to use them") for r in caplog.records)


def test_compiled_digits_unet_gets_the_eager_gradients(tmp_path):
    # torch 2.13's CPU inductor, with its layout optimisation, gave this UNet (3 levels; tiny-8's 2 were right)
    # zero gradients below its second up-sampling block: every compiled training step trained a quarter of it
    PartialState()  # accelerate's logger, which a warning would go through, needs it
    torch.manual_seed(0)
    unet = build_unet("digits-16")
    x, t = torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,))

    def gradients():
        unet.zero_grad(set_to_none=True)
        unet(x, t).sample.square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    eager = gradients()
    assert speed.compile_unet(unet, gradients) and "forward" in vars(unet)
    for name, a, b in zip([n for n, _ in unet.named_parameters()], eager, gradients(), strict=True):
        if not name.endswith(NOISE_ONLY):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_a_miscompiled_unet_is_caught_on_its_trial_call_and_runs_eager(monkeypatch, caplog):
    def miscompiling(function, **options):
        def call(*args, **kwargs):
            out = function(*args, **kwargs)
            out.sample = out.sample * 0  # what zero gradients below a block look like at the output
            return out

        return call

    PartialState()  # accelerate's logger, which the warning goes through, needs it
    unet = build_unet("tiny-8").eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    monkeypatch.setattr(torch, "compile", miscompiling)
    with torch.no_grad():
        assert not speed.compile_unet(unet, lambda: [unet(x, t).sample])
    assert "forward" not in vars(unet)
    warned = [r.message for r in caplog.records if "--torch_compile" in r.message]
    assert len(warned) == 1 and warned[0].endswith(
        "--torch_compile: the compiled UNet is wrong (1 of 1 tensors of a trial call differ from eager (relative "
        "error up to 1.00)); running eager"
    )


def test_compiled_mismatch_allows_rounding_and_ignores_float_noise_but_not_nan():
    big, noise = torch.ones(100), torch.full((3,), 1e-9)
    assert speed.compiled_mismatch([big, noise], [big * 1.02, -noise]) is None  # bf16-sized error; noise flipped
    assert speed.compiled_mismatch([big, noise], [big * 0, noise]) == (
        "1 of 2 tensors of a trial call differ from eager (relative error up to 1.00)"
    )
    assert speed.compiled_mismatch([big, noise], [big, noise * float("nan")]).startswith("1 of 2")


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


def test_adamw_is_fused_on_cuda_and_cpu_and_the_trainer_uses_the_choice(tmp_path, monkeypatch):
    assert speed.adamw_options(torch.device("cuda", 0)) == {"fused": True}
    assert speed.adamw_options(torch.device("cpu")) == {"fused": True}
    assert speed.adamw_options(torch.device("meta")) == {}
    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "o"), *STEPS]))
    assert trainer.optimizer.param_groups[0]["fused"] is True
    assert isinstance(trainer.ema, speed.LerpEMA)
    monkeypatch.setattr(speed, "adamw_options", lambda device: {})
    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "p"), *STEPS]))
    assert not trainer.optimizer.param_groups[0].get("fused")
    assert trainer.train()["speed_settings"].startswith("eager UNet, NCHW")


def test_fused_adamw_and_lerp_ema_make_the_update_of_the_plain_loops():
    """The fast optimizer and EMA are the same algorithms: after a few steps on the same gradients, the weights
    and the EMA (warm-up decay included) agree with torch's per-parameter AdamW and diffusers' per-parameter EMA to
    float rounding."""
    torch.manual_seed(0)
    shapes = [(64, 32, 3, 3), (64,), (10, 7)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    weights, emas = [], []
    for fast in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        options = speed.adamw_options(torch.device("cpu")) if fast else {}
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **options)
        ema = (speed.LerpEMA(params, decay=0.9, use_ema_warmup=True, **speed.EMA_OPTIONS) if fast else
               EMAModel(params, decay=0.9, use_ema_warmup=True))  # fmt: skip
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
            ema.step(params)
        weights.append(params)
        emas.append(ema.shadow_params)
    assert all((p - s).abs().min() > 0 for p, s in zip(weights[0], start, strict=True))  # every weight moved
    for plain, fast in (weights, emas):
        for a, b in zip(plain, fast, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(emas[1][0], weights[1][0]) and ema.optimization_step == len(grads)


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
    # min-max are over blocks of steps; the share over all steps is a ratio of medians, which can fall outside them
    overhead = results["overhead"]
    assert -1 < overhead["min"] <= overhead["max"] < 1 and -1 < overhead["median"] < 1
    assert "outside forward/backward and the optimizer" in out
    assert "hf_ddpm / reference" in out and "CPU" in out
    out = benchmark("train_throughput.py", "--preset", "tiny-8", "--batch_size", "8", "--steps", "2", "--rounds",
                    "1", "--profile_steps", "0", "--overhead_steps", "0")  # fmt: skip
    assert "hf_ddpm / reference" in out and "outside forward" not in out and "profiled" not in out


def test_train_throughput_can_hold_the_reference_in_fp32_beside_a_bf16_trainer_whose_log_says_bf16():
    # in one process, as the benchmark runs them: the trainer under accelerate's bf16 autocast, the reference not
    code = """
import sys, tempfile, torch
sys.path.insert(0, "benchmarks")
from train_throughput import ReferenceLoop
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(parse_training_args(["--preset", "tiny-8", "--train_batch_size", "4", "--output_dir", tmp,
        "--report_to", "none", "--max_train_steps", "10", "--mixed_precision", "bf16"]))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    sides = {"bf16": ReferenceLoop(trainer.args, trainer.unet.config, trainer.data, trainer.accelerator),
             "fp32": ReferenceLoop(trainer.args, trainer.unet.config, trainer.data, trainer.accelerator, fp32=True)}
    for name, loop in sides.items():
        loop.step()
        ran = []  # the dtype the first convolution computed in
        loop.model.conv_in.register_forward_hook(lambda module, args, out: ran.append(out.dtype))
        loop.model(x, t)
        print(name, ran[0], loop.weight_dtype)
    print(trainer._levers())
"""
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == [
        "bf16 torch.bfloat16 torch.bfloat16",
        "fp32 torch.float32 torch.float32",
        "eager UNet, NCHW, bf16 autocast, fused AdamW, foreach-lerp EMA",
    ]


def test_data_throughput_times_both_paths_and_the_steps_consumption(tmp_path):
    out = benchmark("data_throughput.py", "--resolutions", "8", "--num_images", "16", "--num_shards", "2", "--workers",
                    "0", "1", "--batch_size", "4", "--batches", "2", "--presets", "tiny-8", "--train_batch_size", "2",
                    "--train_steps", "1", "--json", str(tmp_path / "d.json"))  # fmt: skip
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [(row["path"], row["workers"]) for row in rows] == [
        ("cached (get_batch)", "-"),
        ("streaming", 0),
        ("streaming", 1),
        ("training consumes (tiny-8)", "-"),
    ]
    assert all(row["img_s"] > 0 for row in rows) and "| streaming | 8 | 1 |" in out


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
