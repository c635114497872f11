#!/usr/bin/env python
"""Push a training output folder to the Hugging Face Hub as a model page (pipeline, card, samples, metrics).

    python scripts/push_to_hub.py output --hub_model_id me/ddpm-digits
    python scripts/push_to_hub.py output --hub_model_id me/ddpm-digits --hub_revision ablation --push_logs

The token comes from HF_TOKEN or `hf auth login` (prefer them to --hub_token, which shows in process lists and
shell history). On failure the script prints one line saying what to fix and exits with status 1.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from hf_ddpm.arguments import parse_model_arguments
from hf_ddpm.cli import run_cli
from hf_ddpm.hub import check_repo_id, push_options, push_to_hub
from hf_ddpm.training_args import training_flag


@dataclass
class PushArguments:
    """The flags of scripts/push_to_hub.py: the Hub flags of scripts/train.py, with --hub_model_id required."""

    hub_model_id: str = field(metadata={"help": "org/name of the Hub repo (created if missing)"})
    hub_token: str | None = training_flag("hub_token")
    hub_private_repo: bool = training_flag("hub_private_repo")
    hub_revision: str | None = training_flag("hub_revision")
    push_checkpoints: bool = training_flag("push_checkpoints")
    push_logs: bool = training_flag("push_logs")
    overwrite_model_card: bool = training_flag("overwrite_model_card")
    commit_message: str | None = field(default=None, metadata={"help": "summary of the commit"})

    def __post_init__(self) -> None:
        check_repo_id(self.hub_model_id)


def main(argv: list[str] | None = None) -> None:
    output_dir, args = parse_model_arguments(
        (PushArguments,), argv, description=__doc__,
        positional=("output_dir", "the training output folder (model_index.json, unet/, scheduler/, ...)"),
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(push_to_hub(output_dir, args.hub_model_id, commit_message=args.commit_message, **push_options(args)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
