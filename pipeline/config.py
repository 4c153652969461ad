"""The pipeline's config sections: `data` (datasets, cleaning, packing, sharding, the
loader) and `tokenizer`.

Plain dataclasses that import nothing heavy (no torch), so Ray workers unpickle a
`DataConfig` cheaply and `launch/` composes them into its run config. Each field carries a
docstring; `__post_init__` raises `ValueError("<field>: what is wrong; what to do")` so the
run-config loader can prefix the section path and the YAML location.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.pipeline.curation_config import (
    QUALITY_STEP_NAMES,
    C4Config,
    DecontaminateConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    PiiConfig,
    is_import_path,
)

__all__ = [  # the curation rules' sections are defined in curation_config.py
    "C4Config",
    "CLEAN_STEP_NAMES",
    "CleanConfig",
    "DataConfig",
    "DatasetSpec",
    "DecontaminateConfig",
    "FineWebConfig",
    "GopherQualityConfig",
    "GopherRepetitionConfig",
    "LanguageConfig",
    "PiiConfig",
    "LoaderConfig",
    "MixSourceConfig",
    "NearDedupConfig",
    "TASK_KINDS",
    "TaskDataConfig",
    "TokenizerConfig",
]

CLEAN_STEP_NAMES = ("normalize", "strip_control", "length", "repetition", *QUALITY_STEP_NAMES)
"""Steps `CleanConfig.steps` may name, in any order (pipeline/prepare/steps.py, quality.py,
language.py, pii.py), besides user steps given by import path."""
TASK_KINDS = ("sft", "classify", "seq2seq")
"""Kinds of task data `TaskDataConfig.kind` may name (see pipeline/prepare/tasks.py)."""


@dataclass
class DatasetSpec:
    """One named source of documents with its mixture weight."""

    name: str
    """Dataset name: the shard folder, manifest key and `__key__` prefix (letters, digits, `_`, `-`;
    no `.`, which WebDataset reads as an extension separator)."""
    paths: list[str] = field(default_factory=list)
    """Files, globs or fsspec URLs (`corpus/*.jsonl.gz`, `s3://bucket/x/*.parquet`)."""
    weight: float = 1.0
    """Mixture weight, carried into the manifest for the loader to sample by."""
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    """File format; `auto` decides from the extension (.txt, .jsonl/.json, .parquet, +.gz/.zst)."""
    text_field: str = "text"
    """Field holding the document text in JSON lines and Parquet rows."""
    txt_unit: Literal["file", "paragraph", "line"] = "paragraph"
    """How a .txt file splits into documents: whole file, blank-line separated, or per line."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(
                f"name: {self.name!r} is not usable as a folder and sample-key prefix; "
                "use only letters, digits, '_' and '-'"
            )
        if not self.paths:
            raise ValueError("paths: empty; list at least one file, glob or URL")
        if not self.weight > 0:
            raise ValueError(f"weight: {self.weight} must be > 0; give a positive mixture weight")
        if not self.text_field:
            raise ValueError("text_field: empty; name the field that holds the text")


@dataclass
class CleanConfig:
    """The cleaning/filter chain applied to every document before dedup and encoding."""

    steps: list[str] = field(
        default_factory=lambda: ["normalize", "strip_control", "length", "repetition"]
    )
    """Steps in the order they run: normalize, strip_control, length, repetition, the curation
    rules gopher_quality, gopher_repetition, c4, fineweb, language, pii (each set by the key of
    its name below), or a user step by import path (`mypackage.filters:MyStep`: a `Step`
    subclass, or a function `text -> str | None`; importable on every worker)."""
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"
    """Unicode normalization form used by the `normalize` step."""
    min_chars: int = 1
    """`length` step: documents shorter than this (in characters) are removed."""
    max_chars: int = 10_000_000
    """`length` step: documents longer than this (in characters) are removed."""
    max_duplicate_line_fraction: float = 0.5
    """`repetition` step: remove a document if more than this fraction of its lines (>= 4
    lines) are repeats of an earlier line in the same document."""
    max_top_char_fraction: float = 0.5
    """`repetition` step: remove a document of >= 32 chars whose most frequent non-space
    character makes up more than this fraction of it (e.g. '!!!!!!' spam)."""
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    """`gopher_quality` step: Gopher's quality rules (word count, word length, symbols, ...)."""
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    """`gopher_repetition` step: Gopher's repeated lines, paragraphs and n-grams."""
    c4: C4Config = field(default_factory=C4Config)
    """`c4` step: C4's line and page rules."""
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    """`fineweb` step: FineWeb's line statistics."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """`language` step: languages kept and the least score."""
    pii: PiiConfig = field(default_factory=PiiConfig)
    """`pii` step: placeholders for e-mail and IP addresses."""
    step_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments of user steps, by the import path listed in `steps`."""

    def __post_init__(self) -> None:
        for name in self.steps:
            if name not in CLEAN_STEP_NAMES and not is_import_path(name):
                raise ValueError(
                    f"steps: unknown step {name!r}; choose from {', '.join(CLEAN_STEP_NAMES)}, "
                    "or give a user step's import path (mypackage.filters:MyStep)"
                )
        for name in self.step_args:
            if name not in self.steps or not is_import_path(name):
                raise ValueError(f"step_args: {name!r} is not a user step listed in steps; "
                                 "add it to steps or remove its arguments")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps: {self.steps} names a step twice; list each step once")
        if self.min_chars < 0:
            raise ValueError(f"min_chars: {self.min_chars} is negative; use 0 or more")
        if self.max_chars < max(1, self.min_chars):
            raise ValueError(
                f"max_chars: {self.max_chars} is below min_chars ({self.min_chars}); raise it"
            )
        for name in ("max_duplicate_line_fraction", "max_top_char_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: {value} must be in (0, 1]; 1.0 turns the check off")


@dataclass
class NearDedupConfig:
    """Near-duplicate removal: MinHash over word n-grams, LSH bands, verified pairs, one
    document kept per cluster (see pipeline/prepare/near_dedup.py)."""

    ngram: int = 5
    """Words per shingle (a document's set of word n-grams is what Jaccard compares)."""
    bands: int = 14
    """LSH bands; documents sharing all `rows` MinHash values of any band are candidates."""
    rows: int = 8
    """MinHash values per band; `bands × rows` hash functions in all (112 by default)."""
    threshold: float = 0.8
    """Candidate pairs whose exact Jaccard of shingle sets is at least this are duplicates.
    Pairs near ``(1/bands)**(1/rows)`` (0.72 by default) become candidates half the time."""
    seed: int = 1
    """Seed of the MinHash hash functions (the result is deterministic for a seed)."""

    def __post_init__(self) -> None:
        for name in ("ngram", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1; "
                                 "use e.g. ngram 5, bands 14, rows 8")
        if self.bands * self.rows > 1024:
            raise ValueError(f"bands: {self.bands} × rows {self.rows} = "
                             f"{self.bands * self.rows} hash functions; use at most 1024")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold: {self.threshold} must be in (0, 1]; use e.g. 0.8")
        if self.seed < 0:
            raise ValueError(f"seed: {self.seed} is negative; use 0 or more")


@dataclass
class TokenizerConfig:
    """The sentencepiece tokenizer: trained on a uniform share of the cleaned corpus (its
    training text), or reused."""

    type: Literal["bpe", "unigram"] = "bpe"
    """sentencepiece model type."""
    vocab_size: int = 32000
    """Vocabulary size including special and byte-fallback pieces (needs >= 256 + specials)."""
    model_path: str | None = None
    """Reuse an existing tokenizer instead of training one: a sentencepiece .model, a
    Hugging Face tokenizer.json, or a folder holding tokenizer.json (+ tokenizer_config.json),
    encoded as transformers' AutoTokenizer encodes (see README, `tokenizer.model_path`)."""
    train_text_bytes: int = 100 * 2**20
    """Bytes of the tokenizer's training text: documents drawn uniformly from the cleaned,
    deduplicated corpus. (The key keeps its name: configs and dataset fingerprints use it.)"""
    character_coverage: float = 0.9995
    """Fraction of characters covered by pieces; the rest fall back to bytes."""
    mask_token: str | None = "<mask>"
    """Mask special token (None for none)."""
    sep_token: str | None = "<sep>"
    """Separator special token (None for none)."""
    extra_special_tokens: list[str] = field(default_factory=list)
    """More user-defined special tokens, kept whole by the tokenizer."""
    seed: int = 0
    """Random seed of sentencepiece training (training is deterministic for a seed)."""

    def __post_init__(self) -> None:
        specials = self.special_pieces()
        if self.vocab_size < 256 + len(specials) + 4:
            raise ValueError(
                f"vocab_size: {self.vocab_size} is too small for 256 byte-fallback pieces and "
                f"{len(specials) + 4} special tokens; use at least {256 + len(specials) + 8}"
            )
        if self.vocab_size > 2**31 - 1:
            raise ValueError(f"vocab_size: {self.vocab_size} is too large; use at most 2**31 - 1")
        if self.train_text_bytes < 1024:
            raise ValueError(f"train_text_bytes: {self.train_text_bytes} is below 1024; raise it")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(
                f"character_coverage: {self.character_coverage} must be in [0.9, 1]; "
                "use e.g. 0.9995"
            )
        if len(set(specials)) != len(specials):
            raise ValueError(
                f"extra_special_tokens: duplicate special tokens in {specials}; "
                "list each once"
            )
        reserved = {"<pad>", "<unk>", "<s>", "</s>"}
        for piece in specials:
            if not piece or piece in reserved:
                raise ValueError(
                    f"extra_special_tokens: {piece!r} is empty or reserved "
                    "(<pad>, <unk>, <s>, </s> are built in); remove it"
                )

    def special_pieces(self) -> list[str]:
        """User-defined special pieces in id order (after pad, unk, bos, eos)."""
        pieces = [p for p in (self.mask_token, self.sep_token) if p is not None]
        return pieces + list(self.extra_special_tokens)


@dataclass
class LoaderConfig:
    """How shards are streamed into batches (the ``data.loader`` config section)."""

    num_workers: int = 0
    """DataLoader worker processes per rank; 0 builds batches in the training process."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead (only used when ``num_workers > 0``)."""

    shuffle: bool = True
    """Shuffle training data: shard order per epoch, then samples within windows.
    Finite loaders (validation) never shuffle."""

    shuffle_buffer: int = 8192
    """Samples per shuffle window: after the shard order is shuffled, samples are permuted
    within consecutive windows of this many samples. Larger mixes more; a window's shards
    are kept open (shards behind fsspec URLs are held in memory, so size windows by
    shard size there)."""

    document_masking: bool = True
    """Emit ``segment_ids`` and ``position_ids`` so attention can stay within documents."""

    weights: dict[str, float] | None = None
    """Mixture weight per dataset name, overriding the manifest's (None keeps them);
    datasets left out get weight 0. May change between training stages: a resume
    continues each dataset where it stopped."""

    strict: bool = True
    """Raise on a missing or corrupt shard or sample (naming it). False skips it with a
    warning and a count (``ShardLoader.skipped_samples``): training rows get a stand-in
    from the same shard or the next readable one, chosen by position alone so every rank
    and every resume agree; a validation pass masks such rows (labels -100) instead."""

    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest the first time a process opens it
    (reads the whole shard once; see ``checksum_first_read_cost`` in benchmarks/RESULTS.md).
    A mismatch is a corrupt shard: an error naming it, or skipped when ``strict`` is false."""

    return_keys: bool = False
    """Also yield ``keys``, the ``__key__`` of every row ("" for padding); for debugging."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError("num_workers: must be >= 0; use 0 to load in the main process")
        if self.prefetch_factor < 1:
            raise ValueError("prefetch_factor: must be >= 1")
        if self.shuffle_buffer < 1:
            raise ValueError("shuffle_buffer: must be >= 1 sample; use shuffle=false for none")
        if self.weights is not None:
            for name, weight in self.weights.items():
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"weights: '{name}' is {weight}; weights must be >= 0")
            if not any(w > 0 for w in self.weights.values()):
                raise ValueError("weights: at least one dataset needs a weight above 0")


@dataclass
class MixSourceConfig:
    """One prepared dataset of a ``data.mix`` (see `DataConfig.mix`)."""

    path: str
    """A prepared dataset: the folder holding ``manifest.json`` (or the file itself), local
    or an fsspec URL. Used as it is: nothing is prepared again."""
    weight: float | None = None
    """Share of the training samples, relative to the other sources' weights. Set this or
    ``tokens`` (the same one on every source)."""
    tokens: int | None = None
    """Token budget: the sources' shares are their budgets over the sum of budgets."""
    max_epochs: float | None = None
    """Repetition cap: at most this many passes over each of the source's datasets; a
    dataset at its cap leaves the mixture and the others share its slots. None: no cap."""
    name: str | None = None
    """Prefix of the source's dataset names in the loader (``<name>/<dataset>``); the
    folder's last component when None."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: empty; give the folder of a prepared dataset")
        if (self.weight is None) == (self.tokens is None):
            raise ValueError(
                f"weight/tokens: {self.path} needs exactly one of them (got weight="
                f"{self.weight}, tokens={self.tokens}); give a weight or a token budget"
            )
        if self.weight is not None and (not math.isfinite(self.weight) or self.weight <= 0):
            raise ValueError(f"weight: {self.weight} must be > 0; leave the source out instead")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"tokens: {self.tokens} must be >= 1; leave the source out instead")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ValueError(f"max_epochs: {self.max_epochs} must be > 0 (or null for no cap)")

    @property
    def label(self) -> str:
        """The source's name: ``name`` or the folder's last component."""
        if self.name:
            return self.name
        tail = self.path.rstrip("/")
        if tail.endswith("manifest.json"):
            tail = tail[: -len("manifest.json")].rstrip("/")
        return tail.rsplit("/", 1)[-1] or tail


@dataclass
class TaskDataConfig:
    """A labelled task data set (the ``data.task`` section): JSON-lines records read, checked,
    tokenized and sharded by the same pipeline as pretraining data (see pipeline/prepare/tasks.py).

    Records with a missing or empty field, an unknown label, or more tokens than a sample
    holds are counted as bad input with their file and line (``data.strict`` stops at the
    first). Of the cleaning chain only ``normalize`` and ``strip_control`` apply (to every
    field); task records are neither length-filtered nor deduplicated.
    """

    kind: Literal["sft", "classify", "seq2seq"]
    """``sft``: prompt/response pairs, loss on the response; ``classify``: text/label;
    ``seq2seq``: source/target pairs for the encoder-decoder."""
    train: list[str] = field(default_factory=list)
    """JSONL files, globs or fsspec URLs of the training records (.jsonl, also .gz/.zst)."""
    val: list[str] = field(default_factory=list)
    """JSONL files of the validation records; empty: ``data.val_fraction`` of the training
    records, chosen by a hash of each record's fields."""
    prompt_field: str = "prompt"
    """sft: the field holding the prompt (no loss on it)."""
    response_field: str = "response"
    """sft: the field holding the response (the loss is on it and the EOS that ends it)."""
    text_field: str = "text"
    """classify: the field holding the text."""
    label_field: str = "label"
    """classify: the field holding the class name (a string, or an integer read as text)."""
    labels: list[str] = field(default_factory=list)
    """classify: the class names in id order; a record with another label is bad input.
    Empty: the sorted distinct labels of the training records."""
    source_field: str = "source"
    """seq2seq: the field holding the source (the encoder's input)."""
    target_field: str = "target"
    """seq2seq: the field holding the target (the decoder's output)."""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind: {self.kind!r} is unknown; choose from {', '.join(TASK_KINDS)}")
        if not self.train:
            raise ValueError("train: empty; list the JSONL files of the training records")
        for name in ("train", "val"):
            paths = getattr(self, name)
            if any(not p for p in paths):
                raise ValueError(f"{name}: contains an empty path; remove it")
        overlap = sorted(set(self.train) & set(self.val))
        if overlap:
            raise ValueError(
                f"val: {overlap} also listed in train; a file belongs to one split only"
            )
        fields = self.field_keys()
        for name in fields:
            if not getattr(self, name):
                raise ValueError(f"{name}: empty; name the JSON field to read")
        values = [getattr(self, name) for name in fields]
        if len(set(values)) != len(values):
            raise ValueError(
                f"{fields[1]}: {values[1]!r} is also {fields[0]}; the two fields must differ"
            )
        if self.labels and self.kind != "classify":
            raise ValueError(f"labels: only used by kind classify (kind is {self.kind}); remove it")
        if any(not isinstance(label, str) or not label.strip() for label in self.labels):
            raise ValueError(f"labels: {self.labels} has an empty or non-text label; fix it")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: {self.labels} names a class twice; list each once")
        if self.kind == "classify" and len(self.labels) == 1:
            raise ValueError(f"labels: {self.labels} has one class; give at least two")

    def field_keys(self) -> tuple[str, str]:
        """Names of the two config keys naming this kind's record fields (input first)."""
        return {
            "sft": ("prompt_field", "response_field"),
            "classify": ("text_field", "label_field"),
            "seq2seq": ("source_field", "target_field"),
        }[self.kind]

    def record_fields(self) -> tuple[str, str]:
        """The two JSON field names this kind reads (input first)."""
        first, second = self.field_keys()
        return getattr(self, first), getattr(self, second)


@dataclass
class DataConfig:
    """Where the corpus comes from, how it is cleaned and packed, and where shards go."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """Named datasets; each becomes `<output_dir>/<name>/{train,val}-NNNNNN.tar`. Empty when
    `task` is set."""
    output_dir: str = "runs/data"
    """Folder for manifest.json, tokenizer.model, stats.json, plots and the shard folders."""
    seq_len: int = 1024
    """Training sequence length; each sample stores seq_len + 1 tokens (inputs + shifted label)."""
    val_fraction: float = 0.01
    """Fraction of documents (chosen by a hash of their text) that go to the val split."""
    num_workers: int = 0
    """Tokenizer actors, and phase workers running read/clean/dedup items (at most this many
    at once, placed over the nodes by their CPUs); 0 = one per CPU of the Ray cluster."""
    ray_address: str | None = None
    """None: start a local Ray and stop it afterwards; else the address of a running cluster."""
    shard_target_bytes: int = 256 * 2**20
    """Approximate size of one shard tar."""
    read_chunk_bytes: int = 64 * 2**20
    """Largest input bytes per read chunk (the read work item): big files are split, small
    files grouped (chunks get smaller, down to 1 MiB, when that is needed to give each worker
    ~4 chunks)."""
    dedup: bool = True
    """Remove exact duplicate documents across all datasets (the first occurrence is kept)."""
    near_dedup: NearDedupConfig | bool = False
    """Remove near-duplicate documents across all datasets (after exact dedup), keeping the
    first document of each cluster: `true` for the defaults (5-word n-grams, 14 bands × 8
    rows, Jaccard >= 0.8) or a mapping of `NearDedupConfig` settings; `false` for none."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Cleaning and filtering chain."""
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    """Remove documents sharing an n-gram with evaluation files (after the cleaning chain)."""
    max_record_bytes: int = 32 * 2**20
    """Records (lines, paragraphs, files) larger than this are skipped and reported."""
    strict: bool = False
    """Stop at the first bad input (invalid UTF-8, malformed JSON, ...) instead of reporting it."""
    keep_work: bool = False
    """Keep the intermediate `_work/` folder after a successful run (for debugging)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """How training streams the shards (see pipeline/loader/shard_loader.py)."""
    task: TaskDataConfig | None = None
    """A labelled task data set instead of `datasets` (fine-tuning): prepared into
    `<output_dir>/task/{train,val}-NNNNNN.tar` with the tokenizer at `tokenizer.model_path`."""
    mix: list[MixSourceConfig] = field(default_factory=list)
    """Train on these prepared datasets, mixed by weight or token budget, instead of
    preparing `datasets`: nothing is prepared, a change of weights re-uses the shards. All
    must share the tokenizer, seq_len and token dtype (see pipeline/loader/mix.py)."""

    def __post_init__(self) -> None:
        if self.near_dedup is True:  # `near_dedup: true` means the defaults
            self.near_dedup = NearDedupConfig()
        elif not isinstance(self.near_dedup, (bool, NearDedupConfig)):
            raise ValueError(f"near_dedup: {self.near_dedup!r} is neither true/false nor a "
                             "mapping of settings (ngram, bands, rows, threshold, seed)")
        if self.task is not None and self.datasets:
            raise ValueError(
                "task: set together with data.datasets; a task data set replaces the "
                "datasets, so set one of them (datasets: [] beside task)"
            )
        if self.mix:
            kinds = {m.weight is None for m in self.mix}
            if len(kinds) > 1:
                raise ValueError("mix: some sources give a weight, others tokens; give every "
                                 "source the same one")
            labels = [m.label for m in self.mix]
            if len(set(labels)) != len(labels):
                raise ValueError(f"mix: sources named {labels} twice; give each a `name`")
            if self.task is not None:
                raise ValueError("mix: set together with data.task; mix text datasets only")
        if not self.datasets and self.task is None and not self.mix:
            raise ValueError(
                "datasets: empty; add at least one dataset with a name and paths "
                "(or set data.task for task data)"
            )
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


