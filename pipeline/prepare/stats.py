"""Aggregating per-item phase results into stats.json and plots.

The pipeline never talks to MLflow: `launch/` logs `stats.json` and the PNG files listed
under `files` in it (and in the manifest's `stats`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.pipeline.contract.dataset_manifest import DatasetInfo
from lmforge.pipeline.durable import write_atomic
from lmforge.pipeline.prepare.removals import merge_samples, removal_table
from lmforge.pipeline.prepare.results import BadInput, CleanResult, DedupResult, EncodeResult
from lmforge.pipeline.prepare.steps import StepStats

MAX_REPORTED_EXAMPLES = 200



def merge_bad_input(reports: list[BadInput], empty_files: list[str]) -> dict[str, Any]:
    """Bad records of every read chunk (corpus or task data): counts by kind, plus empty
    files, and the first examples with file and line (stats.json's ``bad_input``)."""
    counts: dict[str, int] = {}
    examples: list[dict] = []
    for report in reports:
        for kind, n in report.counts.items():
            counts[kind] = counts.get(kind, 0) + n
        examples.extend(report.examples)
    if empty_files:
        counts["empty_file"] = len(empty_files)
        examples.extend({"kind": "empty_file", "file": f, "line": 0, "detail": ""}
                        for f in empty_files)
    return {"counts": counts, "examples": examples[:MAX_REPORTED_EXAMPLES]}

def summarize(
    clean_results: list[CleanResult],
    dedup_results: list[DedupResult],
    encode_results: list[EncodeResult],
    manifest_datasets: dict[str, DatasetInfo],
    empty_files: list[str],
    seconds: dict[str, float],
    near_dedup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Counts per phase, step, dataset and bad-input kind, plus throughput; `near_dedup`
    (`near_dedup.near_dedup_stats`, when on) goes in as it is.

    Returns:
        The full stats (stats.json, read back by `contract.stats.PrepareStats`);
        `summary_for_manifest` picks the short part.
    """
    steps: dict[str, StepStats] = {}
    per_dataset: dict[str, dict[str, int]] = {}
    for r in clean_results:
        ds = per_dataset.setdefault(r.dataset, {"read_docs": 0, "read_bytes": 0,
                                                "clean_docs": 0, "clean_bytes": 0})
        ds["read_docs"] += r.read.docs
        ds["read_bytes"] += r.read.bytes
        ds["clean_docs"] += r.kept.docs
        ds["clean_bytes"] += r.kept.bytes
        for name, counts in r.steps.items():
            steps.setdefault(name, StepStats()).add(StepStats(**counts))
    dedup = {
        "removed_docs": sum(r.removed_docs for r in dedup_results),
        "removed_bytes": sum(r.removed_bytes for r in dedup_results),
    }
    hist = [0] * 40
    for r in encode_results:
        hist = [a + b for a, b in zip(hist, r.doc_tokens_log2_hist, strict=True)]
    tokens = {
        name: {split: s.tokens for split, s in d.splits.items()}
        for name, d in manifest_datasets.items()
    }
    total_tokens = sum(sum(v.values()) for v in tokens.values())
    total_bytes = sum(d["read_bytes"] for d in per_dataset.values())
    wall = sum(seconds.values())
    return {
        "datasets": per_dataset,
        "steps": {name: vars(s) for name, s in steps.items()},
        "dedup": dedup,
        **({"near_dedup": near_dedup} if near_dedup else {}),
        "removed": removal_table(clean_results, dedup_results, near_dedup),
        "removed_samples": merge_samples(clean_results),
        "bad_input": merge_bad_input([r.bad_input for r in clean_results], empty_files),
        "tokens": tokens,
        "padding_tokens": {
            name: {split: s.padding_tokens for split, s in d.splits.items()}
            for name, d in manifest_datasets.items()
        },
        "doc_tokens_log2_hist": hist,
        "encode_nodes": sorted({r.node for r in encode_results if r.node}),
        "seconds": seconds,
        "throughput": {
            "tokens_per_s": total_tokens / wall if wall else 0.0,
            "input_bytes_per_s": total_bytes / wall if wall else 0.0,
        },
    }


def summary_for_manifest(stats: dict[str, Any]) -> dict[str, Any]:
    """The short form of the stats stored in manifest.json."""
    return {
        "documents": {
            name: {"read": d["read_docs"], "after_cleaning": d["clean_docs"]}
            for name, d in stats["datasets"].items()
        },
        "steps": stats["steps"],
        "dedup": stats["dedup"],
        **({"near_dedup": {k: stats["near_dedup"][k] for k in
                           ("removed_docs", "removed_bytes", "datasets")}}
           if "near_dedup" in stats else {}),
        "bad_input": stats["bad_input"]["counts"],
        "tokens": stats["tokens"],
        "files": stats.get("files", {}),
    }


@dataclass(frozen=True)
class BarPlot:
    """One PNG bar chart of the prepared dataset (plain data: drawn on a phase worker)."""

    file: str  # name inside the plots folder
    title: str
    ylabel: str
    labels: list[str]
    values: list[int]
    xlabel: str = ""
    label_rotation: int = 30
    stacks: dict[str, list[int]] = field(default_factory=dict)
    """Bars split by series (dataset name -> values), stacked and drawn horizontally (one
    row per label, `ylabel` on the x axis); `values` are their sums."""


def plots_of(stats: dict[str, Any]) -> list[BarPlot]:
    """The three plots: document length histogram (tokens, log2 bins), tokens per dataset
    and split, documents removed per filter (cleaning steps, dedup, bad input)."""
    hist = stats["doc_tokens_log2_hist"]
    last = max((i for i, n in enumerate(hist) if n), default=0)
    tokens = {f"{name}/{split}": n for name, splits in stats["tokens"].items()
              for split, n in splits.items()}
    removed = {name: s["removed_docs"] for name, s in stats["steps"].items()}
    removed["dedup"] = stats["dedup"]["removed_docs"]
    if "near_dedup" in stats:
        removed["near_dedup"] = stats["near_dedup"]["removed_docs"]
    removed.update({f"bad:{k}": v for k, v in stats["bad_input"]["counts"].items()})
    return [
        BarPlot("doc_length_hist.png", "Document length", "documents",
                [f"{2**i}" for i in range(last + 1)], hist[: last + 1],
                xlabel="document length in tokens (lower bound of log2 bin)",
                label_rotation=60),
        BarPlot("tokens_per_source.png", "Tokens per source", "tokens",
                list(tokens), list(tokens.values())),
        BarPlot("removed_per_filter.png", "Documents removed per filter",
                "documents removed", list(removed), list(removed.values())),
        *removal_plots(stats.get("removed", [])),
    ]


def removal_plots(table: list[dict[str, Any]]) -> list[BarPlot]:
    """Documents and bytes removed per rule (stats.json's ``removed``), in pipeline order,
    stacked by dataset."""
    rules = [e["rule"] if len(e["rule"]) <= 32 else "…" + e["rule"][-31:] for e in table]
    datasets = list(dict.fromkeys(name for e in table for name in e["datasets"]))
    plots = []
    for key, what in (("removed_docs", "documents"), ("removed_bytes", "bytes")):
        stacks = {name: [e["datasets"].get(name, {}).get(key, 0) for e in table]
                  for name in datasets}
        plots.append(BarPlot(f"{key}_per_rule.png", f"{what.capitalize()} removed per rule "
                             "(pipeline order)", f"{what} removed", rules,
                             [e[key] for e in table], stacks=stacks))
    return plots


def load_plotting() -> None:
    """Import what `draw_plot` needs (~0.4 s): phase workers do it while they start, so
    the plots at the end of a run do not wait for it."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def draw_plot(plot: BarPlot, out_dir: str) -> str:
    """Save `plot` as `out_dir/plot.file` (same bytes for the same data); returns the path.

    Uses matplotlib's Figure directly (Agg), not pyplot: no global figure state, so plots
    can be drawn by several workers or threads at once.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(out_dir) / plot.file
    path.parent.mkdir(parents=True, exist_ok=True)
    if plot.stacks:  # long rule names: horizontal bars, the first rule on top
        fig = Figure(figsize=(7, 1.2 + 0.28 * len(plot.labels)))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        left = [0] * len(plot.values)
        for series, values in plot.stacks.items():
            ax.barh(range(len(values)), values, left=left, label=series)
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.set_yticks(range(len(plot.labels)), plot.labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(plot.ylabel)
        ax.legend(fontsize=7)
    else:
        fig = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        # Categorical bars: the labels are names, even where they read as numbers.
        ax.bar(range(len(plot.values)), plot.values)
        ax.set_xticks(range(len(plot.labels)), plot.labels)
        if plot.xlabel:
            ax.set_xlabel(plot.xlabel)
        ax.set_ylabel(plot.ylabel)
        ax.tick_params(axis="x", labelrotation=plot.label_rotation)
    ax.set_title(plot.title)
    fig.tight_layout()
    # Fixed metadata so reruns write identical PNGs; durable like every file the
    # manifest's stats list.
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80, metadata={"Software": None})
    write_atomic(path, png.getvalue())
    return str(path)
