"""Samplers on one trained model: quality (the offline digits metric) against cost, all measured in one run.

    python benchmarks/samplers.py output --num_samples 500 --figure docs/digits_fd_vs_steps.png

For each (sampler, steps) it times `hf_ddpm.sampling.generate` on this machine, scores the samples with
`hf_ddpm.evaluation.evaluate` (which merges them into MODEL/eval_results.json and the model card), prints a
Markdown table whose cost column is a ratio against 1000-step DDPM measured in the same run, and plots the
digits Fréchet distance against the number of steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hf_ddpm.evaluation import evaluate
from hf_ddpm.figures import metric_vs_steps_figure
from hf_ddpm.sampling import generate, load_pipeline, save_images

RUNS = [("ddpm", 1000), ("ddpm", 100), ("ddim", 50), ("ddim", 20), ("dpmsolver++", 20), ("dpmsolver++", 10),
        ("unipc", 10), ("euler_a", 50)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained pipeline folder")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None, help="PNG of digits_fd against steps, one line per sampler")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    rows, points, baseline = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        for sampler, steps in RUNS:
            start = time.perf_counter()
            images = generate(pipe, args.num_samples, sampler=sampler, num_inference_steps=steps, seed=args.seed,
                              batch_size=args.batch_size, progress=False)  # fmt: skip
            seconds = (time.perf_counter() - start) / args.num_samples
            baseline = baseline or seconds
            samples = save_images(images, Path(tmp) / f"{sampler}-{steps}.npz")
            values = evaluate(args.model, metrics=["digits"], samples_path=samples, sampler=sampler,
                              num_inference_steps=steps, seed=args.seed)  # fmt: skip
            rows.append((sampler, steps, seconds, baseline / seconds, values))
            points.append({"sampler": sampler, "num_inference_steps": steps, "value": values["digits_fd"]})
            print(f"{sampler} {steps}: {seconds * 1e3:.1f} ms/image, {values}", flush=True)

    print(f"\n{args.num_samples} samples each, {torch.get_num_threads()} torch threads; real-digit halves FD "
          f"{rows[0][4]['digits_fd_real_halves']:.2f}\n")  # fmt: skip
    print("| sampler | steps | ms / image | speed-up vs DDPM-1000 | confident (>0.9) | class entropy | digits FD |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for sampler, steps, seconds, speedup, v in rows:
        print(f"| {sampler} | {steps} | {seconds * 1e3:.1f} | {speedup:.0f}x | {v['digits_confidence']:.3f} | "
              f"{v['digits_class_entropy']:.3f} | {v['digits_fd']:.2f} |")  # fmt: skip
    if args.figure:
        metric_vs_steps_figure(points, "digits FD (lower is better)", args.figure, lower_is_better=True)


if __name__ == "__main__":
    main()
