"""The pipeline: folders plain diffusers loads bit-identically, every scheduler swap, outputs, safe loading."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_without_hf_ddpm

from hf_ddpm.pipeline import DDPMPipeline, PickleWeightsError, diffusers_class_tuple
from hf_ddpm.presets import build_unet
from hf_ddpm.scheduler import DDPMScheduler


def make_pipeline(preset: str = "tiny-8", **scheduler_config) -> DDPMPipeline:
    torch.manual_seed(0)
    unet = build_unet(preset)
    with torch.no_grad():  # a non-trivial network: random but not tiny output weights
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.1)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(timestep_spacing="trailing", **scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_folder_names_only_diffusers_classes_and_uses_safetensors(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert json.loads((tmp_path / "scheduler/scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    assert (tmp_path / "unet/diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin"))


def test_a_swapped_scheduler_is_recorded_as_its_diffusers_class():
    pipe = make_pipeline()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.config.scheduler == ("diffusers", "DDIMScheduler")
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert pipe.config.scheduler == ("diffusers", "DDPMScheduler")
    with pytest.raises(TypeError, match="not a diffusers"):
        diffusers_class_tuple(object())


@pytest.mark.parametrize("sampler, steps", [("DDPMScheduler", 50), ("DDIMScheduler", 10)])
def test_plain_diffusers_without_hf_ddpm_gives_bit_identical_images(tmp_path, sampler, steps):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    code = f"""
import numpy as np, torch, diffusers
pipe = diffusers.DDPMPipeline.from_pretrained("model")
assert type(pipe) is diffusers.DDPMPipeline and type(pipe.scheduler) is diffusers.DDPMScheduler
pipe.scheduler = diffusers.{sampler}.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps={steps},
              output_type="np").images
np.save("vanilla.npy", images)
"""
    run_without_hf_ddpm(code, cwd=tmp_path)
    ours = DDPMPipeline.from_pretrained(tmp_path / "model")
    ours.scheduler = getattr(diffusers, sampler).from_config(ours.scheduler.config)
    ours.set_progress_bar_config(disable=True)
    images = ours(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=steps,
                  output_type="np").images  # fmt: skip
    np.testing.assert_array_equal(images, np.load(tmp_path / "vanilla.npy"))


def test_our_loader_returns_our_classes_and_loads_folders_saved_by_plain_diffusers(tmp_path):
    pipe = make_pipeline()
    diffusers.DDPMPipeline(unet=pipe.unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded) is DDPMPipeline and type(loaded.scheduler) is DDPMScheduler
    assert loaded.config.scheduler == ("diffusers", "DDPMScheduler")
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor)


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    make_pipeline().save_pretrained(tmp_path, safe_serialization=False)
    assert list(tmp_path.rglob("*.bin"))
    with pytest.raises(PickleWeightsError, match="allow_pickle=True"):
        DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(DDPMPipeline.from_pretrained(tmp_path, allow_pickle=True).unet, diffusers.UNet2DModel)


@pytest.mark.parametrize(
    "scheduler_class",
    [
        "DDPMScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "EulerAncestralDiscreteScheduler",
    ],  # fmt: skip
)
def test_every_scheduler_swap_samples(scheduler_class):
    pipe = make_pipeline()
    pipe.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt")
    assert out.images.shape == (2, 1, 8, 8)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1


def test_output_types_grayscale_and_rgb():
    gray = make_pipeline()
    pil = gray(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].mode == "L" and pil[0].size == (8, 8)
    arr = gray(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert arr.images.shape == (2, 8, 8, 1) and arr.images.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr.images[1, ..., 0] * 255).round().astype(np.uint8))
    rgb = make_pipeline("small-16-rgb")
    images = rgb(batch_size=1, num_inference_steps=2, output_type="pil").images
    assert images[0].mode == "RGB" and images[0].size == (16, 16)
    assert rgb(num_inference_steps=2, return_dict=False)[0][0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        gray(num_inference_steps=2, output_type="tensor")


def test_dtype_follows_the_unet():
    pipe = make_pipeline()
    pipe.unet.to(torch.bfloat16)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="pt").images
    assert images.dtype == torch.bfloat16


def test_trajectory_holds_every_state_and_prediction():
    pipe = make_pipeline()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    out = pipe(batch_size=2, num_inference_steps=4, return_trajectory=True, output_type="pt",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.trajectory.shape == out.pred_x0.shape == (4, 2, 1, 8, 8)
    assert len(out.timesteps) == 4 and out.timesteps[0] > out.timesteps[-1]
    torch.testing.assert_close((out.trajectory[-1] / 2 + 0.5).clamp(0, 1), out.images.float())


def test_generator_per_image_makes_image_i_independent_of_the_others():
    pipe = make_pipeline()
    kwargs = {"num_inference_steps": 3, "output_type": "pt"}
    both = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(2)], **kwargs).images
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_learned_range_model_uses_its_variance_with_ddpm_and_drops_it_elsewhere():
    torch.manual_seed(0)
    unet = build_unet("tiny-8", out_channels=2)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=3, output_type="pt").images.shape == (1, 1, 8, 8)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe(num_inference_steps=3, output_type="pt").images.shape == (1, 1, 8, 8)
