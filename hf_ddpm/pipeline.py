"""The sampling pipeline: Algorithm 2 of Ho et al. (2020) with any diffusers scheduler swapped in.

`hf_ddpm.DDPMPipeline` is a `diffusers.DDPMPipeline` that adds a trajectory for figures, learned-variance models
with every scheduler, and loading that never unpickles by default. It saves folders that name only diffusers
classes in `model_index.json`, so people without hf_ddpm installed load them with plain diffusers:

    >>> from diffusers import DDPMPipeline, DPMSolverMultistepScheduler
    >>> pipe = DDPMPipeline.from_pretrained("output")                 # or "org/ddpm-digits" on the Hub
    >>> pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    >>> images = pipe(batch_size=16, num_inference_steps=20).images

For the same seed and steps, hf_ddpm's pipeline gives bit-identical images to plain diffusers'.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_loading_utils import _unwrap_model
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from hf_ddpm.errors import PickleWeightsError
from hf_ddpm.scheduler import DDPMScheduler


@dataclass
class DDPMPipelineOutput(BaseOutput):
    """Samples, and (with `return_trajectory=True`) the states x_t and predictions of x_0 along the way.

    `trajectory` and `pred_x0` are float tensors in [-1, 1] of shape (steps, batch, C, H, W), on the CPU.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    timesteps: list[int] | None = None
    trajectory: torch.Tensor | None = None
    pred_x0: torch.Tensor | None = None


def diffusers_class_tuple(module: Any) -> tuple[str, str]:
    """("diffusers", name) of the nearest diffusers class that `module` is an instance of.

    `model_index.json` may name only classes that diffusers itself can load from the Hub, so hf_ddpm's
    subclasses are recorded as their diffusers base (hf_ddpm's `from_pretrained` upgrades them again).
    """
    for klass in type(_unwrap_model(module)).__mro__:
        if klass.__module__.split(".")[0] == "diffusers" and getattr(diffusers, klass.__name__, None) is klass:
            return ("diffusers", klass.__name__)
    raise TypeError(f"{type(module).__name__} is not a diffusers model or scheduler and cannot be saved in a pipeline")


def _to_output_type(images: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return diffusers.DiffusionPipeline.numpy_to_pil(array)


class DDPMPipeline(diffusers.DDPMPipeline):
    r"""Unconditional image generation with a `UNet2DModel` and any diffusers scheduler.

    Parameters:
        unet ([`~diffusers.UNet2DModel`]): predicts the noise (or x_0, or v, as the scheduler's
            `prediction_type` says); grayscale or RGB; with `2 * in_channels` outputs for learned-range variance.
        scheduler ([`~diffusers.SchedulerMixin`]): DDPM (hf_ddpm's subclass after loading), or any diffusers
            scheduler made with `from_config(pipe.scheduler.config)`: DDIM, DPMSolverMultistep, UniPC,
            EulerAncestralDiscrete, ...
    """

    def register_modules(self, **kwargs: Any) -> None:
        super().register_modules(**kwargs)
        self.register_to_config(**{name: diffusers_class_tuple(m) for name, m in kwargs.items() if m is not None})

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dict__ and isinstance(self.config.get(name), (tuple, list)) and value is not None:
            self.register_to_config(**{name: diffusers_class_tuple(value)})

    @property
    def _execution_device(self) -> torch.device:
        """Where the UNet runs: `execution_device` if set (`hf_ddpm.sampling.generate` sets it once for all its
        batches), else diffusers' answer, which searches every module for offloading hooks (~2.5 ms a call, a few
        percent of a 1-step batch)."""
        return self.__dict__.get("execution_device") or super()._execution_device

    @property
    def _execution_dtype(self) -> torch.dtype:
        """The UNet's dtype, of the initial noise: `execution_dtype` if set (by `generate`, likewise), else
        diffusers' `unet.dtype`, another walk of every module (~0.26 ms, half a percent of a 1-step batch)."""
        return self.__dict__.get("execution_dtype") or self.unet.dtype

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, allow_pickle: bool = False, **kwargs: Any
    ) -> DDPMPipeline:
        """Load a pipeline folder or Hub repo (ours, or one saved by plain diffusers such as google/ddpm-cifar10-32).

        Weights load from safetensors only; `allow_pickle=True` also accepts `.bin` files, which can run
        arbitrary code when unpickled, so only for sources you trust. A plain `DDPMScheduler` is upgraded to
        hf_ddpm's subclass, which adds the training maths.
        """
        local = Path(pretrained_model_name_or_path)
        if not allow_pickle and local.is_dir():
            refuse_pickle_only(local)
        kwargs.setdefault("use_safetensors", not allow_pickle)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as err:
            if not allow_pickle and "safetensors" in str(err):
                raise PickleWeightsError(
                    f"{pretrained_model_name_or_path} has no safetensors weights; refusing to unpickle .bin files. "
                    "Pass allow_pickle=True (--allow_pickle) only if you trust the source."
                ) from err
            raise
        if type(pipe.scheduler) is diffusers.DDPMScheduler:
            pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        latents: torch.Tensor | None = None,
        **step_kwargs: Any,
    ) -> DDPMPipelineOutput | tuple:
        r"""Generate `batch_size` images from Gaussian noise in `num_inference_steps` scheduler steps.

        Args:
            batch_size: number of images.
            generator: a `torch.Generator`, or one per image (image i then depends only on generator i).
            num_inference_steps: 1000 for the paper's ancestral sampler; 20-50 with DDIM / DPM-Solver++.
            output_type: "pil" (list of `PIL.Image`), "np" (float array (B, H, W, C) in [0, 1]) or "pt"
                (tensor (B, C, H, W) in [0, 1], on the UNet's device and dtype).
            return_dict: return a `DDPMPipelineOutput` rather than a tuple.
            return_trajectory: also return x_t and the predicted x_0 after every step.
            latents: starting noise x_T of shape (B, C, H, W) instead of drawing it from `generator`.
            step_kwargs: passed to `scheduler.step` when it accepts them (e.g. `eta` for DDIM).

        Example:

        ```py
        >>> from hf_ddpm import DDPMPipeline
        >>> pipe = DDPMPipeline.from_pretrained("output")
        >>> pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images[0].save("sample.png")
        ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
        shape = (batch_size, config.in_channels, *size)
        if latents is None:
            image = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self._execution_dtype)
        else:
            image = latents.to(device=self._execution_device, dtype=self._execution_dtype)

        self.scheduler.set_timesteps(num_inference_steps)
        image = image * self.scheduler.init_noise_sigma  # 1 for DDPM, DDIM, DPM-Solver; sigma_max for Euler types
        step_parameters = inspect.signature(self.scheduler.step).parameters
        extra = {k: v for k, v in step_kwargs.items() if k in step_parameters}
        if "generator" in step_parameters:
            extra["generator"] = generator
        learned_variance = config.out_channels == 2 * config.in_channels
        # only DDPM's step uses a learned variance; other schedulers get the mean channels alone
        ddpm = isinstance(self.scheduler, diffusers.DDPMScheduler)
        keeps_variance = ddpm and self.scheduler.config.variance_type in ("learned", "learned_range")

        states, predictions = [], []
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(self.scheduler.scale_model_input(image, t), t).sample
            if learned_variance and not keeps_variance:
                model_output = model_output[:, : config.in_channels]
            out = self.scheduler.step(model_output, t, image, **extra)
            image = out.prev_sample
            if return_trajectory:
                states.append(image.float().cpu())
                x0 = getattr(out, "pred_original_sample", None)
                predictions.append((x0 if x0 is not None else image).float().cpu())

        images = _to_output_type((image / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        timesteps = [int(t) for t in self.scheduler.timesteps]
        trajectory = torch.stack(states) if return_trajectory else None
        pred_x0 = torch.stack(predictions) if return_trajectory else None
        if not return_dict:
            return (images, trajectory, pred_x0) if return_trajectory else (images,)
        return DDPMPipelineOutput(
            images=images,
            timesteps=timesteps if return_trajectory else None,
            trajectory=trajectory,
            pred_x0=pred_x0,
        )


def refuse_pickle_only(folder: Path) -> None:
    """Raise PickleWeightsError if `folder` or a sub-folder holds `.bin` weights without safetensors beside them.

    The one check behind every `allow_pickle=False`: pipeline loading and fine-tuning from a `--preset` folder.
    """
    for sub in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
        if any(sub.glob("*.bin")) and not any(sub.glob("*.safetensors")):
            raise PickleWeightsError(
                f"{sub} holds only pickle weights (.bin), which can run arbitrary code when loaded; "
                "pass allow_pickle=True (--allow_pickle) only if you trust them, or re-save them as safetensors."
            )
