"""Every error hf_ddpm raises for bad input or a run that cannot go on: one `UserError` family.

`hf_ddpm.cli.run_cli` prints a `UserError` as one line (`error: <message>`) and exits 1; anything else is a
bug and keeps its traceback. Each subclass also derives from the built-in error it used to be (a DataError is
a ValueError, a MissingWeightsError a FileNotFoundError, ...), so `except ValueError:` code keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, or a run that cannot go on; the message is one line that says what to fix."""


class ConfigError(UserError, ValueError):
    """A flag or config value that no code path accepts, found before anything is built."""


class DataError(UserError, ValueError):
    """A dataset problem found before training, naming the file, column or split and the flag that fixes it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint asked for cannot be resumed from."""


class HubError(UserError, RuntimeError):
    """A Hub problem, or a pipeline that cannot be loaded, explained in one line that never contains the token."""


class TrainingError(UserError, RuntimeError):
    """Training cannot start or go on."""


class LostProcessesError(TrainingError):
    """A process whose peers died, hung or failed; it cannot tear down its process group, so the CLI exits at once
    after the line."""


class DiskFullError(UserError, OSError):
    """The disk filled up (or a quota was hit) while writing a checkpoint or an export; says how much is needed."""


class MissingWeightsError(UserError, FileNotFoundError):
    """Weights a model or metric needs are not on disk and cannot be downloaded."""


class PickleWeightsError(UserError, OSError):
    """A model has only pickle (`.bin`) weights and loading them was not allowed."""
