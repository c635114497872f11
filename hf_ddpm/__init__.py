"""hf_ddpm: train, evaluate and share denoising diffusion probabilistic models (Ho et al. 2020) with diffusers.

    >>> from hf_ddpm import DDPMPipeline, DDPMScheduler, build_unet
    >>> pipe = DDPMPipeline(unet=build_unet("digits-16"), scheduler=DDPMScheduler())

Training: `accelerate launch scripts/train.py` (hf_ddpm.trainer); evaluation: hf_ddpm.evaluation; the Hub:
hf_ddpm.hub. Folders saved here load with plain `diffusers.DDPMPipeline.from_pretrained`.
"""

from hf_ddpm.pipeline import DDPMPipeline, DDPMPipelineOutput
from hf_ddpm.presets import build_unet, get_preset, list_presets
from hf_ddpm.scheduler import DDPMScheduler

__version__ = "0.1.0"
__all__ = ["DDPMPipeline", "DDPMPipelineOutput", "DDPMScheduler", "build_unet", "get_preset", "list_presets"]
