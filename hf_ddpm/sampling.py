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
scheduler used here takes its step noise from the generator list, image by image. `SamplingArguments` are the
sampling flags of scripts/sample.py and scripts/evaluate.py; `sample_images` is what scripts/sample.py runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import numpy as np
import PIL.Image
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.utils import make_image_grid

from hf_ddpm import atomic, speed
from hf_ddpm.arguments import check_fp16_device, check_positive
from hf_ddpm.distributed import Stream, is_main, run_sharded, seeded_generators
from hf_ddpm.errors import ConfigError, DataError
from hf_ddpm.hub import load_pipeline
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.scheduler import DDPMScheduler

# Settings that every trained model saves in its scheduler config (`hf_ddpm.trainer.make_noise_scheduler`), so
# that `XScheduler.from_config(pipe.scheduler.config)` in plain diffusers inherits them:
# - "trailing" timesteps: the first step is at t = T - 1, where the pure noise x_T really lives. DDPM's own
#   default, "leading", starts a 20-step sampler at t = 950, denoising pure noise as if it still held signal
#   (Lin et al. 2024, table 2). With 1000 DDPM steps every spacing gives the same timesteps.
# - x_0 clipped to [-1, 1] at every step, spelled the way every diffusers solver understands it: dynamic
#   thresholding (Saharia et al. 2022) with a maximum of 1 is static clipping. DDPM's `clip_sample` does the
#   same for DDPM and DDIM only; DPM-Solver++ and UniPC ignore it. Measured on the previous default run (512 samples):
#   unclipped DDIM-20 digits FD 78.1 vs 23.9 clipped, unclipped DPM-Solver++-20 62.5 vs 16.3 clipped.
SAMPLING_CONFIG: dict[str, Any] = {"timestep_spacing": "trailing", "thresholding": True, "sample_max_value": 1.0}
# The same clipping spelled as DDPM's and DDIM's `clip_sample`, which hf_ddpm runs them with and a distilled
# student saves: the images are identical, without the quantile over every image that thresholding computes at each
# step (a DDIM step of 64 16-px images: 0.76 ms with it, 0.08 ms without, against a 47 ms UNet call on one thread).
CLIP_SAMPLE_CONFIG: dict[str, Any] = {"thresholding": False, "clip_sample": True, "clip_sample_range": 1.0}


@dataclass(frozen=True)
class Sampler:
    """A sampler by name: a diffusers scheduler class, its settings on top of the model's saved config, and
    whether plain `diffusers.DDPMPipeline` runs it unchanged (it passes `generator=` to `step`, does not scale
    the initial noise by `init_noise_sigma` and never calls `scale_model_input`)."""

    scheduler_class: type[SchedulerMixin]
    default_steps: int
    settings: dict[str, Any]
    plain_diffusers: bool
    description: str


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(DDPMScheduler, 1000, {}, True, "ancestral sampling, Algorithm 2 of Ho et al. (2020)"),
    "ddim": Sampler(
        DDIMScheduler, 50, {"set_alpha_to_one": True}, True, "deterministic DDIM, eta = 0 (Song et al. 2021)"
    ),
    "dpmsolver++": Sampler(
        DPMSolverMultistepScheduler,
        20,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
        True,
        "DPM-Solver++(2M), deterministic (Lu et al. 2022)",
    ),
    "sde-dpmsolver++": Sampler(
        DPMSolverMultistepScheduler,
        20,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
        True,
        "SDE-DPM-Solver++(2M), stochastic (Lu et al. 2022)",
    ),
    "unipc": Sampler(
        UniPCMultistepScheduler,
        20,
        {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "final_sigmas_type": "zero"},
        False,
        "UniPC-bh2, deterministic (Zhao et al. 2023); its step() takes no generator",
    ),
    # First order and noisy: on the default run (512 samples) its digits FD is 1.48x DDPM-1000's at 20 steps,
    # 1.27x at 50 and 1.05x at 100, so it defaults to 100; SDE-DPM-Solver++ does better in 20.
    "euler_a": Sampler(
        EulerAncestralDiscreteScheduler,
        100,
        {},
        False,
        "Euler ancestral (Karras et al. 2022); needs init_noise_sigma and scale_model_input",
    ),
}
# Samplers of distilled students only, which read the student's own scheduler config: not for a DDPM. Plain
# diffusers runs "consistency" in ConsistencyModelPipeline, which scales the noise and the UNet input as ours does.
STUDENT_SAMPLERS: dict[str, Sampler] = {
    "consistency": Sampler(
        CMStochasticIterativeScheduler,
        1,
        {},
        False,
        "consistency-model sampling (Song et al. 2023): one step, or a few with fresh noise in between",
    ),
}
ALL_SAMPLERS = {**SAMPLERS, **STUDENT_SAMPLERS}
RECOMMENDED_SAMPLER = "sde-dpmsolver++"
# The sampler of a student of scripts/distill.py, by --method: the scheduler its folder saves
DISTILLED_SAMPLERS = {"progressive": "ddim", "consistency": "consistency"}


def get_sampler(name: str) -> Sampler:
    """The sampler called `name`; an unknown name raises a ConfigError that lists the valid ones."""
    if name not in ALL_SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(ALL_SAMPLERS)}")
    return ALL_SAMPLERS[name]


def default_steps(name: str) -> int:
    """Default number of steps of a sampler: ddpm 1000, euler_a 100, ddim 50, the others 20.

    >>> default_steps("dpmsolver++")
    20
    """
    return get_sampler(name).default_steps


def scheduler_settings(name: str, config: Any) -> dict[str, Any]:
    """The arguments that `from_config(config, ...)` needs to make sampler `name` from a saved scheduler config:
    its settings and `SAMPLING_CONFIG`, less what `config` already carries (what a plain-diffusers snippet shows)."""
    sampler = get_sampler(name)
    wanted = {**SAMPLING_CONFIG, **sampler.settings}
    inherited = sampler.scheduler_class.from_config(config).config
    if _clips_by_clip_sample(sampler.scheduler_class, inherited):  # x_0 is clipped to [-1, 1] already
        wanted = {key: value for key, value in wanted.items() if key not in ("thresholding", "sample_max_value")}
    if _learned_variance(config) and sampler.scheduler_class is DPMSolverMultistepScheduler:
        # DPM-Solver's own slicing of learned-variance outputs assumes 3 image channels; hf_ddpm's pipeline
        # drops the variance channels itself
        wanted["variance_type"] = None
    accepted = inspect.signature(sampler.scheduler_class.__init__).parameters  # Euler has no x_0 to clip
    return {key: value for key, value in wanted.items() if key in accepted and inherited.get(key) != value}


def _has_clip_sample(scheduler_class: type[SchedulerMixin]) -> bool:
    """DDPM and DDIM; a config carries `clip_sample` into the others too, which ignore it."""
    return "clip_sample" in inspect.signature(scheduler_class.__init__).parameters


def _clips_by_clip_sample(scheduler_class: type[SchedulerMixin], config: Any) -> bool:
    """Whether `scheduler_class` with `config` clips x_0 to [-1, 1] by `clip_sample` (and no thresholding)."""
    return _has_clip_sample(scheduler_class) and all(config.get(k) == v for k, v in CLIP_SAMPLE_CONFIG.items())


def _learned_variance(config: Any) -> bool:
    return config.get("variance_type") in ("learned", "learned_range")


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """The scheduler of sampler `name`, from a model's scheduler config (`pipe.scheduler.config`).

    The noise schedule, prediction type and number of training steps come from `config`, the sampler's
    settings from `SAMPLERS` and `SAMPLING_CONFIG`.

    >>> from hf_ddpm.sampling import make_scheduler
    >>> pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)

    Each call returns a new scheduler, a copy of one built once per sampler and config (diffusers' `from_config`
    takes ~4 ms, a few percent of a 1-step batch). DDPM and DDIM clip x_0 by `clip_sample` rather than by
    thresholding at 1 (`CLIP_SAMPLE_CONFIG`): the same images, faster.
    """
    return copy.deepcopy(_scheduler_template(name, json.dumps(dict(config), sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _scheduler_template(name: str, config_json: str) -> SchedulerMixin:
    config = json.loads(config_json)
    scheduler_class = get_sampler(name).scheduler_class
    scheduler = scheduler_class.from_config(config, **scheduler_settings(name, config))
    made = scheduler.config
    if _has_clip_sample(scheduler_class) and made.thresholding and made.sample_max_value == 1.0:
        # thresholding at a maximum of 1 is clamp(x_0, -1, 1), which clip_sample does without the quantile
        scheduler.register_to_config(**CLIP_SAMPLE_CONFIG)
    return scheduler


def sampling_pipeline(pipeline: DDPMPipeline, sampler: str) -> DDPMPipeline:
    """A new hf_ddpm `DDPMPipeline` sharing `pipeline`'s UNet, with the scheduler of `sampler`.

    The caller's pipeline (hf_ddpm's or plain diffusers') is left untouched.

    >>> ddim_pipe = sampling_pipeline(pipe, "ddim")
    """
    return DDPMPipeline(unet=pipeline.unet, scheduler=make_scheduler(sampler, pipeline.scheduler.config))


def runs_in_plain_diffusers(sampler: str, unet_config: Any) -> bool:
    """Whether plain `diffusers.DDPMPipeline` gives this sampler's images for a UNet with this config.

    A learned-variance UNet (2C outputs) samples there with DDPM only: the other schedulers feed all 2C
    channels back into the UNet.
    """
    channels = unet_config.get("in_channels")
    learned = channels is not None and unet_config.get("out_channels") == 2 * channels
    return get_sampler(sampler).plain_diffusers and (sampler == "ddpm" or not learned)


def usage_snippet(
    model: str, scheduler_config: Any, sampler: str, num_inference_steps: int, num_images: int = 16, seed: int = 0
) -> str:
    """Python that draws images 0..num_images-1 of `generate(pipe, ..., sampler, num_inference_steps, seed)`
    with plain diffusers only (the caller checks `runs_in_plain_diffusers` first; "consistency": a consistency
    model, in diffusers' ConsistencyModelPipeline)."""
    lines = [
        "import numpy as np",
        "import torch",
    ]
    klass = get_sampler(sampler).scheduler_class.__name__
    settings = scheduler_settings(sampler, scheduler_config)
    swap = klass != "DDPMScheduler" or settings
    pipeline = "ConsistencyModelPipeline" if sampler == "consistency" else "DDPMPipeline"
    swap = swap and pipeline == "DDPMPipeline"
    lines.append(f"from diffusers import {pipeline}{', ' + klass if swap else ''}")
    lines += ["", f"pipe = {pipeline}.from_pretrained({_literal(model)})"]
    if swap:
        arguments = "".join(f", {key}={_literal(value)}" for key, value in settings.items())
        lines.append(f"pipe.scheduler = {klass}.from_config(pipe.scheduler.config{arguments})")
    lines += [
        "# image i is seeded from (seed, i) alone, as hf_ddpm seeds it: any batch size gives the same images",
        f"seeds = [np.random.SeedSequence(({seed}, i)).generate_state(1, np.uint64)[0] for i in range({num_images})]",
        "generators = [torch.Generator().manual_seed(int(s)) for s in seeds]",
        f"images = pipe(batch_size={num_images}, generator=generators, num_inference_steps={num_inference_steps})"
        ".images",
    ]
    return "\n".join(lines)


def image_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One `torch.Generator` per image index, seeded from (seed, index) alone (`distributed.Stream.IMAGES`).

    The 64-bit seed of image i is `numpy.random.SeedSequence((seed, i)).generate_state(1, np.uint64)[0]`, so
    image i is the same whatever batch or process draws it, and plain diffusers reproduces it (`usage_snippet`).
    `seed` and the indices must be non-negative. CPU generators (the default) also make the noise independent
    of the device: diffusers draws it on the CPU and moves it.

    >>> gens = image_generators(0, range(8, 16))     # the generators of images 8..15
    """
    return seeded_generators(Stream.IMAGES, seed, indices, device=device)


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

    With an `accelerator`, each process generates its block of ceil(N/P) images (`distributed.run_sharded`) in
    batches of `batch_size`, and every process returns all N images. Put the pipeline on `accelerator.device`
    first; the UNet runs under `accelerator.autocast()`, so bf16 works on CPUs too.

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
        raise ConfigError(f"num_images and batch_size must be positive, got {num_images} and {batch_size}")
    steps = num_inference_steps or default_steps(sampler)
    pipe = sampling_pipeline(pipeline, sampler)
    # found once for all batches (diffusers searches every module for each)
    pipe.execution_device, pipe.execution_dtype = pipe._execution_device, pipe.unet.dtype
    show = progress and is_main(accelerator, local=True)
    autocast = accelerator.autocast() if accelerator else contextlib.nullcontext()

    def draw(share: range) -> torch.Tensor:
        batches = []
        with autocast:
            for start in range(share.start, share.stop, batch_size):
                chunk = range(start, min(start + batch_size, share.stop))
                pipe.set_progress_bar_config(
                    disable=not show, leave=False, desc=f"batch {len(batches) + 1}/{math.ceil(len(share) / batch_size)}"
                )
                out = pipe(
                    batch_size=len(chunk),
                    generator=image_generators(seed, chunk),
                    num_inference_steps=steps,
                    output_type="pt",
                )
                batches.append(to_uint8(out.images))
        return torch.cat(batches)

    was_training = pipe.unet.training
    if was_training:  # no dropout, also when called from a training loop (a mode change walks every module)
        pipe.unet.eval()
    try:
        return run_sharded(draw, num_images, accelerator)
    finally:
        if was_training:
            pipe.unet.train()


def _literal(value: Any) -> str:
    """A Python literal of `value` for generated code, strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _to_pil(image: torch.Tensor) -> PIL.Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_images(images_uint8: torch.Tensor, output: str | Path, nrow: int | None = None) -> Path:
    """Write uint8 images (N, C, H, W): a grid PNG, an `.npz`, or a folder of PNGs, as `output` says.

    - `*.png`: one grid with `nrow` images a row (default ceil(sqrt(N))), black cells after the last image.
    - `*.npz`: `arr_0` of shape (N, H, W, C) uint8, the layout guided-diffusion's evaluation suite reads.
    - anything else: a folder of `000000.png`, `000001.png`, ... (grayscale images stay single-channel).

    Returns the path written. Each file is written whole or not at all (`hf_ddpm.atomic.write_file`): a run that
    fails while writing leaves the previous file.

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
        atomic.write_file(output, lambda tmp: np.savez(tmp, arr_0=images_uint8.permute(0, 2, 3, 1).numpy()))
    elif output.suffix == ".png":
        n = len(images_uint8)
        cols = nrow or math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        padding = images_uint8.new_zeros((rows * cols - n, *images_uint8.shape[1:]))
        grid = make_image_grid([_to_pil(x) for x in torch.cat([images_uint8, padding])], rows, cols)
        atomic.write_file(output, grid.save)
    else:
        output.mkdir(exist_ok=True)
        for i, image in enumerate(images_uint8):
            atomic.write_file(output / f"{i:06d}.png", _to_pil(image).save)
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
            raise DataError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {array.dtype} {array.shape}")
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    if not path.is_dir():
        raise DataError(f"{path} is neither a folder of images nor an .npz file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    loaded = []
    for f in files:
        with PIL.Image.open(f) as image:
            loaded.append(image.convert("L" if image.mode == "L" else "RGB"))
    mode = "L" if all(image.mode == "L" for image in loaded) else "RGB"
    arrays = [np.asarray(image.convert(mode)) for image in loaded]
    if len({a.shape for a in arrays}) > 1:
        raise DataError(f"images in {path} differ in size: {sorted({a.shape for a in arrays})}")
    array = np.stack(arrays)
    return torch.from_numpy(array[..., None] if mode == "L" else array).permute(0, 3, 1, 2).contiguous()


@dataclass
class SamplingArguments:
    """How images are drawn from a trained model: the options scripts/sample.py and scripts/evaluate.py share."""

    sampler: str | None = field(
        default=None,
        metadata={"help": f"one of {', '.join(SAMPLERS)}; default: {RECOMMENDED_SAMPLER} for sample.py, ddpm for "
                  "evaluate.py (which records none for --samples)"},
    )  # fmt: skip
    num_inference_steps: int | None = field(
        default=None,
        metadata={"help": "default: the sampler's (" + ", ".join(f"{n} {s.default_steps}" for n, s in SAMPLERS.items())
                  + ")"},
    )  # fmt: skip
    seed: int = field(
        default=0, metadata={"help": "image i is seeded from (seed, i); evaluate.py: also NLL noise and KID subsets"}
    )
    batch_size: int = field(default=64, metadata={"help": "images per network call on each process"})
    allow_pickle: bool = field(
        default=False, metadata={"help": "also load .bin (pickle) weights; only for trusted sources"}
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "compile the UNet with torch.compile before sampling (README, Throughput: 1.32x-1.49x "
                  "plain diffusers' evaluations/s on 2-core CPUs, images within one 8-bit level); eager if it fails "
                  "or its output differs from eager"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.sampler is not None:
            try:
                get_sampler(self.sampler)
            except ValueError as err:
                raise ConfigError(f"--sampler: {err}") from None
        check_positive(self, ("batch_size", "num_inference_steps"))
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")


@dataclass
class SampleArguments(SamplingArguments):
    """Every option of scripts/sample.py: `SamplingArguments`, how many images, where they go, the UNet's dtype."""

    num_images: int = field(default=64, metadata={"help": "images to generate"})
    output: str = field(default="samples.png", metadata={"help": "grid .png, .npz, or a folder of PNGs"})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no, fp16 or bf16: fp16/bf16 load the UNet in that dtype on GPU; on CPU only bf16 "
                  "(autocast) works. Default: what `accelerate launch`/`accelerate config` set, else no"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, ("num_images",))
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"--mixed_precision {self.mixed_precision!r} is not one of: no, fp16, bf16")


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compile_for_sampling(pipeline: DDPMPipeline, batch_size: int) -> bool:
    """--torch_compile: compile the pipeline's UNet in place (on its device and dtype) with one no-grad call at
    `batch_size`, so compiling happens now, not inside the first timed batch. Returns whether it is compiled
    (`speed.compile_unet` warns and stays eager if compiling fails)."""
    unet = pipeline.unet.eval()
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator(unet.device).manual_seed(0)  # not the global RNG
    shape = (batch_size, unet.config.in_channels, height, width)
    x = torch.randn(shape, generator=generator, device=unet.device).to(unet.dtype)
    t = torch.linspace(0, 999, batch_size, device=unet.device).long()
    with torch.no_grad():
        return speed.compile_unet(unet, lambda: [unet(x, t).sample])


def sample_images(model: str, args: SampleArguments) -> None:
    """scripts/sample.py: `args.num_images` images of `model`, drawn by all processes of an `accelerate launch`
    and written to `args.output` by the main process."""
    accelerator = accelerate.Accelerator(mixed_precision=args.mixed_precision)
    on_cpu = accelerator.device.type == "cpu"
    check_fp16_device(accelerator.mixed_precision, accelerator.device.type)
    pipe = load_pipeline(model, allow_pickle=args.allow_pickle)
    if not on_cpu and accelerator.mixed_precision in _DTYPES:
        pipe.unet.to(dtype=_DTYPES[accelerator.mixed_precision])
    pipe.to(accelerator.device)
    if args.torch_compile:
        compile_for_sampling(pipe, min(args.batch_size, args.num_images))
    sampler = args.sampler or RECOMMENDED_SAMPLER
    steps = args.num_inference_steps or default_steps(sampler)
    images = generate(
        pipe, args.num_images, sampler=sampler, num_inference_steps=steps, seed=args.seed,
        batch_size=args.batch_size, accelerator=accelerator,
    )  # fmt: skip
    if accelerator.is_main_process:
        path = save_images(images, args.output)
        print(
            f"wrote {len(images)} images ({sampler}, {steps} steps, seed {args.seed}) "
            f"made by {accelerator.num_processes} process(es) to {path}"
        )
    accelerator.end_training()
