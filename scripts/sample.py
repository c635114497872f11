#!/usr/bin/env python
"""Generate samples from a trained DDPM (a pipeline folder or a Hub repo id) with any of hf_ddpm's samplers.

    python scripts/sample.py output --num_images 64 --output samples.png        # 20-step SDE-DPM-Solver++
    python scripts/sample.py output --num_images 64 --sampler ddpm --output paper.png   # 1000 ancestral steps
    python scripts/sample.py google/ddpm-cifar10-32 --allow_pickle --num_images 16 --sampler ddim --output cifar/
    accelerate launch --num_processes 4 scripts/sample.py output --num_images 50000 --output samples.npz

Image i depends only on the model, sampler, steps, seed and i, so any number of processes (accelerate launch
splits the images across them) and any batch size give the same images; only the main process writes.
`--output` ending in .png writes one grid, .npz an `arr_0` (N, H, W, C) uint8 array, anything else a folder.
"""

from __future__ import annotations

import sys

from diffusers.utils import logging as diffusers_logging

from hf_ddpm.arguments import parse_model_arguments
from hf_ddpm.cli import run_cli
from hf_ddpm.sampling import SampleArguments, sample_images


def main(argv: list[str] | None = None) -> None:
    model, args = parse_model_arguments((SampleArguments,), argv, description=__doc__)
    diffusers_logging.set_verbosity_error()
    sample_images(model, args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
