"""Distilled student against its teacher: images per second of each, measured in one run (issue 14's goal: the
1-step student at least 20x the teacher's 20-step sampler).

    python benchmarks/student_speed.py distilled output
    python benchmarks/student_speed.py distilled output --student_steps 2 --teacher_sampler ddim --teacher_steps 50

Both sides draw --num_images images with `hf_ddpm.sampling.generate` in batches of --batch_size, after one
untimed warm-up batch each (which also counts the UNet evaluations per image with a forward hook, so the steps
are measured, not assumed). Each round times the student then the teacher, the side with fewer UNet calls drawing
its images that many times more (so both run about as long), so a load change on a shared machine hits both sides
of a round; the ratio is the student's median images/s over the teacher's, and the spread of the
per-round ratios says how much the machine moved. UNet evaluations per second (images x evaluations / s) of the
two sides tell whether one UNet call costs the same in both: the images/s ratio is the evaluations-per-image
ratio times theirs. --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hf_ddpm import speed
from hf_ddpm.hub import load_pipeline
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.sampling import ALL_SAMPLERS, generate

GOAL = 20.0  # student images/s at least this multiple of the teacher's


def unet_evaluations_per_image(pipe: DDPMPipeline, draw: Callable[[], torch.Tensor]) -> float:
    """Run `draw()` once and return the UNet evaluations it made per image it returned (batch rows summed over
    every forward call)."""
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        images = draw()
    finally:
        hook.remove()
    return sum(rows) / len(images)


def summarize(num_images: int, seconds: dict[str, list[float]], evals_per_image: dict[str, float]) -> dict:
    """The figures of one run from the timed seconds per round of the sides "student" and "teacher"."""
    sides = {}
    for name in ("student", "teacher"):
        rates = [num_images / s for s in seconds[name]]
        sides[name] = {"images_per_s": rates, "median_images_per_s": statistics.median(rates),
                       "unet_evals_per_image": evals_per_image[name],
                       "median_evals_per_s": statistics.median(rates) * evals_per_image[name]}  # fmt: skip
    student, teacher = sides["student"], sides["teacher"]
    per_round = [s / t for s, t in zip(student["images_per_s"], teacher["images_per_s"], strict=True)]
    ratio = student["median_images_per_s"] / teacher["median_images_per_s"]
    return {"sides": sides, "ratio": ratio, "round_ratios": per_round, "goal": GOAL, "goal_met": ratio >= GOAL,
            "evals_ratio": student["median_evals_per_s"] / teacher["median_evals_per_s"]}  # fmt: skip


def report(figures: dict) -> list[str]:
    """The printed table and verdict of `summarize`'s figures."""
    student, teacher = figures["sides"]["student"], figures["sides"]["teacher"]
    lines = [f"{'round':>6s} {'student img/s':>14s} {'teacher img/s':>14s} {'ratio':>7s}"]
    rounds = zip(student["images_per_s"], teacher["images_per_s"], figures["round_ratios"], strict=True)
    for i, (s, t, r) in enumerate(rounds):
        lines.append(f"{i + 1:6d} {s:14.1f} {t:14.1f} {r:6.1f}x")
    lines.append(f"{'median':>6s} {student['median_images_per_s']:14.1f} {teacher['median_images_per_s']:14.1f}")
    lines.append(f"per-round ratios: {min(figures['round_ratios']):.1f}x-{max(figures['round_ratios']):.1f}x")
    lines.append(f"UNet calls per image: student {student['unet_evals_per_image']:g}, "
                 f"teacher {teacher['unet_evals_per_image']:g}")  # fmt: skip
    lines.append(f"UNet evaluations per second (images x calls / s): student {student['median_evals_per_s']:.1f}, "
                 f"teacher {teacher['median_evals_per_s']:.1f}, "
                 f"student / teacher {figures['evals_ratio']:.2f}x")  # fmt: skip
    verdict = "met" if figures["goal_met"] else "missed"
    lines.append(f"student / teacher images per second: {figures['ratio']:.1f}x (goal >= {GOAL:g}x: {verdict})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="the distilled pipeline: a folder or Hub id")
    parser.add_argument("teacher", help="the teacher pipeline: a folder or Hub id")
    parser.add_argument("--student_sampler", default="ddim", choices=list(ALL_SAMPLERS))
    parser.add_argument("--student_steps", type=int, default=1)
    parser.add_argument("--teacher_sampler", default="sde-dpmsolver++", choices=list(ALL_SAMPLERS))
    parser.add_argument("--teacher_steps", type=int, default=20)
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    options = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = options.num_images
    setups = {"student": (options.student, options.student_sampler, options.student_steps),
              "teacher": (options.teacher, options.teacher_sampler, options.teacher_steps)}  # fmt: skip
    draws: dict[str, Callable[[int], torch.Tensor]] = {}
    evals_per_image: dict[str, float] = {}
    for name, (model, sampler, steps) in setups.items():
        pipe = load_pipeline(model).to(device)

        def draw(count: int, pipe: DDPMPipeline = pipe, sampler: str = sampler, steps: int = steps) -> torch.Tensor:
            return generate(pipe, count, sampler=sampler, num_inference_steps=steps, seed=0,
                            batch_size=options.batch_size, progress=False)  # fmt: skip

        draws[name] = draw
        # warm-up (kernels chosen, caches filled), counting the UNet calls on the way
        evals_per_image[name] = unet_evaluations_per_image(pipe, lambda d=draw: d(min(options.batch_size, n)))
    # the side with fewer UNet calls draws its images that many times more a round, so that both sides of a round
    # run about as long and a burst of load on a shared machine cannot fall on a short side alone
    repeats = {name: max(1, round(max(evals_per_image.values()) / calls)) for name, calls in evals_per_image.items()}
    seconds: dict[str, list[float]] = {name: [] for name in draws}
    for _ in range(options.rounds):
        for name, draw in draws.items():
            began = time.perf_counter()
            for _ in range(repeats[name]):
                draw(n)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append((time.perf_counter() - began) / repeats[name])
    where = speed.cpu_name() + f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)  # fmt: skip
    print(f"student_speed: student {options.student} ({options.student_sampler} {options.student_steps} steps), "
          f"teacher {options.teacher} ({options.teacher_sampler} {options.teacher_steps} steps); {n} images in "
          f"batches of {options.batch_size} (the student's drawn {repeats['student']} times a round, the "
          f"teacher's {repeats['teacher']}), {options.rounds} rounds alternating; {where}; "
          f"torch {torch.__version__}")  # fmt: skip
    figures = summarize(n, seconds, evals_per_image)
    print("\n".join(report(figures)))
    if options.json:
        for name, (model, sampler, steps) in setups.items():
            figures["sides"][name].update(model=model, sampler=sampler, steps=steps)
        figures.update(num_images=n, batch_size=options.batch_size, rounds=options.rounds, device=where)
        options.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
