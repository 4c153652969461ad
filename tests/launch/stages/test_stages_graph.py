"""The stage graph through ``lmforge run``: pretrain → anneal of a tiny decoder, killed in
the middle of the anneal stage (a hook fails at its first checkpoint), then ``--resume
auto`` skips the complete stage and resumes inside the anneal: its losses equal those of
the uninterrupted run. Also: a hook inside the training processes, the parent/child MLflow
runs and the experiment kind (sqlite store in the run directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import losses

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parents[1]  # tests/launch: stage_hooks.py

CONFIG = """\
name: graph
seed: 3
data:
  datasets: [{{name: s, paths: [{corpus}], txt_unit: paragraph}}]
  output_dir: {data}
  seq_len: 32
  num_workers: 1
  loader: {{num_workers: 0}}
tokenizer: {{vocab_size: 512, train_text_bytes: 200000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 4, max_steps: 4, warmup_steps: 1, log_every: 1, eval_every: 0,
        eval_batches: 2, checkpoint_every: 2, precision: fp32}}
launch: {{nproc_per_node: 2}}
tracking: {{experiment: graph, system_metrics: false}}
export: {{enabled: false}}
hooks: [stage_hooks:record, stage_hooks:stop_in_stage]
stages:
  - name: pretrain
  - name: anneal
    train: {{max_steps: 6, lr: 1.0e-3, lr_schedule: wsd, decay_fraction: 0.5}}
    init: {{optimizer: keep}}
"""


def lmforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge.launch.cli", *args], env=full,
                          capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("graph")
    path = tmp / "graph.yaml"
    path.write_text(CONFIG.format(corpus=REPO / "configs/corpora/tinyshakespeare.txt",
                                  data=tmp / "data"))
    done = lmforge("prepare", str(path))  # once: both runs find it complete
    assert done.returncode == 0, done.stderr[-3000:]
    return path


def test_resume_inside_the_second_stage(config, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    hook_log = tmp_path / "hooks.jsonl"
    done = lmforge("run", str(config), f"--run_dir={whole}", env={"STAGE_HOOK_LOG": str(hook_log)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[1] anneal" in done.stdout and "val_loss" in done.stdout

    mark = tmp_path / "stopped"
    killed = lmforge("run", str(config), f"--run_dir={cut}",
                     env={"STAGE_STOP": "anneal", "STAGE_STOP_MARK": str(mark)})
    assert killed.returncode != 0
    assert "hook 'stage_hooks:stop_in_stage' failed on on_checkpoint of stage 'anneal'" in (
        killed.stdout + killed.stderr)
    assert mark.read_text() == "2"
    anneal = cut / "stages/01-anneal"
    assert (cut / "stages/00-pretrain/STAGE_COMPLETE").exists()
    assert not (anneal / "STAGE_COMPLETE").exists()

    resumed = lmforge("run", str(config), f"--run_dir={cut}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stage 0 'pretrain': complete, skipped" in resumed.stdout
    assert "resumed from" in resumed.stdout + resumed.stderr
    for stage in ("00-pretrain", "01-anneal"):
        assert losses(cut / "stages" / stage) == losses(whole / "stages" / stage), stage
    final = json.loads((anneal / "STAGE_COMPLETE").read_text())
    assert final["checkpoint"].endswith("step_00000006")
    # the anneal started from the pretrained weights, not from random ones
    pre, ann = losses(whole / "stages/00-pretrain"), losses(whole / "stages/01-anneal")
    assert ann[1] < pre[1]

    # a function hook ran in the job and, on rank 0, in the training processes
    events = [json.loads(line) for line in hook_log.read_text().splitlines()]
    seen = {(e["event"], e["stage"]) for e in events}
    assert {("on_stage_start", "pretrain"), ("on_eval", "pretrain"),
            ("on_checkpoint", "anneal"), ("on_stage_end", "anneal")} <= seen
    evals = [e for e in events if e["event"] == "on_eval"]
    assert all(e["metrics"]["val_loss"] > 0 and e["run_id"] and e["parent"] for e in evals)

    # MLflow: one parent run, one child per stage, a training experiment
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{whole / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("graph")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["graph"].info.run_id
    assert (whole / "mlflow_run_id").read_text() == parent
    for stage in ("pretrain", "anneal"):
        child = runs[stage]
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.info.status == "FINISHED"
        assert "train/loss" in child.data.metrics and "final/val_loss" in child.data.metrics
        assert child.data.params["train.max_steps"] == {"pretrain": "4", "anneal": "6"}[stage]
        assert child.inputs.dataset_inputs
    assert runs["graph"].data.metrics["anneal/val_loss"] == (
        runs["anneal"].data.metrics["final/val_loss"])
