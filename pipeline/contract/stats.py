"""The typed reader of a prepared dataset's ``stats.json``.

``prepare`` writes stats.json beside manifest.json (pretraining data: `prepare.stats.summarize`;
task data: `prepare.task_manifest.task_stats`); `launch/` reads it through `PrepareStats` to
log the pipeline's counts, throughput and plots. Only the keys both writers share are read
here; the rest of the file (steps, histograms, examples, seconds) is for people.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATS_FILE = "stats.json"


@dataclass(frozen=True)
class DocumentCounts:
    """Documents (task data: records) read from one dataset's files and kept by cleaning."""

    read_docs: int
    read_bytes: int
    clean_docs: int


@dataclass(frozen=True)
class RuleRemovals:
    """What one rule of the pipeline removed (an entry of stats.json's ``removed``)."""

    step: str
    rule: str  # the step, or `<step>.<rule>` for a step with several rules
    removed_docs: int
    removed_bytes: int
    modified_docs: int
    datasets: dict[str, dict[str, int]]  # dataset name -> the same three counts


@dataclass(frozen=True)
class PrepareStats:
    """What a prepare run counted, as stats.json records it."""

    file: Path  # the stats.json read
    datasets: dict[str, DocumentCounts]  # per dataset name
    tokens: dict[str, dict[str, int]]  # dataset name -> split -> tokens in its shards
    bad_input: dict[str, int]  # bad-input kind -> records skipped
    dedup_removed_docs: int  # 0 for task data, which is not deduplicated
    throughput: dict[str, float]  # tokens_per_s, input_bytes_per_s
    plots: list[str] = field(default_factory=list)  # PNG files, relative to the folder
    removed: list[RuleRemovals] = field(default_factory=list)  # per rule, in pipeline order

    @property
    def plot_paths(self) -> list[Path]:
        """The plot files as paths beside stats.json."""
        return [self.file.parent / plot for plot in self.plots]

    @classmethod
    def read(cls, folder: str | Path) -> PrepareStats | None:
        """The stats of the dataset prepared in `folder`; None if it has no stats.json.

        Raises:
            ValueError: stats.json is not the JSON prepare writes (names the file and key).
        """
        path = Path(folder) / STATS_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read it ({err}); re-run `lmforge prepare` "
                             "to write it again") from err
        try:
            return cls.from_dict(raw, path)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: not the stats.json prepare writes ({err!r}); re-run "
                             "`lmforge prepare` to write it again") from err

    @classmethod
    def from_dict(cls, raw: dict[str, Any], file: Path) -> PrepareStats:
        """Parse the mapping read from `file`; missing optional keys read as empty."""
        datasets = {
            name: DocumentCounts(int(c.get("read_docs", 0)), int(c.get("read_bytes", 0)),
                                 int(c.get("clean_docs", 0)))
            for name, c in raw.get("datasets", {}).items()
        }
        tokens = {name: {split: int(n) for split, n in splits.items()}
                  for name, splits in raw.get("tokens", {}).items()}
        return cls(
            file=file,
            datasets=datasets,
            tokens=tokens,
            bad_input={k: int(v) for k, v in raw.get("bad_input", {}).get("counts", {}).items()},
            dedup_removed_docs=int(raw.get("dedup", {}).get("removed_docs", 0)),
            throughput={k: float(v) for k, v in raw.get("throughput", {}).items()},
            plots=[str(p) for p in raw.get("files", {}).get("plots", [])],
            removed=[RuleRemovals(
                str(r["step"]), str(r["rule"]), int(r["removed_docs"]), int(r["removed_bytes"]),
                int(r["modified_docs"]),
                {name: {k: int(v) for k, v in counts.items()}
                 for name, counts in r["datasets"].items()})
                for r in raw.get("removed", [])],
        )
