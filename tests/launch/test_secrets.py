"""Secrets never reach MLflow, the console, warnings or dry-run output (launch/redact.py).

Each test puts real secrets where users put them (a DeepSpeed override, a tracking tag, a
password in the tracking URI, a `--env` value) and looks for them where they must not be.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient

from lmforge.launch.config import load_config
from lmforge.launch.redact import is_secret_key, redact, redact_text
from lmforge.launch.rundir import RunDir
from lmforge.launch.stages.mlflow_runs import ensure_mlflow_run
from lmforge.launch.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
LMFORGE = [sys.executable, "-m", "lmforge.launch.cli"]
SECRETS = ("SEKRIT-ds", "SEKRIT-tag", "SEKRIT-uri")


def secret_overrides(uri: str) -> list[str]:
    return [
        "--deepspeed.overrides={api_key: SEKRIT-ds, train_batch_size: 16}",
        "--tracking.tags={hf_token: SEKRIT-tag, team: nlp}",
        f"--tracking.uri={uri}",
    ]


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} shows {leaked}"


def test_rule_keeps_tokenizer_settings_and_hides_secrets() -> None:
    for key in ("HF_TOKEN", "apiKey", "api_key", "db-password", "passwd", "auth",
                "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "gcp_credentials"):
        assert is_secret_key(key), key
    for key in ("tokenizer", "max_new_tokens", "mask_token", "author", "vocab_size"):
        assert not is_secret_key(key), key
    assert redact_text("see https://bob:pw@h:5000/x") == "see https://bob:***@h:5000/x"
    assert redact({"a": ["s3://KEY@bucket/p"], "token": 5}) == {"a": ["s3://***@bucket/p"],
                                                                "token": "***"}


def test_widened_rule_names_and_value_shapes() -> None:
    """The names and shapes issue 21 found missing: each hidden, the look-alikes kept."""
    for key in ("AZURE_STORAGE_KEY", "private_key", "PGPASSWORD", "authtoken", "secretkey",
                "pwd", "Authorization", "jwt", "sig", "X-Amz-Signature", "X-Amz-Credential",
                "X-Amz-Security-Token", "privateKey", "client_secret"):
        assert is_secret_key(key), key
    for key in ("eos_token_id", "token_dtype", "token_ids", "tokens_seen", "sort_key", "__key__",
                "signal", "design", "keyboard", "data.paths", "shard_size"):
        assert not is_secret_key(key), key
    hf, gh = "hf_" + "A1b2" * 6, "ghp_" + "x9" * 18
    cases = {
        # a password holding '@' and query-string credentials in one URL
        "https://u:p@ss@host:5/x?X-Amz-Signature=SEK1&X-Amz-Date=20260101&sig=SEK2&token=SEK3":
            "https://u:***@host:5/x?X-Amz-Signature=***&X-Amz-Date=20260101&sig=***&token=***",
        # a YAML error snippet that starts mid-URL
        "  ser:SEK4@host/corpus.jsonl\n      ^": "  ser:***@host/corpus.jsonl\n      ^",
        f"--env HF_TOKEN={hf} --env OTHER=ok": "--env HF_TOKEN=*** --env OTHER=ok",
        f"pushed with {gh} and AKIAABCDEFGHIJKLMNOP": "pushed with *** and ***",
        "Authorization: Bearer SEK5": "Authorization: ***",
        "api_key: SEK6, train_batch_size: 16": "api_key: ***, train_batch_size: 16",
        "jwt eyJhbGciOiJI.eyJzdWIiOiIx.c2lnbmF0dXJl": "jwt ***",
        "key sk-" + "z" * 24: "key ***",
        "git@github.com:org/repo.git, me@example.com at 12:30":
            "git@github.com:org/repo.git, me@example.com at 12:30",
    }
    for text, expected in cases.items():
        assert redact_text(text) == expected, text
    assert redact(["PGPASSWORD=SEK7", "A=b"]) == ["PGPASSWORD=***", "A=b"]


def test_run_dry_run_prints_no_secret() -> None:
    proc = subprocess.run(
        [*LMFORGE, "run", str(TINY), "--dry-run",
         *secret_overrides("http://bob:SEKRIT-uri@127.0.0.1:9/")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, "lmforge run --dry-run")
    assert "api_key: '***'" in proc.stdout and "http://bob:***@127.0.0.1:9/" in proc.stdout
    assert "team: nlp" in proc.stdout  # ordinary values stay readable


def test_stage_graph_dry_run_hides_sources_paths_and_uris() -> None:
    """The stage graph's --dry-run printed init.source and data paths as written."""
    proc = subprocess.run(
        [*LMFORGE, "run", str(REPO / "configs" / "tiny-stages.yaml"), "--dry-run",
         "--stages.1.init.source=https://u:SEKRIT-uri@h/ckpt",
         "--data.output_dir=s3://bucket/data?X-Amz-Signature=SEKRIT-ds"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, "lmforge run STAGES --dry-run")
    assert "init      : https://u:***@h/ckpt" in proc.stdout
    assert "s3://bucket/data?X-Amz-Signature=***" in proc.stdout


def test_submit_ray_dry_run_hides_env_secrets() -> None:
    proc = subprocess.run(
        [*LMFORGE, "submit", "ray", str(TINY), "--address", "http://127.0.0.1:8265", "--dry-run",
         "--job", "prepare", "--env", "HF_TOKEN=SEKRIT-tag", "--env",
         "DB_URL=postgresql://u:SEKRIT-uri@db/x", "--env", "MODE=fast"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, "lmforge submit ray --dry-run")
    assert '"HF_TOKEN": "***"' in proc.stdout and '"MODE": "fast"' in proc.stdout
    assert "postgresql://u:***@db/x" in proc.stdout


def test_mlflow_params_and_config_artifact_are_redacted(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TINY, [f"--run_dir={tmp_path / 'run'}", *secret_overrides(store)])
    run = RunDir.of(cfg.run_dir)
    cfg.save(run.config)  # what run_job does first: the workers' input keeps real values
    assert "SEKRIT-ds" in run.config.read_text()
    # The submit path (mlflow_runs.ensure_mlflow_run) and the runner's params + config artifact.
    run_id = ensure_mlflow_run(cfg, run.path)
    tracker = Tracker(cfg.tracking, run.path)
    tracker.start(run_id=run_id)
    tracker.log_config(cfg.to_dict())
    tracker.set_tags({"auth_header": "Bearer SEKRIT-tag"})
    assert tracker.close("FINISHED")

    client = MlflowClient(tracking_uri=store)
    data = client.get_run(run_id).data
    assert_no_secret(repr(data.params) + repr(data.tags), "MLflow params/tags")
    assert data.params["deepspeed.overrides.api_key"] == "***"
    assert data.tags["hf_token"] == "***" and data.tags["team"] == "nlp"
    artifact = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert_no_secret(artifact.read_text(), "MLflow config.yaml artifact")
    assert yaml.safe_load(artifact.read_text())["deepspeed"]["overrides"]["api_key"] == "***"


def test_unreachable_server_warning_hides_uri_credentials(tmp_path: Path, caplog) -> None:
    from mlflow_server import free_port

    uri = f"http://bob:SEKRIT-uri@127.0.0.1:{free_port()}"
    cfg = load_config(TINY, [f"--tracking.uri={uri}", "--tracking.start_timeout_s=1",
                             "--tracking.retry_max_s=1", "--tracking.system_metrics=false"])
    with caplog.at_level(logging.WARNING, logger="lmforge.launch.tracking"):
        tracker = Tracker(cfg.tracking, tmp_path)
        tracker.start(run_name="secrets")
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.close("FINISHED", timeout=2)
    text = caplog.text
    assert "bob:***@127.0.0.1" in text, text
    assert_no_secret(text, "tracking warnings")
