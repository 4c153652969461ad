"""The dataset manifest: fingerprint of inputs + config, shard plan, and manifest.json.

`manifest.json` is written last and atomically; its presence means "dataset complete".
Its `fingerprint` covers the config (minus how it is run: workers, Ray address) and every
input file's URL, size and mtime, so an unchanged rerun is skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmforge.pipeline.config import DataConfig, TokenizerConfig
from lmforge.pipeline.shards import samples_per_shard
from lmforge.pipeline.sources import SourceFile
from lmforge.pipeline.stages import SPLITS, ShardPlan, write_json
from lmforge.pipeline.tokenizer import file_sha256

MANIFEST_VERSION = 1
FORMAT_REVISION = 1  # bump when the shard bytes for the same inputs would change
_NOT_FINGERPRINTED = ("output_dir", "num_workers", "ray_address", "keep_work")


def fingerprint(data: DataConfig, tokenizer: TokenizerConfig, files: list[SourceFile]) -> str:
    """Hex sha256 over what decides the shard contents."""
    data_part = {k: v for k, v in asdict(data).items() if k not in _NOT_FINGERPRINTED}
    tok_part = asdict(tokenizer)
    if tokenizer.model_path:
        tok_part["model_path"] = file_sha256(tokenizer.model_path)
    payload = {
        "revision": FORMAT_REVISION,
        "data": data_part,
        "tokenizer": tok_part,
        "files": [[f.dataset, f.url, f.size, f.mtime] for f in files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path | str) -> dict[str, Any]:
    """Load a manifest.json.

    Raises:
        ValueError: If the file is missing, not JSON, or of another version.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no manifest; run `lmforge prepare` first") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun `lmforge prepare`") from err
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: manifest version {manifest.get('version')!r}, expected "
            f"{MANIFEST_VERSION}; rerun `lmforge prepare`"
        )
    return manifest


def is_complete(path: Path, fp: str) -> bool:
    """True if `path` is a manifest for fingerprint `fp` whose shards all exist, sized right."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("fingerprint") != fp:
        return False
    for dataset in manifest["datasets"].values():
        for split in dataset["splits"].values():
            for shard in split["shards"]:
                shard_path = path.parent / shard["path"]
                if not shard_path.exists() or shard_path.stat().st_size != shard["bytes"]:
                    return False
    return True


def plan_shards(
    data: DataConfig, itemsize: int, encode_results: list[dict], task_datasets: list[str]
) -> list[ShardPlan]:
    """Split each dataset's train/val token streams into shards of about the target size.

    Args:
        data: The `data` section.
        itemsize: Bytes per token (2 or 4).
        encode_results: Per task (in task order), the encode stage's result.
        task_datasets: Per task, its dataset name.
    """
    window = data.seq_len + 1
    per_shard = samples_per_shard(data.shard_target_bytes, data.seq_len, itemsize)
    plans: list[ShardPlan] = []
    for spec in data.datasets:
        for split in SPLITS:
            bases: list[tuple[int, int]] = []
            position = 0
            for result in encode_results:
                if task_datasets[result["task"]] != spec.name:
                    continue
                tokens = result["splits"][split]["tokens"]
                if tokens:
                    bases.append((result["task"], position))
                position += tokens
            n_windows = -(-position // window)
            for index, first in enumerate(range(0, n_windows, per_shard)):
                count = min(per_shard, n_windows - first)
                lo, hi = first * window, (first + count) * window
                # Tasks whose tokens overlap this shard; a task before it may still hold
                # the start of a document that spans into it, which only matters for
                # doc_starts (position 0 always counts as a start), so it is not needed.
                overlapping = [
                    (task, base) for i, (task, base) in enumerate(bases)
                    if base < hi and (i + 1 == len(bases) or bases[i + 1][1] > lo)
                ]
                plans.append(ShardPlan(spec.name, split, index, first, count, overlapping))
    return plans


def build_manifest(
    data: DataConfig,
    tokenizer_info: dict[str, Any],
    fp: str,
    files: list[SourceFile],
    shard_results: list[dict],
    plans: list[ShardPlan],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the manifest dictionary (paths relative to the output folder)."""
    window = data.seq_len + 1
    datasets: dict[str, Any] = {}
    for spec in data.datasets:
        splits = {}
        for split in SPLITS:
            shards = [
                r for r, p in zip(shard_results, plans, strict=True)
                if p.dataset == spec.name and p.split == split
            ]
            samples = sum(s["samples"] for s in shards)
            tokens = sum(s["tokens"] for s in shards)
            splits[split] = {
                "samples": samples,
                "tokens": tokens,
                "padding_tokens": samples * window - tokens,
                "shards": shards,
            }
        datasets[spec.name] = {
            "weight": spec.weight,
            "sources": [f.url for f in files if f.dataset == spec.name],
            "splits": splits,
        }
    return {
        "version": MANIFEST_VERSION,
        "seq_len": data.seq_len,
        "token_dtype": "uint16" if tokenizer_info["vocab_size"] <= 2**16 else "uint32",
        "tokenizer": {"file": "tokenizer.model", **tokenizer_info},
        "datasets": datasets,
        "fingerprint": fp,
        "stats": summary,
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (the last file a prepare run writes)."""
    write_json(path, manifest)
