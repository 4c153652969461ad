"""``data.mix`` draws of each stage: planned by ``lmforge run --dry-run``, counted after
training from the checkpointed loader states.

A stage with ``init.loader: keep`` continues the previous stage's loader, so its draws
depend on where that one stopped: the plan carries each stage's planned final loader state
into the next (``pipeline/loader/draws.py``), and the count after training starts from the
loader state of the checkpoint the stage was started from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.launch.config import RunConfig
from lmforge.launch.config.run_config import steps_for_tokens
from lmforge.launch.config.stages import Stage
from lmforge.launch.tracking import Tracker

log = logging.getLogger("lmforge")


def run_samples(cfg: RunConfig, seq_len: int) -> int:
    """Training samples of a run: ``max_steps`` (or ``max_tokens``) × global batch."""
    train = steps_for_tokens(cfg.train, cfg.world_size, seq_len)
    return train.max_steps * train.sequences_per_step(cfg.world_size)


def planned_draws(stages: list[Stage]) -> dict[int, list[str]]:
    """The ``--dry-run`` lines of each stage that trains on a ``data.mix`` (by stage index):
    its sources' shares and the tokens it draws, continuing the previous stage's planned
    loader state where ``init.loader`` is ``keep``."""
    if not any(s.config.data.mix for s in stages):
        return {}  # the loader imports torch: only when there is something to plan
    from lmforge.pipeline.loader.draws import format_draws, plan_draws
    from lmforge.pipeline.loader.mix import Mix, MixError

    lines: dict[int, list[str]] = {}
    state: dict[str, Any] | None = None  # the previous stage's loader state at its end
    for stage in stages:
        cfg = stage.config
        keep = cfg.init.loader == "keep" and stage.index > 0
        if not cfg.data.mix:
            state = None
            continue
        try:
            mix = Mix(cfg.data.mix)
        except MixError as err:
            lines[stage.index] = [f"    data.mix  : draws unknown until the sources are "
                                  f"prepared ({err})"]
            state = None
            continue
        if keep and state is None:
            lines[stage.index] = ["    data.mix  : continues a loader state --dry-run cannot "
                                  "see (not a data.mix stage before it); draws from the start:"]
        try:
            plan = plan_draws(mix, run_samples(cfg, mix.seq_len), cfg.seed, cfg.data.loader,
                              state if keep else None)
        except ValueError as err:
            lines[stage.index] = [f"    WARNING: init.loader: keep cannot continue the previous "
                                  f"stage's loader ({err}); set init.loader=reset"]
            plan = plan_draws(mix, run_samples(cfg, mix.seq_len), cfg.seed, cfg.data.loader)
        lines.setdefault(stage.index, []).append(format_draws(mix, plan, indent="    "))
        state = plan.state
    return lines


def loader_state(checkpoint: str | Path) -> dict[str, Any]:
    """The training loader's state a checkpoint holds (rank 0's model-states file)."""
    from lmforge.launch.train.checkpoint import read_model_states

    return read_model_states(Path(checkpoint))["loader"]


def report_draws(cfg: RunConfig, checkpoint: str, tracker: Tracker) -> None:
    """After a ``data.mix`` stage: per source, the tokens it drew (from the loader state of
    the stage's final checkpoint, less the one it continued under ``init.loader: keep``),
    printed and logged as ``data_mix/<source>/tokens_drawn``."""
    from lmforge.pipeline.contract.dataset_manifest import ManifestError
    from lmforge.pipeline.loader.draws import drawn_between
    from lmforge.pipeline.loader.mix import Mix, MixError

    try:
        mix = Mix(cfg.data.mix)
        start = None
        if cfg.init.loader == "keep" and cfg.init.source:
            from lmforge.launch.train.warm_start import checkpoint_folder

            start = loader_state(checkpoint_folder(Path(cfg.init.source)))
        draws = drawn_between(mix, cfg.seed, start, loader_state(checkpoint), cfg.data.loader)
    except (MixError, ManifestError, ValueError, KeyError, OSError, RuntimeError) as err:
        log.warning("data.mix: could not count the draws of %s (%s)", checkpoint, err)
        return
    total = sum(d.tokens_drawn for d in draws) or 1
    print("data.mix drawn by this stage: " + "; ".join(
        f"{d.label} {d.tokens_drawn:,} tokens ({d.tokens_drawn / total:.1%}, "
        f"{d.epochs:.2f} epochs)" for d in draws), flush=True)
    tracker.log_metrics({f"data_mix/{d.label}/tokens_drawn": float(d.tokens_drawn)
                         for d in draws}, step=0)
