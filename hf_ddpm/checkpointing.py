"""Writing training state and exported pipelines to disk so that a crash never leaves a half-written one.

A checkpoint is written into `checkpoints/.tmp-checkpoint-N/` and renamed to `checkpoints/checkpoint-N/` only
once every process has finished writing and `trainer_state.json` (the last file) is on disk. Resume only ever
looks at complete `checkpoint-N` folders, and older checkpoints are deleted only after a newer one is complete.
The exported pipeline (`model_index.json`, `unet/`, `scheduler/`) is likewise written beside the old one and
swapped in by renames. `--overwrite_output_dir` renames an earlier run's files into a hidden `.overwritten-*`
folder (`set_aside`) that is deleted only once the new run has exported. Multi-node runs need `--output_dir` on a
file system that every node sees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_ddpm.atomic import write_json
from hf_ddpm.errors import CheckpointError
from hf_ddpm.pipeline import DDPMPipeline

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `checkpoints_dir`, oldest first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from: str | None, checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint folder that `--resume_from_checkpoint` names, or None when it is unset.

    'latest' is the newest in `checkpoints_dir` (None if there is none yet); any other value is the name of one
    there (`checkpoint-500`) or else a path.
    """
    if resume_from is None:
        return None
    available = list_checkpoints(checkpoints_dir)
    if resume_from == "latest":
        return available[-1] if available else None
    for path in (Path(checkpoints_dir) / resume_from, Path(resume_from)):
        if (path / STATE_FILE).is_file():
            return path
    raise CheckpointError(
        f"--resume_from_checkpoint {resume_from} is not a complete checkpoint folder (no {STATE_FILE}) in "
        f"{checkpoints_dir} nor at that path; use 'latest' or one of: "
        f"{', '.join(p.name for p in available) or f'none yet in {checkpoints_dir}'}"
    )


def set_aside(output_dir: str | Path) -> Path | None:
    """Move everything in `output_dir` into a new `output_dir/.overwritten-<time>-<random>/`; None if it was empty.

    Entries are renamed, not copied, so this is quick and a crash loses nothing; the caller deletes the folder
    once the new run is written. Hidden folders are never pushed to the Hub.
    """
    output = Path(output_dir)
    entries = sorted(output.iterdir()) if output.is_dir() else []
    if not entries:
        return None
    aside = Path(tempfile.mkdtemp(prefix=f".overwritten-{time.strftime('%Y%m%d-%H%M%S')}-", dir=output))
    for entry in entries:
        os.replace(entry, aside / entry.name)
    return aside


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: str | Path,
    step: int,
    state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Save the accelerator state (model, optimizer, registered objects, RNGs) and `state` as checkpoint-`step`.

    Must be called on every process. Returns the final folder.
    """
    folder = Path(checkpoints_dir)
    final = folder / f"checkpoint-{step}"
    tmp = folder / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state)
        if final.exists():  # the same step saved before (e.g. a resumed run); replace it only now
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old)
                logger.info("removed %s (--checkpoints_total_limit %d)", old, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> dict[str, Any]:
    """Restore everything `save_checkpoint` saved; returns its `state` dict."""
    accelerator.load_state(str(checkpoint))
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def export_pipeline(pipeline: DDPMPipeline, output_dir: str | Path) -> None:
    """Write `pipeline` to `output_dir` (model_index.json, unet/, scheduler/), replacing any earlier export.

    The new export is written to a staging folder first; the old one is only replaced once it is complete.
    """
    output = Path(output_dir)
    staging = output / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    for name in sorted(os.listdir(staging), key=lambda n: n == "model_index.json"):  # model_index.json last
        target = output / name
        if target.is_dir():
            old = output / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging / name, target)
            shutil.rmtree(old)
        else:
            os.replace(staging / name, target)
    staging.rmdir()

