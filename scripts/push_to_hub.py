#!/usr/bin/env python
"""Push a training output folder to the Hugging Face Hub as a model page (pipeline, card, samples, metrics).

    python scripts/push_to_hub.py output --hub_model_id me/ddpm-digits
    python scripts/push_to_hub.py output --hub_model_id me/ddpm-digits --hub_revision ablation --push_logs

The token comes from HF_TOKEN or `hf auth login` (prefer them to --hub_token, which shows in process lists and
shell history). On failure the script prints one line saying what to fix and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_ddpm.cli import run_cli
from hf_ddpm.hub import push_options, push_to_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the training output folder (model_index.json, unet/, scheduler/, ...)")
    parser.add_argument("--hub_model_id", required=True, help="org/name of the Hub repo (created if missing)")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN, else the login cache)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--hub_revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--push_checkpoints", action="store_true", help="also upload checkpoints/")
    parser.add_argument("--push_logs", action="store_true", help="also upload logs/ (tensorboard)")
    parser.add_argument("--overwrite_model_card", action="store_true", help="replace a README edited on the Hub")
    parser.add_argument("--commit_message", default=None, help="summary of the commit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(push_to_hub(args.output_dir, args.hub_model_id, commit_message=args.commit_message, **push_options(args)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
