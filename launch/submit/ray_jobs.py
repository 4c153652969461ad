"""``lmforge submit ray``: run the data pipeline or training as a Ray Job on a Ray cluster.

The job carries its resolved config in its runtime environment (``LMFORGE_JOB_CONFIG``),
so the cluster needs lmforge installed but not the user's YAML. Ray keeps the runtime
environment in its job table and logs, so that config holds no secret: each value the
redaction rule hides travels in a variable of its own (``LMFORGE_SECRET_<n>``). It runs this module:

    python -m lmforge.launch.submit.ray_jobs --job prepare|train [--num-workers N ...]

``prepare`` runs the Ray pipeline (a pool of actors) on the cluster the job lives in; ``train`` goes
through Ray Train (:mod:`lmforge.launch.submit.ray_train`). Paths in the config are seen
from the cluster: a shared filesystem (or paths valid on every node) for data and runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.launch.config import RunConfig, load_config
from lmforge.launch.redact import REDACTED, is_secret_key, redact, redact_text
from lmforge.launch.rundir import RunDir
from lmforge.launch.stages.mlflow_runs import ensure_mlflow_run
from lmforge.launch.submit.ray_train import RayTrainJob
from lmforge.launch.submit.spec import check_job_value, mlflow_line, resolve_in
from lmforge.pipeline.folder_lock import FolderLocked

CONFIG_ENV = "LMFORGE_JOB_CONFIG"
SECRET_ENV_PREFIX = "LMFORGE_SECRET_"  # a secret name: dry runs and logs show ***
SECRET_REF = "lmforge-secret-env:"
RUN_ID_ENV = "LMFORGE_MLFLOW_RUN_ID"


@dataclass
class RayJob:
    """One Ray Job: where it goes, what it runs, and with which environment."""

    address: str
    """Ray dashboard (job server) address, e.g. http://127.0.0.1:8265."""
    work: str = "train"
    """prepare (the Ray pipeline) or train (Ray Train + DeepSpeed)."""
    train: RayTrainJob = field(default_factory=RayTrainJob)
    """Workers, resources and retries of training."""
    python: str = "python"
    """Python interpreter on the cluster that has lmforge installed."""
    working_dir: str | None = None
    """Uploaded as the job's working directory; None runs in the submitting directory
    (a filesystem shared with the cluster)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every process of the job."""

    def __post_init__(self) -> None:
        if self.work not in ("prepare", "train"):
            raise ValueError(f"--job: '{self.work}' is not prepare or train")
        if not self.address:
            raise ValueError("--address: give the Ray dashboard address, e.g. http://HEAD:8265")
        check_job_value("--address", self.address)
        check_job_value("--python", self.python)
        if self.working_dir is not None:
            check_job_value("--working-dir", self.working_dir)
        for name, value in self.env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"--env: '{name}' is not a valid environment variable name")
            check_job_value(f"--env {name}", value)


@dataclass
class RaySubmission:
    """The job as sent to (or, on a dry run, as it would be sent to) the job server."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submitted: bool
    run_id: str | None


def job_spec(cfg: RunConfig, job: RayJob, workdir: Path) -> tuple[str, dict[str, Any]]:
    """The entrypoint command and runtime environment of the Ray Job."""
    command = [job.python, "-m", "lmforge.launch.submit.ray_jobs", "--job", job.work]
    if job.work == "train":
        t = job.train
        command += ["--num-workers", str(t.num_workers), "--gpus-per-worker",
                    str(t.gpus_per_worker), "--cpus-per-worker", str(t.cpus_per_worker),
                    "--max-failures", str(t.max_failures)]
    entrypoint = shlex.join(command)
    config, secret_env = split_secrets(cfg.to_dict())
    env = {
        CONFIG_ENV: yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
        **secret_env,
        "OMP_NUM_THREADS": str(cfg.launch.omp_num_threads),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **job.env,
    }
    if job.work == "train" and not job.train.gpus_per_worker:
        env.setdefault("DS_ACCELERATOR", "cpu")
    runtime_env: dict[str, Any] = {"env_vars": env}
    if job.working_dir is not None:
        runtime_env["working_dir"] = job.working_dir
    else:
        entrypoint = f"cd {shlex.quote(str(workdir))} && {entrypoint}"
    return entrypoint, runtime_env


def split_secrets(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The config with every value the redaction rule would hide replaced by a reference to
    an environment variable of the job (``LMFORGE_SECRET_<n>``, its value as JSON), and those
    variables: the serialized config, which Ray keeps in its job table and logs, holds no
    secret. :func:`config_from_env` puts them back inside the job."""
    secrets_env: dict[str, str] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, "") for v in value]
        if redact(value, key) != value:
            name = f"{SECRET_ENV_PREFIX}{len(secrets_env)}"
            secrets_env[name] = json.dumps(value)
            return f"{SECRET_REF}{name}"
        return value

    return walk(config, ""), secrets_env


def config_from_env(environ: Mapping[str, str]) -> RunConfig:
    """The job's config: ``LMFORGE_JOB_CONFIG`` with its secrets taken back from the
    ``LMFORGE_SECRET_<n>`` variables (see :func:`split_secrets`).

    Raises:
        ValueError: The config or one of its secret variables is missing.
    """
    text = environ.get(CONFIG_ENV)
    if not text:
        raise ValueError(f"{CONFIG_ENV}: not set; start this module through `lmforge submit ray`")

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and value.startswith(SECRET_REF):
            name = value[len(SECRET_REF):]
            if name not in environ:
                raise ValueError(f"{name}: not set in the job's environment; submit the job "
                                 "again with `lmforge submit ray`")
            return json.loads(environ[name])
        return value

    config = walk(yaml.safe_load(text))
    with tempfile.TemporaryDirectory() as tmp:  # 0700: the file holds the real values
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
        return load_config(path)


def submit_ray(
    cfg: RunConfig, job: RayJob, dry_run: bool = False, workdir: Path | None = None
) -> RaySubmission:
    """Submits data preparation or training to a Ray cluster through Ray Jobs.

    Args:
        cfg: The resolved config; for training its world size must equal the worker count.
        job: Address, work, workers and environment.
        dry_run: Build the job spec only: contact nothing, write nothing.
        workdir: Directory the job runs in when nothing is uploaded; default the current one.

    Raises:
        ValueError: The job server refused the job or could not be reached.
    """
    workdir = (workdir or Path.cwd()).resolve()
    if job.work == "train" and cfg.launch.backend == "nccl" and not job.train.gpus_per_worker:
        raise ValueError("launch.backend: nccl needs GPUs (NCCL reduces only CUDA tensors); "
                         "give --gpus-per-worker, or use launch.backend=auto or gloo")
    if job.work == "train" and cfg.world_size != job.train.num_workers:
        raise ValueError(f"--num-workers: {job.train.num_workers} workers but the config's "
                         f"world size is {cfg.world_size}; they must match")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.name)
    submission_id = f"lmforge-{name}-{job.work}-{secrets.token_hex(3)}"
    run_id = None
    if job.work == "train" and not dry_run:
        run_dir = resolve_in(cfg.run_dir, workdir)
        run_id = ensure_mlflow_run(cfg, run_dir)
        cfg.save(RunDir.of(run_dir).job_config("train"))
    entrypoint, runtime_env = job_spec(cfg, job, workdir)
    if run_id:
        runtime_env["env_vars"][RUN_ID_ENV] = run_id
    if dry_run:
        return RaySubmission(submission_id, entrypoint, runtime_env, False, None)
    use_auth_token_if_present()
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(job.address)
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                          submission_id=submission_id, metadata={"lmforge_job": job.work})
    except Exception as err:  # connection, auth and validation errors all end up here
        raise ValueError(
            f"--address: Ray job server at {redact_text(job.address)} did not accept the job "
            f"({redact_text(str(err))}). Is "
            "the dashboard reachable (tunnel: ssh -L 8265:127.0.0.1:8265 HEAD)? With token "
            "auth, copy the head's ~/.ray/auth_token here or set RAY_AUTH_TOKEN."
        ) from err
    return RaySubmission(submission_id, entrypoint, runtime_env, True, run_id)


def use_auth_token_if_present() -> None:
    """Sends the Ray auth token when one is available here.

    A cluster started by ``ray start`` (Ray >= 2.5x) requires a token, but clients only send
    theirs with ``RAY_AUTH_MODE=token``. The token comes from ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (``ray get-auth-token`` prints it).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return  # the user decided
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def print_submission(cfg: RunConfig, job: RayJob, result: RaySubmission,
                     workdir: Path | None = None) -> None:
    """Says what was submitted and how to follow it (or shows the job spec on a dry run)."""
    if not result.submitted:
        env = {name: REDACTED if is_secret_key(name) else redact_text(value)
               for name, value in result.runtime_env["env_vars"].items()}
        env[CONFIG_ENV] = f"<resolved config, {len(env[CONFIG_ENV])} characters>"
        spec = {"address": redact_text(job.address), "submission_id": result.submission_id,
                "entrypoint": result.entrypoint, "runtime_env": {**result.runtime_env,
                                                                 "env_vars": env}}
        print(json.dumps(spec, indent=2))
        print("# dry run: nothing submitted")
        return
    sid, address = result.submission_id, shlex.quote(redact_text(job.address))
    what = "prepare (Ray actors)" if job.work == "prepare" else (
        f"train with {job.train.num_workers} Ray Train worker(s), "
        + (f"{job.train.gpus_per_worker} GPU(s) each" if job.train.gpus_per_worker else "CPU"))
    print(f"submitted Ray job {sid}: {what}")
    print(f"  status : ray job status {sid} --address {address}")
    print(f"  logs   : ray job logs --follow {sid} --address {address}")
    print(f"  stop   : ray job stop {sid} --address {address}")
    if job.work == "train":
        run_dir = resolve_in(cfg.run_dir, (workdir or Path.cwd()).resolve())
        print(f"  MLflow : {mlflow_line(cfg, run_dir, result.run_id)}")
    else:
        print(f"  output : {resolve_in(cfg.data.output_dir, (workdir or Path.cwd()).resolve())}")


# -- inside the job ------------------------------------------------------------------


def run_job(work: str, train: RayTrainJob) -> None:
    """The job's body, on the cluster: the config comes from ``LMFORGE_JOB_CONFIG``.

    ``prepare`` runs the data pipeline on this Ray cluster; ``train`` runs the config's stage
    graph (a config without ``stages:`` is one stage) with ``--resume auto`` as ``lmforge
    run`` does, each stage's training through Ray Train, so a retried (or resubmitted) job
    resumes inside the right stage.

    Raises:
        RuntimeError: The graph stopped (a stage's training still failed after
            ``--max-failures`` restarts, or a hook stopped it).
    """
    import ray

    cfg = config_from_env(os.environ)
    ray.init()  # the cluster this job runs on (RAY_ADDRESS is set by the job server)
    if work == "prepare":
        from lmforge.launch.commands import prepare_data

        print(f"manifest: {prepare_data(cfg)}", flush=True)
        return
    from lmforge.launch.stages.launchers import ray_train_launcher
    from lmforge.launch.submit.job import run_job as run_graph_job

    code = run_graph_job(cfg, ray_train_launcher(train), run_id=os.environ.get(RUN_ID_ENV))
    if code != 0:
        raise RuntimeError(f"the job stopped with status {code}; submit the same config "
                           "again to resume inside the stage it was in")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.launch.submit.ray_jobs")
    parser.add_argument("--job", dest="work", choices=["prepare", "train"], required=True)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--gpus-per-worker", type=int, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-failures", type=int, default=2)
    args = parser.parse_args(argv)
    train = RayTrainJob(args.num_workers, args.gpus_per_worker, args.cpus_per_worker,
                        args.max_failures)
    try:
        run_job(args.work, train)
    except (FileNotFoundError, ValueError, FolderLocked) as err:  # Ray keeps the job's log
        print(f"lmforge: {redact_text(str(err))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
