"""The training loop: Algorithm 1 of Ho et al. (2020) under accelerate, from one CPU to many GPU nodes.

    repeat
        x_0 ~ q(x_0);  t ~ Uniform({1..T}) (or importance-sampled);  eps ~ N(0, I)
        take a gradient step on  w(t) * || target(x_0, eps, t) - model(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
    until converged

Augmentation, timesteps and noise of micro-step m on process r come from a generator seeded by (seed, m, r)
and the data order from one seeded by (seed, epoch) (`hf_ddpm.distributed.seeded_generator`, a stream each), so
a resumed run continues exactly where it stopped without replaying batches, and N steps straight equal
N/2 + resume + N/2 bit for bit on one process. With --streaming the images come from `hf_ddpm.streaming`
instead, whose position in the stream every checkpoint holds, with the same result.
The learning-rate schedule is stepped once per optimizer step, whatever the number of processes or
gradient-accumulation steps, so `--lr_warmup_steps` always counts optimizer steps.

A step never waits for the device: the loss stays there, summed, until a logging step or a checkpoint reads it
(and checks it is finite), and batches reach a GPU from pinned memory without blocking. Each phase of a step
runs under a `torch.profiler.record_function` label of `STEP_PHASES` (free when no profiler runs), which
benchmarks/train_throughput.py uses to say where the time goes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.pipelines import DiffusionPipeline
from torch.profiler import record_function
from tqdm.auto import tqdm

from hf_ddpm import checkpointing, distributed, posthoc_ema, sampling, speed
from hf_ddpm.arguments import check_fp16_device
from hf_ddpm.atomic import write_json
from hf_ddpm.cli import one_line
from hf_ddpm.data import BUILTIN_DIGITS, EpochOrder, ImageDataset, load_data
from hf_ddpm.errors import LostProcessesError, TrainingError, UserError
from hf_ddpm.hub import BackgroundPusher, push_options
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.presets import build_unet, learned_variance_unet
from hf_ddpm.scheduler import DDPMScheduler
from hf_ddpm.streaming import ImageStream, open_stream
from hf_ddpm.timestep_samplers import create_timestep_sampler
from hf_ddpm.training_args import EVAL_SCORE, TrainingArguments

logger = get_logger(__name__)  # accelerate's: logs on the main process only

SUMMARY_FILE = "training_summary.json"
SAMPLES_FILE = "samples.png"
BEST_DIR = "best"
# the record_function labels of a step's phases, in order
STEP_PHASES = ("data", "noise", "forward_backward", "optimizer", "ema", "logging")
# what torch's process groups put in the errors of a collective that lost a peer
_COLLECTIVES = ("gloo", "NCCL", "ProcessGroup", "Connection reset by peer", "Connection closed by peer")
LOSS_SMOOTHING = 0.98  # per optimizer step, for the progress bar and training_summary.json's final_loss

# How each tracker takes a batch of uint8 images (N, C, H, W): tensorboard as one grid, wandb as a gallery of
# wandb.Image (from HWC arrays: a torch tensor would be rescaled)
IMAGE_LOGGERS: dict[str, Callable[[GeneralTracker, str, torch.Tensor, int], None]] = {
    "tensorboard": lambda tracker, key, images, step: tracker.log_images({key: images}, step, dataformats="NCHW"),
    "wandb": lambda tracker, key, images, step: tracker.log_images(
        {key: [image.permute(1, 2, 0).squeeze(-1).numpy() for image in images]}, step
    ),
}


def make_noise_scheduler(args: TrainingArguments) -> DDPMScheduler:
    """The forward process of the run; saved with the pipeline as a plain diffusers DDPMScheduler config.

    It carries `sampling.SAMPLING_CONFIG` (trailing timesteps, x_0 clipped to [-1, 1]), which changes nothing for
    1000-step DDPM sampling and is what a DDIM or DPM-Solver++ scheduler made with `from_config` in plain
    diffusers inherits for few-step sampling.
    """
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        prediction_type=args.prediction_type,
        variance_type=args.variance_type,
        **sampling.SAMPLING_CONFIG,
    )


def build_model(args: TrainingArguments) -> UNet2DModel:
    """The UNet of the run: a preset, config or model folder, with `--unet_overrides` and learned-variance outputs."""
    overrides = json.loads(args.unet_overrides) if args.unet_overrides else {}
    if args.resolution is not None:
        overrides.setdefault("sample_size", args.resolution)
    unet = build_unet(args.preset, allow_pickle=args.allow_pickle, **overrides)
    if args.variance_type == "learned_range" and unet.config.out_channels == unet.config.in_channels:
        unet = learned_variance_unet(unet)
        logger.info(
            "--variance_type learned_range: %s has %d output channels; training %d with all its weights, the mean "
            "channels of conv_out kept and the variance channels zero (the mid-point of the log-variance bounds)",
            args.preset, unet.config.in_channels, unet.config.out_channels,
        )  # fmt: skip
    return unet


def load_training_data(args: TrainingArguments, unet: UNet2DModel) -> ImageDataset:
    """The training images at the UNet's size and channels; without a dataset flag, the built-in digits."""
    if args.dataset_name is None and args.train_data_dir is None:
        logger.warning(
            "no --dataset_name or --train_data_dir: training on %s (1,797 8x8 digits resized to %s px, %d channel(s))",
            BUILTIN_DIGITS, unet.config.sample_size, unet.config.in_channels,
        )  # fmt: skip
    return load_data(
        args,
        unet.config.sample_size,
        unet.config.in_channels,
        random_crop=args.random_crop,
        skip_bad_images=args.skip_bad_images,
        max_train_samples=args.max_train_samples,
    )


def _check_output_dir(args: TrainingArguments, checkpoints_dir: Path) -> Path | None:
    """Refuse a run that would mix with an earlier one in --output_dir; returns the checkpoint to resume from."""
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise TrainingError(
            "--overwrite_output_dir starts over and --resume_from_checkpoint continues the run; pass one of them"
        )
    resume = checkpointing.resolve_checkpoint(args.resume_from_checkpoint, checkpoints_dir)
    if resume is not None or args.overwrite_output_dir:
        return resume
    output = Path(args.output_dir)
    found = [name for name in ("model_index.json", f"{BEST_DIR}/model_index.json") if (output / name).is_file()]
    found += [f"checkpoints/{path.name}" for path in checkpointing.list_checkpoints(checkpoints_dir)[-1:]]
    if found:
        no_checkpoint = " but no checkpoint to resume from" if args.resume_from_checkpoint else ""
        raise TrainingError(
            f"--output_dir {output} already holds an earlier run ({', '.join(found)}){no_checkpoint}; pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or choose another "
            "--output_dir"
        )
    return None


class _Preemption:
    """SIGTERM or SIGINT (a preempted job, Ctrl-C) while training: noted, so that the loop checkpoints and stops
    after the step; a second one acts as it would without this. Handlers are only set from the main thread."""

    def __enter__(self) -> _Preemption:
        self.received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._note) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        self.__exit__()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def agreed(self, accelerator: Accelerator, can_sync: bool) -> bool:
        """Whether to stop now: on one process as soon as a signal came; on several, at steps where they all
        check (`can_sync`, the logging steps), once any of them received one."""
        if distributed.world_size(accelerator) == 1:
            return self.received is not None
        if not can_sync:
            return False
        if self.received is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


@contextlib.contextmanager
def _lost_processes_stop(trainer: Trainer) -> Iterator[None]:
    """A process that fails alone tells the others why; a collective that fails because another process failed,
    died or hung (past --ddp_timeout) stops this process with one line, that process's error when it told one.
    What a checkpoint being written then held is never marked complete."""
    try:
        yield
    except Exception as err:
        if trainer.world == 1:
            raise
        accelerator, message = trainer.accelerator, str(err)
        collective = isinstance(err, RuntimeError) and not isinstance(err, UserError)
        collective = collective and (isinstance(err, dist.DistError) or any(s in message for s in _COLLECTIVES))
        if not collective:
            # this process's own error (a bad image only it sees, a bug): it prints that itself as it exits
            distributed.report_failure(accelerator, one_line(err) if isinstance(err, UserError) else
                                       f"{type(err).__name__}: {one_line(err)}")  # fmt: skip
            raise
        this, step = f"process {distributed.rank(accelerator)} of {trainer.world}", trainer.global_step + 1
        last = checkpointing.list_checkpoints(trainer.checkpoints_dir)
        resume = f"resume from {last[-1].name if last else 'the start'} with --resume_from_checkpoint latest"
        failures = distributed.reported_failures(accelerator)
        if failures:
            other = min(failures)
            raise LostProcessesError(
                f"{this} stopped during step {step} because process {other} failed: {one_line(failures[other])}; "
                f"{resume}"
            ) from err
        raise LostProcessesError(
            f"{this} lost the others during step {step}: another process died or did not answer within "
            f"--ddp_timeout {trainer.args.ddp_timeout} s (its own log says why) [{message.splitlines()[0][:300]}]; "
            f"{resume}"
        ) from err


class Trainer:
    """One training run: `Trainer(args).train()`. Every process of an `accelerate launch` builds one."""

    def __init__(self, args: TrainingArguments):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)
            ),
            # a collective waits at most this long for a hung process (one that died fails it at once)
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        )
        # accelerate's config may ask for fp16 where --mixed_precision did not, or run on the CPU of a GPU machine
        check_fp16_device(self.accelerator.mixed_precision, self.accelerator.device.type)
        self.resume = _check_output_dir(args, self.checkpoints_dir)
        # the main process pushes; it checks Hub access now, so a bad token fails in seconds, not after the run
        self.hub: BackgroundPusher | None = None
        if args.push_to_hub and distributed.is_main(self.accelerator):
            self.hub = BackgroundPusher(args.output_dir, args.hub_model_id, **push_options(args))
        if distributed.is_main(self.accelerator):  # a folder that cannot be written fails now, not at a checkpoint
            checkpointing.check_writable(self.output_dir)
        self.overwritten = None  # the earlier run, set aside by the main process; deleted once this one exported
        if args.overwrite_output_dir and distributed.is_main(self.accelerator):
            self.overwritten = checkpointing.set_aside(self.output_dir)
            if self.overwritten is not None:
                logger.info("--overwrite_output_dir: moved the earlier run to %s until this one is exported",
                            self.overwritten)  # fmt: skip
        self.accelerator.wait_for_everyone()
        set_seed(args.seed)  # identical initial weights on every process

        self.unet, self.noise_scheduler = self.build_model()
        self.timestep_sampler = create_timestep_sampler(args.timestep_sampler, args.num_train_timesteps)
        self.world = distributed.world_size(self.accelerator)
        self.global_micro_batch = args.train_batch_size * self.world
        self.global_batch = self.global_micro_batch * args.gradient_accumulation_steps
        # the data: a stream read shard by shard (--streaming), or decoded once into a cache and indexed
        self.stream: ImageStream | None = None
        self.data: ImageDataset | None = None
        self.order: EpochOrder | None = None
        if args.streaming:
            rank = distributed.rank(self.accelerator)
            self.stream = open_stream(args, self.unet.config.sample_size, self.unet.config.in_channels,
                                      seed=args.seed, rank=rank, world_size=self.world)  # fmt: skip
            self.max_steps = args.max_train_steps
        else:
            self._load_cached_data()
        self.num_params = sum(p.numel() for p in self.unet.parameters())

        device = self.accelerator.device
        self.tf32 = speed.set_tf32(device, args.allow_tf32)
        self.memory_format = speed.CHANNELS_LAST if args.channels_last else torch.preserve_format
        self.unet.to(memory_format=self.memory_format)  # before the EMA and the optimizer copy its layout
        optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            **speed.adamw_options(device),
        )
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=self.max_steps
        )
        self.model, self.optimizer = self.accelerator.prepare(self.unet, optimizer)
        self.unet = self.accelerator.unwrap_model(self.model)
        # batches made ahead, by default on a GPU only (on a CPU the thread would take cores from the step); not for
        # an adaptive timestep sampler, which draws step k's timesteps from what step k-1 learned, nor for a stream,
        # whose checkpointed position must be the step's (its DataLoader workers read ahead instead)
        depth = args.prefetch_batches if args.prefetch_batches is not None else speed.default_prefetch(device)
        stateful = self.timestep_sampler.adaptive or self.stream is not None
        self.batches = speed.Prefetcher(self._host_batch, 0 if stateful else depth)
        self.compiled = args.torch_compile and speed.compile_unet(self.unet, self._compile_trial)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)  # stepped by hand, once per optimizer step
        self.accelerator.register_for_checkpointing(self.timestep_sampler)
        self.ema = None
        if args.use_ema:
            self.ema = speed.LerpEMA(
                self.unet.parameters(),
                decay=args.ema_max_decay,
                use_ema_warmup=True,
                inv_gamma=args.ema_inv_gamma,
                power=args.ema_power,
                model_cls=UNet2DModel,
                model_config=self.unet.config,
                **speed.EMA_OPTIONS,
            )
            self.ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.posthoc_ema = None  # --posthoc_ema_every: EDM2's power-function EMAs, saved as snapshots
        if args.posthoc_ema_every:
            sigma_rels = posthoc_ema.parse_sigma_rels(args.posthoc_ema_sigma_rels, "--posthoc_ema_sigma_rels")
            self.posthoc_ema = posthoc_ema.PowerEMA(self.unet.parameters(), sigma_rels)
            self.accelerator.register_for_checkpointing(self.posthoc_ema)
        # the bookkeeping that checkpoints carry: where the run is, how long it took, what evaluations found
        self.global_step, self.micro_step, self.wall_time = 0, 0, 0.0
        self.loss_avg: float | None = None  # smoothed over steps, for the progress bar and the summary
        # the loss of the steps since the last logging step, summed on the device: read only when logged
        self.loss_sum, self.loss_steps = torch.zeros((), device=device), 0
        self.best_score: float | None = None
        # one entry per --eval_every evaluation: step, training seconds so far (evaluations excluded), values
        self.eval_history: list[dict[str, float]] = []
        self.eval_seconds = 0.0

    def _load_cached_data(self) -> None:
        """`self.data` and its `EpochOrder`, and the run length; the cache is built once per file system: by the
        main process when every process sees the same --cache_dir, else by the local main process of each node."""
        args, accelerator = self.args, self.accelerator
        shared = distributed.shared_folder(args.cache_dir or datasets.config.HF_DATASETS_CACHE, accelerator)
        if distributed.world_size(accelerator) > 1:
            where = "once, by the main process" if shared else "on each node, by its local main process"
            logger.info("the decoded dataset cache is built %s (--cache_dir is%s shared)", where,
                        "" if shared else " not")  # fmt: skip
        first = accelerator.main_process_first() if shared else accelerator.local_main_process_first()
        with first:  # one process decodes and caches, the others read its cache
            self.data = load_training_data(args, self.unet)
        if len(self.data) < self.global_micro_batch:
            raise TrainingError(
                f"the dataset has {len(self.data)} images, fewer than one global batch of {self.global_micro_batch} "
                f"({args.train_batch_size} per process x {self.world} processes); lower --train_batch_size"
            )
        self.order = EpochOrder(len(self.data), self.global_micro_batch, args.seed)
        steps_per_epoch = max(self.order.micro_steps_per_epoch // args.gradient_accumulation_steps, 1)
        self.max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch

    def train(self) -> dict[str, Any]:
        """Run to `max_steps`, checkpointing on the way; then export. Returns training_summary.json's results."""
        accelerator = self.accelerator
        # resume: weights, optimizer, RNG and timestep-sampler states and the bookkeeping come back from the
        # checkpoint, so the run goes on bit for bit as if it had never stopped
        self._resume()
        # trackers: the hyper-parameters go with the curves they produced
        self._start_trackers()
        progress = tqdm(total=self.max_steps, initial=self.global_step, desc="train",
                        disable=not distributed.is_main(accelerator, local=True))  # fmt: skip
        self._started = time.perf_counter() - self.wall_time  # wall time counts the whole run, resumes included
        self._last_log = (self.global_step, time.perf_counter())
        self.model.train()
        with _Preemption() as preemption, progress, _lost_processes_stop(self):
            self._loop(progress, preemption)
        self.batches.close()
        # export: the pipeline, samples and summary are complete before the earlier run is deleted and the last push
        return self._finish()

    def _loop(self, progress: tqdm, preemption: _Preemption) -> None:
        """The steps from `global_step` to `max_steps`, with logging, previews, evaluations and checkpoints."""
        args = self.args
        while self.global_step < self.max_steps:
            # the step: micro-batches accumulate gradients until accelerate syncs them; then the optimizer, the
            # learning rate and the EMA move once, so every schedule counts optimizer steps
            grad_norm = self.step()
            progress.update(1)
            # logging: the one wait for the device; a loss that is no longer finite stops the run there
            if self.global_step % args.logging_steps == 0 or self.global_step == self.max_steps:
                self._log(grad_norm, progress)
            # preview: a sample grid shows what the model draws, which the loss alone does not tell
            if args.sample_every and self.global_step % args.sample_every == 0 and self.global_step < self.max_steps:
                self._log_preview()
            # eval: the metric on a few fast samples keeps the best weights in best/; its time is not training time
            if args.eval_every and self.global_step % args.eval_every == 0:
                began = time.perf_counter()
                self._evaluate(self.global_step, train_seconds=began - self._started - self.eval_seconds)
                self.eval_seconds += time.perf_counter() - began
            # post-hoc EMA: snapshots from which any EMA length can be rebuilt and chosen by the metric afterwards
            every = args.posthoc_ema_every
            if every and (self.global_step % every == 0 or self.global_step == self.max_steps):
                self._save_posthoc_snapshot()
            # preemption: SIGTERM or SIGINT ends the run after this step, with a checkpoint of it
            stop = preemption.agreed(self.accelerator, self.global_step % args.logging_steps == 0)
            stop = stop and self.global_step < self.max_steps
            # checkpoint + periodic push: a crash loses at most --checkpointing_steps, and the Hub follows the run
            # (a non-finite loss since the last logging step stops it first: a bad model is never saved as good)
            on_schedule = self.global_step % args.checkpointing_steps == 0 or self.global_step == self.max_steps
            if on_schedule or stop:
                self._save_checkpoint()
            if on_schedule:
                self._push_progress()
            if stop:
                self.accelerator.end_training()
                raise TrainingError(
                    f"stopped by {preemption.received} after step {self.global_step} of {self.max_steps} with "
                    f"checkpoint-{self.global_step} saved; continue with --resume_from_checkpoint latest"
                )

    def _resume(self) -> None:
        """Restore the checkpoint that --resume_from_checkpoint names, if any, and the run's bookkeeping."""
        if self.resume is not None:
            state = checkpointing.load_checkpoint(self.accelerator, self.resume, checkpointing.model_config(self.unet))
            self.global_step, self.wall_time = state["global_step"], state["wall_time_s"]
            self.best_score = state.get("best_score")
            self.eval_history, self.eval_seconds = state.get("eval_history", []), state.get("eval_seconds", 0.0)
            if self.stream is not None:
                self._resume_stream(state.get("stream_positions"))
            logger.info("resumed from %s at step %d", self.resume, self.global_step)
        elif self.args.resume_from_checkpoint == "latest":
            logger.info("no checkpoint in %s yet; starting a fresh run", self.checkpoints_dir)
        self.micro_step = self.global_step * self.args.gradient_accumulation_steps

    def _resume_stream(self, positions: list[dict[str, Any]] | None) -> None:
        """--streaming: this process goes on from its own stream position, saved in the checkpoint."""
        if positions is None or len(positions) != self.world:
            saved = "no stream position" if positions is None else f"the stream positions of {len(positions)} processes"
            raise TrainingError(
                f"{self.resume} holds {saved}; a --streaming run resumes with --streaming and the same number of "
                f"processes ({self.world} now)"
            )
        self.stream.load_state_dict(positions[distributed.rank(self.accelerator)])

    def _start_trackers(self) -> None:
        """Log the run's size and hardware; the main process starts the trackers with the hyper-parameters."""
        args, accelerator = self.args, self.accelerator
        logger.info(
            "%s images, %s parameters; batch %d per process x %d process(es) x %d accumulation = global batch %d; "
            "%d optimizer steps; %s; %s",
            "streamed" if self.stream else len(self.data), f"{self.num_params:,}", args.train_batch_size, self.world,
            args.gradient_accumulation_steps, self.global_batch, self.max_steps, speed.hardware(accelerator),
            self._levers(),
        )  # fmt: skip
        if idle := speed.idle_cores_warning(accelerator):
            logger.warning(idle)
        if distributed.is_main(accelerator):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            hparams = {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("hf_ddpm", config=hparams)
            no_images = [tracker.name for tracker in accelerator.trackers if tracker.name not in IMAGE_LOGGERS]
            if args.sample_every and no_images:
                logger.warning("sample grids go to %s only, not to %s", ", ".join(IMAGE_LOGGERS), ", ".join(no_images))

    def _levers(self) -> str:
        """The speed settings in effect, for the log and training_summary.json."""
        levers = ["compiled UNet" if self.compiled else "eager UNet"]
        levers.append("channels_last" if self.memory_format == speed.CHANNELS_LAST else "NCHW")
        if self.accelerator.mixed_precision != "no":
            levers.append(f"{self.accelerator.mixed_precision} autocast")
        if self.accelerator.device.type == "cuda":
            levers.append(f"TF32 {'on' if self.tf32 else 'off'}")
        if self.optimizer.param_groups[0].get("fused"):
            levers.append("fused AdamW")
        if self.ema is not None and self.ema.foreach:
            levers.append("foreach-lerp EMA")
        if self.batches.depth:
            levers.append(f"{self.batches.depth} batches prefetched")
        return ", ".join(levers)

    def step(self) -> torch.Tensor | None:
        """One optimizer step: its micro-steps, the learning rate and the EMA, the loss added to `loss_sum` on
        the device. Returns the gradient norm before clipping (None without clipping), also on the device."""
        while True:
            loss, grad_norm = self._micro_step(self.micro_step)
            self.micro_step += 1
            if self.accelerator.sync_gradients:
                break
        with record_function("optimizer"):
            self.lr_scheduler.step()
        if self.ema is not None or self.posthoc_ema is not None:
            with record_function("ema"):
                for ema in (self.ema, self.posthoc_ema):
                    if ema is not None:
                        ema.step(self.unet.parameters())
        self.global_step += 1
        with record_function("logging"):
            self.loss_sum += loss.detach()
            self.loss_steps += 1
        return grad_norm

    def _window_loss(self) -> float:
        """The mean loss over processes of the steps since the last logging step (a wait for the device); a
        non-finite one stops the run."""
        with record_function("logging"):
            loss = self.accelerator.gather(self.loss_sum).mean().item() / self.loss_steps
        if not math.isfinite(loss):
            last = checkpointing.list_checkpoints(self.checkpoints_dir)
            raise TrainingError(
                f"the loss is {loss} at or before step {self.global_step} (it is read every --logging_steps and "
                f"before each checkpoint); stopped without saving. Last good checkpoint: "
                f"{last[-1] if last else 'none'}. Lower --learning_rate, keep --max_grad_norm, or avoid fp16"
            )
        return loss

    def _log(self, grad_norm: torch.Tensor | None, progress: tqdm) -> None:
        """Scalars for the trackers and the progress bar; loss and speed are over the steps since the last log."""
        loss, steps = self._window_loss(), self.loss_steps
        kept = LOSS_SMOOTHING**steps
        self.loss_avg = loss if self.loss_avg is None else kept * self.loss_avg + (1 - kept) * loss
        self.loss_sum.zero_()
        self.loss_steps = 0
        last_step, last_time = self._last_log
        logs = {
            "loss": loss,
            "loss_smoothed": self.loss_avg,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "images_per_second": (self.global_step - last_step) * self.global_batch / (time.perf_counter() - last_time),
        }
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if self.ema is not None:
            logs["ema_decay"] = self.ema.cur_decay_value
        self.accelerator.log(logs, step=self.global_step)
        progress.set_postfix(loss=f"{self.loss_avg:.4f}", img_s=f"{logs['images_per_second']:.0f}")
        self._last_log = (self.global_step, time.perf_counter())

    def _save_checkpoint(self) -> None:
        """A resumable checkpoint of this step, with the bookkeeping that resuming restores; never of a model
        whose loss went non-finite since the last logging step."""
        args = self.args
        if self.loss_steps:
            self._window_loss()
        self.wall_time = time.perf_counter() - self._started
        state = {"global_step": self.global_step, "micro_step": self.micro_step, "wall_time_s": self.wall_time,
                 "best_score": self.best_score, "eval_history": self.eval_history,
                 "eval_seconds": self.eval_seconds, "model_config": checkpointing.model_config(self.unet)}  # fmt: skip
        if self.stream is not None:  # every process's own place in its stream
            state["stream_positions"] = distributed.gather_objects([self.stream.state_dict()], self.accelerator)
        if self.hub and args.push_checkpoints:
            self.hub.wait()  # the push reads checkpoints/, which saving rotates
        checkpointing.save_checkpoint(
            self.accelerator, self.checkpoints_dir, self.global_step, state, args.checkpoints_total_limit
        )

    def _save_posthoc_snapshot(self) -> None:
        if distributed.is_main(self.accelerator):
            names = [name for name, _ in self.unet.named_parameters()]
            folder = self.output_dir / posthoc_ema.SNAPSHOT_DIR
            folder.mkdir(parents=True, exist_ok=True)
            with checkpointing.disk_full_stops("a post-hoc EMA snapshot", folder, sorted(folder.glob("step-*"))[-1:]):
                posthoc_ema.save_snapshot(self.posthoc_ema, names, folder)

    def _push_progress(self) -> None:
        """--hub_push_every N: every N-th checkpoint before the last also exports and pushes the run."""
        args = self.args
        saved = self.global_step // args.checkpointing_steps
        push_now = args.push_to_hub and args.hub_push_every and saved % args.hub_push_every == 0
        if push_now and self.global_step < self.max_steps:  # the last push follows the final export
            self._export()  # on every process, like every export
            if self.hub:
                self.hub.push(f"step {self.global_step}")

    def _finish(self) -> dict[str, Any]:
        """The final export; then the earlier run (--overwrite_output_dir) is deleted and the run is pushed."""
        if self.stream is not None:
            self.stream.close()  # its workers' memory is free for sampling
        results = self._export(final_samples=True)
        if self.overwritten is not None:
            shutil.rmtree(self.overwritten)
        self.accelerator.end_training()  # the logs are complete before they are pushed, and even if the push fails
        if self.hub:
            self.hub.finish(f"end of training, step {self.global_step}")
        return results

    def _host_batch(self, micro_step: int) -> tuple[torch.Tensor, ...]:
        """This process's share of micro-batch `micro_step` as the CPU makes it: x_0, timesteps, loss weights and
        noise, all drawn from the micro-step's own generator (pinned for a GPU). Made ahead by `self.batches`."""
        args = self.args
        rank = distributed.rank(self.accelerator)
        generator = distributed.seeded_generator(distributed.Stream.MICRO_BATCHES, args.seed, micro_step, rank)
        with record_function("data"):
            if self.stream is not None:
                x0 = self.stream.batch(micro_step, generator, random_flip=args.random_flip)
            else:
                rows = self.order.indices(micro_step, rank, args.train_batch_size)
                x0 = self.data.get_batch(rows, generator, random_flip=args.random_flip)
        with record_function("noise"):
            timesteps, weights = self.timestep_sampler.sample(len(x0), "cpu", generator)
            noise = torch.randn(x0.shape, generator=generator)
        if self.accelerator.device.type == "cuda":  # from pinned memory a copy does not wait for queued steps
            return tuple(v.pin_memory() for v in (x0, timesteps, weights, noise))
        return x0, timesteps, weights, noise

    def _batch(self, micro_step: int) -> tuple[torch.Tensor, ...]:
        """Micro-batch `micro_step` on the device: x_0, timesteps, loss weights, noise and x_t."""
        device = self.accelerator.device
        with record_function("noise"):
            x0, timesteps, weights, noise = (
                v.to(device, non_blocking=device.type == "cuda") for v in self.batches.get(micro_step)
            )
            x0, noise = (v.contiguous(memory_format=self.memory_format) for v in (x0, noise))
            xt = self.noise_scheduler.q_sample(x0, timesteps, noise)
        return x0, timesteps, weights, noise, xt

    def _compile_trial(self) -> list[torch.Tensor]:
        """--torch_compile: one forward and backward on the first micro-batch as training makes them, so that
        compiling happens (or fails) now; returns the parameters' gradients, and leaves none behind nor draws from
        the global RNGs."""
        x0, timesteps, _, _, xt = self._batch(0)
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        self.model.train()
        with torch.random.fork_rng(devices), self.accelerator.no_sync(self.model), self.accelerator.autocast():
            self.model(xt, timesteps).sample.float().square().mean().backward()
        gradients = [p.grad for p in self.unet.parameters() if p.grad is not None]
        self.optimizer.zero_grad(set_to_none=True)
        return gradients

    def build_model(self) -> tuple[UNet2DModel, DDPMScheduler]:
        """The network to train and the forward process of the run (`hf_ddpm.distillation.Distiller`: a student)."""
        return build_model(self.args), make_noise_scheduler(self.args)

    def batch_losses(
        self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, xt: torch.Tensor
    ) -> torch.Tensor:
        """The per-image losses of one micro-batch, through `self.model` (Ho et al.'s L_simple and its variants)."""
        args = self.args
        model_output = self.model(xt, timesteps).sample
        return self.noise_scheduler.training_loss(
            model_output.float(),
            x0,
            noise,
            timesteps,
            loss_weighting=args.loss_weighting,
            snr_gamma=args.snr_gamma,
            vlb_lambda=args.vlb_lambda,
        )

    def export_pipeline(self, unet: UNet2DModel) -> DiffusionPipeline:
        """The pipeline that is exported and sampled from, around `unet`: a DDPM pipeline whose scheduler is the
        run's forward process, which every sampler starts from."""
        return DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(self.noise_scheduler.config))

    def _micro_step(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward on this process's share of micro-batch `micro_step`; steps the optimizer on sync."""
        args, accelerator = self.args, self.accelerator
        x0, timesteps, weights, noise, xt = self._batch(micro_step)
        grad_norm = None
        with accelerator.accumulate(self.model):
            with record_function("forward_backward"):
                losses = self.batch_losses(x0, timesteps, noise, xt)
                loss = (losses * weights).mean()
                accelerator.backward(loss)
            with record_function("optimizer"):
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if self.timestep_sampler.adaptive:
            # every process feeds the same gathered losses, so the sampler's state stays identical on all ranks
            self.timestep_sampler.update(*accelerator.gather((timesteps, losses.detach())))
        return loss, grad_norm

    def _ema_pipeline(self) -> DiffusionPipeline:
        """A pipeline on a copy of the weights that are exported and sampled from: the EMA ones when EMA is on."""
        copy = UNet2DModel.from_config(self.unet.config).to(self.accelerator.device)
        if self.ema is None:
            copy.load_state_dict(self.unet.state_dict())
        else:
            self.ema.copy_to(copy.parameters())
        copy.eval()
        pipe = self.export_pipeline(copy)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _log_preview(self) -> None:
        """A few-step sample grid for every tracker; every process draws its share, so none waits into a timeout."""
        args = self.args
        images = sampling.generate(
            self._ema_pipeline(),
            args.num_preview_images,
            sampler=args.preview_sampler,
            num_inference_steps=args.preview_steps,
            seed=args.seed,
            batch_size=args.num_preview_images,
            accelerator=self.accelerator,
            progress=False,
        )
        if distributed.is_main(self.accelerator):
            for tracker in self.accelerator.trackers:
                if tracker.name in IMAGE_LOGGERS:
                    IMAGE_LOGGERS[tracker.name](tracker, "samples", images, self.global_step)

    def _evaluate(self, step: int, train_seconds: float) -> None:
        """--eval_every: the metric on a few fast samples, logged; the EMA pipeline goes to best/ when it improves,
        with its results in best/eval_results.json (the schema scripts/evaluate.py writes) and on best/README.md."""
        from hf_ddpm import evaluation
        from hf_ddpm.model_card import write_model_card

        args = self.args
        pipe = self._ema_pipeline()
        steps = args.preview_steps or sampling.default_steps(args.preview_sampler)
        setup = {"sampler": args.preview_sampler, "num_inference_steps": steps, "seed": args.seed,
                 "batch_size": evaluation.DEFAULT_BATCH_SIZE, "nll_clip_denoised": True}  # fmt: skip
        values = evaluation.evaluate_pipeline(
            pipe, args.eval_metric, num_samples=args.eval_num_samples, reference=self.data,
            accelerator=self.accelerator, **setup,
        )  # fmt: skip
        self.accelerator.log({f"eval/{k}": v for k, v in values.items()}, step=step)
        self.eval_history.append({"global_step": step, "train_seconds": round(train_seconds, 2), **values})
        decides = EVAL_SCORE[args.eval_metric]
        key, score = decides.value, values[decides.value]
        improved = self.best_score is None or (
            score > self.best_score if decides.higher_is_better else score < self.best_score
        )
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if improved:
            self.best_score = score
            if distributed.is_main(self.accelerator):
                best = self.output_dir / BEST_DIR
                (best / evaluation.RESULTS_FILE).unlink(missing_ok=True)  # earlier results were of earlier weights
                checkpointing.export_pipeline(pipe, best)
                with checkpointing.disk_full_stops("the best pipeline's results and model card", best, []):
                    write_json(best / "best_eval.json", {"global_step": step, "metric": key, **values})
                    # The reference is the training set as loaded: its first --max_train_samples rows, if set.
                    entries = evaluation.result_entries(
                        values, **setup, num_samples=args.eval_num_samples, num_reference=len(self.data),
                        dataset=evaluation.dataset_label(args.dataset_name, args.train_data_dir),
                        split=evaluation.split_label(args.split, first=args.max_train_samples),
                    )  # fmt: skip
                    evaluation.merge_eval_results(best / evaluation.RESULTS_FILE, entries)
                    write_model_card(best)
            self.accelerator.wait_for_everyone()

    def _export(self, final_samples: bool = False) -> dict[str, Any]:
        """Write the pipeline (EMA weights), samples.png, training_summary.json and the model card."""
        from hf_ddpm.model_card import write_model_card

        args, accelerator, step = self.args, self.accelerator, self.global_step
        if self.hub:
            self.hub.wait()  # never rewrite the folder while a push reads it
        pipe = self._ema_pipeline()
        if final_samples:
            images = sampling.generate(
                pipe,
                args.num_final_images,
                sampler=args.final_sampler,
                num_inference_steps=args.final_steps,
                seed=args.seed,
                batch_size=min(args.num_final_images, 256),
                accelerator=accelerator,
                progress=distributed.is_main(accelerator),
            )
        results = {
            "global_step": step,
            "num_parameters": self.num_params,
            "world_size": self.world,
            "global_batch_size": self.global_batch,
            "wall_time_s": round(self.wall_time, 1),
            "eval_seconds": round(self.eval_seconds, 1),
            "eval_history": self.eval_history,
            "images_per_second": round(step * self.global_batch / max(self.wall_time, 1e-9), 1),
            "final_loss": self.loss_avg,
            "hardware": speed.hardware(accelerator),
            "speed_settings": self._levers(),
            "mixed_precision": accelerator.mixed_precision,
            "num_train_images": None if self.stream else len(self.data),
            "dataset": args.train_data_dir or args.dataset_name or BUILTIN_DIGITS,
        }
        if distributed.is_main(accelerator):
            checkpointing.export_pipeline(pipe, self.output_dir)
            with checkpointing.disk_full_stops("the samples, summary and model card", self.output_dir, []):
                if final_samples:
                    sampling.save_images(images, self.output_dir / SAMPLES_FILE)
                write_json(self.output_dir / SUMMARY_FILE, {"config": args.to_dict(), "results": results})
                write_model_card(self.output_dir, repo_id=args.hub_model_id)
        accelerator.wait_for_everyone()
        return results


def train(args: TrainingArguments) -> dict[str, Any]:
    """Train as `args` says; what `accelerate launch scripts/train.py` runs."""
    return Trainer(args).train()
