"""From a DeepSpeed checkpoint to the native model and to a verified Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.launch.config import ExportConfig
from lmforge.launch.export.hf_folder import write_hf_folder
from lmforge.launch.export.verify import ExportCheck
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.checkpoint import consolidated_state_dict
from lmforge.launch.train.trainable import has_lora
from lmforge.model import ModelConfig, to_hf
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest


def load_trained_model(
    model_cfg: ModelConfig, checkpoints: Path, checkpoint: str | None = None
) -> nn.Module:
    """Builds the model and loads a checkpoint's weights into it; a LoRA run's adapters are
    merged into the weights (its ``trainable`` section is read from the ``config.yaml`` beside
    its checkpoints folder), so the model is the plain architecture.

    Args:
        model_cfg: The model section (with the vocabulary size filled in).
        checkpoints: The run's checkpoints folder.
        checkpoint: A checkpoint folder; None takes the newest complete one.
    """
    folder = ckpt.find_resume(checkpoints, checkpoint or "auto")
    if folder is None:
        raise FileNotFoundError(
            f"{checkpoints}: no complete checkpoint; train first (`lmforge train`)"
        )
    model = model_cfg.build()
    state = consolidated_state_dict(folder)
    if has_lora(state):  # a LoRA run: fold the adapters in, export the plain architecture
        from lmforge.launch.train.warm_start import merged_lora_state, source_sections

        state = merged_lora_state(model_cfg, source_sections(folder)[1], state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied output head is saved once, under the embedding's name.
    missing = [k for k in missing if not _is_tied_copy(model, k)]
    if missing or unexpected:
        raise RuntimeError(
            f"{folder}: checkpoint does not match model.* config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.float().eval()


def task_labels(manifest: DatasetManifest) -> list[str] | None:
    """The class names of a classification data set, in id order (None for other data)."""
    labels = list(manifest.task.labels) if manifest.task is not None else []
    return labels or None


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return name in params and name not in unique


def export_checkpoint(
    model: nn.Module,
    model_cfg: ModelConfig,
    export: ExportConfig,
    manifest: DatasetManifest,
    out_dir: Path,
    seed: int = 0,
) -> Path:
    """Writes ``out_dir`` (config.json, model.safetensors, tokenizer), verified in a temporary
    folder (logit parity; identical greedy tokens for the generative families) before it
    replaces an earlier export.

    Args:
        model: The trained model (see :func:`load_trained_model`); with ``export.dtype``
            bf16 its weights are rounded to bf16 in place (the check compares those).
        model_cfg: Its model section.
        export: The export section (the logit tolerance).
        manifest: The dataset it was trained on (tokenizer file and special ids).
        out_dir: The export folder; replaced only once the new export is complete.
        seed: Seeds the random token ids the logits are compared on.

    Returns:
        The export folder.

    Raises:
        ExportError: transformers' logits differ from lmforge's by more than
            ``export.verify_atol`` (the message gives the measured difference), greedy tokens
            differ, or the exported tokenizer encodes differently; ``out_dir`` is untouched.
    """
    tokenizer = manifest.tokenizer
    dtype = torch.bfloat16 if export.dtype == "bf16" else torch.float32
    if dtype != torch.float32:  # the check compares with the weights the folder holds
        model.to(dtype).float()
    hf_config, hf_state = to_hf(
        model_cfg,
        model.state_dict(),
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=tokenizer.eos_id,  # BART's convention; denoising trains with it
        labels=task_labels(manifest) if model_cfg.num_labels else None,
    )
    check = ExportCheck(model, model_cfg, manifest.tokenizer_model, atol=export.verify_atol,
                        length=min(manifest.seq_len, 64), seed=seed)
    return write_hf_folder(out_dir, hf_config, hf_state, manifest.tokenizer_model, verify=check,
                           dtype=dtype, max_shard_size=export.max_shard_bytes())
