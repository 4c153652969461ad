"""The single commands of ``lmforge``: prepare, train, export, generate, as plain functions.

``lmforge prepare|train|export|generate`` call them directly; ``lmforge run`` and every
submitted job run them stage by stage through the one runner (``launch/stages/runner.py``).
Each reads what the earlier ones wrote (the prepared dataset's manifest, the run directory),
so any of them can be rerun on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.launch.config import ConfigError, RunConfig
from lmforge.launch.config.dataset_check import config_for_dataset, read_prepared
from lmforge.launch.rundir import RunDir
from lmforge.launch.tracking import Tracker
from lmforge.launch.train.processes import launch_training
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.stats import PrepareStats
from lmforge.pipeline.folder_lock import folder_lock

if TYPE_CHECKING:
    from lmforge.launch.stages.launchers import Launcher

log = logging.getLogger("lmforge")


def heading(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


# -- prepare -------------------------------------------------------------------------


def prepare_data(cfg: RunConfig, tracker: Tracker | None = None) -> Path:
    """Shards the corpus (skipped when an identical prepared dataset exists); returns the
    path of its manifest."""
    from lmforge.launch.export.hf_tokenizer import check_tokenizer_source
    from lmforge.pipeline.prepare.driver import prepare

    if cfg.data.mix:  # prepared datasets used as they are: checked to fit, never re-made
        from lmforge.pipeline.loader.mix import Mix

        mix = Mix(cfg.data.mix)
        heading(f"prepare: skipped, data.mix uses {len(mix.manifests)} prepared datasets")
        return Path(mix.manifests[0].location).resolve()
    heading("prepare: corpus → tokenizer → WebDataset shards (Ray)")
    check_tokenizer_source(cfg.tokenizer.model_path)  # an HF one encodes as AutoTokenizer
    manifest = Path(prepare(cfg.data, cfg.tokenizer, progress=True)).resolve()
    if tracker is not None:
        log_prepared_dataset(tracker, DatasetManifest.read(manifest))
    return manifest


def log_prepared_dataset(tracker: Tracker, manifest: DatasetManifest) -> None:
    """Lineage, tokenizer, stats, plots and the pipeline's counts and throughput to MLflow.

    stats.json and manifest.json go as redacted copies: both name the sources, whose URLs
    may carry credentials (``?X-Amz-Signature=``, ``user:password@``)."""
    tracker.log_dataset_lineage(manifest)
    for path in manifest.tokenizer_model.file_paths().values():  # every file of either kind
        tracker.log_artifact(path, "data")
    stats = PrepareStats.read(manifest.folder)
    if stats is None:
        return
    tracker.log_dict(json.loads(stats.file.read_text(encoding="utf-8")), "data/stats.json")
    for plot in stats.plot_paths:
        tracker.log_artifact(plot, "data/plots")
    metrics = {f"prepare/{k}": v for k, v in stats.throughput.items()}
    metrics["prepare/dedup_removed_docs"] = stats.dedup_removed_docs
    for name, counts in stats.datasets.items():
        metrics[f"prepare/{name}/docs_read"] = counts.read_docs
        metrics[f"prepare/{name}/docs_kept"] = counts.clean_docs
    for name, splits in stats.tokens.items():
        for split, tokens in splits.items():
            metrics[f"prepare/{name}/{split}_tokens"] = tokens
    for kind, count in stats.bad_input.items():
        metrics[f"prepare/bad_input/{kind}"] = count
    # Numbered so MLflow's sorted list shows the rules in pipeline order.
    for index, entry in enumerate(stats.removed):
        rule = f"{index:02d}_" + re.sub(r"[^\w.-]", "_", entry.rule)  # MLflow-safe
        metrics[f"prepare/removed/{rule}/docs"] = entry.removed_docs
        metrics[f"prepare/removed/{rule}/bytes"] = entry.removed_bytes
        for name, counts in entry.datasets.items():
            metrics[f"prepare/{name}/removed/{rule}/docs"] = counts["removed_docs"]
            metrics[f"prepare/{name}/removed/{rule}/bytes"] = counts["removed_bytes"]
    tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)


# -- train ---------------------------------------------------------------------------


def check_devices(cfg: RunConfig) -> None:
    """Refuses settings this machine cannot run, before any process starts."""
    if cfg.train.precision != "fp16" and cfg.launch.backend != "nccl":
        return  # nothing to ask CUDA about: importing torch here costs every command ~1.5 s
    import torch

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision: fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
            "use bf16 or fp32 here"
        )
    if cfg.launch.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "launch.backend: nccl needs CUDA GPUs (NCCL reduces only CUDA tensors); "
            "use auto or gloo here"
        )


def config_for_training(cfg: RunConfig) -> RunConfig:
    """The config training processes read: checked against the prepared dataset, with the
    tokenizer's vocabulary filled in, saved as the run directory's ``config.yaml``.

    Raises:
        FileNotFoundError: The dataset has not been prepared (names the manifest path).
        DatasetMismatchError: The config does not fit the prepared dataset.
    """
    cfg = config_for_dataset(cfg, read_prepared(cfg.data))
    cfg.save(RunDir.of(cfg.run_dir).config)
    return cfg


@contextlib.contextmanager
def _datasets_held(cfg: RunConfig) -> Iterator[None]:
    """Shared locks on the dataset folders training reads: ``data.output_dir``, or the
    local folders of ``data.mix`` (no folder is created for a mix)."""
    folders = [cfg.data.output_dir]
    if cfg.data.mix:
        from lmforge.pipeline.contract.shard_tar import is_url

        folders = [Path(DatasetManifest.read(m.path).location).parent
                   for m in cfg.data.mix if not is_url(m.path)]
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(folder_lock(folder, "lmforge train (reading the dataset)",
                                            shared=True))
        yield


def train(cfg: RunConfig, resume: str | None = None, run_id: str | None = None,
          launcher: Launcher | None = None) -> int:
    """Trains on the prepared shards with DeepSpeed across local processes (one per rank), or
    with ``launcher(cfg, run_dir, resume, run_id)`` (srun in a Slurm job, Ray Train in a Ray
    job); returns the processes' exit status (75: checkpointed and stopped, to resume).

    A run directory's ``STAGE_COMPLETE`` no longer holds once training runs in it again, so
    it is removed first.

    The run directory is locked for the whole training (a second ``lmforge train`` there is
    refused, naming this one), and the dataset folder is held shared, so no ``prepare`` can
    swap the shards the run verified while it reads them.

    Raises:
        FolderLocked: Another process uses the run directory, or prepares the dataset.
    """
    check_devices(cfg)
    config_for_dataset(cfg, read_prepared(cfg.data))  # refused before anything is written
    if cfg.eval.tasks:  # a bad task file (eval.tasks) too, before any process starts
        from lmforge.launch.eval.in_loop import read_eval_tasks

        read_eval_tasks(cfg.eval)
    run = RunDir.of(cfg.run_dir)
    with folder_lock(run.path, "lmforge train"), _datasets_held(cfg):
        cfg = config_for_training(cfg)  # again under the locks: the dataset the workers read
        heading(
            f"train: DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.precision}, "
            f"{cfg.world_size} process(es), {cfg.train.max_steps} steps"
        )
        run.stage_complete.unlink(missing_ok=True)
        if launcher is not None:
            return launcher(cfg, run.path, resume, run_id)
        return launch_training(cfg.launch, run.path, resume=resume, run_id=run_id)


# -- export and generate ---------------------------------------------------------------


def export(cfg: RunConfig, checkpoint: str | None = None, out_dir: str | None = None) -> Path:
    """Writes the Hugging Face folder for a checkpoint and verifies it by logit parity."""
    from lmforge.launch.export.from_checkpoint import export_checkpoint, load_trained_model

    heading("export: checkpoint → Hugging Face folder (verified)")
    manifest = read_prepared(cfg.data)
    cfg = config_for_dataset(cfg, manifest)
    run = RunDir.of(cfg.run_dir)
    target = Path(out_dir or cfg.export.output_dir or run.export)
    model = load_trained_model(cfg.model, run.checkpoints, checkpoint)
    return export_checkpoint(model, cfg.model, cfg.export, manifest, target, seed=cfg.seed)


def generate(cfg: RunConfig, checkpoint: str | None = None) -> list[dict]:
    """The family's demonstration with the trained model, printed: a decoder continues
    ``generate.prompts``, an encoder fills their mask tokens (top-k), an encoder-decoder
    writes a target for each with beam search. Returns one record per prompt
    (``{"prompt", "text", ...}``)."""
    from lmforge.launch.export.from_checkpoint import load_trained_model
    from lmforge.launch.generate import FillMaskPredictor, Seq2SeqGenerator, TextGenerator

    family = cfg.model.family
    heading({"decoder": "generate: continuations", "encoder": "generate: fill-mask top-k",
             "encoder_decoder": f"generate: source → target ({cfg.generate.num_beams} beams)"}
            [family])
    manifest = read_prepared(cfg.data)
    cfg = config_for_dataset(cfg, manifest)
    model = load_trained_model(cfg.model, RunDir.of(cfg.run_dir).checkpoints, checkpoint)
    tokenizer = manifest.tokenizer_model
    if family == "encoder":
        records = FillMaskPredictor(cfg.generate, tokenizer)(model)
        for record in records:
            tops = "; ".join(f"#{m['position']}: {' | '.join(m['top_tokens'])}"
                             for m in record["masks"])
            print(f"--- prompt: {record['prompt']!r}\ntop-{cfg.generate.mask_top_k} at masks: "
                  f"{tops}\nfilled: {record['text']}\n", flush=True)
        return records
    if family == "encoder_decoder":
        records = Seq2SeqGenerator(cfg.generate, tokenizer)(model)
        for record in records:
            print(f"--- source: {record['prompt']!r}\ntarget: {record['text']}\n", flush=True)
        return records
    texts = TextGenerator(cfg.generate, tokenizer, cfg.seed)(model)
    records = [{"prompt": p, "text": t} for p, t in zip(cfg.generate.prompts, texts, strict=True)]
    for record in records:
        print(f"--- prompt: {record['prompt']!r}\n{record['text']}\n", flush=True)
    return records
