"""Test-wide settings: offline, a private HF cache, and fresh accelerate state for every in-process run.

huggingface_hub, datasets and diffusers read these variables when first imported, so they are set here,
before any test module imports them. Tests that talk to the local test hub pass its endpoint explicitly or
run a subprocess with their own environment.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="hf_ddpm-tests-hf-home-")
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": _HF_HOME,
        "TOKENIZERS_PARALLELISM": "false",
        # one thread per test process (pytest-xdist runs one worker per core): small convolutions are fastest
        # that way, and two workers with two threads each on two cores slow each other down many times over
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
)

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test that builds an Accelerator gets a new one (accelerate keeps process-wide singletons)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# Prologue for a Python process that must behave like a user's machine WITHOUT hf_ddpm: it drops the editable
# install's import hooks and any path entry that would find the checkout, then proves hf_ddpm is unimportable.
_WITHOUT_HF_DDPM = """
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", ".", {repo!r})]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("hf_ddpm") is None, "hf_ddpm is importable"
"""


def run_without_hf_ddpm(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where hf_ddpm cannot be imported; raises if it fails."""
    prologue = _WITHOUT_HF_DDPM.format(repo=str(REPO_ROOT))
    result = subprocess.run(
        [PYTHON, "-c", prologue + code], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# the capabilities with which root reads, writes and enters whatever the permission bits say (linux/capability.h)
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
PR_CAPBSET_DROP = 24


def unprivileged_folder() -> Path:
    """A new empty folder for `run_unprivileged`."""
    return Path(tempfile.mkdtemp(prefix="hf_ddpm-unprivileged-"))


def run_unprivileged(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` (hf_ddpm importable) where permission bits apply: under a root CI, in a child that drops the
    capabilities that let root ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) before it starts Python, so
    it still reads what root owns (the interpreter may live in /root). Skips the test where this process is not
    root (its own tests see the faults) or the capabilities cannot be dropped."""
    if os.geteuid() != 0:
        pytest.skip("not root: the permission faults happen in this process's own tests")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop_capabilities() -> None:
        for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        return subprocess.run([PYTHON, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
                              preexec_fn=drop_capabilities)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot drop root's permission capabilities here: {err}")
