"""Wiring one rank's trainer from the run config: each component from its own section.

    engine    ← model, train (optimizer, schedule, activation checkpointing), deepspeed, launch
    loaders   ← data.loader, train.micro_batch_size, the prepared dataset
    objective ← train.objective, the dataset's tokenizer, model.vocab_size
    callbacks ← tracking, train (log/eval/sample cadence), sample

This is the one place below the CLI that reads every section: it is the job body.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from lmforge.launch.config import RunConfig
from lmforge.launch.config.deepspeed import build_deepspeed_config
from lmforge.launch.rundir import RunDir
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.launch.train.callbacks import Callback
from lmforge.launch.train.losses import build_objective
from lmforge.launch.train.optim import build_optimizer, build_scheduler
from lmforge.launch.train.trainer import Trainer
from lmforge.pipeline.config import LoaderConfig
from lmforge.pipeline.loader import ShardLoader
from lmforge.pipeline.manifest import DatasetManifest


def build_engine(cfg: RunConfig, load_universal: bool = False) -> Any:
    """The model (initialised from ``seed``, identically on every rank), wrapped with
    activation checkpointing, its AdamW and LR schedule, inside a DeepSpeed engine;
    ``load_universal``: it will resume from a checkpoint's universal copy."""
    torch.manual_seed(cfg.seed)
    model = cfg.model.build()
    train = cfg.train
    apply_activation_checkpointing(
        model, train.activation_checkpointing, train.checkpoint_every_n_layers
    )
    optimizer = build_optimizer(model, train, offload=cfg.deepspeed.offload_optimizer != "none")
    scheduler = build_scheduler(optimizer, train)
    ds_config = build_deepspeed_config(
        train, cfg.deepspeed, dist.get_world_size(), dist.get_backend(), load_universal
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def shard_loader(manifest: DatasetManifest, split: str, micro_batch_size: int,
                 loader: LoaderConfig, seed: int, infinite: bool) -> ShardLoader:
    """This rank's loader of one split of the prepared dataset."""
    return ShardLoader(
        manifest.location, split, micro_batch_size, rank=dist.get_rank(),
        world_size=dist.get_world_size(), seed=seed, config=loader, infinite=infinite,
    )


def build_trainer(
    cfg: RunConfig, manifest: DatasetManifest, run_dir: RunDir, callbacks: list[Callback],
    resume: str | None = None,
) -> Trainer:
    """The trainer of this rank (the process group is up; ``cfg`` fits ``manifest``);
    ``resume`` is what ``Trainer.resume`` will be given: a checkpoint written by another
    number of ranks needs an engine that loads universal checkpoints."""
    folder = ckpt.find_resume(run_dir.checkpoints, resume)
    universal = folder is not None and ckpt.needs_universal(
        folder, dist.get_world_size(), cfg.deepspeed.zero_stage)
    engine = build_engine(cfg, load_universal=universal)
    micro, loader = cfg.train.micro_batch_size, cfg.data.loader
    train_loader = shard_loader(manifest, "train", micro, loader, cfg.seed, infinite=True)
    objective = build_objective(
        cfg.train.objective, manifest.tokenizer, cfg.model.vocab_size or
        manifest.tokenizer.vocab_size, loader.document_masking,
    )
    return Trainer(
        engine, cfg.train, objective, train_loader,
        val_loader=lambda: shard_loader(manifest, "val", micro, loader, cfg.seed, False),
        checkpoints=run_dir.checkpoints, seed=cfg.seed, callbacks=callbacks,
    )
