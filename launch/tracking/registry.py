"""The MLflow model registry: an export logged as a model and registered as a version.

Each Hugging Face export becomes an MLflow LoggedModel (``model_type`` transformers, the
export folder as its artifacts, linked to the stage's run) and a new version of the
registered model ``tracking.registered_model``, tagged with the stage and the source run.
Downstream: ``mlflow.artifacts.download_artifacts("models:/NAME/VERSION")`` gives back the
folder that ``transformers`` loads with its Auto classes.

The transformers flavor (``mlflow.transformers.log_model``) is not used: it loads the model
into a pipeline on the logging machine and needs a tokenizer class ``transformers`` can
instantiate for the task; a LoggedModel of the verified folder needs neither.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.launch.config import TrackingConfig
from lmforge.launch.tracking.tracker import configure_mlflow_quiet

log = logging.getLogger("lmforge.launch.tracking")

STAGE_TAG = "lmforge.stage"
SOURCE_RUN_TAG = "lmforge.source_run"


def register_export(tracking: TrackingConfig, uri: str | None, run_id: str, export_dir: Path,
                    stage: str) -> Any:
    """Logs ``export_dir`` as a model of run ``run_id`` and registers a new version.

    Args:
        tracking: The tracking section (``registered_model`` names the registered model).
        uri: The tracking URI the run lives at.
        run_id: The stage's MLflow run.
        export_dir: The verified Hugging Face folder.
        stage: The stage's name (tagged on the model and the version).

    Returns:
        The new ``ModelVersion``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_mlflow_quiet(tracking.timeout_s)
    name = tracking.registered_model
    assert name, "tracking.registered_model is unset"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(run_id)
    tags = {STAGE_TAG: stage, SOURCE_RUN_TAG: run_id}
    model = client.create_logged_model(
        run.info.experiment_id, name=f"{stage}-export", source_run_id=run_id, tags=tags,
        model_type="transformers",
    )
    try:
        client.log_model_artifacts(model.model_id, str(export_dir))
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    try:
        client.create_registered_model(name, tags={"lmforge.kind": "language-model"})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, tags=tags,
        model_id=model.model_id, description=f"lmforge stage '{stage}' export",
    )
    client.set_tag(run_id, "lmforge.registered_model", f"{name}/{version.version}")
    return version
