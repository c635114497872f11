"""What sets training and sampling speed: the hardware a run is on, and the levers that make it faster.

- TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; older GPUs ignore it): `set_tf32`
- fused AdamW on CUDA, one kernel for all parameters: `adamw_options`
- `torch.compile` of a UNet's forward, in place so that its state dict keeps plain names: `compile_unet`
- channels_last memory format (NHWC), the layout fast convolution kernels prefer: `CHANNELS_LAST`

Every figure a speed claim rests on is only comparable on one CPU or GPU, so the log names it (`hardware`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from hf_ddpm import distributed

logger = get_logger(__name__)

CHANNELS_LAST = torch.channels_last

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
    """Keyword arguments of `torch.optim.AdamW` for `device`: the fused kernel on CUDA, the default elsewhere
    (which keeps CPU runs bit-identical to earlier ones)."""
    return {"fused": True} if device.type == "cuda" else {}


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
