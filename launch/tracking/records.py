"""How each kind of tracking record is built: params, dataset lineage, system metrics.

Used by tracking/tracker.py. MLflow is imported inside the functions, so importing this module
(and with it the config) stays cheap on ranks that never track.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.launch.tracking.errors import is_permanent
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

log = logging.getLogger("lmforge.launch.tracking")

_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (MLflow >= 2.x)


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts into dotted keys with string values, as MLflow stores params.

    Args:
        params: possibly nested mapping, e.g. a resolved config as a dict.
        prefix: prepended to every key (used for recursion).

    Returns:
        `{"model.n_layers": "12", ...}`; values longer than MLflow's limit are cut and end
        in "..." (the full config is logged as an artifact anyway).
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > _MAX_PARAM_VALUE:
            text = text[: _MAX_PARAM_VALUE - 3] + "..."
        flat[name] = text
    return flat


def params_operation(params: list[tuple[str, str]]) -> Callable[[Any, str], None]:
    """Operation logging up to 100 params; on a conflict logs the others one by one.

    MLflow refuses a whole batch if one param was logged before with another value (e.g. a
    resumed run with a changed override), so the rest are still recorded and only the
    conflicting keys are reported.
    """

    from mlflow.entities import Param

    def send(client: Any, run_id: str) -> None:
        entities = [Param(k, v) for k, v in params]
        try:
            client.log_batch(run_id, params=entities)
            return
        except Exception as exc:
            if not is_permanent(exc):
                raise
        refused: list[str] = []
        for entity in entities:
            try:
                client.log_batch(run_id, params=[entity])
            except Exception as exc:
                if not is_permanent(exc):
                    raise
                refused.append(entity.key)
        log.warning(
            "tracking: MLflow kept the earlier value of param(s) %s: a run's params cannot "
            "change once logged", ", ".join(refused),
        )

    return send



def dataset_entity(manifest: DatasetManifest) -> Any:
    """The `mlflow.entities.Dataset` describing a prepared dataset (see log_dataset_lineage).

    The digest is sha256(tokenizer sha256 + every shard's sha256, in manifest order); the
    profile holds shard/sample/token counts per "<dataset>/<split>".

    Raises:
        ValueError: the manifest lists a shard without a checksum.
    """
    from mlflow.entities import Dataset

    shards = [
        (f"{name}/{split}", shard)
        for name, dataset in manifest.datasets.items()
        for split, part in dataset.splits.items()
        for shard in part.shards
    ]
    if not shards or any(not shard.sha256 for _, shard in shards):
        raise ValueError(f"{manifest.location}: shards without a sha256; re-run `lmforge prepare`")
    digest = hashlib.sha256(manifest.tokenizer.sha256.encode())
    groups: dict[str, dict[str, int]] = {}
    for group, shard in shards:
        digest.update(shard.sha256.encode())
        totals = groups.setdefault(group, {"shards": 0, "samples": 0, "tokens": 0})
        totals["shards"] += 1
        totals["samples"] += shard.samples
        totals["tokens"] += shard.tokens
    profile = {
        **{key: sum(g[key] for g in groups.values()) for key in ("shards", "samples", "tokens")},
        "splits": groups,
        "tokenizer_sha256": manifest.tokenizer.sha256,
        "digest_sha256": digest.hexdigest(),
    }
    location = manifest.location
    uri = location if "://" in location else Path(location).resolve().as_uri()
    return Dataset(
        name=Path(manifest.folder).name,
        digest=digest.hexdigest()[:32],  # MLflow stores at most 36 characters
        source_type="local",
        source=json.dumps({"uri": uri}),
        profile=json.dumps(profile),
    )


class SystemSampler:
    """Samples host metrics with MLflow's own monitors, under the names MLflow's UI expects.

    Used instead of `start_run(log_system_metrics=True)` because MLflow's monitor thread stops
    for good at its first failed request; here the values join the same retrying queue.
    """

    def __init__(self) -> None:
        import psutil
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA GPU or no pynvml: CPU-only sampling
            pass
        self.process = psutil.Process()
        psutil.cpu_percent()  # the first reading is meaningless; start the interval now

    def __call__(self) -> dict[str, float]:
        """One sample: {"system/<name>": value}."""
        values: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        values["process_rss_megabytes"] = self.process.memory_info().rss / 1e6
        return {f"system/{key}": float(value) for key, value in values.items()}
