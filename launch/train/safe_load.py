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
import zipfile
from collections.abc import Iterator

import torch

from lmforge.launch.train.errors import UnreadableCheckpointError, UnsafeCheckpointError

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
        UnreadableCheckpointError: A file is not a torch file at all (zero-filled or cut
            short by a crash, overwritten); names the file.
    """
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return _load(original, f, *args, **kwargs)

    with _lock, torch.serialization.safe_globals(_allowed_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def load_weights_only(path) -> object:
    """``torch.load`` of one of lmforge's own files, weights-only, refused with a clear error."""
    return _load(torch.load, path, map_location="cpu", weights_only=True)


def _load(load, f, *args, **kwargs):
    """``load(f, ...)`` with its failures named: a payload, or a file that is no torch file."""
    try:
        return load(f, *args, **kwargs)
    except pickle.UnpicklingError as err:
        if _globals(err):
            raise UnsafeCheckpointError(_refusal(f, err)) from None
        raise UnreadableCheckpointError(_unreadable(f, err)) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, (UnsafeCheckpointError, UnreadableCheckpointError,
                            torch.OutOfMemoryError)) or "CUDA" in str(err):
            raise  # ours already, or the device's trouble rather than the file's
        raise UnreadableCheckpointError(_unreadable(f, err)) from None


def _name(f) -> object:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f)


def _globals(err: Exception) -> list[str]:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))


def _refusal(f, err: Exception) -> str:
    found = _globals(err)
    what = f" (it references {', '.join(found)})" if found else ""
    return (f"{_name(f)}: refused to load: the file holds more than tensors and plain "
            f"data{what}. Loading it could run code. Use checkpoints written by lmforge from a "
            "source you trust, or delete this one and resume from an earlier checkpoint")


def _unreadable(f, err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return (f"{_name(f)}: cannot be read as a checkpoint file ({first}); it was damaged after "
            "it was written (zero-filled or cut short by a crash, or overwritten)")
