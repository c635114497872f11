"""What sets training and sampling speed: the hardware a run is on, and the levers that make it faster.

- TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; older GPUs ignore it): `set_tf32`
- fused AdamW on CUDA and CPU, one kernel for all parameters: `adamw_options`; and the EMA updated in one
  `torch._foreach_lerp_` over all parameters at once (`LerpEMA`, `EMA_OPTIONS`)
- `torch.compile` of a UNet's forward, in place so that its state dict keeps plain names: `compile_unet`
- channels_last memory format (NHWC), the layout fast convolution kernels prefer: `CHANNELS_LAST`
- batches prepared ahead in a background thread while the device runs the step: `Prefetcher`

Every figure a speed claim rests on is only comparable on one CPU or GPU, so the log names it (`hardware`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from hf_ddpm import distributed

logger = get_logger(__name__)

CHANNELS_LAST = torch.channels_last
T = TypeVar("T")

# the vector extensions that decide CPU training speed, best first (bf16 autocast pays off only with the first)
_ISA_LABELS = (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_name() -> str:
    """The CPU's model name and best vector extension (Linux), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    isa = next((label for flag, label in _ISA_LABELS if flag in flags), "")
    return f"{names[0] if names else platform.machine()} CPU{' (' + isa + ')' if isa else ''}"


def hardware(accelerator: Accelerator) -> str:
    """Processes, CPU or GPU model, and torch threads per process: what the log and training_summary.json say."""
    if accelerator.device.type == "cuda":
        return f"{distributed.world_size(accelerator)}x {torch.cuda.get_device_name(accelerator.device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{distributed.world_size(accelerator)} process(es) on {cpu_name()} ({cores} cores), "
        f"{torch.get_num_threads()} torch thread(s) per process"
    )


def set_tf32(device: torch.device, allow: bool) -> bool:
    """On CUDA, let fp32 matmuls and cuDNN convolutions run in TF32 (10-bit mantissa inputs, fp32 accumulation),
    or forbid it for a true fp32 run. Returns whether TF32 is on; always False off CUDA, where nothing changes."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    return allow


def adamw_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments of `torch.optim.AdamW` for `device`: the fused kernel where torch has one (CUDA and CPU;
    on a 2-core AVX-512 CPU it halves the digits UNet's optimizer step, the same update to float rounding), torch's
    default elsewhere."""
    return {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {}


FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# diffusers' EMAModel over all parameters in a few foreach kernels (1.7x faster than its per-parameter loop on
# the digits UNet on the same CPU, equal to float rounding)
EMA_OPTIONS: dict[str, Any] = {"foreach": True}


class LerpEMA(EMAModel):
    """diffusers' `EMAModel` (its decay warm-up, state dict, `copy_to`, `store`/`restore`) whose foreach update is
    one `torch._foreach_lerp_`, shadow += (1 - decay) (param - shadow), in place: its own foreach update is the
    same sum computed as two subtractions through a temporary copy of every parameter. 2.4x faster on the digits
    UNet (0.46 against 1.13 ms a step, 2-core AVX-512 CPU), equal to float rounding (tested)."""

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        if not self.foreach or any(not p.requires_grad for p in parameters) or is_deepspeed_zero3_enabled():
            return super().step(parameters)
        self.optimization_step += 1
        self.cur_decay_value = decay = self.get_decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1 - decay)


def compile_unet(unet: torch.nn.Module, trial: Callable[[], object]) -> bool:
    """Compile `unet`'s forward with `torch.compile` in place and compile it now by running `trial` (a call of
    the UNet as the run will call it). If compiling fails (inductor needs a C++ compiler on CPU, triton on CUDA),
    warn in one line and put the eager forward back. Returns whether the UNet is compiled.

    Only the `forward` attribute changes, so parameters, state dict keys and saved weights stay plain.
    """
    own_forward = vars(unet).get("forward")  # accelerate's mixed-precision wrapper, if any
    unet.forward = torch.compile(unet.forward)
    try:
        trial()
    except Exception as err:  # any compiler failure; a real error in the UNet shows again in the eager run
        if own_forward is None:
            del unet.forward
        else:
            unet.forward = own_forward
        message = str(err).strip().splitlines()
        logger.warning("--torch_compile: compiling failed (%s: %s); running eager", type(err).__name__,
                       message[0] if message else "")  # fmt: skip
        return False
    return True


def default_prefetch(device: torch.device) -> int:
    """How many micro-batches a run on `device` makes ahead unless told: 2 on CUDA (one being copied, one ready);
    none on a CPU, where the thread would take cores from the step itself."""
    return 2 if device.type == "cuda" else 0


class Prefetcher(Generic[T]):
    """`get(k)` returns `make(k)`; with `depth` > 0 a background thread has already been making `make(k + 1)` ..
    `make(k + depth)` while the caller worked, so a GPU step need not wait for the CPU to decode and draw.

    `make` must depend on k alone (the trainer's batches do: every micro-step draws from its own seeded
    generator), so prefetched items equal the ones made on demand and a resumed run is unchanged. Items ahead
    of a `get` that skips past them are dropped; an exception in `make(k)` is raised by `get(k)`.
    """

    def __init__(self, make: Callable[[int], T], depth: int) -> None:
        self.make, self.depth = make, depth
        self.pending: dict[int, Future[T]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if depth else None

    def get(self, key: int) -> T:
        if self.pool is None:
            return self.make(key)
        wanted = range(key, key + self.depth + 1)
        for stale in [k for k in self.pending if k not in wanted]:
            self.pending.pop(stale).cancel()
        for ahead in wanted:
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self.make, ahead)
        return self.pending.pop(key).result()

    def close(self) -> None:
        """Drop what was made ahead and stop the thread."""
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
