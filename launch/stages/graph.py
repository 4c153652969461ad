"""The stage graph of a run, its results, and what the user sees of them.

Every run is a stage graph: a config with ``stages:`` expands to one stage per entry
(``launch/config/stages.py``); a config without is a graph of one stage, the config itself,
whose directory is the run directory (so ``config.yaml``, ``checkpoints/``, ``export/`` stay
where ``lmforge train|export|generate`` look for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.launch.config import RunConfig
from lmforge.launch.config.stages import Stage, expand_stages, hook_spec
from lmforge.launch.eval.curves import score_lines
from lmforge.launch.redact import redact_text
from lmforge.launch.rundir import RunDir, StageRecord
from lmforge.launch.stages.mix_draws import planned_draws

# Metrics where a lower value is better (the rest: higher is better).
LOWER_IS_BETTER = ("val_loss", "val_ppl")


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages of ``cfg`` in order: its ``stages:``, or the config itself as one stage."""
    return expand_stages(cfg) or [Stage(0, cfg.name, cfg)]


@dataclass
class StageResult(StageRecord):
    """How a stage ended (``STAGE_COMPLETE`` holds the same, less ``skipped``)."""

    skipped: bool = False
    """The stage was complete already (``--resume auto``)."""

    def record(self) -> StageRecord:
        """What ``STAGE_COMPLETE`` keeps of this result."""
        return StageRecord.from_dict(self.to_dict())


@dataclass
class GraphResult:
    """The whole job: where it ran and how each stage ended."""

    run_dir: Path
    tracking_uri: str
    run_id: str | None
    stages: list[StageResult]
    exit_code: int
    single: bool = False
    """A config without ``stages:`` (a graph of one stage in the run directory)."""
    generations: list[str] = field(default_factory=list)
    """The family's demonstration at the end of a single-stage run (``generations.json``)."""

    @property
    def export_dir(self) -> Path | None:
        """The last stage's export, if it wrote one."""
        last = self.stages[-1].export_dir if self.stages else None
        return Path(last) if last else None


# -- what the user sees --------------------------------------------------------------


def describe_graph(cfg: RunConfig) -> str:
    """The stage graph as text (``lmforge run CONFIG --dry-run``)."""
    lines = [f"# stage graph of '{cfg.name}' in {RunDir.of(cfg.run_dir).path}",
             f"# hooks: {', '.join(hook_spec(h).name for h in cfg.hooks) or 'none'}; "
             f"hook_failure: {cfg.hook_failure}"]
    stages = plan(cfg)
    draws = planned_draws(stages)
    for stage in stages:
        c = stage.config
        data = c.data
        task = data.task
        what = (f"task {task.kind} {task.train}" if task else
                "datasets " + ", ".join(d.name for d in data.datasets))
        lines.append(f"[{stage.index}] {stage.name}  ->  {stage.dir}")
        if data.mix:
            lines.append(f"    data      : data.mix of {len(data.mix)} prepared datasets "
                         f"(seq_len {data.seq_len}), nothing prepared")
            lines += draws.get(stage.index, [])
        else:
            lines.append(f"    data      : {what} (seq_len {data.seq_len}) → {data.output_dir}")
        tok = c.tokenizer.model_path or ("the data.mix sources' (one, checked)" if data.mix
                                         else f"trained here ({c.tokenizer.vocab_size} pieces)")
        lines.append(f"    tokenizer : {tok}")
        lines.append(f"    train     : {c.train.objective}, {c.train.max_steps} steps, lr "
                     f"{c.train.lr} {c.train.lr_schedule} (warmup {c.train.warmup_steps})")
        init = c.init
        carry = ", ".join(f"{k} {getattr(init, k)}" for k in ("optimizer", "schedule", "loader"))
        lines.append(f"    init      : {init.source or 'random'} ({carry})")
        lines.append(f"    trainable : {c.trainable.mode}")
        hooks = [hook_spec(h).name for h in c.hooks]
        if c.tracking.registered_model:
            hooks.append(f"register → {c.tracking.registered_model}")
        lines.append(f"    export    : {'yes' if c.export.enabled else 'no'}; hooks: "
                     f"{', '.join(hooks) or 'none'}" +
                     ("; compare_from_scratch" if stage.compare_from_scratch else ""))
    return redact_text("\n".join(lines))  # sources, paths and URIs may carry credentials


def print_result(graph: GraphResult) -> None:
    """The end of a job: the run's summary (one stage) or every stage's (a graph)."""
    if graph.single:
        print_summary(graph)
    else:
        print_stages(graph)


def print_summary(graph: GraphResult) -> None:
    """Where a single-stage run left everything, and how to go on."""
    print("\n== done ==")
    print(f"run directory : {graph.run_dir}")
    uri = redact_text(graph.tracking_uri)
    print(f"MLflow store  : {uri}  (run {graph.run_id})")
    if graph.export_dir is not None:
        print(f"HF export     : {graph.export_dir}")
    if graph.stages and score_lines(graph.stages[-1].val_metrics):
        print("evaluation    : at the last step (chance: the accuracy of guessing)")
        for line in score_lines(graph.stages[-1].val_metrics):
            print(f"  {line}")
    if RunDir(graph.run_dir).curves.is_file():
        print(f"curves        : {RunDir(graph.run_dir).curves}")
    print(f"resume        : lmforge train {RunDir(graph.run_dir).config} --resume auto")
    if graph.tracking_uri.startswith("sqlite:"):
        print(
            "open the UI   : mlflow ui --backend-store-uri "
            f"{graph.tracking_uri} --host 127.0.0.1 --port 5000   # then http://127.0.0.1:5000"
        )
    else:
        print(f"open the UI   : {uri}")


def print_stages(graph: GraphResult) -> None:
    """Each stage's final validation metrics, and fine-tuned vs from-scratch side by side."""
    print("\n== stages ==")
    for r in graph.stages:
        state = "skipped (complete)" if r.skipped else (
            "done" if r.exit_code == 0 else f"stopped (exit {r.exit_code})")
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(r.val_metrics.items())
                          if "/" not in k)
        print(f"[{r.index}] {r.name:<14} {state:<18} step {r.step}  {shown}")
        for line in score_lines(r.val_metrics):
            print(f"      {line}")
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
