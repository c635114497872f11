"""Data throughput: images/s the cached and the streaming paths deliver, against what a training step consumes.

    python benchmarks/data_throughput.py          # 32 and 256 px; ddpm-cifar10-32 and ddpm-256 steps at batch 2

Local webdataset shards of generated JPEGs (smooth random colour fields, 5/4 of the target size so every image is
resized) are written to a temporary folder, at each --resolutions. Then, for each resolution:
(a) cached: `load_image_dataset` decodes the shards once into the arrow cache (its time is reported apart), then
    `ImageDataset.get_batch` of random rows with random flips is timed: what the trainer's data phase does;
(b) streaming: `open_stream` (what `--streaming` builds) with each --workers count of DataLoader workers, timed
    from its first batch (worker start-up included) over --batches batches of --batch_size;
(c) the consumption rate: `Trainer.step()` of each --presets on the built-in digits at --train_batch_size (one
    process, after one warm-up step), images per second. The data path keeps up when (a) or (b) exceeds (c).
Prints one markdown table and the hardware; --json writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hf_ddpm import speed
from hf_ddpm.data import load_image_dataset
from hf_ddpm.streaming import open_stream
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args


def write_shards(folder: Path, resolution: int, num_images: int, num_shards: int, seed: int = 0) -> None:
    """`num_shards` webdataset tars of JPEGs at 5/4 of `resolution`, smooth colour fields (JPEG-sized like photos)."""
    rng = np.random.default_rng(seed)
    size = resolution * 5 // 4
    folder.mkdir(parents=True)
    for shard in range(num_shards):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for row in range(num_images // num_shards):
                coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                info = tarfile.TarInfo(f"{shard:03d}{row:06d}.jpg")
                info.size = buffer.tell()
                tar.addfile(info, io.BytesIO(buffer.getvalue()))


def cached_rate(shards: Path, resolution: int, batch_size: int, batches: int, cache: Path) -> tuple[float, float]:
    """(seconds to decode into the cache, images/s of get_batch with flips afterwards)."""
    began = time.perf_counter()
    data = load_image_dataset(str(shards), resolution=resolution, channels=3, cache_dir=str(cache))
    decode_seconds = time.perf_counter() - began
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for _ in range(batches):
        rows = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        data.get_batch(rows, generator, random_flip=True)
    return decode_seconds, batches * batch_size / (time.perf_counter() - began)


def streaming_rate(shards: Path, resolution: int, batch_size: int, batches: int, workers: int) -> float:
    """images/s of `--streaming` with `workers` DataLoader workers, from the first batch on."""
    args = parse_training_args(["--streaming", "--dataset_name", str(shards), "--max_train_steps", "1",
                                "--train_batch_size", str(batch_size),
                                "--dataloader_num_workers", str(workers)])  # fmt: skip
    stream = open_stream(args, resolution, 3, seed=0, rank=0, world_size=1)
    began = time.perf_counter()
    for step in range(batches):
        stream.batch(step, torch.Generator().manual_seed(step), random_flip=True)
    return batches * batch_size / (time.perf_counter() - began)


def training_rate(preset: str, batch_size: int, steps: int, output: Path) -> float:
    """images/s that `Trainer.step()` consumes for `preset` on one process, after one warm-up step."""
    args = parse_training_args(["--preset", preset, "--train_batch_size", str(batch_size), "--max_train_steps",
                                str(steps + 1), "--output_dir", str(output), "--report_to", "none"])  # fmt: skip
    trainer = Trainer(args)
    trainer.model.train()
    trainer.step()
    began = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    float(trainer.loss_sum)  # wait for the device
    return steps * batch_size / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--num_images", type=int, nargs="+", default=[2048, 256], help="per resolution")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 12], help="timed batches, per resolution")
    parser.add_argument("--presets", nargs="+", default=["ddpm-cifar10-32", "ddpm-256"])
    parser.add_argument("--train_batch_size", type=int, default=2, help="ddpm-256 at 2 takes 7.6 GB on a CPU")
    parser.add_argument("--train_steps", type=int, default=2)
    parser.add_argument("--json", default=None)
    options = parser.parse_args()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, num_images, batches in zip(options.resolutions, options.num_images, options.batches,
                                                   strict=True):  # fmt: skip
            shards = Path(tmp) / f"shards-{resolution}"
            write_shards(shards, resolution, num_images, options.num_shards)
            decode, rate = cached_rate(shards, resolution, options.batch_size, batches, Path(tmp) / "cache")
            rows.append({"path": "cached (get_batch)", "px": resolution, "workers": "-", "img_s": rate,
                         "note": f"decoding {num_images} images into the cache took {decode:.1f} s"})  # fmt: skip
            for workers in options.workers:
                rate = streaming_rate(shards, resolution, options.batch_size, batches, workers)
                rows.append({"path": "streaming", "px": resolution, "workers": workers, "img_s": rate, "note": ""})
        for preset in options.presets:
            rate = training_rate(preset, options.train_batch_size, options.train_steps, Path(tmp) / preset)
            note = f"Trainer.step(), batch {options.train_batch_size}, 1 process"
            rows.append({"path": f"training consumes ({preset})", "px": "-", "workers": "-", "img_s": rate,
                         "note": note})  # fmt: skip
    hardware = f"{speed.cpu_name()}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch thread(s)"
    print(f"hardware: {hardware}")
    print("| path | px | workers | img/s | note |\n|---|---|---|---|---|")
    for row in rows:
        rate = f"{row['img_s']:.0f}" if row["img_s"] >= 10 else f"{row['img_s']:.2f}"
        print(f"| {row['path']} | {row['px']} | {row['workers']} | {rate} | {row['note']} |")
    if options.json:
        Path(options.json).write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
