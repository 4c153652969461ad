"""The run config against the dataset it trains on, checked before any process starts.

``pipeline/`` prepared the dataset and recorded what it was prepared with in its
``DatasetManifest`` (sequence length, tokenizer kind, files and hashes, vocabulary, special
tokens).
Training must agree with every one of them; a disagreement is reported with both values
and what to do, all problems at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmforge.launch.config.hf_source import source_tokenizer_problems
from lmforge.launch.config.run_config import (
    TASK_OBJECTIVES,
    RunConfig,
    resolve_vocab_size,
    steps_for_tokens,
)
from lmforge.launch.config.typed_yaml import ConfigError
from lmforge.pipeline.config import DataConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import (
    SENTENCEPIECE,
    file_sha256,
    tokenizer_mismatches,
)

# Objectives that replace tokens by the tokenizer's mask piece.
MASKING_OBJECTIVES = ("masked_lm", "denoising")


class DatasetMismatchError(ConfigError):
    """The run config does not fit the prepared dataset."""


def read_prepared(data: DataConfig) -> DatasetManifest:
    """The manifest of the dataset ``data.output_dir`` holds.

    Raises:
        FileNotFoundError: Nothing has been prepared there (names the path and what to run).
        ManifestError: The manifest is unreadable or of another version.
    """
    if data.mix:  # data.mix: the sources share tokenizer and seq_len (loader.mix.Mix checks)
        return DatasetManifest.read(data.mix[0].path)
    path = DatasetManifest.path_in(Path(data.output_dir).resolve())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no prepared dataset; run `lmforge prepare CONFIG` (or `lmforge run`, or "
            "a `lmforge submit ... --job prepare` job) first"
        )
    return DatasetManifest.read(path)


def config_for_dataset(cfg: RunConfig, manifest: DatasetManifest) -> RunConfig:
    """``cfg`` checked against the prepared dataset, with ``model.vocab_size`` taken from its
    tokenizer when the config leaves it open (``run_config.resolve_vocab_size``) and
    ``train.max_tokens`` counted in the dataset's sequences (``steps_for_tokens``).

    For ``train.objective=classify``, ``model.num_labels`` is taken from the task's labels.

    Raises:
        DatasetMismatchError: Listing every mismatch: sequence length, a model vocabulary
            smaller than the tokenizer's, a configured tokenizer that is not the one the
            data was encoded with, a mask token the objective needs and the tokenizer lacks,
            an objective whose kind of data (task kind or pretraining corpus) is not the
            prepared one.
    """
    data = cfg.data.output_dir
    tokenizer = manifest.tokenizer
    problems = []
    if cfg.data.seq_len != manifest.seq_len:
        problems.append(
            f"data.seq_len: {cfg.data.seq_len}, but {data} was prepared with "
            f"{manifest.seq_len}: prepare again, or set data.seq_len={manifest.seq_len}"
        )
    model = cfg.model
    try:
        model = resolve_vocab_size(model, tokenizer.vocab_size,
                                   f"the tokenizer {data} was prepared with")
    except ValueError as err:
        problems.append(str(err))
    if cfg.tokenizer.model_path is not None:
        problems += _tokenizer_problems(cfg.tokenizer.model_path, manifest, data)
    if cfg.train.objective in MASKING_OBJECTIVES and tokenizer.mask_id is None:
        problems.append(
            f"train.objective: {cfg.train.objective} needs a mask token, but the tokenizer "
            f"{data} was prepared with has none: set tokenizer.mask_token (e.g. '<mask>') "
            "and prepare again"
        )
    if cfg.train.objective == "denoising" and tokenizer.eos_id < 0:
        problems.append(
            f"train.objective: denoising starts the decoder with the eos piece, but the "
            f"tokenizer {data} was prepared with has none: prepare with a tokenizer that "
            "has one (leave tokenizer.model_path unset to train one)"
        )
    problems += _task_problems(cfg, manifest, data)
    problems += source_tokenizer_problems(cfg.init.source, manifest, data)
    if problems:
        head = "" if len(problems) == 1 else "the run config does not fit the prepared data:\n  "
        raise DatasetMismatchError(head + "\n  ".join(problems))
    if cfg.train.objective == "classify" and not model.num_labels:
        model = dataclasses.replace(model, num_labels=len(manifest.task.labels))
    cfg = dataclasses.replace(cfg, model=model)
    # After the replace (whose __post_init__ plans with data.seq_len): the manifest's wins.
    cfg.train = steps_for_tokens(cfg.train, cfg.world_size, manifest.seq_len)
    return cfg


def _task_problems(cfg: RunConfig, manifest: DatasetManifest, data: str) -> list[str]:
    """The objective against the kind of data prepared (task data or a pretraining corpus)."""
    objective = cfg.train.objective
    task = manifest.task
    kind = task.kind if task is not None else None
    if objective not in TASK_OBJECTIVES:
        if kind is None:
            return []
        return [f"train.objective: {objective} pretrains on a corpus, but {data} holds {kind} "
                f"task data: set train.objective={kind}, or point data.output_dir at a "
                "pretraining dataset"]
    if kind is None:
        return [f"train.objective: {objective} needs {objective} task data, but {data} holds a "
                f"pretraining corpus: set data.task (kind: {objective}) and prepare again"]
    if kind != objective:
        return [f"train.objective: {objective}, but {data} holds {kind} task data: set "
                f"train.objective={kind}, or prepare data.task with kind {objective}"]
    if objective != "classify":
        return []
    labels = list(task.labels)
    if len(labels) < 2:
        return [f"data.task.labels: {data} has {len(labels)} label(s); classification needs "
                "at least two classes"]
    if cfg.model.num_labels and cfg.model.num_labels != len(labels):
        return [f"model.num_labels: {cfg.model.num_labels}, but {data} has {len(labels)} labels "
                f"({', '.join(labels[:8])}): leave model.num_labels unset (0) to take them"]
    return []


def _tokenizer_problems(model_path: str, manifest: DatasetManifest, data: str) -> list[str]:
    """A configured tokenizer against the manifest's: the kind and every file's sha256."""
    info = manifest.tokenizer
    if info.kind != SENTENCEPIECE:
        problems = tokenizer_mismatches(model_path, info)
        if not problems:
            return []
        # The dataset folder holds the tokenizer's files under their HF names.
        return [f"{problems[0]}; the tokenizer {data} was prepared with is an HF tokenizer "
                f"({', '.join(info.file_sha256s())}): prepare again with this one, or set "
                f"tokenizer.model_path={manifest.folder}", *problems[1:]]
    if Path(model_path).is_dir() or model_path.endswith(".json"):
        return [f"tokenizer.model_path: {model_path} is an HF tokenizer, but {data} was "
                "prepared with a sentencepiece model: prepare again with it, or set "
                f"tokenizer.model_path={manifest.tokenizer_path}"]
    if not Path(model_path).is_file():
        return [f"tokenizer.model_path: {model_path} does not exist: point it at the "
                f"sentencepiece model the data was prepared with ({manifest.tokenizer_path})"]
    digest = file_sha256(model_path)
    if digest == info.sha256:
        return []
    return [
        f"tokenizer.model_path: {model_path} (sha256 {digest[:12]}…) is not the tokenizer "
        f"{data} was prepared with (sha256 {info.sha256[:12]}…): prepare again "
        f"with it, or set tokenizer.model_path={manifest.tokenizer_path}"
    ]
