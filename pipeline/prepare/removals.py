"""Every removal, visible: what each rule of the pipeline removed, per dataset, in the order
the pipeline applies them (stats.json's ``removed`` and ``removed_samples``).

The order: the cleaning chain's steps as configured (each step's rules as they fired;
decontamination last in the chain), then exact dedup, then near dedup. A rule that only
changes documents (C4's line rules, PII) has its changed documents and dropped bytes too.
"""

from __future__ import annotations

from typing import Any

from lmforge.pipeline.prepare.results import CleanResult, DedupResult

MAX_SAMPLES_PER_RULE = 5  # removed documents stats.json shows per rule
_COUNTS = ("removed_docs", "removed_bytes", "modified_docs")


def _entry(step: str, rule: str) -> dict[str, Any]:
    return {"step": step, "rule": rule, **dict.fromkeys(_COUNTS, 0), "datasets": {}}


def _add(entry: dict[str, Any], dataset: str, counts: dict[str, int]) -> None:
    per_dataset = entry["datasets"].setdefault(dataset, dict.fromkeys(_COUNTS, 0))
    for key in _COUNTS:
        value = int(counts.get(key, 0))
        entry[key] += value
        per_dataset[key] += value


def removal_table(clean: list[CleanResult], dedup: list[DedupResult],
                  near_dedup: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per rule, in pipeline order: ``{step, rule, removed_docs, removed_bytes,
    modified_docs, datasets: {name: the same three counts}}``.

    A step whose rules are not named (a basic step, a user step returning None) is one entry
    named after the step; a step with named rules has one entry per rule that fired
    (``<step>.<rule>``), and one for the step itself if it also removed unnamed.
    """
    by_step: dict[str, dict[str, dict[str, Any]]] = {}  # step -> rule -> entry
    for result in sorted(clean, key=lambda r: r.chunk):
        for step, stats in result.steps.items():
            entries = by_step.setdefault(step, {})
            rules = stats.get("rules", {})
            if not rules:
                _add(entries.setdefault(step, _entry(step, step)), result.dataset, stats)
            rest = {k: stats.get(k, 0) - sum(r.get(k, 0) for r in rules.values())
                    for k in ("removed_docs", "removed_bytes")}
            if rules and rest["removed_docs"]:
                _add(entries.setdefault(step, _entry(step, step)), result.dataset, rest)
            for rule, counts in rules.items():
                name = f"{step}.{rule}"
                _add(entries.setdefault(name, _entry(step, name)), result.dataset, counts)
    table = [entry for step, entries in by_step.items() for entry in entries.values()
             # a step's own zero entry (from chunks where none of its rules fired) says
             # nothing once its rules have entries
             if not (entry["rule"] == step and len(entries) > 1
                     and not any(entry[k] for k in _COUNTS))]
    if dedup:
        exact = _entry("dedup", "dedup")
        dataset_of = {r.chunk: r.dataset for r in clean}
        for result in dedup:
            for chunk, docs in result.removed_per_chunk.items():
                nbytes = result.removed_bytes_per_chunk.get(chunk, 0)
                _add(exact, dataset_of[int(chunk)],
                     {"removed_docs": docs, "removed_bytes": nbytes})
        table.append(exact)
    if near_dedup:
        near = _entry("near_dedup", "near_dedup")
        for dataset, counts in near_dedup.get("datasets", {}).items():
            _add(near, dataset, counts)
        table.append(near)
    return table


def merge_samples(clean: list[CleanResult]) -> dict[str, list[dict[str, Any]]]:
    """The first removed documents of each rule in read order (already redacted by the
    chain), with their dataset."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for result in sorted(clean, key=lambda r: r.chunk):
        for rule, samples in result.removed_samples.items():
            found = merged.setdefault(rule, [])
            for sample in samples[: MAX_SAMPLES_PER_RULE - len(found)]:
                found.append({"dataset": result.dataset, **sample})
    return merged
