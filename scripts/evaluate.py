#!/usr/bin/env python
"""Evaluate a trained DDPM: FID, KID, Inception Score, FD_DINOv2, the offline digits metric, NLL in bits/dim.

    python scripts/evaluate.py output --metrics digits,nll --num_images 1000 --sampler dpmsolver++
    python scripts/evaluate.py output --metrics nll --heldout_last 297          # digits trained on the first 1500
    python scripts/evaluate.py cifar-run --metrics fid,kid,inception_score --dataset_name cifar10 --split train \\
        --num_images 50000 --sampler ddim --num_inference_steps 100 --inception_weights weights-inception.pth
    python scripts/evaluate.py output --metrics fid --samples samples.npz      # score samples made elsewhere
    accelerate launch --num_processes 4 scripts/evaluate.py output --metrics fid,fd_dinov2 --num_images 50000

Results are merged into MODEL/eval_results.json (or --output), each with the sampler, steps, number of images,
seed (and for NLL batch size and x_0 clipping) that reproduce it, and MODEL's model card is re-rendered unless it
was edited by hand; every process computes the same numbers, the main process writes and prints them. Metric
details, caching and the held-out options: hf_ddpm/evaluation/.
"""

from __future__ import annotations

import argparse
import json
import sys

from accelerate import Accelerator
from diffusers.utils import logging as diffusers_logging

from hf_ddpm.cli import run_cli
from hf_ddpm.evaluation import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, METRICS, evaluate
from hf_ddpm.evaluation.feature_extractors import DINOV2_DEFAULT, INCEPTION_WEIGHTS_FILE
from hf_ddpm.sampling import SAMPLERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="pipeline folder (e.g. a training output) or Hub repo id")
    parser.add_argument("--metrics", default="digits", help=f"comma-separated, from {', '.join(METRICS)}")
    parser.add_argument(
        "--num_images", "--num_samples", type=int, default=None,
        help=f"images to generate (default {DEFAULT_NUM_SAMPLES}) or read from --samples (default all); nll scores the "
        "first N reference images (--num_samples is the old name)",
    )  # fmt: skip
    parser.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)} (default: ddpm)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the sampler's")
    parser.add_argument("--seed", type=int, default=0, help="sample i is seeded from (seed, i); also NLL noise")
    parser.add_argument(
        "--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per network call on each process"
    )
    parser.add_argument(
        "--no_nll_clip_denoised", dest="nll_clip_denoised", action="store_false",
        help="nll: the bound of the raw x_0 prediction (default: clamped to [-1, 1] in every term, as the DDPM paper "
        "and improved-diffusion report NLL)",
    )  # fmt: skip
    parser.add_argument("--samples", default=None, help="score these samples (PNG folder or .npz) instead")
    data = parser.add_argument_group("reference images (default: the run's training data, else builtin:digits)")
    data.add_argument("--dataset_name", default=None, help="Hub id, local dataset folder or builtin:digits")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="a folder of image files")
    data.add_argument("--image_column", default=None)
    data.add_argument("--split", default="train", help="e.g. test, for held-out NLL")
    data.add_argument("--heldout_last", type=int, default=None, help="use only the last N images of the split")
    data.add_argument("--resolution", type=int, default=None, help="default: the model's sample size")
    data.add_argument("--channels", type=int, default=None, help="default: the model's")
    data.add_argument("--no_center_crop", dest="center_crop", action="store_false", help="squash, do not crop")
    data.add_argument("--cache_dir", default=None, help="datasets cache")
    nets = parser.add_argument_group("feature extractors")
    nets.add_argument(
        "--inception_weights", default=None, help=f"{INCEPTION_WEIGHTS_FILE} (default: the torch hub cache)"
    )
    nets.add_argument("--dinov2_model", default=DINOV2_DEFAULT, help="Hub id or local folder")
    nets.add_argument("--stats_cache_dir", default=None, help="reference statistics (default ~/.cache/hf_ddpm/stats)")
    parser.add_argument("--output", default=None, help="results JSON (default: MODEL/eval_results.json)")
    parser.add_argument("--no_model_card", dest="update_model_card", action="store_false")
    parser.add_argument("--allow_pickle", action="store_true", help="also load .bin weights; trusted sources only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    accelerator = Accelerator()
    results = evaluate(
        args.model,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        num_samples=args.num_images,
        sampler=args.sampler,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        nll_clip_denoised=args.nll_clip_denoised,
        samples_path=args.samples,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.split,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        resolution=args.resolution,
        channels=args.channels,
        center_crop=args.center_crop,
        cache_dir=args.cache_dir,
        heldout_last=args.heldout_last,
        inception_weights=args.inception_weights,
        dinov2_model=args.dinov2_model,
        stats_cache_dir=args.stats_cache_dir,
        accelerator=accelerator,
        output_json=args.output,
        update_model_card=args.update_model_card,
        allow_pickle=args.allow_pickle,
    )
    if accelerator.is_main_process:
        print(json.dumps(results, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(run_cli(main))
