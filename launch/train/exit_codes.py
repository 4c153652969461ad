"""Exit statuses the training processes, their launcher and job scripts agree on.

Torch-free: the launcher side (local processes, submit, the stage runner) reads them without
importing the training code.

How an MLflow run ends follows from the exit status of what it ran (:func:`mlflow_status`,
the one rule; ``launch/stages/mlflow_runs.py`` starts and ends the runs with it):

====================  ==========  ===============================================
exit status           MLflow      meaning
====================  ==========  ===============================================
0                     FINISHED    done
75 (requeue)          KILLED      stopped after a checkpoint; the next attempt resumes
                                  into the same run (which is RUNNING again then)
anything else         FAILED      crashed, or a hook stopped the job
====================  ==========  ===============================================
"""

from typing import Literal

# A run stopped by SIGTERM/SIGUSR1 after checkpointing: EX_TEMPFAIL, so a job script can
# tell "requeue me" from success (0) and failure (anything else).
REQUEUE_EXIT_CODE = 75


def mlflow_status(exit_code: int) -> Literal["FINISHED", "KILLED", "FAILED"]:
    """The MLflow status of a run whose work exited with ``exit_code``: 0 → FINISHED, the
    requeue code 75 → KILLED (preempted after a checkpoint, will resume), else FAILED."""
    if exit_code == 0:
        return "FINISHED"
    if exit_code == REQUEUE_EXIT_CODE:
        return "KILLED"
    return "FAILED"
