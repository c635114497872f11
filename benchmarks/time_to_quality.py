"""Time to quality: how soon the default recipe reaches the digits FD that the DDPM paper's recipe ends at.

    python benchmarks/time_to_quality.py --default_steps 6000 --paper_steps 6000 --eval_every 500 --seeds 0 1

One after the other on this machine (never in parallel: two torch processes on few cores slow each other down
many times over), it trains with `scripts/train.py`, each run evaluated with the digits metric every
`--eval_every` steps, once per training seed of `--seeds` (the recipes alternate, so a machine that slows down
slows both):

(a) the default recipe: no recipe flags, i.e. the default preset's `train_defaults`, for `--default_steps`;
(b) Ho et al. (2020)'s plain recipe on the same network and data (`PAPER_RECIPE`), for `--paper_steps`
    (default 3x as many).

It prints the CPU, a Markdown table per run, (b)'s final digits FD, the first training time at which (a) reaches
it, and that time as a fraction of (b)'s training time, against the goal of at most 1/3. Training time is each
run's `train_seconds` (wall clock without the evaluations); between two evaluations the crossing is
interpolated linearly in time and FD. With several seeds the verdict is on the seed-averaged curves (digits FD
and seconds averaged over seeds at each evaluation step), which averages out both the noise of one evaluation
and the spread between training seeds; the ratio of each seed's pair of runs is printed beside it. The figure
plots digits FD against training seconds, the mean of each recipe and every seed's run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, ScalarFormatter

from hf_ddpm.figures import DPI, save_line_plot
from hf_ddpm.presets import get_preset
from hf_ddpm.sampling import RECOMMENDED_SAMPLER, SAMPLERS, default_steps
from hf_ddpm.trainer import SUMMARY_FILE
from hf_ddpm.training_args import TrainingArguments

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
PRESET = get_preset(TrainingArguments.preset)  # what scripts/train.py trains with no flags
GOAL = 1 / 3  # (a) should reach (b)'s final quality in at most this fraction of (b)'s training time
MIN_RELIABLE_SAMPLES = 512  # below this the Fréchet distances carry several points of noise
FD, FLOOR = "digits_fd", "digits_fd_real_halves"
# the table's columns: eval_history key, title, format
COLUMNS = [
    ("global_step", "step", "{}"),
    ("train_seconds", "train seconds", "{:.1f}"),
    (FD, "digits FD", "{:.2f}"),
    ("digits_confidence", "confident (>0.9)", "{:.3f}"),
    ("digits_class_entropy", "class entropy", "{:.3f}"),
]

# (b) Ho et al. (2020), sections 3.4 and 4, appendix B, written out flag by flag so that it stays the paper's recipe
# whatever the defaults become: L_simple (eps prediction, uniform weights and timesteps), the linear betas, Adam
# at 2e-4, constant after the preset's warm-up, clipping at 1, and an EMA of the weights at 0.9999 with
# diffusers' EMA warm-up (without one a run this short would export its initial weights). Network, data, batch
# size and augmentation stay the preset's: digits are not flipped.
PAPER_RECIPE = [
    "--prediction_type", "epsilon", "--variance_type", "fixed_small", "--loss_weighting", "uniform",
    "--timestep_sampler", "uniform", "--num_train_timesteps", "1000", "--beta_schedule", "linear",
    "--beta_start", "1e-4", "--beta_end", "0.02", "--learning_rate", "2e-4", "--lr_scheduler", "constant_with_warmup",
    "--lr_warmup_steps", str(PRESET.train_defaults["lr_warmup_steps"]), "--max_grad_norm", "1.0",
    "--use_ema", "--ema_max_decay", "0.9999", "--ema_inv_gamma", "1.0", "--ema_power", "0.75",
]  # fmt: skip
RECIPES = {"default": [], "paper": PAPER_RECIPE}


@dataclass(frozen=True)
class Comparison:
    """(b)'s final digits FD, (b)'s training seconds to it, and when (a) first reached it (None: never)."""

    target_fd: float
    paper_seconds: float
    default_seconds: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.default_seconds is None else self.default_seconds / self.paper_seconds

    @property
    def goal_met(self) -> bool:
        return self.ratio is not None and self.ratio <= GOAL


def read_results(output_dir: str | Path) -> dict[str, Any]:
    """The `results` of a run's training_summary.json, checked to hold a non-empty digits `eval_history`."""
    path = Path(output_dir) / SUMMARY_FILE
    results = json.loads(path.read_text())["results"]
    history = results.get("eval_history")
    if not history:
        raise SystemExit(f"error: {path} has no eval_history; train with --eval_every and an hf_ddpm that records it")
    missing = sorted({FLOOR, *(key for key, _, _ in COLUMNS)} - set(history[-1]))
    if missing:
        raise SystemExit(f"error: {path}: the eval_history entries lack {missing}; train with --eval_metric digits")
    return results


def first_crossing(history: Sequence[dict[str, Any]], target: float, key: str = FD) -> float | None:
    """The training seconds at which `key` first falls to `target` or below; None if it never does.

    Between the last evaluation above `target` and the first at or below it the time is interpolated linearly
    in (train_seconds, value); if the first evaluation is already there, its time is returned (an upper bound).
    """
    before = None
    for point in sorted(history, key=lambda p: p["global_step"]):
        seconds, value = point["train_seconds"], point[key]
        if value <= target:
            if before is None:
                return seconds
            seconds0, value0 = before
            return seconds0 + (value0 - target) / (value0 - value) * (seconds - seconds0)
        before = seconds, value
    return None


def mean_history(histories: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The runs' histories averaged point by point (every key) at each evaluation step; they must share steps."""
    steps = [sorted(p["global_step"] for p in history) for history in histories]
    if any(s != steps[0] for s in steps):
        raise SystemExit(f"error: the runs were evaluated at different steps: {steps}")
    by_step = [sorted(history, key=lambda p: p["global_step"]) for history in histories]
    return [
        {key: sum(p[key] for p in points) / len(points) for key in points[0]}
        | {"global_step": points[0]["global_step"]}
        for points in zip(*by_step, strict=True)
    ]


def compare(default_history: Sequence[dict[str, Any]], paper_history: Sequence[dict[str, Any]]) -> Comparison:
    """When (a) first reaches the digits FD of (b)'s last evaluation, against (b)'s training time to it."""
    final = max(paper_history, key=lambda p: p["global_step"])
    return Comparison(final[FD], final["train_seconds"], first_crossing(default_history, final[FD]))


def markdown_table(history: Sequence[dict[str, Any]]) -> str:
    """One row per evaluation: step, training seconds, digits FD, confidence and class entropy."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for point in sorted(history, key=lambda p: p["global_step"]):
        lines.append("| " + " | ".join(fmt.format(point[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def comparison_text(c: Comparison) -> str:
    """The verdict: (b)'s final FD, when (a) reached it, the ratio and whether it meets the goal."""
    lines = [f"(b) paper recipe: final digits FD {c.target_fd:.2f} after {c.paper_seconds:.1f} training seconds"]
    if c.default_seconds is None:
        lines.append(f"(a) default recipe: never reached digits FD {c.target_fd:.2f}")
        lines.append("goal <= 1/3: not met (never reached)")
    else:
        lines.append(
            f"(a) default recipe: first reached digits FD {c.target_fd:.2f} after {c.default_seconds:.1f} training "
            "seconds (interpolated linearly between evaluations)"
        )
        lines.append(f"ratio (a) / (b): {c.ratio:.3f}; goal <= 1/3: {'met' if c.goal_met else 'not met'}")
    return "\n".join(lines)


def fd_vs_seconds_figure(
    histories: dict[str, Sequence[dict[str, Any]]],
    floor: float,
    path: str | Path,
    runs: dict[str, Sequence[Sequence[dict[str, Any]]]] | None = None,
) -> Path:
    """Digits FD (log scale) against training seconds, one line per label, the real-halves floor dashed; `runs`
    (by the same labels) adds each seed's run as a thin line of the same colour."""
    fig = Figure(figsize=(6, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for label, history in histories.items():
        line = _plot(ax, history, marker="o", markersize=3, label=label)
        for run in (runs or {}).get(label, ()):
            _plot(ax, run, color=line.get_color(), linewidth=0.7, alpha=0.4)
    ax.axhline(floor, color="gray", linestyle="--", label="two halves of the real digits (floor)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter())  # plain numbers; minor ones only over a decade or two
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel("digits FD (lower is better)")
    return save_line_plot(fig, ax, path)


def _plot(ax: Any, history: Sequence[dict[str, Any]], **style: Any) -> Any:
    points = sorted(history, key=lambda p: p["global_step"])
    return ax.plot([p["train_seconds"] for p in points], [p[FD] for p in points], **style)[0]


def train_command(recipe: list[str], output_dir: Path, steps: int, seed: int, args: argparse.Namespace) -> list[str]:
    """scripts/train.py with `recipe`, evaluated the same way for both runs; no sample grids inside the timed loop."""
    # --preview_sampler / --preview_steps choose the sampler of both the logged grids and --eval_every
    measurement = [
        "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--seed", str(seed),
        "--eval_every", str(args.eval_every), "--eval_metric", "digits",
        "--eval_num_samples", str(args.eval_num_samples),
        "--preview_sampler", args.eval_sampler, "--preview_steps", str(args.eval_steps), "--sample_every", "0",
        "--posthoc_ema_every", str(args.posthoc_ema_every),
    ]  # fmt: skip
    return [sys.executable, str(TRAIN_SCRIPT), *recipe, *measurement]


def train(name: str, command: list[str], output_dir: Path) -> dict[str, Any]:
    """Run one training to completion (its output in OUTPUT/NAME.log) and return its checked results."""
    log = output_dir.parent / f"{name}.log"
    print(f"training ({name}): {' '.join(command[1:])}\n  log: {log}", flush=True)
    with log.open("w") as file:
        done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"error: training ({name}) failed with exit code {done.returncode}; end of {log}:\n{tail}")
    return read_results(output_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    preset_steps = PRESET.train_defaults["max_train_steps"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_every", type=int, default=150, help="steps between evaluations, in both runs")
    parser.add_argument("--eval_num_samples", type=int, default=MIN_RELIABLE_SAMPLES, help="samples per evaluation")
    parser.add_argument("--eval_sampler", default=RECOMMENDED_SAMPLER, choices=SAMPLERS)
    parser.add_argument("--eval_steps", type=int, default=None, help="sampler steps (default: the sampler's)")
    parser.add_argument("--default_steps", type=int, default=preset_steps, help="steps of (a), default the preset's")
    parser.add_argument("--paper_steps", type=int, default=None, help="steps of (b), default 3x --default_steps")
    parser.add_argument("--output_dir", default=None, help="where both runs go (default: a new temporary folder)")
    parser.add_argument("--figure", default="docs/time_to_quality.png", help="PNG of digits FD against seconds")
    parser.add_argument("--posthoc_ema_every", type=int, default=0, help="both runs: keep post-hoc EMA snapshots")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, each run once per recipe")
    args = parser.parse_args(argv)
    args.paper_steps = args.paper_steps or 3 * args.default_steps
    args.eval_steps = args.eval_steps or default_steps(args.eval_sampler)
    for flag in ("default_steps", "paper_steps"):
        if getattr(args, flag) % args.eval_every:
            parser.error(f"--{flag} {getattr(args, flag)} is not a multiple of --eval_every {args.eval_every}: "
                         "each run must be evaluated at its last step")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="time_to_quality-"))
    root.mkdir(parents=True, exist_ok=True)
    steps = {"default": args.default_steps, "paper": args.paper_steps}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in RECIPES}
    for seed in args.seeds:
        for name, recipe in RECIPES.items():
            folder = root / f"{name}-seed{seed}"
            results[name].append(train(folder.name, train_command(recipe, folder, steps[name], seed, args), folder))
    runs = {name: [r["eval_history"] for r in rs] for name, rs in results.items()}

    hardware = {r["hardware"] for rs in results.values() for r in rs}
    print(f"\nhardware: {results['default'][0]['hardware']}")
    if len(hardware) > 1:
        print(f"warning: the runs ran on different hardware: {sorted(hardware)}")
    print(f"{args.eval_num_samples} samples per evaluation ({args.eval_sampler}, {args.eval_steps} steps); "
          f"training seeds {', '.join(map(str, args.seeds))}")  # fmt: skip
    if args.eval_num_samples < MIN_RELIABLE_SAMPLES:
        print(f"warning: below {MIN_RELIABLE_SAMPLES} samples the digits FD values are noisy")
    for label, name in (("(a) default recipe", "default"), ("(b) paper recipe", "paper")):
        for seed, result in zip(args.seeds, results[name], strict=True):
            print(f"\n{label}, seed {seed}, {steps[name]} steps, {result['wall_time_s']} s wall time with "
                  f"evaluations:\n")  # fmt: skip
            print(markdown_table(result["eval_history"]))
    for seed, default, paper in zip(args.seeds, runs["default"], runs["paper"], strict=True):
        ratio = compare(default, paper).ratio
        print(f"seed {seed}: ratio (a) / (b) {'never reached' if ratio is None else f'{ratio:.3f}'}")
    means = {name: mean_history(histories) for name, histories in runs.items()}
    if len(args.seeds) > 1:
        print(f"\naveraged over the {len(args.seeds)} seeds:")
    print("\n" + comparison_text(compare(means["default"], means["paper"])))
    labels = {"default": "(a) default recipe", "paper": "(b) paper recipe"}
    figure = fd_vs_seconds_figure(
        {labels[name]: mean for name, mean in means.items()}, means["default"][-1][FLOOR], args.figure,
        runs={labels[name]: histories for name, histories in runs.items()} if len(args.seeds) > 1 else None,
    )  # fmt: skip
    print(f"\nruns in {root}; figure {figure}")


if __name__ == "__main__":
    main()
