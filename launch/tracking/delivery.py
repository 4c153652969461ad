"""Background delivery of tracking records to MLflow, used by `tracking/tracker.py`.

One daemon thread owns the `MlflowClient`. Callers only append to in-memory queues, so a slow
or dead tracking server costs the training loop nothing: the thread creates (or re-attaches to)
the run once the store answers, sends queued records in batches, and backs off between failed
attempts. Nothing here raises into the caller.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from lmforge.launch.redact import redact_text
from lmforge.launch.tracking.errors import is_permanent, short_reason

log = logging.getLogger("lmforge.launch.tracking")

RUN_KEY_TAG = "lmforge.run_key"
"""Run tag holding the id lmforge generated itself, so a run created late can still be found."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""Experiments lmforge creates are model-training ones: the MLflow UI opens them in its
training view (not the GenAI view)."""
PENDING_PREFIX = "lmforge-pending-"
"""Prefix of the handle `Tracker.start` returns while the run does not exist yet."""

_FIRST_BACKOFF_S = 1.0
# While someone waits in flush()/close(), retry often so a server coming back is noticed.
_FLUSH_RETRY_S = 0.5

MetricRecord = tuple[str, float, int, int]
"""(key, value, timestamp in ms, step): what callers enqueue; converted to `Metric` here."""
Operation = Callable[[MlflowClient, str], None]
"""A queued non-metric record: called with the client and the run id once the run exists."""


@dataclass
class RunTarget:
    """Which MLflow run the worker should create or re-attach to."""

    experiment: str
    artifact_location: str | None
    run_name: str | None
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    """An existing MLflow run id to re-attach to."""
    run_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Stored as the RUN_KEY_TAG tag; a pending handle carries it to other processes."""
    search_key: bool = False
    """Look for an existing run with run_key first (the handle came from another process)."""


class DeliveryThread(threading.Thread):
    """Owns the MLflow client; delivers queued metrics and operations with retry and backoff.

    Args:
        uri: MLflow tracking URI.
        target: the run to create or re-attach to.
        flush_interval_s: seconds between deliveries when nobody asks for a flush.
        max_queue: metric values kept while the store is unreachable; the oldest go first.
        retry_max_s: ceiling of the exponential backoff between failed deliveries.
        sample_system: optional callable returning system metrics, called every
            `system_interval_s` seconds on this thread.
        system_interval_s: seconds between system metric samples.
    """

    def __init__(
        self,
        uri: str,
        target: RunTarget,
        *,
        flush_interval_s: float,
        max_queue: int,
        retry_max_s: float,
        sample_system: Callable[[], dict[str, float]] | None = None,
        system_interval_s: float = 10.0,
    ) -> None:
        super().__init__(name="lmforge-tracking", daemon=True)
        self.uri = uri
        self.shown_uri = redact_text(uri)  # what warnings print: no credentials
        self.target = target
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.retry_max_s = retry_max_s
        self.sample_system = sample_system
        self.system_interval_s = system_interval_s
        self.run_id: str | None = None
        self.run_ready = threading.Event()
        self.first_attempt_done = threading.Event()
        """Set once the first delivery attempt succeeded or failed (start() waits for it)."""
        self.dropped = 0
        self.last_step = 0
        self._metrics: deque[MetricRecord] = deque()
        self._ops: deque[tuple[str, Operation]] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._wake.set()  # first attempt right away, so start() learns the outcome quickly
        self._waiters = 0
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._failing = False
        self._backoff_s = 0.0
        self._next_system_sample = time.monotonic()
        self._terminal_status: str | None = None
        self._abandon = False

    # ---- called from the training thread -------------------------------------------------
    def put_metrics(self, records: list[MetricRecord], step: int) -> None:
        """Queue metric records; drops the oldest beyond `max_queue` (counted, warned once)."""
        with self._lock:
            self.last_step = step
            self._metrics.extend(records)
            self._trim_locked()

    def put_op(self, description: str, op: Operation) -> None:
        """Queue a non-metric record (params, tags, artifacts); sent before queued metrics."""
        with self._lock:
            self._ops.append((description, op))
        self._wake.set()

    def pending(self) -> int:
        """Records not yet delivered (metric values + operations, including in flight)."""
        with self._lock:
            return len(self._metrics) + len(self._ops) + self._in_flight

    def flush(self, timeout: float) -> bool:
        """Wake the thread and wait until everything queued so far is delivered.

        Returns:
            True if the queues drained within `timeout` seconds.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            self._waiters += 1
            try:
                self._wake.set()
                while self._pending_locked() and self.is_alive():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._done.wait(min(remaining, _FLUSH_RETRY_S))
                    self._wake.set()
                return not self._pending_locked()
            finally:
                self._waiters -= 1

    def stop(self, status: str, timeout: float) -> bool:
        """Deliver what is queued, end the run with `status`, and stop; waits at most `timeout`.

        Returns:
            True if everything was delivered and the run was ended.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        delivered = self.flush(timeout)
        with self._lock:
            self._terminal_status = status
        self._wake.set()
        self.join(max(deadline - time.monotonic(), 0.0))
        if self.is_alive():
            # Out of time: give up on the rest; the thread exits at its next wake-up.
            self._abandon = True
            self._wake.set()
            left = self.pending()
            log.warning(
                "tracking: gave up after %.0f s with %d record(s) not delivered to %s",
                timeout, left, self.shown_uri,
            )
            return False
        return delivered and self._terminal_status is None

    # ---- the delivery thread --------------------------------------------------------------
    def run(self) -> None:
        while not self._abandon:
            self._wake.wait(timeout=self._wait_s())
            self._wake.clear()
            if self._abandon:
                break
            self._maybe_sample_system()
            ok = self._deliver()
            self.first_attempt_done.set()
            with self._lock:
                self._done.notify_all()
                finishing = ok and self._terminal_status is not None
                finishing = finishing and not self._pending_locked()
            if finishing and self._terminate():
                break

    def _wait_s(self) -> float:
        wait = self.flush_interval_s
        if self._failing:
            wait = min(self._backoff_s, _FLUSH_RETRY_S) if self._waiters else self._backoff_s
        if self.sample_system is not None:
            wait = min(wait, max(self._next_system_sample - time.monotonic(), 0.0))
        return wait

    def _deliver(self) -> bool:
        try:
            self._ensure_run()
            self._send_ops()
            self._send_metrics()
        except Exception as exc:  # any failure is retried later; training must not notice
            self._on_failure(exc)
            return False
        if self._failing:
            log.warning("tracking: MLflow at %s is reachable again; queued records sent",
                        self.shown_uri)
            if self.dropped:
                log.warning("tracking: %d metric value(s) were dropped while it was away",
                            self.dropped)
        self._failing = False
        self._backoff_s = 0.0
        return True

    def _on_failure(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning(
                "tracking: MLflow at %s is unreachable (%s); training continues, records stay "
                "queued (up to %d metric values) and are retried in the background",
                self.shown_uri, short_reason(exc), self.max_queue,
            )
        else:
            log.debug("tracking: delivery failed again: %s", short_reason(exc))
        self._failing = True
        self._backoff_s = min(max(self._backoff_s * 2, _FIRST_BACKOFF_S), self.retry_max_s)

    def _ensure_run(self) -> None:
        if self.run_ready.is_set():
            return
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        client, target = self._client, self.target
        run_id = target.run_id
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("tracking: run %s does not exist at %s; starting a new run",
                            run_id, self.shown_uri)
                run_id = None
        if run_id is None:
            experiment_id = self._ensure_experiment(client)
            if target.search_key:
                found = client.search_runs(
                    [experiment_id], f"tags.`{RUN_KEY_TAG}` = '{target.run_key}'", max_results=1
                )
                if found:
                    run_id = found[0].info.run_id
                    client.update_run(run_id, status="RUNNING")
            if run_id is None:
                tags = {**target.tags, RUN_KEY_TAG: target.run_key}
                run = client.create_run(experiment_id, run_name=target.run_name, tags=tags)
                run_id = run.info.run_id
        self.run_id = run_id
        self.run_ready.set()

    def _ensure_experiment(self, client: MlflowClient) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        name = self.target.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self._experiment_id = client.create_experiment(
                    name, artifact_location=self.target.artifact_location,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
                return self._experiment_id
            except MlflowException as exc:
                # Another process created it between our lookup and create.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            log.warning("tracking: experiment '%s' was deleted at %s; restoring it", name,
                        self.shown_uri)
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):  # made by someone else
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                      EXPERIMENT_KIND)
        self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _send_ops(self) -> None:
        assert self._client is not None and self.run_id is not None
        while True:
            with self._lock:
                if not self._ops:
                    return
                description, op = self._ops[0]
            try:
                op(self._client, self.run_id)
            except Exception as exc:
                if not is_permanent(exc):
                    raise
                log.warning("tracking: dropped %s: %s", description, short_reason(exc))
            with self._lock:
                self._ops.popleft()

    def _send_metrics(self) -> None:
        assert self._client is not None and self.run_id is not None
        while True:
            with self._lock:
                if not self._metrics:
                    return
                count = min(len(self._metrics), MAX_METRICS_PER_BATCH)
                batch = [self._metrics.popleft() for _ in range(count)]
                self._in_flight = count
            try:
                self._client.log_batch(
                    self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch]
                )
            except Exception as exc:
                if is_permanent(exc):
                    log.warning("tracking: dropped %d metric value(s): %s", count,
                                short_reason(exc))
                    continue
                with self._lock:
                    self._metrics.extendleft(reversed(batch))
                    self._trim_locked()
                raise
            finally:
                with self._lock:
                    self._in_flight = 0

    def _terminate(self) -> bool:
        assert self._client is not None and self.run_id is not None
        try:
            if self._terminal_status != "RUNNING":  # RUNNING: detach, the run stays open
                self._client.set_terminated(self.run_id, status=self._terminal_status)
        except Exception as exc:
            self._on_failure(exc)
            return False
        self._terminal_status = None
        return True

    def _maybe_sample_system(self) -> None:
        if self.sample_system is None or time.monotonic() < self._next_system_sample:
            return
        self._next_system_sample = time.monotonic() + self.system_interval_s
        try:
            values = self.sample_system()
        except Exception as exc:  # a broken sensor must not stop metric delivery
            log.warning("tracking: system metrics disabled: %s", short_reason(exc))
            self.sample_system = None
            return
        now_ms = int(time.time() * 1000)
        self.put_metrics([(k, float(v), now_ms, self.last_step) for k, v in values.items()],
                         self.last_step)

    # ---- helpers (hold self._lock) ---------------------------------------------------------
    def _pending_locked(self) -> bool:
        return bool(self._metrics or self._ops or self._in_flight)

    def _trim_locked(self) -> None:
        overflow = len(self._metrics) - self.max_queue
        if overflow <= 0:
            return
        for _ in range(overflow):
            self._metrics.popleft()
        if not self.dropped:
            log.warning(
                "tracking: metric queue full (max_queue=%d); dropping the oldest values until "
                "MLflow at %s answers again", self.max_queue, self.shown_uri,
            )
        self.dropped += overflow

