"""What the experiment trackers receive during a run: sample grids go to every active tracker that takes images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hf_ddpm.trainer import train
from hf_ddpm.training_args import parse_training_args


class RecordingTracker(GeneralTracker):
    """Stands in for accelerate's WandBTracker (wandb is not installed): records what log_images gets."""

    name = "wandb"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[dict[str, Any], int | None]] = []

    @property
    def tracker(self) -> RecordingTracker:
        return self

    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.images.append((values, step))


def test_preview_grids_go_to_tensorboard_and_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = RecordingTracker()
    real_init = Accelerator.init_trackers

    def init_trackers_and_wandb(self: Accelerator, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self.trackers.append(wandb)

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers_and_wandb)
    out = tmp_path / "out"
    train(parse_training_args([
        "--preset", "tiny-8", "--train_batch_size", "8", "--max_train_samples", "16", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--sample_every", "1", "--num_preview_images", "4", "--preview_steps", "2",
        "--num_final_images", "4", "--final_sampler", "ddim", "--final_steps", "2", "--output_dir", str(out),
    ]))  # fmt: skip

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [1]
    assert len(wandb.images) == 1
    values, step = wandb.images[0]
    assert step == 1 and list(values) == ["samples"]
    assert [(a.shape, a.dtype) for a in values["samples"]] == [((8, 8), np.dtype(np.uint8))] * 4  # HW grayscale
