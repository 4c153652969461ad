"""MLflow tracking for rank 0 (``launch/tracking/``).

Owns: the :class:`Tracker` callers log through (``tracker.py``), the background thread that
delivers to MLflow (``delivery.py``), how records are built (``records.py``: params, dataset
lineage, system metrics), how MLflow failures are classified (``errors.py``) and the model
registry (``registry.py``: an export logged as a model and registered as a version). Tracking
failure never stops training.

MLflow only inside functions, so ranks that never track stay light.
May import: lmforge.launch.config, lmforge.launch.rundir, lmforge.launch.redact,
    lmforge.pipeline.contract, lmforge.pipeline.config, lmforge.model, mlflow
"""

from lmforge.launch.tracking.tracker import RunStatus, Tracker

__all__ = ["RunStatus", "Tracker"]
