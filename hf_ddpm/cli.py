"""What every script in scripts/ shares: user errors become one line on stderr and a non-zero exit.

Errors that describe bad input (a ValueError such as DataError, a missing file, a refused Hub request, a run
that cannot go on) print as `error: <message>`; anything else is a bug and keeps its traceback. Set
HF_DDPM_TRACEBACK=1 to see the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (whitespace collapsed), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


def register_user_error(error: type[BaseException]) -> type[BaseException]:
    """Class decorator: errors of this type are reported as one line by `run_cli`."""
    global USER_ERRORS
    USER_ERRORS = (*USER_ERRORS, error)
    return error


def run_cli(main: Callable[[], Any]) -> int:
    """Run `main()`; return 0, or 1 after printing a user error as one line."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("HF_DDPM_TRACEBACK"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0
