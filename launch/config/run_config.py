"""The run configuration: the sections composed in :class:`RunConfig`, and its loader.

Precedence is defaults < YAML file < ``--section.key=value`` overrides. Each section checks
itself when it is built; :meth:`RunConfig.check_training` checks the sections against each
other (batch sizes, objective vs family, lengths, vocabulary) before any training process
starts. ``lmforge prepare`` loads only the sections preparation uses (data, tokenizer).
Each component later receives only its own section (``cfg.model``, ``cfg.train``, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.launch.config.eval_section import EvalConfig, anchor_task_paths
from lmforge.launch.config.hf_source import model_from_hf_source
from lmforge.launch.config.sections import (
    DeepSpeedConfig,
    ExportConfig,
    GenerateConfig,
    InitConfig,
    LaunchConfig,
    TrackingConfig,
    TrainableConfig,
    TrainConfig,
)
from lmforge.launch.config.stages import HookSpec, check_hooks, expand_stages
from lmforge.launch.config.typed_yaml import (
    ConfigError,
    Where,
    apply_override,
    build,
    located_error,
    parse_override,
    read_yaml,
    to_plain,
)
from lmforge.model.config import ModelConfig
from lmforge.model.hf_classes import hf_mismatch
from lmforge.model.presets import PRESETS
from lmforge.pipeline.config import DataConfig, TokenizerConfig
from lmforge.pipeline.durable import write_atomic

CONFIG_FILE = "config.yaml"
"""The resolved config's file name inside a run directory (see ``launch/rundir.py``)."""
CONFIG_FILE_MODE = 0o600
"""Permissions of every file holding a resolved config (its values are not redacted)."""

# The pretraining objective of each model family.
OBJECTIVE_OF_FAMILY = {"decoder": "causal_lm", "encoder": "masked_lm",
                       "encoder_decoder": "denoising"}
# Every objective a family trains with: its pretraining objective and its task objective.
OBJECTIVES_OF_FAMILY = {"decoder": ("causal_lm", "sft"), "encoder": ("masked_lm", "classify"),
                        "encoder_decoder": ("denoising", "seq2seq")}
# Objectives that train on task data (``data.task``) and the task kind each needs.
TASK_OBJECTIVES = ("sft", "classify", "seq2seq")

# The sections `lmforge prepare` reads; the others keep their defaults there.
PREPARE_SECTIONS = ("data", "tokenizer")


@dataclass
class RunConfig:
    """A whole run: its name and directory plus one section per component."""

    name: str = "run"
    """Run name; also the MLflow run name."""
    run_dir: str | None = None
    """Where config, checkpoints, logs and export go; None means ``runs/<name>``."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    init: InitConfig = field(default_factory=InitConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Training phases run in order by ``lmforge run`` (pretrain → anneal → fine-tune); each
    names itself and the sections it changes (see ``launch/config/stages.py``). Empty: one
    training run as configured."""
    hooks: list[str | HookSpec] = field(default_factory=list)
    """Called at stage start/end, evaluation, checkpoint and export: import paths
    ``package.module:function`` or built-ins ``export``, ``register``, ``submit_next``
    (see ``launch/stages/hooks.py``)."""
    hook_failure: Literal["stop", "warn"] = "stop"
    """A failing hook stops the job (stop) or is reported and skipped (warn)."""

    def __post_init__(self) -> None:
        if self.run_dir is None:
            self.run_dir = str(Path("runs") / self.name)
        if self.tokenizer.model_path is None:
            # Trained here: sentencepiece trains exactly tokenizer.vocab_size pieces (hard
            # limit), so the vocabulary is known before the data is prepared.
            self.model = resolve_vocab_size(self.model, self.tokenizer.vocab_size,
                                            "the tokenizer trained here (tokenizer.vocab_size)")
        if self.train.max_tokens is not None and self.train.max_tokens < 1:
            raise ValueError(f"train.max_tokens: must be at least 1, got "
                             f"{self.train.max_tokens}; or leave it unset to use max_steps")
        # The plan before the data exists; training redoes it from the manifest's seq_len.
        self.train = steps_for_tokens(self.train, self.launch.world_size, self.data.seq_len)

    def check_training(self) -> None:
        """Checks the sections against each other, as training needs them: batch sizes,
        objective vs family, lengths, vocabulary, the encoder's fill-mask prompts, and, with
        ``export.enabled``, that a ``transformers`` class represents the model exactly (so a
        model that cannot be exported is refused now, not after training).

        Raises:
            ValueError: ``"<section.key>: what is wrong; what to do"`` for the first problem.
        """
        world = self.launch.world_size
        train = self.train
        per_step = train.sequences_per_step(world)
        if train.global_batch_size is not None and train.global_batch_size != per_step:
            raise ValueError(
                f"train.global_batch_size: {train.global_batch_size} != micro_batch_size "
                f"{train.micro_batch_size} x grad_accum_steps {train.grad_accum_steps} x world "
                f"size {world} (= {per_step}); change one of them"
            )
        self._check_objective()
        self._check_init_and_trainable()
        train.check_compile(self.deepspeed.zero_stage)
        if train.generate_every and self.model.family != "decoder":
            raise ValueError(
                f"train.generate_every: generation during training needs model.family=decoder, "
                f"not {self.model.family!r}; set train.generate_every=0"
            )
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"model.max_seq_len: {self.model.max_seq_len} is shorter than data.seq_len "
                f"{self.data.seq_len}"
            )
        mask = self.tokenizer.mask_token
        fill_mask = train.objective == "masked_lm" and not self.model.num_labels
        if self.model.family == "encoder" and fill_mask and mask and [
                p for p in self.generate.prompts if mask not in p]:
            raise ValueError(
                f"generate.prompts: the encoder's fill-mask demonstration needs {mask!r} in every "
                f"prompt; e.g. ['ROMEO:\\nWhat {mask} is this?']"
            )
        if self.export.enabled:
            closest, diffs = hf_mismatch(self.model)
            if diffs:
                raise ValueError(
                    f"export.enabled: no transformers class represents this model exactly, so "
                    f"it could not be exported after training; the closest, {closest}, differs "
                    f"in {'; '.join(diffs)}. Change those model fields, or set "
                    "export.enabled=false to train without an export"
                )

    def _check_objective(self) -> None:
        family, objective = self.model.family, self.train.objective
        if objective == "classify" and family == "decoder":
            raise ValueError(
                "train.objective: classify trains the encoder's [CLS] head; a decoder has no "
                "classification head in lmforge. Use model.family=encoder (e.g. a BERT-style "
                "preset) for classification, or train.objective=sft with the label as response"
            )
        allowed = OBJECTIVES_OF_FAMILY[family]
        if objective not in allowed:
            raise ValueError(
                f"train.objective: {objective!r} does not fit model.family {family!r}; use "
                f"train.objective={allowed[0]} (pretraining) or {allowed[1]} (task data)"
            )
        if self.model.num_labels and objective != "classify":
            raise ValueError(
                f"model.num_labels: {self.model.num_labels} adds a classification head, which "
                f"train.objective={objective} does not train; set model.num_labels=0"
            )

    def _check_init_and_trainable(self) -> None:
        trainable, init = self.trainable, self.init
        blocks = block_count(self.model)
        if trainable.mode == "freeze_blocks" and trainable.freeze_blocks > blocks:
            raise ValueError(
                f"trainable.freeze_blocks: {trainable.freeze_blocks} is more than the model's "
                f"{blocks} blocks; freeze at most {blocks} (or use trainable.mode=head_only)"
            )
        source = init.source
        if source is None or source == "previous":  # "previous": the stage runner fills it in
            return
        kept = [f"init.{k}" for k in ("optimizer", "schedule", "loader")
                if getattr(init, k) == "keep"]
        if kept and (Path(source) / "config.json").is_file():
            raise ValueError(
                f"{kept[0]}: keep needs a lmforge checkpoint, but init.source {source} is a "
                "Hugging Face folder (weights only); set it to reset"
            )

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def global_batch_size(self) -> int:
        return self.train.sequences_per_step(self.world_size)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        """Writes the resolved config durably (it is what workers and resumes read).

        The file holds the real values (a tracking URI may carry a password), so it is
        written 0o600: only its owner can read it, whatever the umask.
        """
        write_atomic(Path(path), self.to_yaml(), mode=CONFIG_FILE_MODE)


def resolve_vocab_size(model: ModelConfig, pieces: int, tokenizer: str) -> ModelConfig:
    """The one rule for the model's vocabulary: ``model.vocab_size`` when set (it may pad the
    tokenizer's, never be smaller), else the tokenizer's ``pieces``.

    Applied when a config is loaded with a tokenizer trained here and, with the prepared
    dataset's real vocabulary, by ``dataset_check.config_for_dataset`` before training.

    Args:
        model: The model section.
        pieces: The tokenizer's vocabulary, special and byte pieces included.
        tokenizer: Which tokenizer, for the message (``"the tokenizer DIR was prepared with"``).

    Raises:
        ValueError: ``model.vocab_size`` is smaller than ``pieces``.
    """
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=pieces)
    if model.vocab_size < pieces:
        raise ValueError(
            f"model.vocab_size: {model.vocab_size}, but {tokenizer} has {pieces} pieces: set "
            f"model.vocab_size to at least {pieces}, or leave it unset to take the tokenizer's"
        )
    return model


def steps_for_tokens(train: TrainConfig, world_size: int, seq_len: int) -> TrainConfig:
    """``train`` with ``max_steps`` from ``max_tokens`` (unchanged when that is unset):
    ceil(max_tokens / (sequences per step x seq_len)).

    Training's ``seq_len`` is the prepared dataset's (``config_for_dataset`` passes the
    manifest's); a config loaded before the data exists uses ``data.seq_len``, the length
    the data is prepared with (the dataset check refuses any other).
    """
    if train.max_tokens is None:
        return train
    per_step = train.sequences_per_step(world_size) * seq_len
    return dataclasses.replace(train, max_steps=-(-train.max_tokens // per_step))


def block_count(model: ModelConfig) -> int:
    """Transformer blocks of a model (an encoder-decoder's encoder and decoder together)."""
    if model.family == "encoder_decoder":
        return model.encoder_layers + model.decoder_layers
    return model.n_layers


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    sections: tuple[str, ...] | None = None,
) -> RunConfig:
    """Loads a run config: defaults < YAML file < ``--section.key=value`` overrides.

    A ``model.preset`` key starts the model section from a named preset (see
    ``lmforge.model.presets``); other model keys then override the preset's values.

    Args:
        path: The YAML file, or None for defaults only.
        overrides: Command-line overrides such as ``--train.max_steps=50``.
        sections: Build and check only these sections (e.g. :data:`PREPARE_SECTIONS`); the
            others keep their defaults and the cross-section checks are skipped. None: the
            whole config, checked for training.

    Returns:
        The validated config.

    Raises:
        ConfigError: Naming the file, line and key of the first problem found.
    """
    data, lines, texts = read_yaml(path) if path is not None else ({}, {}, {})
    overridden: set[tuple[str, ...]] = set()
    for arg in overrides:
        key, value = parse_override(arg, texts)
        apply_override(data, key, value)
        overridden.add(key)
    where = Where(str(path) if path is not None else None, lines, overridden, texts)
    if path is not None:  # eval.tasks paths in the file are relative to its folder
        data = anchor_task_paths(data, Path(path).resolve().parent, overridden)
    if sections is not None:
        every = [f.name for f in dataclasses.fields(RunConfig) if f.default_factory is not None
                 and f.default_factory is not dataclasses.MISSING]
        data = {k: v for k, v in data.items() if k in sections or k not in every}
    data = model_from_hf_source(data, where)  # a Hugging Face init.source gives the model
    data = _expand_model_preset(data, where)
    for i, entry in enumerate(data.get("hooks") or []):  # a clear error for a bad long form
        if isinstance(entry, dict):
            build(HookSpec, entry, ("hooks", str(i)), where)
    cfg = build(RunConfig, data, (), where)
    if sections is None:
        try:
            cfg.check_training()
            check_hooks(cfg.hooks, cfg.tracking.registered_model)
        except ValueError as err:
            raise located_error(err, (), where) from err
        expand_stages(cfg, where)  # every stage checked now, before any process starts
    return cfg


def _expand_model_preset(data: dict[str, Any], where: Where) -> dict[str, Any]:
    model = data.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return data
    model = dict(model)
    name = model.pop("preset")
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"{where(('model', 'preset'))}: unknown preset '{name}'; known: {known}")
    return {**data, "model": {**PRESETS[name], **model}}


def load_resolved(run_dir: str | Path) -> RunConfig:
    """Reads the resolved ``config.yaml`` that a run wrote into its directory."""
    return load_config(Path(run_dir) / CONFIG_FILE)
