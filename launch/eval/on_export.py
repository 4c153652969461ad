"""Scoring eval tasks on a Hugging Face export with ``transformers`` (no DeepSpeed), and
finding the run an export belongs to so the scores land in its MLflow run.

An export knows its run through the run directory that wrote it: the stage's
``STAGE_COMPLETE`` records ``export_dir``, ``step`` and ``run_id``
(:class:`~lmforge.launch.rundir.StageRecord`). ``lmforge eval`` accepts either folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.launch.eval.scoring import LoglikelihoodFn, PairEncoder
from lmforge.launch.rundir import RunDir, StageRecord

log = logging.getLogger("lmforge")
DEFAULT_MAX_LENGTH = 2048  # lm-evaluation-harness's, for a config that states none


@dataclass(frozen=True)
class EvalTarget:
    """What ``lmforge eval`` scores, and where the scores are logged."""

    export_dir: Path
    run_dir: Path | None = None
    """The run directory of the stage that wrote the export; None when unknown."""
    record: StageRecord | None = None


def resolve_target(path: str | Path) -> EvalTarget:
    """The export in ``path``: an export folder (its run found when the folder above it
    recorded it), or a run directory (its export; for a stage graph, the last stage's).

    Raises:
        FileNotFoundError: Naming the folder and what ``lmforge eval`` expects.
    """
    path = Path(path).resolve()
    if (path / "config.json").is_file():
        parent = RunDir.of(path.parent)
        record = parent.read_stage_complete()
        if record and record.export_dir and Path(record.export_dir).resolve() == path:
            return EvalTarget(path, parent.path, record)
        return EvalTarget(path)
    stages = [RunDir(p) for p in sorted((path / "stages").glob("*")) if p.is_dir()]
    for run in [RunDir.of(path), *reversed(stages)]:
        record = run.read_stage_complete()
        if record and record.export_dir and (Path(record.export_dir) / "config.json").is_file():
            return EvalTarget(Path(record.export_dir).resolve(), run.path, record)
    if (RunDir.of(path).export / "config.json").is_file():
        return EvalTarget(RunDir.of(path).export, path)
    raise FileNotFoundError(f"{path}: neither a Hugging Face export (no config.json) nor a "
                            "run directory with an export (no export/ or STAGE_COMPLETE naming "
                            "one); give the export folder or run `lmforge export` first")


def _max_length(config: Any, tokenizer: Any) -> int:
    """The model's context, looked up as lm-evaluation-harness looks it up."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length < 10**12 else DEFAULT_MAX_LENGTH


def load_export(export_dir: str | Path, batch_size: int = 16, device: str = "cpu"
                ) -> tuple[PairEncoder, LoglikelihoodFn]:
    """The tokenizer and model of an export as a :class:`PairEncoder` and a log-likelihood
    function (float32, ``transformers`` Auto classes, nothing from the Hub).

    Raises:
        ValueError: When the export is not a causal or sequence-to-sequence language model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    from lmforge.launch.eval.loglikelihood import causal_loglikelihood, seq2seq_loglikelihood

    folder = str(export_dir)
    config = AutoConfig.from_pretrained(folder)
    architectures = config.architectures or []
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if not seq2seq and not any(a.endswith(("CausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(f"{folder}: the export is a {', '.join(architectures) or 'model'}; "
                         "eval tasks score a causal or sequence-to-sequence language model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    bos_text = tokenizer.decode(prefix) if prefix is not None else None

    def encode(text: str, add_special_tokens: bool | None) -> list[int]:
        if add_special_tokens is None and bos_text and text.startswith(bos_text):
            add_special_tokens = False  # the text carries its BOS already (as the harness)
        if add_special_tokens is None:
            return tokenizer.encode(text)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    max_length = _max_length(config, tokenizer)
    if seq2seq:
        score = seq2seq_loglikelihood(
            lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask,
                                            labels=labels).logits,
            max_length, batch_size, device)
    else:
        score = causal_loglikelihood(lambda ids: model(ids).logits, max_length, batch_size,
                                     device)
    return PairEncoder(encode, prefix, "seq2seq" if seq2seq else "causal"), score


def log_scores(target: EvalTarget, metrics: dict[str, dict[str, float]]) -> str | None:
    """Logs ``eval/<task>/<metric>`` to the MLflow run of the export's stage, at the step it
    was exported from; the run's status is left as it is. Returns the run id, or None when
    the run is unknown or tracking is off. A tracking failure is a warning, never an error.
    """
    if target.run_dir is None:
        return None
    run = RunDir.of(target.run_dir)
    run_id = (target.record.run_id if target.record else None) or run.read_run_id()
    if not run_id or not run.config.is_file():
        return None
    try:
        from lmforge.launch.config.run_config import load_resolved
        from lmforge.launch.tracking import Tracker
        from lmforge.launch.tracking.tracker import configure_mlflow_quiet

        tracking = load_resolved(run.path).tracking
        if not tracking.enabled:
            return None
        configure_mlflow_quiet(tracking.timeout_s)
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        step = (target.record.step if target.record else None) or 0
        now = int(time.time() * 1000)
        client = MlflowClient(tracking_uri=Tracker(tracking, run.path).tracking_uri)
        client.log_batch(run_id, metrics=[
            Metric(f"eval/{task}/{name}", float(value), now, int(step))
            for task, values in metrics.items() for name, value in values.items()])
    except Exception as err:  # the scores are printed anyway; tracking never fails eval
        log.warning("lmforge eval: could not log to MLflow run %s: %s", run_id, err)
        return None
    return run_id
