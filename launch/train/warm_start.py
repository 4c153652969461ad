"""Warm start (the ``init`` section): a run's first weights from another run's checkpoint or
a Hugging Face folder, and, from a lmforge checkpoint, optionally its optimizer state, LR
schedule position and loader position.

Applies only while the run has no checkpoint of its own (``build.build_trainer`` decides:
a resume always wins). The weights go into the model before trainable subsets and
DeepSpeed (:func:`load_source_weights`: rank 0 reads the source one tensor at a time and
each tensor reaches the other ranks, into their ZeRO-3 partitions where the model was built
partitioned; ``source_load.py``); what is kept goes into the built trainer
(:meth:`WarmStart.restore`):

- optimizer keep: DeepSpeed's ``load_checkpoint`` with optimizer states (AdamW moments and
  the fp32 master weights of every ZeRO partition), without its LR scheduler or RNG; then
  this run's lr, betas, eps and weight decay are put back into the parameter groups, so
  the first step uses this run's schedule;
- schedule keep: the source's LR scheduler step count, with this run's schedule function
  and peak ``train.lr`` evaluated there;
- loader keep: the source's loader position (the loader refuses other data).

Refused with a clear error: ``keep`` of anything from a Hugging Face folder, optimizer keep
with another model or trainable set, a source of another architecture.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.launch.config import CONFIG_FILE, InitConfig, TrainableConfig, TrainConfig
from lmforge.launch.config.typed_yaml import Where, build, read_yaml
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.optim import lr_factor
from lmforge.launch.train.source_load import (
    WarmStartError,
    copy_weights,
    from_rank0,
    full_shape,
    safetensors_files,
)
from lmforge.launch.train.trainable import has_lora, inject_lora, merge_lora
from lmforge.model import ModelConfig, from_hf

log = logging.getLogger("lmforge.train")

# Fields that decide what the weights mean (shapes are checked tensor by tensor).
_ARCH_FIELDS = ("family", "d_model", "n_heads", "kv_heads", "ffn_dim", "position", "norm",
                "norm_position", "activation", "bias", "tie_embeddings", "embedding_norm",
                "scale_embeddings", "encoder_layers", "decoder_layers", "norm_eps", "rope_theta",
                "rope_scaling", "qkv_bias", "qk_norm")
# Parameters a source may lack: a classification head the fine-tune adds.
_NEW_HEAD = ("pooler.", "classifier.")


@dataclass
class WarmStart:
    """A resolved ``init.source``."""

    init: InitConfig
    kind: str  # "checkpoint" or "hf"
    folder: Path  # the checkpoint folder (step_XXXXXXXX) or the Hugging Face folder
    model: ModelConfig  # the source's model section
    trainable: TrainableConfig  # the source's trainable section (HF: all)
    hf_state: dict[str, Any] | None = None  # a Hugging Face source's weights, unread

    @property
    def keeps_optimizer(self) -> bool:
        return self.init.optimizer == "keep"

    def restore(self, trainer: Any, train: TrainConfig) -> None:
        """Brings what ``init`` keeps into a built trainer (every rank)."""
        engine = trainer.engine
        if self.keeps_optimizer:
            hyper = [{k: g[k] for k in ("betas", "eps", "weight_decay")}
                     for g in engine.optimizer.param_groups]
            ckpt.load_checkpoint(engine, self.folder, scheduler=False, rng=False)
            for group, saved in zip(engine.optimizer.param_groups, hyper, strict=True):
                group.update(saved)
        states = None
        if self.init.schedule == "keep" or self.init.loader == "keep":
            states = ckpt.read_model_states(self.folder)
        if self.init.schedule == "keep":
            scheduler_state = states.get("lr_scheduler") or {}
            engine.lr_scheduler.last_epoch = int(scheduler_state.get("last_epoch", 0))
        set_schedule_position(engine.lr_scheduler, train)
        if self.init.loader == "keep":
            try:
                trainer.train_loader.load_state_dict(states["loader"])
            except (KeyError, ValueError) as err:
                raise WarmStartError(
                    f"init.loader: keep continues the source's loader, but {self.folder} was "
                    f"trained on other data ({err}); set init.loader=reset") from err
        if trainer.rank == 0:
            kept = [k for k in ("optimizer", "schedule", "loader")
                    if getattr(self.init, k) == "keep"]
            log.info("warm start from %s: weights%s; LR schedule at step %d", self.folder,
                     "".join(f", {k} kept" for k in kept), engine.lr_scheduler.last_epoch)


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR,
                          train: TrainConfig) -> None:
    """Every group's lr = ``train.lr`` x this run's schedule at the scheduler's step (the
    state loaded with an optimizer brings the source's lr along)."""
    scheduler.base_lrs = [train.lr] * len(scheduler.optimizer.param_groups)
    lr = train.lr * lr_factor(scheduler.last_epoch, train)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = train.lr
        group["lr"] = lr
    scheduler._last_lr = [lr] * len(scheduler.optimizer.param_groups)


def resolve(init: InitConfig, model: ModelConfig, trainable: TrainableConfig
            ) -> WarmStart | None:
    """The warm start ``init`` describes, checked against this run; None without a source.

    Raises:
        WarmStartError: The source is missing or unusable, or keeps what it cannot.
    """
    source = init.source
    if source is None:
        return None
    if source == "previous":
        raise WarmStartError("init.source: 'previous' is resolved by the stage runner "
                             "(`lmforge run` with stages:); give a checkpoint or Hugging Face "
                             "folder here")
    path = Path(source).expanduser().resolve()
    if (path / "config.json").is_file():
        kept = [k for k in ("optimizer", "schedule", "loader") if getattr(init, k) == "keep"]
        if kept:
            raise WarmStartError(
                f"init.{kept[0]}: keep needs a lmforge checkpoint, but {source} is a Hugging "
                "Face folder (weights only); set it to reset")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        source_model, state = _hf_weights(path, config)
        return WarmStart(init, "hf", path, source_model, TrainableConfig(), state)
    folder = checkpoint_folder(path)
    source_model, source_trainable = source_sections(folder)
    start = WarmStart(init, "checkpoint", folder, source_model, source_trainable)
    if start.keeps_optimizer:
        if source_model != model or source_trainable != trainable:
            raise WarmStartError(
                f"init.optimizer: keep needs the same model and trainable sections as the "
                f"source {folder} (its optimizer state holds exactly its trainable "
                f"parameters); the source has trainable.mode={source_trainable.mode}"
                f"{'' if source_model == model else ' and another model section'}. "
                "Set init.optimizer=reset")
    return start


def checkpoint_folder(path: Path) -> Path:
    """A complete checkpoint folder from a checkpoint, checkpoints or run folder."""
    if not path.exists():
        raise WarmStartError(f"init.source: {path} does not exist; give a checkpoint folder "
                             "(…/checkpoints/step_XXXXXXXX), a checkpoints folder or a Hugging "
                             "Face folder (config.json + *.safetensors)")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / ckpt.COMPLETE).exists() or ckpt._TAG.fullmatch(path.name):
        reason = ckpt.incomplete_reason(path)
        if reason is not None:
            raise WarmStartError(f"init.source: {path} is not a complete checkpoint ({reason}); "
                                 "point it at a complete one")
        return path
    complete = ckpt.complete_checkpoints(path)
    if not complete:
        raise WarmStartError(f"init.source: {path} holds no complete lmforge checkpoint and no "
                             "config.json; give a checkpoint or Hugging Face folder")
    return ckpt.find_resume(path, "auto") or complete[-1]


def source_sections(folder: Path) -> tuple[ModelConfig, TrainableConfig]:
    """The model and trainable sections of the run that wrote checkpoint ``folder`` (its
    ``config.yaml`` sits next to its checkpoints folder)."""
    config = folder.parent.parent / CONFIG_FILE
    if not config.is_file():
        raise WarmStartError(f"init.source: {folder} has no {config} beside its checkpoints "
                             "folder; a lmforge run directory holds one (its model section "
                             "says how to read the weights)")
    raw, lines, texts = read_yaml(config)
    where = Where(str(config), lines, set(), texts)
    model = build(ModelConfig, raw.get("model"), ("model",), where)
    trainable = build(TrainableConfig, raw.get("trainable"), ("trainable",), where)
    return model, trainable


def _hf_weights(folder: Path, config: dict[str, Any]) -> tuple[ModelConfig, dict]:
    """The source's model section and its weights under lmforge names, unread: the
    mapping's values are ``LazyTensor`` s over the safetensors files (headers read only)."""
    from lmforge.launch.train.source_load import SafetensorsFolder

    try:
        return from_hf(config, SafetensorsFolder(safetensors_files(folder)))
    except ValueError as err:
        raise WarmStartError(f"init.source: {folder}: {err}") from err


def source_state_dict(start: WarmStart) -> dict[str, Any]:
    """The source's weights under lmforge names, LoRA adapters merged in: fp32 tensors of a
    lmforge checkpoint (gathered from its partitions: call it on one rank), or a Hugging
    Face folder's unread tensors (each read, in the file's dtype, when loaded)."""
    if start.hf_state is not None:
        return dict(start.hf_state)
    state = ckpt.consolidated_state_dict(start.folder)
    if has_lora(state):
        state = merged_lora_state(start.model, start.trainable, state)
    return state


def merged_lora_state(model_cfg: ModelConfig, trainable: TrainableConfig,
                      state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA run's weights with the adapters folded in (plain architecture names)."""
    model = model_cfg.build()
    inject_lora(model, trainable)
    model.load_state_dict(state, strict=False)
    return merge_lora(model).state_dict()


def _target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict name of ``model`` (tied aliases included) with its whole shape,
    also when ZeRO-3 holds a partition of it."""
    shapes = {name: full_shape(p) for name, p in model.named_parameters(remove_duplicate=False)}
    for prefix, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                shapes[f"{prefix}.{name}" if prefix else name] = tuple(buffer.shape)
    return shapes


def _plan(model: nn.Module, state: dict[str, Any]) -> tuple[dict[str, str], list[str], list[str]]:
    """(model name -> source key for each tensor to load, parameters left as initialised,
    problems) from the source's names and shapes (one tensor read: HF's token-type row)."""
    ours: ModelConfig = model.cfg
    target = _target_shapes(model)
    loaded, problems = {}, []
    for key, value in state.items():
        if key not in target:
            if key.startswith(_NEW_HEAD) or key == "type_emb.weight" and not value.any():
                continue  # a head this run does not train; HF's all-zero token-type row
            problems.append(f"unexpected {key}")
            continue
        have, want = tuple(value.shape), target[key]
        # An export drops vocabulary padding rows: fill the model's first rows only.
        if have != want and not (have[1:] == want[1:] and have[0] == ours.vocab_size):
            problems.append(f"{key} {have} vs model {want}")
            continue
        loaded[key] = key
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(
        dict(model.named_parameters()))
    fresh = [k for k in target if k not in loaded and k not in tied]
    missing = [k for k in fresh if not k.startswith(_NEW_HEAD)]
    if ours.num_labels:  # a classifier export has no MLM head; classify never uses it
        missing = [k for k in missing if not k.startswith(("mlm_", "lm_head.bias"))]
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}")
    return loaded, fresh, problems


def load_source_weights(model: nn.Module, start: WarmStart, rank: int = 0) -> list[str]:
    """Loads the source's weights into ``model`` strictly, except a new classification head
    (kept as initialised); returns the names of the parameters the source did not have.

    Collective when distributed (every rank calls it): rank 0 reads the source one tensor
    at a time (a lmforge checkpoint: its consolidated weights, on rank 0 only) and each
    tensor reaches the others through ``source_load.copy_weights`` (a ZeRO-3 partitioned
    model: into each rank's partition). A Hugging Face source is then checked by the
    import gate on rank 0, streamed from the files (``import_gate.verify_import_streamed``).

    Raises:
        WarmStartError: The source's architecture or shapes differ from the model's, or it
            lacks a weight that is not a new head (on every rank alike).
    """
    ours: ModelConfig = model.cfg
    diffs = [f"{f}={getattr(start.model, f)!r} (model.{f}={getattr(ours, f)!r})"
             for f in _ARCH_FIELDS if getattr(start.model, f) != getattr(ours, f)]
    if start.model.n_layers != ours.n_layers and ours.family != "encoder_decoder":
        diffs.append(f"n_layers={start.model.n_layers} (model.n_layers={ours.n_layers})")
    if diffs:
        raise WarmStartError(f"init.source: {start.folder} holds another architecture: "
                             f"{'; '.join(diffs)}; set the model section to the source's")
    state, plan = None, None
    if rank == 0:
        state = source_state_dict(start)
        plan = _plan(model, state)
    loaded, fresh, problems = from_rank0(plan)
    if problems:
        raise WarmStartError(f"init.source: {start.folder} does not fit the model section: "
                             f"{'; '.join(problems[:6])}; set the model section to the source's")
    copy_weights(model, state, loaded, rank)
    if rank == 0:
        log.info("warm start: weights from %s (%s)%s", start.folder, start.kind,
                 f"; newly initialised: {', '.join(fresh)}" if fresh else "")
    if start.kind == "hf" and rank == 0:
        from lmforge.launch.train.import_gate import ImportGateError, verify_import_streamed

        try:
            line = verify_import_streamed(start.folder, ours, state).line()
        except ImportGateError as err:
            raise WarmStartError(str(err)) from err
        log.info("%s", line)
        print(line, flush=True)
    return fresh
