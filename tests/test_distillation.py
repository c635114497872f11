"""Distillation: the progressive target against closed forms and diffusers' DDIM, runs end to end on a tiny
teacher (an hf_ddpm run and one saved by plain diffusers), exact resume across a round, and the student sampled
by plain diffusers without hf_ddpm."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_without_hf_ddpm
from safetensors.torch import load_file
from test_speed import assert_close_weights

from hf_ddpm import checkpointing
from hf_ddpm.distillation import (
    ConsistencyDistiller,
    DistillationArguments,
    Distiller,
    consistency_function,
    ddim_step,
    distill,
    loss_weight,
    parse_distillation_args,
    progressive_target,
)
from hf_ddpm.errors import ConfigError
from hf_ddpm.hub import load_pipeline
from hf_ddpm.model_card import write_model_card
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.presets import build_unet
from hf_ddpm.sampling import generate

FAST = ["--train_batch_size", "8", "--logging_steps", "2", "--num_final_images", "4", "--max_train_samples", "64",
        "--report_to", "none", "--teacher_steps", "8", "--first_student_steps", "2", "--steps_per_round", "2",
        "--lr_warmup_steps", "1"]  # fmt: skip

_spec = importlib.util.spec_from_file_location("student_speed", REPO_ROOT / "benchmarks" / "student_speed.py")
student_speed = sys.modules["student_speed"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(student_speed)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny-8 DDPM saved by plain diffusers only: no training_summary.json, no hf_ddpm classes."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    unet = build_unet("tiny-8")
    with torch.no_grad():  # a non-trivial network
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.1)
    scheduler = diffusers.DDPMScheduler(timestep_spacing="trailing", thresholding=True, sample_max_value=1.0)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def run(teacher: Path, out: Path, *extra: str) -> dict:
    return distill(parse_distillation_args([str(teacher), *FAST, "--output_dir", str(out), *extra]))


def abar_of(alphas_cumprod: torch.Tensor):
    return lambda t: torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones(())).view(-1, 1)


def test_ddim_step_is_diffusers_ddim_with_the_clipped_prediction():
    scheduler = diffusers.DDIMScheduler(clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(4)
    abar = abar_of(scheduler.alphas_cumprod.double())
    generator = torch.Generator().manual_seed(0)
    z, eps = torch.randn(3, 5, generator=generator, dtype=torch.float64), torch.randn(3, 5, generator=generator)
    for t in scheduler.timesteps.tolist():
        s = t - 1000 // 4
        expected = scheduler.step(eps.double(), t, z, use_clipped_model_output=True).prev_sample
        tt = torch.full((3,), t)
        x0 = ((z - (1 - abar(tt)).sqrt() * eps) / abar(tt).sqrt()).clamp(-1, 1)
        torch.testing.assert_close(ddim_step(x0, z, abar(tt), abar(torch.full((3,), s))), expected)


@pytest.mark.parametrize("times", [(999, 499, -1), (749, 624, 499), (400, 390, 380), (124, 109, 94, 79, -1)])
def test_progressive_target_is_the_teacher_ddim_steps_on_a_linear_toy(times):
    """Gaussian data x ~ N(0, s^2): the ideal teacher is linear, x^(z, t) = c_t z with c_t = alpha s^2 / (alpha^2
    s^2 + sigma^2), so each DDIM step t -> u scales z by k(t, u) and the target is (prod k - r) / (alpha'' - r alpha)
    z_t, r = sigma''/sigma; one DDIM step from z_t with the target lands where the teacher's steps did."""
    alphas_cumprod = diffusers.DDPMScheduler().alphas_cumprod.double()
    abar = abar_of(alphas_cumprod)
    s2 = 0.3

    def a(u):
        return 1.0 if u < 0 else alphas_cumprod[u].item()

    def c(u):
        return a(u) ** 0.5 * s2 / (a(u) * s2 + 1 - a(u))

    def k(u, v):  # z_v / z_u for one DDIM step of the linear teacher
        r = ((1 - a(v)) / (1 - a(u))) ** 0.5
        return a(v) ** 0.5 * c(u) + r * (1 - a(u) ** 0.5 * c(u))

    zt = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = progressive_target(lambda z, u: c(u[0].item()) * z, zt, [torch.full((4,), u) for u in times], abar)
    scale = np.prod([k(u, v) for u, v in itertools.pairwise(times)])
    t, t_next = times[0], times[-1]
    r = ((1 - a(t_next)) / (1 - a(t))) ** 0.5
    torch.testing.assert_close(target, (scale - r) / (a(t_next) ** 0.5 - r * a(t) ** 0.5) * zt)
    one_step = ddim_step(target, zt, abar(torch.full((4,), t)), abar(torch.full((4,), t_next)))
    torch.testing.assert_close(one_step, scale * zt)


def test_landing_weight_is_the_squared_move_of_the_ddim_landing_point_per_unit_x_error_in_noise_units():
    """Against autograd of `ddim_step`: d z_s / d x^ (elementwise) over sigma_s, squared, capped at max(SNR_t, 1);
    into sigma_s = 0 (and without `landing`) the paper's max(SNR_t, 1)."""
    alphas_cumprod = diffusers.DDPMScheduler().alphas_cumprod.double()
    abar = abar_of(alphas_cumprod)
    for t, s in ((999, 874), (874, 749), (249, 124), (124, -1), (999, -1), (499, 249)):
        abar_t, abar_s = abar(torch.tensor([t])), abar(torch.tensor([s]))
        snr_weight = (abar_t / (1 - abar_t)).clamp(min=1)
        torch.testing.assert_close(loss_weight(abar_t, abar_s, landing=False), snr_weight)
        x0 = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
        (gain,) = torch.autograd.grad(ddim_step(x0, torch.ones(1, 1, dtype=torch.float64), abar_t, abar_s).sum(), x0)
        expected = snr_weight if s < 0 else torch.minimum(snr_weight, gain.square() / (1 - abar_s))
        torch.testing.assert_close(loss_weight(abar_t, abar_s, landing=True), expected)
    # the first grid point of an 8-step grid barely counts; the last step into sigma = 0 counts fully
    assert loss_weight(abar(torch.tensor([999])), abar(torch.tensor([874])), landing=True).item() < 1e-3
    assert loss_weight(abar(torch.tensor([124])), abar(torch.tensor([-1])), landing=True).item() > 1


@pytest.mark.parametrize("flag", [["--landing_weight", "true"], []])
def test_landing_weight_applies_only_in_the_epsilon_teachers_round(teacher, tmp_path, monkeypatch, flag):
    import hf_ddpm.distillation as distillation

    landing = []
    real = distillation.loss_weight
    monkeypatch.setattr(distillation, "loss_weight", lambda a, b, on: landing.append(on) or real(a, b, on))
    run(teacher, tmp_path / "student", *flag)  # 2 rounds of 2 steps; round 2's teacher is round 1's v student
    assert landing == ([True, True, False, False] if flag else [False] * 4)


def test_arguments_refuse_steps_that_do_not_halve_and_set_the_run_length():
    with pytest.raises(ConfigError, match="power of 2"):
        DistillationArguments(teacher_steps=12, first_student_steps=None, student_steps=1)
    with pytest.raises(ConfigError, match="power of 2"):
        DistillationArguments(teacher_steps=64, first_student_steps=6)
    with pytest.raises(ConfigError, match="--method"):
        DistillationArguments(method="gan")
    paper = DistillationArguments(teacher_steps=16, first_student_steps=None, student_steps=2, steps_per_round=[10])
    assert paper.num_rounds == 3 and paper.max_train_steps == 30 and paper.final_steps == 2
    assert paper.steps_per_round == [10, 10, 10] and [paper.round_at(s) for s in (0, 9, 10, 29)] == [
        (0, 0), (0, 9), (1, 0), (2, 9)]  # fmt: skip
    uneven = parse_distillation_args(["t", "--steps_per_round", "4", "2", "3", "1"])
    assert uneven.max_train_steps == 10 and [uneven.round_at(s)[0] for s in range(10)] == [0] * 4 + [1] * 2 + [
        2] * 3 + [3]  # fmt: skip
    with pytest.raises(ConfigError, match="--steps_per_round gives 2 numbers for 4 rounds"):
        DistillationArguments(steps_per_round=[4, 2])
    assert [paper.round_steps(r) for r in range(3)] == [8, 4, 2]
    assert [paper.steps_per_student_step(r) for r in range(3)] == [2, 2, 2]
    default = DistillationArguments()  # the paper's halving from 16 teacher steps: 8 -> 4 -> 2 -> 1
    assert [default.round_steps(r) for r in range(default.num_rounds)] == [8, 4, 2, 1]
    assert [default.steps_per_student_step(r) for r in range(default.num_rounds)] == [2, 2, 2, 2]
    assert default.teacher_solver == "dpmsolver++" and default.steps_per_round == [1300, 1500, 1500, 1500]
    assert default.max_train_steps == 5800 and default.learning_rate == 1e-4
    four_to_one = DistillationArguments(first_student_steps=4)  # 3 rounds: 16 teacher steps -> 4 -> 2 -> 1
    assert four_to_one.steps_per_round == [1300, 1500, 1500] and four_to_one.steps_per_student_step(0) == 4


def test_plain_diffusers_teacher_distils_to_a_student_that_plain_diffusers_samples(teacher, tmp_path):
    out = tmp_path / "student"
    results = run(teacher, out)
    assert results["global_step"] == 4
    for folder in (out, out / "students" / "2-step", out / "students" / "1-step"):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    config = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    assert (out / "samples.png").is_file()
    card = (out / "README.md").read_text()
    assert f"Distilled from the DDPM `{teacher}` by progressive distillation" in card
    assert "num_inference_steps=1" in card and "DDPMPipeline.from_pretrained" in card
    entry = {"metric": "digits_fd", "value": 7.5, "sampler": "ddim", "num_inference_steps": 2, "num_samples": 512,
             "seed": 0}  # fmt: skip
    (out / "students/2-step/eval_results.json").write_text(json.dumps({"results": [entry]}))
    write_model_card(out)
    assert "| `students/2-step` | 2 | FD (digit classifier features) | 7.5 | 512 |" in (out / "README.md").read_text()
    code = """
import numpy as np, torch
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained("student")
assert type(pipe.scheduler).__name__ == "DDIMScheduler"
seeds = [np.random.SeedSequence((0, i)).generate_state(1, np.uint64)[0] for i in range(3)]
generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
images = pipe(batch_size=3, generator=generators, num_inference_steps=2, output_type="np").images
np.save("plain.npy", images)
"""
    run_without_hf_ddpm(code, cwd=tmp_path)
    plain = np.load(tmp_path / "plain.npy")
    ours = generate(DDPMPipeline.from_pretrained(out), 3, sampler="ddim", num_inference_steps=2, progress=False)
    assert np.abs(np.round(plain * 255).astype(int) - ours.permute(0, 2, 3, 1).numpy()).max() <= 1


def test_torch_compile_compiles_the_teacher_too_and_distils_what_eager_does(teacher, tmp_path, monkeypatch):
    from hf_ddpm import speed

    compiled = []
    real = speed.compile_unet
    monkeypatch.setattr(speed, "compile_unet", lambda unet, trial: compiled.append(unet) or real(unet, trial))
    distiller = Distiller(parse_distillation_args([str(teacher), *FAST, "--output_dir", str(tmp_path / "compiled"),
                                                   "--torch_compile"]))  # fmt: skip
    assert compiled == [distiller.unet, distiller.teacher.unet] and "forward" in vars(distiller.teacher.unet)
    assert distiller.train()["speed_settings"].startswith("compiled UNet")
    run(teacher, tmp_path / "eager")
    name = "unet/diffusion_pytorch_model.safetensors"
    for folder in ("", "students/2-step"):  # round 2's teacher is round 1's student, compiled in place
        eager, fast = (load_file(tmp_path / side / folder / name) for side in ("eager", "compiled"))
        assert_close_weights(eager, fast)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("reset", [False, True])
def test_reset_optimizer_starts_adams_moments_afresh_each_round(teacher, tmp_path, reset):
    args = [str(teacher), *FAST, "--output_dir", str(tmp_path / "student"), "--steps_per_round", "2", "3"]
    distiller = Distiller(parse_distillation_args([*args] if reset else [*args, "--reset_optimizer", "false"]))
    distiller.train()  # 2 rounds: 2 steps, then 3
    states = distiller.optimizer.state.values()
    assert len(states) == len(list(distiller.unet.parameters()))
    assert {int(state["step"]) for state in states} == {3 if reset else 5}


@pytest.mark.parametrize("reset", [[], ["--reset_optimizer", "false"]])
def test_resume_across_a_round_is_bit_exact(teacher, tmp_path, monkeypatch, reset):
    # rounds of 1, 3 and 2 steps (4 -> 2 -> 1 student steps): the second round spans steps 2-4
    args = ["--checkpointing_steps", "1", "--teacher_steps", "8", "--first_student_steps", "4", "--steps_per_round",
            "1", "3", "2", *reset]  # fmt: skip
    straight = tmp_path / "straight"
    run(teacher, straight, *args)

    real_save = checkpointing.save_checkpoint

    def save_then_die(accelerator, folder, step, state, limit):
        real_save(accelerator, folder, step, state, limit)
        if step == 3:  # inside round 2: its teacher is round 1's student, restored from the checkpoint
            raise _Interrupt(step)

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
    resumed = tmp_path / "resumed"
    with pytest.raises(_Interrupt):
        run(teacher, resumed, *args)
    monkeypatch.setattr(checkpointing, "save_checkpoint", real_save)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert run(teacher, resumed, *args, "--resume_from_checkpoint", "latest")["global_step"] == 6
    assert sorted(p.name for p in (resumed / "students").iterdir()) == ["1-step", "2-step", "4-step"]
    for folder in ("", "students/2-step", "checkpoints/checkpoint-6"):
        name = "model.safetensors" if folder.startswith("checkpoints") else "unet/diffusion_pytorch_model.safetensors"
        a, b = load_file(straight / folder / name), load_file(resumed / folder / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{folder or 'export'} differs after resume"


def test_make_distill_launches_on_every_core_with_the_users_flags():
    """accelerate launch gives a CPU process one thread unless told (README, Distillation); `nproc`, which the
    Makefile asks, counts the CPUs this process may use (and honours an OMP_NUM_THREADS the user set)."""
    # run as a top-level make, also under `make test` (whose MAKEFLAGS would print "make[1]: Leaving directory")
    unset = ("OMP_NUM_THREADS", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    env = {key: value for key, value in os.environ.items() if key not in unset}
    made = subprocess.run(["make", "--no-print-directory", "-n", "distill", "ARGS=--seed 3"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    launch = " ".join(made.replace("\\\n", " ").split("accelerate launch", 1)[1].split())
    assert f"--num_cpu_threads_per_process {len(os.sched_getaffinity(0))}" in launch
    assert launch.endswith("scripts/distill.py output --seed 3")


def test_consistency_function_is_x_at_sigma_min_and_what_diffusers_pipeline_samples():
    torch.manual_seed(0)
    unet = build_unet("tiny-8").eval()
    scheduler = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=18, sigma_min=0.01, sigma_max=150.0)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(consistency_function(unet, scheduler, x, torch.full((3,), 0.01, dtype=torch.float64)), x)
        pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(2)
        sampled = pipe(batch_size=3, num_inference_steps=1, generator=generator, output_type="np").images
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        sigma = torch.full((3,), 150.0, dtype=torch.float64)
        ours = consistency_function(unet, scheduler, noise * 150.0, sigma).clamp(-1, 1) / 2 + 0.5
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), sampled, atol=1e-5)


def test_consistency_teacher_reads_the_ddpm_at_the_timestep_of_each_noise_level(teacher, tmp_path):
    distiller = ConsistencyDistiller(parse_distillation_args([str(teacher), *FAST, "--output_dir", str(tmp_path)]))
    process = distiller.teacher.process
    abar = process.tables.alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    x0 = distiller.teacher_denoise(z.double() / abar[t].sqrt().view(-1, 1, 1, 1), sigma)
    torch.testing.assert_close(x0.float(), distiller.teacher.predict_x0(z, t), atol=1e-4, rtol=1e-4)


def test_consistency_student_is_a_consistency_model_pipeline_that_plain_diffusers_samples(teacher, tmp_path):
    out = tmp_path / "student"
    assert (
        run(teacher, out, "--method", "consistency", "--max_train_steps", "3", "--num_scales", "6")["global_step"] == 3
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert index["scheduler"] == ["diffusers", "CMStochasticIterativeScheduler"]
    card = (out / "README.md").read_text()
    assert "consistency distillation" in card and "ConsistencyModelPipeline.from_pretrained" in card
    code = """
import numpy as np, torch
from diffusers import ConsistencyModelPipeline
pipe = ConsistencyModelPipeline.from_pretrained("student")
seeds = [np.random.SeedSequence((0, i)).generate_state(1, np.uint64)[0] for i in range(3)]
generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
np.save("plain.npy", pipe(batch_size=3, generator=generators, num_inference_steps=2, output_type="np").images)
"""
    run_without_hf_ddpm(code, cwd=tmp_path)
    plain = np.load(tmp_path / "plain.npy")
    assert np.isfinite(plain).all()
    ours = generate(load_pipeline(str(out)), 3, sampler="consistency", num_inference_steps=2, progress=False)
    assert np.abs(np.round(plain * 255).astype(int) - ours.permute(0, 2, 3, 1).numpy()).max() <= 1


def test_student_speed_figures_are_per_round_rates_and_the_ratio_of_the_medians():
    seconds = {"student": [0.5, 1.0, 0.8], "teacher": [10.0, 16.0, 12.5]}  # 4 images: 8, 4, 5 vs 0.4, 0.25, 0.32
    figures = student_speed.summarize(4, seconds, {"student": 1.0, "teacher": 20.0})
    student, teacher = figures["sides"]["student"], figures["sides"]["teacher"]
    assert student["median_images_per_s"] == pytest.approx(5.0)
    assert teacher["median_images_per_s"] == pytest.approx(0.32)
    assert figures["ratio"] == pytest.approx(5.0 / 0.32) and not figures["goal_met"]  # 15.6x
    assert figures["round_ratios"] == pytest.approx([20.0, 16.0, 5.0 / 0.32])
    assert teacher["median_evals_per_s"] == pytest.approx(6.4)  # 0.32 images/s x 20 calls
    assert figures["evals_ratio"] == pytest.approx(5.0 / 6.4)
    lines = student_speed.report(figures)
    assert "per-round ratios: 15.6x-20.0x" in lines
    assert lines[-1] == "student / teacher images per second: 15.6x (goal >= 20x: missed)"
    faster = student_speed.summarize(4, {"student": [0.1], "teacher": [10.0]}, {"student": 1.0, "teacher": 20.0})
    assert student_speed.report(faster)[-1] == "student / teacher images per second: 100.0x (goal >= 20x: met)"


def test_student_speed_times_both_sides_and_counts_their_unet_calls(teacher, tmp_path, capsys):
    """The student is the teacher's own pipeline sampled at 1 DDIM step: what is checked is the wiring."""
    figures = tmp_path / "speed.json"
    student_speed.main([str(teacher), str(teacher), "--teacher_steps", "3", "--num_images", "4", "--batch_size",
                        "2", "--rounds", "1", "--json", str(figures)])  # fmt: skip
    out = capsys.readouterr().out
    results = json.loads(figures.read_text())
    student, teacher_side = results["sides"]["student"], results["sides"]["teacher"]
    assert (student["sampler"], student["steps"]) == ("ddim", 1)
    assert (teacher_side["sampler"], teacher_side["steps"]) == ("sde-dpmsolver++", 3)
    assert (student["unet_evals_per_image"], teacher_side["unet_evals_per_image"]) == (1, 3)  # counted by a hook
    assert results["ratio"] > 0 and len(results["round_ratios"]) == 1
    assert f"student / teacher images per second: {results['ratio']:.1f}x (goal >= 20x: " in out
    assert "UNet calls per image: student 1, teacher 3" in out and "torch threads" in out
    assert "(the student's drawn 3 times a round, the teacher's 1)" in out  # both sides of a round as long
    assert "UNet evaluations per second (images x calls / s): student" in out


@pytest.mark.parametrize("grid", [(749, 687, 624, 562, 499), (249, 187, 124, 62, -1)], ids=["middle", "into-x0"])
def test_the_dpmsolver_teacher_steps_are_diffusers_dpmsolver_multistep(grid):
    """--teacher_solver dpmsolver++: the teacher's steps are diffusers' DPM-Solver++(2M) (data prediction, x^
    clipped, first order into sigma = 0) on the same timesteps, and one DDIM step from z_t with the target lands
    where they did."""
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                      final_sigmas_type="zero")  # fmt: skip
    alphas_cumprod = scheduler.alphas_cumprod.double()
    abar = abar_of(alphas_cumprod)

    def teacher(z, u):  # linear, with values beyond [-1, 1] that the clipping cuts: not a Gaussian's ideal teacher
        a = alphas_cumprod[u.clamp(min=0)].view(-1, 1)
        return (1.5 * a.sqrt() / (a + 0.3 * (1 - a)) * z).clamp(-1, 1)

    zt = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = progressive_target(teacher, zt, [torch.full((4,), u) for u in grid], abar, "dpmsolver++")
    landed = ddim_step(target, zt, abar(torch.full((4,), grid[0])), abar(torch.full((4,), grid[-1])))
    # diffusers, from grid[0] to grid[-1] (its last timestep, where the middle interval ends, is not stepped from)
    scheduler.set_timesteps(timesteps=[u for u in grid if u >= 0])
    z = zt
    for u in scheduler.timesteps[: len(grid) - 1]:
        a = alphas_cumprod[u]
        epsilon = (z - a.sqrt() * teacher(z, torch.full((4,), int(u)))) / (1 - a).sqrt()  # read back as x^
        z = scheduler.step(epsilon, u, z).prev_sample
    torch.testing.assert_close(landed, z)
    ddim = progressive_target(teacher, zt, [torch.full((4,), u) for u in grid], abar)
    assert (ddim - target).abs().max() > 1e-3  # the second-order steps are not DDIM's
    # in a batch whose images end in different intervals (as a training batch does), each gets its own steps
    other = (249, 187, 124, 62, -1) if grid[-1] >= 0 else (749, 687, 624, 562, 499)
    mixed = [torch.tensor([u, u, v, v]) for u, v in zip(grid, other, strict=True)]
    alone = progressive_target(teacher, zt, [torch.full((4,), v) for v in other], abar, "dpmsolver++")
    torch.testing.assert_close(progressive_target(teacher, zt, mixed, abar, "dpmsolver++"),
                               torch.cat([target[:2], alone[2:]]))  # fmt: skip
