#!/usr/bin/env python
"""Train the small CNN behind the offline `digits` metric and write its shipped weights and training record.

    python scripts/train_digits_classifier.py            # -> hf_ddpm/evaluation/digits_classifier.{safetensors,json}
    python scripts/train_digits_classifier.py --output_dir /tmp/cls --seed 1

Deterministic for a given seed and torch build (one CPU thread); about 20 s.
See hf_ddpm/evaluation/digits_classifier.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hf_ddpm.cli import run_cli
from hf_ddpm.evaluation.digits_classifier import (
    DEFAULT_CONFIG,
    DEFAULT_WEIGHTS,
    save_digits_classifier,
    train_digits_classifier,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(DEFAULT_WEIGHTS.parent), help="default: the hf_ddpm package")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, batches, noise and the split")
    parser.add_argument("--epochs", type=int, default=24)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs}")
    model, record = train_digits_classifier(seed=args.seed, epochs=args.epochs)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / DEFAULT_WEIGHTS.name, folder / DEFAULT_CONFIG.name
    save_digits_classifier(model, record, weights, config)
    print(
        f"held-out accuracy {record['heldout_accuracy']:.4f} on {record['num_heldout']} digits; "
        f"wrote {weights} ({os.path.getsize(weights) / 1024:.0f} KB) and {config}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
