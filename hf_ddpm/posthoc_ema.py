"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3):
choose the EMA length after training, by the metric, instead of guessing it before.

During training two *power-function* EMAs of the weights are kept. After t optimizer steps the profile with
exponent gamma is the average of the weights theta_1 .. theta_t with weights proportional to tau^gamma,

    theta_gamma(t) = beta_t theta_gamma(t - 1) + (1 - beta_t) theta_t,    beta_t = (1 - 1/t)^(gamma + 1)   (eq. 3)

whose width relative to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2's
`sigma_rel`; 0.05 and 0.10 are its two stored profiles). Both are written out every N steps as snapshots.
Any other profile (gamma*, t*) is then a linear combination of the snapshots: with p_i(tau) the (continuous)
weighting of snapshot i, (gamma_i + 1) tau^gamma_i / t_i^(gamma_i + 1) on [0, t_i], the coefficients x minimise
the L2 distance between sum_i x_i p_i and p* (EDM2, appendix C.3), a least-squares problem whose Gram matrix

    <p_i, p_j> = (gamma_i + 1)(gamma_j + 1) m^(gamma_i + gamma_j + 1) / ((gamma_i + gamma_j + 1) t_i^(gamma_i + 1)
                 t_j^(gamma_j + 1)),    m = min(t_i, t_j)

is known in closed form (`_inner`). `PowerEMA` keeps the profiles (a checkpointed object, so resumed runs
continue them exactly), `save_snapshot` / `load_snapshots` write and read them, and `reconstruct` combines
them; scripts/posthoc_ema.py evaluates a range of sigma_rel and exports the best.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_ddpm.arguments import check_positive
from hf_ddpm.atomic import write_json
from hf_ddpm.errors import CheckpointError, ConfigError

SNAPSHOT_DIR = "posthoc_ema"
EDM2_SIGMA_RELS = (0.05, 0.10)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile whose relative width is `sigma_rel` (0 < sigma_rel < 0.2887,
    the width of gamma = 0, a plain running mean): the root of sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma + 1."""
    if not 0 < sigma_rel < 12**-0.5:
        raise ValueError(f"sigma_rel must lie in (0, {12**-0.5:.4f}) (gamma > 0), got {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])  # the cubic expanded
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0))


def parse_sigma_rels(text: str, flag: str) -> list[float]:
    """Comma-separated sigma_rel values, each checked; a ConfigError naming `flag` otherwise."""
    try:
        values = [float(value) for value in text.split(",")]
        for value in values:
            sigma_rel_to_gamma(value)
    except ValueError as err:
        raise ConfigError(f"{flag} {text!r}: {err}") from None
    return values


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


class PowerEMA:
    """Power-function EMAs of `parameters` (one per gamma), updated once per optimizer step with eq. 3; its
    `state_dict` holds the step count and every profile, for `accelerator.register_for_checkpointing`."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], sigma_rels: Sequence[float]) -> None:
        params = [p.detach() for p in parameters]
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.profiles = [[p.clone() for p in params] for _ in self.gammas]
        self.step_count = 0

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = [p.detach() for p in parameters]
        self.step_count += 1
        for gamma, profile in zip(self.gammas, self.profiles, strict=True):
            beta = (1 - 1 / self.step_count) ** (gamma + 1)
            torch._foreach_lerp_(profile, params, 1 - beta)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "gammas": self.gammas, "profiles": self.profiles}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not np.allclose(state["gammas"], self.gammas):
            raise CheckpointError(
                f"the checkpoint's post-hoc EMA profiles have sigma_rel "
                f"{[round(gamma_to_sigma_rel(g), 4) for g in state['gammas']]}, this run asks for "
                f"{[round(gamma_to_sigma_rel(g), 4) for g in self.gammas]}; pass the run's --posthoc_ema_sigma_rels"
            )
        self.step_count = state["step_count"]
        for profile, saved in zip(self.profiles, state["profiles"], strict=True):
            for p, s in zip(profile, saved, strict=True):
                p.copy_(s)


@dataclass(frozen=True)
class Snapshot:
    """One stored profile: its exponent, the step it was taken at, and the weights by parameter name."""

    gamma: float
    step: int
    weights: dict[str, torch.Tensor]


def save_snapshot(ema: PowerEMA, names: Sequence[str], folder: str | Path) -> Path:
    """Write every profile of `ema` at its current step to folder/step-NNNNNNN.safetensors (atomically: a crash
    never leaves a partial snapshot under that name). Returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}/{name}": p.contiguous().cpu() for i, profile in enumerate(ema.profiles)
               for name, p in zip(names, profile, strict=True)}  # fmt: skip
    path = folder / f"step-{ema.step_count:07d}.safetensors"
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"step": str(ema.step_count), "gammas": json.dumps(ema.gammas)})
    os.replace(tmp, path)
    return path


def load_snapshots(folder: str | Path, up_to_step: int | None = None) -> list[Snapshot]:
    """Every profile of every snapshot in `folder` taken at or before `up_to_step` (all when None), by step."""
    snapshots = []
    for path in sorted(Path(folder).glob("step-*.safetensors")):
        with safe_open(str(path), "pt") as file:
            meta = file.metadata()
        step, gammas = int(meta["step"]), json.loads(meta["gammas"])
        if up_to_step is not None and step > up_to_step:
            continue
        tensors = load_file(str(path))
        for i, gamma in enumerate(gammas):
            prefix = f"{i}/"
            weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            snapshots.append(Snapshot(gamma, step, weights))
    if not snapshots:
        at = "" if up_to_step is None else f" at or before step {up_to_step}"
        raise CheckpointError(f"no post-hoc EMA snapshots{at} in {folder}; train with --posthoc_ema_every N")
    return snapshots


def _inner(gamma_i: float, t_i: float, gamma_j: float, t_j: float) -> float:
    """<p_i, p_j>: the integral over tau of the two normalised power profiles (module docstring)."""
    m = min(t_i, t_j)
    # in logs: t^(gamma + 1) overflows for long runs
    log = (
        np.log(gamma_i + 1) + np.log(gamma_j + 1) + (gamma_i + gamma_j + 1) * np.log(m)
        - np.log(gamma_i + gamma_j + 1) - (gamma_i + 1) * np.log(t_i) - (gamma_j + 1) * np.log(t_j)
    )  # fmt: skip
    return float(np.exp(log))


def coefficients(snapshots: Sequence[tuple[float, int]], gamma: float, step: int) -> np.ndarray:
    """Least-squares weights x of the snapshots (gamma_i, t_i) whose combined profile best matches (gamma, step)."""
    gram = np.array([[_inner(gi, ti, gj, tj) for gj, tj in snapshots] for gi, ti in snapshots])
    target = np.array([_inner(gi, ti, gamma, step) for gi, ti in snapshots])
    return np.linalg.lstsq(gram, target, rcond=None)[0]


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of a power-function EMA of width `sigma_rel` at `step` (default: the last snapshot's),
    combined from `snapshots` taken at or before it."""
    step = max(s.step for s in snapshots) if step is None else step
    used = [s for s in snapshots if s.step <= step]
    x = coefficients([(s.gamma, s.step) for s in used], sigma_rel_to_gamma(sigma_rel), step)
    return {
        name: sum(float(c) * s.weights[name].double() for c, s in zip(x, used, strict=True)).to(tensor.dtype)
        for name, tensor in used[0].weights.items()
    }


@dataclass
class PosthocEMAArguments:
    """What scripts/posthoc_ema.py rebuilds and how it chooses; `SamplingArguments` and `DataArguments` say how
    each candidate is sampled and scored, as in scripts/evaluate.py."""

    sigma_rels: str = field(
        default="0.02,0.03,0.05,0.07,0.1,0.15,0.2", metadata={"help": "EMA widths to rebuild and evaluate"}
    )
    step: int | None = field(default=None, metadata={"help": "rebuild the EMAs at this step (default: the last)"})
    metric: str = field(default="digits", metadata={"help": "the metric that chooses (one of scripts/evaluate.py's)"})
    num_images: int = field(default=512, metadata={"help": "samples per candidate"})
    sigma_rel_values: list[float] = field(init=False, repr=False)  # --sigma_rels parsed

    def __post_init__(self) -> None:
        from hf_ddpm.training_args import EVAL_SCORE  # which imports this module

        self.sigma_rel_values = parse_sigma_rels(self.sigma_rels, "--sigma_rels")
        if self.metric not in EVAL_SCORE:
            raise ConfigError(f"--metric {self.metric!r} is not one of: {', '.join(EVAL_SCORE)}")
        check_positive(self, ("step", "num_images"))


def search(model: str | Path, args: PosthocEMAArguments, sampling: Any, data: Any) -> list[dict[str, Any]]:
    """Rebuild the EMA of each `args.sigma_rels` at the step asked from MODEL/posthoc_ema's snapshots, export
    each to MODEL/posthoc_ema/step-S/sigma_rel-W (a plain DDPMPipeline folder with MODEL's scheduler, training
    summary and its own eval_results.json and model card), score it with `args.metric`, and write the table,
    best first by the metric, to MODEL/posthoc_ema/step-S/results.json. Returns the table."""
    from hf_ddpm.checkpointing import export_pipeline
    from hf_ddpm.evaluation import EvaluationArguments, evaluate
    from hf_ddpm.hub import load_pipeline
    from hf_ddpm.trainer import SUMMARY_FILE
    from hf_ddpm.training_args import EVAL_SCORE

    model = Path(model)
    summary = model / SUMMARY_FILE  # evaluation's reference images and the card's training facts come from it
    folder = model / SNAPSHOT_DIR
    snapshots = load_snapshots(folder, args.step)
    step = args.step or max(s.step for s in snapshots)
    pipe = load_pipeline(str(model))
    score = EVAL_SCORE[args.metric]
    rows = []
    for sigma_rel in args.sigma_rel_values:
        pipe.unet.load_state_dict(reconstruct(snapshots, sigma_rel, step))
        candidate = folder / f"step-{step}" / f"sigma_rel-{sigma_rel:.3f}"
        export_pipeline(pipe, candidate)
        if summary.is_file():
            shutil.copyfile(summary, candidate / SUMMARY_FILE)
        evaluation = EvaluationArguments(metrics=args.metric, num_images=args.num_images)
        values = evaluate(str(candidate), evaluation, sampling, data)
        rows.append({"sigma_rel": sigma_rel, "step": step, "folder": str(candidate), **values})
    rows.sort(key=lambda row: row[score.value], reverse=score.higher_is_better)
    write_json(folder / f"step-{step}" / "results.json", {"metric": score.value, "step": step, "candidates": rows})
    return rows
