"""Distil a trained DDPM into a few-step generator: `accelerate launch scripts/distill.py TEACHER [--flag value ...]`.

TEACHER is a pipeline folder or Hub repo id (hf_ddpm's, or any diffusers DDPM). With no flags it distils by
progressive distillation of 16 teacher DPM-Solver++ steps into an 8-step student, then 4, 2 and 1, into
./output-distilled, which plain diffusers' `DDPMPipeline` samples with `num_inference_steps=1`; each round's student
goes to students/<N>-step/. `--help` lists every flag (training's, and the distillation's).
"""

import logging
import sys

from hf_ddpm.cli import run_cli
from hf_ddpm.distillation import distill, parse_distillation_args

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(run_cli(lambda: distill(parse_distillation_args())))
