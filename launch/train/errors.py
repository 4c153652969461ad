"""The checkpoint errors a user can hit, importable without torch (the CLI reports them)."""


class CheckpointError(RuntimeError):
    """No checkpoint to resume from although some exist, or a save failed."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain data."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file cannot be read as one (zero-filled, cut short, not a torch file)."""
