"""Training throughput: hf_ddpm's real training step against the loop of diffusers' train_unconditional.py.

    python benchmarks/train_throughput.py --preset digits-16 --batch_size 64 --steps 50 --rounds 5
    python benchmarks/train_throughput.py --preset digits-16 --batch_size 64 --torch_compile --mixed_precision bf16

(a) hf_ddpm: a `Trainer` built from `TrainingArguments` (the preset's training defaults, the flags above) into
    a temporary folder, its `step()` called repeatedly and its logging every --logging_steps, as `train()` does;
(b) the reference: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py,
    written out below (`ReferenceLoop`) on the same network, data, batch size, optimizer settings and EMA, the
    images decoded once (that script decodes and transforms PNGs through torchvision every step, which is not
    installed here) and flipped per image by its DataLoader when the preset flips.

Neither side updates a progress bar, writes trackers or checkpoints. The sides alternate, one round of --steps
optimizer steps each (the order swapped every round), after one warm-up round each that is not counted (it holds
the compilation under --torch_compile). It prints the hardware, the median and spread (min-max) of img/s over
the rounds for each side, their ratio, peak memory, the share of hf_ddpm's step outside forward/backward and the
optimizer (against `core_step`, the same step on one reused batch without EMA or logging, one step of each in
turn), and a profile of --profile_steps of hf_ddpm's steps by the `record_function` labels of
`hf_ddpm.trainer.STEP_PHASES` (the profiler's cost per op inflates the phases of small ops). --torch_compile and
--channels_last apply to (a) only; --mixed_precision to both (accelerate keeps one precision per process), unless
--reference_fp32 keeps (b) in fp32, the precision train_unconditional.py runs in unless told otherwise, so that
hf_ddpm with every lever is compared with the reference as users run it. --json writes the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Dataset

from hf_ddpm import speed
from hf_ddpm.data import ImageDataset
from hf_ddpm.trainer import STEP_PHASES, Trainer
from hf_ddpm.training_args import TrainingArguments, parse_training_args


class FlippedImages(Dataset):
    """The decoded images, each flipped with probability 1/2 when asked: torchvision's RandomHorizontalFlip."""

    def __init__(self, images: torch.Tensor, random_flip: bool) -> None:
        self.images, self.random_flip = images, random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        return {"input": image.flip(-1) if self.random_flip and torch.rand(()) < 0.5 else image}


class ReferenceLoop:
    """train_unconditional.py's training step on hf_ddpm's network, data and optimizer settings."""

    def __init__(
        self,
        args: TrainingArguments,
        unet_config: dict[str, Any],
        data: ImageDataset,
        accelerator: Accelerator,
        fp32: bool = False,
    ) -> None:
        self.accelerator = accelerator
        model = diffusers.UNet2DModel.from_config(unet_config)
        self.noise_scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
            beta_start=args.beta_start, beta_end=args.beta_end,
        )  # fmt: skip
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        )  # fmt: skip
        images = FlippedImages(data.get_batch(range(len(data))), args.random_flip)
        loader = DataLoader(images, batch_size=args.train_batch_size, shuffle=True, drop_last=True)
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=10**6
        )
        self.ema = EMAModel(
            model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
            power=args.ema_power, model_cls=diffusers.UNet2DModel, model_config=model.config,
        )  # fmt: skip
        self.model, self.optimizer, loader, self.lr_scheduler = accelerator.prepare(
            model, optimizer, loader, self.lr_scheduler
        )
        self.ema.to(accelerator.device)
        if fp32:  # the forward without accelerate's autocast wrapper
            self.model = accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
        self.max_grad_norm = args.max_grad_norm
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        self.weight_dtype = torch.float32 if fp32 else dtypes.get(accelerator.mixed_precision, torch.float32)
        self.global_step = 0
        self.model.train()

    def step(self) -> None:
        accelerator = self.accelerator
        clean_images = next(self.batches)["input"].to(self.weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=self.weight_dtype, device=clean_images.device)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device
        ).long()
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(self.model):
            model_output = self.model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if accelerator.sync_gradients:
            self.ema.step(self.model.parameters())
            self.global_step += 1
        logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0], "step": self.global_step}
        logs["ema_decay"] = self.ema.cur_decay_value
        accelerator.log(logs, step=self.global_step)


def hf_ddpm_step(trainer: Trainer) -> Callable[[], None]:
    """One step of `Trainer.train`'s loop without progress bar, previews or checkpoints."""
    trainer._last_log = (trainer.global_step, time.perf_counter())
    progress = argparse.Namespace(set_postfix=lambda **kw: None)  # the loop's tqdm bar, silent

    def step() -> None:
        grad_norm = trainer.step()
        if trainer.global_step % trainer.args.logging_steps == 0:
            trainer._log(grad_norm, progress)

    return step


def core_step(trainer: Trainer) -> Callable[[], None]:
    """`Trainer.step()` with only forward/backward and the optimizer left: one micro-batch, made once, reused, and
    no EMA or logging. (a)'s time minus this is the step's overhead, measured without a profiler (whose cost per
    recorded op inflates the phases made of small ops: data, noise, EMA)."""
    cached = trainer._batch(0)

    def step() -> None:
        ema, posthoc_ema = trainer.ema, trainer.posthoc_ema
        trainer._batch, trainer.ema, trainer.posthoc_ema = lambda micro_step: cached, None, None  # type: ignore
        try:
            trainer.step()
        finally:
            del trainer._batch
            trainer.ema, trainer.posthoc_ema = ema, posthoc_ema

    return step


def overhead_share(full: Callable[[], None], core: Callable[[], None], steps: int, device: torch.device,
                   blocks: int = 5) -> dict[str, float]:  # fmt: skip
    """1 - core / full from median step times, one step of each in turn (the machine's drift, which moves whole
    rounds on a shared CPU by 10-20%, then falls on both alike); min-max over `blocks` consecutive blocks."""
    times: dict[str, list[float]] = {"full": [], "core": []}
    for _ in range(steps):
        for name, step in (("full", full), ("core", core)):
            times[name].append(timed_round(step, 1, device))
    size = max(steps // blocks, 1)
    shares = [1 - statistics.median(times["core"][i : i + size]) / statistics.median(times["full"][i : i + size])
              for i in range(0, steps - size + 1, size)]  # fmt: skip
    share = 1 - statistics.median(times["core"]) / statistics.median(times["full"])
    return {"median": share, "min": min(shares), "max": max(shares), "steps": steps}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step`, the device drained before and after."""
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - began


def measure(
    sides: dict[str, Callable[[], None]], steps: int, rounds: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Seconds per round of each side, alternating and swapping the order every round; peak CUDA memory each."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    peak: dict[str, int | None] = dict.fromkeys(sides)
    names = list(sides)
    for round_ in range(rounds + 1):  # round 0 warms up
        for name in names if round_ % 2 else names[::-1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed = timed_round(sides[name], steps, device)
            if device.type == "cuda":
                peak[name] = max(peak[name] or 0, torch.cuda.max_memory_allocated(device))
            if round_:
                seconds[name].append(elapsed)
    return seconds, peak


def profile_phases(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, Any]:
    """Milliseconds per step in each of `STEP_PHASES` (host time; on CUDA also device time), and the wall time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = timed_round(step, steps, device)
    events = {e.key: e for e in prof.key_averages() if e.key in STEP_PHASES}
    phases = {}
    for name in STEP_PHASES:
        event = events.get(name)
        phases[name] = {
            "host_ms": event.cpu_time_total / 1e3 / steps if event else 0.0,
            "device_ms": getattr(event, "device_time_total", 0) / 1e3 / steps if event else 0.0,
        }
    return {"wall_ms": wall * 1e3 / steps, "phases": phases}


def summary(seconds: list[float], images_per_step: int, steps: int) -> dict[str, float]:
    rates = [steps * images_per_step / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "steps_per_s": statistics.median(rates) / images_per_step}  # fmt: skip


def report(results: dict[str, Any]) -> str:
    lines = [
        f"train_throughput: {results['preset']}, batch {results['batch_size']}, mixed precision "
        f"{results['mixed_precision']} (reference: {results['reference_mixed_precision']}); hf_ddpm: "
        f"{results['speed_settings']}",
        f"{results['hardware']}; torch {torch.__version__}",
        f"{results['rounds']} rounds x {results['steps']} steps per side after a warm-up round, alternating",
        "",
        f"{'side':10s} {'img/s median':>13s} {'min-max':>17s} {'steps/s':>8s} {'peak memory':>12s}",
    ]
    for name in ("hf_ddpm", "reference"):
        side = results[name]
        memory = f"{side['peak_memory_mib']:.0f} MiB" if side["peak_memory_mib"] is not None else "see below"
        lines.append(f"{name:10s} {side['median']:13.1f} {side['min']:8.1f}-{side['max']:<8.1f} "
                     f"{side['steps_per_s']:8.2f} {memory:>12s}")  # fmt: skip
    ratio = results["ratio"]
    lines.append(f"hf_ddpm / reference: {ratio['median']:.2f}x (per round {ratio['min']:.2f}-{ratio['max']:.2f}x)")
    if results["hf_ddpm"]["peak_memory_mib"] is None:
        rss = results["max_rss_mib"]
        lines.append(f"peak memory (CPU): the process's max RSS, both sides and the data together: {rss:.0f} MiB")
    overhead = results["overhead"]
    if overhead is not None:
        lines.append(f"hf_ddpm's step outside forward/backward and the optimizer (data, noise, EMA, logging), "
                     f"unprofiled against the same step on one reused batch without EMA or logging, "
                     f"{overhead['steps']} steps of each alternated: {100 * overhead['median']:.1f}% of the median "
                     f"step (per fifth of the steps {100 * overhead['min']:.1f}-"
                     f"{100 * overhead['max']:.1f}%)")  # fmt: skip
    profiled = results["profile"]
    if profiled["steps"]:
        lines += ["", f"hf_ddpm's step, {profiled['steps']} steps profiled: {profiled['wall_ms']:.2f} ms per step "
                  "(wall)"]  # fmt: skip
        accounted = 0.0
        for name, phase in profiled["phases"].items():
            accounted += phase["host_ms"]
            device_ms = f", device {phase['device_ms']:.2f} ms" if results["device"] == "cuda" else ""
            share = 100 * phase["host_ms"] / profiled["wall_ms"]
            lines.append(f"  {name:17s} {phase['host_ms']:7.2f} ms host ({share:4.1f}%){device_ms}")
        lines.append(f"  {'other':17s} {profiled['wall_ms'] - accounted:7.2f} ms (profiler, Python between phases)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits-16")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--no_tf32", action="store_true", help="CUDA: true fp32 (hf_ddpm's --allow_tf32 false)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--reference_fp32",
        action="store_true",
        help="the reference in fp32 whatever --mixed_precision (train_unconditional.py's default)",
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side, after one warm-up round")
    parser.add_argument("--profile_steps", type=int, default=20, help="0: no profile")
    parser.add_argument("--overhead_steps", type=int, default=150, help="steps of each, in turn (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp:
        flags = [
            "--preset", options.preset, "--train_batch_size", str(options.batch_size), "--output_dir", tmp,
            "--report_to", "none", "--max_train_steps", str(10**6), "--mixed_precision", options.mixed_precision,
            "--torch_compile", str(options.torch_compile), "--channels_last", str(options.channels_last),
            "--allow_tf32", str(not options.no_tf32),
        ]  # fmt: skip
        trainer = Trainer(parse_training_args(flags))
        device = trainer.accelerator.device
        reference = ReferenceLoop(trainer.args, trainer.unet.config, trainer.data, trainer.accelerator,
                                  fp32=options.reference_fp32)  # fmt: skip
        sides = {"hf_ddpm": hf_ddpm_step(trainer), "reference": reference.step}
        seconds, peak = measure(sides, options.steps, options.rounds, device)
        overhead = (overhead_share(sides["hf_ddpm"], core_step(trainer), options.overhead_steps, device)
                    if options.overhead_steps else None)  # fmt: skip
        profiled = profile_phases(sides["hf_ddpm"], options.profile_steps, device) if options.profile_steps else {}
    results: dict[str, Any] = {
        "preset": options.preset, "batch_size": options.batch_size, "mixed_precision": options.mixed_precision,
        "reference_mixed_precision": "no" if options.reference_fp32 else options.mixed_precision,
        "speed_settings": trainer._levers(), "hardware": speed.hardware(trainer.accelerator),
        "device": device.type, "steps": options.steps, "rounds": options.rounds,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "profile": {"steps": options.profile_steps, **profiled},  # steps 0: not profiled
    }  # fmt: skip
    for name in sides:
        side = summary(seconds[name], options.batch_size, options.steps)
        results[name] = {**side, "peak_memory_mib": peak[name] / 2**20 if peak[name] is not None else None}
    ratios = [b / a for a, b in zip(seconds["hf_ddpm"], seconds["reference"], strict=True)]
    results["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    results["overhead"] = overhead
    print(report(results))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
