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

import argparse
import sys

import torch
from accelerate import Accelerator
from diffusers.utils import logging as diffusers_logging

from hf_ddpm.cli import run_cli
from hf_ddpm.sampling import RECOMMENDED_SAMPLER, SAMPLERS, default_steps, generate, load_pipeline, save_images

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="pipeline folder (e.g. a training output) or Hub repo id")
    parser.add_argument("--num_images", type=int, default=64, help="images to generate")
    parser.add_argument(
        "--sampler", default=RECOMMENDED_SAMPLER, help=f"one of {', '.join(SAMPLERS)} (default: {RECOMMENDED_SAMPLER})"
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="default: the sampler's (" + ", ".join(f"{name} {default_steps(name)}" for name in SAMPLERS) + ")",
    )
    parser.add_argument("--seed", type=int, default=0, help="image i is seeded from (seed, i)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per UNet call on each process")
    parser.add_argument("--output", default="samples.png", help="grid .png, .npz, or a folder of PNGs")
    parser.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="fp16/bf16 load the UNet in that dtype on GPU; on CPU only bf16 (autocast) works. "
        "Default: what `accelerate launch`/`accelerate config` set, else no",
    )
    parser.add_argument(
        "--allow_pickle", action="store_true", help="also load .bin (pickle) weights; only for trusted sources"
    )
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    default_steps(args.sampler)  # raises ValueError listing the samplers
    for name in ("num_images", "batch_size", "num_inference_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    _check(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    on_cpu = accelerator.device.type == "cpu"
    if on_cpu and accelerator.mixed_precision == "fp16":
        raise ValueError("fp16 needs a GPU; on a CPU use --mixed_precision bf16 (autocast) or no")
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    if not on_cpu and accelerator.mixed_precision in DTYPES:
        pipe.unet.to(dtype=DTYPES[accelerator.mixed_precision])
    pipe.to(accelerator.device)
    steps = args.num_inference_steps or default_steps(args.sampler)
    images = generate(
        pipe,
        args.num_images,
        sampler=args.sampler,
        num_inference_steps=steps,
        seed=args.seed,
        batch_size=args.batch_size,
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        path = save_images(images, args.output)
        print(
            f"wrote {len(images)} images ({args.sampler}, {steps} steps, seed {args.seed}) "
            f"made by {accelerator.num_processes} process(es) to {path}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(run_cli(main))
