"""Sampling by sampler name: the one place that maps "ddpm", "ddim", ... to a configured diffusers scheduler.

Training-time previews, `scripts/sample.py`, the figures and evaluation all sample through `generate`, so a
given (model, sampler, steps, seed) gives the same images everywhere, whatever the batch size or the number
of processes:

    >>> from hf_ddpm.pipeline import DDPMPipeline
    >>> from hf_ddpm.sampling import generate, save_images
    >>> pipe = DDPMPipeline.from_pretrained("output")
    >>> images = generate(pipe, 64, sampler="dpmsolver++", seed=0)     # uint8 (64, C, H, W), 20 steps
    >>> save_images(images, "samples.png")                             # or "samples.npz", or a folder

Image i is drawn from its own generator, seeded from (seed, i) alone (`image_generators`), and every
scheduler used here takes its step noise from the generator list, image by image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accelerate
import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.utils import make_image_grid

from hf_ddpm import hub
from hf_ddpm.cli import one_line
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.scheduler import DDPMScheduler

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "unipc", "euler_a")

# Settings applied on top of the model's saved (training) scheduler config. All samplers use "trailing"
# timestep spacing: the first step is then at t = T - 1, where the pure noise x_T really lives. DDPM's saved
# default, "leading", starts few-step samplers at t = T - T/steps (t = 940 for DPM-Solver++ with 20 steps,
# t = 980 for DDIM-50), denoising pure noise as if it still held signal (Lin et al. 2024, "Common diffusion
# noise schedules and sample steps are flawed", table 2). With 1000 DDPM steps every spacing gives the same
# timesteps, so the paper's sampler is unchanged.
_SAMPLER_SPECS: dict[str, tuple[type[SchedulerMixin], int, dict[str, Any]]] = {
    # Ancestral sampling, Algorithm 2 of Ho et al. (2020). The saved clip_sample (x_0 clipped to [-1, 1]) is
    # kept: the posterior mean is computed from the clipped x_0 and x_t, which is consistent and is how the
    # paper's samples were made.
    "ddpm": (DDPMScheduler, 1000, {"timestep_spacing": "trailing"}),
    # Deterministic DDIM (eta = 0, Song et al. 2021). No x_0 clipping: diffusers clips x_0 but keeps the
    # unclipped noise prediction in the update, an inconsistent pair that pulls few-step samples off the
    # data (unlike guided-diffusion, which recomputes eps from the clipped x_0). set_alpha_to_one makes the
    # last step return the predicted x_0 itself.
    "ddim": (
        DDIMScheduler,
        50,
        {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True},
    ),
    # DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in x_0 parameterisation, no thresholding
    # (the saved config's clip_sample does not apply to it), a first-order last step down to sigma = 0
    # (lower_order_final, final_sigmas_type "zero"), which keeps 10-20 step sampling stable. variance_type is
    # reset so that, for learned-variance UNets, the pipeline drops the variance channels itself
    # (DPM-Solver's own slicing assumes 3 image channels).
    "dpmsolver++": (
        DPMSolverMultistepScheduler,
        20,
        {
            "timestep_spacing": "trailing",
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "thresholding": False,
            "variance_type": None,
        },
    ),
    # UniPC (Zhao et al. 2023): the bh2 predictor-corrector in x_0 parameterisation, order 2, first order at
    # the end.
    "unipc": (
        UniPCMultistepScheduler,
        20,
        {
            "timestep_spacing": "trailing",
            "solver_order": 2,
            "solver_type": "bh2",
            "predict_x0": True,
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "thresholding": False,
        },
    ),
    # Euler ancestral (k-diffusion's euler_a, Karras et al. 2022): stochastic, one UNet call a step.
    "euler_a": (EulerAncestralDiscreteScheduler, 50, {"timestep_spacing": "trailing"}),
}


def _spec(name: str) -> tuple[type[SchedulerMixin], int, dict[str, Any]]:
    if name not in _SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return _SAMPLER_SPECS[name]


def default_steps(name: str) -> int:
    """Default number of steps of a sampler: ddpm 1000, ddim 50, dpmsolver++ 20, unipc 20, euler_a 50.

    >>> default_steps("dpmsolver++")
    20
    """
    return _spec(name)[1]


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """The scheduler of sampler `name`, from a model's scheduler config with few-step-friendly settings.

    `config` is a scheduler config (`pipe.scheduler.config`, a dict or FrozenDict); the noise schedule,
    prediction type and number of training steps come from it, the sampler settings from `_SAMPLER_SPECS`.

    >>> from hf_ddpm.sampling import make_scheduler
    >>> pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    """
    klass, _, overrides = _spec(name)
    return klass.from_config(config, **overrides)


def sampling_pipeline(pipeline: DDPMPipeline, sampler: str) -> DDPMPipeline:
    """A new hf_ddpm `DDPMPipeline` sharing `pipeline`'s UNet, with the scheduler of `sampler`.

    The caller's pipeline (hf_ddpm's or plain diffusers') is left untouched.

    >>> ddim_pipe = sampling_pipeline(pipe, "ddim")
    """
    return DDPMPipeline(unet=pipeline.unet, scheduler=make_scheduler(sampler, pipeline.scheduler.config))


def load_pipeline(model: str | Path, allow_pickle: bool = False) -> DDPMPipeline:
    """`DDPMPipeline.from_pretrained` for command-line tools: a failure is one ValueError with a one-line message.

    >>> pipe = load_pipeline("output")            # or a Hub repo id
    """
    try:
        return hub.load_pipeline(model, allow_pickle=allow_pickle)
    except (hub.HubError, OSError, ValueError) as err:
        raise ValueError(f"cannot load model {str(model)!r}: {one_line(err)}") from err


def image_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One `torch.Generator` per image index, seeded from (seed, index) alone.

    The 64-bit seed of image i is `numpy.random.SeedSequence((seed, i)).generate_state(1, np.uint64)[0]`:
    distinct (seed, i) pairs give well-mixed, unrelated streams (unlike `seed * K + i`, which collides once
    i reaches K), and image i is the same whatever batch or process draws it. `seed` and the indices must be
    non-negative. CPU generators (the default) also make the noise independent of the device: diffusers
    draws it on the CPU and moves it.

    >>> gens = image_generators(0, range(8, 16))     # the generators of images 8..15
    """
    return [
        torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence((seed, i)).generate_state(1, np.uint64)[0])
        )
        for i in indices
    ]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images in [0, 1] (any float dtype) to uint8: `(x * 255).round().clamp(0, 255)`."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def generate(
    pipeline: DDPMPipeline,
    num_images: int,
    *,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    accelerator: accelerate.Accelerator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Generate `num_images` images as a uint8 tensor (N, C, H, W) on the CPU, in index order.

    Image i depends only on (model, sampler, steps, seed, i), up to rare one-level rounding differences
    (batched float kernels sum in a batch-size dependent order). The UNet runs in eval mode (no dropout) and is
    put back in its previous mode; pass an unwrapped UNet (`accelerator.unwrap_model`).

    With an `accelerator`, process p generates images p, p + P, p + 2P, ... in batches of `batch_size`; every
    process runs the same number of images (the last few past N are made and dropped) so none waits on another,
    and the result is gathered so that every process returns all N images. Put the pipeline on
    `accelerator.device` first; the UNet runs under `accelerator.autocast()`, so bf16 works on CPUs too.

    Args:
        pipeline: a loaded pipeline (hf_ddpm's or plain diffusers'); its scheduler is not changed.
        num_images: N.
        sampler: one of `SAMPLERS`.
        num_inference_steps: defaults to `default_steps(sampler)`.
        seed: non-negative base seed (see `image_generators`).
        batch_size: images per UNet call on each process.
        accelerator: split the work across its processes and gather the result.
        progress: show diffusers' step progress bar (on the local main process only).

    Example:

    ```py
    >>> accelerator = Accelerator()
    >>> pipe = DDPMPipeline.from_pretrained("output").to(accelerator.device)
    >>> images = generate(pipe, 10_000, sampler="ddim", accelerator=accelerator)   # on every process
    ```
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be positive, got {num_images} and {batch_size}")
    steps = num_inference_steps or default_steps(sampler)
    pipe = sampling_pipeline(pipeline, sampler)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    per_process = math.ceil(num_images / world)
    indices = list(range(rank, per_process * world, world))
    autocast = accelerator.autocast() if accelerator else contextlib.nullcontext()
    was_training = pipe.unet.training
    pipe.unet.eval()  # no dropout, also when called from a training loop
    batches = []
    with autocast:
        for start in range(0, per_process, batch_size):
            chunk = indices[start : start + batch_size]
            batch_number = start // batch_size + 1
            pipe.set_progress_bar_config(
                disable=not show,
                leave=False,
                desc=f"batch {batch_number}/{math.ceil(per_process / batch_size)}",
            )
            out = pipe(
                batch_size=len(chunk),
                generator=image_generators(seed, chunk),
                num_inference_steps=steps,
                output_type="pt",
            )
            batches.append(to_uint8(out.images))
    pipe.unet.train(was_training)
    images = torch.cat(batches)
    if world > 1:
        # gathered row p * per_process + k holds image p + k * world
        gathered = accelerator.gather(images.to(accelerator.device)).cpu()
        images = gathered.view(world, per_process, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
    return images[:num_images].cpu()


def _to_pil(image: torch.Tensor) -> PIL.Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_images(images_uint8: torch.Tensor, output: str | Path, nrow: int | None = None) -> Path:
    """Write uint8 images (N, C, H, W): a grid PNG, an `.npz`, or a folder of PNGs, as `output` says.

    - `*.png`: one grid with `nrow` images a row (default ceil(sqrt(N))), black cells after the last image.
    - `*.npz`: `arr_0` of shape (N, H, W, C) uint8, the layout guided-diffusion's evaluation suite reads.
    - anything else: a folder of `000000.png`, `000001.png`, ... (grayscale images stay single-channel).

    Returns the path written.

    >>> save_images(images, "samples.png", nrow=8)
    >>> save_images(images, "samples.npz")
    >>> save_images(images, "samples/")
    """
    images_uint8 = images_uint8.cpu()
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(f"expected a uint8 tensor (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".npz":
        np.savez(output, arr_0=images_uint8.permute(0, 2, 3, 1).numpy())
    elif output.suffix == ".png":
        n = len(images_uint8)
        cols = nrow or math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        padding = images_uint8.new_zeros((rows * cols - n, *images_uint8.shape[1:]))
        make_image_grid([_to_pil(x) for x in torch.cat([images_uint8, padding])], rows, cols).save(output)
    else:
        output.mkdir(exist_ok=True)
        for i, image in enumerate(images_uint8):
            _to_pil(image).save(output / f"{i:06d}.png")
    return output


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(path: str | Path) -> torch.Tensor:
    """Read images saved elsewhere back as uint8 (N, C, H, W): a folder of image files or an `.npz`.

    A folder is read in file-name order; its images must all have one size, and are loaded as grayscale if
    all are grayscale, else as RGB. An `.npz` is read from `arr_0` (N, H, W, C) or (N, H, W).

    >>> images = load_images("samples.npz")          # e.g. from guided-diffusion's sample script
    """
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            array = data["arr_0"]
        if array.ndim == 3:
            array = array[..., None]
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {array.dtype} {array.shape}")
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    if not path.is_dir():
        raise ValueError(f"{path} is neither a folder of images nor an .npz file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    loaded = []
    for f in files:
        with PIL.Image.open(f) as image:
            loaded.append(image.convert("L" if image.mode == "L" else "RGB"))
    mode = "L" if all(image.mode == "L" for image in loaded) else "RGB"
    arrays = [np.asarray(image.convert(mode)) for image in loaded]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images in {path} differ in size: {sorted({a.shape for a in arrays})}")
    array = np.stack(arrays)
    return torch.from_numpy(array[..., None] if mode == "L" else array).permute(0, 3, 1, 2).contiguous()
