"""Finding the checkpoint to resume from, and setting an earlier run aside for --overwrite_output_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_ddpm import checkpointing
from hf_ddpm.checkpointing import STATE_FILE, CheckpointError, resolve_checkpoint, set_aside


def _checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text("{}")
    return path


def test_resume_accepts_latest_a_name_in_the_output_dir_or_a_path(tmp_path, monkeypatch):
    checkpoints = tmp_path / "out" / "checkpoints"
    two, ten = _checkpoint(checkpoints, 2), _checkpoint(checkpoints, 10)
    elsewhere = _checkpoint(tmp_path / "other", 7)
    monkeypatch.chdir(tmp_path)  # names are looked up in checkpoints/, not in the current directory
    assert resolve_checkpoint("latest", checkpoints) == ten
    assert resolve_checkpoint("checkpoint-2", checkpoints) == two
    assert resolve_checkpoint(str(elsewhere), checkpoints) == elsewhere
    assert resolve_checkpoint("other/checkpoint-7", checkpoints) == Path("other/checkpoint-7")
    assert resolve_checkpoint(None, checkpoints) is None
    assert resolve_checkpoint("latest", tmp_path / "empty") is None


def test_unknown_checkpoint_lists_the_available_names(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _checkpoint(checkpoints, 2)
    _checkpoint(checkpoints, 4)
    (checkpoints / "checkpoint-6").mkdir()  # incomplete: no trainer_state.json
    with pytest.raises(CheckpointError, match=r"checkpoint-6 .*use 'latest' or one of: checkpoint-2, checkpoint-4$"):
        resolve_checkpoint("checkpoint-6", checkpoints)
    with pytest.raises(CheckpointError, match="none yet"):
        resolve_checkpoint("checkpoint-2", tmp_path / "nothing")


def test_set_aside_moves_everything_into_one_hidden_folder(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out / "checkpoints", 8)
    (out / "model_index.json").write_text("{}")
    (out / "eval_results.json").write_text("{}")
    (out / "logs").mkdir()
    aside = set_aside(out)
    assert list(out.iterdir()) == [aside] and aside.name.startswith(".overwritten-")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "eval_results.json", "logs", "model_index.json"]
    assert checkpointing.list_checkpoints(out / "checkpoints") == []
    again = set_aside(out)  # an earlier aside folder (a crashed overwrite) goes along, not lost
    assert list(out.iterdir()) == [again] and (again / aside.name / "model_index.json").is_file()
    assert set_aside(tmp_path / "missing") is None
