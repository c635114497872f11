#!/usr/bin/env python
"""Write the standard figures of a trained DDPM: forward process, reverse process and a sample grid.

    python scripts/make_figures.py output --output_dir figures
    python scripts/make_figures.py output --output_dir figures --sampler ddim --dataset cifar10

Writes DIR/forward_process.png (the noising of a few `--dataset` images, the built-in digits by default, with
the model's noise schedule), DIR/reverse_process.png (x_t and the predicted x_0 along sampling) and
DIR/samples.png (a grid of `--num_images` samples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

from hf_ddpm.cli import run_cli
from hf_ddpm.data import BUILTIN_DIGITS, load_image_dataset
from hf_ddpm.figures import forward_process_figure, reverse_process_figure, sample_grid_figure
from hf_ddpm.hub import load_pipeline
from hf_ddpm.sampling import SAMPLERS, default_steps, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="pipeline folder (e.g. a training output) or Hub repo id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--dataset", default=BUILTIN_DIGITS, help=f"images for the forward-process figure (default {BUILTIN_DIGITS})"
    )
    parser.add_argument("--num_rows", type=int, default=4, help="images in the forward and reverse figures")
    parser.add_argument("--num_images", type=int, default=64, help="images in the sample grid")
    parser.add_argument("--sampler", default="ddpm", help=f"one of {', '.join(SAMPLERS)} (default: ddpm)")
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow_pickle", action="store_true", help="also load .bin (pickle) weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    default_steps(args.sampler)  # raises ValueError listing the samplers
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    unet = pipe.unet.config
    data = load_image_dataset(args.dataset, resolution=unet.sample_size, channels=unet.in_channels)
    out = Path(args.output_dir)
    sampling = {"sampler": args.sampler, "num_inference_steps": args.num_inference_steps, "seed": args.seed}
    paths = [
        forward_process_figure(data.pixels(range(args.num_rows)), pipe.scheduler, out / "forward_process.png"),
        reverse_process_figure(pipe, out / "reverse_process.png", num_images=args.num_rows, **sampling),
        sample_grid_figure(generate(pipe, args.num_images, **sampling), out / "samples.png"),
    ]
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.exit(run_cli(main))
