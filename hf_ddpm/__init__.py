"""hf_ddpm: train, evaluate and share denoising diffusion probabilistic models (Ho et al. 2020) with diffusers."""

__version__ = "0.1.0"
