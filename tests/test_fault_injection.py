"""Faults a long run meets: SIGKILL anywhere, SIGTERM/SIGINT, a full disk at each write, an unwritable output dir.

The kills use benchmarks/fault_injection.py's harness (hooks installed in a child running scripts/train.py), at
named points: inside a tensor file of a checkpoint, inside the rotation of an old checkpoint, inside the model card
write after an export, and inside the re-export that replaces it. The benchmark runs the same harness at 24
random points.
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import accelerate.utils.other
import pytest
import safetensors.torch
import torch
from conftest import PYTHON, REPO_ROOT, run_unprivileged, unprivileged_folder
from diffusers import DDPMPipeline

from hf_ddpm import checkpointing
from hf_ddpm.cli import run_cli
from hf_ddpm.errors import DiskFullError, TrainingError
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args

_spec = importlib.util.spec_from_file_location("fault_injection", REPO_ROOT / "benchmarks" / "fault_injection.py")
faults = sys.modules["fault_injection"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> faults.Reference:
    return faults.Reference.make(tmp_path_factory.mktemp("faults") / "straight")


def test_straight_run_offers_kill_points_in_every_phase(straight):
    events = "\n".join(straight.events)
    for phase in ("after step 1", "half-saved checkpoints/.tmp-checkpoint-2/model.safetensors",
                  "rename checkpoints/.deleting-checkpoint-2", "rename unet/diffusion_pytorch_model.safetensors",
                  "rename model_index.json", "write README.md.tmp"):  # fmt: skip
        assert phase in events


def test_killed_inside_checkpoint_rotation_export_and_card_it_resumes_bit_exactly(straight, tmp_path):
    plan = [
        "half-saved checkpoints/.tmp-checkpoint-4/optimizer.bin",  # a checkpoint half written: resumes from 2
        r"^delete optimizer\.bin",  # rotating checkpoint-2 out (from the resumed run's save of checkpoint-6)
        r"^write README\.md\.tmp",  # the model card, after the pipeline was exported
        r"^rename unet/diffusion_pytorch_model\.safetensors",  # the re-export, over the earlier export
    ]
    outcome = faults.kill_and_resume(tmp_path / "out", straight, plan)
    assert outcome.problems == []
    assert [kill.split(": ", 1)[1] for kill in outcome.kills] == [
        "half-saved checkpoints/.tmp-checkpoint-4/optimizer.bin",
        "delete optimizer.bin",
        "write README.md.tmp",
        "rename unet/diffusion_pytorch_model.safetensors",
    ]
    assert outcome.restarts == 4


def test_a_half_written_checkpoint_or_a_broken_export_is_caught_by_the_checks(straight, tmp_path):
    out = Path(shutil.copytree(straight.folder, tmp_path / "out"))
    assert faults.check_after_kill(out, straight, exported_before=True) == []
    last = checkpointing.list_checkpoints(out / "checkpoints")[-1]
    (last / "optimizer.bin").unlink()  # what renaming a folder before its files were complete would leave
    assert f"{last.name} is listed but has ['optimizer.bin']" in faults.check_after_kill(out, straight, False)[0]
    shutil.copy(straight.folder / "checkpoints" / last.name / "optimizer.bin", last)
    model = last / faults.MODEL
    model.write_bytes(model.read_bytes()[:1000])  # a half-written file under a complete-looking name
    assert f"{last.name} does not load" in faults.check_after_kill(out, straight, False)[0]
    (out / "model_index.json").unlink()
    assert "pipeline does not load" in faults.check_after_kill(out, straight, exported_before=True)[-1]


def test_sigterm_saves_a_checkpoint_and_exits_with_one_line_then_resumes_exactly(straight, tmp_path):
    out, log = tmp_path / "out", tmp_path / "term.events"
    assert faults.run_child(out, log, "SIGTERM@after step 3") == 1
    stderr = log.with_suffix(".stderr").read_text().strip().splitlines()
    assert stderr[-1] == (
        "error: stopped by SIGTERM after step 3 of 8 with checkpoint-3 saved; continue with "
        "--resume_from_checkpoint latest"
    )
    assert not any("Traceback" in line for line in stderr)
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    assert faults.run_child(out, tmp_path / "b.events", None, ["--resume_from_checkpoint", "latest"]) == 0
    assert faults.check_finished(out, straight) == []


FAST = [*faults.TRAIN_ARGS, "--max_train_steps", "4"]


def test_sigint_in_process_checkpoints_stops_and_restores_the_handlers(tmp_path, monkeypatch):
    real_step = Trainer.step

    def interrupted_step(self):
        result = real_step(self)
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "step", interrupted_step)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "o")]))
    with pytest.raises(TrainingError, match=r"^stopped by SIGINT after step 1 of 4 with checkpoint-1 saved"):
        trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "o" / "checkpoints")] == ["checkpoint-1"]


class _DiskFull:
    """Makes the n-th write (a file opened for writing, or a tensor file saved: half of it, then the error)
    fail with ENOSPC; with n=None only counts the writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int | None) -> None:
        self.n, self.count = n, 0
        real_open = builtins.open

        def opened(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._write(None)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opened)
        for owner, name in ((accelerate.utils.other, "safe_save_file"), (safetensors.torch, "save_file"),
                            (torch, "save")):  # fmt: skip
            monkeypatch.setattr(owner, name, self._saver(getattr(owner, name)))

    def _saver(self, real):
        def save(obj, path, *args, **kwargs):
            real(obj, path, *args, **kwargs)
            self._write(path)

        return save

    def _write(self, path) -> None:
        self.count += 1
        if self.count == self.n:
            if path is not None:
                os.truncate(path, Path(path).stat().st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_at_each_write_keeps_the_previous_checkpoint_and_export(tmp_path, monkeypatch):
    out = tmp_path / "o"
    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(out), "--checkpoints_total_limit", "1"]))
    trainer.train()
    checkpoints = out / "checkpoints"
    before = _files(out)
    last = checkpointing.list_checkpoints(checkpoints)[-1]
    size_mib = sum(len(b) for name, b in before.items() if name.startswith(f"checkpoints/{last.name}/")) / 2**20
    state = {"global_step": 6}
    pipe = trainer._ema_pipeline()
    with monkeypatch.context() as m:  # count the writes of one checkpoint and one export
        counter = _DiskFull(m, None)
        checkpointing.save_checkpoint(trainer.accelerator, tmp_path / "count", 6, state, 1)
        checkpoint_writes = counter.count
        checkpointing.export_pipeline(pipe, tmp_path / "count")
        export_writes = counter.count - checkpoint_writes
    assert (checkpoint_writes, export_writes) == (7, 4)  # 6 tensor files + trainer_state.json; 4 pipeline files
    for n in range(1, checkpoint_writes + 1):
        with monkeypatch.context() as m, pytest.raises(DiskFullError) as caught:
            _DiskFull(m, n)
            checkpointing.save_checkpoint(trainer.accelerator, checkpoints, 6, state, 1)
        assert f"needs about {size_mib:,.1f} MiB (the size of the last one)" in str(caught.value)
        assert _files(out) == before, f"write {n} of a checkpoint changed the folder"
    for n in range(1, export_writes + 1):
        with monkeypatch.context() as m, pytest.raises(DiskFullError, match="while writing the pipeline"):
            _DiskFull(m, n)
            checkpointing.export_pipeline(pipe, out)
        assert _files(out) == before, f"write {n} of an export changed the folder"
    DDPMPipeline.from_pretrained(out)


def test_disk_full_during_training_is_one_line_saying_how_much_space_is_needed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    args = parse_training_args([*FAST, "--output_dir", str(out)])
    real = checkpointing.save_checkpoint
    calls = []

    def full_on_the_second(*a, **kw):
        calls.append(1)
        with monkeypatch.context() as m:
            if len(calls) == 2:
                _DiskFull(m, 1)
            return real(*a, **kw)

    monkeypatch.setattr(checkpointing, "save_checkpoint", full_on_the_second)
    assert run_cli(lambda: Trainer(args).train()) == 1
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("train:") for line in progress)  # the progress bar, then one line
    assert err.startswith("error: no space left on the device while writing checkpoint-4 to ")
    assert "it needs about " in err and "MiB are free" in err and "--resume_from_checkpoint latest" in err
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


def test_a_full_disk_at_a_posthoc_ema_snapshot_or_the_best_pipelines_files_is_one_line(tmp_path, monkeypatch):
    from hf_ddpm import posthoc_ema, trainer

    real_snapshot, real_json = posthoc_ema.save_snapshot, trainer.write_json

    def full_at_step_4(ema, names, folder):
        if ema.step_count == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_snapshot(ema, names, folder)

    monkeypatch.setattr(posthoc_ema, "save_snapshot", full_at_step_4)
    out = tmp_path / "snapshots"
    args = parse_training_args([*FAST, "--output_dir", str(out), "--max_train_steps", "4", "--posthoc_ema_every", "2"])
    with pytest.raises(DiskFullError, match="while writing a post-hoc EMA snapshot to .*it needs about"):
        Trainer(args).train()
    assert [p.name for p in (out / posthoc_ema.SNAPSHOT_DIR).iterdir()] == ["step-0000002.safetensors"]

    def full_at_best_eval(path, value):
        if Path(path).name == "best_eval.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_json(path, value)

    monkeypatch.setattr(trainer, "write_json", full_at_best_eval)
    args = parse_training_args([*FAST, "--output_dir", str(tmp_path / "best"), "--max_train_steps", "2",
                                "--max_train_samples", "160", "--eval_every", "2", "--eval_num_samples", "70",
                                "--preview_sampler", "ddim", "--preview_steps", "2"])  # fmt: skip
    with pytest.raises(DiskFullError, match="while writing the best pipeline's results and model card to .*best"):
        Trainer(args).train()


def test_unwritable_output_dir_fails_before_the_first_step(tmp_path, monkeypatch):
    stepped = []
    monkeypatch.setattr(Trainer, "step", lambda self: stepped.append(1))
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainingError, match=r"--output_dir .*file/out cannot be written \(NotADirectoryError"):
        Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "file" / "out")]))
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes through permission bits: there only the case above applies
        with pytest.raises(TrainingError, match=r"read_only cannot be written \(PermissionError"):
            Trainer(parse_training_args([*FAST, "--output_dir", str(read_only)]))
    assert stepped == []


def test_as_an_unprivileged_user_a_read_only_output_dir_is_one_line_before_the_first_step():
    """The check the trainer makes before its first step (tested above), where permission bits apply (under root:
    without the capabilities that ignore them)."""
    home = unprivileged_folder()
    (home / "read_only").mkdir(mode=0o555)
    code = ("import sys; from hf_ddpm.checkpointing import check_writable; from hf_ddpm.cli import run_cli; "
            "sys.exit(run_cli(lambda: check_writable('read_only/out')))")  # fmt: skip
    result = run_unprivileged(code, home)
    shutil.rmtree(home)
    assert result.returncode == 1, result.stderr[-2000:]
    expected = (r"error: --output_dir read_only/out cannot be written \(PermissionError: Permission denied\); fix its "
                r"permissions or choose another --output_dir\n")  # fmt: skip
    assert re.fullmatch(expected, result.stderr), result.stderr


def _two_ranks(tmp_path: Path, rank1_fault: str, *extra: str) -> tuple[int, list[str], Path]:
    """scripts/train.py as two gloo processes started by hand (no launcher that would kill the survivor), rank 1
    with the harness' `rank1_fault`; returns rank 0's exit status and stderr lines, and the output folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    train_args = [*faults.TRAIN_ARGS, "--train_batch_size", "4", "--output_dir", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}  # fmt: skip
    ranks = {}
    for rank, fault in ((1, rank1_fault), (0, "none")):
        command = [PYTHON, str(REPO_ROOT / "benchmarks" / "fault_injection.py"), "--child",
                   str(tmp_path / f"rank{rank}.events"), fault, str(out), "--", *train_args]  # fmt: skip
        stderr = open(tmp_path / f"rank{rank}.stderr", "w")  # noqa: SIM115 - closed with the process
        ranks[rank] = subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                       stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        status = ranks[0].wait(timeout=300)  # a hang fails here
    finally:
        for process in ranks.values():
            process.kill()
            process.wait()
    return status, (tmp_path / "rank0.stderr").read_text().strip().splitlines(), out


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("half-saved checkpoints/.tmp-checkpoint-4/random_states_1.pkl", "Connection (reset|closed) by peer"),
        ("SIGSTOP@after step 3", "within --ddp_timeout 10 s .*Timed out waiting 10000ms"),
    ],
    ids=["killed-while-checkpointing", "hung"],
)
def test_with_a_rank_killed_or_hung_the_survivor_stops_with_one_line_and_no_checkpoint_is_marked_complete(
    tmp_path, fault, expected
):
    status, stderr, out = _two_ranks(tmp_path, fault, "--ddp_timeout", "10")
    assert status == 1, stderr[-15:]
    assert re.match(rf"error: process 0 of 2 lost the others during step \d: .*{expected}", stderr[-1]), stderr[-5:]
    assert not any("Traceback" in line for line in stderr)
    assert "1 process(es)" not in (tmp_path / "rank0.stderr").read_text()  # two ranks really ran
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


def test_a_rank_that_raises_stops_the_other_with_its_error_before_the_timeout(tmp_path):
    status, stderr, out = _two_ranks(tmp_path, "raise@after step 3", "--ddp_timeout", "60")
    waited = time.time() - (tmp_path / "rank1.stderr").stat().st_mtime  # from rank 1's last line to rank 0's exit
    assert status == 1, stderr[-15:]
    expected = (r"error: process 0 of 2 stopped during step 4 because process 1 failed: cannot decode image 7 .*; "
                r"resume from checkpoint-2 with --resume_from_checkpoint latest$")  # fmt: skip
    assert re.match(expected, stderr[-1]), stderr[-5:]
    assert not any("Traceback" in line for line in stderr)
    rank1 = (tmp_path / "rank1.stderr").read_text().strip().splitlines()
    assert rank1[-1] == f"error: {faults.INJECTED_ERROR}", rank1[-5:]  # the raiser prints its own error
    assert waited < 30, f"rank 0 stopped {waited:.0f} s after rank 1's error: it waited for --ddp_timeout 60"
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


# run under `accelerate launch` on every rank: the harness' child, with the fault on rank 0 alone
_FAULT_ON_RANK_0 = """import os, runpy, sys

log, fault, *rest = sys.argv[1:]
rank = os.environ["RANK"]
sys.argv = [{harness!r}, "--child", f"{{log}}{{rank}}.events", fault if rank == "0" else "none", *rest]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_under_accelerate_launch_a_rank_0_that_raises_stops_the_other_with_its_error(tmp_path):
    # the launcher's agent hosts the store here, so it outlives rank 0 (started by hand, rank 1 could not read it)
    script, out = tmp_path / "fault_on_rank_0.py", tmp_path / "ddp"
    script.write_text(_FAULT_ON_RANK_0.format(harness=str(REPO_ROOT / "benchmarks" / "fault_injection.py")))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), str(tmp_path / "rank"), "raise@after step 3", str(out), "--", *faults.TRAIN_ARGS,
           "--train_batch_size", "4", "--output_dir", str(out), "--ddp_timeout", "600"]  # fmt: skip
    # a run that waited for --ddp_timeout would fail this timeout
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert " x 2 process(es) x " in result.stderr  # two ranks really ran
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {faults.INJECTED_ERROR}",  # rank 0's own line, then rank 1's
        f"error: process 1 of 2 stopped during step 4 because process 0 failed: {faults.INJECTED_ERROR}; resume "
        "from checkpoint-2 with --resume_from_checkpoint latest",
    ], result.stderr[-3000:]
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for one tiny-8 checkpoint (2.9 MiB), not two. Needs root and mount(8)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_a_really_full_disk_keeps_the_previous_checkpoint_and_says_how_much_is_needed(small_disk, capsys):
    out = small_disk / "o"
    args = parse_training_args([*FAST, "--output_dir", str(out)])
    assert run_cli(lambda: Trainer(args).train()) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = (r"error: no space left on the device while writing checkpoint-4 to .* \(No space left on device\): "
                r"it needs about 2\.\d MiB \(the size of the last one\), [01]\.\d MiB are free")  # fmt: skip
    assert re.match(expected, err), err
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # the partial one is gone
    safetensors.torch.load_file(out / "checkpoints" / "checkpoint-2" / faults.MODEL)
