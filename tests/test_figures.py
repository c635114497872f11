"""hf_ddpm.figures and scripts/make_figures.py: what the figures hold, and PNGs of the documented pixel size."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from hf_ddpm.figures import (
    CELL_PIXELS,
    LABEL_PIXELS,
    TITLE_PIXELS,
    forward_process,
    forward_process_figure,
    metric_vs_steps_figure,
    reverse_process_figure,
    sample_grid_figure,
)
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.presets import build_unet
from hf_ddpm.scheduler import DDPMScheduler

MAKE_FIGURES = Path(__file__).resolve().parents[1] / "scripts" / "make_figures.py"


@pytest.fixture(scope="module")
def pipe() -> DDPMPipeline:
    torch.manual_seed(0)
    return DDPMPipeline(unet=build_unet("tiny-8"), scheduler=DDPMScheduler())


@pytest.fixture
def restore_diffusers_verbosity():
    """scripts/make_figures.py silences diffusers' logging for the process; undo that after in-process runs."""
    verbosity = diffusers_logging.get_verbosity()
    yield
    diffusers_logging.set_verbosity(verbosity)


def digits_like(n: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    """A stand-in for real images: bright strokes on black."""
    images = torch.zeros(n, channels, size, size, dtype=torch.uint8)
    images[:, :, 2:6, 3:5] = 255
    return images


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_forward_process_starts_at_the_input_and_ends_in_pure_noise():
    images = torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(0)).byte()
    x_t = forward_process(images, DDPMScheduler(), timesteps=(0, 500, 999))
    assert x_t.shape == (3, 16, 3, 8, 8)
    x0 = images.float() / 127.5 - 1
    assert (x_t[0] - x0).abs().max() < 0.06  # t = 0 adds noise of std sqrt(beta_1) = 0.01
    assert abs(x_t[-1].std() - 1) < 0.1 and x_t[-1].mean().abs() < 0.1
    assert abs(torch.corrcoef(torch.stack([x_t[-1].flatten(), x0.flatten()]))[0, 1]) < 0.1
    assert torch.equal(x_t, forward_process(images, DDPMScheduler(), timesteps=(0, 500, 999)))  # seeded


def test_forward_process_figure_size(tmp_path):
    path = forward_process_figure(digits_like(3), DDPMScheduler(), tmp_path / "forward.png")
    assert path == tmp_path / "forward.png"
    assert png_size(path) == (8 * CELL_PIXELS, 3 * CELL_PIXELS + TITLE_PIXELS)
    rgb = forward_process_figure(digits_like(2, 3), DDPMScheduler(), tmp_path / "rgb.png", timesteps=(0, 999))
    assert png_size(rgb) == (2 * CELL_PIXELS, 2 * CELL_PIXELS + TITLE_PIXELS)


@pytest.mark.parametrize("sampler, steps, columns", [("ddpm", 10, 8), ("dpmsolver++", 3, 3)])
def test_reverse_process_figure_size(pipe, tmp_path, sampler, steps, columns):
    path = reverse_process_figure(
        pipe, tmp_path / "sub" / "reverse.png", num_images=2, sampler=sampler, num_inference_steps=steps
    )
    # two rows (x_t, predicted x_0) per image; never more columns than steps
    assert png_size(path) == (columns * CELL_PIXELS + LABEL_PIXELS, 4 * CELL_PIXELS + TITLE_PIXELS)


def test_sample_grid_figure(tmp_path):
    assert png_size(sample_grid_figure(digits_like(10), tmp_path / "grid.png", nrow=5)) == (40, 16)
    with pytest.raises(ValueError, match="ending in .png"):
        sample_grid_figure(digits_like(4), tmp_path / "grid.npz")


def test_metric_vs_steps_figure(tmp_path):
    results = [
        {"sampler": sampler, "num_inference_steps": steps, "value": value}
        for sampler, steps, value in [
            ("ddim", 50, 9.0),
            ("ddim", 10, 20.0),
            ("dpmsolver++", 20, 8.0),
            ("ddpm", 1000, 5.0),
        ]
    ]
    path = metric_vs_steps_figure(results, "FID", tmp_path / "fid.png")
    assert png_size(path) == (600, 400)
    assert png_size(metric_vs_steps_figure(results[:1], "IS", tmp_path / "is.png", lower_is_better=False)) == (600, 400)


def test_make_figures_script(pipe, tmp_path, monkeypatch, restore_diffusers_verbosity):
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "figures"
    monkeypatch.setattr(
        "sys.argv",
        ["make_figures.py", str(tmp_path / "model"), "--output_dir", str(out), "--sampler", "ddim",
         "--num_inference_steps", "4", "--num_rows", "2", "--num_images", "9"],
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(MAKE_FIGURES), run_name="__main__")
    assert exit_info.value.code == 0
    assert png_size(out / "forward_process.png") == (8 * CELL_PIXELS, 2 * CELL_PIXELS + TITLE_PIXELS)
    assert png_size(out / "reverse_process.png") == (4 * CELL_PIXELS + LABEL_PIXELS, 4 * CELL_PIXELS + TITLE_PIXELS)
    assert png_size(out / "samples.png") == (24, 24)


def test_make_figures_script_bad_model_is_one_line(tmp_path, monkeypatch, capfd, restore_diffusers_verbosity):
    monkeypatch.setattr("sys.argv", ["make_figures.py", str(tmp_path / "nothing"), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(MAKE_FIGURES), run_name="__main__")
    assert exit_info.value.code == 1
    error = capfd.readouterr().err  # run_cli prints the one line, nothing before it
    assert error.startswith("error: ") and error.count("\n") == 1
    assert error.endswith("nothing is neither a local folder nor a valid Hub repo id\n")
