#!/usr/bin/env python
"""Write the standard figures of a trained DDPM: forward process, reverse process and a sample grid.

    python scripts/make_figures.py output --output_dir figures
    python scripts/make_figures.py output --output_dir figures --sampler ddim --dataset cifar10

Writes DIR/forward_process.png (the noising of a few `--dataset` images, the built-in digits by default, with
the model's noise schedule), DIR/reverse_process.png (x_t and the predicted x_0 along sampling) and
DIR/samples.png (a grid of `--num_images` samples), with 1000-step DDPM unless `--sampler` says otherwise.
"""

from __future__ import annotations

import sys

from diffusers.utils import logging as diffusers_logging

from hf_ddpm.arguments import parse_model_arguments
from hf_ddpm.cli import run_cli
from hf_ddpm.figures import FigureArguments, make_figures
from hf_ddpm.sampling import SamplingArguments


def main(argv: list[str] | None = None) -> None:
    model, figures, sampling = parse_model_arguments((FigureArguments, SamplingArguments), argv, description=__doc__)
    diffusers_logging.set_verbosity_error()
    print("wrote " + ", ".join(str(path) for path in make_figures(model, figures, sampling)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
