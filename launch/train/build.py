"""Wiring one rank's trainer from the run config: each component from its own section.

    engine    ← model, init (warm-start weights), trainable (frozen params, LoRA), train
                (optimizer, schedule, activation checkpointing), deepspeed, launch
    loaders   ← data.loader, train.micro_batch_size, the prepared dataset
    objective ← train.objective, the dataset's tokenizer (and task labels), model.vocab_size
    warm start← init: optimizer/schedule/loader kept from the source (when no resume)
    callbacks ← tracking, train (log/eval/sample cadence), sample
    loop eval ← eval (tasks, bpb), model (family, context), the dataset's tokenizer

This is the one place below the CLI that reads every section: it is the job body.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import deepspeed
import torch
import torch.distributed as dist

from lmforge.launch.config import RunConfig
from lmforge.launch.config.deepspeed import build_deepspeed_config
from lmforge.launch.rundir import RunDir
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.launch.train.callbacks import Callback
from lmforge.launch.train.compile_blocks import compile_blocks
from lmforge.launch.train.objectives import build_objective
from lmforge.launch.train.optim import build_optimizer, build_scheduler
from lmforge.launch.train.resume import resume_point
from lmforge.launch.train.source_load import model_build_context, uses_partitioned_build
from lmforge.launch.train.trainable import apply_trainable
from lmforge.launch.train.trainer import Trainer
from lmforge.launch.train.warm_start import WarmStart, load_source_weights, resolve
from lmforge.pipeline.config import LoaderConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.loader.mix import Mix
from lmforge.pipeline.loader.shard_loader import ShardLoader

if TYPE_CHECKING:
    from lmforge.launch.eval.in_loop import LoopEval

log = logging.getLogger("lmforge.train")


def build_engine(cfg: RunConfig, load_universal: bool = False,
                 warm: WarmStart | None = None) -> Any:
    """The model (initialised from ``seed``, identically on every rank; with ``warm``, the
    source's weights loaded), its trainable subset applied, wrapped with activation
    checkpointing, its AdamW (trainable parameters only) and LR schedule, inside a
    DeepSpeed engine; ``load_universal``: it will load a checkpoint's universal copy."""
    torch.manual_seed(cfg.seed)
    ds_config = build_deepspeed_config(
        cfg.train, cfg.deepspeed, dist.get_world_size(), dist.get_backend(), load_universal
    )
    # ZeRO-3: built partitioned (initialised one gathered module at a time, as a whole
    # build); a warm start's source is then copied in tensor by tensor.
    zero3 = uses_partitioned_build(cfg.deepspeed.zero_stage, cfg.trainable.mode)
    with model_build_context(zero3, ds_config):
        model = cfg.model.build()
    if warm is not None:
        load_source_weights(model, warm, dist.get_rank())
    apply_trainable(model, cfg.trainable)
    train = cfg.train
    compile_blocks(model, train.compile)  # inside checkpointing: recomputes compiled code
    apply_activation_checkpointing(
        model, train.activation_checkpointing, train.checkpoint_every_n_layers
    )
    optimizer = build_optimizer(model, train, offload=cfg.deepspeed.offload_optimizer != "none")
    scheduler = build_scheduler(optimizer, train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def shard_loader(manifest: DatasetManifest | Mix, split: str, micro_batch_size: int,
                 loader: LoaderConfig, seed: int, infinite: bool) -> ShardLoader:
    """This rank's loader of one split of the prepared dataset (or of ``data.mix``)."""
    return ShardLoader(
        manifest, split, micro_batch_size, rank=dist.get_rank(),
        world_size=dist.get_world_size(), seed=seed, config=loader, infinite=infinite,
    )


def build_trainer(
    cfg: RunConfig, manifest: DatasetManifest, run_dir: RunDir, callbacks: list[Callback],
    resume: str | None = None,
) -> Trainer:
    """The trainer of this rank (the process group is up; ``cfg`` fits ``manifest``);
    ``resume`` is what ``Trainer.resume`` will be given: a checkpoint written by another
    number of ranks needs an engine that loads universal checkpoints."""
    world = dist.get_world_size()
    folder = resume_point(run_dir.checkpoints, resume)  # hashes checked, damaged ones skipped
    # A warm start only while the run has no checkpoint of its own: a resume always wins.
    warm = resolve(cfg.init, cfg.model, cfg.trainable) if folder is None else None
    if folder is not None and cfg.init.source is not None and dist.get_rank() == 0:
        log.info("resuming from %s; init.source applies only to a run's start", folder)
    universal = folder is not None and ckpt.needs_universal(folder, world, cfg.deepspeed.zero_stage)
    if warm is not None and warm.keeps_optimizer:
        universal = ckpt.needs_universal(warm.folder, world, cfg.deepspeed.zero_stage)
    engine = build_engine(cfg, load_universal=universal, warm=warm)
    micro, loader = cfg.train.micro_batch_size, cfg.data.loader
    data = Mix(cfg.data.mix) if cfg.data.mix else manifest
    train_loader = shard_loader(data, "train", micro, loader, cfg.seed, infinite=True)
    task = manifest.task
    objective = build_objective(
        cfg.train.objective, manifest.tokenizer, cfg.model.vocab_size, loader.document_masking,
        labels=list(task.labels) if task is not None else [],
        tokenizer_model=manifest.tokenizer_model, decode=cfg.deepspeed.zero_stage != 3,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens,
    )
    trainer = Trainer(
        engine, cfg.train, objective, train_loader,
        val_loader=lambda: shard_loader(data, "val", micro, loader, cfg.seed, False),
        checkpoints=run_dir.checkpoints, seed=cfg.seed, callbacks=callbacks,
        loop_eval=build_loop_eval(cfg, manifest, data, objective.language_model),
    )
    if warm is not None:
        warm.restore(trainer, cfg.train)
    return trainer


def build_loop_eval(cfg: RunConfig, manifest: DatasetManifest, data: DatasetManifest | Mix,
                    language_model: bool) -> LoopEval | None:
    """Bits per byte per validation dataset (``eval.bpb``, language-model objectives) and
    the ``eval.tasks`` scores for ``Trainer.evaluate``; None when neither applies."""
    from lmforge.launch.eval.bpb import token_bytes, val_datasets
    from lmforge.launch.eval.in_loop import LoopEval, dataset_encoder, read_eval_tasks

    tokenizer = manifest.tokenizer_model
    table = None
    if cfg.eval.bpb and language_model:
        try:
            table = token_bytes(tokenizer, cfg.model.vocab_size)
        except ValueError as err:  # a side metric: training goes on without it
            if dist.get_rank() == 0:
                log.warning("eval.bpb: no bits per byte, the dataset's tokenizer cannot be "
                            "read (%s)", err)
    bpb = table is not None
    tasks = cfg.eval.tasks
    if tasks and cfg.model.family == "encoder":  # tiny.yaml's tasks under an encoder override
        if dist.get_rank() == 0:
            log.warning("eval.tasks: not scored; an encoder has no continuation to score "
                        "(tasks need a decoder or an encoder-decoder)")
        tasks = {}
    if not bpb and not tasks:
        return None
    micro, loader = cfg.train.micro_batch_size, cfg.data.loader
    seq2seq = cfg.model.family == "encoder_decoder"
    loaders = {name: (lambda one=one: shard_loader(one, "val", micro, loader, cfg.seed, False))
               for name, one in val_datasets(data).items()} if bpb else {}
    return LoopEval(
        read_eval_tasks(cfg.eval) if tasks else [],
        dataset_encoder(tokenizer, "seq2seq" if seq2seq else "causal"),
        cfg.model.max_seq_len, cfg.eval.batch_size, table, loaders,
        decoder_start_id=manifest.tokenizer.eos_id)
