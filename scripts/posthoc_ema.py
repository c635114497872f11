#!/usr/bin/env python
"""Choose a run's EMA length after training (EDM2's post-hoc EMA): rebuild several, score each, keep the best.

    python scripts/train.py --output_dir output --posthoc_ema_every 500
    python scripts/posthoc_ema.py output --sigma_rels 0.02,0.05,0.1,0.2 --metric digits --num_images 512

Each width is rebuilt at the step asked from output/posthoc_ema's snapshots (hf_ddpm/posthoc_ema.py) into
output/posthoc_ema/step-S/sigma_rel-W, a plain DDPMPipeline folder with its own eval_results.json and model card,
and scored as scripts/evaluate.py would (same sampling and data flags; default sampler 20-step SDE-DPM-Solver++).
The table, best first, is printed and written to output/posthoc_ema/step-S/results.json.
"""

from __future__ import annotations

import sys

from diffusers.utils import logging as diffusers_logging

from hf_ddpm.arguments import parse_model_arguments
from hf_ddpm.cli import run_cli
from hf_ddpm.data import DataArguments
from hf_ddpm.posthoc_ema import PosthocEMAArguments, search
from hf_ddpm.sampling import RECOMMENDED_SAMPLER, SamplingArguments


def main(argv: list[str] | None = None) -> None:
    types = (PosthocEMAArguments, SamplingArguments, DataArguments)
    model, args, sampling, data = parse_model_arguments(types, argv, description=__doc__)
    sampling.sampler = sampling.sampler or RECOMMENDED_SAMPLER
    diffusers_logging.set_verbosity_error()
    for row in search(model, args, sampling, data):
        values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("sigma_rel", "step", "folder"))
        print(f"sigma_rel {row['sigma_rel']:.3f} at step {row['step']}: {values}  ({row['folder']})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
