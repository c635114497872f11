"""One way to fail: every hf_ddpm error is a UserError, which scripts print as one line and exit 1."""

from __future__ import annotations

import logging
import os

import pytest

from hf_ddpm import errors
from hf_ddpm.cli import run_cli

# each error and the built-in error it also is, so `except ValueError:` and the like keep catching it
BUILT_IN = {
    errors.ConfigError: ValueError,
    errors.DataError: ValueError,
    errors.CheckpointError: ValueError,
    errors.HubError: RuntimeError,
    errors.TrainingError: RuntimeError,
    errors.MissingWeightsError: FileNotFoundError,
    errors.PickleWeightsError: OSError,
    errors.DiskFullError: OSError,
}


@pytest.mark.parametrize("error", list(BUILT_IN), ids=lambda e: e.__name__)
def test_every_error_is_a_user_error_printed_in_one_line(error, capsys, monkeypatch):
    assert issubclass(error, errors.UserError) and issubclass(error, BUILT_IN[error])

    def main() -> None:
        raise error("bad value\n  for --flag")

    monkeypatch.delenv("HF_DDPM_TRACEBACK", raising=False)
    assert run_cli(main) == 1
    assert capsys.readouterr().err == "error: bad value for --flag\n"
    monkeypatch.setenv("HF_DDPM_TRACEBACK", "1")
    with pytest.raises(error):
        run_cli(main)


def test_every_error_class_is_defined_in_errors_py():
    defined = {value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)}
    assert defined == {errors.UserError, errors.LostProcessesError, *BUILT_IN}


class _Exited(Exception):
    """What the stand-in for os._exit raises, so that the test goes on."""


@pytest.mark.parametrize("traceback", [False, True], ids=["one-line", "HF_DDPM_TRACEBACK"])
def test_lost_processes_print_the_line_flush_the_logs_and_exit_at_once(traceback, capsys, monkeypatch):
    exits, shutdowns = [], []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise _Exited

    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(logging, "shutdown", lambda: shutdowns.append(1))  # pytest's own handlers stay open
    if traceback:
        monkeypatch.setenv("HF_DDPM_TRACEBACK", "1")
    else:
        monkeypatch.delenv("HF_DDPM_TRACEBACK", raising=False)

    def main() -> None:
        raise errors.LostProcessesError("process 0 of 2 lost the others\n during step 4")

    with pytest.raises(_Exited):  # not a return: a normal exit would tear down the broken process group
        run_cli(main)
    assert exits == [1] and shutdowns == [1]
    err = capsys.readouterr().err
    if traceback:
        assert err.startswith("Traceback")
        assert err.endswith("LostProcessesError: process 0 of 2 lost the others\n during step 4\n")
    else:
        assert err == "error: process 0 of 2 lost the others during step 4\n"


def test_a_bug_keeps_its_traceback_and_success_exits_zero(monkeypatch):
    monkeypatch.delenv("HF_DDPM_TRACEBACK", raising=False)

    def bug() -> None:
        raise KeyError("unexpected")

    with pytest.raises(KeyError):
        run_cli(bug)
    assert run_cli(lambda: None) == 0
