"""``lmforge submit slurm|ray|local CONFIG``: run the data preparation or training as a job.

    lmforge submit slurm CONFIG --nodes N --gpus-per-node G [--job prepare|train] [...]
    lmforge submit ray CONFIG --address http://HEAD:8265 [--job prepare|train]
    lmforge submit local CONFIG [--job prepare|train|all]

The same resolved config (YAML plus ``--section.key=value`` overrides) goes to every
target; ``--dry-run`` prints what would be submitted and submits nothing. A training job
(``--job train``, the default) is the one runner, as ``lmforge run``: every stage of the
config (a config without ``stages:`` is one stage) prepares its data inside the job, trains
(srun, Ray Train, local processes), exports and verifies, and registers with
``tracking.registered_model``; a requeue or retry resumes inside the stage it was in.

Owns the submitting side (``slurm.py``, ``ray_jobs.py``, ``local.py``, shared parts in
``spec.py``) and, kept apart, the job body on the cluster (``job.py``, which runs
``launch.stages.runner``). May import: ``launch.config``, ``launch.rundir``,
``launch.redact``, ``launch.commands`` (prepare jobs), ``launch.stages`` (the job body and
the MLflow run created at submit time), ``launch.memory_plan`` (printed on --dry-run),
``pipeline.contract``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.launch.config import RunConfig

TARGETS = {
    "slurm": "render an sbatch script from slurm/ and submit it",
    "ray": "submit to a Ray cluster through Ray Jobs (training via Ray Train)",
    "local": "run the same job on this machine, in the foreground",
}


def build_submit_parser(sub: argparse._SubParsersAction) -> None:
    """Adds ``submit`` and its targets to the ``lmforge`` command's subparsers."""
    submit = sub.add_parser(
        "submit", help="submit data preparation or training to Slurm, a Ray cluster, or this "
        "machine",
        description=__doc__.split("\n\n")[0],
    )
    targets = submit.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, help_text in TARGETS.items():
        cmd = targets.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("config", type=Path, help="run config YAML (e.g. configs/tiny.yaml)")
        # `lmforge`'s own --dry-run prints the config; here it prints the job instead.
        cmd.add_argument("--dry-run", dest="print_only", action="store_true",
                         help="print the job (sbatch script / job spec) and submit nothing")
        cmd.set_defaults(dry_run=False)
        if name == "slurm":
            _add_slurm_flags(cmd)
        elif name == "ray":
            _add_ray_flags(cmd)
        else:
            cmd.add_argument("--job", dest="work", choices=["prepare", "train", "all"],
                             default="train",
                             help="what to run: train (default: the whole job, as lmforge "
                                  "run; it prepares its data itself; all is the same) or "
                                  "prepare")


def _add_slurm_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--job", dest="work", choices=["train", "prepare"], default="train",
                     help="train (default: the whole job, as lmforge run; it prepares its data "
                          "on the first node, or give --after PREPARE_JOB_ID) or prepare (a Ray "
                          "cluster across the allocation runs the data pipeline)")
    cmd.add_argument("--nodes", type=int, default=None,
                     help="nodes to allocate (default launch.nnodes)")
    cmd.add_argument("--gpus-per-node", type=int, default=0,
                     help="GPUs per node, one training task each; 0 trains on CPUs with gloo")
    cmd.add_argument("--tasks-per-node", type=int, default=None,
                     help="CPU jobs: training processes per node (default launch.nproc_per_node)")
    cmd.add_argument("--cpus-per-task", type=int, default=None, help="sbatch --cpus-per-task")
    cmd.add_argument("--mem", default=None, help="memory per node, sbatch --mem (e.g. 200G)")
    cmd.add_argument("--partition", default=None, help="sbatch --partition")
    cmd.add_argument("--time", default=None, help="time limit, sbatch --time (e.g. 1-00:00:00)")
    cmd.add_argument("--account", default=None, help="sbatch --account")
    cmd.add_argument("--signal-seconds", type=int, default=300,
                     help="send USR1 this many seconds before the time limit: ranks checkpoint, "
                          "the job requeues itself and resumes (default 300)")
    cmd.add_argument("--master-port", type=int, default=None,
                     help="rendezvous port (default derived from the job id)")
    cmd.add_argument("--socket-ifname", default=None,
                     help="network interface for NCCL/gloo (NCCL_SOCKET_IFNAME)")
    cmd.add_argument("--after", default=None, metavar="JOB_ID",
                     help="start after this job succeeded (sbatch --dependency=afterok:JOB_ID)")
    cmd.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[],
                     metavar="--OPTION=VALUE", help="extra sbatch option (repeatable)")


def _add_ray_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--address", required=True,
                     help="Ray dashboard (job server) address, e.g. http://127.0.0.1:8265")
    cmd.add_argument("--job", dest="work", choices=["prepare", "train"], default="train",
                     help="prepare (the Ray pipeline) or train (Ray Train; the default)")
    cmd.add_argument("--num-workers", type=int, default=None,
                     help="training workers (ranks); default the config's world size")
    cmd.add_argument("--gpus-per-worker", type=int, default=0,
                     help="GPUs per training worker; 0 trains on CPUs with gloo")
    cmd.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs reserved per training worker (default 1)")
    cmd.add_argument("--max-failures", type=int, default=2,
                     help="Ray Train restarts after a failure, each resuming from the newest "
                          "checkpoint (default 2; -1 = forever)")
    cmd.add_argument("--python", default="python",
                     help="interpreter on the cluster that has lmforge installed")
    cmd.add_argument("--working-dir", default=None,
                     help="upload this folder as the job's working directory; by default the "
                          "job runs in the current directory (shared filesystem)")
    cmd.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="extra environment variable for the job's processes (repeatable)")


def allocation_overrides(args: argparse.Namespace) -> list[str]:
    """``--launch.*`` overrides for the allocation a submit command asks for.

    They are applied while the config loads, so that a batch size that does not fit the
    requested world size is reported against the YAML key like any other config error.
    Empty for every other command.
    """
    if getattr(args, "command", None) != "submit" or args.target == "local":
        return []
    if args.target == "ray":
        if args.work != "train" or args.num_workers is None:
            return []
        return ["--launch.nnodes=1", f"--launch.nproc_per_node={args.num_workers}"]
    if args.work == "prepare":
        return []
    overrides = []
    if args.nodes is not None:
        overrides.append(f"--launch.nnodes={args.nodes}")
    per_node = args.gpus_per_node or args.tasks_per_node
    if per_node:
        overrides.append(f"--launch.nproc_per_node={per_node}")
    return overrides


def dispatch_submit(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Runs ``lmforge submit TARGET``; returns the command's exit status. A dry run of a
    training job ends with the memory plan, after the job spec (which stays parseable)."""
    code = _submit(args, cfg)
    if args.print_only and args.work != "prepare":
        from lmforge.launch.memory_plan import format_memory_plan

        print(format_memory_plan(cfg))
    return code


def _submit(args: argparse.Namespace, cfg: RunConfig) -> int:
    if args.target == "slurm":
        from lmforge.launch.submit.slurm import SlurmJob, print_submission, submit_slurm

        job = SlurmJob(
            nodes=args.nodes or cfg.launch.nnodes,
            gpus_per_node=args.gpus_per_node,
            tasks_per_node=args.tasks_per_node,
            cpus_per_task=args.cpus_per_task,
            mem=args.mem,
            partition=args.partition,
            time=args.time,
            account=args.account,
            signal_seconds=args.signal_seconds,
            master_port=args.master_port,
            socket_ifname=args.socket_ifname,
            after=args.after,
            sbatch_args=args.sbatch_args,
        )
        result = submit_slurm(cfg, job, args.work, dry_run=args.print_only)
        print_submission(cfg, job, result)
        return 0
    if args.target == "ray":
        from lmforge.launch.submit import ray_jobs
        from lmforge.launch.submit.ray_train import RayTrainJob

        env = dict(_name_value(item) for item in args.env)
        train = RayTrainJob(args.num_workers or cfg.world_size, args.gpus_per_worker,
                            args.cpus_per_worker, args.max_failures)
        job = ray_jobs.RayJob(args.address, args.work, train, args.python, args.working_dir, env)
        result = ray_jobs.submit_ray(cfg, job, dry_run=args.print_only)
        ray_jobs.print_submission(cfg, job, result)
        return 0
    if args.target == "local":
        from lmforge.launch.submit.local import run_local

        return run_local(cfg, args.work, dry_run=args.print_only)
    raise AssertionError(args.target)


def _name_value(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ValueError(f"--env: '{item}' is not NAME=VALUE")
    return name, value
