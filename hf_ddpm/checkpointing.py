"""Writing training state and exported pipelines to disk so that a crash never leaves a half-written one.

A checkpoint is written into `checkpoints/.tmp-checkpoint-N/` and renamed to `checkpoints/checkpoint-N/` only
once every process has finished writing and `trainer_state.json` (the last file) is on disk. Resume only ever
looks at complete `checkpoint-N` folders, and older checkpoints are deleted only after a newer one is complete.
Folders are deleted by renaming them to a hidden `.deleting-*` name first, so a crash mid-delete never leaves a
`checkpoint-N` that looks complete. The exported pipeline (`model_index.json`, `unet/`, `scheduler/`) is written
to a staging folder and moved in file by file, each an atomic rename, `model_index.json` last: a process killed at
any moment leaves a loadable pipeline (each file the old or the new one) wherever one was exported before. A full
disk stops the run with a `DiskFullError` saying how much space a checkpoint or an export needs, and leaves the
previous ones intact. `--overwrite_output_dir` renames an earlier run's files into a hidden `.overwritten-*`
folder (`set_aside`) that is deleted only once the new run has exported. Multi-node runs need `--output_dir` on a
file system that every node sees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from diffusers import ModelMixin

from hf_ddpm.atomic import write_json
from hf_ddpm.errors import CheckpointError, DiskFullError, TrainingError
from hf_ddpm.pipeline import DDPMPipeline

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_DELETING = ".deleting-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def check_writable(output_dir: str | Path) -> None:
    """Fail before the first step, not at the first checkpoint, if `output_dir` cannot be created or written."""
    output = Path(output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise TrainingError(
            f"--output_dir {output} cannot be written ({type(err).__name__}: {err.strerror or err}); fix its "
            "permissions or choose another --output_dir"
        ) from err


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
        for leftover in [tmp, *folder.glob(f"{_DELETING}*")]:  # left by a crash during an earlier attempt
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    last = list_checkpoints(folder)[-1:]
    with disk_full_stops(f"checkpoint-{step}", folder, last, partial=tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with disk_full_stops(f"checkpoint-{step}", folder, last, partial=tmp):
            write_json(tmp / STATE_FILE, state)
        if final.exists():  # the same step saved before (e.g. a resumed run); replace it only now
            _delete(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(folder)[:-total_limit]:
                _delete(old)
                logger.info("removed %s (--checkpoints_total_limit %d)", old, total_limit)
    accelerator.wait_for_everyone()
    return final


def _delete(path: Path) -> None:
    """Delete a folder so that no crash leaves part of it under its name: rename it away, then remove it."""
    doomed = path.with_name(_DELETING + path.name)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _size(path: Path) -> int:
    """Bytes in the files under `path` (a file or a folder)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextlib.contextmanager
def disk_full_stops(what: str, folder: Path, like: list[Path], partial: Path | None = None) -> Iterator[None]:
    """On a full disk in the block, remove its `partial` output and raise a DiskFullError saying how much space
    writing `what` to `folder` needs, estimated from the size of `like` (the last one written).

    A full disk is an ENOSPC or EDQUOT error, or any write error (torch.save raises a RuntimeError) while less is
    free than that estimate (or than 1 MiB without one).
    """
    try:
        yield
    except (OSError, RuntimeError) as err:
        needed = sum(map(_size, like))
        written = _size(partial) if partial is not None and partial.exists() else 0
        if getattr(err, "errno", None) not in _NO_SPACE and shutil.disk_usage(folder).free >= max(needed, 2**20):
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if like:
            estimate = f"about {needed / 2**20:,.1f} MiB (the size of the last one)"
        else:
            estimate = f"more than the {written / 2**20:,.1f} MiB written before it stopped" if written else "more"
        free = shutil.disk_usage(folder).free
        reason = getattr(err, "strerror", None) or os.strerror(errno.ENOSPC)
        raise DiskFullError(
            f"no space left on the device while writing {what} to {folder} ({reason}): it needs {estimate}, "
            f"{free / 2**20:,.1f} MiB are free; the previous checkpoint and export are intact. Free some space (or "
            "lower --checkpoints_total_limit) and resume with --resume_from_checkpoint latest"
        ) from err


def model_config(model: ModelMixin) -> dict[str, Any]:
    """The architecture of `model` as JSON values: what a checkpoint records so that resuming can check it."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def load_checkpoint(
    accelerator: Accelerator, checkpoint: str | Path, expected_model: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` saved; returns its `state` dict.

    A checkpoint whose `state["model_config"]` differs from `expected_model` (another preset, resolution or
    override) is refused with the fields that differ, before anything is loaded.
    """
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    saved = state.get("model_config")
    if expected_model is not None and saved is not None and saved != expected_model:
        differs = sorted(k for k in saved.keys() | expected_model.keys() if saved.get(k) != expected_model.get(k))
        shown = ", ".join(f"{k} {saved.get(k)} there, {expected_model.get(k)} here" for k in differs)
        raise CheckpointError(
            f"{checkpoint} is of another UNet than this run ({shown}); resume with the --preset, --resolution and "
            "--unet_overrides it was trained with, or start a new --output_dir"
        )
    accelerator.load_state(str(checkpoint))
    return state


def export_pipeline(pipeline: DDPMPipeline, output_dir: str | Path) -> None:
    """Write `pipeline` to `output_dir` (model_index.json, unet/, scheduler/), replacing any earlier export.

    The new export is written to a staging folder first and then moved in file by file (atomic renames), with
    `model_index.json` last; files of the earlier export that the new one lacks are removed after it.
    """
    output = Path(output_dir)
    staging = output / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    earlier = [output / name for name in ("model_index.json", "unet", "scheduler") if (output / name).exists()]
    with disk_full_stops("the pipeline", output, earlier, partial=staging):
        pipeline.save_pretrained(staging)
    new = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    for name in sorted(new, key=lambda n: n == Path("model_index.json")):  # model_index.json last
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, output / name)
    for folder in {name.parts[0] for name in new if len(name.parts) > 1}:
        for stale in (output / folder).rglob("*"):
            if stale.is_file() and stale.relative_to(output) not in new:
                stale.unlink()
    shutil.rmtree(staging)
