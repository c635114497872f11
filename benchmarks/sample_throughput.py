"""Sampling throughput: `hf_ddpm.sampling.generate` under each speed setting against plain `diffusers.DDPMPipeline`.

    python benchmarks/sample_throughput.py output --sampler ddpm --num_inference_steps 100 --num_images 64
    python benchmarks/sample_throughput.py output --sampler dpmsolver++ --variants eager,compiled

Both sides load the same weights and draw image i from the same generator (`sampling.image_generators`), in
batches of --batch_size. Variants of the hf_ddpm side: `eager`; `channels_last` (UNet in NHWC); `compiled`
(`sampling.compile_for_sampling`, what `--torch_compile` of scripts/sample.py does, compiled before timing);
`half` (bf16 autocast on CPU, fp16 autocast on CUDA). Every variant
runs once per round, the plain pipeline among them, after a warm-up call each that is not counted;
the figure is the median over --rounds of UNet evaluations per second, counted per image (images x steps / s);
--json writes the figures.

Outputs are compared with the plain pipeline's, as uint8 images: eager must be identical; the others change
float rounding (other kernels, fused code, 8-bit mantissas), which a stochastic sampler carries into visibly
different samples after enough steps, so they are reported as the mean absolute difference in 8-bit levels
against a stated tolerance (`TOLERANCE`), not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch

from hf_ddpm import speed
from hf_ddpm.hub import load_pipeline
from hf_ddpm.sampling import (
    SAMPLERS,
    compile_for_sampling,
    default_steps,
    generate,
    image_generators,
    make_scheduler,
    to_uint8,
)

VARIANTS = ("eager", "channels_last", "compiled", "half")
# mean |difference| from plain diffusers, in 8-bit levels, that each variant is held to
TOLERANCE = {"eager": 0.0, "channels_last": 2.0, "compiled": 2.0, "half": 10.0}


def plain_sampler(model: str, sampler: str, device: torch.device) -> Callable[[int, int, int], torch.Tensor]:
    """Images `start`..`stop`-1 from plain diffusers' DDPMPipeline with the sampler's scheduler, as uint8."""
    pipe = diffusers.DDPMPipeline.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    if sampler != "ddpm":
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)

    def draw(start: int, stop: int, steps: int) -> torch.Tensor:
        generators = image_generators(0, range(start, stop))
        out = pipe(batch_size=stop - start, generator=generators, num_inference_steps=steps, output_type="pt")
        return to_uint8(out.images)

    return draw


def hf_ddpm_sampler(
    model: str, sampler: str, variant: str, device: torch.device, batch_size: int
) -> Callable[[int, int, int], torch.Tensor]:
    """Images `start`..`stop`-1 from `generate` with the UNet set up as `variant` says."""
    pipe = load_pipeline(model).to(device)
    if variant == "channels_last":
        pipe.unet.to(memory_format=speed.CHANNELS_LAST)
    half = torch.bfloat16 if device.type == "cpu" else torch.float16
    autocast = torch.autocast(device.type, dtype=half) if variant == "half" else contextlib.nullcontext()

    def draw(start: int, stop: int, steps: int) -> torch.Tensor:
        with autocast:
            images = generate(pipe, stop - start, sampler=sampler, num_inference_steps=steps, seed=0,
                              batch_size=batch_size, progress=False)  # fmt: skip
        return images

    if variant == "compiled":
        compile_for_sampling(pipe, batch_size)  # what --torch_compile of scripts/sample.py does
    return draw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pipeline folder or Hub id")
    parser.add_argument("--sampler", default="ddpm", choices=[n for n, s in SAMPLERS.items() if s.plain_diffusers])
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the sampler's (ddpm: 1000)")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    options = parser.parse_args(argv)
    variants = options.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = options.num_inference_steps or default_steps(options.sampler)
    n = options.num_images
    sides = {"plain diffusers": plain_sampler(options.model, options.sampler, device)}
    sides.update({v: hf_ddpm_sampler(options.model, options.sampler, v, device, options.batch_size)
                  for v in variants})  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    images: dict[str, torch.Tensor] = {}
    for draw in sides.values():  # warm-up: kernels chosen, caches filled
        draw(0, min(options.batch_size, n), 2)
    for _ in range(options.rounds):
        for name, draw in sides.items():
            began = time.perf_counter()
            # the plain pipeline takes one batch per call; generate batches itself
            parts = [draw(s, min(s + options.batch_size, n), steps) for s in range(0, n, options.batch_size)] \
                if name == "plain diffusers" else [draw(0, n, steps)]  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - began)
            images[name] = torch.cat(parts)
    where = speed.cpu_name() + f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)  # fmt: skip
    print(f"sample_throughput: {options.model}, {options.sampler} {steps} steps, {n} images in batches of "
          f"{options.batch_size}, {options.rounds} rounds; {where}; torch {torch.__version__}")  # fmt: skip
    base = statistics.median(n * steps / s for s in seconds["plain diffusers"])
    print(f"{'side':16s} {'evals/s':>9s} {'min-max':>17s} {'vs plain':>9s} {'mean |diff|':>12s} {'max |diff|':>11s}")
    reference = images["plain diffusers"].int()
    results = {"sampler": options.sampler, "steps": steps, "device": device.type, "sides": {}}
    for name in sides:
        rates = [n * steps / s for s in seconds[name]]
        diff = (images[name].int() - reference).abs().float()
        verdict = "" if name == "plain diffusers" else (
            " ok" if diff.mean() <= TOLERANCE[name] else f" OVER {TOLERANCE[name]}")  # fmt: skip
        print(f"{name:16s} {statistics.median(rates):9.1f} {min(rates):8.1f}-{max(rates):<8.1f} "
              f"{statistics.median(rates) / base:8.2f}x {diff.mean():12.3f} {diff.max():11.0f}{verdict}")  # fmt: skip
        results["sides"][name] = {"evals_per_s": statistics.median(rates), "vs_plain": statistics.median(rates) / base,
                                  "mean_abs_diff": diff.mean().item(), "max_abs_diff": diff.max().item()}  # fmt: skip
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    if "eager" in images and not torch.equal(images["eager"], images["plain diffusers"]):
        raise SystemExit("eager hf_ddpm images differ from plain diffusers' on the same weights and generators")


if __name__ == "__main__":
    main()
