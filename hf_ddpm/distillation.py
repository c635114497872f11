"""Distilling a trained DDPM into a few-step generator that plain diffusers samples.

    accelerate launch scripts/distill.py output --method progressive --output_dir output-distilled

Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student, initialised from the teacher, learns to
take in one DDIM step what the teacher takes in two; the student becomes the next round's teacher, so each round
halves the steps. By default the first round distils 16 teacher DPM-Solver++(2M) steps (a second-order solution
of the teacher's ODE, better than 32 DDIM steps' at half the teacher calls) into an 8-step student, then come
students of 4, 2 and 1 steps; the first round may also distil more teacher steps per student step
(`--first_student_steps`), which was worse at the same cost (README, Distillation). The student predicts v (the
paper's choice: stable down to one step, where an epsilon prediction is divided by sqrt(abar_T) ~ 0.006) and is
saved as a `UNet2DModel` with a `DDIMScheduler`, so that

    >>> from diffusers import DDPMPipeline
    >>> pipe = DDPMPipeline.from_pretrained("output-distilled")
    >>> images = pipe(batch_size=16, num_inference_steps=1).images

samples it in plain diffusers. Each round's student is also exported, to `students/<N>-step/`.

Consistency distillation (Song et al. 2023, Algorithm 2): a student f(x, sigma) learns to map every point of the
teacher's probability-flow ODE trajectory to the same x, by matching f at sigma_{n+1} to its own value (no
gradient) at sigma_n one teacher DDIM step along the ODE. It is parameterised exactly as diffusers'
`CMStochasticIterativeScheduler` reads it, f = c_skip(sigma) x + c_out(sigma) F(x / sqrt(sigma^2 + sigma_data^2),
250 log sigma), so f(x, sigma_min) = x, and is saved as a `ConsistencyModelPipeline`:

    >>> from diffusers import ConsistencyModelPipeline
    >>> images = ConsistencyModelPipeline.from_pretrained("output-distilled")(num_inference_steps=1).images

Both are a `hf_ddpm.trainer.Trainer` with another model (`build_model`), loss (`batch_losses`) and exported
pipeline (`export_pipeline`): accelerate, checkpoints, exact resume, logging, previews and the Hub are training's
own. Only the timesteps differ: the trainer's uniform draw of t in {0..T-1} picks the student's grid point,
index floor(t N / T).

Notation (the paper's, in discrete time): z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), abar_{-1} = 1 (DDIM's `set_alpha_to_one`). One DDIM step from t to s given a
prediction x^ of x is  z_s = alpha_s x^ + (sigma_s / sigma_t) (z_t - alpha_t x^). The consistency model works in
the variance-exploding view of the same process, x = z_t / alpha_t with noise level sigma = sigma_t / alpha_t.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    UNet2DModel,
)
from torch import Tensor
from transformers import HfArgumentParser

from hf_ddpm import checkpointing, distributed, speed
from hf_ddpm.arguments import parse_into_dataclasses
from hf_ddpm.errors import ConfigError
from hf_ddpm.hub import load_pipeline
from hf_ddpm.model_card import STUDENTS_DIR
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.sampling import CLIP_SAMPLE_CONFIG, DISTILLED_SAMPLERS
from hf_ddpm.scheduler import DDPMScheduler
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import TrainingArguments

METHODS = tuple(DISTILLED_SAMPLERS)
TEACHER_SOLVERS = ("ddim", "dpmsolver++")  # how progressive distillation runs the teacher between student steps
FIRST_ROUND_STEPS, LATER_ROUND_STEPS = 1300, 1500  # the default --steps_per_round
CONSISTENCY_STEPS = 1200  # the default --max_train_steps of --method consistency

logger = get_logger(__name__)  # accelerate's: logs on the main process only


def ddim_step(x0: Tensor, zt: Tensor, abar_t: Tensor, abar_s: Tensor) -> Tensor:
    """z_s = alpha_s x0 + (sigma_s / sigma_t)(z_t - alpha_t x0): deterministic DDIM (eta = 0) from t to s, with the
    noise implied by `x0` (diffusers' `use_clipped_model_output=True`); abar_* broadcast against z_t."""
    return abar_s.sqrt() * x0 + ((1 - abar_s) / (1 - abar_t)).sqrt() * (zt - abar_t.sqrt() * x0)


def progressive_target(
    teacher_x0: Callable[[Tensor, Tensor], Tensor],
    zt: Tensor,
    times: Sequence[Tensor],
    abar: Callable[[Tensor], Tensor],
    solver: str = "ddim",
) -> Tensor:
    """The student's x target, Salimans & Ho (2022) Algorithm 2: teacher steps t = times[0] -> times[1] -> ...
    -> times[-1] = t'' (two DDIM steps in the paper), then the x~ for which one DDIM step from z_t lands where they
    did,
        x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),
    which at t'' = -1 (sigma = 0) is z_t'' itself. `teacher_x0(z, t)` is the teacher's x^; `abar(t)` is abar_t
    shaped to broadcast against z_t. `solver` "ddim" takes DDIM steps; "dpmsolver++" DPM-Solver++(2M) steps (Lu et
    al. 2022): a DDIM step with x^_i + (x^_i - x^_{i-1}) / (2 r_i), r_i = h_{i-1} / h_i in lambda = log(alpha /
    sigma), from the second step on and first order into sigma = 0 (diffusers' `lower_order_final`): a second-order
    solution of the teacher's ODE for the same number of teacher calls."""
    z, previous = zt, None
    for t, s in itertools.pairwise(times):
        x0 = teacher_x0(z.to(zt.dtype), t)
        abar_t, abar_s = abar(t), abar(s)
        step_x0 = x0
        if solver == "dpmsolver++":
            h = _half_log_snr(abar_s) - _half_log_snr(abar_t)
            if previous is not None:  # image by image: second order, or first into sigma = 0 (where h is infinite)
                previous_x0, previous_h = previous
                step_x0 = torch.where(abar_s < 1, x0 + (x0 - previous_x0) * (h / (2 * previous_h)), x0)
            previous = x0, h
        z = ddim_step(step_x0, z, abar_t, abar_s)
    abar_first, abar_last = abar(times[0]), abar(times[-1])
    ratio = ((1 - abar_last) / (1 - abar_first)).sqrt()
    return (z - ratio * zt) / (abar_last.sqrt() - ratio * abar_first.sqrt())


def clipped_as_sampled(x0: Tensor, config: Any) -> Tensor:
    """A teacher's x^ clipped to [-1, 1] where its scheduler config clips it in sampling (thresholding at 1, or
    DDPM's and DDIM's clip_sample)."""
    return x0.clamp(-1, 1) if config.thresholding or config.clip_sample else x0


def loss_weight(abar_t: Tensor, abar_s: Tensor, landing: bool) -> Tensor:
    """The weight of a grid point t -> s (the student's DDIM step) in the x loss: max(SNR_t, 1), the paper's truncated
    SNR. With `landing`, at most how far an x error moves the student's landing point z_s in units of its noise,
    ((alpha_s - (sigma_s / sigma_t) alpha_t) / sigma_s)^2 (infinite into sigma_s = 0, where the weight stays
    max(SNR_t, 1)): ~2e-4 at t = T - 1 of an 8-step grid, where an epsilon teacher's x^ is its noise error divided
    by alpha_t ~ 0.006, a target no student fits whose gradient would drown every other grid point's."""
    weight = (abar_t / (1 - abar_t)).clamp(min=1)
    if not landing:
        return weight
    gain = abar_s.sqrt() - ((1 - abar_s) / (1 - abar_t)).sqrt() * abar_t.sqrt()
    return torch.minimum(weight, gain.square() / (1 - abar_s))


def _half_log_snr(abar: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2 (infinite at abar = 1)."""
    return 0.5 * (abar.log() - (1 - abar).log())


@dataclass
class DistillationArguments(TrainingArguments):
    """Every option of scripts/distill.py: training's (the student trains like a model: batch, optimiser, EMA,
    checkpoints, Hub), then the distillation's. The forward process (betas, T) is the teacher's; `--preset`,
    `--unet_overrides` and the loss options do not apply. `--prediction_type` is the student's."""

    method: str = field(default="progressive", metadata={"help": f"one of {', '.join(METHODS)}"})
    teacher_steps: int = field(default=16, metadata={"help": "teacher steps that the first round distils"})
    teacher_solver: str = field(
        default="dpmsolver++",
        metadata={"help": f"progressive: the teacher's ODE steps, one of {', '.join(TEACHER_SOLVERS)} "
                  "(DPM-Solver++(2M): second order for the same teacher calls)"},
    )  # fmt: skip
    first_student_steps: int | None = field(
        default=None,
        metadata={"help": "steps of the first round's student, each later round halving them (default: half of "
                  "--teacher_steps, 2 teacher steps per student step as in the paper)"},
    )  # fmt: skip
    student_steps: int = field(default=1, metadata={"help": "steps of the last round's student"})
    steps_per_round: list[int] | None = field(
        default=None,
        metadata={"help": "optimizer steps per round: one number for every round, or one per round (default: 1300 "
                  "for the first, 1500 for each later one; the default's 4 rounds took 15-21 minutes on 2 idle CPU "
                  "cores); fewer for a faster, worse student, more for a better one (the paper: 50k)"},
    )  # fmt: skip
    landing_weight: bool = field(
        default=False,
        metadata={"help": "progressive: in a round whose teacher predicts epsilon (the first, from a DDPM), weight "
                  "each grid point by at most how far its x error moves the student's landing point (better 8- "
                  "and 4-step students, a slightly worse 2-step one: README, Distillation)"},
    )  # fmt: skip
    reset_optimizer: bool = field(
        default=True,
        metadata={"help": "progressive: start AdamW's moments afresh at each round, as a new training run would (the "
                  "gradients of round 2 are 3-5x smaller than round 1's, whose second moments, 1,000 steps long at "
                  "beta2 0.999, otherwise damp its steps; over two seeds 0.1-0.3 lower FD at 4, 2 and 1 steps: "
                  "README, Distillation); false carries them over"},
    )  # fmt: skip
    # training's defaults, changed for a student that starts from its teacher
    output_dir: str = field(default="output-distilled", metadata={"help": "where the student, logs and checkpoints go"})
    prediction_type: str = field(default="v_prediction", metadata={"help": "the student's: v_prediction, ..."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (training's is 2e-4)"})
    lr_warmup_steps: int = field(default=100, metadata={"help": "linear warm-up, in optimizer steps"})
    ema_max_decay: float = field(default=0.995, metadata={"help": "EMA decay after warm-up (a window per round)"})
    sample_every: int = field(default=0, metadata={"help": "log a sample grid every N steps (0: never)"})
    preview_sampler: str | None = field(
        default=None, metadata={"help": "sampler for logged grids and --eval_every (default: the student's own)"}
    )
    final_sampler: str | None = field(
        default=None, metadata={"help": "sampler for samples.png (default: the student's)"}
    )
    # consistency distillation
    num_scales: int = field(default=18, metadata={"help": "consistency: noise levels N of the ODE discretisation"})
    sigma_data: float = field(default=0.5, metadata={"help": "consistency: data scale of the c_skip/c_out/c_in"})
    teacher: str = field(default="output", metadata={"help": "TEACHER, the first argument"})
    teacher_revision: str | None = field(default=None, metadata={"help": "the teacher's Hub branch, tag or commit"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not one of: {', '.join(METHODS)}")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise ConfigError(f"--teacher_solver {self.teacher_solver!r} is not one of: {', '.join(TEACHER_SOLVERS)}")
        self.preview_sampler = self.preview_sampler or DISTILLED_SAMPLERS[self.method]
        self.final_sampler = self.final_sampler or DISTILLED_SAMPLERS[self.method]
        super().__post_init__()
        if self.num_scales < 2:
            raise ConfigError(f"--num_scales must be at least 2, got {self.num_scales}")
        self.first_student_steps = self.first_student_steps or self.teacher_steps // 2
        for name in ("teacher_steps", "first_student_steps", "student_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for bigger, smaller in (("teacher_steps", "first_student_steps"), ("first_student_steps", "student_steps")):
            ratio, rest = divmod(getattr(self, bigger), getattr(self, smaller))
            if rest or ratio < (2 if bigger == "teacher_steps" else 1) or ratio & (ratio - 1):
                raise ConfigError(
                    f"--{bigger} {getattr(self, bigger)} must be --{smaller} {getattr(self, smaller)} times a power "
                    "of 2 (each round halves the steps), e.g. --teacher_steps 64 --first_student_steps 8"
                )
        self.steps_per_round = self.steps_per_round or [FIRST_ROUND_STEPS] + [LATER_ROUND_STEPS] * (self.num_rounds - 1)
        if min(self.steps_per_round) < 1:
            raise ConfigError(f"--steps_per_round must be at least 1, got {min(self.steps_per_round)}")
        if self.timestep_sampler != "uniform":
            raise ConfigError("--timestep_sampler: distillation draws the student's steps uniformly; use uniform")
        if self.method == "progressive":
            if len(self.steps_per_round) == 1:
                self.steps_per_round = self.steps_per_round * self.num_rounds
            if len(self.steps_per_round) != self.num_rounds:
                raise ConfigError(
                    f"--steps_per_round gives {len(self.steps_per_round)} numbers for {self.num_rounds} rounds "
                    f"({self.first_student_steps} -> {self.student_steps} steps): give one, or one per round"
                )
            self.max_train_steps = sum(self.steps_per_round)
        else:
            self.max_train_steps = self.max_train_steps or CONSISTENCY_STEPS
        self.final_steps = self.final_steps or self.student_steps
        self.preview_steps = self.preview_steps or self.student_steps

    @property
    def num_rounds(self) -> int:
        return 1 + int(math.log2(self.first_student_steps // self.student_steps))

    def round_at(self, step: int) -> tuple[int, int]:
        """(round, optimizer steps done in it) after `step` optimizer steps of the run (0-based round)."""
        for round_index, length in enumerate(self.steps_per_round[:-1]):
            if step < length:
                return round_index, step
            step -= length
        return len(self.steps_per_round) - 1, step

    def round_steps(self, round_index: int) -> int:
        """The student's DDIM steps in round `round_index` (0-based): first_student_steps / 2^round."""
        return self.first_student_steps >> round_index

    def steps_per_student_step(self, round_index: int) -> int:
        """Teacher DDIM steps per student step: teacher_steps / first_student_steps in round 0, then 2."""
        return self.teacher_steps // self.first_student_steps if round_index == 0 else 2


def parse_distillation_args(argv: list[str] | None = None) -> DistillationArguments:
    """TEACHER and the flags of scripts/distill.py."""
    parser = HfArgumentParser(DistillationArguments, description="Distil a DDPM into a few-step generator.")
    # the positional TEACHER fills the dataclass field of the same name
    parser.add_argument("teacher", help="the teacher: an hf_ddpm or diffusers DDPM pipeline folder or Hub repo id")
    (args,) = parse_into_dataclasses(parser, argv)
    return args


class _Teacher:
    """The round's teacher network and how to read x from it; checkpointed, so a resumed round has the same one."""

    def __init__(self, unet: UNet2DModel, process: DDPMScheduler, round_index: int = 0):
        self.unet, self.process, self.round = unet.eval().requires_grad_(False), process, round_index

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "config": dict(self.process.config), "unet": self.unet.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.process = state["round"], DDPMScheduler.from_config(state["config"])
        self.unet.load_state_dict(state["unet"])

    @torch.no_grad()
    def predict_x0(self, zt: Tensor, t: Tensor) -> Tensor:
        """x^ of the teacher at (z_t, t), clipped to [-1, 1] where its scheduler clips (as its sampling does)."""
        return clipped_as_sampled(self.process.predict_x0(self.unet(zt, t).sample.float(), zt, t), self.process.config)


class Distiller(Trainer):
    """One distillation run: `Distiller(args).train()`, with `args` a `DistillationArguments`."""

    args: DistillationArguments

    def __init__(self, args: DistillationArguments):
        super().__init__(args)
        # --torch_compile compiles the teacher too: its two no-grad forwards are two of a progressive step's five
        # forward-equivalents (compiled, a teacher call took 0.78x the eager fp32 time on a 2-core AMX CPU, 0.59x
        # in bf16)
        if self.compiled:
            speed.compile_unet(self.teacher.unet, self._teacher_trial)

    def _teacher_trial(self) -> list[Tensor]:
        """--torch_compile: one teacher forward on the first micro-batch, as `batch_losses` calls the teacher."""
        _, timesteps, _, _, xt = self._batch(0)
        with torch.no_grad(), self.accelerator.autocast():
            return [self.teacher.unet(xt, timesteps).sample]

    def build_model(self) -> tuple[UNet2DModel, DDPMScheduler]:
        """The student: a copy of the teacher's UNet; the forward process: the teacher's, predicting v."""
        args = self.args
        pipe = load_pipeline(args.teacher, revision=args.teacher_revision, allow_pickle=args.allow_pickle)
        config = pipe.unet.config
        if config.out_channels != config.in_channels:
            raise ConfigError(f"the teacher {args.teacher} has a learned variance ({config.out_channels} outputs)")
        process = DDPMScheduler.from_config(pipe.scheduler.config)
        device = self.accelerator.device
        self.teacher = _Teacher(copy.deepcopy(pipe.unet).to(device), process)
        self.accelerator.register_for_checkpointing(self.teacher)
        self.student_process = DDPMScheduler.from_config(process.config, prediction_type=args.prediction_type)
        self._grids: dict[int, Tensor] = {}
        return pipe.unet, self.student_process

    def export_pipeline(self, unet: UNet2DModel) -> DiffusionPipeline:
        """`unet` with DDIM on the teacher's betas, trailing timesteps (the first step at t = T - 1, the last to
        abar = 1) and x clipped to [-1, 1] by `clip_sample` (the cheaper spelling of the teacher's thresholding at 1):
        what `sampling.generate(..., sampler="ddim")` makes of it too."""
        return DDPMPipeline(unet=unet, scheduler=self._ddim())

    def _ddim(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(
            self.student_process.config, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0,
            **CLIP_SAMPLE_CONFIG,
        )  # fmt: skip

    def _grid(self, steps: int) -> Tensor:
        """(steps,) timesteps of the exported DDIM scheduler at `steps` steps, as plain diffusers samples them."""
        if steps not in self._grids:
            scheduler = self._ddim()
            scheduler.set_timesteps(steps)
            self._grids[steps] = scheduler.timesteps.to(self.accelerator.device)
        return self._grids[steps]

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t for integer t >= -1 (abar_{-1} = 1), broadcast against `like`, in float64."""
        abar = torch.where(t >= 0, self.noise_scheduler.alphas_cumprod_at(t.clamp(min=0)), 1.0)
        return abar.view(-1, *([1] * (like.ndim - 1)))

    def _start_round(self, round_index: int) -> None:
        """From round 1 on, the teacher is the previous round's student (its exported, EMA weights); with
        `--reset_optimizer`, the optimizer's moments start afresh."""
        if round_index == self.teacher.round:
            return
        if self.ema is not None:
            self.ema.copy_to(self.teacher.unet.parameters())
        else:
            self.teacher.unet.load_state_dict(self.unet.state_dict())
        self.teacher.process, self.teacher.round = self.student_process, round_index
        if self.args.reset_optimizer:
            self.optimizer.state.clear()  # AdamW fills it again at the next step, its step count from 0
        steps = self.args.round_steps(round_index)
        logger.info("round %d: %d -> %d steps", round_index + 1, steps * self.args.steps_per_student_step(round_index),
                    steps)  # fmt: skip

    def batch_losses(self, x0: Tensor, timesteps: Tensor, noise: Tensor, xt: Tensor) -> Tensor:
        """w ||x~ - x^_student(z_t)||^2 per image, z_t at the student's grid point that the drawn timestep picks, w
        the paper's truncated SNR, and in a round whose teacher predicts epsilon at most the landing point's
        sensitivity (`loss_weight`, `--landing_weight`)."""
        args = self.args
        round_index = args.round_at(self.global_step)[0]
        self._start_round(round_index)
        steps, num_train = args.round_steps(round_index), self.noise_scheduler.config.num_train_timesteps
        t = self._grid(steps)[timesteps * steps // args.num_train_timesteps]
        # the teacher's steps: DDIM's own step length at the teacher's step count, the last one landing where the
        # student's step does (they differ by a timestep where T is no multiple of the steps)
        teacher_steps = steps * args.steps_per_student_step(round_index)
        times = [(t - j * (num_train // teacher_steps)).clamp(min=0) for j in range(teacher_steps // steps)]
        times.append(t - num_train // steps)
        zt = self.noise_scheduler.q_sample(x0, t, noise)
        target = progressive_target(self.teacher.predict_x0, zt, times, lambda s: self._abar(s, x0),
                                    args.teacher_solver)  # fmt: skip
        target = target.float()
        x0_student = self.student_process.predict_x0(self.model(zt, t).sample.float(), zt, t)
        landing = args.landing_weight and self.teacher.process.config.prediction_type == "epsilon"
        weight = loss_weight(self._abar(t, t), self._abar(times[-1], t), landing).float()
        return weight * (x0_student - target).square().flatten(1).mean(1)

    def step(self) -> Tensor | None:
        """A training step; the step that ends a round also exports its student to students/<N>-step/."""
        grad_norm = super().step()
        round_index, done = self.args.round_at(self.global_step - 1)
        if done + 1 == self.args.steps_per_round[round_index]:
            steps = self.args.round_steps(round_index)
            pipe = self._ema_pipeline()
            if distributed.is_main(self.accelerator):
                checkpointing.export_pipeline(pipe, Path(self.args.output_dir) / STUDENTS_DIR / f"{steps}-step")
            self.accelerator.wait_for_everyone()
        return grad_norm


class ConsistencyDistiller(Distiller):
    """Consistency distillation, Song et al. (2023) Algorithm 2, with the target network the student itself
    without gradient (mu = 0, as in Song & Dhariwal 2023), the teacher's ODE step DDIM (Euler in sigma) and an L2
    distance."""

    def build_model(self) -> tuple[UNet2DModel, DDPMScheduler]:
        """The student and the teacher as progressive distillation has them; the noise levels: the teacher's range,
        sigma_min at t = 0 to sigma_max at t = T - 1, in diffusers' Karras spacing."""
        unet, process = super().build_model()
        device = self.accelerator.device
        abar = process.alphas_cumprod_at(torch.arange(process.config.num_train_timesteps, device=device))
        self.log_sigmas = ((1 - abar) / abar).sqrt().log()  # increasing in t, on the device, float64 (but MPS)
        # float32 values: the scheduler's last step adds noise of std sqrt(sigma_next^2 - sigma_min^2) with
        # sigma_next = float32(sigma_min), which is NaN if rounding made it smaller than the config's sigma_min
        sigma_min, sigma_max = self.log_sigmas[[0, -1]].exp().float().tolist()
        self.consistency = CMStochasticIterativeScheduler(
            num_train_timesteps=self.args.num_scales, sigma_min=sigma_min, sigma_max=sigma_max,
            sigma_data=self.args.sigma_data,
        )  # fmt: skip
        return unet, process

    def export_pipeline(self, unet: UNet2DModel) -> DiffusionPipeline:
        return ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler.from_config(
            self.consistency.config))  # fmt: skip

    def step(self) -> Tensor | None:
        return Trainer.step(self)  # no rounds

    def teacher_denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The teacher's x^ at the variance-exploding point (x, sigma): its network at z = alpha x, alpha =
        1 / sqrt(1 + sigma^2), and the (fractional) timestep whose sigma_t / alpha_t is sigma (log-sigma linear
        between the table's), clipped where the teacher's sampling clips."""
        alpha = (1 + sigma.square()).rsqrt().view(-1, *([1] * (x.ndim - 1)))
        log_sigmas = self.log_sigmas
        upper = torch.searchsorted(log_sigmas, sigma.log()).clamp(1, len(log_sigmas) - 1)
        below = log_sigmas[upper - 1]
        t = (upper - 1 + (sigma.log() - below) / (log_sigmas[upper] - below)).clamp(0, len(log_sigmas) - 1)
        z = (alpha * x).float()
        with torch.no_grad():
            output = self.teacher.unet(z, t.float()).sample.double()
        abar, config = alpha.square(), self.teacher.process.config
        x0 = {
            "epsilon": lambda: (z - (1 - abar).sqrt() * output) / alpha,
            "v_prediction": lambda: alpha * z - (1 - abar).sqrt() * output,
            "sample": lambda: output,
        }[config.prediction_type]()
        return clipped_as_sampled(x0, config)

    def batch_losses(self, x0: Tensor, timesteps: Tensor, noise: Tensor, xt: Tensor) -> Tensor:
        """|| f(x_{n+1}, sigma_{n+1}) - f^-(x^_n, sigma_n) ||^2 per image: x_{n+1} = x + sigma_{n+1} eps, x^_n one
        teacher DDIM step x^_n = D + (sigma_n / sigma_{n+1}) (x_{n+1} - D) down the ODE, f^- without gradient."""
        sigmas = self.consistency.sigmas.to(x0.device, torch.float64)  # sigma_max ... sigma_min, num_scales of them
        index = timesteps.to(x0.device) * (len(sigmas) - 1) // self.args.num_train_timesteps
        high, low = sigmas[index], sigmas[index + 1]
        x_high = x0 + high.view(-1, 1, 1, 1) * noise
        denoised = self.teacher_denoise(x_high, high)
        x_low = denoised + (low / high).view(-1, 1, 1, 1) * (x_high - denoised)
        with torch.no_grad():
            target = consistency_function(self.unet, self.consistency, x_low.float(), low)
        return (consistency_function(self.model, self.consistency, x_high.float(), high) - target).square().flatten(
            1).mean(1)  # fmt: skip


def consistency_function(
    unet: torch.nn.Module, scheduler: CMStochasticIterativeScheduler, x: Tensor, sigma: Tensor
) -> Tensor:
    """f(x, sigma) = c_skip x + c_out F(c_in x, 250 log sigma), as diffusers' `ConsistencyModelPipeline` and
    `CMStochasticIterativeScheduler` compute it (c_skip(sigma_min) = 1, c_out(sigma_min) = 0: f(x, sigma_min) = x)."""
    c_skip, c_out = (c.view(-1, 1, 1, 1).to(x.dtype) for c in scheduler.get_scalings_for_boundary_condition(sigma))
    c_in = (sigma.square() + scheduler.config.sigma_data**2).rsqrt().view(-1, 1, 1, 1).to(x.dtype)
    t = 1000 * 0.25 * torch.log(sigma + 1e-44)  # `CMStochasticIterativeScheduler.sigma_to_t`
    return c_skip * x + c_out * unet(c_in * x, t).sample


def distill(args: DistillationArguments) -> dict[str, Any]:
    """Distil as `args` says; what `accelerate launch scripts/distill.py` runs."""
    return {"progressive": Distiller, "consistency": ConsistencyDistiller}[args.method](args).train()
