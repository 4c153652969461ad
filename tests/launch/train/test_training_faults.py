"""Faults during a real `lmforge train` (2 DeepSpeed processes on gloo, tiny shards).

- The MLflow server is killed mid-run and started again: training finishes, every metric
  step reaches the server (compared with the run's metrics.jsonl), the run is FINISHED.
- A shard whose bytes no longer match the manifest's sha256, with `data.loader.strict:
  false`: checksums are verified by default, the shard is skipped, and the skipped rows and
  the shard's name land in metrics.jsonl, train_summary.json and MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from engine_helpers import finish, shard_fixtures, train
from mlflow import MlflowClient
from mlflow_server import MlflowServer

pytestmark = pytest.mark.slow
STEPS = 150

CONFIG = """\
name: faults
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train:
  micro_batch_size: 4
  log_every: 1
  eval_every: 0
  warmup_steps: 2
  checkpoint_every: 1000
tracking: {{flush_interval_s: 0.5, retry_max_s: 1.0, timeout_s: 2.0, close_timeout_s: 240,
           system_metrics: false}}
"""


@pytest.fixture
def config(tmp_path) -> tuple[Path, object]:
    shards = shard_fixtures().write_shards(
        tmp_path / "data", {"d": {"train": [64, 64, 64], "val": [16]}}, seq_len=32
    )
    path = tmp_path / "faults.yaml"
    path.write_text(CONFIG.format(data=tmp_path / "data"))
    return path, shards


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in metric_lines(run_dir)):
            return
        if proc.poll() is not None:  # ended: its last lines may have landed meanwhile
            assert any(r.get("step", 0) >= step for r in metric_lines(run_dir)), step
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {run_dir}/metrics.jsonl after {timeout} s")


def test_mlflow_server_killed_and_restarted_during_training(config, tmp_path):
    path, _ = config
    run_dir = tmp_path / "run"
    with MlflowServer(tmp_path / "mlflow") as server:
        proc = train(path, run_dir, f"--tracking.uri={server.uri}",
                     f"--train.max_steps={STEPS}")
        wait_for_step(run_dir, 5, proc)
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGKILL)  # the server and its worker, at once
        server.stop()  # reaps them
        down_at = max(r["step"] for r in metric_lines(run_dir))
        assert down_at < STEPS
        wait_for_step(run_dir, min(down_at + 10, STEPS), proc)  # training goes on meanwhile
        server.start()
        out = finish(proc)
        assert "unreachable" in out and "reachable again" in out, out[-3000:]
        expected = {r["step"]: r["train/loss"] for r in metric_lines(run_dir)
                    if "train/loss" in r}
        assert sorted(expected) == list(range(1, STEPS + 1))
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                       "train/loss")}
        assert history == pytest.approx(expected, rel=0, abs=0)
        assert run.info.status == "FINISHED"


def test_lenient_loader_counts_and_names_a_corrupt_shard(config, tmp_path):
    path, shards = config
    bad = shards.shards["d/train"][1]
    data = bytearray(bad.read_bytes())
    data[-2000] ^= 1  # one token bit: a valid tar, only the checksum can tell
    bad.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    out = finish(train(path, run_dir, "--train.max_steps=20", "--data.loader.strict=false"))
    assert f"skipped unreadable shard(s) {bad}" in out, out[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert list(summary["skipped_shards"]) == [str(bad)]
    assert "sha256 does not match" in summary["skipped_shards"][str(bad)]
    assert summary["skipped_samples"] > 0
    last = [r for r in metric_lines(run_dir) if "train/skipped_samples" in r][-1]
    assert last["train/skipped_samples"] == summary["skipped_samples"]
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["lmforge.skipped_shards"] == str(bad)
    assert run.data.metrics["train/skipped_samples"] == summary["skipped_samples"]
