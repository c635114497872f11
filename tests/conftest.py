"""Test-wide settings: offline, a private HF cache, and fresh accelerate state for every in-process run.

huggingface_hub, datasets and diffusers read these variables when first imported, so they are set here,
before any test module imports them. Tests that talk to the local test hub pass its endpoint explicitly or
run a subprocess with their own environment.
"""

import os
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
