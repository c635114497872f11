"""What every script in scripts/ shares: user errors become one line on stderr and a non-zero exit.

A `hf_ddpm.errors.UserError` (bad flags, data, checkpoints, Hub requests, missing weights, a run that cannot go
on) prints as `error: <message>`; anything else is a bug and keeps its traceback. Set HF_DDPM_TRACEBACK=1 to see
the traceback of user errors too.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from hf_ddpm.errors import LostProcessesError, UserError


def one_line(err: BaseException) -> str:
    """The error's message on one line (whitespace collapsed), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


def run_cli(main: Callable[[], Any]) -> int:
    """Run `main()`; return 0, or 1 after printing a user error as one line (a `LostProcessesError` exits
    the process with 1 right after it)."""
    try:
        main()
    except LostProcessesError as err:
        if os.environ.get("HF_DDPM_TRACEBACK"):
            traceback.print_exc()
        else:
            print(f"error: {one_line(err)}", file=sys.stderr)
        # Nothing is left to save (checkpoints are written atomically, and each one listed is complete), while a
        # normal exit tears down a process group whose peers are gone: torch may wait --ddp_timeout for each
        # collective still queued, or abort (SIGABRT) in its threads at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(1)
    except UserError as err:
        if os.environ.get("HF_DDPM_TRACEBACK"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0
