"""Tracker against real MLflow: the sqlite default in a run dir, and a real `mlflow server`
that is killed and restarted mid-run. No mocks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer, free_port

from lmforge.launch.config import TrackingConfig
from lmforge.launch.tracking import Tracker
from lmforge.launch.tracking.records import flatten_params
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

# Small delivery interval so tests see records quickly; no system metrics unless tested.
FAST = {"flush_interval_s": 0.2, "system_metrics": False, "retry_max_s": 1.0, "timeout_s": 5.0}


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of a metric's full history."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("uri", ""),
        ("uri", "mlruns"),
        ("experiment", " "),
        ("tags", {"bad key!": "x"}),
        ("max_queue", 0),
        ("flush_interval_s", 0.0),
        ("timeout_s", -1.0),
        ("retry_max_s", 0.0),
        ("system_metrics_interval_s", 0.0),
        ("close_timeout_s", -1.0),
        ("start_timeout_s", -0.5),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        TrackingConfig(**{field: value})


def test_flatten_params_dots_nested_keys_and_cuts_long_values() -> None:
    flat = flatten_params({"model": {"n_layers": 2, "rope": {"theta": 1e4}}, "paths": ["a", "b"],
                           "name": "x" * 7000, "empty": {}, "none": None})
    assert flat["model.n_layers"] == "2"
    assert flat["model.rope.theta"] == "10000.0"
    assert flat["paths"] == '["a", "b"]'
    assert flat["empty"] == "{}" and flat["none"] == "null"
    assert len(flat["name"]) == 6000 and flat["name"].endswith("...")


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = Tracker.disabled()
    assert tracker.start(run_name="x") == ""
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_text("t", "t.txt")
    assert tracker.run_id is None and tracker.pending() == 0
    assert tracker.flush() and tracker.close()
    off = Tracker(TrackingConfig(enabled=False), tmp_path)
    assert off.start(run_id="abc") == "abc"
    assert list(tmp_path.iterdir()) == []


def test_sqlite_default_records_params_metrics_artifacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    (tmp_path / "notes.txt").write_text("hello")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"\0" * 1000)
    cfg = TrackingConfig(run_name="walking-skeleton", tags={"team": "nlp"}, **FAST)
    with Tracker(cfg, run_dir) as tracker:
        run_id = tracker.start(tags={"stage": "pretrain"})
        assert tracker.run_id == run_id and len(run_id) == 32
        tracker.log_params({"model": {"n_layers": 2, "d_model": 64}, "train": {"lr": 3e-4}})
        for step in range(1, 41):
            if step % 5 == 0:
                tracker.log_metrics({"loss": 10.0 / step, "lr": 1e-3 * step}, step)
        tracker.set_tags({"checkpoint": str(run_dir / "ckpt")})
        tracker.log_artifact(tmp_path / "notes.txt", "docs")
        tracker.log_artifacts(export, "export")
        tracker.log_text("summary", "summary.txt")
        tracker.log_dict({"model": {"n_layers": 2}}, "config.json")
        assert tracker.flush(timeout=60)

    assert (run_dir / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "walking-skeleton"
    assert client.get_experiment(run.info.experiment_id).name == "lmforge"
    assert run.data.params == {"model.n_layers": "2", "model.d_model": "64", "train.lr": "0.0003"}
    assert run.data.tags["team"] == "nlp" and run.data.tags["stage"] == "pretrain"
    assert run.data.tags["checkpoint"] == str(run_dir / "ckpt")
    assert history(client, run_id, "loss") == {s: 10.0 / s for s in range(5, 41, 5)}
    assert history(client, run_id, "lr") == pytest.approx({s: 1e-3 * s for s in range(5, 41, 5)})
    # Artifacts are files under the run dir, not next to the current directory.
    artifacts = run_dir / "mlartifacts" / run_id / "artifacts"
    assert (artifacts / "docs" / "notes.txt").read_text() == "hello"
    assert (artifacts / "summary.txt").read_text() == "summary"
    assert (artifacts / "export" / "model.safetensors").read_bytes() == b"\0" * 1000
    assert (artifacts / "export" / "config.json").read_text() == "{}"
    assert json.loads((artifacts / "config.json").read_text()) == {"model": {"n_layers": 2}}
    assert "View run" not in capsys.readouterr().out


def test_system_metrics_are_sampled(tmp_path: Path) -> None:
    cfg = TrackingConfig(**{**FAST, "system_metrics": True, "system_metrics_interval_s": 0.2})
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start()
    tracker.log_metrics({"loss": 1.0}, step=7)
    time.sleep(1.0)
    assert tracker.close(timeout=60)
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert run.data.metrics["system/process_rss_megabytes"] > 10
    assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100


def test_bad_keys_and_values_are_skipped_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker(TrackingConfig(**FAST), tmp_path)
    run_id = tracker.start()
    with caplog.at_level(logging.WARNING, logger="lmforge.launch.tracking"):
        tracker.log_metrics({"loss": 2.0, "bad key!": 1.0, "acc": "n/a"}, step=3)  # type: ignore[dict-item]
        tracker.log_artifact(tmp_path / "missing.bin")
    assert tracker.close(timeout=60)
    assert MlflowClient(tracker.tracking_uri).get_run(run_id).data.metrics == {"loss": 2.0}
    assert "'bad key!'" in caplog.text and "'acc'" in caplog.text and "missing.bin" in caplog.text


REATTACH = textwrap.dedent(
    """
    import sys
    from lmforge.launch.config import TrackingConfig
    from lmforge.launch.tracking import Tracker
    run_dir, run_id = sys.argv[1], sys.argv[2]
    cfg = TrackingConfig(flush_interval_s=0.2, system_metrics_interval_s=0.2)
    tracker = Tracker(cfg, run_dir)
    assert tracker.start(run_id=run_id) == run_id
    tracker.log_params({"train": {"world_size": 2}})
    for step in range(10):
        tracker.log_metrics({"loss": 100.0 - step}, step)
    assert tracker.close("RUNNING", timeout=60)  # the launcher ends the run later
    """
)


def test_launcher_and_training_process_share_one_sqlite_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The launcher keeps its tracker open (and writing) while the training process, handed
    # the run id, re-attaches to the same sqlite file; then the launcher logs the export.
    launcher = Tracker(TrackingConfig(**FAST), tmp_path)
    run_id = launcher.start(run_name="launch", system_metrics=False)
    launcher.log_params({"data": {"seq_len": 128}, "lr": 0.1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    training = subprocess.Popen([sys.executable, "-c", REATTACH, str(tmp_path), run_id], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    beat = 0
    while training.poll() is None:
        launcher.log_metrics({"launcher/heartbeat": float(beat)}, beat)
        beat += 1
        time.sleep(0.05)
    assert training.returncode == 0, training.communicate()[1]

    client = MlflowClient(launcher.tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    # A changed param is refused by MLflow but must not take the rest of its batch with it.
    with caplog.at_level(logging.WARNING, logger="lmforge.launch.tracking"):
        launcher.log_params({"lr": 0.2, "export": {"format": "hf"}})
        launcher.set_tags({"export_dir": "/runs/x/export"})
        assert launcher.close("FINISHED", timeout=60)
    assert "earlier value of param(s) lr:" in caplog.text

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"data.seq_len": "128", "lr": "0.1", "train.world_size": "2",
                               "export.format": "hf"}
    assert run.data.tags["export_dir"] == "/runs/x/export"
    assert history(client, run_id, "loss") == {s: 100.0 - s for s in range(10)}
    assert history(client, run_id, "launcher/heartbeat") == {s: float(s) for s in range(beat)}
    assert "system/cpu_utilization_percentage" in run.data.metrics  # from the training process
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_pending_handle_finds_the_run_created_with_it(tmp_path: Path) -> None:
    handle = "lmforge-pending-" + "ab" * 16
    first = Tracker(TrackingConfig(**FAST), tmp_path)
    assert first.start(run_id=handle) != handle  # created at once: sqlite is reachable
    first.log_metrics({"loss": 1.0}, step=1)
    assert first.close(timeout=60)
    second = Tracker(TrackingConfig(**FAST), tmp_path)
    assert second.start(run_id=handle) == first_run_id(first, tmp_path)
    second.log_metrics({"loss": 0.5}, step=2)
    assert second.close(timeout=60)
    client = MlflowClient(second.tracking_uri)
    assert history(client, first_run_id(first, tmp_path), "loss") == {1: 1.0, 2: 0.5}


def first_run_id(tracker: Tracker, run_dir: Path) -> str:
    """The only run in the run dir's store."""
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert len(runs) == 1
    return runs[0].info.run_id


def shard(path: str, samples: int, sha: str) -> dict[str, object]:
    """A manifest shard entry; ``sha`` repeated to 64 characters ("" for none)."""
    return {"path": path, "samples": samples, "tokens": samples * 1000, "bytes": samples * 4096,
            "sha256": sha * 64}


def manifest_json(splits: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    """A complete manifest.json of one dataset, "shakespeare", with these shards."""
    tokenizer = {"file": "tokenizer.model", "sha256": "t" * 64, "vocab_size": 8192,
                 "type": "bpe", "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
                 "special_tokens": {"extra": []}, "byte_fallback": True}
    parts = {
        name: {"samples": sum(s["samples"] for s in shards),
               "tokens": sum(s["tokens"] for s in shards), "padding_tokens": 0, "shards": shards}
        for name, shards in splits.items()
    }
    return {"version": 1, "seq_len": 1023, "token_dtype": "uint16", "tokenizer": tokenizer,
            "datasets": {"shakespeare": {"weight": 1.0, "sources": [], "splits": parts}},
            "fingerprint": "f" * 64, "stats": {}}


def log_lineage(manifest: dict, path: Path, run_dir: Path) -> tuple[Tracker, str, Path]:
    """Writes ``manifest`` to ``path``, logs it as a run's training dataset (sqlite store in
    ``run_dir``); returns the tracker, the run id and the logged manifest.json artifact."""
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    tracker = Tracker(TrackingConfig(**FAST), run_dir)
    run_id = tracker.start()
    tracker.log_dataset_lineage(DatasetManifest.read(path), context="train")
    assert tracker.close(timeout=60)
    return tracker, run_id, run_dir / "mlartifacts" / run_id / "artifacts" / "datasets" / \
        "train" / "manifest.json"


def test_dataset_lineage_digest_covers_tokenizer_and_shards(tmp_path: Path) -> None:
    # The layout pipeline/prepare/manifest_writer.py writes: datasets -> splits -> shards.
    manifest = manifest_json({
        "train": [shard("s/train-000000.tar", 3, "a"), shard("s/train-000001.tar", 2, "b")],
        "val": [shard("s/val-000000.tar", 1, "c")],
    })
    path = tmp_path / "tinyshakespeare" / "manifest.json"
    tracker, run_id, logged = log_lineage(manifest, path, tmp_path / "run")

    import hashlib

    expected = hashlib.sha256(("t" * 64 + "a" * 64 + "b" * 64 + "c" * 64).encode()).hexdigest()
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "tinyshakespeare"
    assert dataset_input.dataset.digest == expected[:32]
    assert json.loads(dataset_input.dataset.source) == {"uri": path.resolve().as_uri()}
    profile = json.loads(dataset_input.dataset.profile)
    assert (profile["shards"], profile["samples"], profile["tokens"]) == (3, 6, 6000)
    assert profile["splits"]["shakespeare/val"] == {"shards": 1, "samples": 1, "tokens": 1000}
    assert profile["digest_sha256"] == expected
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "train"}
    assert json.loads(logged.read_text()) == manifest


def test_logged_manifest_hides_credentials_in_its_source_urls(tmp_path: Path) -> None:
    """manifest.json names the sources; a signed URL or a password in one stays on disk only."""
    manifest = manifest_json({"train": [shard("s/train-000000.tar", 3, "a")]})
    manifest["datasets"]["shakespeare"]["sources"] = [
        "https://bucket.s3.amazonaws.com/c.jsonl?X-Amz-Signature=SEKRIT1&X-Amz-Date=20261206",
        "https://ann:SEKRIT2@data.example.com/d.txt"]
    _, _, artifact = log_lineage(manifest, tmp_path / "ds" / "manifest.json", tmp_path / "run")
    logged = artifact.read_text()
    assert "SEKRIT" not in logged
    assert json.loads(logged)["datasets"]["shakespeare"]["sources"] == [
        "https://bucket.s3.amazonaws.com/c.jsonl?X-Amz-Signature=***&X-Amz-Date=20261206",
        "https://ann:***@data.example.com/d.txt"]


def test_dataset_lineage_without_checksums_warns_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_json({"train": [shard("train-000000.tar", 1, "a")]})))
    # A manifest.json without a shard's sha256 is refused when read (issue 21); a manifest
    # object built without one must still not stop tracking.
    manifest = DatasetManifest.read(path)
    shards = manifest.datasets["shakespeare"].splits["train"].shards
    shards[0] = dataclasses.replace(shards[0], sha256="")
    tracker = Tracker(TrackingConfig(**FAST), tmp_path / "run")
    run_id = tracker.start()
    with caplog.at_level(logging.WARNING, logger="lmforge.launch.tracking"):
        tracker.log_dataset_lineage(manifest)
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.close(timeout=60)
    assert "shards without a sha256" in caplog.text
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert run.inputs.dataset_inputs == [] and run.data.metrics == {"loss": 1.0}


def test_unreachable_server_queue_is_bounded_and_calls_do_not_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", max_queue=50, **FAST)
    tracker = Tracker(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmforge.launch.tracking"):
        handle = tracker.start()
        assert handle.startswith("lmforge-pending-") and tracker.run_id is None
        slowest = 0.0
        for step in range(100):
            began = time.perf_counter()
            tracker.log_metrics({"loss": float(step)}, step)
            slowest = max(slowest, time.perf_counter() - began)
        time.sleep(1.5)  # a few retries happen meanwhile
        assert not tracker.close(timeout=1.0)
    assert slowest < 0.5
    assert tracker.dropped == 50
    assert caplog.text.count("unreachable (connection refused)") == 1  # warned once, not per retry
    assert caplog.text.count("queue full") == 1
    assert "Traceback" not in caplog.text


# ---- against a real `mlflow server` --------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real server for the module; tests that stop it start it again before returning."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def train_steps(tracker: Tracker, steps: range, timings: list[float]) -> None:
    """A stand-in training loop: a little work per step, metrics every step."""
    for step in steps:
        time.sleep(0.01)
        began = time.perf_counter()
        tracker.log_metrics({"loss": 1000.0 - step, "lr": step / 100}, step)
        timings.append(time.perf_counter() - began)


@pytest.mark.slow
def test_server_receives_params_metrics_and_artifacts(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrackingConfig(uri=mlflow_server.uri, experiment="server-basic", **FAST)
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start(run_name="basic")
    assert len(run_id) == 32
    tracker.log_params({"model": {"d_model": 64}})
    train_steps(tracker, range(30), [])
    tracker.log_text("proxied", "notes.txt")
    assert tracker.close(timeout=60)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.d_model": "64"}
    assert history(client, run_id, "loss") == {s: 1000.0 - s for s in range(30)}
    (stored,) = (mlflow_server.root / "artifacts").rglob("notes.txt")  # proxied upload
    assert stored.read_text() == "proxied"
    assert [a.path for a in client.list_artifacts(run_id)] == ["notes.txt"]
    assert not (tmp_path / "mlflow.db").exists()  # a server URI keeps nothing in the run dir
    assert "View run" not in capsys.readouterr().out  # MLflow's per-run banner is off


@pytest.mark.slow
def test_frozen_server_does_not_block_logging(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # SIGSTOP: the port still accepts connections but nothing answers, the slow-server case
    # that would otherwise hang a caller for MLflow's default 120 s timeout and 7 retries.
    cfg = TrackingConfig(uri=mlflow_server.uri, experiment="server-frozen",
                         **{**FAST, "timeout_s": 1.0})
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start()
    timings: list[float] = []
    train_steps(tracker, range(10), timings)
    assert tracker.flush(timeout=60)
    assert mlflow_server.process is not None
    os.killpg(mlflow_server.process.pid, signal.SIGSTOP)
    try:
        train_steps(tracker, range(10, 60), timings)
        assert not tracker.flush(timeout=1.5)
    finally:
        os.killpg(mlflow_server.process.pid, signal.SIGCONT)
    assert tracker.close(timeout=60)
    assert max(timings) < 0.5
    client = MlflowClient(mlflow_server.uri)
    assert history(client, run_id, "loss") == {s: 1000.0 - s for s in range(60)}


@pytest.mark.slow
def test_server_killed_mid_run_gets_queued_metrics_after_restart(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TrackingConfig(uri=mlflow_server.uri, experiment="server-killed", **FAST)
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start(run_name="survivor")
    timings: list[float] = []
    train_steps(tracker, range(20), timings)
    assert tracker.flush(timeout=60)
    with caplog.at_level(logging.WARNING, logger="lmforge.launch.tracking"):
        mlflow_server.stop()
        train_steps(tracker, range(20, 80), timings)  # training goes on while it is down
        time.sleep(1.0)
        assert tracker.pending() > 0
        mlflow_server.start()
        assert tracker.flush(timeout=90)
    assert tracker.close(timeout=60)
    assert max(timings) < 0.5
    assert caplog.text.count("unreachable") == 1 and "reachable again" in caplog.text
    client = MlflowClient(mlflow_server.uri)
    assert history(client, run_id, "loss") == {s: 1000.0 - s for s in range(80)}
    assert history(client, run_id, "lr") == pytest.approx({s: s / 100 for s in range(80)})
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_server_down_at_start_run_created_when_it_comes_up(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "server")
    cfg = TrackingConfig(uri=server.uri, experiment="late-server", **FAST)
    tracker = Tracker(cfg, tmp_path / "run")
    began = time.perf_counter()
    handle = tracker.start(run_name="early-bird", tags={"stage": "pretrain"})
    assert time.perf_counter() - began < cfg.start_timeout_s
    assert handle.startswith("lmforge-pending-") and tracker.run_id is None
    tracker.log_params({"lr": 0.1})
    timings: list[float] = []
    train_steps(tracker, range(25), timings)
    with server:
        assert tracker.flush(timeout=90)
        run_id = tracker.run_id
        assert run_id is not None and len(run_id) == 32
        assert tracker.close(timeout=60)
        # A second process handed the pending handle finds the same run instead of a new one.
        later = Tracker(cfg, tmp_path / "run")
        assert later.start(run_id=handle) == run_id
        later.log_metrics({"loss": -1.0}, step=25)
        assert later.close(timeout=60)
        client = MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.run_name == "early-bird" and run.data.tags["stage"] == "pretrain"
        assert run.data.params == {"lr": "0.1"}
        expected = {s: 1000.0 - s for s in range(25)} | {25: -1.0}
        assert history(client, run_id, "loss") == expected
        assert len(client.search_runs([run.info.experiment_id])) == 1
    assert max(timings) < 0.5
