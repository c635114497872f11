"""Every option of `scripts/train.py`, as one dataclass that transformers' `HfArgumentParser` turns into CLI flags.

Values are resolved in this order, later ones winning: the defaults below, the chosen preset's
`train_defaults`, a YAML or JSON file given with `--config`, then flags on the command line:

    accelerate launch scripts/train.py --config configs/ddpm_cifar10.yaml --train_batch_size 64

The preset whose defaults apply is the one the highest source names (a --preset flag beats the config file's),
and `--help` shows every default as that preset and the config file set it. How long to train is given by
`--max_train_steps` or by `--num_epochs`: the highest source that gives either decides, so a `--num_epochs` of
yours replaces a `max_train_steps` that the preset (or the config file) sets. One source giving both is refused.

Flag names follow diffusers' examples/unconditional_image_generation/train_unconditional.py where it has one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import is_wandb_available
from diffusers.optimization import SchedulerType
from transformers import HfArgumentParser

from hf_ddpm.arguments import check_fp16_device, parse_into_dataclasses
from hf_ddpm.data import DataArguments
from hf_ddpm.errors import ConfigError
from hf_ddpm.hub import check_repo_id
from hf_ddpm.posthoc_ema import EDM2_SIGMA_RELS, parse_sigma_rels
from hf_ddpm.presets import get_preset, list_presets
from hf_ddpm.sampling import ALL_SAMPLERS, RECOMMENDED_SAMPLER
from hf_ddpm.scheduler import LOSS_WEIGHTINGS, PREDICTION_TYPES, VARIANCE_TYPES
from hf_ddpm.timestep_samplers import TIMESTEP_SAMPLERS

RUN_LENGTH = frozenset({"max_train_steps", "num_epochs"})  # the two ways of saying how long to train


@dataclass(frozen=True)
class EvalScore:
    """For --eval_every: the value of a metric that decides which export is `best/`, and its direction."""

    value: str
    higher_is_better: bool = False


# One entry per name of hf_ddpm.evaluation.METRICS, in its order (a test checks): importing evaluation here would
# slow every start of scripts/train.py by about 0.8 s.
EVAL_SCORE = {
    "fid": EvalScore("fid"),
    "kid": EvalScore("kid"),
    "inception_score": EvalScore("inception_score", higher_is_better=True),
    "fd_dinov2": EvalScore("fd_dinov2"),
    "nll": EvalScore("nll_bpd"),
    "digits": EvalScore("digits_fd"),
}


@dataclass
class TrainingArguments(DataArguments):
    """Every option of scripts/train.py: the data of `DataArguments` (its fields come first), then the run's."""

    # Model
    preset: str = field(
        default="digits-16",
        metadata={
            "help": f"UNet preset ({', '.join(list_presets())}), a config.json, or a model folder to start from; "
            "a preset's training defaults apply under --config and flags"
        },
    )
    unet_overrides: str | None = field(
        default=None, metadata={"help": "JSON object of UNet2DModel fields to override, e.g. '{\"dropout\": 0.1}'"}
    )
    allow_pickle: bool = field(
        default=False, metadata={"help": "also load .bin (pickle) weights of a --preset folder; trusted sources only"}
    )
    # Data, beyond DataArguments: augmentation and the training-only options
    random_crop: bool = field(default=False, metadata={"help": "random instead of centre crop (augmentation)"})
    random_flip: bool = field(default=False, metadata={"help": "random horizontal flips (augmentation)"})
    skip_bad_images: bool = field(default=False, metadata={"help": "log and skip unreadable images instead of failing"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N images"})
    streaming: bool = field(
        default=False,
        metadata={"help": "read --dataset_name / --train_data_dir shard by shard, decoding on the fly, no cache "
                  "(needs --max_train_steps; hf_ddpm.streaming)"},
    )  # fmt: skip
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "--streaming: rows per shuffled window of the stream"}
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "--streaming: DataLoader worker processes that decode images (0: in the loop)"}
    )
    # Run
    output_dir: str = field(default="output", metadata={"help": "where the pipeline, samples, logs and checkpoints go"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow a fresh run into a folder that already holds a trained pipeline"}
    )
    seed: int = field(default=0, metadata={"help": "seed for weights, data order, noise and augmentation"})
    train_batch_size: int = field(default=64, metadata={"help": "images per process per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps; a --num_epochs you give replaces a preset's value"}
    )
    num_epochs: int = field(
        default=70, metadata={"help": "passes over the data, when --max_train_steps is unset; give one of the two"}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16 (default: accelerate's config); weights stay fp32"}
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "seconds a process waits for the others (a dead or hung one) before the run stops"},
    )
    # Optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW peak learning rate"})
    lr_scheduler: str = field(
        default="constant_with_warmup", metadata={"help": "any name of transformers' get_scheduler (cosine, linear..)"}
    )
    lr_warmup_steps: int = field(default=500, metadata={"help": "linear warm-up, in optimizer steps"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    use_ema: bool = field(default=True, metadata={"help": "keep an EMA of the weights and export it"})
    ema_max_decay: float = field(default=0.9999, metadata={"help": "EMA decay after warm-up"})
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warm-up inverse multiplicative factor"})
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up exponent"})
    posthoc_ema_every: int = field(
        default=0,
        metadata={"help": "every N steps save snapshots of power-function EMAs (EDM2) to OUTPUT/posthoc_ema, from "
                  "which scripts/posthoc_ema.py rebuilds any EMA length after training; 0: off"},
    )  # fmt: skip
    posthoc_ema_sigma_rels: str = field(
        default=",".join(map(str, EDM2_SIGMA_RELS)),
        metadata={"help": "relative widths of the stored power-function EMAs (EDM2's two)"},
    )
    # Speed (hf_ddpm.speed): none changes what is trained, only how fast and up to float rounding
    torch_compile: bool = field(
        default=False,
        metadata={"help": "compile the UNet's forward with torch.compile (a minute or more before the first step; "
                  "eager with a warning if compiling fails or the compiled gradients differ from eager ones)"},
    )  # fmt: skip
    channels_last: bool = field(default=False, metadata={"help": "UNet and batches in channels_last (NHWC) layout"})
    prefetch_batches: int | None = field(
        default=None,
        metadata={"help": "micro-batches (images, timesteps, noise) a background thread prepares ahead of the step; "
                  "default 2 on CUDA, 0 on CPU (where the thread would take cores from the step)"},
    )  # fmt: skip
    allow_tf32: bool = field(
        default=True, metadata={"help": "CUDA: TF32 for fp32 matmuls and convolutions (Ampere+); false: true fp32"}
    )
    # Diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = field(default="linear", metadata={"help": "linear, scaled_linear or squaredcos_cap_v2"})
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = field(default="epsilon", metadata={"help": "epsilon, sample or v_prediction"})
    variance_type: str = field(
        default="fixed_small", metadata={"help": "fixed_small, fixed_large, or learned_range (hybrid loss)"}
    )
    loss_weighting: str = field(default="uniform", metadata={"help": "uniform (L_simple), min_snr or vlb"})
    snr_gamma: float = field(default=5.0, metadata={"help": "gamma of min-SNR weighting"})
    vlb_lambda: float = field(default=0.001, metadata={"help": "weight of the VLB term in the hybrid loss"})
    timestep_sampler: str = field(default="uniform", metadata={"help": "uniform or loss-second-moment"})
    # Watching the run
    logging_dir: str = field(default="logs", metadata={"help": "tensorboard folder, inside --output_dir"})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "tensorboard, wandb, all (every installed tracker accelerate supports) or none"},
    )
    logging_steps: int = field(default=10, metadata={"help": "log scalars every N steps"})
    sample_every: int = field(default=500, metadata={"help": "log a sample grid every N steps (0: never)"})
    num_preview_images: int = field(default=16, metadata={"help": "images in each logged grid"})
    preview_sampler: str = field(
        default=RECOMMENDED_SAMPLER, metadata={"help": "sampler for logged grids and --eval_every"}
    )
    preview_steps: int | None = field(
        default=None, metadata={"help": "sampler steps for logged grids and --eval_every (default: the sampler's)"}
    )
    num_final_images: int = field(default=64, metadata={"help": "images in the final samples.png"})
    final_sampler: str = field(
        default=RECOMMENDED_SAMPLER, metadata={"help": "sampler for samples.png (ddpm: the paper's 1000 steps)"}
    )
    final_steps: int | None = field(
        default=None, metadata={"help": "sampler steps for samples.png (default: the sampler's)"}
    )
    eval_every: int = field(default=0, metadata={"help": "compute --eval_metric every N steps, keep best/ (0: never)"})
    eval_metric: str = field(default="digits", metadata={"help": "metric for --eval_every (digits, fid, ...)"})
    eval_num_samples: int = field(default=512, metadata={"help": "samples for --eval_every"})
    # Checkpoints
    checkpointing_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps"})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    # Hub
    push_to_hub: bool = field(default=False, metadata={"help": "push the exported pipeline at the end"})
    hub_model_id: str | None = field(default=None, metadata={"help": "org/name of the Hub repo"})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or login cache)"})
    hub_private_repo: bool = field(default=False, metadata={"help": "create the Hub repo as private"})
    hub_revision: str | None = field(default=None, metadata={"help": "branch to push to"})
    hub_push_every: int = field(default=0, metadata={"help": "also push every N checkpoints (0: only at the end)"})
    push_checkpoints: bool = field(default=False, metadata={"help": "upload checkpoints/ too"})
    push_logs: bool = field(default=False, metadata={"help": "upload logs/ too"})
    overwrite_model_card: bool = field(default=False, metadata={"help": "replace a README edited on the Hub"})

    def __post_init__(self) -> None:
        """Reject values no code path accepts, before anything is built, with the flag and the valid choices."""
        choices = {
            "prediction_type": PREDICTION_TYPES,
            "variance_type": VARIANCE_TYPES,
            "eval_metric": tuple(EVAL_SCORE),
            "loss_weighting": LOSS_WEIGHTINGS,
            "timestep_sampler": tuple(TIMESTEP_SAMPLERS),
            "lr_scheduler": tuple(s.value for s in SchedulerType),
            "mixed_precision": (None, "no", "fp16", "bf16"),
            "preview_sampler": ALL_SAMPLERS,
            "final_sampler": ALL_SAMPLERS,
            "report_to": ("tensorboard", "wandb", "all", "none"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                shown = ", ".join(str(v) for v in valid if v is not None)
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of: {shown}")
        for names, (rule, holds) in _RANGES.items():
            for name in names:
                value = getattr(self, name)
                if value is not None and not holds(value):
                    raise ConfigError(f"--{name} must be {rule}, got {value}")
        if self.beta_schedule in ("linear", "scaled_linear") and not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(
                f"--beta_start {self.beta_start} and --beta_end {self.beta_end} must satisfy 0 < beta_start <= "
                f"beta_end < 1 (the noise variances of the {self.beta_schedule} schedule)"
            )
        if self.streaming and self.max_train_steps is None:
            raise ConfigError("--streaming needs --max_train_steps: a stream's length is not known in advance, so "
                              "--num_epochs cannot say how long to train")  # fmt: skip
        if self.streaming and self.eval_every:
            raise ConfigError("--eval_every needs the cached dataset as its reference; drop it with --streaming "
                              "and evaluate the export with scripts/evaluate.py")  # fmt: skip
        parse_sigma_rels(self.posthoc_ema_sigma_rels, "--posthoc_ema_sigma_rels")
        if self.report_to == "wandb" and not is_wandb_available():  # accelerate would drop it with a debug line
            raise ConfigError('--report_to wandb needs wandb: pip install -e ".[wandb]" (or pip install wandb)')
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id org/name (or a name, for the token's own user)")
        if self.hub_model_id is not None:
            check_repo_id(self.hub_model_id)
        check_fp16_device(self.mixed_precision)

    def to_dict(self) -> dict[str, Any]:
        """All arguments, without secrets: what training_summary.json and the model card record."""
        values = asdict(self)
        values.pop("hub_token")
        return values


# The range of every numeric flag (None, where allowed, means unset), checked before anything is built.
_RANGES: dict[tuple[str, ...], tuple[str, Callable[[float], bool]]] = {
    ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "logging_steps", "max_train_steps",
     "num_epochs", "max_train_samples", "resolution", "num_train_timesteps", "num_preview_images", "preview_steps",
     "num_final_images", "final_steps", "eval_num_samples", "checkpoints_total_limit", "ddp_timeout",
     "shuffle_buffer_size"): ("at least 1", lambda v: v >= 1),
    ("lr_warmup_steps", "sample_every", "eval_every", "hub_push_every", "adam_weight_decay", "adam_epsilon",
     "max_grad_norm", "vlb_lambda", "dataloader_num_workers", "posthoc_ema_every", "prefetch_batches"): (
        "at least 0", lambda v: v >= 0
    ),
    ("learning_rate", "ema_inv_gamma", "ema_power", "snr_gamma"): ("positive", lambda v: v > 0),
    ("adam_beta1", "adam_beta2"): ("in [0, 1)", lambda v: 0 <= v < 1),
    ("ema_max_decay",): ("in [0, 1]", lambda v: 0 <= v <= 1),
    ("seed",): ("in [0, 2**32 - 1]", lambda v: 0 <= v < 2**32),
}  # fmt: skip


def training_flag(name: str) -> Any:
    """A dataclass field for another script's `--name` with TrainingArguments' default and help, so that a flag
    both scripts take (scripts/push_to_hub.py's Hub flags) is spelt and explained once."""
    (spec,) = [f for f in fields(TrainingArguments) if f.name == name]
    return field(default=spec.default, metadata=spec.metadata)


def parse_training_args(argv: list[str] | None = None) -> TrainingArguments:
    """Parse flags (and `--config FILE`) into `TrainingArguments`, with the chosen preset's defaults filled in."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = _given_on_command_line(argv)
    if given.pop("list_presets", False):
        for name in list_presets():
            print(f"{name:18s} {get_preset(name).description}")
        raise SystemExit(0)
    config = given.pop("config", None)
    from_file = _read_config_file(config) if config else {}
    preset = given.get("preset", from_file.get("preset", TrainingArguments.preset))
    preset_defaults = get_preset(preset).train_defaults if preset in list_presets() else {}
    defaults = {**preset_defaults, **from_file}
    if "num_epochs" in _run_length_source(given, from_file, config):
        defaults["max_train_steps"] = None  # the user's epochs, not a max_train_steps from a source below
    shown = f"--preset {preset}" + (f" and --config {config}" if config else "")
    parser = _parser(description=f"Train a DDPM. The defaults shown are what {shown} make of them.")
    parser.set_defaults(**defaults)
    args, _ = parse_into_dataclasses(parser, argv)
    return args


def _parser(**kwargs: Any) -> HfArgumentParser:
    parser = HfArgumentParser(TrainingArguments, **kwargs)
    parser.add_argument("--config", default=None, help="YAML or JSON file of arguments; flags override it")
    parser.add_argument("--list_presets", action="store_true", help="print the UNet presets and exit")
    return parser


def _given_on_command_line(argv: list[str]) -> dict[str, Any]:
    """The arguments `argv` sets, parsed, by name (`--help` is left for the full parse)."""
    unset = object()
    parser = _parser(add_help=False)
    names = [f.name for f in fields(TrainingArguments)] + ["config", "list_presets"]
    parser.set_defaults(**dict.fromkeys(names, unset))
    namespace = parser.parse_known_args(argv)[0]
    return {name: value for name, value in vars(namespace).items() if value is not unset}


def _run_length_source(given: dict[str, Any], from_file: dict[str, Any], config: str | None) -> dict[str, Any]:
    """The highest source that sets the run length (the command line, then the config file), or {}; one that
    sets it twice is refused."""
    for where, values in (("on the command line", given), (f"in --config {config}", from_file)):
        named = RUN_LENGTH & values.keys()
        if len(named) == len(RUN_LENGTH):
            raise ConfigError(
                f"--max_train_steps and --num_epochs are both given {where}: give one of them "
                "(optimizer steps, or passes over the data)"
            )
        if named:
            return values
    return {}


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of argument names to values")
    known = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown argument(s) {unknown}; see scripts/train.py --help")
    return values
