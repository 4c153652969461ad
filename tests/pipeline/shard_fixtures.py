"""Tiny shards in the contract format, written with plain ``webdataset.TarWriter``.

The loader tests use these rather than the pipeline's writer so that they pin down the
contract itself: ``<dataset>/<split>-<index:06d>.tar`` with ``tokens.npy`` (seq_len + 1
ids) and ``doc_starts.npy`` per sample, and a ``manifest.json`` (every key the contract
requires, written as plain JSON) next to the folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

PAD_ID = 0
VOCAB = 1000


@dataclass
class ShardSet:
    """What was written: the manifest and every sample's content by key."""

    manifest: Path
    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    doc_starts: dict[str, np.ndarray] = field(default_factory=dict)
    shards: dict[str, list[Path]] = field(default_factory=dict)  # "<name>/<split>" → tars

    def keys(self, split: str, dataset: str | None = None) -> set[str]:
        """Keys of every sample of a split (optionally of one dataset)."""
        return {
            k for k in self.tokens
            if f"-{split}-" in k and (dataset is None or k.startswith(dataset + "-"))
        }


def write_shards(
    root: Path,
    datasets: dict[str, dict[str, list[int]]],
    *,
    seq_len: int = 16,
    token_dtype: str = "uint16",
    weights: dict[str, float] | None = None,
    pad_tail: int = 3,
    seed: int = 0,
    tar_format: str = "USTAR_FORMAT",
) -> ShardSet:
    """Writes shards and a manifest under ``root``.

    Args:
        root: Output folder (gets ``manifest.json``).
        datasets: ``{name: {split: [samples per shard, ...]}}``.
        seq_len: Each sample holds ``seq_len + 1`` tokens.
        token_dtype: ``uint16`` or ``uint32``.
        weights: Manifest weight per dataset (default 1.0).
        pad_tail: Pad tokens at the end of each split's last sample.
        seed: Seeds token ids and document boundaries.
        tar_format: ``tarfile`` format name; PAX_FORMAT allows keys over 100 bytes.

    Returns:
        The manifest path and every sample's tokens and doc_starts by key.
    """
    rng = np.random.default_rng(seed)
    out = ShardSet(root / "manifest.json")
    entries = {}
    for name, splits in datasets.items():
        split_entries = {}
        for split, sizes in splits.items():
            shards, total, tokens_total = [], sum(sizes), 0
            written = 0
            for index, count in enumerate(sizes):
                rel = f"{name}/{split}-{index:06d}.tar"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with wds.TarWriter(str(path), mtime=0, format=tar_format) as sink:
                    for sample in range(count):
                        key = f"{name}-{split}-{index:06d}-{sample:08d}"
                        tokens = rng.integers(4, VOCAB, seq_len + 1).astype(token_dtype)
                        if written == total - 1 and pad_tail:
                            tokens[-pad_tail:] = PAD_ID
                        cuts = rng.choice(np.arange(1, seq_len + 1), rng.integers(0, 4), False)
                        starts = np.concatenate([[0], np.sort(cuts)]).astype(np.int32)
                        sink.write({"__key__": key, "tokens.npy": tokens, "doc_starts.npy": starts})
                        out.tokens[key], out.doc_starts[key] = tokens, starts
                        written += 1
                n_tokens = count * (seq_len + 1)
                tokens_total += n_tokens
                shards.append({
                    "path": rel, "samples": count, "tokens": n_tokens,
                    "bytes": path.stat().st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                })
                out.shards.setdefault(f"{name}/{split}", []).append(path)
            split_entries[split] = {
                "samples": total, "tokens": tokens_total, "padding_tokens": pad_tail,
                "shards": shards,
            }
        entries[name] = {
            "weight": (weights or {}).get(name, 1.0), "sources": ["fixture"],
            "splits": split_entries,
        }
    # Not a sentencepiece model (nothing here decodes tokens), but recorded by its real
    # sha256, which the loader checks like a prepared dataset's.
    tokenizer_file = root / "tokenizer.model"
    tokenizer_file.write_bytes(b"fixture tokenizer placeholder\n")
    manifest = {
        "version": 1, "seq_len": seq_len, "token_dtype": token_dtype,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest(),
            "vocab_size": VOCAB, "type": "bpe",
            "pad_id": PAD_ID, "unk_id": 1, "bos_id": 2, "eos_id": 3, "special_tokens": {},
            "byte_fallback": True,
        },
        "datasets": entries, "fingerprint": f"fixture-{seed}", "stats": {},
    }
    out.manifest.write_text(json.dumps(manifest, indent=1))
    return out
