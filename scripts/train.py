"""Train a DDPM: `accelerate launch scripts/train.py [--config FILE] [--flag value ...]`.

With no arguments it trains the `digits-16` preset on the built-in scikit-learn digits into ./output in about
ten minutes on two CPU cores. `--help` lists every flag; `--list_presets` the UNet presets.
"""

import logging
import sys

from hf_ddpm.cli import run_cli
from hf_ddpm.trainer import train
from hf_ddpm.training_args import parse_training_args

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(run_cli(lambda: train(parse_training_args())))
