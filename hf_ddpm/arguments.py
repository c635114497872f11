"""What the argument dataclasses of the scripts share; transformers' `HfArgumentParser` turns their fields into flags.

The dataclasses live next to what they configure: `hf_ddpm.data.DataArguments` (which images),
`hf_ddpm.sampling.SamplingArguments` (how images are drawn from a model), `hf_ddpm.evaluation.EvaluationArguments`
(what is measured) and `hf_ddpm.training_args.TrainingArguments` (a training run, with the data options). Each
checks its values in `__post_init__`, so a bad flag stops the script before anything is loaded.

    >>> model, sample_args = parse_model_arguments((SampleArguments,), ["output", "--num_images", "16"])
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any

import torch
from transformers import HfArgumentParser

from hf_ddpm.errors import ConfigError

MODEL_HELP = "pipeline folder (e.g. a training output) or Hub repo id"
# what transformers' string_to_bool reads as a boolean flag's value
_BOOL_WORDS = {"yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each optional flag's default after its help, and the description (a script's docstring, with examples) as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)  # a required flag has none


def parse_model_arguments(
    types: Sequence[type],
    argv: list[str] | None = None,
    description: str | None = None,
    positional: tuple[str, str] = ("model", MODEL_HELP),
) -> tuple[Any, ...]:
    """(MODEL, an instance of each dataclass in `types`) from `argv` (default: sys.argv[1:]), the command line of
    scripts/sample.py, scripts/evaluate.py and scripts/push_to_hub.py: one positional argument (`positional`: its
    name and help), then the dataclasses' flags."""
    parser = HfArgumentParser(types, description=description, formatter_class=_HelpFormatter)
    parser.add_argument(positional[0], help=positional[1])
    *instances, rest = parse_into_dataclasses(parser, _bare_switches_set(types, argv))
    return (getattr(rest, positional[0]), *instances)


def _bare_switches_set(types: Sequence[type], argv: list[str] | None) -> list[str]:
    """`argv` with "true" after each boolean flag given bare before a word that is not a boolean: HfArgumentParser's
    boolean flags take an optional value, so `--allow_pickle output` would read MODEL as that value."""
    argv = sys.argv[1:] if argv is None else argv
    switches = {
        f"--{field.name}"
        for cls in types
        for field in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[field.name] in (bool, bool | None)
    }
    fixed: list[str] = []
    for arg, following in zip(argv, [*argv[1:], None], strict=True):
        fixed.append(arg)
        if arg in switches and following is not None and not following.startswith("-"):
            if following.lower() not in _BOOL_WORDS:
                fixed.append("true")
    return fixed


def parse_into_dataclasses(parser: HfArgumentParser, argv: list[str] | None) -> tuple[Any, ...]:
    """`parser.parse_args_into_dataclasses(argv)`, with HfArgumentParser's ValueError for unknown flags raised as
    the ConfigError every other bad flag is (`__post_init__` checks raise ConfigError themselves)."""
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{err}; see --help") from None


def check_positive(args: Any, names: Sequence[str]) -> None:
    """Raise a ConfigError naming the flag unless each attribute in `names` is None or a positive integer."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def check_fp16_device(mixed_precision: str | None, device_type: str | None = None) -> None:
    """Refuse fp16 on a CPU, where accelerate would silently train in fp32. Without `device_type`, the machine
    is a CPU one unless torch sees a GPU (or another accelerator)."""
    if mixed_precision == "fp16" and (device_type == "cpu" if device_type else not torch.accelerator.is_available()):
        raise ConfigError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no")
