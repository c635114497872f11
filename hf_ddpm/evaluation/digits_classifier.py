"""A small CNN that recognises the built-in 16x16 digits, for a fully offline sample-quality metric.

The shipped weights (`digits_classifier.safetensors`, ~155 KB) and their training record
(`digits_classifier.json`: architecture, training settings, held-out split and accuracy) are made by
`scripts/train_digits_classifier.py`, a thin wrapper over `train_digits_classifier`:

    >>> from hf_ddpm.evaluation.digits_classifier import load_digits_classifier
    >>> model = load_digits_classifier()             # the shipped weights
    >>> logits = model(images.float() / 255)         # images: uint8 (B, 1, 16, 16), ink bright as in hf_ddpm.data

The network sees exactly what a digits DDPM is trained on, `hf_ddpm.data.digits_images(16)`, scaled to [0, 1].
It is trained on a stratified 80% of scikit-learn's 1797 digits with +-1 pixel random shifts, and with
"outlier exposure" (Hendrycks et al. 2019): noise images are pushed towards the uniform prediction, so that
`digits_confidence` is low for the noise an untrained or diverging model draws, not arbitrarily high.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.model_selection import train_test_split
from torch import nn

from hf_ddpm.data import digits_images, digits_labels

DEFAULT_WEIGHTS = Path(__file__).with_name("digits_classifier.safetensors")
DEFAULT_CONFIG = DEFAULT_WEIGHTS.with_suffix(".json")
RESOLUTION = 16
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """conv3x3(8) -> conv3x3(16) -> maxpool -> conv3x3(32) -> maxpool -> linear(64) = features -> linear(10).

    Input: float (B, 1, 16, 16) in [0, 1]. `features` are the ReLU activations of the penultimate layer, the
    space in which `digits_fd` measures Fréchet distances.
    """

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32), feature_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        self.feature_dim = feature_dim
        self.config = {"widths": list(widths), "feature_dim": feature_dim, "dropout": dropout}
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.conv3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.fc1 = nn.Linear(widths[2] * (RESOLUTION // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [0, 1] -> penultimate activations (B, feature_dim)."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Penultimate activations -> class logits (B, 10)."""
        return self.fc2(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def heldout_split(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out) of the 1797 digits: a stratified split, the same for the same seed."""
    labels = digits_labels()
    return train_test_split(np.arange(len(labels)), test_size=heldout_fraction, stratify=labels, random_state=seed)


def _noise_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """Outliers in [0, 1]: half uniform noise, half clipped Gaussian noise around grey (an untrained DDPM's look),
    the batch smoothed by a box blur of random width 1..3 so that blobs as well as speckle are covered."""
    shape = (count, 1, RESOLUTION, RESOLUTION)
    uniform = torch.rand(shape, generator=generator)
    gaussian = (0.5 + 0.5 * torch.randn(shape, generator=generator)).clamp(0, 1)
    noise = torch.where(torch.arange(count)[:, None, None, None] < count // 2, uniform, gaussian)
    width = int(torch.randint(1, 4, (), generator=generator))
    blurred = F.avg_pool2d(noise, width, stride=1, padding=width // 2, count_include_pad=False)
    return blurred[..., :RESOLUTION, :RESOLUTION]


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with 0 (background)."""
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack(
        [p[:, dy : dy + RESOLUTION, dx : dx + RESOLUTION] for p, (dy, dx) in zip(padded, offsets, strict=True)]
    )


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 (N, 1, 16, 16) images classified as their label."""
    model.eval()
    return float((model(images.float() / 255).argmax(dim=1) == labels).float().mean())


def _fit(
    model: DigitsClassifier,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_shift: int,
    outlier_weight: float,
    generator: torch.Generator,
) -> None:
    r"""Adam with a one-cycle learning rate; per step, on a batch of shifted digits and as many noise images,

    L = CE(f(x), y) + w * mean_noise[ -(1/10) sum_k log softmax(f(noise))_k ]   (w = `outlier_weight`).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps_per_epoch = -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = _random_shift(train_x[batch], max_shift, generator)
            logits = model(torch.cat([x, _noise_images(len(batch), generator)]))
            loss = F.cross_entropy(logits[: len(batch)], train_y[batch])
            loss = loss - outlier_weight * F.log_softmax(logits[len(batch) :], dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def train_digits_classifier(
    seed: int = 0,
    epochs: int = 24,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    heldout_fraction: float = 0.2,
    max_shift: int = 1,
    outlier_weight: float = 0.5,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train the classifier on a stratified (1 - heldout_fraction) of the digits; returns it and its JSON record.

    Deterministic for a given seed and torch build: every random draw comes from generators seeded with `seed`,
    and it runs on one CPU thread, so the result does not depend on the core count (tiny convolutions are also
    faster on one thread than on a contended pool); about 20 s.
    """
    train_idx, heldout_idx = heldout_split(seed, heldout_fraction)
    images = torch.from_numpy(digits_images(RESOLUTION))
    labels = torch.from_numpy(digits_labels()).long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # initialisation and dropout use the global generator
            torch.manual_seed(seed)
            model = DigitsClassifier()
            _fit(
                model,
                images[train_idx].float() / 255,
                labels[train_idx],
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                max_shift=max_shift,
                outlier_weight=outlier_weight,
                generator=torch.Generator().manual_seed(seed),
            )
    finally:
        torch.set_num_threads(threads)
    record = {
        "architecture": model.config,
        "input": "uint8 (B, 1, 16, 16) from hf_ddpm.data.digits_images(16), divided by 255",
        "training": {
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "lr_schedule": "one-cycle",
            "optimizer": "adam",
            "max_shift": max_shift,
            "outlier_weight": outlier_weight,
            "torch_version": torch.__version__,
        },
        "heldout_fraction": heldout_fraction,
        "num_train": len(train_idx),
        "num_heldout": len(heldout_idx),
        "train_accuracy": accuracy(model, images[train_idx], labels[train_idx]),
        "heldout_accuracy": accuracy(model, images[heldout_idx], labels[heldout_idx]),
    }
    return model, record


def save_digits_classifier(
    model: DigitsClassifier,
    record: dict[str, Any],
    weights_path: str | os.PathLike = DEFAULT_WEIGHTS,
    config_path: str | os.PathLike = DEFAULT_CONFIG,
) -> None:
    """Write the weights as safetensors and the training record as JSON."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    Path(config_path).write_text(json.dumps(record, indent=2) + "\n")


def load_digits_classifier(
    weights_path: str | os.PathLike = DEFAULT_WEIGHTS, config_path: str | os.PathLike = DEFAULT_CONFIG
) -> DigitsClassifier:
    """The classifier from a safetensors file and its JSON record (the shipped ones by default), in eval mode."""
    architecture = json.loads(Path(config_path).read_text())["architecture"]
    model = DigitsClassifier(**{**architecture, "widths": tuple(architecture["widths"])})
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()
