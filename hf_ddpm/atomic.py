"""Files that readers never see half-written: trainer_state.json, training_summary.json, eval_results.json, README.md,
samples.png and other image files.

A process killed at any moment (SIGKILL, OOM, preemption) leaves either the old file or the new one, never a
truncated one; tests/test_fault_injection.py kills runs inside these writes to check it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) through a temporary file, fsync and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (see `write_text`), indented with sorted keys."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_file(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file at `.tmp-<name>` beside `path` (the same suffix, for writers that choose the
    format by it: PIL, numpy), which is fsynced and renamed over `path`; removed if `write` raises."""
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
