"""The per-rank training entry point: ``python -m lmforge.launch.train.worker --run-dir DIR``.

Started by ``processes.py`` (``lmforge run``/``train`` on one machine), ``srun`` (Slurm) or Ray
Train; it reads the rank layout from the usual variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and the resolved config from ``DIR/config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from lmforge.launch.train import lean_deepspeed

# Before anything below imports DeepSpeed: stand-ins for the parts of it lmforge never runs
# (its autotuner's MLflow import, the Muon optimizer's torch.compile), ~1.2 s each per rank.
lean_deepspeed.install()

import torch

# Decided before DeepSpeed picks its accelerator, which otherwise warns on every rank that it
# fell back to the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.distributed as dist

from lmforge.launch.config import RunConfig, load_resolved
from lmforge.launch.generate import TextGenerator
from lmforge.launch.rundir import RunDir, TrainSummary
from lmforge.launch.stages.hooks import hook_callbacks
from lmforge.launch.tracking import Tracker
from lmforge.launch.train.build import build_trainer
from lmforge.launch.train.callbacks import EvalHistory, GenerationLogger, MetricsLogger
from lmforge.launch.train.errors import CheckpointError, UnsafeCheckpointError
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE, mlflow_status
from lmforge.launch.train.loss_guard import BadLossError
from lmforge.launch.train.preemption import PreemptionHandler
from lmforge.launch.train.processes import die_with_launcher
from lmforge.launch.train.rendezvous import init_process_group
from lmforge.launch.train.warm_start import WarmStartError
from lmforge.model import estimate_flops, estimate_hardware_flops
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

log = logging.getLogger("lmforge.train")


def flops_per_token(cfg: RunConfig, seq_len: int, hardware: bool = False) -> float | None:
    """Training FLOPs per data token at the prepared dataset's ``seq_len`` (the manifest's):
    model FLOPs (for MFU) or, with ``hardware``, plus the forwards that activation
    checkpointing recomputes (for HFU)."""
    if hardware:
        flops = estimate_hardware_flops(cfg.model, seq_len, cfg.train.activation_checkpointing)
    else:
        flops = estimate_flops(cfg.model, seq_len)
    # The estimates count an encoder-decoder's source and target tokens; each data token
    # is both (the row goes through the encoder and is reconstructed by the decoder).
    return float(flops) * (2 if cfg.model.family == "encoder_decoder" else 1)


# Dense bf16 peak FLOP/s by GPU name.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(configured: float | None = None) -> float | None:
    """Peak FLOP/s of one device, for MFU/HFU: ``train.peak_flops_per_device`` when set,
    else the known GPU table; None (no MFU) on other devices such as CPUs."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in GPU_PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def train_main(run_dir: Path, resume: str | None, run_id: str | None) -> int:
    """Trains one rank to the end of the run; returns the process exit status."""
    cfg = load_resolved(run_dir)
    run = RunDir.of(run_dir)
    # torch.distributed deprecation notices from inside DeepSpeed: not actionable by users.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(max(1, cfg.launch.omp_num_threads))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    owns_process_group = not dist.is_initialized()  # Ray Train sets it up itself
    # srun: rank 0's store listens on MASTER_ADDR's address only (torch's own binds every
    # interface); on one machine on the socket the launcher bound (127.0.0.1 by default).
    init_process_group(cfg.launch.resolved_backend())
    deepspeed.init_distributed(dist_backend=cfg.launch.resolved_backend(), verbose=False)
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    tracker = Tracker(cfg.tracking, run.path) if rank == 0 else Tracker.disabled()
    if rank == 0:
        tracker.start(run_name=cfg.name, run_id=run_id)
    manifest = DatasetManifest.read(  # data.mix: the first source stands for all
        cfg.data.mix[0].path if cfg.data.mix else DatasetManifest.path_in(cfg.data.output_dir))
    metrics = MetricsLogger(
        tracker, flops_per_token(cfg, manifest.seq_len),
        peak_flops(cfg.train.peak_flops_per_device), jsonl=run.metrics,
        hardware_flops_per_token=flops_per_token(cfg, manifest.seq_len, hardware=True),
    )
    history = EvalHistory()
    preemption = PreemptionHandler()
    status = "FAILED"
    try:
        texts = TextGenerator(cfg.generate, manifest.tokenizer_model, cfg.seed)
        generations = GenerationLogger(tracker, texts, cfg.train.generate_every,
                                       jsonl=run.training_generations)
        callbacks = [metrics, history, generations, preemption, *hook_callbacks(cfg, run.path)]
        trainer = build_trainer(cfg, manifest, run, callbacks, resume)
        trainer.resume(resume)
        try:
            state = trainer.fit()
        except BadLossError as err:  # collective: every rank stops at the same step
            if rank == 0:
                log.error("%s", err)
            return 1
        status = mlflow_status(REQUEUE_EXIT_CODE if preemption.stopped else 0)
        if rank == 0:
            run.write_train_summary(TrainSummary(
                step=state.step,
                tokens_seen=state.tokens_seen,
                val_loss=history.history,
                val_metrics=history.last,
                preempted=preemption.stopped,
                skipped_samples=metrics.skipped_samples,
                skipped_shards=metrics.skipped_shards,
            ))
    except (CheckpointError, UnsafeCheckpointError, WarmStartError) as err:
        # A clear line instead of a traceback per rank; exiting lets the launcher (local,
        # srun, Ray Train) stop the other ranks instead of leaving them at a barrier.
        log.error("lmforge: %s", err)
        return 1
    finally:
        # A launcher that passed its run id ends the run itself after export; a run this
        # process created (plain `lmforge train`) ends here.
        owned = run_id is None
        tracker.close(status=status if owned or status != "FINISHED" else "RUNNING")
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    return REQUEUE_EXIT_CODE if preemption.stopped else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.launch.train.worker")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume", default=None, help="none, auto, or a checkpoint folder")
    parser.add_argument("--run-id", default=None, help="MLflow run to attach to")
    args = parser.parse_args(argv)
    die_with_launcher()
    code = train_main(args.run_dir.resolve(), args.resume, args.run_id)
    # Everything is saved and the process group is gone; skip interpreter teardown, where
    # the communication library's threads occasionally abort ("terminate called ...").
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
