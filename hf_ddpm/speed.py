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
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
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
_LRU_CACHE_WARNING = "Dynamo detected a call to a `functools.lru_cache`-wrapped function"
T = TypeVar("T")

# the matrix and vector extensions that decide CPU training speed, best first: bf16 autocast pays off with AMX (a
# compiled bf16 step of the digits UNet 1.48x eager fp32's speed on 2 cores), is mixed with AVX-512 BF16 alone
# and several times slower with AVX2
_ISA_LABELS = (("amx_bf16", "AMX BF16"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and best matrix or vector extension (Linux), else the architecture."""
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    isa = next((label for flag, label in _ISA_LABELS if flag in flags), "")
    return f"{names[0] if names else platform.machine()} CPU{' (' + isa + ')' if isa else ''}"


def hardware(accelerator: Accelerator) -> str:
    """Processes, CPU or GPU model, and torch threads per process: what the log and training_summary.json say."""
    if accelerator.device.type == "cuda":
        return f"{distributed.world_size(accelerator)}x {torch.cuda.get_device_name(accelerator.device)}"
    return (
        f"{distributed.world_size(accelerator)} process(es) on {cpu_name()} ({_usable_cpus()} cores), "
        f"{torch.get_num_threads()} torch thread(s) per process"
    )


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores_warning(accelerator: Accelerator) -> str | None:
    """A one-line warning with the fix when a single CPU process runs fewer torch threads than the CPUs it may use
    (`accelerate launch` gives it one thread unless `--num_cpu_threads_per_process` says more: on 2 cores that
    halves the run's speed); None otherwise. Several processes are left alone: how many share a machine is not known
    reliably (accelerate sets LOCAL_WORLD_SIZE to 1 for ranks started by hand), and they are launched with threads
    in mind."""
    if accelerator.device.type != "cpu" or distributed.world_size(accelerator) > 1:
        return None
    threads, cpus = torch.get_num_threads(), _usable_cpus()
    if threads >= cpus:
        return None
    return (
        f"{threads} torch thread(s) on {cpus} CPU(s): pass `accelerate launch --num_cpu_threads_per_process {cpus}` "
        "to use them"
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


def compile_unet(unet: torch.nn.Module, trial: Callable[[], Sequence[torch.Tensor]]) -> bool:
    """Compile `unet`'s forward with `torch.compile` in place, compile it now and check it: `trial()` calls the
    UNet as the run will and returns what that call made (its output, or the parameters' gradients after a
    backward), once eager and once compiled. If compiling fails (inductor needs a C++ compiler on CPU, triton on
    CUDA) or the compiled tensors differ from the eager ones by more than kernels' rounding can (`compiled_mismatch`),
    warn in one line and put the eager forward back. Returns whether the UNet is compiled.

    Inductor's own layout optimisation is off: with it (and with the UNet in channels_last) torch 2.13's CPU
    inductor computed zero gradients for 138 of the digits-16 UNet's 184 parameters, everything below its second
    up-sampling block, while its forward was right. The layout is the run's choice (`--channels_last`).
    Only the `forward` attribute changes, so parameters, state dict keys and saved weights stay plain.
    """
    own_forward = vars(unet).get("forward")  # accelerate's mixed-precision wrapper, if any

    def put_back_eager(why: str) -> bool:
        if own_forward is None:
            del unet.forward
        else:
            unet.forward = own_forward
        logger.warning("--torch_compile: %s; running eager", why)
        return False

    eager = [tensor.detach().clone() for tensor in trial()]
    # diffusers' up-sampling blocks ask `is_torch_version` (an lru_cache) in their forward, which dynamo traces
    # through with a harmless warning printed for each block
    warnings.filterwarnings("ignore", message=re.escape(_LRU_CACHE_WARNING), category=UserWarning)
    unet.forward = torch.compile(unet.forward, options=_INDUCTOR_OPTIONS)
    try:
        compiled = trial()
    except Exception as err:  # any compiler failure; a real error in the UNet would have failed the eager trial
        message = str(err).strip().splitlines()
        return put_back_eager(f"compiling failed ({type(err).__name__}: {message[0] if message else ''})")
    mismatch = compiled_mismatch(eager, compiled)
    return put_back_eager(f"the compiled UNet is wrong ({mismatch})") if mismatch else True


_INDUCTOR_OPTIONS = {"layout_optimization": False}
# a compiled tensor is wrong when it differs from the eager one by more than this share of the eager one's norm:
# bf16 kernels differ by a few percent on small gradients, a miscompiled one by ~100%
_MISMATCH = 0.25


def compiled_mismatch(eager: Sequence[torch.Tensor], compiled: Sequence[torch.Tensor]) -> str | None:
    """None if every compiled tensor is its eager twin to within `_MISMATCH` of its norm, else what differs.
    Tensors whose eager norm is below 1e-4 of the largest are float noise (the attention keys' bias gets no
    gradient in exact arithmetic) and only counted when non-finite."""
    norms = [tensor.float().norm() for tensor in eager]
    scale = max(norms, default=torch.tensor(0.0))
    errors = []
    for a, b, norm in zip(eager, compiled, norms, strict=True):
        error = (b.float() - a.float()).norm()
        if not torch.isfinite(error) or (norm > 1e-4 * scale and error > _MISMATCH * norm):
            errors.append((error / norm).item())
    if not errors:
        return None
    worst = max(errors)
    return f"{len(errors)} of {len(eager)} tensors of a trial call differ from eager (relative error up to {worst:.2f})"


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
