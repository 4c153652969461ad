"""What a run draws from each ``data.mix`` source, from the loader's own order.

``plan_draws`` answers before training (``--dry-run``, per stage of a graph): it builds the
training loader a run would build (no shard is read: the mixture is arithmetic), continues a
previous stage's loader state when given one (``init.loader: keep``), and moves it on by the
run's samples. ``drawn_between`` answers after training, from two checkpointed loader
states. Both count per source; tokens are samples × ``seq_len`` (input positions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmforge.pipeline.config import LoaderConfig
from lmforge.pipeline.loader.mix import Mix
from lmforge.pipeline.loader.shard_loader import ShardLoader


@dataclass(frozen=True)
class SourceDraw:
    """What a run draws from one ``data.mix`` source."""

    label: str
    share: float
    """The source's share of the samples by weight (or token budget), before any cap."""
    tokens_available: int
    """Input tokens of one pass over the source's train split (samples × seq_len)."""
    tokens_drawn: int
    """Input tokens the run's samples take from the source."""
    capped: bool
    """A dataset of the source is at its max_epochs cap by the end of the run."""

    @property
    def epochs(self) -> float:
        """Passes over the source the run makes."""
        return self.tokens_drawn / self.tokens_available


@dataclass
class DrawPlan:
    """The draws of a run of ``samples`` training samples."""

    samples: int
    sources: list[SourceDraw]
    stop: int | None
    """The run's sample at which every source is at its cap (training stops with an error
    there); None when the run never gets there."""
    state: dict[str, Any]
    """The loader state after the run (what ``init.loader: keep`` hands the next stage)."""


def training_loader(mix: Mix, seed: int, loader: LoaderConfig | None = None) -> ShardLoader:
    """The train-split loader a run over ``mix`` builds (global order only: one rank of one
    sample per batch; tokenizer files are not hashed again)."""
    config = dataclasses.replace(loader or LoaderConfig(), verify_checksums=False,
                                 num_workers=0)
    return ShardLoader(mix, "train", 1, seed=seed, config=config)


def _per_source(mix: Mix, ldr: ShardLoader, before: list[int], after: list[int]
                ) -> list[SourceDraw]:
    view = ldr.manifest
    counts = [d.samples for d in ldr.datasets]
    total = sum(ldr.weights)
    draws = []
    for i, source in enumerate(mix.sources):
        mine = [d for d, s in enumerate(view.source_of) if s == i]
        draws.append(SourceDraw(
            source.label,
            sum(ldr.weights[d] for d in mine) / total,
            sum(counts[d] for d in mine) * view.seq_len,
            sum(after[d] - before[d] for d in mine) * view.seq_len,
            any(view.caps[d] is not None and after[d] >= view.caps[d] for d in mine),
        ))
    return draws


def plan_draws(mix: Mix, samples: int, seed: int = 0, loader: LoaderConfig | None = None,
               start: dict[str, Any] | None = None) -> DrawPlan:
    """Per source, the tokens a run's ``samples`` training samples draw, exactly as the
    loader will (weights, caps, and the continued state).

    Args:
        mix: The run's ``data.mix``.
        samples: Training samples of the run (``max_steps`` × global batch).
        seed: The run's seed.
        loader: The run's ``data.loader`` section (shuffle settings must match ``start``).
        start: A loader state to continue (the previous stage's, ``init.loader: keep``).

    Raises:
        ValueError: ``start`` belongs to another order (other shards, seed or shuffle).
    """
    ldr = training_loader(mix, seed, loader)
    if start is not None:
        ldr.load_state_dict(start)
    before, after, left = ldr.drawn(), ldr.drawn(samples), ldr.samples_left()
    ldr.advance(samples)
    return DrawPlan(samples, _per_source(mix, ldr, before, after),
                    left if left is not None and left < samples else None, ldr.state_dict())


def drawn_between(mix: Mix, seed: int, start: dict[str, Any] | None, end: dict[str, Any],
                  loader: LoaderConfig | None = None) -> list[SourceDraw]:
    """Per source, what a run drew between two loader states it checkpointed (``start``
    None: from the beginning), e.g. a stage's final state and the one it continued."""
    first = training_loader(mix, seed, loader)
    if start is not None:
        first.load_state_dict(start)
    last = training_loader(mix, seed, loader)
    last.load_state_dict(end)
    return _per_source(mix, last, first.drawn(), last.drawn())


def format_draws(mix: Mix, plan: DrawPlan, indent: str = "") -> str:
    """The ``--dry-run`` lines of a ``data.mix``: per source its share, tokens available,
    tokens the run draws and the epochs that is; a warning per capped source and when every
    source is capped before the run ends."""
    seq = mix.seq_len
    lines = [f"# data.mix: {plan.samples:,} samples x seq_len {seq} "
             f"= {plan.samples * seq:,} tokens drawn (nothing is prepared)"]
    for i, d in enumerate(plan.sources):
        source = mix.sources[i]
        given = (f"weight {source.weight:g}" if source.weight is not None
                 else f"tokens {source.tokens:,}")
        cap = source.max_epochs
        lines.append(f"  data.mix[{i}] {d.label}: {given} ({d.share:.1%}), "
                     f"{d.tokens_available:,} tokens available, {d.tokens_drawn:,} drawn = "
                     f"{d.epochs:.2f} epochs" + (f" (max_epochs {cap:g})" if cap else ""))
        if d.capped:
            lines.append(f"  WARNING: data.mix[{i}] {d.label} reaches max_epochs={cap:g}; "
                         "the other sources fill its share after that")
    if plan.stop is not None:
        lines.append(f"  WARNING: every source is at its max_epochs after {plan.stop:,} "
                     "samples; training would stop there: raise max_epochs or lower "
                     "train.max_steps")
    return "\n".join(indent + line for line in lines)
