"""hf_ddpm.sampling and scripts/sample.py on an untrained tiny-8 pipeline: samplers, determinism, files, CLI."""

from __future__ import annotations

import inspect
import os
import runpy
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_without_hf_ddpm
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers import DDPMPipeline as DiffusersDDPMPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from hf_ddpm.arguments import parse_model_arguments
from hf_ddpm.hub import load_pipeline
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.presets import build_unet
from hf_ddpm.sampling import (
    CLIP_SAMPLE_CONFIG,
    SAMPLERS,
    SAMPLING_CONFIG,
    SampleArguments,
    compile_for_sampling,
    default_steps,
    generate,
    image_generators,
    load_images,
    make_scheduler,
    runs_in_plain_diffusers,
    save_images,
    scheduler_settings,
    to_uint8,
    usage_snippet,
)
from hf_ddpm.scheduler import DDPMScheduler

SAMPLE_SCRIPT = REPO_ROOT / "scripts" / "sample.py"


@pytest.fixture(scope="module")
def pipe() -> DDPMPipeline:
    torch.manual_seed(0)
    return DDPMPipeline(unet=build_unet("tiny-8"), scheduler=DDPMScheduler())


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-8")
    pipe.save_pretrained(path)
    return path


def uint8_images(n: int, channels: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed)).byte()


def assert_same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal but for a rare one-level rounding flip.

    Batched CPU kernels sum in a batch-size dependent order, so the [0, 1] floats of one image differ by up to
    ~3e-5 between batch sizes (measured: 1e-6 DDPM, 3e-5 DPM-Solver++); a value that close to a rounding
    boundary then lands one uint8 level away. Process and thread counts add nothing beyond that.
    """
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_uint8_images_and_leaves_the_pipeline_alone(pipe, sampler):
    scheduler = pipe.scheduler
    images = generate(pipe, 3, sampler=sampler, num_inference_steps=3, batch_size=2, progress=False)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.uint8 and images.device.type == "cpu"
    assert pipe.scheduler is scheduler and pipe.scheduler.config.timestep_spacing == "leading"
    assert not pipe.scheduler.config.thresholding


def test_sampling_runs_without_dropout_and_leaves_the_unets_mode_as_it_was():
    torch.manual_seed(0)
    unet = build_unet("tiny-8", dropout=0.5).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    evaluated = generate(pipe, 2, sampler="ddim", num_inference_steps=2, progress=False)
    assert not unet.training
    unet.train()
    assert torch.equal(generate(pipe, 2, sampler="ddim", num_inference_steps=2, progress=False), evaluated)
    assert unet.training


def test_rgb_and_plain_diffusers_pipelines():
    torch.manual_seed(0)
    rgb = DiffusersDDPMPipeline(unet=build_unet("small-16-rgb"), scheduler=DDPMScheduler())
    images = generate(rgb, 2, sampler="dpmsolver++", num_inference_steps=2, progress=False)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8


def test_unknown_sampler_lists_the_valid_ones(pipe):
    for call in (
        lambda: make_scheduler("plms", pipe.scheduler.config),
        lambda: default_steps("plms"),
        lambda: generate(pipe, 1, sampler="plms"),
    ):
        with pytest.raises(ValueError, match="unknown sampler 'plms'; valid samplers: ddpm, ddim, dpmsolver"):
            call()


def test_default_steps():
    assert {s: default_steps(s) for s in SAMPLERS} == {
        "ddpm": 1000,
        "ddim": 50,
        "dpmsolver++": 20,
        "sde-dpmsolver++": 20,
        "unipc": 20,
        "euler_a": 100,
    }


def test_make_scheduler_overrides_a_leading_clipping_ddpm_config():
    config = DDPMScheduler(
        timestep_spacing="leading", clip_sample=True, beta_end=0.03, prediction_type="v_prediction"
    ).config
    made = {name: make_scheduler(name, config) for name in SAMPLERS}
    assert type(made["ddpm"]) is DDPMScheduler  # the paper's sampler
    assert isinstance(made["ddim"], DDIMScheduler) and made["ddim"].config.set_alpha_to_one
    for name in ("dpmsolver++", "sde-dpmsolver++"):
        dpm = made[name]
        assert isinstance(dpm, DPMSolverMultistepScheduler)
        assert (dpm.config.algorithm_type, dpm.config.solver_order) == (name, 2)
        assert dpm.config.lower_order_final and dpm.config.final_sigmas_type == "zero"
    assert made["unipc"].config.predict_x0 and made["unipc"].config.solver_order == 2
    assert isinstance(made["euler_a"], EulerAncestralDiscreteScheduler)
    for name, scheduler in made.items():
        # the training noise schedule and parameterisation carry over; sampling starts at t = T - 1
        assert scheduler.config.beta_end == 0.03 and scheduler.config.prediction_type == "v_prediction", name
        assert scheduler.config.timestep_spacing == "trailing", name
        scheduler.set_timesteps(default_steps(name) if name != "ddpm" else 10)
        assert int(scheduler.timesteps[0]) == 999, name
        if name in ("ddpm", "ddim"):  # x_0 clipped to [-1, 1] by every solver that predicts x_0: by clip_sample
            assert {key: scheduler.config[key] for key in CLIP_SAMPLE_CONFIG} == CLIP_SAMPLE_CONFIG, name
        elif name != "euler_a":  # by thresholding at a maximum of 1 in the others
            assert scheduler.config.thresholding and scheduler.config.sample_max_value == 1.0, name


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ddpm_and_ddim_clip_by_clip_sample_as_thresholding_at_1_does(sampler):
    """hf_ddpm runs DDPM and DDIM with clip_sample instead of the saved thresholding at 1 (no quantile per step):
    the same steps, bit for bit, on predictions far outside [-1, 1]."""
    config = DDPMScheduler(**SAMPLING_CONFIG).config
    ours = make_scheduler(sampler, config)
    assert not ours.config.thresholding and ours.config.clip_sample
    thresholding = type(ours).from_config(config, **scheduler_settings(sampler, config))
    assert thresholding.config.thresholding and thresholding.config.sample_max_value == 1.0
    for scheduler in (ours, thresholding):
        scheduler.set_timesteps(4)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        output = 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        a = ours.step(output, t, x, generator=torch.Generator().manual_seed(1))
        b = thresholding.step(output, t, x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.pred_original_sample, b.pred_original_sample) and a.pred_original_sample.abs().max() == 1
        assert torch.equal(a.prev_sample, b.prev_sample)
        x = a.prev_sample
    # a config that clips by clip_sample already (a distilled student's) asks for no thresholding in a snippet
    assert "thresholding" not in scheduler_settings(sampler, ours.config)
    assert scheduler_settings("dpmsolver++", ours.config)["thresholding"] is True


def test_x0_clipping_bounds_every_solver_prediction():
    """A model that predicts x_0 = 5 everywhere ends at x_0 = 1 (clipped) with every clipping sampler."""
    config = DDPMScheduler(prediction_type="sample").config
    for name in SAMPLERS:
        if name == "euler_a":  # no x_0 prediction to clip in diffusers' Euler schedulers
            continue
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(4)
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        for t in scheduler.timesteps:
            kwargs = {"generator": torch.Generator().manual_seed(1)} if takes_generator else {}
            x = scheduler.step(torch.full_like(x, 5.0), t, x, **kwargs).prev_sample
        assert torch.allclose(x, torch.ones_like(x), atol=1e-4), (name, float(x.max()))


def test_trained_models_save_the_sampling_settings_plain_diffusers_inherits():
    from hf_ddpm.trainer import make_noise_scheduler
    from hf_ddpm.training_args import TrainingArguments

    config = make_noise_scheduler(TrainingArguments()).config
    assert {k: config[k] for k in SAMPLING_CONFIG} == SAMPLING_CONFIG
    # what a plain-diffusers snippet must still pass: only what the saved config cannot carry
    assert scheduler_settings("ddpm", config) == {} and scheduler_settings("ddim", config) == {}
    assert scheduler_settings("dpmsolver++", config) == {}
    assert scheduler_settings("sde-dpmsolver++", config) == {"algorithm_type": "sde-dpmsolver++"}


@pytest.mark.parametrize("sampler", [name for name in SAMPLERS if SAMPLERS[name].plain_diffusers])
def test_usage_snippet_gives_the_project_images_in_plain_diffusers(model_dir, pipe, tmp_path, sampler):
    """The code the model card shows, run where hf_ddpm cannot be imported, draws generate()'s images."""
    steps = 5
    code = usage_snippet(str(model_dir), pipe.scheduler.config, sampler, steps, num_images=3, seed=2)
    code += "\nnp.save('plain.npy', np.stack([np.asarray(im) for im in images]))"
    run_without_hf_ddpm(code, cwd=tmp_path)
    plain = torch.from_numpy(np.load(tmp_path / "plain.npy"))[:, None]
    ours = generate(pipe, 3, sampler=sampler, num_inference_steps=steps, seed=2, batch_size=3, progress=False)
    assert torch.equal(plain, ours), sampler


def test_what_plain_diffusers_cannot_run_is_said():
    tiny = build_unet("tiny-8").config
    learned = {**tiny, "out_channels": 2 * tiny["in_channels"]}
    assert runs_in_plain_diffusers("sde-dpmsolver++", tiny) and runs_in_plain_diffusers("ddpm", learned)
    assert not runs_in_plain_diffusers("sde-dpmsolver++", learned) and not runs_in_plain_diffusers("ddim", learned)
    assert not runs_in_plain_diffusers("unipc", tiny) and not runs_in_plain_diffusers("euler_a", tiny)


def test_image_generators_depend_on_seed_and_index_only():
    def first_draws(gens):
        return [torch.randn(2, generator=g) for g in gens]

    a = first_draws(image_generators(5, [0, 1, 2, 3]))
    b = first_draws(image_generators(5, [3, 1]))
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], first_draws(image_generators(6, [0]))[0])
    # (seed, i) pairs that `seed * K + i` would map to one seed stay distinct
    assert not torch.equal(first_draws(image_generators(1, [0]))[0], first_draws(image_generators(0, [1_000_003]))[0])


@pytest.mark.parametrize("sampler", ["ddpm", "dpmsolver++"])  # stochastic steps / multistep solver
def test_images_do_not_depend_on_batch_size(pipe, sampler):
    runs = [
        generate(pipe, 8, sampler=sampler, num_inference_steps=6, seed=3, batch_size=b, progress=False)
        for b in (1, 3, 8)
    ]
    for other in runs[1:]:
        assert_same_up_to_rounding(runs[0], other)
    first = generate(pipe, 2, sampler=sampler, num_inference_steps=6, seed=3, batch_size=8, progress=False)
    assert_same_up_to_rounding(first, runs[2][:2])  # image i does not depend on N either
    assert not torch.equal(runs[0], generate(pipe, 8, sampler=sampler, num_inference_steps=6, seed=4, progress=False))


def test_two_processes_give_the_one_process_images(pipe, model_dir, tmp_path):
    output = tmp_path / "two.npz"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(SAMPLE_SCRIPT), str(model_dir), "--num_images", "7", "--sampler", "ddpm",
           "--num_inference_steps", "5", "--seed", "3", "--batch_size", "3", "--output", str(output)]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "made by 2 process(es)" in result.stdout, "accelerate started one process, not two"
    assert result.stdout.count("wrote ") == 1, "only the main process writes"
    expected = generate(pipe, 7, sampler="ddpm", num_inference_steps=5, seed=3, progress=False)
    assert_same_up_to_rounding(load_images(output), expected)


@pytest.mark.parametrize("name", ["samples.png", "samples.npz"])
def test_a_write_that_fails_part_way_leaves_the_previous_images(tmp_path, monkeypatch, name):
    """samples.png (or .npz) is replaced whole or not at all: a writer that dies half-way leaves the old file."""
    path = save_images(uint8_images(4, 3), tmp_path / name)
    before = path.read_bytes()

    def dies_half_way(self_or_file, file=None, *args, **kwargs):
        Path(file if isinstance(self_or_file, Image.Image) else self_or_file).write_bytes(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", dies_half_way)
    monkeypatch.setattr(np, "savez", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_images(uint8_images(4, 3, seed=1), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_save_and_load_npz_folder_and_grid(tmp_path):
    for channels in (1, 3):
        images = uint8_images(5, channels)
        npz = save_images(images, tmp_path / f"s{channels}.npz")
        with np.load(npz) as data:
            assert data["arr_0"].shape == (5, 8, 8, channels) and data["arr_0"].dtype == np.uint8
        assert torch.equal(load_images(npz), images)
        folder = save_images(images, tmp_path / f"dir{channels}")
        assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(5)]
        assert torch.equal(load_images(folder), images)
        grid = Image.open(save_images(images, tmp_path / f"grid{channels}.png", nrow=2))
        assert grid.size == (2 * 8, 3 * 8)
        assert np.array_equal(np.asarray(grid)[8:16, :8].transpose(2, 0, 1)[:channels], images[2].numpy())
        assert not np.asarray(grid)[16:, 8:].any()  # the cell after the last image is black
    assert Image.open(save_images(uint8_images(64, 1), tmp_path / "square.png")).size == (64, 64)


def test_load_images_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a folder"):
        load_images(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_images(tmp_path / "float.npz")
    with pytest.raises(ValueError, match="uint8 tensor"):
        save_images(torch.zeros(2, 1, 8, 8), tmp_path / "x.png")


@pytest.fixture
def restore_diffusers_verbosity():
    """scripts/sample.py silences diffusers' logging for the process; undo that after in-process runs."""
    verbosity = diffusers_logging.get_verbosity()
    yield
    diffusers_logging.set_verbosity(verbosity)


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("tiny-8", ["--sampler", "plms"], "unknown sampler 'plms'; valid samplers: ddpm, ddim"),
        ("tiny-8", ["--num_images", "0"], "--num_images must be a positive integer"),
        ("tiny-8", ["--seed", "-1"], "--seed must be non-negative"),
        ("tiny-8", ["--mixed_precision", "fp16"], "fp16 needs a GPU"),
        ("tmp/no-such-dir", [], "no-such-dir is neither a local folder nor a valid Hub repo id"),
        ("someone/not-a-model", [], "someone/not-a-model is not in the HF cache"),  # offline Hub id
    ],
)
def test_script_errors_are_one_line_and_non_zero(
    model_dir, tmp_path, monkeypatch, capfd, restore_diffusers_verbosity, model, args, message
):
    model = {"tiny-8": str(model_dir), "tmp/no-such-dir": str(tmp_path / "no-such-dir")}.get(model, model)
    monkeypatch.setattr("sys.argv", ["sample.py", model, *args, "--output", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SAMPLE_SCRIPT), run_name="__main__")
    assert exit_info.value.code == 1
    error = capfd.readouterr().err  # run_cli prints the one line; no warnings or tracebacks before it
    assert error.startswith("error: ") and error.count("\n") == 1
    assert message in error
    assert not (tmp_path / "x.png").exists()


def test_the_readme_snippet_draws_the_default_samplers_images_in_plain_diffusers(tmp_path):
    """The README's first python block, run where hf_ddpm cannot be imported, on a model saved as training saves
    one, gives generate()'s images with the recommended sampler at its default steps."""
    import re

    from hf_ddpm.sampling import RECOMMENDED_SAMPLER
    from hf_ddpm.trainer import make_noise_scheduler
    from hf_ddpm.training_args import TrainingArguments

    torch.manual_seed(0)
    trained = DDPMPipeline(unet=build_unet("tiny-8"), scheduler=make_noise_scheduler(TrainingArguments()))
    trained.save_pretrained(tmp_path / "output")
    block = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.DOTALL)[0]
    assert 'from_pretrained("output")' in block
    code = block + "\nnp.save('readme.npy', np.stack([np.asarray(im) for im in images]))"
    run_without_hf_ddpm(code, cwd=tmp_path)
    plain = torch.from_numpy(np.load(tmp_path / "readme.npy"))[:, None]
    ours = generate(trained, 16, sampler=RECOMMENDED_SAMPLER, seed=0, batch_size=16, progress=False)
    assert torch.equal(plain, ours)


def test_torch_compile_samples_what_eager_samples_and_keeps_plain_weights(model_dir):
    eager_pipe = load_pipeline(model_dir)
    compiled_pipe = load_pipeline(model_dir)
    assert compile_for_sampling(compiled_pipe, batch_size=4)
    assert compiled_pipe.unet.state_dict().keys() == eager_pipe.unet.state_dict().keys()
    kwargs = {"sampler": "dpmsolver++", "num_inference_steps": 5, "batch_size": 4, "progress": False}
    eager = generate(eager_pipe, 6, **kwargs).int()  # the last batch of 2 is another shape: compiled again
    compiled = generate(compiled_pipe, 6, **kwargs).int()
    assert (eager - compiled).abs().max() <= 1  # other kernels: float rounding may flip one 8-bit level


def test_a_bare_boolean_flag_before_model_is_the_flag_not_the_models_value():
    model, args = parse_model_arguments((SampleArguments,), ["--allow_pickle", "out", "--num_images", "4"])
    assert (model, args.allow_pickle, args.num_images) == ("out", True, 4)
    model, args = parse_model_arguments((SampleArguments,), ["--allow_pickle", "false", "out"])
    assert (model, args.allow_pickle) == ("out", False)
    model, args = parse_model_arguments((SampleArguments,), ["out", "--allow_pickle"])
    assert (model, args.allow_pickle) == ("out", True)


def test_make_scheduler_gives_a_fresh_scheduler_each_call(pipe):
    """Built once per sampler and config, then copied: one call's stepping state never reaches another's."""
    first = make_scheduler("dpmsolver++", pipe.scheduler.config)
    first.set_timesteps(5)
    first.step(torch.zeros(1, 1, 4, 4), first.timesteps[0], torch.zeros(1, 1, 4, 4))
    second = make_scheduler("dpmsolver++", pipe.scheduler.config)
    assert second is not first and second.num_inference_steps is None and second.step_index is None
    settings = scheduler_settings("dpmsolver++", pipe.scheduler.config)
    built = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **settings)
    assert dict(second.config) == dict(built.config)


def test_generate_looks_for_the_execution_device_and_dtype_once(pipe, monkeypatch):
    """diffusers' `_execution_device` walks every module for offloading hooks, and `unet.dtype` every module too;
    generate asks each once, not per batch (the UNet's own forward reads its dtype, outside generate's reach), and
    the images are those of a pipeline that asks every batch."""
    searches, dtype_reads, in_forward = [], [], []
    search, dtype = DiffusionPipeline._execution_device.fget, ModelMixin.dtype.fget

    def counted_dtype(module: ModelMixin) -> torch.dtype:
        dtype_reads.extend([] if in_forward else [1])
        return dtype(module)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(lambda p: searches.append(1) or search(p)))
    monkeypatch.setattr(ModelMixin, "dtype", property(counted_dtype))
    hooks = [pipe.unet.register_forward_pre_hook(lambda *_: in_forward.append(1)),
             pipe.unet.register_forward_hook(lambda *_: in_forward.clear())]  # fmt: skip
    try:
        images = generate(pipe, 3, sampler="ddim", num_inference_steps=2, batch_size=1, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(searches) == 1 and len(dtype_reads) == 1
    scheduler = make_scheduler("ddim", pipe.scheduler.config)
    for i in range(3):
        generators = image_generators(0, [i])
        plain = DiffusersDDPMPipeline(unet=pipe.unet, scheduler=scheduler)(
            batch_size=1, generator=generators, num_inference_steps=2, output_type="np").images  # fmt: skip
        assert torch.equal(images[i : i + 1], to_uint8(torch.from_numpy(plain).permute(0, 3, 1, 2)))
