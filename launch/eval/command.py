"""``lmforge eval EXPORT|RUN_DIR --tasks name=path ... [--json] [--limit N]``.

Scores the tasks on the export with ``transformers`` and prints a table (with ``--json``,
only ``{task: {metric: value}}`` on stdout); logs ``eval/<task>/<metric>`` to the export's
MLflow run when the run directory recorded one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmforge.launch.eval.task_files import task_from_spec
from lmforge.launch.eval.tasks import EvalTask

HELP = "score eval tasks (multiple choice, cloze) on a Hugging Face export"


def build_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``eval`` to the ``lmforge`` subcommands (``sub`` from ``add_subparsers``)."""
    cmd = sub.add_parser("eval", help=HELP, description=HELP)
    cmd.add_argument("target", help="an export folder, or a run directory (its export; for a "
                                    "stage graph, the last stage's)")
    cmd.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                     help="name=path.jsonl, name=task.yaml, or a bare path (a .jsonl named by "
                          "its stem, an lm-evaluation-harness .yaml by its task: key)")
    cmd.add_argument("--json", action="store_true",
                     help="print {task: {metric: value}} alone on stdout")
    cmd.add_argument("--limit", type=int, default=None, help="score the first N examples")
    cmd.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    cmd.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    return cmd


def format_table(tasks: list[EvalTask], metrics: dict[str, dict[str, float]],
                 limit: int | None) -> str:
    """One line per task and metric, with the examples scored and the chance level."""
    lines = [f"{'task':<24} {'n':>5} {'metric':<14} {'value':>12} {'chance':>8}"]
    for task in tasks:
        n = len(task.limited(limit).examples)
        for name, value in metrics[task.name].items():
            chance = f"{task.limited(limit).chance:8.4f}" if name.startswith("acc") and \
                task.kind == "multiple_choice" else f"{'':8}"
            shown = f"{value:>12.4f}" if abs(value) < 1e6 else f"{value:>12.4e}"
            lines.append(f"{task.name:<24} {n:>5} {name:<14} {shown} {chance}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """Runs ``lmforge eval``; returns the exit code. ``overrides`` (``--section.key=value``)
    are refused: an export has no run config to override."""
    from lmforge.launch.eval.on_export import load_export, log_scores, resolve_target
    from lmforge.launch.eval.scoring import score_task

    if overrides:
        raise ValueError(f"lmforge eval takes no config overrides, got {overrides}")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: must be at least 1, got {value}")
    tasks = [task_from_spec(spec) for spec in args.tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks: task names repeat ({', '.join(names)}); name them "
                         "name=path")
    target = resolve_target(args.target)
    print(f"lmforge eval: {target.export_dir}", file=sys.stderr)
    encoder, loglikelihood = load_export(target.export_dir, args.batch_size, args.device)
    metrics = {t.name: score_task(t, encoder, loglikelihood, args.limit).metrics()
               for t in tasks}
    run_id = log_scores(target, metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_table(tasks, metrics, args.limit))
    if run_id:
        print(f"lmforge eval: logged to MLflow run {run_id}", file=sys.stderr)
    return 0
