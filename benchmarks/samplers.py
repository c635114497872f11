"""Samplers on one trained model: quality (the offline digits metric) against cost, all measured in one run.

    python benchmarks/samplers.py output --num_samples 512 --figure docs/digits_fd_vs_steps.png

For each (sampler, steps) — every sampler hf_ddpm offers at its default steps, and a few others — it times
`hf_ddpm.sampling.generate` on this machine, scores the samples with `hf_ddpm.evaluation.evaluate` (which merges
them into MODEL/eval_results.json and the model card), prints a Markdown table whose cost and FD columns are
ratios against 1000-step DDPM measured in the same run, with the goal that every sampler at its default steps
be within 1.25x of DDPM-1000's FD, and plots the digits Fréchet distance against the number of steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hf_ddpm.evaluation import EvaluationArguments, evaluate
from hf_ddpm.figures import metric_vs_steps_figure
from hf_ddpm.hub import load_pipeline
from hf_ddpm.sampling import SAMPLERS, SamplingArguments, default_steps, generate, save_images

# DDPM-1000 first: the baseline of both ratios
RUNS = [("ddpm", 1000)] + [(name, default_steps(name)) for name in SAMPLERS if name != "ddpm"] + [
    ("ddpm", 100), ("ddpm", 20), ("ddim", 20), ("sde-dpmsolver++", 10), ("dpmsolver++", 10)]  # fmt: skip
GOAL = 1.25  # every sampler at its default steps within this factor of DDPM-1000's digits FD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained pipeline folder")
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=256)
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
            made_by = SamplingArguments(sampler=sampler, num_inference_steps=steps, seed=args.seed)
            values = evaluate(args.model, EvaluationArguments("digits", samples=str(samples)), made_by)
            rows.append((sampler, steps, seconds, baseline / seconds, values))
            points.append({"sampler": sampler, "num_inference_steps": steps, "value": values["digits_fd"]})
            print(f"{sampler} {steps}: {seconds * 1e3:.1f} ms/image, {values}", flush=True)

    print(f"\n{args.num_samples} samples each, {torch.get_num_threads()} torch threads; real-digit halves FD "
          f"{rows[0][4]['digits_fd_real_halves']:.2f}\n")  # fmt: skip
    print("| sampler | steps | plain diffusers | ms / image | speed-up vs DDPM-1000 | confident (>0.9) | class entropy "
          "| digits FD | FD / DDPM-1000's |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    reference_fd = rows[0][4]["digits_fd"]
    for sampler, steps, seconds, speedup, v in rows:
        ratio = v["digits_fd"] / reference_fd
        verdict = f" ({'within' if ratio <= GOAL else 'NOT within'} {GOAL}x)" if steps == default_steps(sampler) else ""
        plain = "yes" if SAMPLERS[sampler].plain_diffusers else "no (hf_ddpm)"
        print(f"| {sampler} | {steps} | {plain} | {seconds * 1e3:.1f} | {speedup:.0f}x | "
              f"{v['digits_confidence']:.3f} | {v['digits_class_entropy']:.3f} | {v['digits_fd']:.2f} | "
              f"{ratio:.2f}{verdict} |")  # fmt: skip
    if args.figure:
        metric_vs_steps_figure(points, "digits FD (lower is better)", args.figure, lower_is_better=True)


if __name__ == "__main__":
    main()
