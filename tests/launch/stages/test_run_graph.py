"""The one runner: the exit-status rule of every MLflow run (fast), and `lmforge submit local`
of a plain config (a graph of one stage) ending, like `lmforge run`, with a verified export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.launch.stages.mlflow_runs import mlflow_status
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "tiny.yaml"


def test_exit_status_rule():
    assert mlflow_status(0) == "FINISHED"
    assert REQUEUE_EXIT_CODE == 75 and mlflow_status(75) == "KILLED"  # preempted, will resume
    for code in (1, 2, 137, -9, 255):
        assert mlflow_status(code) == "FAILED", code


def small(tmp: Path) -> list[str]:
    corpus = tmp / "corpus.txt"
    corpus.write_text((REPO / "configs/corpora/tinyshakespeare.txt").read_text()[:100_000])
    return [f"--run_dir={tmp / 'run'}", f"--data.output_dir={tmp / 'data'}",
            f"--data.datasets.0.paths=[{corpus}]", "--data.seq_len=32",
            "--tokenizer.vocab_size=400", "--tokenizer.train_text_bytes=100000",
            "--model.n_layers=1", "--model.d_model=64", "--model.n_heads=4",
            "--model.n_kv_heads=2", "--model.d_ff=128", "--train.max_steps=4",
            "--train.global_batch_size=null", "--train.micro_batch_size=4",
            "--train.warmup_steps=1", "--train.eval_every=0", "--train.eval_batches=1",
            "--train.checkpoint_every=0", "--train.precision=fp32", "--launch.nproc_per_node=1",
            "--tracking.experiment=submit-local", "--tracking.system_metrics=false",
            "--generate.max_new_tokens=4"]


def submit_local(tmp: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "submit", "local",
                           str(TINY), *small(tmp)], capture_output=True, text=True, cwd=tmp,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_submit_local_of_a_plain_config_ends_with_a_verified_export(tmp_path):
    from mlflow import MlflowClient

    out = submit_local(tmp_path).stdout
    run = tmp_path / "run"
    # prepare → train → export (verified by logit parity) → the family's demonstration
    assert "export verified: " in out
    assert f"HF export     : {run / 'export'}" in out
    assert (run / "export" / "model.safetensors").stat().st_size > 0
    assert (run / "checkpoints" / "step_00000004").is_dir()  # the run directory's root
    assert len(json.loads((run / "generations.json").read_text())) > 0
    complete = json.loads((run / "STAGE_COMPLETE").read_text())
    assert complete["export_dir"] == str(run / "export") and complete["step"] == 4
    # one MLflow run for the job (no parent/child split for one stage), FINISHED
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in mlrun.data.tags
    assert "train/loss" in mlrun.data.metrics
    assert {"export", "generations.json", "config.yaml"} <= {a.path for a in
                                                         client.list_artifacts(run_id)}
    experiment = client.get_experiment_by_name("submit-local")
    assert len(client.search_runs([experiment.experiment_id])) == 1

    again = submit_local(tmp_path).stdout  # a complete job is not run twice
    assert "complete, skipped" in again and "train: DeepSpeed" not in again
    assert client.get_run(run_id).info.status == "FINISHED"
