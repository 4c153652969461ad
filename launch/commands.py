"""The stages of a run, in order: prepare → train → export → sample.

``lmforge run`` calls :func:`run_all`; the single-stage commands (``prepare``, ``train``,
``export``, ``sample``) call the stage functions directly. Each stage reads the run
directory the earlier stages wrote, so any of them can be rerun on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lmforge.launch.config import ConfigError, RunConfig
from lmforge.launch.local import launch_training
from lmforge.launch.tracking import Tracker

log = logging.getLogger("lmforge")

RUN_ID_FILE = "mlflow_run_id"


@dataclass
class RunResult:
    run_dir: Path
    manifest: Path
    tracking_uri: str
    run_id: str | None
    export_dir: Path | None
    samples: list[str]
    exit_code: int


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir).resolve()


def manifest_of(cfg: RunConfig) -> Path:
    return Path(cfg.data.output_dir).resolve() / "manifest.json"


def stage(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


# -- prepare -------------------------------------------------------------------------


def prepare_stage(cfg: RunConfig, tracker: Tracker | None = None) -> Path:
    """Shards the corpus (skipped when an identical prepared dataset exists)."""
    from lmforge.pipeline.prepare import prepare

    stage("prepare: corpus → sentencepiece → WebDataset shards (Ray)")
    manifest = Path(prepare(cfg.data, cfg.tokenizer, progress=True)).resolve()
    if tracker is not None:
        log_prepared_dataset(tracker, manifest)
    return manifest


def log_prepared_dataset(tracker: Tracker, manifest: Path) -> None:
    """Lineage, tokenizer, stats, plots and the pipeline's counts and throughput to MLflow."""
    tracker.log_dataset_lineage(manifest)
    folder = manifest.parent
    info = json.loads(manifest.read_text())
    tracker.log_artifact(folder / info["tokenizer"]["file"], "data")
    stats_file = folder / "stats.json"
    if not stats_file.exists():
        return
    stats = json.loads(stats_file.read_text())
    files = stats.get("files", {})
    tracker.log_artifact(stats_file, "data")
    for plot in files.get("plots", []):
        tracker.log_artifact(folder / plot, "data/plots")
    metrics = {f"prepare/{k}": v for k, v in stats.get("throughput", {}).items()}
    metrics["prepare/dedup_removed_docs"] = stats.get("dedup", {}).get("removed_docs", 0)
    for name, counts in stats.get("datasets", {}).items():
        metrics[f"prepare/{name}/docs_read"] = counts.get("read_docs", 0)
        metrics[f"prepare/{name}/docs_kept"] = counts.get("clean_docs", 0)
    for name, splits in stats.get("tokens", {}).items():
        for split, tokens in splits.items():
            metrics[f"prepare/{name}/{split}_tokens"] = tokens
    for kind, count in stats.get("bad_input", {}).get("counts", {}).items():
        metrics[f"prepare/bad_input/{kind}"] = count
    tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)


def with_tokenizer_vocab(cfg: RunConfig, manifest: Path) -> RunConfig:
    """Sets ``model.vocab_size`` from the prepared tokenizer when the config left it open."""
    vocab = json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
    if cfg.model.vocab_size == vocab:
        return cfg
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
        raise ValueError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab} ({manifest}); raise it or leave it unset"
        )
    if cfg.model.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    return cfg


# -- train ---------------------------------------------------------------------------


def check_devices(cfg: RunConfig) -> None:
    """Refuses settings this machine cannot run, before any process starts."""
    import torch

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision: fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
            "use bf16 or fp32 here"
        )


def config_for_training(cfg: RunConfig) -> RunConfig:
    """The config training processes read: checked against the prepared dataset, with the
    tokenizer's vocabulary filled in, saved as ``<run_dir>/config.yaml``.

    Raises:
        FileNotFoundError: The dataset has not been prepared (names the manifest path).
    """
    manifest = manifest_of(cfg)
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest}: no prepared dataset; run `lmforge prepare CONFIG` "
            "(or `lmforge run`, or a `lmforge submit ... --stage prepare` job) first"
        )
    cfg = with_tokenizer_vocab(cfg, manifest)
    cfg.save(run_dir_of(cfg) / "config.yaml")
    return cfg


def train_stage(
    cfg: RunConfig, resume: str | None = None, run_id: str | None = None
) -> int:
    """Trains on the prepared shards with DeepSpeed across local processes."""
    check_devices(cfg)
    cfg = config_for_training(cfg)
    run_dir = run_dir_of(cfg)
    stage(
        f"train: DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.precision}, "
        f"{cfg.world_size} process(es), {cfg.train.max_steps} steps"
    )
    return launch_training(cfg, run_dir, resume=resume, run_id=run_id)


# -- export and sample ---------------------------------------------------------------


def export_stage(cfg: RunConfig, checkpoint: str | None = None, out_dir: str | None = None) -> Path:
    """Writes the Hugging Face folder for a checkpoint and verifies it by logit parity."""
    from lmforge.launch.exporting import export_run

    stage("export: checkpoint → Hugging Face folder (verified)")
    cfg = with_tokenizer_vocab(cfg, manifest_of(cfg))
    target = Path(out_dir or cfg.export.output_dir or run_dir_of(cfg) / "export")
    return export_run(cfg, run_dir_of(cfg), manifest_of(cfg), target, checkpoint)


def sample_stage(cfg: RunConfig, checkpoint: str | None = None) -> list[str]:
    """Generates continuations of ``sample.prompts`` with the trained model."""
    from lmforge.launch.exporting import load_trained_model, sample_texts

    stage("sample")
    cfg = with_tokenizer_vocab(cfg, manifest_of(cfg))
    model = load_trained_model(cfg, run_dir_of(cfg), checkpoint)
    texts = sample_texts(cfg, model, manifest_of(cfg))
    for prompt, text in zip(cfg.sample.prompts, texts, strict=True):
        print(f"--- prompt: {prompt!r}\n{text}\n", flush=True)
    return texts


# -- the whole run -------------------------------------------------------------------


def run_all(cfg: RunConfig, resume: str | None = None) -> RunResult:
    """prepare → train → export → sample, tracked in one MLflow run."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    tracker = Tracker(cfg.tracking, run_dir)
    previous = run_dir / RUN_ID_FILE
    run_id = tracker.start(
        run_name=cfg.name,
        run_id=previous.read_text().strip() if resume and previous.exists() else None,
        system_metrics=False,  # rank 0 samples them while training runs
    )
    if run_id:
        previous.write_text(run_id)
    tracker.log_params(cfg.to_dict())
    tracker.log_artifact(run_dir / "config.yaml")
    status = "FAILED"
    export_dir, samples, code = None, [], 1
    try:
        manifest = prepare_stage(cfg, tracker)
        cfg = with_tokenizer_vocab(cfg, manifest)
        tracker.flush()
        code = train_stage(cfg, resume=resume, run_id=run_id)
        if code != 0:
            status = "KILLED"
            log.error("training exited with status %d; the run stops here", code)
            return RunResult(run_dir, manifest, tracker.uri, run_id, None, [], code)
        if cfg.export.enabled:
            export_dir = export_stage(cfg)
            tracker.log_artifacts(export_dir, "export")
        samples = sample_stage(cfg)
        records = [
            {"prompt": p, "text": t} for p, t in zip(cfg.sample.prompts, samples, strict=True)
        ]
        (run_dir / "samples.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
        tracker.log_artifact(run_dir / "samples.json")
        status = "FINISHED"
    finally:
        tracker.close(status=status)
    if tracker.run_id:  # the real id, also when MLflow answered only after start() returned
        run_id = tracker.run_id
        previous.write_text(run_id)
    result = RunResult(run_dir, manifest, tracker.uri, run_id, export_dir, samples, code)
    print_summary(result)
    return result


def print_summary(result: RunResult) -> None:
    print("\n== done ==")
    print(f"run directory : {result.run_dir}")
    print(f"MLflow store  : {result.tracking_uri}  (run {result.run_id})")
    if result.export_dir is not None:
        print(f"HF export     : {result.export_dir}")
    print(f"resume        : lmforge train {result.run_dir / 'config.yaml'} --resume auto")
    if result.tracking_uri.startswith("sqlite:"):
        print(
            "open the UI   : mlflow ui --backend-store-uri "
            f"{result.tracking_uri} --host 127.0.0.1 --port 5000   # then http://127.0.0.1:5000"
        )
    else:
        print(f"open the UI   : {result.tracking_uri}")
