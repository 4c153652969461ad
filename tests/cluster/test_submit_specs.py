"""`lmforge submit ray|local --dry-run` and the Ray-on-Slurm template, checked without clusters."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from lmforge.launch.cli import main
from lmforge.launch.submit.ray_jobs import CONFIG_ENV, use_auth_token_if_present

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def ray_spec(out: str) -> dict:
    return json.loads(out.split("# dry run")[0])


def test_ray_train_spec_carries_config_and_cpu_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "submit", "ray", str(TINY), "--address", "http://head:8265",
                       "--num-workers", "4", "--max-failures", "3", "--env", "FOO=bar",
                       "--train.global_batch_size=32", "--train.max_steps=7", "--dry-run")
    assert code == 0
    spec = ray_spec(out)
    assert spec["address"] == "http://head:8265"
    assert spec["entrypoint"].startswith(f"cd {tmp_path} && python -m lmforge.launch.submit")
    assert "--job train --num-workers 4" in spec["entrypoint"]
    assert "--max-failures 3" in spec["entrypoint"]
    env = spec["runtime_env"]["env_vars"]
    assert env["FOO"] == "bar" and env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"]
    assert "working_dir" not in spec["runtime_env"]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_ray_job_config_round_trips(tmp_path):
    from lmforge.launch.config import load_config
    from lmforge.launch.submit.ray_jobs import RayJob, job_spec
    from lmforge.launch.submit.ray_train import RayTrainJob

    cfg = load_config(TINY, ["--train.max_steps=7", "--launch.nproc_per_node=2"])
    job = RayJob("http://h:8265", "prepare", RayTrainJob(), "python3", str(tmp_path), {})
    entrypoint, runtime_env = job_spec(cfg, job, tmp_path)
    assert entrypoint == "python3 -m lmforge.launch.submit.ray_jobs --job prepare"
    assert runtime_env["working_dir"] == str(tmp_path)
    assert "DS_ACCELERATOR" not in runtime_env["env_vars"]
    sent = yaml.safe_load(runtime_env["env_vars"][CONFIG_ENV])
    assert sent["train"]["max_steps"] == 7 and sent == cfg.to_dict()


def test_ray_job_config_carries_no_secret_and_the_job_gets_them_back(tmp_path):
    """Ray keeps a job's runtime_env in its job table and logs: the serialized config there
    holds no secret; each travels in an LMFORGE_SECRET_<n> variable and comes back in the job."""
    from lmforge.launch.config import load_config
    from lmforge.launch.submit.ray_jobs import RayJob, config_from_env, job_spec
    from lmforge.launch.submit.ray_train import RayTrainJob

    cfg = load_config(TINY, ["--deepspeed.overrides={api_key: SEKRIT-ds, train_batch_size: 16}",
                             "--tracking.tags={hf_token: SEKRIT-tag, team: nlp}",
                             "--tracking.uri=https://ann:SEKRIT-uri@mlflow.example.com"])
    job = RayJob("http://h:8265", "train", RayTrainJob(), "python3", str(tmp_path), {})
    _, runtime_env = job_spec(cfg, job, tmp_path)
    env = runtime_env["env_vars"]
    assert "SEKRIT" not in env[CONFIG_ENV]
    carriers = {k: v for k, v in env.items() if "SEKRIT" in v}
    assert sorted(carriers) == ["LMFORGE_SECRET_0", "LMFORGE_SECRET_1", "LMFORGE_SECRET_2"]
    assert config_from_env(env).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="LMFORGE_SECRET_0: not set"):
        config_from_env({CONFIG_ENV: env[CONFIG_ENV]})


def test_ray_worker_count_must_match_the_batch_size(capsys):
    code, _, err = cli(capsys, "submit", "ray", str(TINY), "--address", "http://h:8265",
                       "--num-workers", "3", "--dry-run")
    assert code == 2
    assert "train.global_batch_size" in err and "world size 3" in err


def test_token_mode_only_when_a_token_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    use_auth_token_if_present()
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / "token").write_text("abc")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    use_auth_token_if_present()
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_local_dry_run_describes_the_job(capsys, tmp_path):
    code, out, _ = cli(capsys, "submit", "local", str(TINY), "--job", "all",
                       f"--run_dir={tmp_path / 'r'}", "--dry-run")
    assert code == 0
    spec = json.loads(out.split("# dry run")[0])
    assert spec == {"target": "local", "job": "all", "processes": 2,
                    "run_dir": str(tmp_path / "r"), "manifest": spec["manifest"],
                    "resume": "auto"}
    assert not (tmp_path / "r").exists()


def test_ray_on_slurm_prepare_script(capsys, tmp_path):
    code, out, _ = cli(capsys, "submit", "slurm", str(TINY), "--job", "prepare", "--nodes",
                       "4", "--partition", "cpu", f"--run_dir={tmp_path / 'r'}", "--dry-run")
    assert code == 0
    script = out.split("# dry run")[0]
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive",
                 "#SBATCH --partition=cpu", "#SBATCH --job-name=lmforge-tiny-prepare"):
        assert line in script.splitlines(), line
    assert '"$RAY" start --head --block' in script
    assert "--dashboard-host=127.0.0.1" in script  # never exposed beyond the head node
    assert '"$RAY" start --block --address="$RAY_ADDRESS"' in script
    assert f"-m lmforge.launch.cli prepare {tmp_path / 'r' / 'submit' / 'prepare-config.yaml'}" \
        in script
    path = tmp_path / "prepare.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
