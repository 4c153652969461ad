"""The `data` config section (datasets, cleaning, packing, sharding, the loader).

The torch-free sections (`DatasetSpec`, `CleanConfig`, `TokenizerConfig`) are defined in
`pipeline/sections.py` (so Ray workers never import the loader's torch) and re-exported
here. Each field carries a docstring; `__post_init__` raises
`ValueError("<field>: what is wrong; what to do")` so the run-config loader can prefix the
section path and the YAML location.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.pipeline.loader import LoaderConfig
from lmforge.pipeline.sections import (
    CLEAN_STEP_NAMES,
    CleanConfig,
    DatasetSpec,
    TokenizerConfig,
)

__all__ = ["CLEAN_STEP_NAMES", "CleanConfig", "DataConfig", "DatasetSpec", "TokenizerConfig"]


@dataclass
class DataConfig:
    """Where the corpus comes from, how it is cleaned and packed, and where shards go."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """Named datasets; each becomes `<output_dir>/<name>/{train,val}-NNNNNN.tar`."""
    output_dir: str = "runs/data"
    """Folder for manifest.json, tokenizer.model, stats.json, plots and the shard folders."""
    seq_len: int = 1024
    """Training sequence length; each sample stores seq_len + 1 tokens (inputs + shifted label)."""
    val_fraction: float = 0.01
    """Fraction of documents (chosen by a hash of their text) that go to the val split."""
    num_workers: int = 0
    """Tokenizer actors, and stage workers running read/clean/dedup items (at most this many
    at once, placed over the nodes by their CPUs); 0 = one per CPU of the Ray cluster."""
    ray_address: str | None = None
    """None: start a local Ray and stop it afterwards; else the address of a running cluster."""
    shard_target_bytes: int = 256 * 2**20
    """Approximate size of one shard tar."""
    read_chunk_bytes: int = 64 * 2**20
    """Largest input bytes per read task: big files are split, small files grouped (tasks
    get smaller, down to 1 MiB, when that is needed to give each worker ~4 tasks)."""
    dedup: bool = True
    """Remove exact duplicate documents across all datasets (the first occurrence is kept)."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Cleaning and filtering chain."""
    max_record_bytes: int = 32 * 2**20
    """Records (lines, paragraphs, files) larger than this are skipped and reported."""
    strict: bool = False
    """Stop at the first bad input (invalid UTF-8, malformed JSON, ...) instead of reporting it."""
    keep_work: bool = False
    """Keep the intermediate `_work/` folder after a successful run (for debugging)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """How training streams the shards (see pipeline/loader.py)."""

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets: empty; add at least one dataset with a name and paths")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: duplicate names in {names}; give each dataset its own")
        if not self.output_dir:
            raise ValueError("output_dir: empty; give a folder for the shards")
        if self.seq_len < 1:
            raise ValueError(f"seq_len: {self.seq_len} must be >= 1; use a positive length")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: {self.val_fraction} must be in [0, 1); use e.g. 0.01")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: {self.num_workers} is negative; use 0 for auto")
        if self.shard_target_bytes < 1:
            raise ValueError(
                f"shard_target_bytes: {self.shard_target_bytes} must be >= 1; "
                "use e.g. 268435456"
            )
        if self.read_chunk_bytes < 1024:
            raise ValueError(f"read_chunk_bytes: {self.read_chunk_bytes} is below 1024; raise it")
        if self.max_record_bytes < 1:
            raise ValueError(
                f"max_record_bytes: {self.max_record_bytes} must be >= 1; "
                "use e.g. 33554432"
            )


