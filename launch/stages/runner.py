"""The one runner: ``lmforge run`` and every submitted job (local, Slurm, Ray) run a config
through :func:`run_graph`.

Each stage, in order: ``on_stage_start`` → prepare its data → train (warm-started as its
``init`` section says; processes started by the launcher) → export (``export.enabled``),
verified, and ``on_export`` → the same stage from random weights when
``compare_from_scratch`` → ``on_stage_end`` → ``STAGE_COMPLETE``. A stage boundary is a
complete checkpoint: the next stage starts from the previous stage's final one.
``--resume auto`` skips complete stages and resumes the first incomplete one from its own
newest checkpoint, so a killed or requeued job continues inside the right stage.

A config without ``stages:`` is a graph of one stage in the run directory itself, tracked as
one MLflow run, and ends with the model family's demonstration (``generations.json``) and the
run's summary. With ``stages:``, MLflow gets a parent run and a child run per stage
(``launch/stages/mlflow_runs.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from lmforge.launch.commands import export, generate, heading, prepare_data, train
from lmforge.launch.config import RunConfig
from lmforge.launch.config.stages import Stage
from lmforge.launch.eval.curves import write_curves
from lmforge.launch.rundir import RunDir, StageInfo
from lmforge.launch.stages.graph import GraphResult, StageResult, plan, print_result
from lmforge.launch.stages.hooks import StageContext, StageHooks
from lmforge.launch.stages.launchers import Launcher, local_launcher
from lmforge.launch.stages.mix_draws import report_draws
from lmforge.launch.stages.mlflow_runs import end_run, ended_by, start_job_run, start_stage_run
from lmforge.launch.tracking import Tracker
from lmforge.pipeline.folder_lock import folder_lock

log = logging.getLogger("lmforge")


def run_graph(cfg: RunConfig, resume: str | None = None,
              launcher: Launcher = local_launcher) -> GraphResult:
    """Runs every stage of ``cfg`` in order (see the module docstring).

    Args:
        cfg: Any run config (with or without ``stages:``).
        resume: ``auto`` (skip complete stages, resume the first incomplete one) or
            ``None``/``none`` (every stage from the start).
        launcher: Starts each stage's training processes; local processes on this machine by
            default (``slurm_launcher`` in a Slurm job, Ray Train in a Ray job).

    Raises:
        ValueError: ``--resume`` names a checkpoint (ambiguous across stages), or a hook
            cannot be loaded.
        HookError: A hook failed under ``hook_failure: stop``.
        FolderLocked: Another process runs in the run directory (names it).
    """
    stages = plan(cfg)
    single = not cfg.stages
    if resume not in (None, "none", "auto") and not single:  # one stage: its checkpoint
        raise ValueError(f"--resume {resume}: a stage graph resumes with --resume auto "
                         "(the first incomplete stage, from its newest checkpoint) or none")
    resume = None if resume in (None, "none") else resume
    extra = ("register",) if cfg.tracking.registered_model else ()
    hooks = [StageHooks.from_config(s.config, extra) for s in stages]  # import errors now
    job = RunDir.of(cfg.run_dir)
    with folder_lock(job.path, "lmforge run"):  # one job per run directory
        return _run_locked(cfg, stages, hooks, job, resume, launcher)


def _run_locked(cfg: RunConfig, stages: list[Stage], hooks: list[StageHooks], job: RunDir,
                resume: str | None, launcher: Launcher) -> GraphResult:
    single = not cfg.stages
    cfg.save(job.config)
    tracker, job_id = start_job_run(cfg, resume is not None,
                                    None if single else [s.name for s in stages])
    results: list[StageResult] = []
    generations: list[str] = []
    code = 1
    try:
        for stage, stage_hooks in zip(stages, hooks, strict=True):
            stage = _after(stage, results[-1] if results else None)
            result = run_stage(stage, stage_hooks, job.path, resume, launcher,
                               job_run=(tracker, job_id) if single else None, parent_id=job_id)
            results.append(result)
            if result.exit_code != 0:
                code = result.exit_code
                log.error("stage '%s' exited with status %d; the job stops here (continue "
                          "with --resume auto)", stage.name, code)
                break
            if not single:
                tracker.log_metrics({f"{stage.name}/{k}": v
                                     for k, v in result.val_metrics.items()}, step=stage.index)
        else:
            if single:
                generations = demonstrate(cfg, tracker)
            code = 0
    finally:
        end_run(tracker, code)
    job_id = tracker.run_id or job_id  # the real id, also when MLflow answered late
    if job_id:
        job.write_run_id(job_id)
    graph = GraphResult(job.path, tracker.uri, job_id, results, code, single, generations)
    print_result(graph)
    return graph


def _after(stage: Stage, previous: StageResult | None) -> Stage:
    """The stage with ``init.source`` pointing at the previous stage's exact final checkpoint
    (the expansion named its checkpoints folder)."""
    init = stage.config.init
    if previous is None or not previous.checkpoint or init.source is None:
        return stage
    if Path(init.source).resolve() != Path(previous.checkpoint).parent.resolve():
        return stage
    config = dataclasses.replace(stage.config,
                                 init=dataclasses.replace(init, source=previous.checkpoint))
    return dataclasses.replace(stage, config=config)


def run_stage(stage: Stage, hooks: StageHooks, job_dir: Path, resume: str | None,
              launcher: Launcher = local_launcher,
              job_run: tuple[Tracker, str | None] | None = None,
              parent_id: str | None = None) -> StageResult:
    """One stage: prepare → train → export → from scratch → ``STAGE_COMPLETE``.

    Args:
        stage: The stage.
        hooks: Its hooks.
        job_dir: The job's run directory.
        resume: ``auto``, a checkpoint folder (a graph of one stage), or None.
        launcher: Starts the training processes.
        job_run: The job's run when this stage is the whole job (no child run); else the
            stage gets a child run of ``parent_id``.
        parent_id: The job's MLflow run.
    """
    cfg, run = stage.config, RunDir.of(stage.dir)
    done = run.read_stage_complete() if resume == "auto" else None
    if done is not None:
        heading(f"stage {stage.index} '{stage.name}': complete, skipped")
        return StageResult(**done.to_dict(), skipped=True)
    run.stage_complete.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    if job_run is None:
        heading(f"stage {stage.index} '{stage.name}' ({cfg.train.objective}, "
                f"{cfg.train.max_steps} steps) in {run.path}")
        tracker, run_id = start_stage_run(cfg, stage.name, stage.index, parent_id,
                                          resume is not None)
    else:
        (tracker, run_id), parent_id = job_run, None
    run.write_stage_info(StageInfo(stage.name, stage.index, str(job_dir), parent_id, run_id,
                                   tracker.uri))
    context = StageContext(stage.name, stage.index, run.path, job_dir, cfg,
                           parent_run_id=parent_id, run_id=run_id, tracking_uri=tracker.uri)
    result = StageResult(stage.name, stage.index, run_id=run_id)
    with ended_by(tracker if job_run is None else None, result):
        hooks.on_stage_start(context)
        prepare_data(cfg, tracker)
        tracker.flush()
        result.exit_code = train(cfg, resume=resume, run_id=run_id, launcher=launcher)
        if result.exit_code != 0:
            return result
        _read_training(run, result)
        if cfg.data.mix:
            report_draws(cfg, result.checkpoint, tracker)
        tracker.log_metrics({f"final/{k}": v for k, v in result.val_metrics.items()},
                            step=result.step or 0)
        if write_curves(run.metrics, run.curves, cfg.name) is not None:
            tracker.log_artifact(run.curves)
        context.checkpoint, context.step = Path(result.checkpoint), result.step
        context.metrics = dict(result.val_metrics)
        if cfg.export.enabled:
            context.export_dir = export(cfg)
            tracker.log_artifacts(context.export_dir, "export")
            tracker.flush()
            hooks.on_export(context)
        if stage.compare_from_scratch:
            scratch = run_from_scratch(stage, parent_id, resume, launcher)
            if scratch.exit_code != 0:
                result.exit_code = scratch.exit_code
                return result
            result.scratch_metrics = scratch.val_metrics
            tracker.log_metrics({f"from_scratch/{k}": v for k, v in scratch.val_metrics.items()},
                                step=result.step or 0)
        tracker.flush()
        hooks.on_stage_end(context)
        result.export_dir = str(context.export_dir) if context.export_dir else None
        run.write_stage_complete(result.record())
        return result


def run_from_scratch(stage: Stage, parent_id: str | None, resume: str | None,
                     launcher: Launcher = local_launcher) -> StageResult:
    """The stage again from random weights, in ``<stage dir>/from_scratch`` (same data)."""
    cfg = stage.from_scratch()
    run = RunDir.of(cfg.run_dir)
    name = f"{stage.name}-from_scratch"
    done = run.read_stage_complete() if resume == "auto" else None
    if done is not None:
        return StageResult(**done.to_dict())
    heading(f"stage {stage.index} '{stage.name}' from random weights (compare_from_scratch)")
    run.path.mkdir(parents=True, exist_ok=True)
    tracker, run_id = start_stage_run(cfg, name, stage.index, parent_id, resume is not None)
    result = StageResult(name, stage.index, run_id=run_id)
    with ended_by(tracker, result):
        result.exit_code = train(cfg, resume=resume, run_id=run_id, launcher=launcher)
        if result.exit_code == 0:
            _read_training(run, result)
            run.write_stage_complete(result.record())
    return result


def demonstrate(cfg: RunConfig, tracker: Tracker) -> list[str]:
    """The family's demonstration with the trained model (``generate``), kept in
    ``generations.json`` and MLflow; returns the generated texts."""
    run = RunDir.of(cfg.run_dir)
    records = generate(cfg)
    run.final_generations.write_text(json.dumps(records, indent=2), encoding="utf-8")
    tracker.log_artifact(run.final_generations)
    return [record["text"] for record in records]


def _read_training(run: RunDir, result: StageResult) -> None:
    """Fill in what training left in the run: final step, validation metrics, checkpoint."""
    result.step, result.val_metrics = final_metrics(run)
    result.checkpoint = str(final_checkpoint(run))


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
    summary = run.read_train_summary()
    if summary is None:
        return None, {}
    metrics = summary.val_metrics
    if not metrics and summary.val_loss:
        loss = float(summary.val_loss[-1][1])
        metrics = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    return summary.step, {k: float(v) for k, v in metrics.items()
                          if isinstance(v, (int, float))}
