"""``lmforge submit slurm``: render an sbatch script from ``slurm/`` and hand it to sbatch.

A training job runs the one runner on the first node (``slurm/train.sbatch``), as ``lmforge
run`` does: each stage (a config without ``stages:`` is one) prepares its data, trains with
one task per GPU (or per CPU process) through ``srun`` (ranks from
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, the rendezvous host from ``scontrol show
hostnames``), exports and verifies. The job is requeueable and asks for a pre-kill signal: the
batch shell forwards it through the runner to the ranks, which checkpoint and exit 75, and the
script requeues the job, which resumes inside that stage from that checkpoint.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.launch.config import RunConfig
from lmforge.launch.config.dataset_check import config_for_dataset
from lmforge.launch.rundir import RunDir
from lmforge.launch.stages.mlflow_runs import ensure_mlflow_run
from lmforge.launch.submit.spec import (
    SLURM_TEMPLATES,
    check_job_value,
    mlflow_line,
    render_template,
    resolve_in,
    with_allocation,
)
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

TEMPLATES = {"train": "train.sbatch", "prepare": "ray-prepare.sbatch"}
TIME_FORMAT = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


@dataclass
class SlurmJob:
    """The allocation and scheduling options of one Slurm job (the ``submit slurm`` flags)."""

    nodes: int = 1
    """Nodes to allocate."""
    gpus_per_node: int = 0
    """GPUs per node; one training task per GPU. 0 trains on CPUs with gloo."""
    tasks_per_node: int | None = None
    """Training processes per node; defaults to the GPU count (or launch.nproc_per_node)."""
    cpus_per_task: int | None = None
    """CPU cores per task (data loading, OMP threads); None leaves Slurm's default."""
    mem: str | None = None
    """Memory per node (sbatch --mem, e.g. 200G); None leaves Slurm's default."""
    partition: str | None = None
    """Partition (queue) to submit to."""
    time: str | None = None
    """Time limit (sbatch --time, e.g. 2-00:00:00). The pre-kill signal needs one to fire."""
    account: str | None = None
    """Account charged for the job."""
    signal_seconds: int = 300
    """Seconds before the time limit at which USR1 asks ranks to checkpoint and exit."""
    master_port: int | None = None
    """Rendezvous port; None derives one from the job id (20000-39999)."""
    socket_ifname: str | None = None
    """Network interface for NCCL/gloo traffic (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME)."""
    after: str | None = None
    """Start only after this job id finished successfully (e.g. the prepare job)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further sbatch options, copied as ``#SBATCH`` lines (e.g. --qos=high)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes: must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"--tasks-per-node: {self.tasks_per_node} with --gpus-per-node "
                f"{self.gpus_per_node}; training runs one task per GPU, drop --tasks-per-node"
            )
        if self.signal_seconds < 1:
            raise ValueError(f"--signal-seconds: must be at least 1, got {self.signal_seconds}")
        if self.time is not None and not TIME_FORMAT.match(self.time):
            raise ValueError(
                f"--time: '{self.time}' is not a Slurm time; use minutes, HH:MM:SS or D-HH:MM:SS"
            )
        for arg in self.sbatch_args:
            if not arg.startswith("--"):
                raise ValueError(f"--sbatch-arg: '{arg}' must be a long option like --qos=high")
            check_job_value("--sbatch-arg", arg, directive=True)
        for flag in ("mem", "partition", "time", "account", "after"):
            if getattr(self, flag) is not None:
                check_job_value(f"--{flag}", getattr(self, flag), directive=True)
        if self.socket_ifname is not None:
            check_job_value("--socket-ifname", self.socket_ifname)  # quoted in the body

    def processes_per_node(self, cfg: RunConfig) -> int:
        return self.gpus_per_node or self.tasks_per_node or cfg.launch.nproc_per_node


@dataclass
class SlurmSubmission:
    """What ``submit_slurm`` did: the script, and the job id unless it was a dry run."""

    script: str
    script_path: Path
    job_id: str | None
    log_pattern: str
    run_id: str | None


def job_config(cfg: RunConfig, job: SlurmJob) -> RunConfig:
    """The config the job trains with: ``launch`` matches the allocation."""
    return with_allocation(cfg, job.nodes, job.processes_per_node(cfg))


def render_script(
    cfg: RunConfig, job: SlurmJob, work: str = "train", workdir: Path | None = None
) -> str:
    """The sbatch script that does ``work`` for ``cfg`` on the allocation ``job`` describes.

    Args:
        cfg: The resolved config; for training its ``launch`` section must already match
            the allocation (see :func:`job_config`).
        job: Nodes, GPUs, scheduling options.
        work: ``train`` (slurm/train.sbatch) or ``prepare`` (slurm/ray-prepare.sbatch: a
            Ray cluster across the allocation runs the data pipeline).
        workdir: The job's working directory (relative config paths resolve against it);
            default the current one.
    """
    if work not in TEMPLATES:
        raise ValueError(f"--job: '{work}' is not one of {', '.join(TEMPLATES)}")
    if work == "train" and cfg.launch.backend == "nccl" and not job.gpus_per_node:
        raise ValueError("launch.backend: nccl needs GPUs (NCCL reduces only CUDA tensors); "
                         "give --gpus-per-node, or use launch.backend=auto or gloo")
    workdir = (workdir or Path.cwd()).resolve()
    run = RunDir(resolve_in(cfg.run_dir, workdir))
    check_job_value("name", cfg.name)
    for what, path in (("working directory", workdir), ("run_dir", run.path)):
        check_job_value(what, path)
        if re.search(r"\s", str(path)):
            raise ValueError(f"{what}: '{path}' contains whitespace, which #SBATCH cannot quote")
    values = {
        "job_name": job_name(cfg, work),
        "nodes": job.nodes,
        "resource_directives": _directives(_resource_options(job, work)),
        "workdir": workdir,
        "log_dir": run.logs,
        "extra_directives": _directives(_scheduling_options(job)),
        "python": shlex.quote(sys.executable),
        "job_config": shlex.quote(str(run.job_config(work))),
    }
    if work == "train":
        values.update({
            "tasks_per_node": job.processes_per_node(cfg),
            "signal_seconds": job.signal_seconds,
            "run_dir": shlex.quote(str(run.path)),
            "omp_num_threads": cfg.launch.omp_num_threads,
            "backend_env": _backend_env(cfg, job),
            "master_port": job.master_port or cfg.launch.master_port
            or "$((20000 + SLURM_JOB_ID % 20000))",
        })
    return render_template(SLURM_TEMPLATES / template_name(cfg, work), values)


def template_name(cfg: RunConfig, work: str) -> str:
    """The template under ``slurm/``: ``train.sbatch`` runs the stage graph (any config),
    ``ray-prepare.sbatch`` the data pipeline on a Ray cluster across the allocation."""
    return TEMPLATES[work]


def job_name(cfg: RunConfig, work: str) -> str:
    """The Slurm job name: ``lmforge-<name>``, with anything but ``[A-Za-z0-9._-]`` as ``_``
    (it lands in an ``#SBATCH`` line and in log file names)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.name)
    return f"lmforge-{name}" + ("-prepare" if work == "prepare" else "")


def _resource_options(job: SlurmJob, work: str) -> list[str]:
    options = []
    if job.gpus_per_node:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    elif work == "prepare":  # one Ray node per machine uses all of its cores
        options.append("--exclusive")
    if job.mem:
        options.append(f"--mem={job.mem}")
    return options


def _scheduling_options(job: SlurmJob) -> list[str]:
    options = []
    for flag in ("partition", "time", "account"):
        if getattr(job, flag):
            options.append(f"--{flag}={getattr(job, flag)}")
    if job.after:
        options.append(f"--dependency=afterok:{job.after}")
    return options + list(job.sbatch_args)


def _directives(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {option}" for option in options)


def _backend_env(cfg: RunConfig, job: SlurmJob) -> str:
    if cfg.launch.resolved_backend(cuda=job.gpus_per_node > 0) == "nccl":
        lines = [
            "# NCCL (GPU): report problems, and fail instead of hanging when a peer dies.",
            "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        ]
        if job.socket_ifname:
            lines.append(f"export NCCL_SOCKET_IFNAME={shlex.quote(job.socket_ifname)}")
        return "\n".join(lines)
    lines = [
        "# gloo (CPU): DeepSpeed's CPU accelerator; no GPUs in this job.",
        "export DS_ACCELERATOR=cpu",
    ]
    if job.socket_ifname:
        lines.append(f"export GLOO_SOCKET_IFNAME={shlex.quote(job.socket_ifname)}")
    return "\n".join(lines)


def submit_slurm(
    cfg: RunConfig,
    job: SlurmJob,
    work: str = "train",
    dry_run: bool = False,
    workdir: Path | None = None,
) -> SlurmSubmission:
    """Renders the job script for ``work`` and submits it with sbatch (or only renders it).

    Args:
        cfg: The resolved config (YAML plus overrides).
        job: The allocation and scheduling options.
        work: ``train`` or ``prepare``.
        dry_run: Render only: write nothing, create no MLflow run, submit nothing.
        workdir: The job's working directory; default the current one.

    Returns:
        The script, where it was written, the job id and the MLflow run id.

    Raises:
        ValueError: The allocation does not fit the config, or no prepared data exists.
        FileNotFoundError: sbatch is not installed here.
    """
    workdir = (workdir or Path.cwd()).resolve()
    if work == "train":
        cfg = job_config(cfg, job)
    script = render_script(cfg, job, work, workdir)
    run = RunDir(resolve_in(cfg.run_dir, workdir))
    script_path = run.job_script(template_name(cfg, work))
    log_pattern = str(run.logs / f"{job_name(cfg, work)}-%j.out")
    if dry_run:
        return SlurmSubmission(script, script_path, None, log_pattern, None)
    manifest = DatasetManifest.path_in(resolve_in(cfg.data.output_dir, workdir))
    # The job prepares its data itself (skipped when it is prepared already); data prepared
    # now must fit the config: refuse now, not in the queue.
    if work == "train" and job.after is None and not cfg.stages and manifest.is_file():
        config_for_dataset(cfg, DatasetManifest.read(manifest))
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FileNotFoundError(
            "sbatch: not found; submit from a Slurm login node (for a local test cluster run "
            "slurm/local-test-cluster.sh), or use --dry-run to only print the script"
        )
    run.logs.mkdir(parents=True, exist_ok=True)
    cfg.save(run.job_config(work))
    script_path.write_text(script, encoding="utf-8")
    run_id = ensure_mlflow_run(cfg, run.path) if work == "train" else None
    proc = subprocess.run(
        [sbatch, "--parsable", str(script_path)], capture_output=True, text=True, cwd=workdir
    )
    if proc.returncode != 0:
        raise ValueError(f"sbatch {script_path}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    return SlurmSubmission(script, script_path, job_id, log_pattern, run_id)


def print_submission(cfg: RunConfig, job: SlurmJob, result: SlurmSubmission) -> None:
    """Says what was submitted and how to follow it (or prints the script on a dry run)."""
    if result.job_id is None:
        print(result.script, end="")
        print(f"# dry run: nothing submitted; the script would be written to {result.script_path}")
        return
    jid = result.job_id
    run_dir = result.script_path.parent.parent
    if result.script_path.name == TEMPLATES["prepare"]:
        print(f"submitted Slurm job {jid}: prepare on a {job.nodes}-node Ray cluster")
    else:
        per_node = job.processes_per_node(cfg)
        kind = f"{job.gpus_per_node} GPU(s)" if job.gpus_per_node else "CPU"
        print(f"submitted Slurm job {jid}: train on {job.nodes} node(s) x {per_node} task(s), "
              f"{kind}")
    print(f"  status : squeue -j {jid}    scontrol show job {jid}    sacct -j {jid}")
    print(f"  logs   : tail -f {result.log_pattern.replace('%j', jid)}")
    if result.script_path.name == TEMPLATES["train"]:
        print(f"  stop   : scancel --signal=USR1 --batch {jid}   (checkpoint and requeue)")
        print(f"  MLflow : {mlflow_line(cfg, run_dir, result.run_id)}")
    print(f"  cancel : scancel {jid}")
    print(f"  script : {result.script_path}")
