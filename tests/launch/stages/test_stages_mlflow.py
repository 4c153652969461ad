"""A stage graph against a real MLflow server: one parent run, a child run per stage
(params, metrics, dataset inputs), a training experiment, and the final export registered
as a version of the configured model, tagged with its stage and source run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_server import start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]

CONFIG = """\
name: reg
run_dir: {run}
data:
  datasets: [{{name: s, paths: [{corpus}], txt_unit: paragraph}}]
  output_dir: {run}/data
  seq_len: 32
  num_workers: 1
  loader: {{num_workers: 0}}
tokenizer: {{vocab_size: 400, train_text_bytes: 100000}}
model: {{preset: tiny, n_layers: 1, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 4, max_steps: 2, warmup_steps: 1, log_every: 1, eval_every: 0,
        eval_batches: 1, precision: fp32}}
launch: {{nproc_per_node: 1}}
tracking: {{uri: {uri}, experiment: reg-exp, registered_model: tiny-lm, system_metrics: false}}
export: {{enabled: false}}
stages:
  - name: first
  - name: second
    export: {{enabled: true}}
"""


def test_parent_child_runs_and_registered_version(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    text = (REPO / "configs/corpora/tinyshakespeare.txt").read_text()
    corpus.write_text(text[:120_000])
    monkeypatch.chdir(tmp_path)  # whatever MLflow writes to its working directory lands here
    uri, server = start_mlflow_server(tmp_path / "mlflow")
    try:
        config = tmp_path / "reg.yaml"
        config.write_text(CONFIG.format(run=tmp_path / "run", corpus=corpus, uri=uri))
        done = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "run", str(config)],
                              capture_output=True, text=True, timeout=900, cwd=REPO)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "registered tiny-lm version 1 (stage second" in done.stdout

        from mlflow import MlflowClient
        from mlflow.artifacts import download_artifacts

        client = MlflowClient(uri, registry_uri=uri)
        experiment = client.get_experiment_by_name("reg-exp")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {"reg", "first", "second"}
        parent = runs["reg"].info.run_id
        for name in ("first", "second"):
            child = runs[name]
            assert child.data.tags["mlflow.parentRunId"] == parent
            assert child.data.params["train.max_steps"] == "2"
            assert "train/loss" in child.data.metrics
            assert child.inputs.dataset_inputs
        assert "mlflow.parentRunId" not in runs["reg"].data.tags

        version = client.get_model_version("tiny-lm", "1")
        second = runs["second"].info.run_id
        assert version.tags["lmforge.stage"] == "second"
        assert version.tags["lmforge.source_run"] == second
        assert version.run_id == second
        # models:/ URIs resolve through the process's registry URI
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
        folder = Path(download_artifacts("models:/tiny-lm/1", dst_path=str(tmp_path / "dl")))
        assert (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file()
    finally:
        stop_mlflow_server(server)
