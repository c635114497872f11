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

import json
import sys

from accelerate import Accelerator
from diffusers.utils import logging as diffusers_logging

from hf_ddpm.arguments import parse_model_arguments
from hf_ddpm.cli import run_cli
from hf_ddpm.data import DataArguments
from hf_ddpm.evaluation import EvaluationArguments, evaluate
from hf_ddpm.sampling import SamplingArguments


def parse_args(argv: list[str] | None = None) -> tuple[str, EvaluationArguments, SamplingArguments, DataArguments]:
    """MODEL, what to measure, how to sample and the reference images, from the command line."""
    return parse_model_arguments((EvaluationArguments, SamplingArguments, DataArguments), argv, description=__doc__)


def main(argv: list[str] | None = None) -> None:
    model, evaluation, sampling, data = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    accelerator = Accelerator()
    results = evaluate(model, evaluation, sampling, data, accelerator=accelerator)
    if accelerator.is_main_process:
        print(json.dumps(results, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(run_cli(main))
