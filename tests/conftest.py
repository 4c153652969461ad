"""Suite-wide settings: offline Hugging Face, quiet libraries, one thread per process."""

from __future__ import annotations

import os

import pytest

# Nothing in the suite may reach a hub; exports and parity tests load local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed picks the CPU accelerator without GPUs; saying so skips a warning per process.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _keep_ray_auth_mode():
    """Ray reads RAY_AUTH_MODE once per process; a test that switches it (the Ray Jobs
    client does, when a token exists) must not leave later in-process Ray starts with a
    GCS that wants a token the driver will not send."""
    before = os.environ.get("RAY_AUTH_MODE")
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before
