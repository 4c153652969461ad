"""MLflow tracking for rank 0: params, batched metrics, system metrics, artifacts, lineage.

Every logging call only enqueues and returns; a background thread (tracking/delivery.py)
talks to MLflow. If the tracking server is down or slow, training goes on: the records stay
queued (bounded), are retried with backoff, and arrive once it answers again. Other ranks use
`Tracker.disabled()`, which does nothing and does not import MLflow.

Typical use (the launcher starts the run, training processes re-attach with its handle):

    tracker = Tracker(cfg.tracking, run_dir)
    handle = tracker.start(run_name="pretrain", tags={"stage": "pretrain"})
    tracker.log_params(resolved_config_dict)
    for step in ...:  # the engine logs every `train.log_every` steps
        tracker.log_metrics({"loss": loss, "lr": lr}, step)
    tracker.close("FINISHED")
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from lmforge.launch.config import TrackingConfig
from lmforge.launch.config.sections import VALID_MLFLOW_KEY
from lmforge.launch.redact import redact
from lmforge.launch.rundir import RunDir
from lmforge.launch.tracking.records import (
    SystemSampler,
    dataset_entity,
    flatten_params,
    params_operation,
)
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

log = logging.getLogger("lmforge.launch.tracking")

RunStatus = Literal["FINISHED", "FAILED", "KILLED", "RUNNING"]
"""How `close()` leaves the run; RUNNING detaches and leaves it open for another process."""
# A metric/param/tag key that breaks MLflow's rules (VALID_MLFLOW_KEY) is dropped here, not
# at the server, so it cannot fail a batch of good values.
_MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH


def configure_mlflow_quiet(timeout_s: float) -> None:
    """Process-wide MLflow settings: bounded requests and no console noise.

    Sets MLFLOW_HTTP_REQUEST_TIMEOUT from the config and MLFLOW_HTTP_REQUEST_MAX_RETRIES to 0
    (MLflow's own retries would block our thread for minutes; we retry with backoff), and
    suppresses the "View run at" lines and sqlite schema-migration INFO logs.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """Rank-0 MLflow tracker whose calls never block training or raise on tracking failures.

    Args:
        cfg: the `tracking:` config section.
        run_dir: the run directory; holds the sqlite store when `cfg.uri` is None.
    """

    def __init__(self, cfg: TrackingConfig, run_dir: Path | str) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._worker: Any = None  # DeliveryThread once started; kept after close for stats
        self._closed = False

    @classmethod
    def disabled(cls) -> Tracker:
        """A no-op tracker for ranks other than 0 (imports nothing, opens nothing)."""
        return cls(TrackingConfig(enabled=False, system_metrics=False), Path("."))

    @property
    def enabled(self) -> bool:
        """Whether calls reach MLflow."""
        return self.cfg.enabled

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in use (the sqlite store in the run dir by default)."""
        if self.cfg.uri is not None:
            return self.cfg.uri
        return f"sqlite:///{RunDir.of(self.run_dir).mlflow_db}"

    @property
    def uri(self) -> str:
        """Same as `tracking_uri`."""
        return self.tracking_uri

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None while the run is not created yet (or tracking is off)."""
        if self._worker is None:
            return None
        return self._worker.run_id or self._worker.target.run_id

    def start(
        self,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        run_id: str | None = None,
        system_metrics: bool | None = None,
    ) -> str:
        """Create an MLflow run, or re-attach to one, and start the delivery thread.

        Waits at most `start_timeout_s` for MLflow. If it does not answer in time the run is
        created in the background once it does, and everything logged meanwhile follows.

        Args:
            run_name: run name; defaults to `cfg.run_name`.
            tags: run tags, added to `cfg.tags`.
            run_id: a handle returned by `start()` in another process (the launcher): a real
                MLflow run id, or a pending handle, which finds the run the other process
                created later or creates it.
            system_metrics: sample `system/*` metrics from this process; defaults to
                `cfg.system_metrics`. A launcher that only waits for its training processes
                passes False, so that one process per run reports them.

        Returns:
            The MLflow run id, or a pending handle (`lmforge-pending-<hex>`) when MLflow was
            unreachable; both can be passed to `start(run_id=...)` elsewhere. "" when disabled.
        """
        if not self.enabled:
            return run_id or ""
        if self._worker is not None:
            raise RuntimeError("Tracker.start() called twice; use one Tracker per run")
        configure_mlflow_quiet(self.cfg.timeout_s)
        from lmforge.launch.tracking.delivery import (
            PENDING_PREFIX,
            DeliveryThread,
            RunTarget,
        )

        artifact_location = None
        if self.cfg.uri is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            artifact_location = RunDir.of(self.run_dir).mlflow_artifacts.as_uri()
        all_tags = {str(k): str(v) for k, v in redact({**self.cfg.tags, **(tags or {})}).items()}
        target = RunTarget(self.cfg.experiment, artifact_location, run_name or self.cfg.run_name,
                           tags=all_tags)
        if run_id and run_id.startswith(PENDING_PREFIX):
            target.run_key, target.search_key = run_id[len(PENDING_PREFIX):], True
        elif run_id:
            target.run_id = run_id
        sampler = None
        if self.cfg.system_metrics if system_metrics is None else system_metrics:
            try:
                sampler = SystemSampler()
            except Exception as exc:  # psutil missing or unusable: train without system metrics
                log.warning("tracking: system metrics unavailable: %s", exc)
        self._worker = DeliveryThread(
            self.tracking_uri, target, flush_interval_s=self.cfg.flush_interval_s,
            max_queue=self.cfg.max_queue, retry_max_s=self.cfg.retry_max_s,
            sample_system=sampler, system_interval_s=self.cfg.system_metrics_interval_s,
        )
        self._worker.start()
        self._worker.first_attempt_done.wait(self.cfg.start_timeout_s)
        return self._worker.run_id or target.run_id or PENDING_PREFIX + target.run_key

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params, secrets redacted (see `launch/redact.py`); nested dicts become dotted
        keys (see `flatten_params`)."""
        if self._inactive():
            return
        flat = flatten_params(redact(params))
        items = [(k, v) for k, v in flat.items() if self._key_ok(k, "param")]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + _MAX_PARAMS_PER_BATCH]
            self._worker.put_op(f"{len(chunk)} param(s)", params_operation(chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at `step` and return at once (no I/O on this thread).

        Values go through `float()`, so pass Python floats: a CUDA tensor would synchronize.
        """
        if self._inactive():
            return
        now_ms = int(time.time() * 1000)
        records = []
        for key, value in metrics.items():
            if not self._key_ok(key, "metric"):
                continue
            try:
                records.append((key, float(value), now_ms, int(step)))
            except (TypeError, ValueError):
                log.warning("tracking: metric '%s' value %r is not a number; skipped", key, value)
        self._worker.put_metrics(records, int(step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags (values become strings)."""
        if self._inactive():
            return
        pairs = [(str(k), str(v)) for k, v in redact(tags).items() if self._key_ok(str(k), "tag")]

        def send(client: Any, run_id: str) -> None:
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in pairs])

        self._worker.put_op(f"{len(pairs)} tag(s)", send)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Queue the upload of a file or directory; it must stay in place until `flush()`."""
        if self._inactive():
            return
        local = Path(path)
        if not local.exists():
            log.warning("tracking: artifact %s does not exist; not logged", local)
            return

        def send(client: Any, run_id: str) -> None:
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_path)
            else:
                client.log_artifact(run_id, str(local), artifact_path)

        self._worker.put_op(f"artifact {local}", send)

    def log_artifacts(self, local_dir: Path | str, artifact_path: str | None = None) -> None:
        """Queue the upload of a directory's contents (same as `log_artifact` on a directory)."""
        self.log_artifact(local_dir, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue `text` as the artifact `artifact_file` (e.g. "notes/summary.txt")."""
        if self._inactive():
            return
        self._worker.put_op(f"artifact {artifact_file}",
                            lambda client, run_id: client.log_text(run_id, text, artifact_file))

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        """Queue a dict as a JSON or YAML artifact (by `artifact_file`'s extension).

        The dict is copied now, so later changes by the caller are not logged.
        """
        if self._inactive():
            return
        snapshot = redact(json.loads(json.dumps(dictionary, default=str)))
        self._worker.put_op(
            f"artifact {artifact_file}",
            lambda client, run_id: client.log_dict(run_id, snapshot, artifact_file),
        )

    def log_config(self, config: dict[str, Any], artifact_file: str = "config.yaml") -> None:
        """Queue a resolved config as a YAML artifact with its secrets redacted.

        Use this, not `log_artifact(run_dir/config.yaml)`: that file keeps the real values the
        workers need.
        """
        if self._inactive():
            return
        import yaml

        text = yaml.safe_dump(redact(config), sort_keys=False, allow_unicode=True)
        self.log_text(text, artifact_file)

    def log_dataset_lineage(self, manifest: DatasetManifest, context: str = "train") -> None:
        """Record a prepared dataset as the run's dataset input, and its manifest.json (secrets
        redacted) as an artifact.

        The dataset digest is the sha256 of the tokenizer's sha256 followed by every shard's
        sha256 (in manifest order), so a change of tokenizer or of any shard changes it.

        Args:
            manifest: the dataset's manifest, as read (``location`` is its manifest.json).
            context: dataset role shown in MLflow ("train", "eval", ...).
        """
        if self._inactive():
            return
        try:
            dataset = dataset_entity(manifest)
        except ValueError as exc:
            log.warning("tracking: dataset lineage not logged: %s", exc)
            return

        def send(client: Any, run_id: str) -> None:
            from mlflow.entities import DatasetInput, InputTag

            tags = [InputTag("mlflow.data.context", context)]
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])

        self._worker.put_op(f"dataset {manifest.location}", send)
        # redacted (log_dict): the sources it names may be URLs with credentials in them
        self.log_dict(manifest.to_dict(), f"datasets/{context}/manifest.json")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is delivered, at most `timeout` (default close_timeout_s).

        Returns:
            True if nothing is left undelivered (always True when disabled).
        """
        if self._inactive():
            return True
        return self._worker.flush(self.cfg.close_timeout_s if timeout is None else timeout)

    def close(self, status: RunStatus = "FINISHED", timeout: float | None = None) -> bool:
        """Deliver what is queued and end the run with `status`, waiting at most `timeout`.

        `status="RUNNING"` delivers and stops the thread but leaves the run open, for a
        training process whose launcher re-attaches afterwards.

        Returns:
            True if everything was delivered and the run ended; False if it gave up (a warning
            says how many records were lost). Safe to call twice.
        """
        if self._inactive():
            return True
        self._closed = True
        return self._worker.stop(status, self.cfg.close_timeout_s if timeout is None else timeout)

    @property
    def dropped(self) -> int:
        """Metric values dropped because the queue was full."""
        return 0 if self._worker is None else self._worker.dropped

    def pending(self) -> int:
        """Records queued and not yet delivered."""
        return 0 if self._worker is None else self._worker.pending()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _inactive(self) -> bool:
        return self._worker is None or self._closed

    @staticmethod
    def _key_ok(key: str, kind: str) -> bool:
        if VALID_MLFLOW_KEY.match(key):
            return True
        log.warning("tracking: %s key %r is not valid in MLflow (letters, digits, _-. /:); "
                    "skipped", kind, key)
        return False

