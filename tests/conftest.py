"""Suite-wide settings: offline Hugging Face, quiet libraries, one thread per process."""

from __future__ import annotations

import os

# Nothing in the suite may reach a hub; exports and parity tests load local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed picks the CPU accelerator without GPUs; saying so skips a warning per process.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
