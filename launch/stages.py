"""The stage graph runner: ``lmforge run CONFIG`` for a config with ``stages:``.

Each stage, in order: ``on_stage_start`` → prepare its data → train (warm-started as its
``init`` section says) → export (``export.enabled``) and ``on_export`` → the same stage from
random weights when ``compare_from_scratch`` → ``on_stage_end`` → ``STAGE_COMPLETE``.
A stage boundary is a complete checkpoint: the next stage starts from the previous stage's
final one. ``--resume auto`` skips complete stages and resumes the first incomplete one from
its own newest checkpoint, so a killed or requeued job continues inside the right stage.

MLflow: the job is one run (``<run_dir>/mlflow_run_id``); each stage is a child run
(tag ``mlflow.parentRunId``, ``<stage dir>/mlflow_run_id``) with the stage's params,
metrics and dataset inputs; the job's run gets every stage's final validation metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.launch.commands import Launcher
from lmforge.launch.config import RunConfig, load_config
from lmforge.launch.config.stages import Stage, expand_stages, hook_spec
from lmforge.launch.hooks import HookRunner, StageContext
from lmforge.launch.rundir import RunDir
from lmforge.launch.tracking import Tracker
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE

log = logging.getLogger("lmforge")

PARENT_TAG = "mlflow.parentRunId"
# Metrics where a lower value is better (the rest: higher is better).
LOWER_IS_BETTER = ("val_loss", "val_ppl")


@dataclass
class StageResult:
    """How a stage ended (also what ``STAGE_COMPLETE`` holds)."""

    name: str
    index: int
    exit_code: int = 0
    step: int | None = None
    checkpoint: str | None = None
    export_dir: str | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    scratch_metrics: dict[str, float] | None = None
    run_id: str | None = None
    skipped: bool = False


@dataclass
class GraphResult:
    """The whole job: where it ran and how each stage ended."""

    run_dir: Path
    tracking_uri: str
    run_id: str | None
    stages: list[StageResult]
    exit_code: int


def run_stages(cfg: RunConfig, resume: str | None = None,
               launcher: Launcher | None = None) -> GraphResult:
    """Runs every stage of ``cfg`` in order (see the module docstring).

    Args:
        cfg: A config with ``stages:``.
        resume: ``auto`` (skip complete stages, resume the first incomplete one) or
            ``None``/``none`` (every stage from the start).
        launcher: Starts each stage's training processes; default torchrun on this machine
            (:func:`slurm_launcher` inside a Slurm job, Ray Train in a Ray job).

    Raises:
        ValueError: ``--resume`` names a checkpoint (ambiguous across stages), or a hook
            cannot be loaded.
        HookError: A hook failed under ``hook_failure: stop``.
    """
    if resume not in (None, "none", "auto"):
        raise ValueError(f"--resume {resume}: a stage graph resumes with --resume auto (the "
                         "first incomplete stage, from its newest checkpoint) or none")
    resume = "auto" if resume == "auto" else None
    stages = expand_stages(cfg)
    extra = ("register",) if cfg.tracking.registered_model else ()
    hooks = [HookRunner.from_config(s.config, extra) for s in stages]  # import errors now
    job = RunDir.of(cfg.run_dir)
    job.path.mkdir(parents=True, exist_ok=True)
    cfg.save(job.config)
    parent = Tracker(cfg.tracking, job.path)
    parent_id = parent.start(run_name=cfg.tracking.run_name or cfg.name,
                             run_id=job.read_run_id() if resume else None,
                             tags={"lmforge.stages": ",".join(s.name for s in stages)},
                             system_metrics=False)
    if parent_id:
        job.write_run_id(parent_id)
    parent.log_params({k: v for k, v in cfg.to_dict().items() if k != "stages"})
    parent.log_config(cfg.to_dict())
    parent.flush()
    parent_id = parent.run_id or parent_id
    results: list[StageResult] = []
    status, code = "FAILED", 1
    try:
        for stage, runner in zip(stages, hooks, strict=True):
            stage = _after(stage, results[-1] if results else None)
            result = run_stage(stage, runner, job.path, parent_id, resume, launcher)
            results.append(result)
            if result.exit_code != 0:
                code = result.exit_code
                status = "KILLED" if code == REQUEUE_EXIT_CODE else "FAILED"
                log.error("stage '%s' exited with status %d; the job stops here (continue "
                          "with --resume auto)", stage.name, code)
                break
            parent.log_metrics({f"{stage.name}/{k}": v for k, v in result.val_metrics.items()},
                               step=stage.index)
        else:
            status, code = "FINISHED", 0
    finally:
        parent.close(status=status)
    graph = GraphResult(job.path, parent.uri, parent.run_id or parent_id, results, code)
    print_stages(graph)
    return graph


def _after(stage: Stage, previous: StageResult | None) -> Stage:
    """The stage with ``init.source`` pointing at the previous stage's exact final checkpoint
    (the expansion named its checkpoints folder)."""
    init = getattr(stage.config, "init", None)
    if previous is None or init is None or not previous.checkpoint:
        return stage
    folder = Path(previous.checkpoint).parent
    if init.source is None or Path(init.source).resolve() != folder.resolve():
        return stage
    config = dataclasses.replace(stage.config,
                                 init=dataclasses.replace(init, source=previous.checkpoint))
    return dataclasses.replace(stage, config=config)


def run_stage(stage: Stage, hooks: HookRunner, job_dir: Path, parent_id: str | None,
              resume: str | None, launcher: Launcher | None = None) -> StageResult:
    """One stage: prepare → train → export → from scratch → ``STAGE_COMPLETE``."""
    from lmforge.launch.commands import export, heading, prepare_data, train

    cfg, run = stage.config, RunDir.of(stage.dir)
    done = _completed(run) if resume else None
    if done is not None:
        heading(f"stage {stage.index} '{stage.name}': complete, skipped")
        return dataclasses.replace(done, skipped=True)
    run.stage_complete.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    heading(f"stage {stage.index} '{stage.name}' ({cfg.train.objective}, "
            f"{cfg.train.max_steps} steps) in {run.path}")
    tracker = Tracker(cfg.tracking, run.path)
    run_id = _start_child(tracker, run, stage.name, parent_id, resume, stage.index)
    tracker.log_params({k: v for k, v in cfg.to_dict().items() if k != "stages"})
    tracker.log_config(cfg.to_dict())
    _write_json(run.stage_info, {"stage": stage.name, "index": stage.index,
                                 "job_dir": str(job_dir), "parent_run_id": parent_id,
                                 "run_id": run_id, "tracking_uri": tracker.uri})
    context = StageContext(stage.name, stage.index, run.path, job_dir, cfg,
                           parent_run_id=parent_id, run_id=run_id, tracking_uri=tracker.uri)
    result = StageResult(stage.name, stage.index, run_id=run_id)
    status = "FAILED"
    try:
        hooks.emit("on_stage_start", context)
        prepare_data(cfg, tracker)
        tracker.flush()
        result.exit_code = train(cfg, resume=resume, run_id=run_id, launcher=launcher)
        if result.exit_code != 0:
            status = "KILLED" if result.exit_code == REQUEUE_EXIT_CODE else "FAILED"
            return result
        _read_training(run, result)
        tracker.log_metrics({f"final/{k}": v for k, v in result.val_metrics.items()},
                            step=result.step or 0)
        context.checkpoint, context.step = Path(result.checkpoint), result.step
        context.metrics = dict(result.val_metrics)
        if cfg.export.enabled:
            context.export_dir = export(cfg)
            tracker.log_artifacts(context.export_dir, "export")
            tracker.flush()
            hooks.emit("on_export", context)
        if stage.compare_from_scratch:
            scratch = run_from_scratch(stage, parent_id, resume, launcher)
            if scratch.exit_code != 0:
                result.exit_code = scratch.exit_code
                return result
            result.scratch_metrics = scratch.val_metrics
            tracker.log_metrics({f"from_scratch/{k}": v for k, v in scratch.val_metrics.items()},
                                step=result.step or 0)
        tracker.flush()
        hooks.emit("on_stage_end", context)
        result.export_dir = str(context.export_dir) if context.export_dir else None
        _mark_complete(run, result)
        status = "FINISHED"
        return result
    finally:
        tracker.close(status=status)


def run_from_scratch(stage: Stage, parent_id: str | None, resume: str | None,
                     launcher: Launcher | None = None) -> StageResult:
    """The stage again from random weights, in ``<stage dir>/from_scratch`` (same data)."""
    from lmforge.launch.commands import heading, train

    cfg = stage.from_scratch()
    run = RunDir.of(cfg.run_dir)
    name = f"{stage.name}-from_scratch"
    done = _completed(run) if resume else None
    if done is not None:
        return done
    heading(f"stage {stage.index} '{stage.name}' from random weights (compare_from_scratch)")
    run.path.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, run.path)
    run_id = _start_child(tracker, run, name, parent_id, resume, stage.index)
    tracker.log_params({k: v for k, v in cfg.to_dict().items() if k != "stages"})
    result = StageResult(name, stage.index, run_id=run_id)
    status = "FAILED"
    try:
        result.exit_code = train(cfg, resume=resume, run_id=run_id, launcher=launcher)
        if result.exit_code == 0:
            _read_training(run, result)
            _mark_complete(run, result)
            status = "FINISHED"
        return result
    finally:
        tracker.close(status=status)


def _completed(run: RunDir) -> StageResult | None:
    """The result recorded in the run's ``STAGE_COMPLETE``, if it has one."""
    if not run.stage_complete.exists():
        return None
    return StageResult(**json.loads(run.stage_complete.read_text()))


def _read_training(run: RunDir, result: StageResult) -> None:
    """Fill in what training left in the run: final step, validation metrics, checkpoint."""
    result.step, result.val_metrics = final_metrics(run)
    result.checkpoint = str(final_checkpoint(run))


def _mark_complete(run: RunDir, result: StageResult) -> None:
    """Write ``STAGE_COMPLETE`` (atomically): what `_completed` reads back."""
    record = dataclasses.asdict(result)
    record.pop("skipped")
    _write_json(run.stage_complete, record)


def _start_child(tracker: Tracker, run: RunDir, name: str, parent_id: str | None,
                 resume: str | None, index: int) -> str | None:
    tags = {"lmforge.stage": name, "lmforge.stage_index": index}
    if parent_id and not parent_id.startswith("lmforge-pending-"):
        tags[PARENT_TAG] = parent_id
    run_id = tracker.start(run_name=name, run_id=run.read_run_id() if resume else None,
                           tags=tags, system_metrics=False)
    tracker.flush()
    run_id = tracker.run_id or run_id
    if run_id:
        run.write_run_id(run_id)
    return run_id or None


def final_checkpoint(run: RunDir) -> Path:
    """The stage's final (newest complete) checkpoint."""
    from lmforge.launch.train.checkpoint import find_resume

    folder = find_resume(run.checkpoints, "auto")
    if folder is None:
        raise FileNotFoundError(f"{run.checkpoints}: training ended without a complete "
                                "checkpoint; rerun with --resume auto")
    return folder


def final_metrics(run: RunDir) -> tuple[int | None, dict[str, float]]:
    """The last training attempt's step and final validation metrics (train_summary.json):
    ``val_metrics`` where training wrote them, else the last validation loss."""
    summary = json.loads(run.train_summary.read_text()) if run.train_summary.exists() else {}
    metrics = summary.get("val_metrics")
    if not metrics:
        history = summary.get("val_loss") or []
        metrics = {}
        if history:
            loss = float(history[-1][1])
            metrics = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    return summary.get("step"), {k: float(v) for k, v in metrics.items()
                                 if isinstance(v, (int, float))}


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


# -- what the user sees --------------------------------------------------------------


def describe_graph(cfg: RunConfig) -> str:
    """The stage graph as text (``lmforge run CONFIG --dry-run``)."""
    lines = [f"# stage graph of '{cfg.name}' in {RunDir.of(cfg.run_dir).path}",
             f"# hooks: {', '.join(hook_spec(h).name for h in cfg.hooks) or 'none'}; "
             f"hook_failure: {cfg.hook_failure}"]
    for stage in expand_stages(cfg):
        c = stage.config
        data = c.data
        task = getattr(data, "task", None)
        what = (f"task {task.kind} {task.train}" if task else
                "datasets " + ", ".join(d.name for d in data.datasets))
        lines.append(f"[{stage.index}] {stage.name}  ->  {stage.dir}")
        lines.append(f"    data      : {what} (seq_len {data.seq_len}) → {data.output_dir}")
        tok = c.tokenizer.model_path or f"trained here ({c.tokenizer.vocab_size} pieces)"
        lines.append(f"    tokenizer : {tok}")
        lines.append(f"    train     : {c.train.objective}, {c.train.max_steps} steps, lr "
                     f"{c.train.lr} {c.train.lr_schedule} (warmup {c.train.warmup_steps})")
        init, trainable = getattr(c, "init", None), getattr(c, "trainable", None)
        if init is not None:
            carry = ", ".join(f"{k} {getattr(init, k)}" for k in ("optimizer", "schedule",
                                                                   "loader")
                              if hasattr(init, k))
            lines.append(f"    init      : {init.source or 'random'}" +
                         (f" ({carry})" if carry else ""))
        if trainable is not None:
            lines.append(f"    trainable : {trainable.mode}")
        hooks = [hook_spec(h).name for h in c.hooks]
        if c.tracking.registered_model:
            hooks.append(f"register → {c.tracking.registered_model}")
        lines.append(f"    export    : {'yes' if c.export.enabled else 'no'}; hooks: "
                     f"{', '.join(hooks) or 'none'}" +
                     ("; compare_from_scratch" if stage.compare_from_scratch else ""))
    return "\n".join(lines)


def print_stages(graph: GraphResult) -> None:
    """Each stage's final validation metrics, and fine-tuned vs from-scratch side by side."""
    from lmforge.launch.redact import redact_text

    print("\n== stages ==")
    for r in graph.stages:
        state = "skipped (complete)" if r.skipped else (
            "done" if r.exit_code == 0 else f"stopped (exit {r.exit_code})")
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(r.val_metrics.items())
                          if "/" not in k)
        print(f"[{r.index}] {r.name:<14} {state:<18} step {r.step}  {shown}")
        if r.scratch_metrics is not None:
            for key in sorted(k for k in r.val_metrics if k in r.scratch_metrics
                              and "/" not in k):
                tuned, scratch = r.val_metrics[key], r.scratch_metrics[key]
                lower = key in LOWER_IS_BETTER
                better = tuned < scratch if lower else tuned > scratch
                print(f"      {key:<16} from previous stage {tuned:.4f}   from random init "
                      f"{scratch:.4f}   {'transfer helps' if better else 'no gain'}")
        if r.export_dir:
            print(f"      export: {r.export_dir}")
    print(f"run directory : {graph.run_dir}")
    print(f"MLflow        : {redact_text(graph.tracking_uri)}  (job run {graph.run_id})")
    if graph.exit_code != 0:
        print(f"resume        : lmforge run {RunDir(graph.run_dir).config} --resume auto")


# -- inside a cluster job ------------------------------------------------------------


def slurm_launcher(cfg: RunConfig, run_dir: Path, resume: str | None,
                   run_id: str | None) -> int:
    """A stage's training as one Slurm step: ``srun`` starts a worker per task (ranks from
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the batch script exports
    ``MASTER_ADDR``/``MASTER_PORT``). USR1 sent to this process (the batch shell forwards
    the pre-kill signal) goes on to the step: the ranks checkpoint and exit 75."""
    import signal
    import subprocess
    import sys

    command = ["srun", "--wait=120", "bash", "-c",
               'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID;'
               ' exec "$0" "$@"',
               sys.executable, "-m", "lmforge.launch.train.worker", "--run-dir", str(run_dir),
               "--resume", resume or "none"]
    if run_id:
        command += ["--run-id", run_id]
    step = subprocess.Popen(command)
    previous = signal.signal(signal.SIGUSR1, lambda *_: step.send_signal(signal.SIGUSR1))
    try:
        code = step.wait()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    summary = RunDir.of(run_dir).train_summary
    if code != 0 and summary.exists() and json.loads(summary.read_text()).get("preempted"):
        return REQUEUE_EXIT_CODE
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m lmforge.launch.stages --config FILE [--launcher local|slurm]``: the stage
    graph as the body of a submitted job (``slurm/stages.sbatch``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m lmforge.launch.stages")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local")
    parser.add_argument("--resume", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config)
        launcher = slurm_launcher if args.launcher == "slurm" else None
        return run_stages(cfg, resume=args.resume, launcher=launcher).exit_code
    except (FileNotFoundError, ValueError) as err:
        print(f"lmforge: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
