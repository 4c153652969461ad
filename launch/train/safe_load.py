"""Checkpoint files load without executing code.

``torch.load`` unpickles; a pickle can run any code. lmforge's own files are loaded with
``weights_only=True``, and DeepSpeed's readers (engine load, ZeRO consolidation, universal
conversion) call ``torch.load(..., weights_only=False)`` themselves, so every load inside
:func:`weights_only_loads` is forced to ``weights_only=True`` with an allow-list of the few
plain classes DeepSpeed stores. A file holding anything else is refused, naming it.
Resumes run unattended (Slurm requeues, Ray Train retries), often from shared storage.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
from collections.abc import Iterator

import torch

from lmforge.launch.train.errors import UnsafeCheckpointError

_lock = threading.Lock()


def _allowed_globals() -> list:
    """Classes DeepSpeed pickles into its checkpoints besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Found by loading the checkpoints of every ZeRO stage, precision and offload the tests
    # write (and their universal copies) weights-only: a namedtuple and plain-data classes.
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` (lmforge's or DeepSpeed's) is weights-only.

    Raises:
        UnsafeCheckpointError: A file held a type outside the allow-list (a planted
            payload, or a checkpoint from an untrusted source); names the file.
    """
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(_refusal(f, err)) from None

    with _lock, torch.serialization.safe_globals(_allowed_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def load_weights_only(path) -> object:
    """``torch.load`` of one of lmforge's own files, weights-only, refused with a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_refusal(path, err)) from None


def _refusal(f, err: Exception) -> str:
    name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f)
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
    what = f" (it references {', '.join(found)})" if found else ""
    return (f"{name}: refused to load: the file holds more than tensors and plain data{what}. "
            "Loading it could run code. Use checkpoints written by lmforge from a source you "
            "trust, or delete this one and resume from an earlier checkpoint")
