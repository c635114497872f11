"""Kill a training run anywhere and check that resuming loses nothing.

    python benchmarks/fault_injection.py --kill_points 24 --seed 0

One run of scripts/train.py (the tiny-8 preset, 8 steps, a checkpoint every 2 with --checkpoints_total_limit 2,
one process) goes straight through, recording every point where a kill can land: each optimizer step and, on the
main thread, every file opened for writing, every tensor file saved, every rename and every file or folder
deleted -- checkpoint writing, rotation, the pipeline export, samples.png, training_summary.json and the model
card among them. Then, --kill_points times, a fresh run is SIGKILLed at one of those points drawn at random
(seeded), and restarted with `--resume_from_checkpoint latest` (a third of the restarts are killed again, at a
random point of their own) until one finishes. A point is "resumed exactly" when:

- after every kill, each checkpoint that resuming could pick (`checkpointing.list_checkpoints`) has all the files
  of the straight run's checkpoints and they load, and its model.safetensors is byte-identical to the straight
  run's of that step wherever that one was kept;
- after every kill, the output folder holds a pipeline that plain diffusers loads once one had been exported
  (a `model_index.json` renamed into place before the kill);
- the finished run's exported UNet and last checkpoint are byte-identical to the straight run's.

A point is "lost" when any of these fails; the script prints "N kill points, N resumed exactly, 0 lost" and exits
non-zero if any was lost. Kills are real SIGKILLs sent by the process to itself from hooks that this file installs
in the child before it runs scripts/train.py (`--child`); hf_ddpm has no fault-injection code of its own. A kill
"while saving a tensor file" first truncates the file it wrote to half, as a kill in the middle of the write
would leave it. tests/test_fault_injection.py runs a few named points of the same harness.

A child's fault is `[KIND@]POINT`: POINT an event number (1-based) or a regular expression that the event's
description matches (`after step 3`); KIND a signal (SIGKILL, the default; SIGTERM, SIGINT, SIGSTOP for a hang)
or `raise`, which raises a `DataError` there ("cannot decode image 7 ...") as a bad image seen by that process
alone would.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = [
    "--preset", "tiny-8", "--train_batch_size", "8", "--max_train_samples", "64", "--max_train_steps", "8",
    "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--logging_steps", "2", "--sample_every", "0",
    "--num_final_images", "4", "--final_sampler", "ddim", "--final_steps", "4", "--lr_warmup_steps", "2",
    "--learning_rate", "1e-3", "--report_to", "none",
]  # fmt: skip
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
MODEL = "model.safetensors"  # the training weights in a checkpoint
CHILD_TIMEOUT_S = 300
INJECTED_ERROR = "cannot decode image 7 of the training data (injected by the fault-injection harness)"


# ----------------------------------------------------------------------------------------------------- the child
class _Killer:
    """Counts the kill points of this process and SIGKILLs it at the one named by `kill_at`: an event number
    (1-based) or a regular expression that the event's description matches (its first match); `SIGTERM@...`,
    `SIGINT@...` or `SIGSTOP@...` sends that signal there instead, and `raise@...` raises `INJECTED_ERROR`."""

    def __init__(self, log: Path, kill_at: str | None, root: Path) -> None:
        self.log = open(log, "a", buffering=1)  # noqa: SIM115 - written to until the process dies
        self.signal: signal.Signals | None = signal.SIGKILL  # None: raise
        if kill_at is not None and "@" in kill_at:
            name, kill_at = kill_at.split("@", 1)
            self.signal = None if name == "raise" else signal.Signals[name]
        self.kill_at, self.root, self.count = kill_at, root, 0

    def event(self, kind: str, path: Any = "", before_kill: Callable[[], None] | None = None) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.count += 1
        name = f"{kind} {self._relative(path)}".strip()
        self.log.write(name + "\n")
        target = self.kill_at
        if target is not None and (target == str(self.count) or (not target.isdigit() and re.search(target, name))):
            self.kill_at = None  # once
            if self.signal is None:
                from hf_ddpm.errors import DataError

                self.log.write(f"RAISED at {self.count}: {name}\n")
                raise DataError(INJECTED_ERROR)
            if before_kill is not None and self.signal == signal.SIGKILL:
                before_kill()
            self.log.write(f"KILLED at {self.count}: {name}\n" if self.signal == signal.SIGKILL else
                           f"{self.signal.name} at {self.count}: {name}\n")  # fmt: skip
            os.kill(os.getpid(), self.signal)

    def _relative(self, path: Any) -> str:
        if isinstance(path, int) or path == "":
            return ""
        path = Path(os.fsdecode(path))
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)


def _install_hooks(killer: _Killer) -> None:
    """Wrap the file operations and the optimizer step that a training run goes through."""
    import accelerate.utils.other
    import safetensors.torch
    import torch

    from hf_ddpm.trainer import Trainer

    def before(kind: str, real: Callable[..., Any], path_arg: int = 0) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            killer.event(kind, args[path_arg] if len(args) > path_arg else "")
            return real(*args, **kwargs)

        return wrapped

    real_open = builtins.open

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+"):
            killer.event("write", file)  # the file exists, empty or truncated: a kill before its first byte
        return handle

    def saved(kind: str, real: Callable[..., Any], path_arg: int) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            path = args[path_arg] if len(args) > path_arg else kwargs.get("filename", kwargs.get("f"))
            if isinstance(path, (str, os.PathLike)):
                half = Path(path).stat().st_size // 2
                killer.event(kind, path, before_kill=lambda: os.truncate(path, half))
            return result

        return wrapped

    builtins.open = io.open = opened
    os.replace = before("rename", os.replace, 1)
    os.rename = before("rename", os.rename, 1)
    for name in ("unlink", "remove", "rmdir"):
        setattr(os, name, before("delete", getattr(os, name)))
    accelerate.utils.other.safe_save_file = saved("half-saved", accelerate.utils.other.safe_save_file, 1)
    safetensors.torch.save_file = saved("half-saved", safetensors.torch.save_file, 1)
    torch.save = saved("half-saved", torch.save, 1)
    real_step = Trainer.step

    def step(self: Trainer) -> Any:
        result = real_step(self)
        killer.event(f"after step {self.global_step}")
        return result

    Trainer.step = step


def child(log: str, kill_at: str, output_dir: str, train_args: list[str]) -> None:
    """Run scripts/train.py as `accelerate launch` would on one process, with the kill hooks in place."""
    killer = _Killer(Path(log), None if kill_at == "none" else kill_at, Path(output_dir).resolve())
    _install_hooks(killer)
    sys.argv = [str(REPO_ROOT / "scripts" / "train.py"), *train_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


# ---------------------------------------------------------------------------------------------------- the parent
def run_child(output_dir: Path, log: Path, kill_at: str | None, extra: Sequence[str] = ()) -> int:
    """One run of the child into `output_dir`; returns its exit status (-9 when it was killed)."""
    command = [sys.executable, __file__, "--child", str(log), kill_at or "none", str(output_dir), "--",
               *TRAIN_ARGS, "--output_dir", str(output_dir), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log.with_suffix(".stderr"), "w") as stderr:
        return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, timeout=CHILD_TIMEOUT_S,
                              cwd=REPO_ROOT).returncode  # fmt: skip


@dataclass
class Reference:
    """The straight run: its kill points, final weights and checkpoints."""

    folder: Path
    events: list[str]
    checkpoint_files: set[str] = field(default_factory=set)

    @classmethod
    def make(cls, folder: Path) -> Reference:
        log = folder.with_suffix(".events")
        status = run_child(folder, log, None)
        if status != 0:
            raise RuntimeError(f"the straight run failed ({status}): {log.with_suffix('.stderr').read_text()[-2000:]}")
        from hf_ddpm.checkpointing import list_checkpoints

        last = list_checkpoints(folder / "checkpoints")[-1]
        files = {str(p.relative_to(last)) for p in last.rglob("*") if p.is_file()}
        return cls(folder, log.read_text().splitlines(), files)


def check_after_kill(out: Path, ref: Reference, exported_before: bool) -> list[str]:
    """What a kill broke in `out`: checkpoints that resuming could pick but that are incomplete or differ, or a
    pipeline that no longer loads. Empty when nothing."""
    import torch
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    from hf_ddpm.checkpointing import STATE_FILE, list_checkpoints

    problems = []
    for checkpoint in list_checkpoints(out / "checkpoints"):
        files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
        if files != ref.checkpoint_files:
            problems.append(f"{checkpoint.name} is listed but has {sorted(files ^ ref.checkpoint_files)} unlike the "
                            "straight run's")  # fmt: skip
            continue
        try:
            json.loads((checkpoint / STATE_FILE).read_text())
            load_file(checkpoint / MODEL)
            for pickled in (checkpoint / f for f in files if f.endswith((".bin", ".pkl", ".pt"))):
                torch.load(pickled, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any failure to load is what this looks for
            problems.append(f"{checkpoint.name} does not load: {type(err).__name__}: {err}")
            continue
        same_step = ref.folder / "checkpoints" / checkpoint.name / MODEL
        if same_step.is_file() and same_step.read_bytes() != (checkpoint / MODEL).read_bytes():
            problems.append(f"{checkpoint.name}/{MODEL} differs from the straight run's")
    if exported_before or (out / "model_index.json").is_file():
        try:
            DDPMPipeline.from_pretrained(out)
        except Exception as err:  # noqa: BLE001
            problems.append(f"the exported pipeline does not load: {type(err).__name__}: {err}")
    return problems


def check_finished(out: Path, ref: Reference) -> list[str]:
    """Differences between the finished run's weights and the straight run's (bytes of the files)."""
    from hf_ddpm.checkpointing import list_checkpoints

    problems = []
    if (out / WEIGHTS).read_bytes() != (ref.folder / WEIGHTS).read_bytes():
        problems.append("the exported UNet differs from the straight run's")
    mine, theirs = list_checkpoints(out / "checkpoints")[-1], list_checkpoints(ref.folder / "checkpoints")[-1]
    if mine.name != theirs.name or (mine / MODEL).read_bytes() != (theirs / MODEL).read_bytes():
        problems.append(f"the last checkpoint {mine.name} differs from the straight run's {theirs.name}")
    return problems


@dataclass
class Outcome:
    """One kill scenario: where each process died, and what went wrong (nothing when resumed exactly)."""

    kills: list[str]
    problems: list[str]
    restarts: int


def kill_and_resume(out: Path, ref: Reference, kill_at: Sequence[str], max_restarts: int = 6) -> Outcome:
    """Run into `out`, the i-th process killed at `kill_at[i]` (an event number or a pattern), each restarted
    with --resume_from_checkpoint latest until one finishes; check the folder after every kill and at the end."""
    kills: list[str] = []
    exported = False
    for attempt in range(max_restarts + 1):
        log = out.parent / f"{out.name}-{attempt}.events"
        target = kill_at[attempt] if attempt < len(kill_at) else None
        status = run_child(out, log, target, ["--resume_from_checkpoint", "latest"] if attempt else [])
        events = log.read_text().splitlines()
        if status == 0:
            return Outcome(kills, check_finished(out, ref), attempt)
        if status != -signal.SIGKILL:
            stderr = log.with_suffix(".stderr").read_text().strip().splitlines()
            return Outcome(kills, [f"run {attempt} failed ({status}): {stderr[-1] if stderr else ''}"], attempt)
        kills.append(events[-1].removeprefix("KILLED at "))
        done = events[:-2]  # the last event is the kill point: a rename or delete there did not happen
        exported = exported or any(e.startswith("rename") and e.endswith(" model_index.json") for e in done)
        problems = check_after_kill(out, ref, exported)
        if problems:
            return Outcome(kills, problems, attempt)
    return Outcome(kills, [f"still not finished after {max_restarts} restarts"], max_restarts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill_points", type=int, default=24, help="how many kill scenarios to run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of kill points")
    parser.add_argument("--again", type=float, default=1 / 3, help="fraction of restarts that are killed again")
    parser.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf_ddpm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    ref = Reference.make(work / "straight")
    print(f"straight run: {len(ref.events)} kill points (steps, writes, renames, deletes)", flush=True)
    rng = random.Random(args.seed)
    exact = lost = killed = 0
    for i, point in enumerate(sorted(rng.sample(range(1, len(ref.events) + 1), args.kill_points))):
        plan = [str(point)]
        while rng.random() < args.again:
            plan.append(str(rng.randint(1, len(ref.events))))
        outcome = kill_and_resume(work / f"run{i:02d}", ref, plan)
        killed += len(outcome.kills)
        exact += not outcome.problems
        lost += bool(outcome.problems)
        verdict = "resumed exactly" if not outcome.problems else "LOST: " + "; ".join(outcome.problems)
        print(f"{i + 1:2d}. killed at {' | then '.join(outcome.kills)} -> {verdict}", flush=True)
    print(f"{args.kill_points} kill points, {exact} resumed exactly, {lost} lost ({killed} kills in all)")
    if args.work_dir is None:
        shutil.rmtree(work)
    return 1 if lost else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        log, kill_at, output_dir, _, *train_args = sys.argv[2:]
        child(log, kill_at, output_dir, train_args)
    else:
        sys.exit(main())
