"""``lmforge eval`` in-process: on an export folder and on a run directory, whose MLflow run
(a real sqlite store) receives the scores at the exported step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmforge.launch.cli import main
from lmforge.launch.config import load_config
from lmforge.launch.eval.on_export import load_export, resolve_target
from lmforge.launch.eval.scoring import score_task
from lmforge.launch.eval.tasks import read_jsonl_task
from lmforge.launch.rundir import RunDir, StageRecord

ROOT = Path(__file__).resolve().parents[3]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture(scope="module")
def expected(llama_export, eval_task_files) -> dict[str, dict[str, float]]:
    encoder, loglikelihood = load_export(llama_export)
    return {name: score_task(read_jsonl_task(path, name), encoder, loglikelihood,
                             limit=8).metrics()
            for name, path in eval_task_files.items()}


def test_json_on_an_export_folder_is_the_scores_alone(llama_export, eval_task_files,
                                                      expected, capsys):
    code, out, err = run_cli(["eval", str(llama_export), "--json", "--limit", "8", "--tasks",
                              *(f"{k}={v}" for k, v in eval_task_files.items())], capsys)
    assert code == 0, err
    assert json.loads(out) == expected
    assert set(expected["mc"]) == {"acc", "acc_norm", "acc_bytes"}
    assert set(expected["cloze"]) == {"acc", "loglikelihood", "perplexity"}
    code, out, _ = run_cli(["eval", str(llama_export), "--limit", "8", "--tasks",
                            str(eval_task_files["mc"])], capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["task", "n", "metric", "value", "chance"]
    # 8 examples with 4 choices each: chance 0.25
    assert rows[0].split() == ["mc", "8", "acc", f"{expected['mc']['acc']:.4f}", "0.2500"]


def test_a_run_directory_logs_to_its_mlflow_run(llama_export, eval_task_files, expected,
                                                tmp_path, capsys):
    run = RunDir.of(tmp_path / "run")
    run.path.mkdir()
    load_config(ROOT / "configs" / "tiny.yaml", [f"--run_dir={run.path}"]).save(run.config)
    export = shutil.copytree(llama_export, run.export)
    client = MlflowClient(f"sqlite:///{run.mlflow_db}")
    experiment = client.create_experiment("eval-test", artifact_location=run.mlflow_artifacts
                                          .as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")
    run.write_run_id(run_id)
    run.write_stage_complete(StageRecord(name="main", index=0, step=7, export_dir=str(export),
                                         run_id=run_id))
    assert resolve_target(export).run_dir == run.path  # the export finds its run too

    code, out, err = run_cli(["eval", str(run.path), "--json", "--limit", "8", "--tasks",
                              *(f"{k}={v}" for k, v in eval_task_files.items())], capsys)
    assert code == 0, err
    assert json.loads(out) == expected
    assert f"logged to MLflow run {run_id}" in err
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"  # left as it was
    assert logged.data.metrics == {f"eval/{task}/{metric}": pytest.approx(value)
                                   for task, values in expected.items()
                                   for metric, value in values.items()}
    assert [m.step for m in client.get_metric_history(run_id, "eval/mc/acc")] == [7]


def test_errors_a_user_can_hit(llama_export, eval_task_files, tmp_path, capsys):
    code, _, err = run_cli(["eval", str(tmp_path), "--tasks", str(eval_task_files["mc"])],
                           capsys)
    assert code == 1 and "neither a Hugging Face export" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a"], "gold": 0}\n')
    code, _, err = run_cli(["eval", str(llama_export), "--tasks", f"b={bad}"], capsys)
    assert code == 1 and f"{bad}:1: 'choices' must be a list of at least 2" in err
    code, _, err = run_cli(["eval", str(llama_export), "--tasks", f"a={bad}", f"a={bad}"],
                           capsys)
    assert code == 1
    code, _, err = run_cli(["eval", str(llama_export), "--tasks", str(eval_task_files["mc"]),
                            "--train.max_steps=3"], capsys)
    assert code == 1 and "takes no config overrides" in err
