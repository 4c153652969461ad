"""The checkpoint errors a user can hit, importable without torch (the CLI reports them)."""


class CheckpointError(RuntimeError):
    """No checkpoint to resume from although some exist, or a save failed."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain data."""
