"""Exit statuses the training processes, their launcher and job scripts agree on.

Torch-free: the launcher side (torchrun, submit, the stage runner) reads them without
importing the training code.
"""

# A run stopped by SIGTERM/SIGUSR1 after checkpointing: EX_TEMPFAIL, so a job script can
# tell "requeue me" from success (0) and failure (anything else).
REQUEUE_EXIT_CODE = 75
