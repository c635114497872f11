"""Figures for reports and model cards: forward and reverse processes, sample grids, metric-vs-steps plots.

Matplotlib's object API with the Agg canvas is used (no pyplot, no global backend switch), so figures can be
made in training loops and tests without a display. Every function writes one PNG and returns its path.

    >>> from hf_ddpm.figures import forward_process_figure, reverse_process_figure
    >>> from hf_ddpm.pipeline import DDPMPipeline
    >>> pipe = DDPMPipeline.from_pretrained("output")
    >>> forward_process_figure(images[:4], pipe.scheduler, "figures/forward.png")
    >>> reverse_process_figure(pipe, "figures/reverse.png", sampler="ddim")

The image tables (forward and reverse process) give each image cell `CELL_PIXELS` pixels a side, plus
`TITLE_PIXELS` above the first row for the column titles and `LABEL_PIXELS` left of the first column when rows
are labelled: a table of R rows and C columns is `C * 100 (+ 60)` pixels wide and `R * 100 + 30` high.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from hf_ddpm.arguments import check_positive
from hf_ddpm.data import BUILTIN_DIGITS, load_image_dataset
from hf_ddpm.hub import load_pipeline
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.sampling import (
    SamplingArguments,
    compile_for_sampling,
    default_steps,
    generate,
    image_generators,
    sampling_pipeline,
    save_images,
)
from hf_ddpm.scheduler import DDPMScheduler

DPI = 100


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def save_line_plot(fig: Figure, ax: Any, path: str | Path) -> Path:
    """The finish of every line plot here: a light grid on both tick levels and a legend, then `save_figure`."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


CELL_PIXELS = 100
TITLE_PIXELS = 30
LABEL_PIXELS = 60

FORWARD_TIMESTEPS = (0, 50, 100, 200, 400, 600, 800, 999)


def _image_table(
    cells: torch.Tensor, path: str | Path, col_titles: Sequence[str], row_labels: Sequence[str] | None = None
) -> Path:
    """Draw float images (rows, cols, C, H, W) in [-1, 1] as a table with column titles; write a PNG."""
    rows, cols = cells.shape[:2]
    label = LABEL_PIXELS if row_labels else 0
    width, height = cols * CELL_PIXELS + label, rows * CELL_PIXELS + TITLE_PIXELS
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = fig.subplots(
        rows,
        cols,
        squeeze=False,
        gridspec_kw={"left": label / width, "right": 1, "bottom": 0, "top": 1 - TITLE_PIXELS / height},
    )
    pixels = ((cells.float().clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2).numpy()
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            image = pixels[r, c]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=9, pad=3)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=9)
    return save_figure(fig, path)


def forward_process(
    images_uint8: torch.Tensor, scheduler: DDPMScheduler, timesteps: Sequence[int] = FORWARD_TIMESTEPS, seed: int = 0
) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) for each image and timestep: float (len(timesteps), B, C, H, W) in [-1, 1] space.

    Uses the scheduler's closed form `q_sample`: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al.
    2020, eq. 4). Each image keeps one noise draw eps (from `seed`) across all t, so a row shows one path of
    the process. Timesteps are the scheduler's 0-based indices: t = 0 is the paper's first noising step
    (noise std sqrt(beta_1) = 0.01 with the linear schedule). A plain diffusers scheduler is upgraded with
    `hf_ddpm.scheduler.DDPMScheduler.from_config(scheduler.config)`.

    >>> xt = forward_process(images, pipe.scheduler, timesteps=(0, 999))
    >>> xt[-1].std()       # about 1: pure noise
    """
    x0 = images_uint8.float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return torch.stack([scheduler.q_sample(x0, torch.full((len(x0),), t), noise) for t in timesteps])


def forward_process_figure(
    images_uint8: torch.Tensor,
    scheduler: DDPMScheduler,
    path: str | Path,
    timesteps: Sequence[int] = FORWARD_TIMESTEPS,
    seed: int = 0,
) -> Path:
    """The forward (noising) process as in Ho et al. (2020): one row per image, one column per timestep t.

    >>> forward_process_figure(digits[:4], pipe.scheduler, "forward.png")   # 800 x 430 pixels
    """
    x_t = forward_process(images_uint8, scheduler, timesteps, seed)
    return _image_table(x_t.transpose(0, 1), path, [f"t={t}" for t in timesteps])


def reverse_process_figure(
    pipeline: DDPMPipeline,
    path: str | Path,
    num_images: int = 4,
    num_shown: int = 8,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    seed: int = 0,
) -> Path:
    """The reverse (generative) process: for each image a row of x_t and a row of the predicted x_0.

    `num_shown` evenly spaced steps are shown, from the first to the last. Column "t=T" shows, in the x_t row,
    the sample after the step taken at timestep T and, in the x_0 row, the model's prediction of x_0 at T
    (the multistep solvers, DPM-Solver++ and UniPC, report no prediction, so both rows show the sample).
    The images are those `generate(pipeline, num_images, sampler=..., seed=seed)` returns.

    >>> reverse_process_figure(pipe, "reverse.png", num_images=2, sampler="ddim")   # 860 x 430 pixels
    """
    steps = num_inference_steps or default_steps(sampler)
    pipe = sampling_pipeline(pipeline, sampler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=num_images,
        generator=image_generators(seed, range(num_images)),
        num_inference_steps=steps,
        output_type="pt",
        return_trajectory=True,
    )
    shown = np.unique(np.linspace(0, len(out.trajectory) - 1, num_shown).round().astype(int))
    rows = torch.stack([out.trajectory[shown], out.pred_x0[shown]], dim=2)  # (shown, B, 2, C, H, W)
    rows = rows.flatten(1, 2).transpose(0, 1)  # (2B, shown, C, H, W): x_t, x_0, x_t, x_0, ...
    titles = [f"t={out.timesteps[i]}" for i in shown]
    return _image_table(rows, path, titles, row_labels=[r"$x_t$", r"$\hat{x}_0$"] * num_images)


def sample_grid_figure(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A grid PNG of uint8 samples (N, C, H, W) at their own resolution, `nrow` a row (default ceil(sqrt(N))).

    >>> sample_grid_figure(generate(pipe, 64), "samples.png")     # 8 x 8 images
    """
    if Path(path).suffix != ".png":
        raise ValueError(f"sample_grid_figure writes a PNG; give a path ending in .png, not {str(path)!r}")
    return save_images(images_uint8, path, nrow=nrow)


def metric_vs_steps_figure(
    results: Sequence[dict[str, Any]], metric_name: str, path: str | Path, lower_is_better: bool = True
) -> Path:
    """A metric against the number of sampling steps (log scale), one line per sampler; 600 x 400 pixels.

    `results` are dicts with keys `sampler`, `num_inference_steps` and `value`, in any order.

    >>> metric_vs_steps_figure(
    ...     [{"sampler": "ddim", "num_inference_steps": 10, "value": 31.2},
    ...      {"sampler": "ddim", "num_inference_steps": 50, "value": 12.9}],
    ...     "FID", "fid_vs_steps.png")
    """
    fig = Figure(figsize=(6, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ordered = sorted(results, key=lambda r: (r["sampler"], r["num_inference_steps"]))
    for sampler, group in groupby(ordered, key=lambda r: r["sampler"]):
        points = list(group)
        ax.plot(
            [p["num_inference_steps"] for p in points],
            [p["value"] for p in points],
            marker="o",
            label=sampler,
        )
    ax.set_xscale("log")
    steps = sorted({r["num_inference_steps"] for r in results})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{metric_name} ({'lower' if lower_is_better else 'higher'} is better)")
    return save_line_plot(fig, ax, path)


@dataclass
class FigureArguments:
    """What scripts/make_figures.py draws besides the sampling options: where, from which images, how many."""

    output_dir: str = field(metadata={"help": "folder for forward_process.png, reverse_process.png, samples.png"})
    dataset: str = field(default=BUILTIN_DIGITS, metadata={"help": "images for the forward-process figure"})
    num_rows: int = field(default=4, metadata={"help": "images in the forward and reverse figures"})
    num_images: int = field(default=64, metadata={"help": "images in the sample grid"})

    def __post_init__(self) -> None:
        check_positive(self, ("num_rows", "num_images"))


def make_figures(model: str, args: FigureArguments, sampling: SamplingArguments) -> list[Path]:
    """scripts/make_figures.py: the forward process of `args.dataset` under `model`'s noise schedule, its reverse
    process and a sample grid (the sampler defaults to 1000-step DDPM, the paper's). Returns the three paths."""
    pipe = load_pipeline(model, allow_pickle=sampling.allow_pickle)
    if sampling.torch_compile:
        compile_for_sampling(pipe, min(sampling.batch_size, args.num_images))
    unet = pipe.unet.config
    data = load_image_dataset(args.dataset, resolution=unet.sample_size, channels=unet.in_channels)
    out = Path(args.output_dir)
    how = {"sampler": sampling.sampler or "ddpm", "num_inference_steps": sampling.num_inference_steps,
           "seed": sampling.seed}  # fmt: skip
    return [
        forward_process_figure(data.pixels(range(args.num_rows)), pipe.scheduler, out / "forward_process.png"),
        reverse_process_figure(pipe, out / "reverse_process.png", num_images=args.num_rows, **how),
        sample_grid_figure(generate(pipe, args.num_images, batch_size=sampling.batch_size, **how), out / "samples.png"),
    ]
